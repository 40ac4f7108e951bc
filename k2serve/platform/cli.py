"""`k2serve keys ...` and `k2serve usage`: the same database as the server (see db.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone


def add_database_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="where the SQLite database lives (default: $K2SERVE_HOME, else "
                             "~/.k2serve)")
    parser.add_argument("--database-url", default=None,
                        help="a SQLAlchemy URL, e.g. postgresql://user:pass@host/db "
                             "(default: $K2SERVE_DATABASE_URL, else the SQLite file)")
    if not any(a.dest == "log_level" for a in parser._actions):
        parser.add_argument("--log-level", default="warning")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _budget(text: str) -> float:
    value = float(text.lstrip("$"))
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def add_platform_parsers(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke API keys",
                          description="API keys of this server's database. A key is shown "
                                      "once, when it is made; only its SHA-256 is stored.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)

    create = keys_sub.add_parser("create", help="make a key; prints it once, as the last line")
    create.add_argument("--name", required=True, help="a unique name (never reused)")
    create.add_argument("--rpm", type=_positive_int, default=None, help="requests per minute")
    create.add_argument("--tpm", type=_positive_int, default=None,
                        help="tokens per minute (prompt + max_tokens reserved up front)")
    create.add_argument("--models", default=None,
                        help="comma-separated model ids this key may use (default: all)")
    create.add_argument("--budget", type=_budget, default=None,
                        help="USD this key may spend; past it requests get 429 "
                             "insufficient_quota")
    create.add_argument("--admin", action="store_true",
                        help="may read GET /admin/usage")
    add_database_args(create)
    create.set_defaults(func=_keys_create)

    listing = keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--json", action="store_true")
    add_database_args(listing)
    listing.set_defaults(func=_keys_list)

    revoke = keys_sub.add_parser("revoke", help="revoke a key by name (takes effect at once)")
    revoke.add_argument("name")
    add_database_args(revoke)
    revoke.set_defaults(func=_keys_revoke)

    usage = sub.add_parser("usage", help="usage totals per key from the ledger",
                           description="Billed tokens and cost per key (a retried request "
                                       "counts once; see README).")
    usage.add_argument("--key", default=None, help="one key, by name")
    usage.add_argument("--since", default=None,
                       help="ISO date/time (UTC unless it says otherwise), Unix time, or a "
                            "duration back from now: 30m, 24h, 7d")
    usage.add_argument("--json", action="store_true",
                       help="print what GET /admin/usage returns")
    add_database_args(usage)
    usage.set_defaults(func=_usage)


def _open(args):
    from k2serve.platform.db import open_database

    try:
        return open_database(database_url_arg=args.database_url, data_dir_arg=args.data_dir)
    except Exception as exc:
        print(f"k2serve: cannot open the database: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _keys_create(args) -> int:
    from k2serve.platform.keys import KeyAdminError, KeyStore

    db = _open(args)
    try:
        models = args.models.split(",") if args.models is not None else None
        info, key = KeyStore(db).create(args.name, rpm=args.rpm, tpm=args.tpm, models=models,
                                        budget_usd=args.budget, admin=args.admin)
    except KeyAdminError as exc:
        print(f"k2serve: {exc}", file=sys.stderr)
        return 2
    finally:
        db.close()
    parts = []
    if info.rpm_limit is not None:
        parts.append(f"rpm {info.rpm_limit}")
    if info.tpm_limit is not None:
        parts.append(f"tpm {info.tpm_limit}")
    if info.budget_usd is not None:
        parts.append(f"budget ${info.budget_usd:g}")
    limits = ", ".join(parts) or "no limits"
    models_text = ", ".join(info.allowed_models) if info.allowed_models else "all models"
    print(f"Created {'admin ' if info.is_admin else ''}key '{info.name}' (id {info.id}; "
          f"{limits}; {models_text}).")
    print("Save it now: it is not stored and cannot be shown again.")
    print(key)
    return 0


def _keys_list(args) -> int:
    from k2serve.platform.keys import KeyStore

    db = _open(args)
    try:
        keys = KeyStore(db).list()
    finally:
        db.close()
    if args.json:
        print(json.dumps([k.as_dict() for k in keys], indent=2))
        return 0
    if not keys:
        print("No keys. Make one with `k2serve keys create --name NAME`.")
        return 0
    rows = [("NAME", "KEY", "STATUS", "RPM", "TPM", "MODELS", "BUDGET", "SPENT", "CREATED",
             "LAST USED")]
    for k in keys:
        rows.append((k.name + (" (admin)" if k.is_admin else ""), k.prefix,
                     "revoked" if k.revoked else "active",
                     str(k.rpm_limit or "-"), str(k.tpm_limit or "-"),
                     ",".join(k.allowed_models) if k.allowed_models else "all",
                     f"${k.budget_usd:.4f}" if k.budget_usd is not None else "-",
                     f"${k.spent_usd:.6f}", _when(k.created_at), _when(k.last_used_at)))
    print_table(rows)
    return 0


def _keys_revoke(args) -> int:
    from k2serve.platform.keys import KeyAdminError, KeyStore

    db = _open(args)
    try:
        info = KeyStore(db).revoke(args.name)
    except KeyAdminError as exc:
        print(f"k2serve: {exc}", file=sys.stderr)
        return 2
    finally:
        db.close()
    print(f"Revoked key '{info.name}' ({info.prefix}) at {_when(info.revoked_at)}.")
    return 0


def _usage(args) -> int:
    from k2serve.platform.endpoint_billing import endpoint_usage_totals
    from k2serve.platform.ledger import usage_totals
    from k2serve.platform.timeparse import parse_since

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(f"k2serve: {exc}", file=sys.stderr)
        return 2
    db = _open(args)
    try:
        totals = usage_totals(db, key_name=args.key, since=since)
        totals["dedicated"] = endpoint_usage_totals(db, key_name=args.key, since=since)
    except LookupError as exc:
        print(f"k2serve: {exc.args[0]}", file=sys.stderr)
        return 2
    finally:
        db.close()
    if args.json:
        print(json.dumps(totals, indent=2))
        return 0
    scope = f"since {_when(since)}" if since is not None else "all time"
    print(f"Usage, {scope}, as of {_when(time.time())} (tokens and cost: billed requests):")
    rows = [("KEY", "REQUESTS", "BILLED", "PROMPT", "CACHED", "COMPLETION", "TOTAL", "COST USD",
             "BATCH LINES", "OF WHICH BATCH USD")]
    for k in totals["keys"] + [dict(totals["total"], key="TOTAL")]:
        rows.append((k["key"] or "(no key: open mode)", str(k["requests"]),
                     str(k["billed_requests"]), str(k["prompt_tokens"]),
                     str(k["cached_tokens"]), str(k["completion_tokens"]),
                     str(k["total_tokens"]), f"{k['cost_usd']:.8f}",
                     str(k["batch_requests"]), f"{k['batch_cost_usd']:.8f}"))
    print_table(rows)
    if totals["dedicated"]:
        print("\nDedicated endpoints (replica time at the hardware's price per minute):")
        rows = [("KEY", "ENDPOINT", "HARDWARE", "REPLICA MIN", "COST USD")]
        rows += [(d["key"] or "(no key: open mode)", d["endpoint"], d["hardware"],
                  f"{d['replica_minutes']:.4f}", f"{d['cost_usd']:.8f}")
                 for d in totals["dedicated"]]
        print_table(rows)
    return 0


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows of cells as left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
