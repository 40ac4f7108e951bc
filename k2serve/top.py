"""`k2serve top`: a live terminal view of a server's /metrics — requests, tokens/s, KV-cache
use, queues, per-key usage — refreshed every few seconds (`--once`: one frame, then exit).

Rates are the difference of two scrapes over the time between them; nothing is kept on the
server for this view.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]


@dataclass
class Scrape:
    at: float
    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)

    def series(self, name: str) -> dict[Labels, float]:
        return self.samples.get(name, {})

    def total(self, name: str, **match: str) -> float:
        return sum(v for labels, v in self.series(name).items()
                   if all(dict(labels).get(k) == want for k, want in match.items()))

    def by(self, name: str, label: str, **match: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for labels, value in self.series(name).items():
            d = dict(labels)
            if all(d.get(k) == want for k, want in match.items()):
                out[d.get(label, "")] += value
        return out


def parse(text: str, at: float) -> Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    scrape = Scrape(at)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            scrape.samples.setdefault(sample.name, {})[labels] = sample.value
    return scrape


class ScrapeError(Exception):
    pass


def fetch(client, url: str) -> Scrape:
    import httpx

    try:
        response = client.get(url.rstrip("/") + "/metrics")
    except httpx.HTTPError as exc:
        raise ScrapeError(f"cannot reach {url}: {exc}") from None
    if response.status_code in (401, 403):
        raise ScrapeError(f"{url}/metrics answered {response.status_code}: it needs an admin "
                          f"key (--api-key or $K2SERVE_API_KEY)")
    if response.status_code != 200:
        raise ScrapeError(f"{url}/metrics answered {response.status_code}")
    return parse(response.text, time.monotonic())


def _rate(now: Scrape, before: Scrape | None, name: str, **match: str) -> float | None:
    if before is None or now.at <= before.at:
        return None
    return max(0.0, now.total(name, **match) - before.total(name, **match)) / (now.at - before.at)


def _rates_by(now: Scrape, before: Scrape | None, name: str, label: str) -> dict[str, float]:
    if before is None or now.at <= before.at:
        return {}
    then = before.by(name, label)
    return {k: max(0.0, v - then.get(k, 0.0)) / (now.at - before.at)
            for k, v in now.by(name, label).items()}


def _mean(now: Scrape, name: str, model: str) -> float | None:
    count = now.by(f"{name}_count", "model_name").get(model, 0.0)
    return now.by(f"{name}_sum", "model_name").get(model, 0.0) / count if count else None


def _fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def render(now: Scrape, before: Scrape | None, url: str):
    """One frame: a rich renderable."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    served = set(now.by("k2serve:model_load_state", "model_name"))
    http_rate = _rate(now, before, "k2serve:http_requests_total")
    scrapes = _rate(now, before, "k2serve:http_requests_total", endpoint="/metrics") or 0.0
    header = Text.assemble(
        ("k2serve top ", "bold"), (url, "cyan"),
        f"   requests {now.total('k2serve:http_requests_total') - now.total('k2serve:http_requests_total', endpoint='/metrics'):.0f}",
        f" ({_fmt(None if http_rate is None else http_rate - scrapes, '.2f')}/s)",
        f"   429s {now.total('k2serve:rate_limited_requests_total'):.0f}",
        f"   batches running {now.total('k2serve:batches_running'):.0f}",
        f"   ledger backlog {now.total('k2serve:ledger_pending_writes'):.0f}")

    models = Table(title="models", expand=True)
    for column in ("model", "state", "running", "waiting", "KV used", "prefix hits",
                   "prompt tok/s", "gen tok/s", "TTFT avg", "ITL avg", "requests"):
        models.add_column(column, justify="left" if column in ("model", "state") else "right",
                          no_wrap=column == "model")
    prompt_rates = _rates_by(now, before, "k2serve:prompt_tokens_total", "model_name")
    gen_rates = _rates_by(now, before, "k2serve:generation_tokens_total", "model_name")
    states = now.series("k2serve:model_load_state")
    for model in sorted(served):
        state = next((dict(labels)["state"] for labels, v in states.items()
                      if dict(labels).get("model_name") == model and v == 1.0), "?")
        running = now.by("k2serve:num_requests_running", "model_name").get(model)
        waiting = now.by("k2serve:num_requests_waiting", "model_name").get(model)
        kv = now.by("k2serve:kv_cache_usage_perc", "model_name").get(model)
        queries = now.by("k2serve:prefix_cache_queries_total", "model_name").get(model)
        hits = now.by("k2serve:prefix_cache_hits_total", "model_name").get(model, 0.0)
        ttft = _mean(now, "k2serve:time_to_first_token_seconds", model)
        itl = _mean(now, "k2serve:inter_token_latency_seconds", model)
        done = now.by("k2serve:request_success_total", "model_name").get(model, 0.0)
        models.add_row(model, state, _fmt(running, ".0f"), _fmt(waiting, ".0f"),
                       _fmt(None if kv is None else kv * 100, ".1f", "%"),
                       _fmt(hits / queries * 100 if queries else None, ".1f", "%"),
                       _fmt(prompt_rates.get(model), ".1f"), _fmt(gen_rates.get(model), ".1f"),
                       _fmt(None if ttft is None else ttft * 1000, ".0f", " ms"),
                       _fmt(None if itl is None else itl * 1000, ".1f", " ms"),
                       f"{done:.0f}")
    parts = [header, models]

    keys = sorted(set(now.by("k2serve:key_requests_total", "key"))
                  | set(now.by("k2serve:key_rate_limit", "key")))
    if keys:
        table = Table(title="API keys", expand=True)
        for column in ("key", "req/min", "RPM limit", "tokens/min", "TPM limit", "429s",
                       "requests", "tokens"):
            table.add_column(column, justify="left" if column == "key" else "right")
        rpm = _rates_by(now, before, "k2serve:key_requests_total", "key")
        tpm = _rates_by(now, before, "k2serve:key_tokens_total", "key")
        refused = now.by("k2serve:rate_limited_requests_total", "key")
        for key in keys:
            limit_rpm = now.by("k2serve:key_rate_limit", "key", kind="rpm").get(key)
            limit_tpm = now.by("k2serve:key_rate_limit", "key", kind="tpm").get(key)
            table.add_row(key, _fmt(None if key not in rpm else rpm[key] * 60, ".1f"),
                          _fmt(limit_rpm, ".0f"),
                          _fmt(None if key not in tpm else tpm[key] * 60, ".0f"),
                          _fmt(limit_tpm, ".0f"), f"{refused.get(key, 0.0):.0f}",
                          f"{now.by('k2serve:key_requests_total', 'key').get(key, 0.0):.0f}",
                          f"{now.by('k2serve:key_tokens_total', 'key').get(key, 0.0):.0f}")
        parts.append(table)

    replicas = now.series("k2serve:upstream_replica_up")
    if replicas:
        table = Table(title="upstream replicas", expand=True)
        for column in ("model", "replica", "up", "in flight", "failures"):
            table.add_column(column)
        busy = now.series("k2serve:upstream_replica_in_flight")
        failures = now.series("k2serve:upstream_failures_total")
        for labels, up in sorted(replicas.items()):
            d = dict(labels)
            table.add_row(d["model_name"], d["replica"], "up" if up else "DOWN",
                          _fmt(busy.get(labels), ".0f"), _fmt(failures.get(labels, 0.0), ".0f"))
        parts.append(table)
    return Group(*parts)


