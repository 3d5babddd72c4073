"""Bad input through every entry point: the CLI's stage commands, ``distillery sandbox``, and a Prefect
deployment's parameters (the retriever's HTTP API is tested in tests/retrieval/test_retrieval_service.py).

Through the CLI (a dataset that is not JSON, an example without a question, a malformed corpus, a
broken adapter folder or GGUF file, an unreachable teacher endpoint, an index id that does not exist)
each gives one ``error:`` line naming the culprit, no traceback, exit 2, and the artifacts already
written stay complete and queryable. What can be checked before the flow starts is checked there, so
Prefect's temporary server is never started for it. A deployment run with bad parameters fails before
its first task, with a state message that names the culprit.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.resolve import resolve_model
from services.processes import free_port
from storage.catalog import query
from storage.store import ArtifactStore

CORPUS = "".join(json.dumps({"id": str(i), "title": f"T{i}", "text": f"text {i}"}) + "\n" for i in range(4))


def cli(home, *args):
    return subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(home), *args], check=False,
                          capture_output=True, text=True, timeout=600)


def config(tmp_path, dataset: str, teacher: str = "{kind: scripted, model: scripted}",
           corpus: Path | None = None) -> str:
    """A stage profile in ``tmp_path`` over ``corpus`` (default: CORPUS written beside it)."""
    if corpus is None:
        corpus = tmp_path / "corpus.jsonl"
        corpus.write_text(CORPUS)
    path = tmp_path / "stage.yaml"
    path.write_text(f"""
index: {{corpus: {{source: "{corpus}"}}}}
sandbox: {{workers: 1}}
teacher: {teacher}
rollout:
  datasets: [{{name: bad, source: "{dataset}", kind: math}}]
""")
    return str(path)


@pytest.fixture(scope="module")
def index_home(tmp_path_factory):
    """A home holding one complete index artifact, built once for the module (a CLI run: ~17 s), and the
    corpus it was built from (the index id covers the corpus's path, so the tests' profiles name this one)."""
    base = tmp_path_factory.mktemp("bad-input-index")
    corpus = base / "corpus.jsonl"
    corpus.write_text(CORPUS)
    result = cli(base / "home", "index", "--config", config(base, str(base / "unused.jsonl"), corpus=corpus))
    assert result.returncode == 0, result.stderr
    return base / "home", corpus


@pytest.fixture
def built_index(home, index_home):
    """``home`` as a copy of the module's index home: what must survive the failures below. The ids."""
    shutil.copytree(index_home[0], home)
    return query(home, "select id from artifacts where stage = 'index'")[1]


def assert_one_line(result, *needles):
    """Exit 2, one ``error: ...`` line naming the culprit, and no traceback in the terminal (Prefect's
    logs keep theirs)."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def assert_before_any_flow(result):
    """Checked before the flow started: Prefect's temporary server was never started."""
    assert "Starting temporary server" not in result.stderr, result.stderr[-3000:]


def assert_untouched(home, index_ids):
    assert query(home, "select id from artifacts where stage = 'index'")[1] == index_ids
    assert query(home, "select count(*) from passages")[1] == [(4,)]
    assert query(home, "select count(*) from artifacts where stage = 'rollout' and state = 'complete'")[1] == [(0,)]


def test_dataset_that_is_not_json_names_file_and_line(tmp_path, home, built_index, index_home):
    dataset = tmp_path / "questions.jsonl"
    dataset.write_text('{"id": "q1", "question": "What is 1 + 1?", "answer": "2"}\nthis is not json\n')
    result = cli(home, "rollout", "--config", config(tmp_path, str(dataset), corpus=index_home[1]))
    assert_one_line(result, f"{dataset}:2:", "not valid JSON")
    assert_before_any_flow(result)
    assert_untouched(home, built_index)


def test_example_without_question_is_named(tmp_path, home, built_index, index_home):
    dataset = tmp_path / "questions.json"
    dataset.write_text(json.dumps({"metadata": {}, "examples": [
        {"id": "q1", "question": "What is 1 + 1?", "answer": "2"}, {"id": "q2", "answer": "3"}]}))
    result = cli(home, "rollout", "--config", config(tmp_path, str(dataset), corpus=index_home[1]))
    assert_one_line(result, str(dataset), "q2", "question")
    assert_untouched(home, built_index)


