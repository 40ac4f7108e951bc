"""Batch-1 decode speed of the embedded SmolLM2-135M-Instruct (GGUF Q4_1), side by side:

  llama.cpp      llama-cpp-python on the same GGUF (n_threads=2, n_ctx=512)
  k2serve engine what `serve` runs: EngineCore (paged KV, scheduler, sampler) over the
                 serving quantization, one greedy sequence, timed per engine step
  k2serve int4   load_model(..., quantized=True): int4 linears, int8 LM head (+ exact top 16)
  k2serve fp32   load_model(...): every weight dequantized to float32
  transformers   HF eager float32, dequantized from the same GGUF

    python benchmarks/decode_speed.py [--tokens 128] [--repeats 5] [--threads 2]
                                      [--only llama.cpp,int4,...] [--crossover]

Each contender runs in its own worker process (no OpenMP pools fighting each other); the
repeats are interleaved (contender A, B, C, D, A, B, ...) and only one worker computes at a
time. A repeat prefills the same 5-token prompt, then times `--tokens` greedy 1-token
decode steps (prompt evaluation excluded). Printed per contender: median tokens/s (and the
spread), ms/token, ratio to llama.cpp, and GB/s = weight bytes read per token / time per
token (gpt-fast's figure: the weights a decode step streams, embeddings lookup excluded, the
LM head included).

Ours runs the model directly (ContiguousAttention over SequenceKVCache, greedy argmax on
`compute_logits`), independent of the engine. `--crossover` also times one step's worth of
linears (all 30 layers) per M = tokens in the step, int4 kernel vs dense float32: the data
behind `dense_min_rows`.

Benchmark-only dependencies, imported lazily: llama-cpp-python, transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is" (SmolLM2 token ids)
CONTENDERS = ("llama.cpp", "engine", "int4", "fp32", "transformers")
LABELS = {"llama.cpp": "llama.cpp", "engine": "k2serve engine (served)", "int4": "k2serve int4",
          "fp32": "k2serve fp32", "transformers": "transformers eager fp32"}
SIGILL = -4


# ---------------------------------------------------------------------------- workers
# A worker loads one contender, prints {"ready": ...}, then answers each "run" line on
# stdin with one JSON line {"tok_s", "tokens"}.

def _serve(decode, info: dict) -> None:
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        n = int(line)
        seconds, tokens = decode(n)
        print(json.dumps({"tok_s": n / seconds, "tokens": tokens}), flush=True)


def _worker_llama_cpp(path: str, threads: int, extra_bufts: bool) -> None:
    try:
        import numpy as np
        import llama_cpp.llama_cpp as llama_c
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama-cpp-python is not installed (pip install llama-cpp-python)")
    if not extra_bufts:
        # llama.cpp's "extra buffer types" (AMX, repacked weights) off: on VMs that report AMX
        # without enabling it, the AMX matmul dies with SIGILL.
        default_params = llama_c.llama_model_default_params

        def model_params():
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_c.llama_model_default_params = model_params
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    n_vocab = llm.n_vocab()

    def greedy():  # argmax of the last token's logits (a view of llama.cpp's buffer)
        return int(np.argmax(np.ctypeslib.as_array(llama_c.llama_get_logits(llm.ctx), shape=(n_vocab,))))

    def decode(n):
        llm.reset()
        llm.eval(PROMPT)
        token = greedy()
        tokens = [token]
        start = time.perf_counter()
        for _ in range(n):
            llm.eval([token])
            token = greedy()
            tokens.append(token)
        return time.perf_counter() - start, tokens

    weight_bytes = _gguf_weight_bytes(path)
    _serve(decode, {"weight_bytes": weight_bytes, "extra_bufts": extra_bufts})


def _gguf_weight_bytes(path: str) -> int:
    """Bytes of every 2-D tensor of the GGUF (the tied token_embd is the LM head)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2)


def greedy(logits) -> int:
    """argmax of [1, vocab] float32 logits with numpy (torch's CPU argmax is ~10x slower), as
    the llama.cpp worker does."""
    import numpy as np

    return int(np.argmax(logits.numpy()))


def _worker_k2serve(path: str, threads: int, quantized: bool) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from k2serve.models.layers.attention import ContiguousAttention, Segment, SequenceKVCache
    from k2serve.models.loader import load_model

    torch.set_num_threads(threads)
    model, config = load_model(path, progress=False, quantized=quantized)

    def forward(cache, ids):
        ctx = ContiguousAttention([Segment(cache, cache.length, len(ids))])
        hidden = model(ids, torch.arange(cache.length, cache.length + len(ids)), ctx)
        ctx.commit()
        return model.compute_logits(hidden[-1:])

    def decode(n):
        with torch.inference_mode():
            cache = SequenceKVCache(config.num_layers, config.num_kv_heads, config.head_dim)
            token = greedy(forward(cache, torch.tensor(PROMPT)))
            tokens = [token]
            start = time.perf_counter()
            for _ in range(n):
                token = greedy(forward(cache, torch.tensor([token])))
                tokens.append(token)
            return time.perf_counter() - start, tokens

    if quantized:
        weight_bytes = _quantized_weight_bytes(model)
    else:
        weight_bytes = sum(p.nbytes for n, p in model.named_parameters() if p.dim() == 2)
    decode(4)  # warm-up
    _serve(decode, {"weight_bytes": weight_bytes})


