"""How close is the llama.cpp wheel (xllamacpp) to llama.cpp built for this CPU? Prints ratios from one run.

Issue 28's AVX2 target: prefill and decode of the GGUF teacher through the project's llama.cpp engine within
0.9 of ``llama-bench`` built natively (``GGML_NATIVE``) on the same machine, measured in the same run.

- **native**: ``llama-bench`` compiled from the llama.cpp source that the llama-cpp-python sdist on PyPI
  carries (``pip download --no-binary``; no other network). The build (about 15 min on two cores) is cached
  under ``~/.cache/distillery/llama-bench/<sdist version>-<cpu flags>/`` and is never part of setup.
  ``llama-bench -p P -n N -t T -r R``: prompt processing of P random tokens, generation of N tokens.
- **wheel**: the same GGUF served by ``agent_runtime.backends.llamacpp_backend`` (xllamacpp's server, one
  slot, the project's thread count), asked through llama.cpp's native ``/completion`` endpoint for N tokens
  after a prompt of P random token ids (no prompt cache, EOS ignored); its ``timings`` give prefill and
  decode tokens/s as llama.cpp counts them.
- **roof**: one decode stream reads every weight once per token, so memory bandwidth (numpy copy) / GGUF
  size bounds decode tokens/s.

    python bench/llama_roof.py --model qwen2.5-coder-1.5b-instruct -p 512 -n 64 -r 3

Needs an idle machine (llama.cpp's threads wait for each other on a shared core). Writes
``bench/out/llama_roof.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.teacher_engine import cpu_description, memory_bandwidth_gbs
from common.files import cache_dir

TARGET = 0.9
SDIST = "llama-cpp-python==0.3.36"


def cpu_flags_key() -> str:
    """A short key of this CPU's instruction-set flags: a native build is only valid on the same flags."""
    flags = next((line.split(":", 1)[1] for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), "")
    return hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]


def build_llama_bench(sdist: str = SDIST, jobs: int = 2) -> Path:
    """``llama-bench`` built with ``GGML_NATIVE=ON`` from the sdist's vendored llama.cpp; cached."""
    version = sdist.split("==")[-1]
    root = cache_dir() / "llama-bench" / f"{version}-{cpu_flags_key()}"
    binary = root / "build" / "bin" / "llama-bench"
    if binary.exists():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    download = root / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    "-d", str(download), sdist], check=True)
    archive = next(download.glob("*.tar.gz"))
    source = root / "src"
    if source.exists():
        shutil.rmtree(source)
    with tarfile.open(archive) as tar:
        prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for member in members:
            member.name = member.name[len(prefix):]
        tar.extractall(source, members=[m for m in members if m.name], filter="data")
    build = root / "build"
    start = time.perf_counter()
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(jobs)], check=True,
                   stdout=subprocess.DEVNULL)
    (root / "build-seconds").write_text(f"{time.perf_counter() - start:.0f}\n")
    return binary


def native_figures(binary: Path, gguf: Path, prompt: int, generate: int, repeats: int, threads: int) -> dict:
    """llama-bench's prefill and decode tokens/s (mean and stddev over the repeats)."""
    out = subprocess.run([str(binary), "-m", str(gguf), "-p", str(prompt), "-n", str(generate),
                          "-t", str(threads), "-r", str(repeats), "-o", "json"],
                         check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == generate and r["n_prompt"] == 0)
    return {"prefill_tokens_per_s": pp["avg_ts"], "prefill_stddev": pp["stddev_ts"],
            "decode_tokens_per_s": tg["avg_ts"], "decode_stddev": tg["stddev_ts"],
            "build_commit": pp.get("build_commit"), "cpu_info": pp.get("cpu_info"),
            "backends": pp.get("backends"), "flash_attn": pp.get("flash_attn"), "n_batch": pp.get("n_batch"),
            "n_ubatch": pp.get("n_ubatch"), "threads": pp.get("n_threads")}


