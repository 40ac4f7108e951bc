"""Image parts of chat messages: found in the request, fetched under the server's media
policy (k2serve.media: data: URLs always, http(s) only as the operator allows), prepared for
the vision model serving the request. Each refusal is a 400 naming the part."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from k2serve.api.schemas.chat import ChatCompletionRequest
from k2serve.errors import bad_request
from k2serve.media import MediaPolicy, fetch_image

MAX_IMAGES = 16  # per request: each is fetched, decoded and encoded before the first token

VISION_FLAG_HINT = ("serve one with `k2serve serve --vision-model DIR` (an Idefics3 / SmolVLM "
                    "checkpoint directory) or a models-file entry whose path is one")


def image_url_of(part: Any, param: str) -> str | None:
    """The URL of an `image_url` part (None for other parts); 400 for a malformed one."""
    if not isinstance(part, dict) or part.get("type") != "image_url":
        return None
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad_request("An image_url part needs image_url.url (a data: URL, or http(s) "
                          "where the server allows it).", param=param)
    return url


def image_parts(req: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(param, url) of every image part, in the order the prompt shows them."""
    found = []
    for i, message in enumerate(req.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                param = f"messages.{i}.content.{j}.image_url"
                url = image_url_of(part, param)
                if url is not None:
                    found.append((param, url))
    return found


def media_policy(request: Request) -> MediaPolicy:
    return getattr(request.app.state, "media_policy", None) or MediaPolicy()


async def prepare_chat_images(request: Request, req: ChatCompletionRequest, prompter) -> list:
    """The request's images, fetched and prepared (`prompter.prepare`), in prompt order."""
    parts = image_parts(req)
    if not parts:
        return []
    if len(parts) > MAX_IMAGES:
        raise bad_request(f"The messages hold {len(parts)} images; at most {MAX_IMAGES} are "
                          f"accepted in one request.", param="messages")
    policy = media_policy(request)
    # mode None: the prompter converts to RGB as the model's processor does (onto white)
    images = await asyncio.gather(*(fetch_image(url, policy, param=param, mode=None)
                                    for param, url in parts))
    return await run_in_threadpool(prompter.prepare, list(images))
