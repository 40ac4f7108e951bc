"""Native (C++) kernels for the hot paths PyTorch has no op for.

Built once, on first use, with torch's JIT extension builder (g++ and ninja), and cached in
torch's extensions directory (``$TORCH_EXTENSIONS_DIR``, default ~/.cache/torch_extensions);
torch rebuilds when the source or flags change. Every kernel has a pure-PyTorch fallback,
used when no compiler is available or ``K2SERVE_NATIVE=0`` is set.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("k2serve.native")

_SOURCES = [Path(__file__).with_name("paged_attention.cpp")]
_lock = threading.Lock()
_module = None
_tried = False


def enabled() -> bool:
    return os.environ.get("K2SERVE_NATIVE", "1") not in ("0", "false", "no")


def kernels():
    """The compiled extension module, or None (fallbacks apply). Builds on the first call."""
    global _module, _tried
    if _tried or not enabled():
        return _module
    with _lock:
        if _tried:
            return _module
        _tried = True
        try:
            from torch.utils.cpp_extension import load

            # -fopenmp: at::parallel_for is OpenMP in torch's CPU build; without it the
            # kernel would silently run on one thread.
            _module = load(name="k2serve_native", sources=[str(p) for p in _SOURCES],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # noqa: BLE001 - no compiler or ninja, a build error: fallbacks
            log.warning("k2serve: native kernels unavailable, using PyTorch fallbacks (%s)",
                        str(exc).strip().splitlines()[-1] if str(exc).strip() else exc)
            _module = None
        return _module
