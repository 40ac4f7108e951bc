"""`--since` values: ISO dates/times, Unix times, or durations back from now."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """Unix seconds for `2026-05-01`, `2026-05-01T12:00`, `2026-05-01T12:00+02:00` (UTC when
    no offset is given), `1767225600`, or `90m` / `24h` / `7d` back from now."""
    value = text.strip()
    match = _DURATION.match(value.lower())
    if match:
        return (time.time() if now is None else now) - float(match.group(1)) * _UNIT_S[match.group(2)]
    if re.fullmatch(r"\d{9,}(\.\d+)?", value):
        return float(value)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"cannot read the time {text!r}: use an ISO date or time "
                         f"(2026-05-01, 2026-05-01T12:00Z), a Unix time, or a duration "
                         f"back from now (30m, 24h, 7d)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()
