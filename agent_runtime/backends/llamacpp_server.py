"""A llama.cpp server (xllamacpp's embedded one) in a child process: one GGUF, N parallel slots, optional LoRA.

Run by ``LlamaCppGenerator``; it can also be run by hand::

    python -m agent_runtime.backends.llamacpp_server --model M.gguf --port 8080 --slots 4 --ctx-per-slot 4096

It prints one line ``READY http://127.0.0.1:PORT`` on stdout once the model is loaded and the HTTP API
(OpenAI-compatible ``/v1/chat/completions``, ``/v1/completions``, ``/health``, ``/slots``) answers, then
serves until SIGTERM/SIGINT, or until its parent dies (``services.processes.die_with_parent``), so a
stage killed with ``kill -9`` leaves no server behind.

Prompt cache: every slot keeps its own KV cache between requests (``cache_prompt``), and llama.cpp's
host-memory prompt cache (``cache_ram_mib``) saves a slot's prompt state when the slot moves on and
restores it when a later request continues that conversation. It does not fill an empty slot, so on its
own a batch's shared system prompt would be processed once in every slot (measured: 4 slots, 4 x 48 s of
a 2-core AVX2 CPU for the 1.5B teacher's 1,040-token prompt). With ``--slot-save-path`` the client
(``LlamaCppGenerator``) processes it once in slot 0, saves that slot and restores it into the others.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from services.processes import die_with_parent


def build_params(args: argparse.Namespace):
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = args.model
    params.model_alias = args.alias
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.slots
    params.n_ctx = args.ctx_per_slot * args.slots  # the context is split evenly between the slots
    params.cont_batching = True
    params.cache_prompt = True
    params.cache_ram_mib = args.cache_ram_mib
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.cpuparams.poll = params.cpuparams_batch.poll = args.poll
    params.n_batch = 2048
    params.n_ubatch = 512
    params.warmup = False
    params.endpoint_slots = True
    if args.slot_save_path:
        # /slots/N?action=save|restore. The server joins this and the file name by plain concatenation
        # (llama.cpp's own argument parser adds the "/", which setting params directly skips): without
        # it, slot files landed beside the folder, in $TMPDIR, and outlived every run.
        params.slot_save_path = args.slot_save_path.rstrip("/") + "/"
    params.endpoint_metrics = True  # /metrics: prompt tokens processed vs cached (bench/teacher_engine.py)
    params.verbosity = 0 if args.quiet else 3
    if args.lora:
        params.lora_adapters = [xlc.CommonAdapterLoraInfo(args.lora, 1.0)]
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="GGUF file")
    parser.add_argument("--alias", default="model", help="model name the API reports")
    parser.add_argument("--lora", help="GGUF LoRA adapter applied at scale 1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slots", type=int, default=4, help="parallel sequences (continuous batching)")
    parser.add_argument("--ctx-per-slot", type=int, default=4096, help="context tokens of each slot")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for prompt processing and decoding")
    parser.add_argument("--poll", type=int, default=50,
                        help="how long idle threads spin before they sleep, 0-100 (llama.cpp's --poll; 50 is its default)")
    parser.add_argument("--slot-save-path", help="folder for slot KV files (/slots/N?action=save|restore)")
    parser.add_argument("--cache-ram-mib", type=int, default=2048, help="host-memory prompt cache, MiB (0: off)")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors from llama.cpp")
    args = parser.parse_args(argv)

    die_with_parent(signal.SIGTERM)  # SIGTERM: the handler below frees the model
    import xllamacpp as xlc

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = xlc.Server(build_params(args))
    print(f"READY {server.listening_address}", flush=True)
    while not stop.wait(0.5):
        pass
    del server  # stops the HTTP threads and frees the model
    return 0


if __name__ == "__main__":
    sys.exit(main())
