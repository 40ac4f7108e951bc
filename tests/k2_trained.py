"""A tiny K2 checkpoint taught (by a few hundred optimizer steps) to answer one conversation
with a tool call — so serving tests exercise real generation of K2's tool-call format. A tiny
K2-Thinking (its `<think>` tokens and template) is taught two: one thinks then calls, one
opens its call section inside the thinking, without `</think>` (as K2-Thinking does).

The weights start as `write_tiny_k2_checkpoint`'s random ones; transformers'
DeepseekV3ForCausalLM (test-only dependency) overfits them to the target, and they are
written back in the same sharded layout (float32, so no rounding undoes the training).

The thinking model is K2-Thinking-shaped all the way: its routed experts are native INT4, as
with quantization-aware training — projected onto the symmetric int4 grid (group 32, bf16
scales) before training and frozen there, the rest trained around them — and written in
compressed-tensors' pack-quantized layout, so serving it runs them through the int4 kernels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from k2serve.models.loaders.compressed_tensors import (
    PACKED,
    SCALE,
    SHAPE,
    pack_int4,
    quantize_int4_symmetric,
)
from k2serve.models.tiny_k2 import (
    K2_THINKING_QUANTIZATION,
    _write_shards,
    is_routed_expert,
    write_tiny_k2_checkpoint,
)
from k2serve.text.chat_template import ChatTemplate
from k2serve.text.loading import load_tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
MESSAGES = [{"role": "user", "content": "What's the weather in Paris?"}]
ARGUMENTS = '{"city": "Paris"}'
TARGET = ("Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
          f"<|tool_call_argument_begin|>{ARGUMENTS}<|tool_call_end|><|tool_calls_section_end|>")


THINKING = "The user wants Paris weather."
ROME_MESSAGES = [{"role": "user", "content": "And in Rome?"}]
ROME_THINKING = "Rome needs a lookup."
ROME_ARGUMENTS = '{"city": "Rome"}'


def _call(arguments: str) -> str:
    return ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
            f"<|tool_call_argument_begin|>{arguments}<|tool_call_end|><|tool_calls_section_end|>")


THINKING_TARGETS = [  # (conversation, reply)
    (MESSAGES, f"<think>{THINKING}</think>Let me check.{_call(ARGUMENTS)}"),
    (ROME_MESSAGES, f"<think>{ROME_THINKING}{_call(ROME_ARGUMENTS)}"),
]


def write_tool_calling_k2(directory: Path, steps: int = 300) -> Path:
    return _train(directory, [(MESSAGES, TARGET)], steps, thinking=False)


def write_thinking_k2(directory: Path, steps: int = 400) -> Path:
    return _train(directory, THINKING_TARGETS, steps, thinking=True, int4_experts=True)


def _project_experts_to_int4(model) -> dict[str, tuple]:
    """Routed experts onto the int4 grid, frozen; checkpoint name -> (codes, bf16 scale)."""
    grid = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            experts = getattr(layer.mlp, "experts", None)
            if experts is None:
                continue
            inter = experts.intermediate_dim
            for e in range(experts.num_experts):
                prefix = f"model.layers.{i}.mlp.experts.{e}."
                for param, names in ((experts.gate_up_proj, ("gate_proj", "up_proj")),
                                     (experts.down_proj, ("down_proj",))):
                    codes, scale = quantize_int4_symmetric(param[e])
                    param[e] = ((codes.float() - 8).view(param.shape[1], -1, 32)
                                * scale.float()[..., None]).view_as(param[e])
                    for k, name in enumerate(names):  # gate/up rows are stacked
                        rows = slice(k * inter, (k + 1) * inter) if len(names) == 2 else slice(None)
                        grid[prefix + name + ".weight"] = (codes[rows], scale[rows])
            experts.gate_up_proj.requires_grad_(False)
            experts.down_proj.requires_grad_(False)
    return grid


def _train(directory: Path, targets: list[tuple[list[dict], str]], steps: int,
           thinking: bool, int4_experts: bool = False) -> Path:
    def prompts(tokenizer, template):
        return [tokenizer.encode(template.render(messages, tools=TOOLS, add_generation_prompt=True))
                for messages, _ in targets]

    return train_k2(directory, prompts, [target for _, target in targets], steps, thinking,
                    int4_experts=int4_experts)


def train_k2(directory: Path, prompts, targets: list[str], steps: int, thinking: bool = False,
             context_length: int = 4096, lr: float = 3e-3, int4_experts: bool = False) -> Path:
    """Write a tiny K2 checkpoint into `directory` and teach it to answer each prompt with
    its target (then `<|im_end|>`). `prompts(tokenizer, template)` gives the prompts' ids.
    int4_experts: routed experts on the int4 grid, frozen, written packed (K2-Thinking's)."""
    import transformers

    torch.manual_seed(0)
    path = write_tiny_k2_checkpoint(directory, seed=0, fp8=False, thinking=thinking)
    if context_length != 4096:  # YaRN over the tiny config's 128 original positions
        config = json.loads((path / "config.json").read_text())
        config["max_position_embeddings"] = context_length
        config["rope_scaling"]["factor"] = context_length / 128
        (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = load_tokenizer(str(path))
    template = ChatTemplate.from_tokenizer(tokenizer)
    end = tokenizer.token_to_id("<|im_end|>")
    batch = []
    for prompt_ids, target in zip(prompts(tokenizer, template), targets, strict=True):
        target_ids = tokenizer.encode(target) + [end]
        batch.append((torch.tensor([prompt_ids + target_ids]),
                      torch.tensor([[-100] * len(prompt_ids) + target_ids])))

    hf_dir = directory.parent / (directory.name + "-hf")
    shutil.copytree(path, hf_dir, dirs_exist_ok=True)
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "deepseek_v3"  # kimi_k2 needs trust_remote_code in transformers
    config.pop("auto_map", None)
    (hf_dir / "config.json").write_text(json.dumps(config))
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    grid = _project_experts_to_int4(model) if int4_experts else {}

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        losses = [model(ids, labels=labels).loss for ids, labels in batch]
        loss = sum(losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if max(x.item() for x in losses) < 2e-3:
            break
    # save_pretrained writes the checkpoint names (per-expert tensors) that K2 ships.
    saved = directory.parent / (directory.name + "-trained")
    model.save_pretrained(saved)
    state = {}
    for shard in saved.glob("*.safetensors"):
        state.update(load_file(shard))
    for name, (codes, scale) in grid.items():  # the frozen experts, exactly as trained
        assert name in state, name
        del state[name]
        module = name.removesuffix(".weight")
        state[module + PACKED], state[module + SCALE] = pack_int4(codes), scale
        state[module + SHAPE] = torch.tensor([codes.shape[0], codes.shape[1]])
    assert not int4_experts or not any(is_routed_expert(n) for n in state)
    if int4_experts:
        config = json.loads((path / "config.json").read_text())
        config["_name_or_path"] = "moonshotai/Kimi-K2-Thinking"
        config["quantization_config"] = K2_THINKING_QUANTIZATION
        (path / "config.json").write_text(json.dumps(config, indent=2))
    for shard in path.glob("model-*.safetensors"):
        shard.unlink()
    _write_shards(path, state, 3)
    shutil.rmtree(hf_dir)
    shutil.rmtree(saved)
    return path