def _top(args: argparse.Namespace) -> int:
    import httpx
    from rich.console import Console
    from rich.live import Live

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # Not a terminal (a pipe, a test): wide enough for model ids.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    with httpx.Client(headers=headers, timeout=10) as client:
        try:
            before = fetch(client, args.url)
            if args.once:  # two scrapes, for the rates
                time.sleep(min(args.interval, 1.0))
                console.print(render(fetch(client, args.url), before, args.url))
                return 0
            with Live(render(before, None, args.url), console=console,
                      refresh_per_second=4, screen=False) as live:
                while True:
                    time.sleep(args.interval)
                    now = fetch(client, args.url)
                    live.update(render(now, before, args.url))
                    before = now
        except ScrapeError as exc:
            print(f"k2serve top: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0


def add_top_parser(sub) -> None:
    top = sub.add_parser("top", help="a live terminal view of a server's metrics (/metrics)")
    top.add_argument("--url", default=os.environ.get("K2SERVE_URL", "http://127.0.0.1:8000"),
                     help="the server (default: $K2SERVE_URL, else http://127.0.0.1:8000)")
    top.add_argument("--api-key", default=os.environ.get("K2SERVE_API_KEY"),
                     help="an admin key, when the server has keys (default: $K2SERVE_API_KEY)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true",
                     help="print one frame (two scrapes up to a second apart) and exit")
    top.set_defaults(func=_top)
