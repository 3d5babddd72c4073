"""Question sets and their loaders: what the teacher solves and what the students are evaluated on.

``datasets`` loads a set named by a ``DatasetConfig`` (the built-in ones, or a paper-layout JSON, JSONL or
Parquet file) into ``Question`` records and fingerprints it for artifact ids; ``builtin`` generates the
project's own sets (``builtin:arith`` word problems, ``builtin:facts`` questions on the embedded corpus).
"""
