"""The OpenAI-compatible backend: retries, errors and request shape against a small loopback stand-in
server. The real llama.cpp server (the ``llamacpp`` backend) is tested in ``test_llamacpp.py``."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent_runtime.backends import BackendConfig, make_generator, openai_backend
from agent_runtime.generation import GenerationError, Request, Sampling, sample_seed
from services.processes import free_port

MODEL = "smollm2-135m-instruct"


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
    with pytest.raises(GenerationError) as caught:
        generator.generate([chat("hello")], Sampling(n=2))
    generator.close()
    message = str(caught.value)
    # A refused connection fails at once (ConnectError, not a ConnectTimeout after the 5 s timeout per try);
    # the time is not asserted, since it depends on the machine's load.
    assert (
        f"{url}/chat/completions" in message and "after 3 attempt(s)" in message and "ConnectError" in message
    )
