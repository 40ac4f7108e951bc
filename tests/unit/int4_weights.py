"""What the native int4 kernel tests share."""

from __future__ import annotations


def weight_of(q, scale, minimum):
    """A Q4_K tensor's weights in float64 from its 4-bit values, scales and minimums."""
    n, k = q.shape
    return (q.double().view(n, k // 32, 32) * scale.double()[..., None] + minimum.double()[..., None]).view(n, k)
