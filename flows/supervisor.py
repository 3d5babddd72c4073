"""How a stage command runs in a terminal: it stops within seconds and leaves no process behind.

``run_stage(work)`` runs the stage in a worker thread and keeps the main thread for signals.
- SIGTERM or Ctrl+C ends the process at once (exit 143 or 130). Prefect's own handler would instead
  wait for the running task to return (a shard of a model's generation can take minutes); nothing is
  lost by not waiting, since every finished part or shard is already on disk under its final name and a
  re-run resumes from them. (Prefect installs its SIGTERM handler only in the main thread, so in the
  worker thread it leaves ours alone.)
- A reaper process outlives the stage: it waits for the stage's process to end, however it ends (even
  SIGKILL), then stops every process that still carries the stage's token in its environment: Prefect's
  temporary API server (uvicorn), evaluation shard processes, a local Dask cluster. (Sandbox workers get
  a clean environment; they die with their parent through PR_SET_PDEATHSIG.) Then it removes the run's
  scratch folder (``common.scratch``: llama.cpp's slot files and log, sandbox folders), which a killed
  stage could not remove itself.
- Unless ``--debug``, Prefect's console handler prints log records without their tracebacks (the API
  handler still sends them to the Prefect logs); the CLI prints the error itself in one line.

``python -m flows.supervisor TOKEN`` is the reaper.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable

from common.scratch import sweep
from services.processes import marked, start, stop_all

TOKEN_VARIABLE = "DISTILLERY_STAGE_TOKEN"
POLL_S = 0.2
REAPER_GRACE_S = 3.0

_reaper_pipe: int | None = None  # write end; the reaper sees EOF when this process is gone


def run_stage(work: Callable[[], int], quiet_tracebacks: bool = True) -> int:
    """``work()`` in a worker thread; returns its result or raises its exception in the calling thread."""
    start_reaper()
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            outcome["error"] = exc

    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    # A daemon thread: a stage that is still running never keeps the process from exiting.
    thread = threading.Thread(target=target, name="stage", daemon=True)
    thread.start()
    quieted = not quiet_tracebacks
    try:
        while thread.is_alive():
            thread.join(POLL_S)  # wakes up regularly, so a signal is handled within POLL_S
            # Prefect configures logging when it is first imported, inside the stage.
            quieted = quieted or _quiet_prefect_console()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _stop(signum: int, frame) -> None:
    name = "Ctrl+C" if signum == signal.SIGINT else signal.Signals(signum).name
    sys.stdout.flush()
    sys.stderr.write(f"\nstopped by {name}: finished parts are kept; the same command resumes from them\n")
    sys.stderr.flush()
    os._exit(128 + signum)  # no waiting for the stage thread; the reaper stops the child processes


# ----------------------------------------------------------------------------- reaper

def start_reaper() -> None:
    """Mark this process's future children with a token and start the process that reaps them."""
    global _reaper_pipe
    if _reaper_pipe is not None:
        return
    token = uuid.uuid4().hex
    read_end, _reaper_pipe = os.pipe()  # not inherited by other children: their exit cannot hide ours
    env = {key: value for key, value in os.environ.items() if key != TOKEN_VARIABLE}
    # Its own session: a Ctrl+C in the terminal or a kill of our process group does not reach it.
    start([sys.executable, "-m", "flows.supervisor", token], name="the stage's reaper", env=env, stdin=read_end,
          stdout=subprocess.DEVNULL, new_session=True)
    os.close(read_end)
    os.environ[TOKEN_VARIABLE] = token


def reap(token: str) -> int:
    """Block until the stage process is gone, then SIGTERM (and after a grace period SIGKILL) the rest and
    remove the scratch folders whose owners are gone (the stage's among them)."""
    sys.stdin.buffer.read()  # EOF: every copy of the write end is closed, so the stage process ended
    stop_all(marked(TOKEN_VARIABLE, token), REAPER_GRACE_S)
    sweep()  # after the children: none of them writes there any more
    return 0


# ----------------------------------------------------------------------------- console

class _WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, minus its traceback."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        plain = logging.makeLogRecord(record.__dict__)  # other handlers still see the traceback
        plain.exc_info = plain.exc_text = plain.stack_info = None
        return self.inner.format(plain)


def _quiet_prefect_console() -> bool:
    """Strip tracebacks from Prefect's console handlers once Prefect has set up logging; True when done."""
    # Read without importing: the stage thread may be importing Prefect right now.
    configuration = sys.modules.get("prefect.logging.configuration")
    if configuration is None or not vars(configuration).get("PROCESS_LOGGING_CONFIG"):
        return False
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    for handler in {h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)}:
        if not isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(handler.formatter))
    return True


if __name__ == "__main__":
    sys.exit(reap(sys.argv[1]))
