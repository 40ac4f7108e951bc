"""Build an upstream model (k2serve.serving.upstream) from `--upstream ID=URL[,URL...]`: its
tokenizer and chat template loaded here, its context length asked of the upstream."""

from __future__ import annotations

import httpx

from k2serve.models.embedded import embedded_smollm2_gguf_path
from k2serve.serving.catalog import EMBEDDED_CHAT_MODEL_ID, model_spec
from k2serve.serving.registry import ModelSpec
from k2serve.serving.upstream import UpstreamBackend, UpstreamConfig
from k2serve.text.chat_template import ChatTemplate
from k2serve.text.loading import load_tokenizer


def parse_assignment(value: str, flag: str) -> tuple[str, str]:
    """`ID=VALUE` (the id may itself contain `/`); ValueError naming the flag."""
    model_id, sep, rest = value.partition("=")
    if not sep or not model_id.strip() or not rest.strip():
        raise ValueError(f"{flag} takes MODEL_ID=VALUE, not {value!r}")
    return model_id.strip(), rest.strip()


def parse_upstreams(values: list[str], tokenizers: list[str]) -> list[tuple[str, list[str], str]]:
    """(model id, replica URLs, tokenizer path) per `--upstream`; the embedded model's id
    takes the embedded GGUF's tokenizer unless `--upstream-tokenizer` names another."""
    paths = dict(parse_assignment(v, "--upstream-tokenizer") for v in tokenizers)
    out = []
    for value in values:
        model_id, urls = parse_assignment(value, "--upstream")
        replicas = [u.strip() for u in urls.split(",") if u.strip()]
        for url in replicas:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"--upstream {model_id}: {url!r} is not an http(s) URL")
        path = paths.pop(model_id, None)
        if path is None and model_id == EMBEDDED_CHAT_MODEL_ID:
            path = embedded_smollm2_gguf_path()
        if path is None:
            raise ValueError(f"--upstream {model_id}: name its tokenizer with "
                             f"--upstream-tokenizer {model_id}=PATH (a checkpoint directory "
                             f"or a .gguf file), so k2serve renders and counts its prompts")
        out.append((model_id, replicas, path))
    if paths:
        raise ValueError(f"--upstream-tokenizer names models without --upstream: "
                         f"{', '.join(sorted(paths))}")
    return out


def upstream_context_length(urls: list[str], model: str, timeout_s: float = 10.0) -> int | None:
    """The context length the first answering replica reports for `model` in /v1/models
    (vLLM: max_model_len; k2serve and Together: context_length)."""
    for url in urls:
        try:
            reply = httpx.get(url.rstrip("/") + "/models", timeout=timeout_s)
            reply.raise_for_status()
        except httpx.HTTPError:
            continue
        body = reply.json()
        models = body.get("data", []) if isinstance(body, dict) else body
        for entry in models:
            if isinstance(entry, dict) and entry.get("id") == model:
                value = entry.get("max_model_len") or entry.get("context_length")
                if isinstance(value, int) and value > 0:
                    return value
    return None


def load_upstream_model(model_id: str, urls: list[str], tokenizer_path: str, *,
                        upstream_model: str | None = None, api_key: str | None = None,
                        context_length: int | None = None, constrains: bool = True,
                        engine: str = "vllm") -> tuple[ModelSpec, UpstreamBackend]:
    tokenizer = load_tokenizer(tokenizer_path)
    template = ChatTemplate.from_tokenizer(tokenizer) if tokenizer.chat_template else None
    context = context_length or upstream_context_length(urls, upstream_model or model_id)
    if context is None:
        raise ValueError(f"no replica of {model_id} ({', '.join(urls)}) answered /v1/models "
                         f"with its context length")
    config = UpstreamConfig(model_id, urls, upstream_model=upstream_model, api_key=api_key,
                            constrains=constrains, engine=engine)
    backend = UpstreamBackend(config, tokenizer, context_length=context, chat_template=template)
    return model_spec(model_id, context_length=context), backend
