"""POST /tokenize and /detokenize (vLLM's shapes, also under /v1/): what a prompt costs in
tokens before sending it, with the same tokenizer and chat template the generation
endpoints use (k2serve.api.prompts). Unbilled: nothing is generated."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from k2serve.api.chat_images import prepare_chat_images
from k2serve.api.errors import ERROR_RESPONSES
from k2serve.api.models_lookup import registry_of, text_backend_for
from k2serve.api.prompts import chat_prompt
from k2serve.api.schemas.chat import ChatCompletionRequest
from k2serve.api.schemas.tokenize import DetokenizeRequest, TokenizeRequest
from k2serve.api.tools import plan_tools
from k2serve.errors import bad_request
from k2serve.serving.backend import GenerationBackend

router = APIRouter(responses=ERROR_RESPONSES)


def _backend(request: Request, model: str | None, endpoint: str) -> GenerationBackend:
    if model is None:
        served = [spec.id for spec, _ in registry_of(request).serving(endpoint)]
        if len(served) != 1:
            raise bad_request(f"Name the model: this server serves {len(served)} text models "
                              f"({', '.join(served) or 'none'}).", param="model")
        model = served[0]
    return text_backend_for(request, model, endpoint)


def _chat_request(req: TokenizeRequest) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({
        "model": req.model or "", "messages": req.messages, "tools": req.tools,
        "tool_choice": req.tool_choice, "chat_template_kwargs": req.chat_template_kwargs})


def _tokenize(req: TokenizeRequest, backend: GenerationBackend,
              images: list | None = None) -> list[int]:
    if req.prompt is not None:
        if req.add_special_tokens is False:
            return backend.tokenizer.encode(req.prompt, add_special_tokens=False,
                                            allow_special_tokens=False)
        return backend.encode_text_prompt(req.prompt)
    if req.add_special_tokens:
        raise bad_request("add_special_tokens applies to 'prompt'; a chat prompt's special "
                          "tokens come from the model's template.", param="add_special_tokens")
    chat = _chat_request(req)
    return chat_prompt(chat, backend, plan_tools(chat, backend), images=images)[1]


@router.post("/tokenize")
@router.post("/v1/tokenize")
async def tokenize(req: TokenizeRequest, request: Request):
    """Token ids of a prompt or of a chat conversation, as a generation would see them."""
    endpoint = "completions" if req.prompt is not None else "chat.completions"
    backend = _backend(request, req.model, endpoint)
    images = None
    vision = getattr(backend, "vision", None)
    if vision is not None and req.prompt is None:  # the images' real token counts
        images = await prepare_chat_images(request, _chat_request(req), vision)
    ids = await run_in_threadpool(_tokenize, req, backend, images)
    return {"count": len(ids), "max_model_len": backend.context_length, "tokens": ids,
            "token_strs": (backend.tokenizer.convert_ids_to_tokens(ids)
                           if req.return_token_strs else None)}


@router.post("/detokenize")
@router.post("/v1/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request):
    """The text of token ids, control tokens included."""
    backend = _backend(request, req.model, "completions")
    vocab = backend.tokenizer.vocab_size
    for i, token in enumerate(req.tokens):
        if not 0 <= token < vocab:
            raise bad_request(f"tokens[{i}] is {token}, outside this model's vocabulary of "
                              f"{vocab} tokens.", param=f"tokens.{i}")
    text = await run_in_threadpool(backend.tokenizer.decode, req.tokens,
                                   skip_special_tokens=False)
    return {"prompt": text}
