"""Native (C++) kernels for the hot paths PyTorch has no op for.

Built once, on first use, with torch's JIT extension builder (g++ and ninja), into a
content-addressed cache directory (``$K2SERVE_NATIVE_CACHE``, default
~/.cache/k2serve/native/<hash of source, torch version, flags>): every checkout and process
with the same source shares one build, and a changed source builds anew. Every kernel has a
pure-PyTorch fallback, used when no compiler is available or ``K2SERVE_NATIVE=0`` is set.

One vector path per process, the widest the CPU has (avx512, avx2, else portable loops),
chosen at load: ``K2SERVE_ISA=avx2|portable`` forces a narrower one (and keeps the int4
linears off AMX tiles), e.g. to test the AVX2 path on an AVX-512 machine. A row's result
never depends on the batch on any path.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("k2serve.native")

_SOURCES = [Path(__file__).with_name(name)
            for name in ("bindings.cpp", "paged_attention.cpp", "layer_ops.cpp", "int8_linear.cpp",
                         "int4_amx.cpp", "int4_linear.cpp", "decode_stack.cpp")]
_HEADERS = [Path(__file__).with_name(name) for name in ("vector_math.h", "isa.h", "ops.h")]  # copied beside the sources, not compiled
# -fopenmp: at::parallel_for is OpenMP in torch's CPU build; without it the kernels would
# silently run on one thread.
# -ffp-contract=off: no FMA contraction, so elementwise maths rounds as PyTorch's does.
# -fno-trapping-math: no FP exception traps assumed (values unchanged), so loops with a
# compare-and-select (exp_vectorizable's clamp, silu) vectorize: without it GCC left them
# scalar ("control flow in loop").
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
_LDFLAGS = ["-fopenmp"]
_lock = threading.Lock()
_module = None
_tried = False
_failure: str | None = None  # why the build failed, for status()


def enabled() -> bool:
    return os.environ.get("K2SERVE_NATIVE", "1") not in ("0", "false", "no")


def _cpu_flags() -> bytes:
    """The CPU's feature flags: -march=native code built on one CPU may not run on another
    sharing the cache (a home directory mounted on several machines)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.encode()
    except OSError:
        pass
    return b""


def _build_directory(sources: dict[str, bytes]) -> tuple[str, Path]:
    import torch

    parts = [name.encode() + b"\0" + text for name, text in sorted(sources.items())]
    key = hashlib.sha256(b"\0".join([*parts, torch.__version__.encode(), sys.version.encode(),
                                     " ".join(_CFLAGS + _LDFLAGS).encode(),
                                     _cpu_flags()])).hexdigest()[:16]
    root = Path(os.environ.get("K2SERVE_NATIVE_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "k2serve" / "native")
    directory = root / key
    directory.mkdir(parents=True, exist_ok=True)
    # Compile copies that live in the build directory: the build files then name the same
    # paths whichever checkout asks, so ninja finds the build up to date.
    for name, text in sources.items():
        copy = directory / name
        if not copy.exists():
            partial = directory / f".{name}.{os.getpid()}"
            partial.write_bytes(text)
            partial.replace(copy)
    return f"k2serve_native_{key[:8]}", directory


@contextmanager
def _build_lock(directory: Path):
    """One build at a time per directory, across processes. torch's own lock is a file that
    a killed build (Ctrl-C, kill -9, a timeout) leaves behind, and every later start would
    wait on it forever; this flock is released by the OS when its holder dies, so whoever
    holds it knows any torch lock file there is stale."""
    with open(directory / ".build.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            (directory / "lock").unlink(missing_ok=True)  # torch.utils.file_baton's
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def kernels():
    """The compiled extension module, or None (fallbacks apply). Builds on the first call."""
    global _module, _tried, _failure
    if _tried or not enabled():
        return _module
    with _lock:
        if _tried:
            return _module
        _tried = True
        try:
            from torch.utils.cpp_extension import load

            sources = {path.name: path.read_bytes() for path in _SOURCES}
            headers = {path.name: path.read_bytes() for path in _HEADERS}
            name, directory = _build_directory({**sources, **headers})
            with _build_lock(directory):
                _module = load(name=name, sources=[str(directory / n) for n in sources],
                               build_directory=str(directory), extra_cflags=_CFLAGS,
                               extra_ldflags=_LDFLAGS, verbose=False)
        except Exception as exc:  # noqa: BLE001 - no compiler or ninja, a build error: fallbacks
            message = str(exc).strip()
            _failure = message.splitlines()[-1] if message else type(exc).__name__
            log.warning("k2serve: native kernels unavailable, using PyTorch fallbacks (%s)",
                        _failure)
            _module = None
        if _module is not None:
            _apply_isa(_module)
        return _module


ISA_ENV = "K2SERVE_ISA"
ISAS = ("portable", "avx2", "avx512", "amx")  # narrowest first; amx: int4 linears on AMX tiles


def _apply_isa(module) -> None:
    """K2SERVE_ISA: a vector path narrower than the CPU's widest (unset or empty: the widest)."""
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    if not wanted or wanted == "amx":
        return
    if wanted not in module.vector_isas():
        log.warning("k2serve: %s=%s is not a vector path built here (%s); using %s", ISA_ENV,
                    wanted, ", ".join(module.vector_isas()), module.vector_isa())
        return
    module.set_vector_isa(wanted)


def int4_path() -> str | None:
    """Which of our int4 linears runs here: "amx", "avx512" or "avx2" (integer dots,
    int4_linear.cpp), or None (no native build, or only portable loops: torch's kernel)."""
    module = kernels()
    if module is None:
        return None
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if module.int4_amx_available() and forced in ("", "amx"):
        return "amx"
    isa = module.vector_isa()
    return isa if isa != "portable" else None


CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_features() -> dict[str, bool]:
    """Which of the instruction sets the kernels care about this CPU has (/proc/cpuinfo)."""
    flags = set(_cpu_flags().decode(errors="replace").partition(":")[2].split())
    return {name: name in flags for name in CPU_FEATURES}


def status(build: bool = True) -> dict:
    """Which kernel path runs, and why when it is a fallback (for /health, the start-up line
    and `k2serve doctor`). Builds the kernels if nothing asked for them yet, unless `build`
    is False (then: "not loaded", as on a server whose models use none)."""
    if not build and not _tried and enabled():
        return {"native": False, "reason": "no model has used them yet", "path": "none loaded"}
    module = kernels()
    if module is None:
        reason = ("disabled by K2SERVE_NATIVE=0" if not enabled()
                  else f"build failed: {_failure}" if _failure else "not built")
        return {"native": False, "reason": reason, "path": "PyTorch fallbacks"}
    isa = module.vector_isa()
    int4 = int4_path()
    return {"native": True, "vector_isa": isa, "int4_amx": int4 == "amx", "int4": int4 or "torch",
            "path": f"native {isa}" + (" + amx int4" if int4 == "amx" else "")}


def describe(build: bool = True) -> str:
    """One line for the start-up banner."""
    s = status(build)
    return f"kernels: {s['path']}" + ("" if s["native"] else f" ({s['reason']})")
