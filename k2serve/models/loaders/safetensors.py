"""Load HF checkpoint directories: config.json + model.safetensors (or sharded + index)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

from k2serve.models.config import ModelConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsCheckpoint:
    """An HF checkpoint directory opened for loading: ``config`` and tensors by HF name."""

    def __init__(self, path: str, config_from_hf=ModelConfig.from_hf_config):
        """config_from_hf: config.json dict -> the model config (the loader picks per architecture)."""
        self.path = path
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"{path}: no config.json (expected an HF checkpoint directory)")
        with open(config_path) as f:
            self.hf_config = json.load(f)
        self.config = config_from_hf(self.hf_config)

        index_path = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, SINGLE_NAME)):
            with safe_open(os.path.join(path, SINGLE_NAME), framework="pt") as f:
                weight_map = {name: SINGLE_NAME for name in f.keys()}
        else:
            raise ValueError(f"{path}: neither {SINGLE_NAME} nor {INDEX_NAME} found")
        for shard in set(weight_map.values()):
            if not os.path.isfile(os.path.join(path, shard)):
                raise ValueError(f"{path}: shard {shard!r} listed in {INDEX_NAME} is missing")
        self.weight_map: dict[str, str] = weight_map

    @property
    def names(self) -> list[str]:
        return list(self.weight_map)

    def source_name(self, name: str) -> str:
        return name

    def __len__(self) -> int:
        return len(self.weight_map)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors in their stored dtype, one shard file open at a time."""
        by_shard: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard in sorted(by_shard):
            with safe_open(os.path.join(self.path, shard), framework="pt") as f:
                available = set(f.keys())
                for name in by_shard[shard]:
                    if name not in available:
                        raise ValueError(f"{self.path}: tensor {name!r} is not in shard {shard!r}")
                    yield name, f.get_tensor(name)
