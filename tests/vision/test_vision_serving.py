"""Vision chat over HTTP, through the official OpenAI SDK: a tiny random Idefics3 checkpoint
served with `--vision-model` beside a tiny text-only chat model (`--model`).

- /v1/models says which chat model takes images;
- image_url parts (data: URLs) reach the model; a mixed batch of image and text requests gives
  each the greedy output it gets alone;
- the prefix cache never shares KV between equal token ids with different images;
- the text-only model refuses image parts with a 400 naming the flag;
- media refusals come back as 400s in the API's error shape.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import start_server, stop_server, wait_until_idle
from tests.media.servers import bomb_png
from tests.tiny_vision import write_tiny_idefics3, write_tiny_text_model

openai = pytest.importorskip("openai")

VISION_ID = "tiny/idefics3-vision"
TEXT_ID = "tiny/text-only"


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-idefics3")
    write_tiny_idefics3(str(directory))
    text_directory = tmp_path_factory.mktemp("tiny-text")
    write_tiny_text_model(str(text_directory))
    live = start_server("--model", str(text_directory), "--served-model-name", TEXT_ID,
                        "--vision-model", str(directory), "--vision-model-name", VISION_ID,
                        env={"K2SERVE_MEDIA_HTTP": "1",
                             "K2SERVE_MEDIA_ALLOWED_DOMAINS": "localhost"})
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def client(vision_server):
    return openai.OpenAI(base_url=vision_server.root + "/v1", api_key="local", max_retries=0)




def ask(client, content, model=VISION_ID, max_tokens=6):
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0,
        max_tokens=max_tokens, extra_body={"ignore_eos": True})
    return reply


def image_message(image: Image.Image, text: str = "What is this?") -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": data_url(image)}},
            {"type": "text", "text": text}]


def test_models_say_which_chat_model_takes_images(client):
    by_id = {m.id: m for m in client.models.list()}
    assert by_id[VISION_ID].type == "chat" and by_id[VISION_ID].vision is True
    assert by_id[TEXT_ID].type == "chat" and by_id[TEXT_ID].vision is False


def test_an_image_request_is_answered(client):
    reply = ask(client, image_message(picture(50, 37, 1)))
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 6
    # 50x37 is resized to 64 a side, then cut into 2x2 tiles + the whole: 5 frames x 4 tokens
    text_only = ask(client, [{"type": "text", "text": "What is this?"}])
    assert reply.usage.prompt_tokens - text_only.usage.prompt_tokens >= 20


def test_tokenize_counts_the_images_tokens(vision_server, client):
    content = image_message(picture(50, 37, 1))
    reply = ask(client, content, max_tokens=1)
    counted = httpx.post(vision_server.root + "/v1/tokenize", json={
        "model": VISION_ID, "messages": [{"role": "user", "content": content}]}).json()
    assert counted["count"] == reply.usage.prompt_tokens


def test_a_mixed_batch_gives_each_request_its_own_greedy_output(vision_server, client):
    requests = [image_message(picture(50, 37, 1)), [{"type": "text", "text": "Hello there"}],
                image_message(picture(30, 60, 2), "Describe"),
                image_message(picture(64, 64, 3)) + image_message(picture(20, 20, 4), "and?"),
                "Tell me a story"]
    alone = [ask(client, content, max_tokens=8).choices[0].message.content
             for content in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda c: ask(client, c, max_tokens=8).choices[0]
                                 .message.content, requests * 2))
    assert together == alone * 2
    with httpx.Client(base_url=vision_server.root) as http:
        wait_until_idle(http)


def test_the_prefix_cache_tells_images_apart(client):
    first, second = picture(40, 40, 10), picture(40, 40, 11)  # same size: same token ids
    text = "Spell out every detail of this picture, please, slowly."
    ask(client, image_message(first, text), max_tokens=1)
    again = ask(client, image_message(first, text), max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    other = ask(client, image_message(second, text), max_tokens=1)
    assert other.usage.prompt_tokens == again.usage.prompt_tokens
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_the_text_only_model_names_the_flag(client):
    assert ask(client, "hello", model=TEXT_ID).usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, image_message(picture(8, 8, 0)), model=TEXT_ID)
    error = caught.value.body
    assert error["code"] == "unsupported_content_type"
    assert "--vision-model" in error["message"] and "vision" in error["message"]
    assert error["param"] == "messages.0.content"


class _Images(BaseHTTPRequestHandler):
    def do_GET(self):
        body = io.BytesIO()
        picture(8, 8, 0).save(body, format="PNG")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body.getvalue())))
        self.end_headers()
        self.wfile.write(body.getvalue())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


@pytest.mark.parametrize("url, code, words", [
    ("http://localhost:{port}/cat.png", "invalid_media_url", "non-public address"),
    ("http://127.0.0.1:{port}/cat.png", "invalid_media_url", "not on this server's media"),
    ("file:///etc/passwd", "invalid_media_url", "scheme file:"),
    ("data:text/plain;base64,aGk=", "invalid_media_url", "Unsupported media type"),
    ("bomb", "invalid_image", "more than the server's limit"),
])
def test_media_refusals_are_400s(client, image_host, url, code, words):
    if url == "bomb":
        url = "data:image/png;base64," + base64.b64encode(bomb_png(8000, 8000)).decode()
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, [{"type": "text", "text": "look"},
                     {"type": "image_url", "image_url": {"url": url.format(port=image_host)}}])
    error = caught.value.body
    assert error["code"] == code and words in error["message"]
    assert error["param"] == "messages.0.content.1.image_url"


def _png_base64(image: Image.Image) -> str:
    return data_url(image).split(",", 1)[1]


def test_anthropic_and_responses_image_inputs_reach_the_vision_model(vision_server, client):
    """An Anthropic image block (base64 source) and a Responses input_image part are the
    same image to the model as a chat image_url part: the same greedy reply."""
    anthropic = pytest.importorskip("anthropic")
    image, text = picture(50, 37, 1), "What is this?"
    chat = client.chat.completions.create(
        model=VISION_ID, messages=[{"role": "user", "content": image_message(image, text)}],
        temperature=0, max_tokens=8).choices[0].message.content
    messages = anthropic.Anthropic(base_url=vision_server.root, api_key="local", max_retries=0)
    reply = messages.messages.create(model=VISION_ID, max_tokens=8, extra_body={"temperature": 0}, messages=[
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": _png_base64(image)}},
            {"type": "text", "text": text}]}])
    assert "".join(b.text for b in reply.content if b.type == "text") == chat
    response = client.responses.create(model=VISION_ID, max_output_tokens=8, temperature=0,
                                       input=[{"role": "user", "content": [
                                           {"type": "input_image", "image_url": data_url(image)},
                                           {"type": "input_text", "text": text}]}])
    assert response.output_text == chat
    # Anthropic counts cache reads apart: the same image's prompt was cached by the chat call
    counted = reply.usage.input_tokens + reply.usage.cache_read_input_tokens
    assert response.usage.input_tokens == counted > 20

    with pytest.raises(anthropic.BadRequestError) as caught:  # a text-only model
        messages.messages.create(model=TEXT_ID, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": _png_base64(image)}}]}])
    assert "--vision-model" in caught.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as caught:  # a source it cannot read
        messages.messages.create(model=VISION_ID, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}])
    assert "source" in caught.value.body["error"]["message"]