def _worker_engine(path: str, threads: int) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from k2serve.engine.config import EngineConfig
    from k2serve.engine.core import EngineCore
    from k2serve.engine.sampling_params import SamplingParams
    from k2serve.engine.sequence import GenerationRequest
    from k2serve.models.loader import load_model
    from k2serve.serving.loader import SERVING_QUANTIZATION

    torch.set_num_threads(threads)
    model, _ = load_model(path, progress=False, quantized=SERVING_QUANTIZATION)
    core = EngineCore(model, EngineConfig(kv_cache_bytes=256 << 20))
    runs = iter(range(1 << 30))

    def decode(n):
        core.add(GenerationRequest(f"r{next(runs)}", list(PROMPT),
                                   SamplingParams(max_tokens=n + 1, temperature=0, ignore_eos=True)))
        tokens = [out.token_ids[0] for out in core.step()]  # prefill + first token
        start = time.perf_counter()
        while core.has_work():
            tokens += [out.token_ids[0] for out in core.step()]
        return time.perf_counter() - start, tokens

    weight_bytes = _quantized_weight_bytes(model)
    decode(4)  # warm-up
    _serve(decode, {"weight_bytes": weight_bytes})


def _quantized_weight_bytes(model) -> int:
    from k2serve.models.layers.int4_linear import Int4Linear
    from k2serve.models.layers.lm_head import QuantizedLMHead

    weight_bytes = 0
    for m in model.modules():
        if isinstance(m, QuantizedLMHead):
            if m.packed is not None:
                weight_bytes += m.int4_bytes
            elif m.int8_weight is not None:
                weight_bytes += m.int8_weight.nbytes + m.int8_scales.nbytes
            else:
                weight_bytes += m.weight.nbytes
        elif isinstance(m, Int4Linear):
            weight_bytes += m.int4_bytes if m.is_int4 else m.weight.nbytes
    return weight_bytes


