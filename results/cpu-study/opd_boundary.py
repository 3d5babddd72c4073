"""Where the teacher's per-token judgement of an OPD iteration's tokens comes from: a check on stored tokens.

Re-scores a sample of the student's assistant turns of an ``opd`` artifact (its ``opd_episodes`` and
``opd_tokens.parquet``; the adapter is not needed) with the teacher on transformers, with the teacher's own
system prompt in place of the student's, and compares with the stage's stored scores of the same tokens in
the student's context (``--rescore-student`` scores that context again too, to check the stored values). Per
token class (the ``<end_code>`` stop marker that ends an action, the closing code fence, the rest of the
thought, code and final turns) it prints the mean advantage log π_T − log π_old under each context, and at
the last token of actions ended by the stop marker the teacher's most likely tokens instead. Run from an
extracted record:

    python results/cpu-study/opd_boundary.py --artifact /tmp/opd5/a76955546cd10b0a --turns 24

Writes ``opd_boundary.csv`` beside this script (one row per token class and context).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def token_classes(tokenizer, text: str, ids: list[int], stored: list[str]) -> list[str]:
    """A class per token: its segment as the opd stage labels it (``training.opd.token_segments``: ``stop`` for
    the action's trailing <end_code>), with the closing ``` just before the marker as ``fence``."""
    from training.opd import token_segments

    classes = token_segments(tokenizer, text, ids, is_final=set(stored) == {"final"})
    marker = classes.index("stop") if "stop" in classes else 0
    if marker and tokenizer.decode([ids[marker - 1]]).strip().startswith("```"):
        classes[marker - 1] = "fence"
    return classes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, required=True, help="an extracted opd artifact folder")
    parser.add_argument("--turns", type=int, default=48)
    parser.add_argument("--teacher", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "opd_boundary.csv")
    parser.add_argument("--rescore-student", action="store_true",
                        help="score the student's context again (else its rows are the stage's stored teacher "
                             "log-probs, which were scored in that context)")
    args = parser.parse_args()

    import duckdb
    import torch

    from agent_runtime.backends import BackendConfig, make_generator
    from agent_runtime.generation import Request
    from agent_runtime.prompts import system_prompt
    from tasks.opd import turn_requests

    con = duckdb.connect()
    episodes = con.sql(f"select dataset, question_id, sample_index, messages_json "
                       f"from '{args.artifact}/opd_episodes/*.parquet'").fetchall()
    tokens = defaultdict(list)
    for row in con.sql(f"select dataset, question_id, sample_index, step, token_id, segment, student_logprob, "
                       f"teacher_logprob from '{args.artifact}/opd_tokens.parquet' order by position").fetchall():
        tokens[row[:4]].append(row[4:])
    turns = []
    for dataset, qid, sample, messages in episodes:
        for step, (request, text) in enumerate(turn_requests(json.loads(messages)), start=1):
            if (dataset, qid, sample, step) in tokens:
                turns.append(((dataset, qid, sample, step), request, text))
    random.Random(args.seed).shuffle(turns)
    turns = turns[: args.turns]
    print(f"{len(turns)} turns of {len(tokens)} scored", flush=True)

    generator = make_generator(BackendConfig(kind="transformers", model=args.teacher, dtype=args.dtype,
                                             batch_size=4))
    tokenizer = generator.tokenizer
    teacher_system = {"role": "system", "content": system_prompt("teacher")}
    contexts = {"teacher_prompt": [Request([teacher_system, *r.messages[1:]]) for _, r, _ in turns]}
    if args.rescore_student:
        contexts["student_prompt"] = [r for _, r, _ in turns]
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])

    def add(context: str, stored: list, logprobs: list[float], classes: list[str]) -> None:
        for (_, _, old, _), lp, cls in zip(stored, logprobs, classes, strict=True):
            for name in (cls, "all"):
                entry = sums[(context, name)]
                entry[0] += 1
                entry[1] += lp - old
                entry[2] += lp

    drift = None
    for context, requests in contexts.items():
        started = time.perf_counter()
        scored = generator.score(requests, [text for _, _, text in turns])
        for (key, _, text), result in zip(turns, scored):
            stored = tokens[key]
            if [s[0] for s in stored] != result.token_ids:
                print(f"warning: {key}: tokens differ from the stored ones; skipped", file=sys.stderr)
                continue
            classes = token_classes(tokenizer, text, result.token_ids, [s[1] for s in stored])
            add(context, stored, result.logprobs, classes)
            if context == "student_prompt":
                drift = max(drift or 0.0, *(abs(lp - s[3]) for lp, s in zip(result.logprobs, stored)))
            else:  # the stage's own scores of these turns, in the student's context
                add("student_prompt_stored", stored, [s[3] for s in stored], classes)
        print(f"{context}: scored in {time.perf_counter() - started:.0f} s", flush=True)
    if drift is not None:
        print(f"largest difference from the stored teacher log-probs (student prompt): {drift:.3f}")

    # The teacher's top tokens at the last token of stopped actions, in the student's context.
    stopped = [(r, t) for _, r, t in turns if t.endswith("<end_code>")][:8]
    alternatives = defaultdict(float)
    from agent_runtime.backends.transformers_backend import score_ids

    with torch.inference_mode():
        for request, text in stopped:
            prompt, ids = score_ids(tokenizer, 0, request, text)
            logits = generator.model(input_ids=torch.tensor([prompt + ids[:-1]])).logits[0, -1].float()
            top = logits.log_softmax(-1).topk(3)
            for lp, tid in zip(top.values.tolist(), top.indices.tolist()):
                alternatives[tokenizer.decode([tid])] += lp / len(stopped)
    print("teacher's top tokens at the last token of '<end_code>' (mean log-prob over "
          f"{len(stopped)} actions): " + ", ".join(f"{t!r} {lp:.2f}" for t, lp in
                                                   sorted(alternatives.items(), key=lambda kv: -kv[1])[:5]))

    rows = [{"context": c, "tokens": n, "class": cls, "mean_advantage": round(a / n, 4),
             "mean_teacher_logprob": round(t / n, 4)} for (c, cls), (n, a, t) in sorted(sums.items())]
    for row in rows:
        print(f"{row['context']:<15} {row['class']:<8} {row['tokens']:>6}  advantage {row['mean_advantage']:+.3f}  "
              f"teacher {row['mean_teacher_logprob']:+.3f}")
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
