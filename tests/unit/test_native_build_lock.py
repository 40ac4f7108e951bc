"""A kernel build killed half-way (Ctrl-C, kill -9, a timeout) must not hang every later
start: torch's extension builder locks its build directory with a plain file that stays
behind when its process dies."""

from __future__ import annotations

import threading

import pytest
from torch.utils.file_baton import FileBaton

from k2serve import native


def _fake_load(**kwargs):
    """torch.utils.cpp_extension.load's locking, without the compiler: wait for the build
    directory's baton file, or take it."""
    baton = FileBaton(f"{kwargs['build_directory']}/lock")
    if baton.try_acquire():
        baton.release()
    else:
        baton.wait()
    return "module"


@pytest.fixture()
def fresh_native(monkeypatch, tmp_path):
    import torch.utils.cpp_extension

    monkeypatch.setenv("K2SERVE_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("K2SERVE_NATIVE", "1")
    monkeypatch.delenv(native.ISA_ENV, raising=False)  # the fake module has no vector paths to pick
    monkeypatch.setattr(torch.utils.cpp_extension, "load", _fake_load)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_failure", None, raising=False)
    return tmp_path


def test_a_lock_left_by_a_killed_build_is_cleared(fresh_native):
    sources = {p.name: p.read_bytes() for p in [*native._SOURCES, *native._HEADERS]}
    _, directory = native._build_directory(sources)
    (directory / "lock").touch()  # what a build killed inside torch's load() leaves
    result = {}
    worker = threading.Thread(target=lambda: result.update(module=native.kernels()),
                              daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "kernels() waits forever on a stale build lock"
    assert result["module"] == "module"
    assert not (directory / "lock").exists()
