"""Where one 32-row decode step's time goes: the engine serving the embedded SmolLM2
(GGUF Q4_1, the serving quantization), 32 sequences decoding together after a 256-token
prompt each, timed per component over many steps.

    python benchmarks/decode_profile.py [--rows 32] [--prompt 256] [--steps 40] [--threads 2]
                                        [--clock wall|cpu] [--temperature T] [--per-op]

Components (exclusive ms per step, medians over the steps): decoder layers in the native
decode stack (``LlamaDecodeStack.forward``: the layers' linears, attention and elementwise
ops in one call; ``--per-op`` turns it off to time those apart), int4 linears
(``Int4Linear.forward_raw``), attention (RoPE + KV write + paged decode attention), LM head
(``QuantizedLMHead.forward`` with its exact-top recompute), sampling (``sample`` and the
grammar mask), other model ops (embedding, norms, SiLU, residual adds, the model's Python)
and engine Python (scheduling, block tables, bookkeeping: the step minus everything above).
``--clock cpu`` times with the process's CPU time (all threads, spin-waits included): on a
shared, busy machine it leaves out the time other processes took (best with --threads 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k2serve import native  # noqa: E402
from k2serve.engine import core as core_module  # noqa: E402
from k2serve.engine.config import EngineConfig  # noqa: E402
from k2serve.engine.core import EngineCore  # noqa: E402
from k2serve.engine.paged_attention import PagedAttention  # noqa: E402
from k2serve.engine.sampling_params import SamplingParams  # noqa: E402
from k2serve.engine.sequence import GenerationRequest  # noqa: E402
from k2serve.models.embedded import embedded_smollm2_gguf_path  # noqa: E402
from k2serve.models.layers.int4_linear import Int4Linear  # noqa: E402
from k2serve.models.layers.lm_head import QuantizedLMHead  # noqa: E402
from k2serve.models.loader import load_model  # noqa: E402
from k2serve.serving.loader import SERVING_QUANTIZATION  # noqa: E402

COMPONENTS = ("decode stack", "int4 linears", "attention", "LM head", "sampling", "other model ops", "engine Python")


clock = time.perf_counter


class Timer:
    """Exclusive time per component: a call's time minus the timed calls nested in it."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            self._stack.append([0.0])
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = clock() - start
                nested = self._stack.pop()[0]
                self.totals[name] += elapsed - nested
                if self._stack:
                    self._stack[-1][0] += elapsed
        return timed


class TimedStack:
    """The model's native decode stack with its ``forward`` timed (a pybind object takes no
    new attributes)."""

    def __init__(self, timer: Timer, stack):
        self.num_layers = stack.num_layers
        self.forward = timer.wrap("decode stack", stack.forward)


def instrument(timer: Timer, model) -> None:
    if model.model.decode_stack is not None:
        model.model.decode_stack = TimedStack(timer, model.model.decode_stack)
    Int4Linear.forward_raw = timer.wrap("int4 linears", Int4Linear.forward_raw)
    PagedAttention.attend = timer.wrap("attention", PagedAttention.attend)
    PagedAttention.attend_rotary = timer.wrap("attention", PagedAttention.attend_rotary)
    QuantizedLMHead.forward = timer.wrap("LM head", QuantizedLMHead.forward)
    core_module.sample = timer.wrap("sampling", core_module.sample)
    core_module.allowed_tokens = timer.wrap("sampling", core_module.allowed_tokens)
    model.forward = timer.wrap("model", model.forward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="sequences decoding together")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=40, help="decode steps timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time, for a busy shared machine")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature, seeded (0: greedy, as the serving benchmarks)")
    parser.add_argument("--per-op", action="store_true",
                        help="without the native decode stack: each layer op from Python")
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(native.describe(), f"| {args.threads} threads | {args.rows} rows, {args.prompt}-token prompts")
    model, config = load_model(embedded_smollm2_gguf_path(), progress=False, quantized=SERVING_QUANTIZATION)
    model.eval()
    if args.per_op:
        model.model.decode_stack = None
    core = EngineCore(model, EngineConfig(kv_cache_bytes=1 << 30, max_num_seqs=max(args.rows, 1),
                                          max_step_tokens=max(args.rows * args.prompt, 2048)))
    g = torch.Generator().manual_seed(0)
    for i in range(args.rows):
        prompt = torch.randint(100, 40000, (args.prompt,), generator=g).tolist()
        core.add(GenerationRequest(f"r{i}", prompt, SamplingParams(
            max_tokens=args.steps + 64, temperature=args.temperature, seed=i, ignore_eos=True)))
    with torch.inference_mode():
        start, cpu_start = time.perf_counter(), time.process_time()
        while core.scheduler.waiting or any(s.num_computed < len(s.prompt_ids) for s in core.scheduler.running):
            core.step()  # prefill (and the first tokens)
        print(f"prefill: {time.perf_counter() - start:.2f} s ({time.process_time() - cpu_start:.2f} s CPU)",
              file=sys.stderr, flush=True)
        for _ in range(3):
            core.step()  # warm-up decode steps
        timer = Timer()
        instrument(timer, core.model)
        per_step: dict[str, list[float]] = defaultdict(list)
        for _ in range(args.steps):
            timer.totals.clear()
            start = clock()
            outputs = core.step()
            total = clock() - start
            assert len(outputs) == args.rows, "not a pure decode step"
            t = dict(timer.totals)
            per_step["other model ops"].append(t.get("model", 0.0))
            for name in ("decode stack", "int4 linears", "attention", "LM head", "sampling"):
                per_step[name].append(t.get(name, 0.0))
            per_step["engine Python"].append(total - sum(t.values()))
            per_step["step"].append(total)
    median = {name: statistics.median(values) * 1e3 for name, values in per_step.items()}
    print(f"{'component':<18} {'ms (median)':>11} {'share':>6}")
    for name in COMPONENTS:
        print(f"{name:<18} {median[name]:>11.2f} {median[name] / median['step']:>6.1%}")
    print(f"{'step':<18} {median['step']:>11.2f}   -> {args.rows / median['step'] * 1e3:.0f} tok/s")


if __name__ == "__main__":
    main()
