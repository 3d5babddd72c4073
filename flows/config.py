"""The pipeline config: one typed section per stage, loaded from a YAML profile (configs/*.yaml).

Each section is the config model its domain function takes, declared next to that function; this
module only composes them. Flow parameters are these models, so the Prefect UI renders forms for them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent_runtime.backends import BackendConfig
from agent_runtime.prefixes import PrefixConfig
from agent_runtime.rollout import RolloutConfig
from agent_runtime.sandbox import SandboxConfig
from evaluation.evaluate import EvalConfig
from flows.reeval_config import ReevalConfig
from questions.datasets import with_limit
from retrieval.index import IndexConfig
from retrieval.service import ServiceConfig
from tasks.resources import SearchConfig
from training.data import SftDataConfig
from training.opd import OpdConfig
from training.sft import TrainConfig


class CotStudentConfig(BaseModel):
    """The CoT-distillation baseline: the student trained on the teacher's correct CoT solutions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="also train (and evaluate) the CoT-distilled student")
    train: TrainConfig = Field(TrainConfig(), description="its LoRA training settings")


class PipelineConfig(BaseModel):
    """Every stage's settings; ``distillery run`` runs them all, a stage command runs one (and its inputs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: IndexConfig = Field(IndexConfig(), description="corpus, embedder and FAISS index of web_search")
    search: SearchConfig = Field(SearchConfig(), description="how agents reach the retriever")
    retriever_service: ServiceConfig = Field(ServiceConfig(), description="limits and batching of "
                                             "`distillery retriever serve`")
    sandbox: SandboxConfig = Field(SandboxConfig(), description="limits of the code sandbox")
    teacher: BackendConfig = Field(BackendConfig(), description="the teacher model and its backend")
    student: BackendConfig = Field(BackendConfig(), description="the student model and its backend (evaluation)")
    prefixes: PrefixConfig = Field(PrefixConfig(), description="the teacher's CoT pass (FTP prefixes, CoT data)")
    rollout: RolloutConfig = Field(RolloutConfig(), description="teacher rollouts over the training questions")
    sft: SftDataConfig = Field(SftDataConfig(), description="which trajectories become training examples")
    train: TrainConfig = Field(TrainConfig(), description="LoRA SFT of the agent-distilled student")
    cot_student: CotStudentConfig = Field(CotStudentConfig(), description="the CoT-distilled baseline student")
    opd: OpdConfig = Field(OpdConfig(), description="on-policy distillation of the agent-distilled student")
    evaluate: EvalConfig = Field(EvalConfig(), description="held-out evaluation of baselines and students")
    reevaluate: ReevalConfig = Field(ReevalConfig(), description="the scheduled re-evaluation deployment")

    def student_kinds(self) -> tuple[str, ...]:
        """The distilled students this config trains: ``agent``, and ``cot`` when the CoT baseline is enabled."""
        return ("agent", "cot") if self.cot_student.enabled else ("agent",)

    def train_config(self, kind: str) -> TrainConfig:
        """The LoRA settings of the ``kind`` student."""
        return self.cot_student.train if kind == "cot" else self.train

    def rollout_datasets(self) -> tuple:
        """The training questions the teacher answers (the prefixes and rollout stages), limits applied."""
        return tuple(with_limit(d, self.rollout.limit) for d in self.rollout.datasets)

    def opd_scorer(self) -> BackendConfig:
        """The backend that scores the student's tokens: ``opd.scorer``, else the teacher's model on transformers."""
        if self.opd.scorer is not None:
            return self.opd.scorer
        return BackendConfig(kind="transformers", model=self.teacher.model, dtype=self.teacher.dtype,
                             device=self.teacher.device)

    def opd_datasets(self) -> tuple:
        """The questions the student answers in on-policy distillation (default: the rollout's), limits applied."""
        return tuple(with_limit(d, self.opd.limit) for d in (self.opd.datasets or self.rollout.datasets))

    @model_validator(mode="after")
    def _one_student(self) -> PipelineConfig:
        checked = [("train", self.train)]
        if self.cot_student.enabled:
            checked.append(("cot_student.train", self.cot_student.train))
        for name, train in checked:
            if train.base_model != self.student.model:
                raise ValueError(f"{name}.base_model ({train.base_model!r}) must be the student model "
                                 f"({self.student.model!r}): the adapter is evaluated on top of it")
        return self
