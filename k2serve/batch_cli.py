"""`k2serve batch submit|status|cancel`: batch jobs on a running server, for operators.

`submit FILE --endpoint /v1/chat/completions` uploads the JSONL file (Together's upload, so
lines need no `url`), creates the batch and prints its id; with `--wait` it shows a progress
bar on stderr until the batch ends, then downloads the output (and error) file. The server
is `--url` (default $K2SERVE_URL, else http://127.0.0.1:8000), the key `--api-key` (default
$K2SERVE_API_KEY; none in open mode).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from k2serve.client_cli import add_client_args, call_server

# The server answers a User-Agent naming OpenAI with OpenAI's Batch object, whose
# request_counts the progress bar shows.
USER_AGENT = "k2serve-batch-cli (OpenAI-shaped replies)"
FINAL = ("completed", "failed", "expired", "cancelled")
BAR_WIDTH = 30


def add_batch_parsers(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser("batch", help="batch jobs on a running server (JSONL in, JSONL "
                                         "out, at the batch price, in idle capacity)")
    bsub = batch.add_subparsers(dest="batch_command", required=True)

    submit = bsub.add_parser("submit", help="upload a JSONL file and run it as a batch")
    submit.add_argument("file", help="one request a line: {custom_id, body[, method, url]}")
    submit.add_argument("--endpoint", required=True,
                        help="/v1/chat/completions, /v1/completions, /v1/embeddings, ...")
    submit.add_argument("--window", default="24h",
                        help="completion window: past it the batch expires (default 24h)")
    submit.add_argument("--wait", action="store_true",
                        help="show progress until it ends, then download the results")
    submit.add_argument("--output", default=None,
                        help="with --wait: where the output file goes (default: FILE's name "
                             "with .output.jsonl; errors beside it with .errors.jsonl)")
    submit.add_argument("--poll", type=float, default=1.0, help="seconds between polls")
    add_client_args(submit)
    submit.set_defaults(func=_submit)

    status = bsub.add_parser("status", help="show a batch")
    status.add_argument("batch_id")
    add_client_args(status)
    status.set_defaults(func=_status)

    cancel = bsub.add_parser("cancel", help="cancel a batch (finished lines are kept)")
    cancel.add_argument("batch_id")
    add_client_args(cancel)
    cancel.set_defaults(func=_cancel)


def _call(args, method: str, path: str, **kwargs):
    return call_server(args, method, path, headers={"user-agent": USER_AGENT}, timeout=300,
                       **kwargs)


def _submit(args) -> int:
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        print(f"k2serve: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    file = _call(args, "POST", "/v1/files/upload",
                 files={"file": (path.name, data, "application/jsonl")},
                 data={"purpose": "batch-api", "file_name": path.name}).json()
    batch = _call(args, "POST", "/v1/batches",
                  json={"input_file_id": file["id"], "endpoint": args.endpoint,
                        "completion_window": args.window}).json()
    if not args.wait:
        print(json.dumps(batch, indent=2) if args.json else batch["id"])
        return 0
    print(f"k2serve: batch {batch['id']} ({batch['request_counts']['total'] or '?'} lines "
          f"of {path.name} to {args.endpoint})", file=sys.stderr)
    try:
        batch = _wait(args, batch)
    except KeyboardInterrupt:
        print(f"\nk2serve: stopped waiting; the batch goes on (k2serve batch status "
              f"{batch['id']})", file=sys.stderr)
        return 130
    output = Path(args.output) if args.output else path.with_suffix(".output.jsonl")
    errors = output.with_name(output.name.replace(".output", "").removesuffix(".jsonl")
                              + ".errors.jsonl")
    for file_id, target in ((batch.get("output_file_id"), output),
                            (batch.get("error_file_id"), errors)):
        if file_id:
            target.write_bytes(_call(args, "GET", f"/v1/files/{file_id}/content").content)
            print(f"k2serve: wrote {target}", file=sys.stderr)
    if args.json:
        print(json.dumps(batch, indent=2))
    else:
        counts = batch["request_counts"]
        print(f"{batch['id']} {batch['status']}: {counts['completed']} completed, "
              f"{counts['failed']} failed of {counts['total']}")
    return 0 if batch["status"] == "completed" else 1


def _wait(args, batch: dict) -> dict:
    bar = ProgressBar(sys.stderr)
    started = time.monotonic()
    while True:
        bar.show(batch, time.monotonic() - started)
        if batch["status"] in FINAL:
            bar.close()
            return batch
        time.sleep(args.poll)
        batch = _call(args, "GET", f"/v1/batches/{batch['id']}").json()


class ProgressBar:
    """One line, rewritten in place on a terminal; elsewhere (a log) a line per 10%."""

    def __init__(self, stream):
        self.stream = stream
        self.tty = stream.isatty()
        self._last_tenth = -1

    def show(self, batch: dict, elapsed: float) -> None:
        counts = batch["request_counts"]
        total, done = counts["total"], counts["completed"] + counts["failed"]
        share = done / total if total else 0.0
        filled = int(share * BAR_WIDTH)
        rate = done / elapsed * 60 if elapsed > 0 else 0.0
        line = (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total or '?'} "
                f"({share:.0%}) {counts['failed']} failed, {rate:.0f} lines/min, "
                f"{batch['status']}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        elif int(share * 10) != self._last_tenth or batch["status"] in FINAL:
            self._last_tenth = int(share * 10)
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _status(args) -> int:
    batch = _call(args, "GET", f"/v1/batches/{args.batch_id}").json()
    _print(args, batch)
    return 0


def _cancel(args) -> int:
    batch = _call(args, "POST", f"/v1/batches/{args.batch_id}/cancel").json()
    _print(args, batch)
    return 0


def _print(args, batch: dict) -> None:
    if args.json:
        print(json.dumps(batch, indent=2))
        return
    counts = batch["request_counts"]
    print(f"{batch['id']}  {batch['status']}")
    print(f"  endpoint: {batch['endpoint']}")
    print(f"  lines: {counts['completed']} completed, {counts['failed']} failed of "
          f"{counts['total']}")
    for key in ("output_file_id", "error_file_id"):
        if batch.get(key):
            print(f"  {key}: {batch[key]}")
    if batch.get("errors"):
        print(f"  error: {batch['errors']['data'][0]['message']}")
