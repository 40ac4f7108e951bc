"""The int4 linear kernels side by side: ours on AMX tiles (k2serve/native/int4_amx.cpp) and
torch's `_weight_int4pack_mm_for_cpu`, on every 4-bit projection of the embedded SmolLM2 (the
210 of its 30 layers, q/k/v and gate/up unfused, in model order, so weights stream from
memory as in a decode step).

    python benchmarks/int4_kernels.py [--rows 1 4 8 16 32 64] [--repeat 5] [--threads 2]

Prints per M (rows: tokens in the step) the median time of one pass over all of them for
each kernel, alternating kernels within each repeat, the ratio, and at M=1 the bytes read per
second (4-bit weights and their scales).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k2serve import native  # noqa: E402
from k2serve.models.embedded import embedded_smollm2_gguf_path  # noqa: E402
from k2serve.models.layers.int4_linear import INT4_ACT_DTYPE, pack_int4  # noqa: E402
from k2serve.models.loaders.gguf import GGUFCheckpoint  # noqa: E402

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def load_linears(kernels):
    """[(in_features, ours (packed, scales, mins), torch's (packed, scale_zeros), our bytes,
    torch's bytes)] for every projection, in model order."""
    checkpoint = GGUFCheckpoint(embedded_smollm2_gguf_path())
    layers = []
    for i in range(checkpoint.config.num_layers):
        for projection in PROJECTIONS:
            qt = checkpoint.load_tensor(f"model.layers.{i}.{projection}.weight", keep_quantized=True)
            q, scale, minimum = qt.int4_affine()
            ours = kernels.int4_amx_pack(q, scale, minimum)
            theirs = pack_int4(q, scale, minimum + 8 * scale)
            layers.append((q.shape[1], ours, theirs, sum(t.nbytes for t in ours), sum(t.nbytes for t in theirs)))
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = native.kernels()
    if kernels is None or not kernels.int4_amx_available():
        sys.exit("our int4 kernel does not run here (no native build, or no AMX): nothing to compare")
    layers = load_linears(kernels)
    ours_bytes = sum(layer[3] for layer in layers)
    theirs_bytes = sum(layer[4] for layer in layers)
    print(f"{len(layers)} linears; bytes a pass reads: ours {ours_bytes / 1e6:.1f} MB, torch's {theirs_bytes / 1e6:.1f} MB;"
          f" {args.threads} threads, median of {args.repeat}")
    print(f"{'M':>4} {'ours ms':>9} {'torch ms':>9} {'ratio':>7}")
    for m in args.rows:
        xs = [torch.randn(m, k).to(INT4_ACT_DTYPE) for k, *_ in layers]

        def ours():
            for (_, (packed, scales, mins), *_), x in zip(layers, xs):
                kernels.int4_amx_linear(x, packed, scales, mins)

        def theirs():
            for (_, _, (packed, scale_zeros), *_), x in zip(layers, xs):
                torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scale_zeros)

        times = {"ours": [], "torch": []}
        for _ in range(args.repeat):
            for name, fn in (("ours", ours), ("torch", theirs)):
                fn()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        a, b = statistics.median(times["ours"]), statistics.median(times["torch"])
        line = f"{m:>4} {a * 1e3:>9.2f} {b * 1e3:>9.2f} {b / a:>6.2f}x"
        if m == 1:
            line += f"   ({ours_bytes / a / 1e9:.1f} GB/s ours, {theirs_bytes / b / 1e9:.1f} GB/s torch's)"
        print(line)


if __name__ == "__main__":
    main()
