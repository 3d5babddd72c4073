"""What runs inside the process of one action: state in, code run, observation and state out.

The process is already confined (``isolation.confine_action_process``) when ``run_action`` starts.
Prints go to a bounded buffer that becomes the observation; ``final_answer`` and ``web_search``
are provided as builtins; any exception becomes an "Error: ..." observation naming the line, in
the style of smolagents, with the error kind the engine needs.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import NoReturn

from agent_runtime.sandbox.guard import (
    ACTION_FILENAME,
    ForbiddenCode,
    ForbiddenError,
    ImportPolicy,
    check_code,
    make_builtins,
)
from agent_runtime.sandbox.protocol import Channel
from agent_runtime.sandbox.state import restore_state, save_state, step_bindings

MAX_QUERY_CHARS = 4000


class _Discard:
    """A text stream that drops everything (library chatter, prints while restoring state)."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class BoundedWriter(_Discard):
    """``sys.stdout`` of an action: keeps the first ``limit`` characters, counts the rest."""

    def __init__(self, limit: int):
        self.limit = limit
        self.total = 0
        self._parts: list[str] = []
        self._kept = 0

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.total += len(text)
        room = self.limit - self._kept
        if room > 0:
            piece = text[:room]
            self._parts.append(piece)
            self._kept += len(piece)
        return len(text)

    def text(self) -> str:
        """What the action printed, with a note when it was cut."""
        body = "".join(self._parts)
        if self.total > self.limit:
            body += (f"\n[output truncated: the action printed {self.total} characters, "
                     f"only the first {self.limit} are shown]\n")
        return body


class FinalAnswerSignal(BaseException):
    """Raised by ``final_answer`` to stop the action (BaseException: ``except Exception`` misses it)."""


@dataclass
class _Outcome:
    final_answer: str | None = None


def _make_tools(outcome: _Outcome, channel: Channel, has_search: bool) -> dict[str, object]:
    """The functions the agent's code may call besides the builtins."""

    def final_answer(answer: object) -> NoReturn:
        """End the episode with ``answer``."""
        outcome.final_answer = str(answer)
        raise FinalAnswerSignal()

    def web_search(query: str) -> str:
        """Search the retrieval corpus; returns the retriever's text."""
        if not has_search:
            raise RuntimeError("web_search is not available: this sandbox was started without a search tool")
        if not isinstance(query, str):
            raise TypeError(f"web_search(query) expects a str, got {type(query).__name__}")
        if len(query) > MAX_QUERY_CHARS:
            raise ValueError(f"web_search query too long ({len(query)} > {MAX_QUERY_CHARS} characters)")
        reply = channel.request({"op": "search", "query": query})
        if reply["op"] != "search_result":
            raise RuntimeError(f"web_search failed: {reply.get('error')}")
        return reply["result"]

    return {"final_answer": final_answer, "web_search": web_search}


def _describe_error(exc: BaseException, code: str, cfg: dict, static: bool) -> tuple[str, str]:
    """(error kind, message naming the failing line of the action), e.g. ("execution",
    "ZeroDivisionError: division by zero (line 3: y = x / 0)"); the observation prefixes "Error: ".

    ``static``: raised by the check before running (its line is the exception's), not while running
    (the line is the innermost traceback frame in the action's code).
    """
    lineno = None
    if static:
        lineno = exc.lineno
    else:
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == ACTION_FILENAME:
                lineno = tb.tb_lineno
            tb = tb.tb_next
    if isinstance(exc, (ForbiddenCode, ForbiddenError)):
        kind, text = "forbidden", f"Forbidden: {exc}"
    elif isinstance(exc, MemoryError):
        kind, text = "memory", f"MemoryError: the action exceeded the memory limit of {cfg['memory_mb']} MB"
    elif isinstance(exc, SyntaxError):
        kind, text = "execution", f"SyntaxError: {exc.msg}"
    else:
        try:
            detail = str(exc)
        except Exception:  # noqa: BLE001 - a user exception whose __str__ fails
            detail = "<unprintable exception>"
        kind, text = "execution", f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    lines = code.splitlines()
    if lineno is not None and 0 < lineno <= len(lines):
        text += f" (line {lineno}: {lines[lineno - 1].strip()[:200]})"
    return kind, text[: max(cfg["max_output_chars"], 200)]


def _seed_random_generators() -> None:
    """Every action starts from the same RNG state: runs are reproducible whichever worker runs them."""
    if "random" in sys.modules:
        sys.modules["random"].seed(0)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(0)


def _join(*parts: str) -> str:
    text = ""
    for part in filter(None, parts):
        text += part if not text or text.endswith("\n") else "\n" + part
    return text


def run_action(code: str, blob: bytes, cfg: dict, policy: ImportPolicy, channel: Channel,
               work_dir: str) -> tuple[dict, bytes]:
    """Restore the state, check and run ``code``, save the state; return the result frame.

    Runs in the (already confined) action process.  On failure the state is not saved: the host
    keeps the input state.
    """
    outcome = _Outcome()
    main = types.ModuleType("__main__")  # functions defined by the code pickle as __main__.<name>
    namespace = main.__dict__
    tools = _make_tools(outcome, channel, cfg["has_search"])
    namespace["__builtins__"] = make_builtins(policy, work_dir, tools)
    sys.modules["__main__"] = main
    sys.stdout = sys.stderr = _Discard()
    carried, notes = restore_state(blob, namespace, policy)
    _seed_random_generators()
    out = sys.stdout = BoundedWriter(cfg["max_output_chars"])
    tree, error = None, None
    try:
        tree = check_code(code, policy)
    except (ForbiddenCode, SyntaxError) as exc:
        error = _describe_error(exc, code, cfg, static=True)
    else:
        try:
            exec(compile(tree, ACTION_FILENAME, "exec"), namespace)  # noqa: S102
        except FinalAnswerSignal:
            pass
        except BaseException as exc:  # noqa: BLE001 - everything the code raises becomes an observation
            error = _describe_error(exc, code, cfg, static=False)
    sys.stdout = _Discard()
    result = {"op": "result", "error_kind": "none", "error": None, "state_changed": False, "variables": [],
              "is_final": outcome.final_answer is not None, "final_answer": outcome.final_answer}
    if error is not None and outcome.final_answer is None:
        kind, message = error
        note_text = "".join(f"[Note: {n}]\n" for n in notes)
        observation = _join(out.text(), "Error: " + message, note_text)
        result.update(observation=observation, error_kind=kind, error=message)
        return result, b""
    new_blob, names, save_notes = save_state(namespace, step_bindings(tree), carried, policy)
    note_text = "".join(f"[Note: {n}]\n" for n in [*notes, *save_notes])
    result.update(observation=_join(out.text(), note_text), state_changed=True, variables=names)
    return result, new_blob
