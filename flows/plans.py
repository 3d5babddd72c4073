"""The plan of a run: every stage's artifact id, the stages it reads, and whether it is built.

``plan_pipeline`` is the one place that states the stage chain of the README's diagram,

    index ──► prefixes (optional FTP) ──► trajectories ──► sft_data ──► adapters ──► evals

and what goes into each id (configs, fingerprints, parents). ``distillery run`` answers a finished
pipeline from the plan without starting Prefect, the pipeline flow runs the stages in its order, and a
stage flow finds its inputs in it (building the missing ones first), so they all compute the same ids.
Nothing here runs a stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.config import PipelineConfig
from questions.datasets import dataset_fingerprint, with_limit
from retrieval.corpus import corpus_fingerprint
from storage.store import ArtifactError, ArtifactRef, ArtifactStore, StagePlan

PIPELINE = ("adapters", "evals")
"""What ``distillery run`` builds: every student's adapter and the evaluation (and what they read)."""


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a plan: the artifact it writes (or, when pinned, re-uses) and the stages it reads.

    ``name`` is the stage, with the student's kind for the per-student stages: ``index``, ``prefixes``,
    ``trajectories``, ``sft_data/agent``, ``adapters/agent``, ``sft_data/cot``, ``adapters/cot``, ``evals``.
    """

    name: str
    ref: ArtifactRef
    inputs: tuple[str, ...] = ()
    plan: StagePlan | None = None  # None: an existing artifact the config (or caller) pins

    @property
    def pinned(self) -> bool:
        return self.plan is None


@dataclass(frozen=True)
class PipelinePlan:
    """The stages a run needs, upstream first, and which of them it still has to build."""

    store: ArtifactStore
    stages: dict[str, PlannedStage]
    to_build: frozenset[str]  # stages not built at planning time that the targets need built

    def __contains__(self, name: str) -> bool:
        return name in self.stages

    def __getitem__(self, name: str) -> PlannedStage:
        return self.stages[name]

    def ref(self, name: str) -> ArtifactRef:
        return self.stages[name].ref

    def built(self, name: str) -> bool:
        """Whether the stage's artifact exists now (a flow may have built it since planning)."""
        return self.store.exists(self.stages[name].ref)

    def missing(self, name: str) -> bool:
        """The targets need this stage built and it is not (yet): its flow has to run."""
        return name in self.to_build and not self.built(name)

    def complete(self) -> bool:
        """Every stage of the plan exists."""
        return all(self.built(name) for name in self.stages)

    def adapters(self) -> dict[str, ArtifactRef]:
        """The students' adapters of the plan, by kind (``agent``, ``cot``)."""
        return students({name: stage.ref for name, stage in self.stages.items()})

    def results(self) -> dict[str, ArtifactRef]:
        """What the pipeline returns: ``adapter_<kind>`` for each student, and ``evaluation``."""
        return pipeline_results(self.adapters(), self.ref("evals"))


def pipeline_results(adapters: dict[str, ArtifactRef], evaluation: ArtifactRef) -> dict[str, ArtifactRef]:
    return {**{f"adapter_{kind}": ref for kind, ref in adapters.items()}, "evaluation": evaluation}


def plan_pipeline(store: ArtifactStore, cfg: PipelineConfig, targets: tuple[str, ...] = PIPELINE,
                  adapters: dict[str, ArtifactRef] | None = None) -> PipelinePlan:
    """The plan for building ``targets`` (stage names, e.g. ``("adapters",)``) under ``cfg``.

    Only the targets and the stages they read are planned, so ``distillery index`` reads no dataset.
    Pinned stages (``rollout.artifact``, ``prefixes.artifact``, or ``adapters`` given by the caller, as the
    re-evaluation does) are resolved in the store and never built. A stage is to be built when it does not
    exist and a target needs it: the target itself, or an input of a stage that is to be built.
    """
    graph = stage_inputs(cfg, adapters)
    wanted = {name for name in graph if stage_of(name) in targets}
    for name in reversed(graph):  # the graph is upstream first, so this walks downstream first
        if name in wanted:
            wanted.update(graph[name])
    stages: dict[str, PlannedStage] = {}
    for name, inputs in graph.items():
        if name in wanted:
            stages[name] = plan_stage(store, cfg, name, inputs, stages, adapters or {})
    to_build: set[str] = set()
    for name in reversed(stages):
        needed = stage_of(name) in targets or any(name in stages[s].inputs for s in to_build)
        if needed and not store.exists(stages[name].ref):
            to_build.add(name)
    return PipelinePlan(store, stages, frozenset(to_build))


def stage_of(name: str) -> str:
    """The artifact stage of a planned stage's name: ``adapters/agent`` → ``adapters``."""
    return name.partition("/")[0]


def students(refs: dict[str, ArtifactRef]) -> dict[str, ArtifactRef]:
    """The adapters among planned stages' refs, by the student's kind: ``adapters/cot`` → ``cot``."""
    return {name.partition("/")[2]: ref for name, ref in refs.items() if stage_of(name) == "adapters"}


def stage_inputs(cfg: PipelineConfig, adapters: dict[str, ArtifactRef] | None) -> dict[str, tuple[str, ...]]:
    """Every stage the config can build and the stages it reads, upstream first (the config alone decides)."""
    sources = {"agent": "trajectories"} | ({"cot": "prefixes"} if cfg.cot_student.enabled else {})
    graph: dict[str, tuple[str, ...]] = {"index": (), "prefixes": ()}
    if cfg.rollout.artifact:
        graph["trajectories"] = ()
    else:
        graph["trajectories"] = ("index", "prefixes") if cfg.rollout.use_prefixes else ("index",)
    if adapters is not None:  # given by the caller: nothing to train
        graph |= {f"adapters/{kind}": () for kind in adapters}
    else:
        for kind, source in sources.items():
            graph[f"sft_data/{kind}"] = (source,)
            graph[f"adapters/{kind}"] = (f"sft_data/{kind}",)
    students = {f"adapters/{m.removesuffix('_student')}" for m in cfg.evaluate.distilled_models()}
    graph["evals"] = ("index", *sorted(name for name in graph if name in students))
    return graph


