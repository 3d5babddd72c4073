"""The evaluation shard worker: its process (``python -m tasks.shard_worker JOB.json``) has no Prefect run to
report to, so importing the worker must not import Prefect."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_shard_worker_imports_no_prefect():
    code = ("import sys, tasks.shard_worker\n"
            "print(sorted(name for name in sys.modules if name.split('.')[0] == 'prefect'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