def wheel_figures(model: str, prompt: int, generate: int, repeats: int, threads: int) -> dict:
    """The project's llama.cpp engine: prefill and decode tokens/s from the server's own timings."""
    from agent_runtime.backends import BackendConfig, make_generator

    generator = make_generator(BackendConfig(kind="llamacpp", model=model, slots=1, threads=threads,
                                             ctx_per_slot=prompt + generate + 64))
    rng = random.Random(0)
    prefill, decode = [], []
    try:
        for attempt in range(repeats + 1):  # the first request warms up and is not counted, as in llama-bench
            tokens = [rng.randrange(1000, 30000) for _ in range(prompt)]
            reply = generator.api.post("/completion", {"prompt": tokens, "n_predict": generate,
                                                       "ignore_eos": True, "cache_prompt": False,
                                                       "temperature": 0.0})
            timings = reply["timings"]
            if timings["predicted_n"] != generate or timings["prompt_n"] != prompt:
                raise RuntimeError(f"the server processed {timings['prompt_n']} prompt tokens and generated "
                                   f"{timings['predicted_n']}, asked {prompt} and {generate}")
            if attempt:
                prefill.append(timings["prompt_per_second"])
                decode.append(timings["predicted_per_second"])
    finally:
        generator.close()
    return {"prefill_tokens_per_s": statistics.mean(prefill), "prefill_runs": prefill,
            "decode_tokens_per_s": statistics.mean(decode), "decode_runs": decode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("-p", "--prompt", type=int, default=512)
    parser.add_argument("-n", "--generate", type=int, default=64)
    parser.add_argument("-r", "--repeats", type=int, default=3)
    parser.add_argument("-t", "--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--sdist", default=SDIST)
    parser.add_argument("--out", type=Path, default=Path("bench/out/llama_roof.json"))
    args = parser.parse_args(argv)

    from agent_runtime.backends.llamacpp_backend import gguf_path
    from models.split_gguf import SPLIT_GGUFS

    gguf = gguf_path(args.model)
    machine = {**cpu_description(), "memory_bandwidth_gbs": memory_bandwidth_gbs()}
    print(json.dumps(machine), flush=True)
    started = time.perf_counter()
    binary = build_llama_bench(args.sdist)
    build_s = time.perf_counter() - started
    print(f"llama-bench: {binary} ({build_s:.0f} s to build or find)", flush=True)
    import xllamacpp

    wheel = wheel_figures(args.model, args.prompt, args.generate, args.repeats, args.threads)
    wheel["package"] = f"xllamacpp {getattr(xllamacpp, '__version__', '?')}"
    native = native_figures(binary, gguf, args.prompt, args.generate, args.repeats, args.threads)
    native["package"] = f"{args.sdist} sdist, vendored llama.cpp, GGML_NATIVE=ON"
    size_gb = (SPLIT_GGUFS[args.model].size if args.model in SPLIT_GGUFS else gguf.stat().st_size) / 1e9
    roof = machine["memory_bandwidth_gbs"] / size_gb
    ratios = {"prefill": wheel["prefill_tokens_per_s"] / native["prefill_tokens_per_s"],
              "decode": wheel["decode_tokens_per_s"] / native["decode_tokens_per_s"],
              "native_decode_of_roof": native["decode_tokens_per_s"] / roof,
              "wheel_decode_of_roof": wheel["decode_tokens_per_s"] / roof}
    for name, figures in (("wheel", wheel), ("native", native)):
        print(f"{name:<7} prefill {figures['prefill_tokens_per_s']:7.1f} tokens/s   decode "
              f"{figures['decode_tokens_per_s']:6.2f} tokens/s   ({figures['package']})")
    print(f"decode roof: {machine['memory_bandwidth_gbs']:.1f} GB/s / {size_gb:.2f} GB = {roof:.1f} tokens/s")
    for phase in ("prefill", "decode"):
        print(f"wheel / native {phase}: {ratios[phase]:.2f} (target >= {TARGET}: "
              f"{'ok' if ratios[phase] >= TARGET else 'BELOW TARGET'})")
    print(f"decode of the roof: native {ratios['native_decode_of_roof']:.2f}, "
          f"wheel {ratios['wheel_decode_of_roof']:.2f}")
    result = {"machine": machine, "model": args.model, "gguf_bytes": int(size_gb * 1e9),
              "prompt_tokens": args.prompt, "generated_tokens": args.generate, "repeats": args.repeats,
              "threads": args.threads, "wheel": wheel, "native": native, "roof_decode_tokens_per_s": roof,
              "ratios": ratios, "llama_bench_build_s": _build_seconds(binary)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")
    return 0


def _build_seconds(binary: Path) -> float | None:
    record = binary.parents[2] / "build-seconds"
    return float(record.read_text()) if record.exists() else None


if __name__ == "__main__":
    raise SystemExit(main())
