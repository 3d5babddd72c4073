"""The plan of a run: every stage's artifact id, the stages it reads, and whether it is built.

``plan_pipeline`` walks the registry (``flows.stages.STAGES``) under a config: each stage's instances (one,
or one per student kind), what each reads, and the artifact each writes (its id hashes the stage's
``identity``, its inputs' ids and its code). ``build_missing`` is the one loop that builds a plan's missing
stages, upstream first, each through its builder. ``distillery <stage>`` answers a finished plan without
starting Prefect, and every stage flow plans and builds through these two, so they all compute the same ids.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from flows import stages
from flows.config import PipelineConfig
from flows.stages import PIPELINE, StageOptions, stage
from storage.store import ArtifactError, ArtifactRef, ArtifactStore, StagePlan, code_version, student_adapters


@dataclass(frozen=True)
class PlannedStage:
    """One stage instance of a plan: the artifact it writes (or, when pinned, re-uses) and what it reads.

    ``name`` is the stage's name, with the student's kind for the student stages: ``index``, ``prefixes``,
    ``rollout``, ``sft/agent``, ``train/agent``, ``sft/cot``, ``train/cot``, ``evaluate``.
    """

    name: str
    ref: ArtifactRef
    inputs: tuple[str, ...] = ()
    plan: StagePlan | None = None  # None: an existing artifact the config (or caller) pins

    @property
    def pinned(self) -> bool:
        return self.plan is None

    @property
    def kind(self) -> str:
        return self.name.partition("/")[2]


@dataclass(frozen=True)
class PipelinePlan:
    """The stage instances a run needs, upstream first, and which of them it still has to build."""

    store: ArtifactStore
    stages: dict[str, PlannedStage]
    to_build: frozenset[str]  # instances not built at planning time that the targets need built

    def __contains__(self, name: str) -> bool:
        return name in self.stages

    def __getitem__(self, name: str) -> PlannedStage:
        return self.stages[name]

    def ref(self, name: str) -> ArtifactRef:
        return self.stages[name].ref

    def built(self, name: str) -> bool:
        """Whether the instance's artifact exists now (a flow may have built it since planning)."""
        return self.store.exists(self.stages[name].ref)

    def missing(self, name: str) -> bool:
        """The targets need this instance built and it is not (yet)."""
        return name in self.to_build and not self.built(name)

    def complete(self) -> bool:
        """Every instance of the plan exists."""
        return all(self.built(name) for name in self.stages)

    def of(self, stage_name: str) -> dict[str, ArtifactRef]:
        """The artifacts of one stage's instances, by planned name (``train/agent``, ``train/cot``)."""
        return {name: s.ref for name, s in self.stages.items() if name.partition("/")[0] == stage_name}

    def adapters(self) -> dict[str, ArtifactRef]:
        """The students' adapters of the plan, by kind (``agent``, ``cot``, and ``opd``: its last iteration)."""
        return student_adapters({name: s.ref for name, s in self.stages.items()})

    def results(self) -> dict[str, ArtifactRef]:
        """What the pipeline returns: ``adapter_<kind>`` for each student, and ``evaluation``."""
        return {**{f"adapter_{kind}": ref for kind, ref in self.adapters().items()}, "evaluation": self.ref("evaluate")}


def plan_pipeline(store: ArtifactStore, cfg: PipelineConfig, targets: tuple[str, ...] = PIPELINE,
                  adapters: dict[str, ArtifactRef] | None = None) -> PipelinePlan:
    """The plan for building ``targets`` (stage names, e.g. ``("train",)``) under ``cfg``.

    Only the targets and the stages they read are planned, so ``distillery index`` reads no dataset.
    Pinned instances (``rollout.artifact``, ``prefixes.artifact``, or ``adapters`` given by the caller, as
    the re-evaluation does) are resolved in the store and never built. An instance is to be built when it
    does not exist and a target needs it: the target itself, or an input of an instance that is to be built.
    Every needed artifact that exists is verified against its manifest's checksums; a corrupt one is moved
    aside and so planned to be built (``set_aside_if_corrupt``).
    """
    graph = stage_graph(cfg, adapters)
    wanted = {name for name in graph if stage(name).name in targets}
    for name in reversed(graph):  # the graph is upstream first, so this walks downstream first
        if name in wanted:
            wanted.update(graph[name])
    planned: dict[str, PlannedStage] = {}
    for name, inputs in graph.items():
        if name in wanted:
            planned[name] = plan_stage(store, cfg, name, inputs, planned, adapters or {})
    to_build: set[str] = set()
    for name in reversed(planned):
        needed = stage(name).name in targets or any(name in planned[s].inputs for s in to_build)
        set_aside_if_corrupt(store, planned[name], needed)
        if needed and not store.exists(planned[name].ref):
            to_build.add(name)
    return PipelinePlan(store, planned, frozenset(to_build))


