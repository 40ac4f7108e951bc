"""The sentinel that stops a replica's vLLM when the replica's actor ends, however it ends
(k2serve.serving.ray_replica): here a stand-in actor process starts a process group (as
vLLM's API server with its engine processes) and the sentinel, then is killed by SIGKILL.
Without Ray or vLLM; the real thing: tests/integration/test_ray_vllm_endpoints.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

ACTOR = textwrap.dedent("""
    import subprocess, sys, time
    from k2serve.serving.ray_replica import _start_sentinel
    # a "vLLM": a parent and a child in a session of their own
    group = subprocess.Popen(["sh", "-c", "sleep 300 & wait"], start_new_session=True)
    sentinel = _start_sentinel(group.pid)
    print(group.pid, flush=True)
    time.sleep(300)
""")


def members(pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True)
    return [int(pid) for pid, group, stat in (line.split() for line in out.stdout.splitlines())
            if int(group) == pgid and not stat.startswith("Z")]


def test_a_sigkilled_actor_takes_its_process_group_with_it():
    actor = subprocess.Popen([sys.executable, "-c", ACTOR], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    pgid = int(actor.stdout.readline())
    try:
        assert len(members(pgid)) == 2  # sh and its sleep
        actor.send_signal(signal.SIGKILL)  # no cleanup runs in the actor
        actor.wait(timeout=10)
        deadline = time.time() + 10
        while members(pgid) and time.time() < deadline:
            time.sleep(0.1)
        assert members(pgid) == [], "the group outlived its actor"
    finally:
        actor.kill()
        for pid in members(pgid):
            os.kill(pid, signal.SIGKILL)
