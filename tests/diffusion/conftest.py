"""One `k2serve serve` with tiny random Stable Diffusion and FLUX.1 pipelines (--image-model)
and a tiny LTX-Video pipeline (--video-model), no chat model, and an API key, so the ledger
rows its requests leave can be read back."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, start_server, stop_server

pytest.importorskip("diffusers")

IMAGE_MODEL = "tiny-stable-diffusion"  # --image-model ID=DIR
# The FLUX directory is named like a catalog id's last part: it is served under that id,
# at that id's catalog price.
FLUX_MODEL = "black-forest-labs/FLUX.1-schnell"
VIDEO_MODEL = "tiny-ltx-video"
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "K2SERVE_IMAGE_MIN_SIDE": "32",
       "K2SERVE_IMAGE_MAX_WAITING": "1",
       # A video request without sizes (the seed's) gets a tiny one, not LTX's 704x480x161.
       "K2SERVE_VIDEO_DEFAULT_WIDTH": "32", "K2SERVE_VIDEO_DEFAULT_HEIGHT": "32",
       "K2SERVE_VIDEO_DEFAULT_FRAMES": "9", "K2SERVE_VIDEO_DEFAULT_STEPS": "2",
       # Input images by http(s) from the tests' loopback server only.
       "K2SERVE_MEDIA_HTTP": "1", "K2SERVE_MEDIA_ALLOWED_DOMAINS": "127.0.0.1",
       "K2SERVE_MEDIA_ALLOWED_NETWORKS": "127.0.0.0/8"}


@dataclass
class DiffusionStack:
    server: LiveServer
    home: str
    image_dir: Path
    flux_dir: Path
    video_dir: Path
    key: str
    key_id: str
    tpm_key: str  # 1000 tokens (images + kilopixel-steps) per minute
    output: list[str] = field(default_factory=list)  # the server's log lines

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.home}/k2serve.db"

    def restart(self, **env) -> None:
        stop_server(self.server)
        self.server = _start(self, env)


def _start(stack: DiffusionStack, env: dict | None = None) -> LiveServer:
    return start_server("--families=", "--threads", "1", "--log-level", "info",
                        "--image-model", f"{IMAGE_MODEL}={stack.image_dir}",
                        "--image-model", str(stack.flux_dir),
                        "--video-model", str(stack.video_dir),
                        "--video-model-name", VIDEO_MODEL,
                        env={"K2SERVE_HOME": stack.home, **ENV, **(env or {})},
                        output=stack.output)


@pytest.fixture(scope="session")
def pipelines_dir(tmp_path_factory):
    import torch

    from tests.diffusion.tiny_pipelines import flux, ltx_video, stable_diffusion

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pipelines")
    stable_diffusion(root / "tiny-sd")
    flux(root / "FLUX.1-schnell")
    ltx_video(root / "tiny-ltx")
    torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="session")
def diffusion_stack(pipelines_dir):
    from k2serve.platform.db import Database
    from k2serve.platform.keys import KeyStore

    home = tempfile.mkdtemp(prefix="k2serve-diffusion-")
    db = Database(f"sqlite:///{home}/k2serve.db")
    try:
        store = KeyStore(db)
        info, key = store.create("diffusion-tests")
        _, tpm_key = store.create("tpm-1000", tpm=1000)
    finally:
        db.close()
    stack = DiffusionStack(None, home, pipelines_dir / "tiny-sd",
                           pipelines_dir / "FLUX.1-schnell", pipelines_dir / "tiny-ltx", key,
                           info.id, tpm_key)
    stack.server = _start(stack)
    yield stack
    stop_server(stack.server)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture()
def http(diffusion_stack):
    with httpx.Client(base_url=diffusion_stack.server.root, timeout=120,
                      headers={"Authorization": f"Bearer {diffusion_stack.key}"}) as client:
        yield client


def ledger_row(stack: DiffusionStack, request_id: str, timeout: float = 15.0):
    from k2serve.platform.db import Database
    from k2serve.platform.ledger import ledger_rows

    deadline = time.time() + timeout
    while time.time() < deadline:
        db = Database(stack.db_url, migrate=False)
        try:
            rows = [r for r in ledger_rows(db, key_id=stack.key_id)
                    if r.request_id == request_id]
        finally:
            db.close()
        if rows and all(r.status != "in_progress" for r in rows):
            return rows
        time.sleep(0.2)
    raise AssertionError(f"no settled ledger row for request {request_id}")