def set_aside_if_corrupt(store: ArtifactStore, planned: PlannedStage, needed: bool) -> None:
    """Check an instance's artifact before the plan counts it as built; a corrupt one is moved aside (so it
    is rebuilt) when the run needs it, and named in a warning line when it does not.

    A needed artifact (a target, or one a build will read) is re-hashed against its manifest (once per
    process per file); the others get the cheap check (a readable manifest, every file there at its size).
    """
    found = store.state(planned.ref.path, hashes=needed)
    if found.state != "corrupt":
        return
    ref, why = planned.ref, "; ".join(found.problems)
    if not needed:
        print(f"warning: {ref.stage}/{ref.id} is corrupt ({why}); this run does not need it and leaves it as it is",
              file=sys.stderr)
    elif planned.pinned:
        raise ArtifactError(f"pinned artifact {ref.stage}/{ref.id} is corrupt ({why}); import or build it again")
    else:
        with store.lock(ref):  # another run may be rebuilding it now: move aside only what is still corrupt
            if store.state(ref.path, hashes=True).state == "corrupt":
                store.set_aside(ref, why)


def stage_graph(cfg: PipelineConfig, adapters: dict[str, ArtifactRef] | None) -> dict[str, tuple[str, ...]]:
    """Every stage instance the config can build and the instances it reads, upstream first."""
    graph: dict[str, tuple[str, ...]] = {}
    for entry in stages.STAGES:
        if adapters is not None and entry.name in ("sft", "train", "opd"):  # given by the caller: nothing to train
            if entry.name == "train":
                graph |= {f"train/{kind}": () for kind in adapters if kind != "opd"}
            if entry.name == "opd" and "opd" in adapters:
                graph[f"opd/{cfg.opd.iterations}"] = ()
            continue
        for name in entry.instances(cfg):
            kind = name.partition("/")[2]
            # An input the config cannot build (a cot_student method without the CoT student) is left out;
            # the stage's builder says what is missing.
            graph[name] = () if entry.pinned(cfg) else tuple(i for i in entry.inputs(cfg, kind) if i in graph)
    return graph


def plan_stage(store: ArtifactStore, cfg: PipelineConfig, name: str, inputs: tuple[str, ...],
               planned: dict[str, PlannedStage], adapters: dict[str, ArtifactRef]) -> PlannedStage:
    """The planned instance ``name`` whose ``inputs`` are already in ``planned``."""
    entry, kind = stage(name), name.partition("/")[2]
    if entry.pinned(cfg):
        return PlannedStage(name, pinned(store, entry.pinned(cfg), entry.name))
    if entry.name == "train" and kind in adapters:
        return PlannedStage(name, adapters[kind])
    if entry.name == "opd" and "opd" in adapters:
        return PlannedStage(name, adapters["opd"])
    refs = {parent: planned[parent].ref for parent in inputs}
    plan = store.plan_stage(entry.name, entry.identity(cfg, kind, refs), [ref.id for ref in refs.values()],
                            code=code_version(entry.code))
    return PlannedStage(name, plan.ref, inputs, plan)


def pinned(store: ArtifactStore, id_: str, stage_name: str) -> ArtifactRef:
    """An existing artifact named in the config (``rollout.artifact``, ``prefixes.artifact``), checked."""
    ref = store.resolve(id_)
    if ref.stage != stage_name:
        raise ArtifactError(f"artifact {id_!r} is a {ref.stage} artifact, not {stage_name}")
    return ref


def check_plan(plan: PipelinePlan, cfg: PipelineConfig) -> None:
    """Check the inputs of the instances ``plan`` still has to build; a built or pinned one reads nothing.

    So a pipeline whose rollouts are pinned (``rollout.artifact``) or already built never needs the
    teacher's model, and a built index never re-reads its corpus. Each check runs once per run.
    """
    done = set()
    for name in plan.stages:
        if plan.missing(name):
            entry, kind = stage(name), plan[name].kind
            if (entry.check, kind) not in done:
                entry.check(cfg, kind)
                done.add((entry.check, kind))


def build_missing(plan: PipelinePlan, cfg: PipelineConfig, options: StageOptions = StageOptions()) -> None:
    """Build every instance the plan still misses, upstream first, each through its stage's builder."""
    for name, planned in plan.stages.items():
        if plan.missing(name):
            inputs = {parent: plan.ref(parent) for parent in planned.inputs}
            stage(name).build()(planned.plan, cfg, inputs, planned.kind, options)


def cached_pipeline(store: ArtifactStore, cfg: PipelineConfig) -> dict[str, ArtifactRef] | None:
    """The pipeline's results if every stage it would run already exists, else None (nothing is run)."""
    plan = plan_pipeline(store, cfg)
    return plan.results() if plan.complete() else None
