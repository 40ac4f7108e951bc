"""One replica of a dedicated endpoint: the class Ray Serve runs in each replica actor.

A replica holds a GenerationBackend and streams its TextDeltas to the k2serve front
(k2serve.serving.ray_backend) through a Serve deployment handle:
- engine `k2serve`: our own engine, in this actor (CPU), loaded like `k2serve serve --model`;
- engine `vllm`: one vLLM OpenAI server process per replica, started by this actor on its
  node with the GPUs Ray gave it (CUDA_VISIBLE_DEVICES), fronted by an UpstreamBackend on
  loopback. The replica and its vLLM live and die together: the actor's death (even by
  SIGKILL) stops vLLM (a sentinel process watches it), and vLLM's death ends the actor, so
  that Serve replaces it and the front retries what it was serving.

Prompts arrive as token ids (the front renders and counts them); a grammar arrives as its
Lark source: our engine compiles it here, for this replica's tokenizer; vLLM gets the text
(its `guidance` structured-outputs backend enforces it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator

from k2serve.engine.sampling_params import SamplingParams
from k2serve.serving.backend import TextDelta
from k2serve.serving.dedicated_config import DedicatedModel

VLLM_START_TIMEOUT_S = 1800.0  # K2's 1 TB of weights load in minutes, not seconds
VLLM_EXIT_WAIT_S = 3.0


@dataclasses.dataclass(frozen=True)
class GrammarSource:
    """A grammar an upstream engine enforces itself: only its Lark text is sent."""

    source: str


class EndpointReplica:
    def __init__(self, model: DedicatedModel, num_cpus: float = 1.0):
        self.model = model
        self._vllm: subprocess.Popen | None = None
        self._sentinel: subprocess.Popen | None = None  # stops vLLM when this actor ends
        self._serving = False  # vLLM answered its health check
        self._stopping = False  # Serve is shutting the replica down
        self._log_path = ""
        if model.engine == "vllm":
            self.backend = self._start_vllm(model)
        else:
            import torch

            from k2serve.serving.loader import LoadOptions, load_text_model

            torch.set_num_threads(max(1, int(num_cpus)))
            options = LoadOptions(model_path=model.path, served_model_name=model.id,
                                  max_context_length=model.context_length, progress=False)
            if model.max_num_seqs:
                options.max_num_seqs = model.max_num_seqs
            _, self.backend = load_text_model(options)

    # -- what the front calls -------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       grammar_source: str | None, stop: list[str]) -> AsyncIterator[TextDelta]:
        if grammar_source is not None and self._vllm is not None:  # vLLM enforces it
            params = dataclasses.replace(params, grammar=GrammarSource(grammar_source))
        elif grammar_source is not None:
            from k2serve.structured import compiler_for

            compiler = compiler_for(self.backend.tokenizer)
            grammar = await asyncio.to_thread(compiler.compile, grammar_source)
            params = dataclasses.replace(params, grammar=grammar)
        reservation = self.backend.reserve(1)
        try:
            async for delta in self.backend.generate(prompt_ids, params, stop, reservation):
                yield delta
        except Exception as exc:
            if getattr(exc, "status", 500) >= 500 and await asyncio.to_thread(self._vllm_died):
                self._engine_lost("vLLM died while serving a request")
            raise
        finally:
            reservation.release()

    def pid(self) -> int:
        """The process the replica runs in (tests kill it)."""
        return os.getpid()

    def check_health(self) -> None:
        """Serve's health check: raising marks the replica unhealthy and replaces it."""
        if self._vllm is not None:  # its own health: the process (a 5xx is one request's)
            if self._vllm.poll() is not None:
                raise RuntimeError(f"the replica's vLLM exited ({self._vllm.returncode})")
        elif not self.backend.healthy():
            raise RuntimeError("the replica's engine has stopped")

    def __del__(self):
        """Serve's graceful shutdown (stop, delete, scale down): vLLM and its engine
        processes go first."""
        if self._vllm is not None:
            self._stopping = True
            _stop_group(self._vllm)
        if self._sentinel is not None:
            self._sentinel.stdin.close()  # nothing left for it to stop: it exits

    # -- a vLLM process per replica -----------------------------------------------------------
    def _start_vllm(self, model: DedicatedModel):
        import httpx

        from k2serve.serving.upstream_loader import load_upstream_model

        port = _free_port()
        python = os.environ.get("K2SERVE_VLLM_PYTHON", sys.executable)
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model.path,
               "--served-model-name", model.id, "--host", "127.0.0.1", "--port", str(port),
               *model.vllm_args]
        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it placed this replica on. A replica over
        # several nodes runs vLLM's Ray executor, which joins this cluster for its GPUs.
        env = dict(os.environ)
        if python != sys.executable:
            env.pop("PYTHONPATH", None)  # vLLM's own venv, not this process's paths
        if "ray" in model.vllm_args:
            import ray

            env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        self._log_path = os.path.join(tempfile.gettempdir(),
                                      f"k2serve-vllm-{os.getpid()}-{port}.log")
        with open(self._log_path, "ab") as log_file:
            self._vllm = subprocess.Popen(cmd, env=env, stdout=log_file,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self._sentinel = _start_sentinel(self._vllm.pid)
        threading.Thread(target=self._watch_vllm, daemon=True, name="vllm-watchdog").start()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + VLLM_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._vllm.poll() is not None:
                _stop_group(self._vllm, grace_s=0)  # any engine process it left
                raise RuntimeError(f"vLLM exited during start-up ({self._vllm.returncode}): "
                                   f"{' '.join(cmd)}\n{_tail(self._log_path)}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            _stop_group(self._vllm)
            raise RuntimeError(f"vLLM did not start within {VLLM_START_TIMEOUT_S:.0f} s")
        _, backend = load_upstream_model(model.id, [base + "/v1"], model.tokenizer or model.path,
                                         context_length=model.context_length)
        self._serving = True
        return backend

    def _watch_vllm(self) -> None:
        code = self._vllm.wait()
        if self._serving and not self._stopping:
            self._engine_lost(f"vLLM exited ({code})")

    def _vllm_died(self) -> bool:
        """After a failed request: whether vLLM has exited (a crash closes its sockets just
        before the process is reaped, hence the short wait)."""
        if self._vllm is None:
            return False
        try:
            self._vllm.wait(timeout=VLLM_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _engine_lost(self, why: str) -> None:
        """This replica cannot serve without its vLLM: it ends itself, as if killed, so
        Serve replaces it and the front sends its requests in flight once more (to a live
        replica: Serve's router drops one whose actor died)."""
        print(f"k2serve replica: {why}; the replica exits (vLLM log: {self._log_path})",
              file=sys.stderr, flush=True)
        _stop_group(self._vllm, grace_s=0)
        os._exit(1)


# A process of its own that outlives the replica's actor: when the actor ends, however (a
# SIGKILL runs no cleanup in it), the pipe from it closes and this stops vLLM's process
# group: SIGTERM (vLLM stops its engine processes; a SIGKILL to its API server alone would
# orphan them), then SIGKILL to what is left.
_SENTINEL = """
import os, signal, sys, time
pgid = int(sys.argv[1])
sys.stdin.buffer.read()
for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        break
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            sys.exit()
        time.sleep(0.2)
"""


def _start_sentinel(pgid: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-I", "-c", _SENTINEL, str(pgid)],
                            stdin=subprocess.PIPE, start_new_session=True)


def _stop_group(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to vLLM's process group (the API server, its engine core and workers), then
    SIGKILL to what is left after grace_s."""
    if grace_s:
        _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(process.pid):
            time.sleep(0.2)
    _signal_group(process.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
