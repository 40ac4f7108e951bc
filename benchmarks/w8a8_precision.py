"""What an int8 prompt path would cost in precision: the embedded SmolLM2 (Q4_1, as served)
prefilling real text with its prompt linears computed six ways, last-position logits
compared with a float32-activation reference.

    python benchmarks/w8a8_precision.py [--prompts 48] [--threads 2]

Prompt rows take the dense (dequantized, bfloat16-rounded) weight today. The modes, for
those linears only (everything else as served):
  A  today's path: bfloat16 activations, bfloat16 weight (oneDNN GEMM);
  B  the reference: float32 activations, the same weight upcast to float32;
  C  W8A8: int8 activations per token, int8 weight per output channel (from that weight),
     int32 sums (``torch._int_mm``, oneDNN's VNNI GEMM: ~2x the bfloat16 GEMM's rate on
     Zen 4);
  D  C after SmoothQuant's scaling (alpha 0.5), its factors taken from each call's own
     activations: a bound on what calibrated factors could reach;
  E  int8 activations per token and 32-column group (the int4 weight's groups), the weight
     as in B: what an int4 x int8 kernel (``vpdpbusd``, group-wise sums as the int4 kernel
     does them today with int16 x) would compute, simulated in float32;
  F  the same with int16 activations: what decode rows' int4 kernel computes today.
Prints per mode the logit differences from B, top-1 agreement and KL(B || mode), and how
far the activations' largest channel stands above their median channel.

A study for planning, not a serving path: it patches ``Int4Linear._forward_planned``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from k2serve.engine.config import EngineConfig  # noqa: E402
from k2serve.engine.core import EngineCore  # noqa: E402
from k2serve.engine.sampling_params import SamplingParams  # noqa: E402
from k2serve.engine.sequence import GenerationRequest  # noqa: E402
from k2serve.models.embedded import embedded_smollm2_gguf_path  # noqa: E402
from k2serve.models.layers.gguf_blocks import GROUP_SIZE  # noqa: E402
from k2serve.models.layers.int4_linear import Int4Linear  # noqa: E402
from k2serve.models.layers.lm_head import QuantizedLMHead  # noqa: E402
from k2serve.models.loader import load_model  # noqa: E402
from k2serve.serving.loader import SERVING_QUANTIZATION  # noqa: E402
from k2serve.text.loading import load_tokenizer  # noqa: E402


def int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (codes, scales)."""
    scale = t.abs().amax(1).clamp_min(1e-12) / 127
    return torch.round(t / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def w8a8(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    qx, sx = int8_rows(x)
    qw, sw = int8_rows(weight)  # (prompt runs have >= 64 rows: torch._int_mm wants > 16)
    return torch._int_mm(qx, qw.t().contiguous()).float() * sx[:, None] * sw


class Study:
    def __init__(self):
        self.mode = "A"
        self.outlier_ratios: list[float] = []
        self.head_outputs: list[torch.Tensor] = []
        self._planned = Int4Linear._forward_planned

    def linear(self, layer: Int4Linear, x: torch.Tensor, runs) -> torch.Tensor:
        assert runs == [(0, x.shape[0])], "one long prompt a step"
        if self.mode == "A":
            return self._planned(layer, x, runs)
        xf, weight = x.float(), layer.weight.float()
        channels = xf.abs().amax(0)
        self.outlier_ratios.append((channels.max() / channels.median().clamp_min(1e-12)).item())
        if self.mode == "B":
            return F.linear(xf, weight).to(torch.bfloat16)
        if self.mode in ("E", "F"):
            top = 127 if self.mode == "E" else 32767
            groups = xf.view(xf.shape[0], -1, GROUP_SIZE)
            scale = groups.abs().amax(-1, keepdim=True).clamp_min(1e-12) / top
            xq = (torch.round(groups / scale).clamp(-top, top) * scale).view_as(xf)
            return F.linear(xq, weight).to(torch.bfloat16)
        if self.mode == "D":
            smooth = (channels.clamp_min(1e-5) / weight.abs().amax(0).clamp_min(1e-5)).sqrt()
            xf, weight = xf / smooth, weight * smooth
        return w8a8(xf, weight).to(torch.bfloat16)

    def install(self) -> None:
        study = self

        def planned(layer, x, runs):
            return study.linear(layer, x, runs)

        head = QuantizedLMHead.forward

        def head_forward(layer, *args, **kwargs):
            out = head(layer, *args, **kwargs)
            study.head_outputs.append(out.detach().float()[-1].clone())
            return out

        Int4Linear._forward_planned = planned
        QuantizedLMHead.forward = head_forward


def prompts_from_repo(tokenizer, count: int) -> list[list[int]]:
    """Spans of 64..399 tokens of this repository's own text (code and prose)."""
    text = "\n".join(p.read_text(errors="ignore") for p in sorted((REPO / "k2serve/api").glob("*.py"))[:12])
    ids = tokenizer.encode(text + (REPO / "README.md").read_text())
    g = torch.Generator().manual_seed(0)
    spans = []
    for _ in range(count):
        n = int(torch.randint(64, 400, (1,), generator=g))
        start = int(torch.randint(0, len(ids) - n, (1,), generator=g))
        spans.append(ids[start:start + n])
    return spans


def last_logits(model, study: Study, prompts: list[list[int]], mode: str) -> torch.Tensor:
    study.mode = mode
    core = EngineCore(model, EngineConfig(kv_cache_bytes=1 << 30, max_num_seqs=4, max_step_tokens=512))
    rows = []
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            study.head_outputs.clear()
            core.add(GenerationRequest(f"{mode}{i}", prompt, SamplingParams(max_tokens=1, temperature=0)))
            while core.scheduler.running or core.scheduler.waiting:
                core.step()
            rows.append(study.head_outputs[0])
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = embedded_smollm2_gguf_path()
    model, _ = load_model(path, progress=False, quantized=SERVING_QUANTIZATION)
    model.eval()
    model.model.decode_stack = None  # every linear from Python, so the patch sees them all
    study = Study()
    study.install()
    prompts = prompts_from_repo(load_tokenizer(path), args.prompts)
    logits = {mode: last_logits(model, study, prompts, mode) for mode in "ABCDEF"}
    reference = logits["B"]
    print(f"{len(prompts)} prompts of 64..399 tokens; logits' mean |value| {reference.abs().mean():.2f}")
    print(f"{'mode':<28} {'max |d|':>8} {'mean |d|':>9} {'top-1':>6} {'KL median':>10} {'KL max':>9}")
    names = {"A": "A bf16 x (today)", "C": "C W8A8", "D": "D W8A8 + SmoothQuant 0.5",
             "E": "E int8 x per 32-group", "F": "F int16 x per 32-group"}
    for mode, name in names.items():
        d = logits[mode] - reference
        kl = F.kl_div(F.log_softmax(logits[mode], -1), F.log_softmax(reference, -1),
                      log_target=True, reduction="none").sum(-1)
        top1 = (logits[mode].argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"{name:<28} {d.abs().max():>8.3f} {d.abs().mean():>9.4f} {top1:>6.1%} "
              f"{kl.median():>10.2e} {kl.max():>9.2e}")
    ratios = study.outlier_ratios
    print(f"activations' largest channel / median channel (max |x|): median {statistics.median(ratios):.1f}, "
          f"max {max(ratios):.0f}")


if __name__ == "__main__":
    main()
