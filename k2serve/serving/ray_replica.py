"""One replica of a dedicated endpoint: the class Ray Serve runs in each replica actor.

A replica holds a GenerationBackend and streams its TextDeltas to the k2serve front
(k2serve.serving.ray_backend) through a Serve deployment handle:
- engine `k2serve`: our own engine, in this actor (CPU), loaded like `k2serve serve --model`;
- engine `vllm`: one vLLM OpenAI server process per replica, started by this actor on its
  node with the GPUs Ray gave it (CUDA_VISIBLE_DEVICES), fronted by an UpstreamBackend on
  loopback. The replica's death (actor killed) takes the vLLM process with it.

Prompts arrive as token ids (the front renders and counts them); a grammar arrives as its
Lark source and is compiled here, for this replica's tokenizer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

from k2serve.engine.sampling_params import SamplingParams
from k2serve.serving.backend import TextDelta
from k2serve.serving.dedicated_config import DedicatedModel

VLLM_START_TIMEOUT_S = 1800.0  # K2's 1 TB of weights load in minutes, not seconds


class EndpointReplica:
    def __init__(self, model: DedicatedModel, num_cpus: float = 1.0):
        self.model = model
        self._vllm: subprocess.Popen | None = None
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
        if grammar_source is not None:
            from k2serve.structured import compiler_for

            compiler = compiler_for(self.backend.tokenizer)
            grammar = await asyncio.to_thread(compiler.compile, grammar_source)
            params = dataclasses.replace(params, grammar=grammar)
        reservation = self.backend.reserve(1)
        try:
            async for delta in self.backend.generate(prompt_ids, params, stop, reservation):
                yield delta
        finally:
            reservation.release()

    def pid(self) -> int:
        """The process the replica runs in (tests kill it)."""
        return os.getpid()

    def check_health(self) -> None:
        """Serve's health check: raising marks the replica unhealthy and replaces it."""
        if not self.backend.healthy():
            raise RuntimeError("the replica's engine has stopped")
        if self._vllm is not None and self._vllm.poll() is not None:
            raise RuntimeError(f"the replica's vLLM exited ({self._vllm.returncode})")

    def __del__(self):
        if self._vllm is not None and self._vllm.poll() is None:
            self._vllm.send_signal(signal.SIGTERM)

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
        if "ray" in model.vllm_args:
            import ray

            env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        self._vllm = subprocess.Popen(cmd, env=env, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + VLLM_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._vllm.poll() is not None:
                raise RuntimeError(f"vLLM exited during start-up ({self._vllm.returncode}): "
                                   f"{' '.join(cmd)}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            self._vllm.kill()
            raise RuntimeError(f"vLLM did not start within {VLLM_START_TIMEOUT_S:.0f} s")
        _, backend = load_upstream_model(model.id, [base + "/v1"], model.tokenizer or model.path,
                                         context_length=model.context_length)
        return backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