def _worker_transformers(path: str, threads: int) -> None:
    import torch

    try:
        import transformers
    except ImportError:
        sys.exit("transformers is not installed (pip install transformers)")
    import warnings

    warnings.filterwarnings("ignore")  # past_key_values deprecation notices, once per step
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    directory, name = os.path.split(path)
    config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
    try:
        import accelerate  # noqa: F401  (from_pretrained(gguf_file=...) requires it)
    except ImportError:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
        model.load_state_dict(tensors, strict=False)
        model.tie_weights()
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.eval()

    def decode(n):
        with torch.inference_mode():
            out = model(torch.tensor([PROMPT]), use_cache=True)
            past, token = out.past_key_values, greedy(out.logits[:, -1])
            tokens = [token]
            start = time.perf_counter()
            for _ in range(n):
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, greedy(out.logits[:, -1])
                tokens.append(token)
            return time.perf_counter() - start, tokens

    weight_bytes = sum(p.nbytes for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    if config.tie_word_embeddings:
        weight_bytes += model.get_output_embeddings().weight.nbytes
    decode(4)
    _serve(decode, {"weight_bytes": weight_bytes})


def worker_main(kind: str, path: str, threads: int, extra_bufts: str) -> None:
    if kind == "llama.cpp":
        _worker_llama_cpp(path, threads, extra_bufts == "on")
    elif kind == "engine":
        _worker_engine(path, threads)
    elif kind in ("int4", "fp32"):
        _worker_k2serve(path, threads, quantized=kind == "int4")
    elif kind == "transformers":
        _worker_transformers(path, threads)
    elif kind == "llama.cpp-probe":  # does llama.cpp survive a decode with its defaults?
        from llama_cpp import Llama

        llm = Llama(model_path=path, n_threads=threads, n_ctx=64, verbose=False)
        llm.eval(PROMPT)
        llm.eval([PROMPT[0]])
    else:
        raise SystemExit(f"unknown worker {kind!r}")


# ---------------------------------------------------------------------------- parent
class Worker:
    def __init__(self, kind: str, args) -> None:
        self.kind = kind
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, "--model", args.model, "--threads", str(args.threads),
             "--llama-extra-bufts", args.llama_extra_bufts],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"{self.kind} worker exited ({code})")
        return json.loads(line)

    def run(self, tokens: int) -> dict:
        self.proc.stdin.write(f"{tokens}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def resolve_extra_bufts(args) -> str:
    """auto: llama.cpp's defaults unless they die of SIGILL (AMX reported but unusable)."""
    if args.llama_extra_bufts != "auto":
        return args.llama_extra_bufts
    probe = subprocess.run([sys.executable, __file__, "--worker", "llama.cpp-probe", "--model", args.model,
                            "--threads", str(args.threads)], capture_output=True, text=True)
    if probe.returncode == SIGILL:
        print("llama.cpp: its default (AMX/repacked) matmuls die with SIGILL on this CPU; "
              "running it with use_extra_bufts=False")
        return "off"
    if probe.returncode != 0:
        print(f"llama.cpp probe failed ({probe.returncode}): {probe.stderr.strip()[-500:]}")
    return "on"


def crossover(args) -> None:
    """Time all 30 layers' linears (one step) per M: int4 kernel vs dense float32."""
    import torch

    sys.path.insert(0, str(REPO))
    from k2serve.models.layers.int4_linear import Int4Linear
    from k2serve.models.loader import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, progress=False, quantized=True)
    linears = [m for m in model.model.modules() if isinstance(m, Int4Linear)]
    print(f"\none step's linears ({len(linears)} matmuls), ms, median of 5; tokens/s = M / time")
    print(f"{'M':>5} {'int4':>9} {'fp32':>9}  faster")
    with torch.inference_mode():
        for m in (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256):
            xs = {k: torch.randn(m, k) for k in {lin.in_features for lin in linears}}
            times = {}
            for kind in ("int4", "fp32"):
                for lin in linears:
                    lin.dense_min_rows = 10**9 if kind == "int4" else 0
                runs = []
                for _ in range(6):
                    start = time.perf_counter()
                    for lin in linears:
                        lin(xs[lin.in_features])
                    runs.append(time.perf_counter() - start)
                times[kind] = statistics.median(runs[1:]) * 1e3
            best = min(times, key=times.get)
            print(f"{m:>5} {times['int4']:>9.2f} {times['fp32']:>9.2f}  {best}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--tokens", type=int, default=128, help="decode steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated subset of " + ",".join(CONTENDERS))
    parser.add_argument("--llama-extra-bufts", choices=("auto", "on", "off"), default="auto",
                        help="llama.cpp's AMX/repacked weight buffers (auto: off if they crash)")
    parser.add_argument("--crossover", action="store_true", help="also time int4 vs fp32 linears per M")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(REPO))
        from k2serve.models.embedded import embedded_smollm2_gguf_path

        args.model = embedded_smollm2_gguf_path()
    if args.worker:
        worker_main(args.worker, args.model, args.threads, args.llama_extra_bufts)
        return

    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = set(kinds) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contender(s) {sorted(unknown)}")
    if "llama.cpp" in kinds:
        args.llama_extra_bufts = resolve_extra_bufts(args)
    print(f"model {os.path.basename(args.model)}, {args.threads} threads, {args.tokens} decode steps "
          f"x {args.repeats} repeats, prompt {len(PROMPT)} tokens")
    workers = {}
    try:
        for kind in kinds:
            try:
                workers[kind] = Worker(kind, args)
            except RuntimeError as e:
                print(f"skipping {LABELS[kind]}: {e}")
        results = {kind: [] for kind in workers}
        tokens = {}
        for _ in range(args.repeats):
            for kind, worker in workers.items():
                out = worker.run(args.tokens)
                results[kind].append(out["tok_s"])
                tokens[kind] = out["tokens"]
    finally:
        for worker in workers.values():
            worker.close()
    report(args, workers, results, tokens)
    if args.crossover:
        crossover(args)


def report(args, workers, results, tokens) -> None:
    base = statistics.median(results["llama.cpp"]) if "llama.cpp" in results else None
    ref_tokens = tokens.get("fp32")
    print(f"\n{'':<24} {'tok/s':>7} {'(min-max)':>13} {'ms/tok':>7} {'vs llama.cpp':>12} {'weights MB':>10} "
          f"{'GB/s':>6}  same greedy tokens as k2serve fp32")
    for kind, runs in results.items():
        med = statistics.median(runs)
        mb = workers[kind].info["weight_bytes"] / 1e6
        ratio = f"{med / base:.2f}x" if base else "-"
        same = "-"
        if ref_tokens is not None:
            n = next((i for i, (a, b) in enumerate(zip(tokens[kind], ref_tokens)) if a != b), len(ref_tokens))
            same = f"{n}/{len(ref_tokens)}"
        label = LABELS[kind] + (" (no extra bufts)" if kind == "llama.cpp" and args.llama_extra_bufts == "off" else "")
        print(f"{label:<24} {med:>7.1f} {f'({min(runs):.1f}-{max(runs):.1f})':>13} {1e3 / med:>7.2f} {ratio:>12} "
              f"{mb:>10.1f} {mb * med / 1e3:>6.2f}  {same}")


if __name__ == "__main__":
    main()
