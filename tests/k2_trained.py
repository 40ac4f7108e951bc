"""A tiny K2 checkpoint taught (by a few hundred optimizer steps) to answer one conversation
with a tool call — so serving tests exercise real generation of K2's tool-call format.

The weights start as `write_tiny_k2_checkpoint`'s random ones; transformers'
DeepseekV3ForCausalLM (test-only dependency) overfits them to the target, and they are
written back in the same sharded layout (float32, so no rounding undoes the training).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from k2serve.models.tiny_k2 import _write_shards, write_tiny_k2_checkpoint
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


def write_tool_calling_k2(directory: Path, steps: int = 300) -> Path:
    import transformers

    path = write_tiny_k2_checkpoint(directory, seed=0, fp8=False)
    tokenizer = load_tokenizer(str(path))
    prompt = ChatTemplate.from_tokenizer(tokenizer).render(MESSAGES, tools=TOOLS,
                                                          add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt)
    target_ids = tokenizer.encode(TARGET) + [tokenizer.token_to_id("<|im_end|>")]

    hf_dir = directory.parent / (directory.name + "-hf")
    shutil.copytree(path, hf_dir, dirs_exist_ok=True)
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "deepseek_v3"  # kimi_k2 needs trust_remote_code in transformers
    config.pop("auto_map", None)
    (hf_dir / "config.json").write_text(json.dumps(config))
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()

    ids = torch.tensor([prompt_ids + target_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + target_ids])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 2e-3:
            break
    # save_pretrained writes the checkpoint names (per-expert tensors) that K2 ships.
    saved = directory.parent / (directory.name + "-trained")
    model.save_pretrained(saved)
    state = {}
    for shard in saved.glob("*.safetensors"):
        state.update(load_file(shard))
    for shard in path.glob("model-*.safetensors"):
        shard.unlink()
    _write_shards(path, state, 3)
    shutil.rmtree(hf_dir)
    shutil.rmtree(saved)
    return path
