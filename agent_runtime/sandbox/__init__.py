"""The code sandbox: runs the agent's Python actions in confined worker processes.

``Sandbox`` and ``SandboxConfig`` are all the engine needs (usage in ``host.py``).  One module per
job, in the order an action travels:

- ``host``: ``Sandbox`` in the engine's process; starts the workers and talks to them.
- ``protocol``: the frames exchanged between host, worker and action process.
- ``worker``: the worker process, a warm zygote that forks one confined process per action.
- ``isolation``: kernel confinement: namespaces, the chroot jail, uid nobody, rlimits.
- ``action``: what runs inside an action's process: checked code in, observation out.
- ``guard``: the Python-level guard: import allowlist, AST check, restricted builtins.
- ``state``: how an episode's variables travel from one action to the next.

The worker process imports ``worker`` (and through it ``action``, ``guard``, ``isolation``,
``protocol``, ``state``) without running this file (see ``host._BOOTSTRAP``): those six use the
standard library and each other only; ``host`` alone imports pydantic and the rest of the project.
"""

from agent_runtime.sandbox.host import (
    DEFAULT_ALLOWED_IMPORTS,
    EpisodeState,
    Sandbox,
    SandboxConfig,
    run_actions,
    split_actions,
)

__all__ = [
    "DEFAULT_ALLOWED_IMPORTS", "EpisodeState", "Sandbox", "SandboxConfig", "run_actions", "split_actions",
]
