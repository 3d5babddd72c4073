"""Who owns a loaded model: a stage's block loads each generator once, closes evicted ones, closes all at its end."""

import threading

import pytest

import tasks.resources
from agent_runtime.backends import BackendConfig
from tasks.resources import Generators, generator_for, open_generators

TEACHER = BackendConfig(kind="llamacpp", model="teacher")
STUDENT = BackendConfig(kind="llamacpp", model="student")
TUNED = BackendConfig(kind="llamacpp", model="student", adapter="/adapters/a")


class FakeGenerator:
    def __init__(self, cfg, adapters=()):
        self.cfg, self.adapters, self.closed = cfg, adapters, False

    def close(self):
        assert not self.closed, "closed twice"
        self.closed = True

    def for_adapter(self, adapter):
        return (self, adapter)


@pytest.fixture
def loads(monkeypatch):
    """Every generator the resources module loads, in order (no model is loaded)."""
    made: list[FakeGenerator] = []

    def load(cfg, adapters):
        made.append(FakeGenerator(cfg, adapters))
        return made[-1]

    monkeypatch.setattr(tasks.resources, "load_generator", load)
    return made


def test_a_stage_loads_each_generator_once_and_closes_them_at_its_end(loads):
    with open_generators([TEACHER, STUDENT]):
        for _ in range(3):  # three shards of the same method
            with generator_for(TEACHER) as generator:
                assert generator is loads[0] and not generator.closed
        with generator_for(STUDENT):
            pass
        assert [g.cfg for g in loads] == [TEACHER, STUDENT] and not any(g.closed for g in loads)
    assert all(g.closed for g in loads)


def test_a_task_outside_a_stage_block_closes_its_generator_when_it_ends(loads):
    with generator_for(TEACHER) as generator:
        assert not generator.closed
    assert generator.closed
    with generator_for(TEACHER) as again:
        assert again is not generator  # a new one: the first is gone


def test_the_least_recently_used_idle_generator_is_closed_when_another_loads(loads):
    generators = Generators(capacity=2)
    with generators.lease(TEACHER) as teacher:
        with generators.lease(STUDENT) as student:
            pass
        with generators.lease(TUNED):
            # The student is idle and least recently used; the teacher is in use and stays open.
            assert student.closed and not teacher.closed
    with generators.lease(STUDENT):
        assert teacher.closed  # released, then the oldest idle one
    generators.close()
    assert all(g.closed for g in loads)


def test_a_generator_in_use_is_closed_only_when_released(loads):
    generators = Generators(capacity=1)
    release, taken = threading.Event(), threading.Event()

    def shard():
        with generators.lease(TEACHER):
            taken.set()
            release.wait(10)

    worker = threading.Thread(target=shard)
    worker.start()
    taken.wait(10)
    with generators.lease(STUDENT):
        assert not loads[0].closed  # over capacity while the teacher's shard runs
    assert loads[1].closed  # released while the teacher is still in use: the one idle generator
    release.set()
    worker.join(10)
    assert not loads[0].closed  # back within capacity
    generators.close()
    assert loads[0].closed


def test_vllm_students_of_one_base_share_one_engine(loads):
    base = BackendConfig(kind="vllm", model="student")
    agent = base.model_copy(update={"adapter": "/adapters/agent"})
    cot = base.model_copy(update={"adapter": "/adapters/cot"})
    with (open_generators([base, agent, cot]), generator_for(agent) as tuned, generator_for(base) as plain,
          generator_for(cot) as other):
        assert tuned == (loads[0], "/adapters/agent") and plain == (loads[0], None)
        assert other == (loads[0], "/adapters/cot")
    assert len(loads) == 1 and loads[0].cfg == base and loads[0].adapters == ("/adapters/agent", "/adapters/cot")
    assert loads[0].closed
