"""The processes distillery starts and the HTTP services it calls, below every other package.

- ``services.processes``: a free port, a child with the project's environment that dies with its
  parent, waiting until it is ready, its log's last lines, stopping it with everything below it.
- ``services.client``: JSON over HTTP to one service (an OpenAI-compatible server, the retriever)
  under one retry policy.

Imports nothing from the project but ``common.errors``, so every layer can use it.
"""