def plan_stage(store: ArtifactStore, cfg: PipelineConfig, name: str, inputs: tuple[str, ...],
               planned: dict[str, PlannedStage], adapters: dict[str, ArtifactRef]) -> PlannedStage:
    """The planned stage ``name`` whose ``inputs`` are already in ``planned``."""
    stage, _, kind = name.partition("/")
    refs = {parent: planned[parent].ref for parent in inputs}
    if stage == "prefixes" and cfg.prefixes.artifact:
        return PlannedStage(name, pinned(store, cfg.prefixes.artifact, "prefixes"))
    if stage == "trajectories" and cfg.rollout.artifact:
        return PlannedStage(name, pinned(store, cfg.rollout.artifact, "trajectories"))
    if stage == "adapters" and kind in adapters:
        return PlannedStage(name, adapters[kind])
    if stage == "index":
        plan = plan_index(store, cfg)
    elif stage == "prefixes":
        plan = plan_prefixes(store, cfg)
    elif stage == "trajectories":
        plan = plan_rollout(store, cfg, refs["index"], refs.get("prefixes"))
    elif stage == "sft_data":
        plan = plan_sft_data(store, cfg, refs[inputs[0]], kind)
    elif stage == "adapters":
        plan = plan_train(store, train_config(cfg, kind), refs[inputs[0]])
    else:
        plan = plan_evaluate(store, cfg, refs["index"], students(refs))
    return PlannedStage(name, plan.ref, inputs, plan)


def train_config(cfg: PipelineConfig, kind: str):
    """The LoRA settings of the ``kind`` student."""
    return cfg.cot_student.train if kind == "cot" else cfg.train


# ----------------------------------------------------------------------------- what goes into each id

def plan_index(store: ArtifactStore, cfg: PipelineConfig) -> StagePlan:
    identity = {"index": cfg.index.model_dump(mode="json"), "corpus_fingerprint": corpus_fingerprint(cfg.index.corpus)}
    return store.plan_stage("index", identity)


def plan_prefixes(store: ArtifactStore, cfg: PipelineConfig) -> StagePlan:
    datasets = rollout_datasets(cfg)
    identity = {"prefixes": cfg.prefixes.model_dump(mode="json"), "teacher": cfg.teacher.model_dump(mode="json"),
                "datasets": [dataset_fingerprint(d) for d in datasets]}
    return store.plan_stage("prefixes", identity)


def plan_rollout(store: ArtifactStore, cfg: PipelineConfig, index: ArtifactRef,
                 prefixes: ArtifactRef | None) -> StagePlan:
    identity = {
        "rollout": cfg.rollout.model_dump(mode="json"), "teacher": cfg.teacher.model_dump(mode="json"),
        "sandbox": cfg.sandbox.model_dump(mode="json"), "search": cfg.search.model_dump(mode="json"),
        "datasets": [dataset_fingerprint(d) for d in rollout_datasets(cfg)],
    }
    parents = [index.id] + ([prefixes.id] if prefixes is not None else [])
    return store.plan_stage("trajectories", identity, parents)


def pinned(store: ArtifactStore, id_: str, stage: str) -> ArtifactRef:
    """An existing artifact named in the config (``rollout.artifact``, ``prefixes.artifact``), checked."""
    ref = store.resolve(id_)
    if ref.stage != stage:
        raise ArtifactError(f"artifact {id_!r} is a {ref.stage} artifact, not {stage}")
    return ref


def rollout_datasets(cfg: PipelineConfig):
    return tuple(with_limit(d, cfg.rollout.limit) for d in cfg.rollout.datasets)


def plan_sft_data(store: ArtifactStore, cfg: PipelineConfig, source: ArtifactRef, kind: str) -> StagePlan:
    return store.plan_stage("sft_data", {"sft": cfg.sft.model_dump(mode="json"), "kind": kind}, [source.id])


def plan_train(store: ArtifactStore, train_cfg, data: ArtifactRef) -> StagePlan:
    return store.plan_stage("adapters", {"train": train_cfg.model_dump(mode="json")}, [data.id])


def plan_evaluate(store: ArtifactStore, cfg: PipelineConfig, index: ArtifactRef,
                  adapters: dict[str, ArtifactRef]) -> StagePlan:
    identity = {
        "evaluate": cfg.evaluate.model_dump(mode="json"), "student": cfg.student.model_dump(mode="json"),
        "teacher": cfg.teacher.model_dump(mode="json"), "sandbox": cfg.sandbox.model_dump(mode="json"),
        "search": cfg.search.model_dump(mode="json"),
        "datasets": [dataset_fingerprint(with_limit(d, cfg.evaluate.limit)) for d in cfg.evaluate.datasets],
        "adapters": {kind: ref.id for kind, ref in sorted(adapters.items())},
    }
    return store.plan_stage("evals", identity, [index.id, *(ref.id for _, ref in sorted(adapters.items()))])


def cached_pipeline(store: ArtifactStore, cfg: PipelineConfig) -> dict[str, ArtifactRef] | None:
    """The pipeline's results if every stage it would run already exists, else None (nothing is run)."""
    plan = plan_pipeline(store, cfg)
    return plan.results() if plan.complete() else None
