"""Logs as JSON lines (`k2serve serve --log-format json`): one object per record, with the
request id of the request it was logged for. A record whose message is itself a JSON object
(the per-request lines of k2serve.requests) has its fields merged in, not quoted."""

from __future__ import annotations

import json
import logging
import time

from k2serve.telemetry.context import REQUEST_ID


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        doc: dict = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                     + f".{int(record.msecs):03d}Z",
                     "level": record.levelname.lower(), "logger": record.name}
        fields = None
        if message.startswith("{"):
            try:
                fields = json.loads(message)
            except ValueError:
                fields = None
        if isinstance(fields, dict):
            doc.update({k: v for k, v in fields.items() if k not in doc})
        else:
            doc["message"] = message
        request_id = REQUEST_ID.get()
        if request_id is not None:
            doc.setdefault("request_id", request_id)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"), default=str)


def configure(level: str, fmt: str) -> None:
    """Logging for a command: plain text (`text`, as `logging.basicConfig` sets it up, which
    leaves a handler already there alone) or JSON lines (`json`: the root's one handler)."""
    numeric = getattr(logging, level.upper(), logging.WARNING)
    if fmt != "json":
        logging.basicConfig(level=numeric,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
