"""The FastAPI application: routers, error shapes, middleware."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from k2serve import __version__, native
from k2serve.api.batch_runner import BatchRunner
from k2serve.api.batch_store import FileBlobs, MemoryBatchStore
from k2serve.api.errors import install_error_handlers
from k2serve.api.http_metrics import HttpMetricsMiddleware
from k2serve.api.media_links import MediaFiles
from k2serve.api.middleware import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    BodyLimits,
    BodySizeLimitMiddleware,
    PathAliasMiddleware,
    RequestIdMiddleware,
)
from k2serve.api.request_metrics import observe_usage
from k2serve.api.response_store import MemoryResponseStore
from k2serve.api.routes import (
    audio,
    batches,
    chat,
    completions,
    embeddings,
    files,
    images,
    media,
    messages,
    metrics,
    models,
    moderations,
    playground,
    rerank,
    responses,
    tokenize,
    videos,
)
from k2serve.api.usage import log_usage
from k2serve.api.video_runner import VideoRunner
from k2serve.api.video_store import MemoryVideoStore
from k2serve.media import MediaPolicy
from k2serve.platform.middleware import PlatformMiddleware
from k2serve.serving.registry import ModelRegistry

if TYPE_CHECKING:
    from k2serve.platform.service import Platform


def create_app(registry: ModelRegistry, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
               platform: Platform | None = None, shared_prefix_cache: bool = False,
               max_file_bytes: int = files.DEFAULT_MAX_FILE_BYTES,
               media_policy: MediaPolicy | None = None) -> FastAPI:
    """The API. With a `platform` (k2serve.platform): API keys, rate limits, the usage
    ledger and /admin routes; without one, open and unmetered. A request body larger than
    `max_body_bytes` gets 413, one not all received within `body_timeout_s` seconds 408.
    `shared_prefix_cache`: every key's requests share cached prompt prefixes
    (k2serve.api.prefix_cache). An uploaded file (/v1/files) may have `max_file_bytes`.
    `media_policy`: what image URLs in requests may be fetched (default: the environment's,
    MediaPolicy.from_env: data: URLs only unless K2SERVE_MEDIA_HTTP says otherwise)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await app.state.batch_runner.start()  # resumes the batches a restart interrupted
        await app.state.video_runner.start()  # ... and the video jobs
        yield
        await app.state.video_runner.stop()
        await app.state.batch_runner.stop()
        for backend in registry.backends():
            backend.shutdown()
        if platform is not None:
            await platform.shutdown()  # writes every pending ledger row

    app = FastAPI(title="k2serve", version=__version__, lifespan=lifespan,
                  description="OpenAI/Together-compatible inference API.")
    app.state.registry = registry
    app.state.usage_sinks = [log_usage, observe_usage]
    app.state.metrics_sources = []  # more of /metrics, read when scraped (the platform's)
    app.state.shared_prefix_cache = shared_prefix_cache
    app.state.response_store = MemoryResponseStore()  # a platform puts its database's in
    app.state.batch_store = MemoryBatchStore()  # ... and its database's here
    app.state.file_blobs = FileBlobs()  # a temporary directory; a platform's data directory
    app.state.media_files = MediaFiles()  # generated images and videos: the same
    app.state.video_store = MemoryVideoStore()  # a platform puts its database's in
    app.state.video_runner = VideoRunner(app)
    app.state.max_file_bytes = max_file_bytes
    app.state.media_policy = media_policy or MediaPolicy.from_env()
    app.state.batch_runner = BatchRunner(app)
    install_error_handlers(app)
    for module in (models, chat, completions, messages, responses, audio, embeddings, rerank,
                   moderations, images, videos, media, tokenize, files, batches, metrics,
                   playground):
        app.include_router(module.router)

    @app.get("/health")
    async def health():
        """Liveness, the kernel path in use (native and its instruction set, or PyTorch
        fallbacks and why), each engine's queue depths (running / waiting sequences), and
        the load state (loading / ready / failed) of each model that loads in the background."""
        models = registry.models()
        ok = all(model.backend.healthy() for model in models)
        engines = {spec.id: stats for spec, backend in models
                   if (stats := backend.stats()) is not None}
        body = {"status": "ok" if ok else "unhealthy",
                "kernels": native.status(build=False),
                "engines": engines,
                "models": {spec.id: state for spec, backend in models
                           if (state := backend.load_state) is not None}}
        return JSONResponse(body, status_code=200 if ok else 503)

    limits = BodyLimits(max_bytes=max_body_bytes, timeout_s=body_timeout_s,
                        upload_max_bytes=max_file_bytes + (1 << 20))  # + multipart framing
    # Added innermost first. Outermost: ids on every reply (errors included), the alias, the
    # HTTP metrics, then authentication (which reads a generation's body itself, once the key
    # is known), then the body read for everything else: no body byte is read before the key
    # is checked.
    app.add_middleware(BodySizeLimitMiddleware, limits=limits)
    if platform is not None:
        platform.install(app)
        app.add_middleware(PlatformMiddleware, platform=platform, body_limits=limits)
    app.add_middleware(HttpMetricsMiddleware)  # refusals counted too
    app.add_middleware(PathAliasMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app
