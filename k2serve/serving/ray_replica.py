"""One replica of a dedicated endpoint: the class Ray Serve runs in each replica actor.

A replica holds a GenerationBackend and streams its TextDeltas to the k2serve front
(k2serve.serving.ray_backend) through a Serve deployment handle:
- engine `k2serve`: our own engine, in this actor (CPU), loaded like `k2serve serve --model`;
- engine `vllm`: one vLLM OpenAI server process per replica, started by this actor on its
  node with the GPUs Ray gave it (CUDA_VISIBLE_DEVICES), fronted by an UpstreamBackend on
  loopback. The replica and its vLLM live and die together: the actor's death (even by
  SIGKILL) sends vLLM SIGTERM (a parent-death signal), and vLLM's death ends the actor, so
  that Serve replaces it and the front retries what it was serving.

Prompts arrive as token ids (the front renders and counts them); a grammar arrives as its
Lark source: our engine compiles it here, for this replica's tokenizer; vLLM gets the text
(its `guidance` structured-outputs backend enforces it).
"""

from __future__ import annotations

import asyncio
import ctypes
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
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclasses.dataclass(frozen=True)
class GrammarSource:
    """A grammar an upstream engine enforces itself: only its Lark text is sent."""

    source: str


class EndpointReplica:
    def __init__(self, model: DedicatedModel, num_cpus: float = 1.0):
        self.model = model
        self._vllm: subprocess.Popen | None = None
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
        spawned = threading.Event()
        threading.Thread(target=self._own_vllm, args=(cmd, env, spawned), daemon=True,
                         name="vllm-watchdog").start()
        spawned.wait()
        if self._vllm is None:
            raise RuntimeError(f"cannot start vLLM ({' '.join(cmd)}): see {self._log_path}")
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

    def _own_vllm(self, cmd: list[str], env: dict, spawned: threading.Event) -> None:
        """Starts vLLM and waits on it, in a thread of its own that lives as long as vLLM:
        the parent-death signal fires when the thread that forked the child ends, so this
        thread, not a short-lived one, must be its parent."""
        try:
            with open(self._log_path, "ab") as log_file:
                self._vllm = subprocess.Popen(cmd, env=env, stdout=log_file,
                                              stderr=subprocess.STDOUT, start_new_session=True,
                                              preexec_fn=_die_with_parent(os.getpid()))
        finally:
            spawned.set()
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


def _die_with_parent(parent: int):
    """preexec_fn: the child gets SIGTERM when its parent (this replica's actor) dies, even
    by SIGKILL, which runs no cleanup here; vLLM then stops its engine processes."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: only calls after it

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the prctl
            os._exit(1)
    return preexec


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