def test_unreachable_teacher_endpoint_is_named(tmp_path, home, built_index, index_home):
    port = free_port()  # bound, then released: nothing listens there
    dataset = tmp_path / "questions.jsonl"
    dataset.write_text('{"id": "q1", "question": "What is 1 + 1?", "answer": "2"}\n')
    teacher = (f"{{kind: openai, model: teacher, base_url: 'http://127.0.0.1:{port}/v1', "
               "max_retries: 1, timeout_s: 5}")
    result = cli(home, "rollout", "--config", config(tmp_path, str(dataset), teacher, index_home[1]))
    assert_one_line(result, f"127.0.0.1:{port}")
    assert_untouched(home, built_index)


@pytest.mark.parametrize("command", [["sandbox", "-c", "print(1)", "--index"],
                                     ["retriever", "serve", "--index"]])
def test_index_id_that_does_not_exist_is_named(home, built_index, command):
    result = cli(home, *command, "0123456789abcdef")
    assert_one_line(result, "0123456789abcdef")
    assert query(home, "select id from artifacts where stage = 'index'")[1] == built_index


# ----------------------------------------------------------------------------- CLI: corpus and model files

@pytest.fixture
def stored(home):
    """A home holding one complete artifact, written without Prefect (what must survive the failures)."""
    store = ArtifactStore(home)
    ref = store.begin("sft", {"kept": True}, []).finish({"sft_examples": 0})
    return store, ref


def assert_store_kept(stored):
    store, ref = stored
    assert [m["id"] for m in store.list()] == [ref.id]
    assert sorted(p.name for p in store.root.iterdir()) == ["sft"]


@pytest.mark.parametrize("lines, needle", [
    ('{"id": "0", "title": "T0", "text": "text 0"}\n{"id": "1", "title": ', ":2: malformed JSON"),
    ('{"id": "0", "title": "T", "text": "a"}\n{"id": "0", "title": "T", "text": "b"}',
     ":2: duplicate id '0'"),
    ('{"id": "0", "name": "T0", "body": "a"}\n', ":1: missing field(s)"),
])
def test_malformed_corpus_names_file_and_line_before_any_flow(tmp_path, stored, lines, needle):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(lines)
    result = cli(stored[0].root, "index", "--set", f"index.corpus.source={corpus}")
    assert_one_line(result, f"{corpus}{needle}")
    assert_before_any_flow(result)
    assert_store_kept(stored)


def evaluate_config(tmp_path, model: str, adapter: Path | None = None) -> str:
    """A profile whose one method evaluates the student ``model`` (plus ``adapter``) with transformers."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(CORPUS)
    path = tmp_path / "evaluate.yaml"
    path.write_text(f"""
index: {{corpus: {{source: "{corpus}"}}}}
student: {{kind: transformers, model: "{model}", adapter: {json.dumps(adapter and str(adapter))}}}
train: {{base_model: "{model}"}}
evaluate:
  datasets: [{{name: arith, source: "builtin:arith", split: test, kind: math, num_questions: 2}}]
  methods: [{{name: agent, model: student, mode: agent}}]
