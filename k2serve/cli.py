"""`k2serve` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    import dataclasses

    import uvicorn

    from k2serve import native
    from k2serve.api.http_protocol import h11_protocol
    from k2serve.app import create_app
    from k2serve.media import MediaPolicy
    from k2serve.platform.db import data_dir
    from k2serve.serving.catalog import EMBEDDED_CHAT_MODEL_ID
    from k2serve.serving.families import (
        FamilyOptions,
        parse_families,
        register_families,
    )
    from k2serve.serving.loader import LoadOptions, load_text_model
    from k2serve.serving.models_file import load_model_entry, read_models_file
    from k2serve.serving.registry import ModelRegistry
    from k2serve.serving.upstream_loader import load_upstream_model, parse_upstreams
    from k2serve.telemetry import tracing

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    from k2serve.platform import open_platform

    try:  # before the model: a bad database or Redis URL fails in a second, not a minute
        platform = open_platform(database_url=args.database_url, data_dir=args.data_dir,
                                 redis_url=args.redis_url, host=args.host,
                                 files_url=args.files_url)
    except RuntimeError as exc:
        print(f"k2serve: {exc}", file=sys.stderr)
        return 2

    try:
        families = parse_families(args.families)
    except ValueError as exc:
        print(f"k2serve: {exc}", file=sys.stderr)
        return 2
    registry = ModelRegistry()
    load_options = LoadOptions(
        model_path=args.model, served_model_name=args.served_model_name,
        max_num_seqs=args.max_num_seqs, max_context_length=args.max_context_length,
        kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)) if args.kv_cache_gb else None,
        max_waiting=args.max_waiting, quantize=not args.no_quantize,
        kv_cache_dtype=args.kv_cache_dtype, progress=not args.quiet,
        speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens)
    try:
        entries = read_models_file(args.models_file) if args.models_file else []
        for entry in entries:
            registry.register(*load_model_entry(entry, load_options))
        upstreams = parse_upstreams(args.upstream, args.upstream_tokenizer)
        for model_id, urls, tokenizer_path in upstreams:
            registry.register(*load_upstream_model(model_id, urls, tokenizer_path))
    except (FileNotFoundError, ValueError) as exc:
        print(f"k2serve: cannot serve the configured models: {exc}", file=sys.stderr)
        return 2
    # The local chat model, unless the models file names it or an upstream serves its id.
    if args.vision_model:  # a second local chat model, whose messages may hold images
        try:
            registry.register(*load_text_model(dataclasses.replace(
                load_options, model_path=args.vision_model,
                served_model_name=args.vision_model_name, speculative=None)))
        except (FileNotFoundError, ValueError) as exc:
            print(f"k2serve: cannot load the vision model: {exc}", file=sys.stderr)
            return 2
    local_id = args.served_model_name or (None if args.model else EMBEDDED_CHAT_MODEL_ID)
    local_configured = any(entry.kind == "local" for entry in entries)
    if "chat" in families and not local_configured and (
            local_id is None or registry.get(local_id) is None):
        try:
            registry.register(*load_text_model(load_options))
        except (FileNotFoundError, ValueError) as exc:
            print(f"k2serve: cannot load model: {exc}", file=sys.stderr)
            return 2
    if args.ray is not None:
        from k2serve.platform.endpoints_setup import open_endpoints

        try:
            platform.endpoints = open_endpoints(platform, registry, address=args.ray or None,
                                                endpoints_file=args.endpoints_file,
                                                num_cpus=args.ray_num_cpus)
        except (RuntimeError, ValueError) as exc:
            print(f"k2serve: cannot serve dedicated endpoints: {exc}", file=sys.stderr)
            return 2
    register_families(registry, families - {"chat"},
                      FamilyOptions(data_dir=str(data_dir(args.data_dir)),
                                    progress=not args.quiet))
    for kind, values, name in (("image", args.image_model, args.image_model_name),
                               ("video", args.video_model, args.video_model_name)):
        if name and len(values) != 1:
            print(f"k2serve: --{kind}-model-name names one --{kind}-model; with several, "
                  f"give each its id as ID=DIR", file=sys.stderr)
            return 2
        for value in values:
            model_id, directory = _id_and_dir(value)
            error = _register_diffusion(registry, kind, directory, model_id or name)
            if error:
                print(f"k2serve: cannot serve the {kind} model {directory}: {error}",
                      file=sys.stderr)
                return 2
    try:
        media_policy = MediaPolicy.from_env(
            allow_http=args.media_http or None,
            allowed_domains=tuple(args.media_allowed_domains.split(","))
            if args.media_allowed_domains else None,
            max_bytes=args.media_max_bytes, timeout_s=args.media_timeout,
            max_pixels=args.media_max_pixels)
    except ValueError as exc:
        print(f"k2serve: bad media settings: {exc}", file=sys.stderr)
        return 2
    app = create_app(registry, max_body_bytes=args.max_body_bytes,
                     body_timeout_s=args.body_timeout, platform=platform,
                     shared_prefix_cache=args.shared_prefix_cache, media_policy=media_policy)

    tracing_on = tracing.setup()  # only with OTEL_EXPORTER_OTLP_ENDPOINT set
    base = f"http://{_display_host(args.host)}:{args.port}"
    # JSON logs: uvicorn's own loggers go to the root's JSON handler, not its text formatter.
    log_config = None if args.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=False, timeout_keep_alive=args.keep_alive_timeout,
                            http=h11_protocol(args.header_timeout), log_config=log_config,
                            # asyncio's loop, the one k2serve is tested on: the `ray` extra
                            # installs uvloop, which uvicorn would otherwise pick.
                            loop="asyncio")
    server = uvicorn.Server(config)

    original_startup = server.startup

    async def startup_then_announce(sockets=None):
        await original_startup(sockets=sockets)
        if server.started:
            served = ", ".join(s.id for s in registry.specs()) or "no models"
            traces = " — traces: OTLP" if tracing_on else ""
            print(f"k2serve: serving {served} — API at {base}/v1, docs at {base}/docs — "
                  f"{platform.startup_note()} — {native.describe(build=False)}{traces}",
                  flush=True)

    server.startup = startup_then_announce
    try:
        server.run()
    finally:
        tracing.shutdown()  # export the spans still queued
    return 0


def _id_and_dir(value: str) -> tuple[str | None, str]:
    """`--image-model [ID=]DIR`: (ID or None, DIR)."""
    import os

    model_id, sep, directory = value.partition("=")
    if sep and model_id and directory and not os.path.exists(value):
        return model_id, directory
    return None, value


def _register_diffusion(registry, kind: str, directory: str, name: str | None) -> str | None:
    """Register an image / video pipeline directory; the reason it cannot be, or None."""
    from k2serve.diffusion.pipelines import diffusers_module
    from k2serve.diffusion.serving import register_diffusion_model

    try:
        diffusers_module()
    except RuntimeError as exc:  # not installed: which extra installs it
        return str(exc)
    try:
        register_diffusion_model(registry, directory, kind, name=name)
    except (FileNotFoundError, ValueError) as exc:
        return str(exc)
    return None


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)


def _speculative_arg(value: str) -> str:
    from k2serve.engine.config import parse_speculative

    try:
        parse_speculative(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    from k2serve.engine.config import (
        DEFAULT_KV_FRACTION,
        DEFAULT_KV_MAX_BYTES,
        EngineConfig,
    )
    from k2serve.platform.cli import add_database_args, add_platform_parsers

    parser = argparse.ArgumentParser(prog="k2serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", default=None,
                       help="a Hugging Face checkpoint directory or a Llama-family .gguf file "
                            "(default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--served-model-name", default=None, help="model id clients send")
    serve.add_argument("--vision-model", default=None, metavar="DIR",
                       help="also serve this vision chat model (an Idefics3 / SmolVLM "
                            "checkpoint directory): its messages may hold image_url parts")
    serve.add_argument("--vision-model-name", default=None, metavar="NAME",
                       help="the vision model's id (default: its config's name or directory)")
    serve.add_argument("--media-http", action="store_true",
                       help="let image URLs be fetched over http(s) (default: data: URLs only; "
                            "env K2SERVE_MEDIA_HTTP=1); needs --media-allowed-domains")
    serve.add_argument("--media-allowed-domains", default=None, metavar="HOST[,HOST...]",
                       help="hosts image URLs may name: example.com, *.example.com, or * "
                            "(env K2SERVE_MEDIA_ALLOWED_DOMAINS); private addresses are refused")
    serve.add_argument("--media-max-bytes", type=int, default=None,
                       help="largest image fetched or inlined (default 20 MiB)")
    serve.add_argument("--media-timeout", type=float, default=None,
                       help="seconds one image fetch may take (default 10)")
    serve.add_argument("--media-max-pixels", type=int, default=None,
                       help="most pixels an image may declare (default 25,000,000)")
    serve.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs,
                       help="sequences decoded together in one batch")
    serve.add_argument("--kv-cache-gb", type=float, default=None,
                       help=f"KV cache size (default: {DEFAULT_KV_FRACTION * 100:g}%% of available "
                            f"memory, at most {DEFAULT_KV_MAX_BYTES / (1 << 30):g})")
    serve.add_argument("--kv-cache-dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                       help="KV cache element type (auto: bfloat16 for a 4-bit GGUF, whose "
                            "linears take bfloat16 activations; float32 otherwise)")
    serve.add_argument("--max-waiting", type=int, default=EngineConfig.max_waiting,
                       help="requests queued beyond the running batch; more get 503")
    serve.add_argument("--no-quantize", action="store_true",
                       help="dequantize a GGUF's 4-bit weights (or a pack-quantized "
                            "checkpoint's INT4 experts) to float32 (slower)")
    serve.add_argument("--max-context-length", type=int, default=None,
                       help="cap the context length below the model's own")
    serve.add_argument("--speculative", type=_speculative_arg, default=None,
                       metavar="ngram|draft:MODEL",
                       help="speculative decoding: 'ngram' proposes tokens found earlier in the "
                            "text (prompt lookup: edits, quotes, code), 'draft:MODEL' runs a "
                            "small model with the same tokenizer (a .gguf or HF directory); "
                            "proposals are verified in one batched step, so outputs are "
                            "distributed as without it; each sequence proposes as many tokens "
                            "as pay for themselves there, none while they seldom hold "
                            "(default: off)")
    serve.add_argument("--num-speculative-tokens", type=int,
                       default=EngineConfig.num_speculative_tokens,
                       help="most tokens proposed per sequence and step (default: "
                            f"{EngineConfig.num_speculative_tokens})")
    serve.add_argument("--upstream", action="append", default=[], metavar="ID=URL[,URL...]",
                       help="serve model ID from an OpenAI-compatible engine (vLLM, SGLang, "
                            "another k2serve) at these /v1 base URLs (replicas); repeatable")
    serve.add_argument("--upstream-tokenizer", action="append", default=[], metavar="ID=PATH",
                       help="the tokenizer and chat template of an --upstream model: its "
                            "checkpoint directory or a .gguf (the embedded model's is known)")
    serve.add_argument("--models-file", default=None, metavar="PATH",
                       help="a TOML file of the models to serve, local or on upstream engines, "
                            "with their prices (README: Upstream engines)")
    serve.add_argument("--families", default="all",
                       help="model families to serve, comma-separated: chat, embedding "
                            "(+rerank), moderation, audio, or all (default). Families "
                            "beside chat load in the background after start-up")
    serve.add_argument("--image-model", action="append", default=[], metavar="[ID=]DIR",
                       help="serve POST /v1/images/generations with this diffusers pipeline "
                            "directory (Stable Diffusion 1.x/2.x/XL, SD(XL)-Turbo, FLUX.1; "
                            "needs `pip install 'k2serve[images]'`), under ID if given; "
                            "repeatable")
    serve.add_argument("--image-model-name", default=None, metavar="ID",
                       help="the id of the one --image-model (default: the catalog id named "
                            "like the directory, else the directory's name)")
    serve.add_argument("--video-model", action="append", default=[], metavar="[ID=]DIR",
                       help="serve video jobs (POST /v2/videos) with this diffusers video "
                            "pipeline directory (LTX-Video, Wan, CogVideoX, ...; text- and "
                            "image-to-video), under ID if given; repeatable")
    serve.add_argument("--video-model-name", default=None, metavar="ID",
                       help="the video model's id (default: as for --image-model-name)")
    serve.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024,
                       help="larger request bodies get 413")
    serve.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds a client has to send a request's whole body; a slower "
                            "one gets 408 and its connection is closed (default: 30)")
    serve.add_argument("--header-timeout", type=float, default=30.0,
                       help="seconds a connection has to send each request's headers before "
                            "it is closed (default: 30)")
    serve.add_argument("--keep-alive-timeout", type=int, default=5,
                       help="seconds an idle keep-alive connection stays open (default: 5)")
    serve.add_argument("--shared-prefix-cache", action="store_true",
                       help="let all API keys share cached prompt prefixes (by default each "
                            "key has its own, so cached_tokens cannot reveal another key's "
                            "prompts)")
    serve.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    serve.add_argument("--log-level", default="warning")
    serve.add_argument("--log-format", choices=["text", "json"], default="text",
                       help="json: one JSON object per log line, with the request id of the "
                            "request it was logged for")
    serve.add_argument("--quiet", action="store_true", help="no progress bar")
    serve.add_argument("--redis-url", default=None,
                       help="share rate-limit counters between servers through this Redis "
                            "(default: $K2SERVE_REDIS_URL, else in memory)")
    serve.add_argument("--files-url", default=None, metavar="s3://BUCKET/PREFIX",
                       help="keep uploaded files and batch output in this S3-compatible "
                            "bucket (default: $K2SERVE_FILES_URL, else the data directory; "
                            "endpoint: $K2SERVE_S3_ENDPOINT_URL or $AWS_ENDPOINT_URL; needs "
                            "`pip install 'k2serve[s3]'`)")
    serve.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="serve dedicated endpoints (/v1/endpoints) on a Ray cluster: "
                            "connect to ADDRESS (auto, or HOST:PORT of `ray start --head`), "
                            "or without one start a local cluster (needs `pip install "
                            "'k2serve[ray]'`)")
    serve.add_argument("--endpoints-file", default=None, metavar="PATH",
                       help="with --ray: the hardware (and its price per minute), the "
                            "deployable models and the autoscaling settings (TOML; README: "
                            "Dedicated endpoints)")
    serve.add_argument("--ray-num-cpus", type=float, default=None,
                       help="with --ray and no address: CPUs of the local cluster "
                            "(default: all)")
    add_database_args(serve)
    serve.set_defaults(func=_serve)
    add_platform_parsers(sub)
    from k2serve.endpoints_cli import add_endpoints_parsers
    add_endpoints_parsers(sub)
    from k2serve.batch_cli import add_batch_parsers
    add_batch_parsers(sub)
    from k2serve.bench.cli import add_bench_parser
    add_bench_parser(sub)
    from k2serve.doctor import add_doctor_parser
    add_doctor_parser(sub)
    from k2serve.top import add_top_parser
    add_top_parser(sub)

    tiny = sub.add_parser("tiny-k2", help="write a tiny random-weight Kimi K2 checkpoint "
                                          "(K2's real on-disk layout: FP8 shards, tiktoken)")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--no-fp8", action="store_true", help="bf16 weights instead of FP8")
    tiny.add_argument("--thinking", action="store_true",
                      help="Kimi K2-Thinking's layout: INT4 routed experts (compressed-tensors "
                           "pack-quantized, group 32), bf16 elsewhere, its <think> template")
    tiny.set_defaults(func=_tiny_k2)

    export = sub.add_parser("export", help="write a Llama-family GGUF (or the embedded model) "
                                           "as a Hugging Face checkpoint directory, for "
                                           "engines such as vLLM")
    export.add_argument("source", help="a .gguf file, or 'embedded' (the embedded SmolLM2)")
    export.add_argument("directory")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="weight type (float32, the default, keeps the dequantized "
                             "weights exactly)")
    export.set_defaults(func=_export)
    return parser


def _export(args: argparse.Namespace) -> int:
    from k2serve.models.export import export_gguf

    try:
        path = export_gguf(args.source, args.directory, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as exc:
        print(f"k2serve: cannot export: {exc}", file=sys.stderr)
        return 2
    print(f"k2serve: wrote a Hugging Face checkpoint to {path}; serve it with vLLM "
          f"(`python -m vllm.entrypoints.openai.api_server --model {path}`) or "
          f"`k2serve serve --model {path}`")
    return 0


def _tiny_k2(args: argparse.Namespace) -> int:
    from k2serve.models.tiny_k2 import write_tiny_k2_checkpoint

    if args.thinking:
        path = write_tiny_k2_checkpoint(args.directory, seed=args.seed, fp8=False, thinking=True,
                                        int4_experts=True)
    else:
        path = write_tiny_k2_checkpoint(args.directory, seed=args.seed, fp8=not args.no_fp8)
    kind = "Kimi K2-Thinking (INT4 experts)" if args.thinking else "Kimi K2"
    print(f"k2serve: wrote a tiny {kind} checkpoint to {path}; serve it with "
          f"`k2serve serve --model {path}`")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from k2serve.telemetry.logs import configure

    # not every subcommand has the flags
    configure(getattr(args, "log_level", "warning"), getattr(args, "log_format", "text"))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
