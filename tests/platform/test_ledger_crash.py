"""No lost usage when the server dies: a real `k2serve serve` is killed with SIGKILL while 50
streams run, then started again on the same database. Every request that got a 200 has a
row; rows of the killed requests are closed as `interrupted`, billed for the tokens they
recorded; and per key, the billed completion tokens are at least what the clients received
minus what they received in the last flush interval before the kill."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections import defaultdict

import httpx

from k2serve.api.usage import PROGRESS_S
from k2serve.platform.db import Database
from k2serve.platform.keys import KeyStore
from k2serve.platform.ledger import LedgerWriter, ledger_rows, usage_totals
from tests.conftest import EMBEDDED_ID, start_server, stop_server

STREAMS = 50
KEYS = ("crash-a", "crash-b", "crash-c")
# What a commit may trail the client by: one progress interval, plus the write itself (on a
# busy shared machine the writer thread may wait a moment for the GIL and the disk).
ALLOWANCE_S = PROGRESS_S + 1.0


async def _stream(client, i, key, received, statuses):
    body = {"model": EMBEDDED_ID, "prompt": f"Story {i}: once upon a time", "stream": True,
            "max_tokens": 400, "ignore_eos": True, "temperature": 0.7, "seed": i,
            "logprobs": 0}  # each chunk lists its tokens: an exact client-side count
    try:
        async with client.stream("POST", "/v1/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}",
                                          "x-request-id": f"crash-{i}"}) as r:
            statuses[i] = r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    tokens = len((choice.get("logprobs") or {}).get("tokens") or [])
                    received[i].append((time.time(), tokens))
    except httpx.HTTPError:
        pass  # the server died


def test_sigkill_during_50_streams_loses_no_delivered_usage():
    t0 = time.time()
    home = tempfile.mkdtemp(prefix="k2serve-crash-")
    url = f"sqlite:///{home}/k2serve.db"
    args = ("--threads", "1", "--max-num-seqs", "64")
    server = start_server(*args, env={"K2SERVE_HOME": home})
    restarted = None
    try:
        db = Database(url, migrate=False)
        keys = [KeyStore(db).create(name)[1] for name in KEYS]
        db.close()
        received: dict[int, list] = defaultdict(list)
        statuses: dict[int, int] = {}

        async def run() -> float:
            async with httpx.AsyncClient(base_url=server.root, timeout=120,
                                         limits=httpx.Limits(max_connections=STREAMS)) as c:
                tasks = [asyncio.create_task(_stream(c, i, keys[i % len(keys)], received,
                                                     statuses)) for i in range(STREAMS)]
                # Kill when (nearly) every stream is under way, has received a few tokens
                # and has run past a progress flush (the machine may be slow: count, too).
                deadline = time.time() + 90
                first = None
                while time.time() < deadline:
                    counts = sorted(sum(n for _, n in received[i]) for i in range(STREAMS))
                    if counts[-1] and first is None:
                        first = time.time()
                    if (counts[5] >= 4 and first is not None
                            and time.time() - first > 2 * PROGRESS_S):
                        break
                    await asyncio.sleep(0.05)
                killed_at = time.time()
                server.process.kill()  # SIGKILL
                server.process.wait(10)
                await asyncio.gather(*tasks)
                return killed_at

        started = time.time()
        killed_at = asyncio.run(run())
        ok = [i for i in range(STREAMS) if statuses.get(i) == 200]
        assert len(ok) >= STREAMS - 5, statuses
        got = {i: sum(n for _, n in received[i]) for i in ok}
        recent = {i: sum(n for t, n in received[i] if t > killed_at - ALLOWANCE_S) for i in ok}
        assert sum(got.values()) >= 3 * STREAMS  # the streams were well under way

        restart = time.time()
        restarted = start_server(*args, env={"K2SERVE_HOME": home})
        up = time.time()
        db = Database(url, migrate=False)
        try:  # the new server closes the dead one's rows once they are clearly abandoned
            deadline = time.time() + LedgerWriter.STALE_S + 3 * LedgerWriter.SWEEP_S
            while True:
                listed = ledger_rows(db)
                rows = {r.request_id: r for r in listed}
                if all(r.status != "in_progress" for r in rows.values()):
                    break
                assert time.time() < deadline, [r.status for r in rows.values()]
                time.sleep(0.5)
            totals = {k["key"]: k for k in usage_totals(db)["keys"]}
            key_of = {k.id: k.name for k in KeyStore(db).list()}
        finally:
            db.close()

        # Every request that got a 200 has its row; the killed ones are interrupted.
        assert {f"crash-{i}" for i in ok} <= set(rows)
        assert set(rows) <= {f"crash-{i}" for i in range(STREAMS)}
        assert len(listed) == len(rows)  # one row per request, never two
        assert {r.status for r in rows.values()} <= {"interrupted", "ok"}
        assert sum(r.status == "interrupted" for r in rows.values()) >= STREAMS // 2
        for i in ok:
            row = rows[f"crash-{i}"]
            assert row.billed and row.prompt_tokens > 0
            assert row.completion_tokens >= got[i] - recent[i], (i, row.completion_tokens,
                                                                  got[i], recent[i])
        # Per key, from the totals `k2serve usage` and /admin/usage report.
        for name in KEYS:
            mine = [i for i in ok if keys[i % len(keys)] == keys[KEYS.index(name)]]
            billed = totals[name]["completion_tokens"]
            assert billed >= sum(got[i] - recent[i] for i in mine), name
            assert billed == sum(r.completion_tokens for r in rows.values()
                                 if r.billed and key_of[r.api_key_id] == name)
        lost = sum(got.values()) - sum(r.completion_tokens for r in rows.values())
        print(f"\ndelivered {sum(got.values())} tokens to {len(ok)} streams; billed "
              f"{sum(r.completion_tokens for r in rows.values())}; "
              f"unbilled {max(lost, 0)} (allowed {sum(recent.values())}); start "
              f"{started - t0:.0f} s, streams {killed_at - started:.0f} s, restart "
              f"{up - restart:.0f} s, rows closed after {time.time() - up:.0f} s")
    finally:
        for s in (server, restarted):
            if s is not None and s.process.poll() is None:
                stop_server(s)
        shutil.rmtree(home, ignore_errors=True)
