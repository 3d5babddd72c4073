"""How far one OPD update moved the student towards the teacher on the episodes it learned from: the reverse
KL to the teacher on the iteration's own (stored) tokens, before the update (the sampling adapter: the k1
estimate) and after it (the updated adapter, importance-weighted by π_new/π_old, the estimator of
``tests/training/test_opd.py``), in all and per segment. Needs the iteration's adapter, so it runs in the
home that built it, before the adapter is gone:

    python results/cpu-study/opd_kl_after.py --home $DISTILLERY_HOME --artifact ID --out results/cpu-study

Writes ``opd_kl_after.csv`` (one row per segment and one for all tokens).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--artifact", required=True, help="the opd artifact's id")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--base-model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--max-length", type=int, default=4096)
    args = parser.parse_args()

    import torch

    from tasks.opd import stored_examples
    from training.opd import load_student, token_logprobs

    path = args.home / "opd" / args.artifact
    manifest = json.loads((path / "manifest.json").read_text())
    started = time.perf_counter()
    model, tokenizer = load_student(args.base_model, path / "adapter", torch.device("cpu"))
    examples = stored_examples(SimpleNamespace(path=path), tokenizer, args.max_length)
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0, 0.0])  # before, after, tokens, ratio
    with torch.no_grad():
        for example in examples:
            new = token_logprobs(model, example, torch.device("cpu"), precision="float32").tolist()
            for segment, lp, old, teacher in zip(example.segments, new, example.old, example.teacher):
                ratio = math.exp(lp - old)
                for key in (segment, "all"):
                    sums[key][0] += old - teacher
                    sums[key][1] += ratio * (lp - teacher)
                    sums[key][2] += 1
                    sums[key][3] += ratio
    rows = [{"artifact": args.artifact, "iteration": manifest.get("metrics", {}).get("iteration"), "segment": key,
             "tokens": n, "kl_before": before / n, "kl_after": after / n,
             "change": (after - before) / abs(before) if before else None, "mean_ratio": ratio / n}
            for key, (before, after, n, ratio) in sorted(sums.items())]
    with (args.out / "opd_kl_after.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(row)
    print(f"{len(examples)} episodes in {time.perf_counter() - started:.0f} s -> {args.out / 'opd_kl_after.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
