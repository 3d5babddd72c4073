"""The OpenAI-compatible backend: retries, errors and request shape against a small loopback stand-in
server, and for real against llama-cpp-python's server serving the embedded SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from agent_runtime.backends import BackendConfig, make_generator, openai_backend
from agent_runtime.generation import GenerationError, Request, Sampling, sample_seed

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chat(question: str, seed: int | None = None) -> Request:
    return Request([{"role": "user", "content": question}], seed=seed)


# --- a stand-in server on 127.0.0.1 -------------------------------------------------------------------


class StandIn:
    """Answers like a vLLM server; ``failures`` lists status codes to answer first, one per request."""

    def __init__(self):
        self.bodies: list[tuple[str, dict]] = []
        self.failures: list[int] = []
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._reply(200, {"data": [{"id": MODEL, "owned_by": "vllm"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stand_in.lock:
                    stand_in.bodies.append((self.path, body))
                    status = stand_in.failures.pop(0) if stand_in.failures else 200
                if status != 200:
                    self._reply(status, {"error": "try again"})
                    return
                text = f"seed {body['seed']} and more <end_code> tail"
                self._reply(
                    200,
                    {
                        "choices": [
                            {
                                "message": {"content": text.split(" <end_code>")[0]},
                                "finish_reason": "stop",
                                "stop_reason": "<end_code>",
                            }
                        ],
                        "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
                    },
                )

            def _reply(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(openai_backend, "BACKOFF_S", 0.01)
    server = StandIn()
    yield server
    server.close()


def test_one_call_per_sample_with_its_own_seed(stand_in):
    generator = make_generator(BackendConfig(kind="openai", model=MODEL, base_url=stand_in.url))
    requests = [chat("a", seed=1), chat("b", seed=2)]
    sampling = Sampling(n=2, temperature=0.5, max_new_tokens=9, stop=("<end_code>",), seed=3)
    generations = generator.generate(requests, sampling)
    generator.close()
    assert len(stand_in.bodies) == 4
    assert {path for path, _ in stand_in.bodies} == {"/v1/chat/completions"}
    first = stand_in.bodies[0][1]
    assert {k: first[k] for k in ("model", "max_tokens", "temperature", "top_p", "stop", "n")} == {
        "model": MODEL,
        "max_tokens": 9,
        "temperature": 0.5,
        "top_p": 1.0,
        "stop": ["<end_code>"],
        "n": 1,
    }
    for request, generation in zip(requests, generations):
        assert [c.text for c in generation.completions] == [
            f"seed {sample_seed(request, sampling, j)} and more" for j in range(2)
        ]
        for completion in generation.completions:
            assert (completion.prompt_tokens, completion.completion_tokens) == (11, 4)
            assert completion.stop == "<end_code>" and completion.finish_reason == "stop"


def test_server_errors_are_retried_then_succeed(stand_in):
    stand_in.failures = [503, 429]
    generator = make_generator(
        BackendConfig(kind="openai", model=MODEL, base_url=stand_in.url, max_retries=2)
    )
    [generation] = generator.generate([chat("a")], Sampling())
    generator.close()
    assert len(stand_in.bodies) == 3
    assert generation.completions[0].text.startswith("seed ")


def test_retries_are_bounded(stand_in):
    stand_in.failures = [500] * 10
    generator = make_generator(
        BackendConfig(kind="openai", model=MODEL, base_url=stand_in.url, max_retries=3)
    )
    with pytest.raises(GenerationError, match=r"after 4 attempt\(s\): HTTP 500"):
        generator.generate([chat("a")], Sampling())
    generator.close()
    assert len(stand_in.bodies) == 4


def test_a_client_error_is_not_retried(stand_in):
    stand_in.failures = [400]
    generator = make_generator(
        BackendConfig(kind="openai", model=MODEL, base_url=stand_in.url, max_retries=3)
    )
    with pytest.raises(GenerationError, match="refused the request.*HTTP 400"):
        generator.generate([chat("a")], Sampling())
    generator.close()
    assert len(stand_in.bodies) == 1


def test_continue_final_on_vllm_uses_its_chat_extension(stand_in):
    generator = make_generator(BackendConfig(kind="openai", model=MODEL, base_url=stand_in.url))
    request = Request(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Thought: I"}],
        continue_final=True,
    )
    generator.generate([request], Sampling())
    generator.close()
    [(path, body)] = stand_in.bodies
    assert path == "/v1/chat/completions"
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["messages"][-1] == {"role": "assistant", "content": "Thought: I"}


def test_continue_final_without_a_local_tokenizer_is_a_clear_error(stand_in, monkeypatch):
    generator = make_generator(
        BackendConfig(kind="openai", model="someone/served-only", base_url=stand_in.url)
    )
    monkeypatch.setattr(generator, "_continue_mode", "completions")  # as for a server that is not vLLM
    request = Request(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}], continue_final=True
    )
    with pytest.raises(GenerationError, match="cannot continue an assistant message.*no local tokenizer"):
        generator.generate([request], Sampling())
    generator.close()


def test_unreachable_endpoint_fails_quickly_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"  # bound then released: nothing listens there
    generator = make_generator(BackendConfig(kind="openai", base_url=url, max_retries=2, timeout_s=5))
    started = time.perf_counter()
    with pytest.raises(GenerationError) as caught:
        generator.generate([chat("hello")], Sampling(n=2))
    elapsed = time.perf_counter() - started
    generator.close()
    message = str(caught.value)
    assert (
        f"{url}/chat/completions" in message and "after 3 attempt(s)" in message and "ConnectError" in message
    )
    assert elapsed < 10  # backoff 0.5 s + 1 s, not the 5 s timeout per try


# --- the real llama.cpp server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """``python -m llama_cpp.server`` serving the embedded GGUF under the alias MODEL; always stopped."""
    if not HAS_LLAMA_CPP:
        pytest.skip(
            "llama_cpp is not importable: pip install 'llama-cpp-python[server]' (or 'distillery[server]')"
        )
    from storage.models import resolve_model

    src = resolve_model(MODEL)
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(src.path / src.gguf_file),
        "--model_alias",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        "2",
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until_serving(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"llama.cpp server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"llama.cpp server did not answer within {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def llama(llama_server):
    generator = make_generator(BackendConfig(kind="openai", model=MODEL, base_url=llama_server, timeout_s=60))
    yield generator
    generator.close()


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llamacpp_samples_with_seeds_and_counts(llama):
    sampling = Sampling(n=2, temperature=0.9, max_new_tokens=16, seed=4)
    request = chat("Write one sentence about rivers.", seed=10)
    [generation] = llama.generate([request], sampling)
    first, second = generation.completions
    assert first.text and second.text and first.text != second.text
    assert first.prompt_tokens == second.prompt_tokens > 10
    assert all(0 < c.completion_tokens <= 16 for c in generation.completions)
    [again] = llama.generate([request], sampling)
    assert [c.text for c in again.completions] == [first.text, second.text]  # seeds are honoured


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llamacpp_stop_strings_are_cut(llama):
    sampling = Sampling(max_new_tokens=40, stop=("e", "a"))
    [generation] = llama.generate([chat("Describe the weather in three sentences.")], sampling)
    [completion] = generation.completions
    assert completion.finish_reason == "stop"
    assert "e" not in completion.text and "a" not in completion.text
    assert completion.completion_tokens < 10


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llamacpp_continue_final_goes_through_completions(llama):
    prefix = "The capital of France is"
    request = Request(
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": prefix},
        ],
        continue_final=True,
    )
    [generation] = llama.generate([request], Sampling(max_new_tokens=8))
    [completion] = generation.completions
    assert llama._continue_mode == "completions"  # llama-cpp-python's chat API cannot continue a turn
    assert "Paris" in completion.text and prefix not in completion.text
    rendered = llama._tokenizer.apply_chat_template(
        request.messages, tokenize=False, continue_final_message=True
    )
    assert completion.prompt_tokens == len(llama._tokenizer(rendered, add_special_tokens=False).input_ids)