""")
    return str(path)


def adapter_folder(tmp_path, config_text: str | None, weights: bytes | None) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    if config_text is not None:
        (folder / "adapter_config.json").write_text(config_text)
    if weights is not None:
        (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


SAFETENSORS_HEADER = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()


@pytest.mark.parametrize("config_text, weights, needle", [
    (None, None, "has no adapter_config.json"),
    ('{"peft_type": "LORA", ', None, "adapter_config.json: not valid JSON"),
    ('{"peft_type": "LORA"}', None, "has no weights"),
    ('{"peft_type": "LORA"}', len(SAFETENSORS_HEADER).to_bytes(8, "little") + SAFETENSORS_HEADER + bytes(8),
     "adapter_model.safetensors: truncated"),
])
def test_broken_adapter_folder_is_named_before_any_flow(tmp_path, stored, config_text, weights, needle):
    folder = adapter_folder(tmp_path, config_text, weights)
    profile = evaluate_config(tmp_path, "smollm2-135m-instruct", folder)
    result = cli(stored[0].root, "evaluate", "--config", profile)
    assert_one_line(result, str(folder), needle)
    assert_before_any_flow(result)
    assert_store_kept(stored)


@pytest.mark.parametrize("content, needle", [
    ("truncated", "truncated or corrupt GGUF file"),
    ("text", "not a GGUF file (it starts with b'not ', not b'GGUF')"),
])
def test_broken_gguf_file_is_named_before_any_flow(tmp_path, stored, content, needle):
    shipped = resolve_model("smollm2-135m-instruct")
    gguf = tmp_path / "model.gguf"
    if content == "truncated":
        with open(shipped.path / shipped.gguf_file, "rb") as source:
            gguf.write_bytes(source.read(2_000_000))
    else:
        gguf.write_text("not a model\n")
    result = cli(stored[0].root, "evaluate", "--config", evaluate_config(tmp_path, str(gguf)))
    assert_one_line(result, str(gguf), needle)
    assert_before_any_flow(result)
    assert_store_kept(stored)


# ----------------------------------------------------------------------------- distillery sandbox

def test_sandbox_bad_inputs_are_one_line_each(tmp_path, stored):
    home = stored[0].root
    missing = tmp_path / "missing.py"
    assert_one_line(cli(home, "sandbox", "-f", str(missing)), f"actions file not found: {missing}")
    binary = tmp_path / "binary.py"
    binary.write_bytes(b"print(1)\n\xff\xfe\n")
    assert_one_line(cli(home, "sandbox", "-f", str(binary)), str(binary), "not UTF-8")
    empty = tmp_path / "empty.py"
    empty.write_text("#---\n\n#---\n")
    assert_one_line(cli(home, "sandbox", "-f", str(empty)), f"no actions to run in {empty}")
    assert_one_line(cli(home, "sandbox", "-c", "print(1)", "--set", "sandbox.workers=0"), "sandbox.workers")
    not_an_index = stored[1].id
    assert_one_line(cli(home, "sandbox", "-c", "print(1)", "--index", not_an_index),
                    f"--index {not_an_index}: artifact {not_an_index} is a sft artifact, not an index")
    assert_store_kept(stored)


# ----------------------------------------------------------------------------- deployment parameters

def run_as_deployment(stage: str, cfg: dict, home: Path):
    """Run the ``stage`` flow the way its deployment run does (parameters as JSON, validated by Prefect into
    the typed config); its final state."""
    from flows.pipeline import stage_flow

    return stage_flow.with_options(name=stage)(stage=stage, cfg=cfg, home=str(home), return_state=True)


def test_deployment_parameters_that_are_bad_fail_before_any_task(tmp_path, stored, prefect_harness):

    home = stored[0].root
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(CORPUS)
    state = run_as_deployment("index", {"index": {"corpus": {"source": str(corpus)}, "chunk": 5}}, home)
    assert state.is_failed() and "cfg.index.chunk: Extra inputs are not permitted" in state.message

    bad_corpus = tmp_path / "bad-corpus.jsonl"
    bad_corpus.write_text(CORPUS + "not json\n")
    state = run_as_deployment("index", {"index": {"corpus": {"source": str(bad_corpus)}}}, home)
    assert state.is_failed() and f"CorpusError: {bad_corpus}:5: malformed JSON" in state.message

    dataset = tmp_path / "questions.jsonl"
    dataset.write_text('{"id": "q1", "question": "What is 1 + 1?", "answer": "2"}\n{"id": "q2"\n')
    cfg = {"index": {"corpus": {"source": str(corpus)}}, "teacher": {"kind": "scripted", "model": "scripted"},
           "rollout": {"datasets": [{"name": "bad", "source": str(dataset), "kind": "math"}]}}
    state = run_as_deployment("rollout", cfg, home)
    assert state.is_failed() and f"DatasetError: {dataset}:2: not valid JSON" in state.message

    folder = adapter_folder(tmp_path, '{"r": 8}', None)
    cfg = {"index": {"corpus": {"source": str(corpus)}}, "student": {"adapter": str(folder)},
           "evaluate": {"methods": [{"name": "agent", "model": "student", "mode": "agent"}]}}
    state = run_as_deployment("evaluate", cfg, home)
    assert state.is_failed() and f"{folder / 'adapter_config.json'}: not a PEFT adapter" in state.message
    # Each failed before its first task: no index (the first task of all three) was started.
    assert_store_kept(stored)
