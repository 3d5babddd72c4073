"""Bad input at the stage level, through the real CLI and Prefect: a dataset that is not JSON, an example
without a question, an unreachable teacher endpoint, an index id that does not exist. Each gives one line
naming the culprit (exit 2), and the artifacts already written stay complete and queryable."""

import json
import socket
import subprocess
import sys

import pytest

from storage.catalog import query

CORPUS = "".join(json.dumps({"id": str(i), "title": f"T{i}", "text": f"text {i}"}) + "\n" for i in range(4))


def cli(home, *args):
    return subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(home), *args], check=False,
                          capture_output=True, text=True, timeout=600)


def config(tmp_path, dataset: str, teacher: str = "{kind: scripted, model: scripted}") -> str:
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


@pytest.fixture
def built_index(tmp_path, home):
    """A home that already holds a complete index artifact (what must survive the failures below)."""
    result = cli(home, "index", "--config", config(tmp_path, str(tmp_path / "unused.jsonl")))
    assert result.returncode == 0, result.stderr
    return query(home, "select id from artifacts where stage = 'index'")[1]


def assert_one_line(result, *needles):
    """Exit 2 and an ``error: ...`` line naming the culprit. (Prefect's own run logger also records the
    failed flow run with its traceback, as it does for every failed run; the CLI adds the one line.)"""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def assert_untouched(home, index_ids):
    assert query(home, "select id from artifacts where stage = 'index'")[1] == index_ids
    assert query(home, "select count(*) from passages")[1] == [(4,)]
    assert query(home, "select count(*) from artifacts where stage = 'trajectories'")[1] == [(0,)]


def test_dataset_that_is_not_json_names_file_and_line(tmp_path, home, built_index):
    dataset = tmp_path / "questions.jsonl"
    dataset.write_text('{"id": "q1", "question": "What is 1 + 1?", "answer": "2"}\nthis is not json\n')
    result = cli(home, "rollout", "--config", config(tmp_path, str(dataset)))
    assert_one_line(result, f"{dataset}:2:", "not valid JSON")
    assert_untouched(home, built_index)


def test_example_without_question_is_named(tmp_path, home, built_index):
    dataset = tmp_path / "questions.json"
    dataset.write_text(json.dumps({"metadata": {}, "examples": [
        {"id": "q1", "question": "What is 1 + 1?", "answer": "2"}, {"id": "q2", "answer": "3"}]}))
    result = cli(home, "rollout", "--config", config(tmp_path, str(dataset)))
    assert_one_line(result, str(dataset), "q2", "question")
    assert_untouched(home, built_index)


def test_unreachable_teacher_endpoint_is_named(tmp_path, home, built_index):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dataset = tmp_path / "questions.jsonl"
    dataset.write_text('{"id": "q1", "question": "What is 1 + 1?", "answer": "2"}\n')
    teacher = (f"{{kind: openai, model: teacher, base_url: 'http://127.0.0.1:{port}/v1', "
               "max_retries: 1, timeout_s: 5}")
    result = cli(home, "rollout", "--config", config(tmp_path, str(dataset), teacher))
    assert_one_line(result, f"127.0.0.1:{port}")
    assert_untouched(home, built_index)


@pytest.mark.parametrize("command", [["sandbox", "-c", "print(1)", "--index"],
                                     ["retriever", "serve", "--index"]])
def test_index_id_that_does_not_exist_is_named(home, built_index, command):
    result = cli(home, *command, "0123456789abcdef")
    assert_one_line(result, "0123456789abcdef")
    assert query(home, "select id from artifacts where stage = 'index'")[1] == built_index
