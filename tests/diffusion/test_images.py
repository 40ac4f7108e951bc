"""POST /v1/images/generations on a tiny random Stable Diffusion pipeline: the images are the
pixels diffusers itself makes with the same seed, through the together and openai SDKs; url
results come by signed links; requests are metered per image and megapixel-step."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import numpy as np
import pytest

from k2serve.serving.catalog import CATALOG
from tests.diffusion.conftest import FLUX_MODEL, IMAGE_MODEL, ledger_row

PROMPT = "a red cube on a table"


@pytest.fixture(scope="module")
def reference(diffusion_stack):
    """The same pipeline directory, loaded and called directly with diffusers."""
    import torch
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    torch.set_num_threads(1)
    pipe = AutoPipelineForText2Image.from_pretrained(str(diffusion_stack.image_dir))
    pipe.set_progress_bar_config(disable=True)

    def text_to_image(seed, **kwargs):
        return [np.asarray(i) for i in pipe(
            generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
            **kwargs).images]

    def image_to_image(seed, **kwargs):
        i2i = AutoPipelineForImage2Image.from_pipe(pipe)
        return [np.asarray(i) for i in i2i(
            generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
            **kwargs).images]

    return text_to_image, image_to_image


def pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_together_sdk_images_equal_diffusers_with_the_same_seed(diffusion_stack, reference):
    from together import Together

    client = Together(base_url=diffusion_stack.server.root, api_key=diffusion_stack.key)
    response = client.images.generate(
        model=IMAGE_MODEL, prompt=PROMPT, width=64, height=48, steps=2, seed=1234, n=2,
        negative_prompt="blurry", guidance_scale=5.0, response_format="base64",
        output_format="png")
    assert response.model == IMAGE_MODEL and len(response.data) == 2
    got = [pixels(base64.b64decode(item.b64_json)) for item in response.data]
    want = reference[0](1234, prompt=PROMPT, width=64, height=48, num_inference_steps=2,
                        num_images_per_prompt=2, negative_prompt="blurry", guidance_scale=5.0)
    assert got[0].shape == (48, 64, 3)
    for g, w in zip(got, want):
        assert np.array_equal(g, w)
    assert not np.array_equal(got[0], got[1])  # two images, not one twice


def test_openai_sdk_size_and_b64_json(diffusion_stack, reference):
    from openai import OpenAI

    client = OpenAI(base_url=diffusion_stack.server.root + "/v1", api_key=diffusion_stack.key)
    result = client.images.generate(model=IMAGE_MODEL, prompt=PROMPT, size="64x64",
                                    response_format="b64_json",
                                    extra_body={"steps": 2, "seed": 7})
    (item,) = result.data
    want = reference[0](7, prompt=PROMPT, width=64, height=64, num_inference_steps=2)
    assert np.array_equal(pixels(base64.b64decode(item.b64_json)), want[0])  # PNG: lossless


def test_image_to_image_with_strength(diffusion_stack, http, reference):
    from PIL import Image

    start = (np.arange(64 * 64 * 3) % 251).astype("uint8").reshape(64, 64, 3)
    buffer = io.BytesIO()
    Image.fromarray(start).save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    r = http.post("/v1/images/generations", json={
        "model": IMAGE_MODEL, "prompt": PROMPT, "width": 64, "height": 64, "steps": 4,
        "seed": 99, "strength": 0.5, "image_url": data_url, "response_format": "base64",
        "output_format": "png"})
    assert r.status_code == 200, r.text
    got = pixels(base64.b64decode(r.json()["data"][0]["b64_json"]))
    want = reference[1](99, prompt=PROMPT, image=Image.fromarray(start), strength=0.5,
                        num_inference_steps=4)
    assert np.array_equal(got, want[0])


def test_url_results_are_signed_links_that_expire_and_cannot_be_altered(diffusion_stack, http):
    r = http.post("/v1/images/generations", json={
        "model": IMAGE_MODEL, "prompt": PROMPT, "width": 32, "height": 32, "steps": 1,
        "seed": 5, "response_format": "url", "output_format": "png"})
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    assert r.json()["data"][0]["type"] == "url" and "signature=" in url
    fetched = httpx.get(url)  # no API key: the link is the credential
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert pixels(fetched.content).shape == (32, 32, 3)

    tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
    r = httpx.get(tampered)
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_signature"
    base, query = url.split("?")
    params = dict(p.split("=") for p in query.split("&"))
    extended = f"{base}?expires={int(params['expires']) + 3600}&signature={params['signature']}"
    assert httpx.get(extended).status_code == 403
    assert httpx.get(base).status_code == 403  # no signature at all


def test_expired_link_is_refused(tmp_path):
    from k2serve.api.media_links import MediaFiles
    from k2serve.errors import APIError

    files = MediaFiles(tmp_path)
    name = files.new_name("img", "png")
    files.write(name, b"x")
    query = files.link("http://h", name, ttl_s=-5).split("?")[1]
    params = dict(p.split("=") for p in query.split("&"))
    with pytest.raises(APIError) as err:
        files.verified_path(name, params["expires"], params["signature"])
    assert err.value.status == 403 and err.value.code == "link_expired"
    live = dict(p.split("=") for p in files.link("http://h", name, 60).split("?")[1].split("&"))
    assert files.verified_path(name, live["expires"], live["signature"]).read_bytes() == b"x"
    # The secret outlives the process: a second MediaFiles on the directory verifies it.
    assert MediaFiles(tmp_path).verified_path(name, live["expires"], live["signature"])
    # A day later the image is gone: its link answers 404.
    files.prune("img", now=time.time() + 24 * 3600 + 1)
    with pytest.raises(APIError) as err:
        files.verified_path(name, live["expires"], live["signature"])
    assert err.value.status == 404


@pytest.mark.parametrize("fields,param", [
    ({"width": 60}, "width"),
    ({"height": 4096}, "height"),
    ({"steps": 0}, "steps"),
    ({"n": 9}, "n"),
    ({"size": "big"}, "size"),
    ({"response_format": "gif"}, "response_format"),
    ({"image_loras": [{"path": "x", "scale": 1}]}, "image_loras"),
    ({"strength": 0.5}, "strength"),
    ({"image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}, "image_url"),
    ({"prompt": ""}, "prompt"),
])
def test_bad_parameters_are_400s_naming_them(http, fields, param):
    body = {"model": IMAGE_MODEL, "prompt": PROMPT, "width": 32, "height": 32, "steps": 1,
            **fields}
    r = http.post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_flux_images_equal_diffusers_with_the_same_seed(diffusion_stack):
    """FLUX.1's pipeline (two text encoders, a flow-matching transformer, distilled
    guidance) through the SDK."""
    import torch
    from diffusers import AutoPipelineForText2Image
    from together import Together

    client = Together(base_url=diffusion_stack.server.root, api_key=diffusion_stack.key)
    response = client.images.generate(model=FLUX_MODEL, prompt=PROMPT, width=64, height=32,
                                      steps=2, seed=77, guidance_scale=3.5,
                                      response_format="base64", output_format="png")
    got = pixels(base64.b64decode(response.data[0].b64_json))
    torch.set_num_threads(1)
    pipe = AutoPipelineForText2Image.from_pretrained(str(diffusion_stack.flux_dir))
    pipe.set_progress_bar_config(disable=True)
    want = pipe(prompt=PROMPT, width=64, height=32, num_inference_steps=2, guidance_scale=3.5,
                generator=torch.Generator("cpu").manual_seed(77)).images[0]
    assert type(pipe).__name__ == "FluxPipeline"
    assert np.array_equal(got, np.asarray(want))


def test_each_request_is_one_ledger_row_priced_per_megapixel_step(diffusion_stack, http):
    r = http.post("/v1/images/generations", json={
        "model": FLUX_MODEL, "prompt": PROMPT, "width": 64, "height": 32, "steps": 3,
        "n": 2, "response_format": "base64"})
    assert r.status_code == 200, r.text
    (row,) = ledger_row(diffusion_stack, r.headers["x-request-id"])
    assert (row.model, row.endpoint, row.status) == (FLUX_MODEL, "images", "ok")
    kilopixel_steps = 64 * 32 * 3 * 2 / 1000
    assert row.prompt_tokens == 2 and row.completion_tokens == int(np.ceil(kilopixel_steps))
    price = CATALOG[FLUX_MODEL]["pricing"].megapixel_step
    assert row.cost_usd == pytest.approx(row.completion_tokens / 1000 * price)
    assert price == pytest.approx(0.0027 / (1.048576 * 4))  # $0.0027 per 1024x1024 image, 4 steps

    r = http.post("/v1/images/generations", json={"model": FLUX_MODEL, "prompt": PROMPT,
                                                  "width": 33})
    (row,) = ledger_row(diffusion_stack, r.headers["x-request-id"])
    assert row.status == "rejected" and row.cost_usd == 0


def test_token_limits_reserve_images_and_kilopixel_steps(diffusion_stack):
    """A key's TPM counts an image request's units: the default 1024x1024, 20 steps (20,972
    kilopixel-steps) is more than 1000 a minute allows, a 32x32 one fits."""
    headers = {"Authorization": f"Bearer {diffusion_stack.tpm_key}"}
    with httpx.Client(base_url=diffusion_stack.server.root, headers=headers,
                      timeout=60) as client:
        r = client.post("/v1/images/generations", json={"model": IMAGE_MODEL,
                                                         "prompt": PROMPT})
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "request_exceeds_token_limit"
        r = client.post("/v1/images/generations", json={
            "model": IMAGE_MODEL, "prompt": PROMPT, "width": 32, "height": 32, "steps": 2,
            "response_format": "base64"})
        assert r.status_code == 200, r.text
        used = 1000 - int(r.headers["x-tokenlimit-remaining"])
        assert used == 1 + int(np.ceil(32 * 32 * 2 / 1000))


def test_models_lists_the_image_and_video_models_with_their_types(http):
    listed = {m["id"]: m for m in http.get("/v1/models").json()}
    assert listed[IMAGE_MODEL]["type"] == listed[FLUX_MODEL]["type"] == "image"
    assert listed[FLUX_MODEL]["pricing"]["per_megapixel_step"] == pytest.approx(0.0027 / (1.048576 * 4))
    assert listed["tiny-ltx-video"]["type"] == "video"


def test_each_call_logs_its_steps(diffusion_stack, http):
    r = http.post("/v1/images/generations", json={
        "model": IMAGE_MODEL, "prompt": PROMPT, "width": 32, "height": 32, "steps": 3,
        "response_format": "base64"})
    assert r.status_code == 200, r.text
    line = f"image request {r.headers['x-request-id']} ({IMAGE_MODEL}): step 3/3"
    deadline = time.time() + 5
    while not any(line in out for out in diffusion_stack.output) and time.time() < deadline:
        time.sleep(0.05)
    assert any(line in out for out in diffusion_stack.output)


def test_a_full_queue_answers_503_with_retry_after(diffusion_stack):
    """One worker, K2SERVE_IMAGE_MAX_WAITING=1: of four requests sent at once at least one
    finds the worker busy and the queue full."""
    statuses, headers = [], []

    def send():
        r = httpx.post(diffusion_stack.server.root + "/v1/images/generations", timeout=120,
                       headers={"Authorization": f"Bearer {diffusion_stack.key}"},
                       json={"model": IMAGE_MODEL, "prompt": PROMPT, "width": 512,
                             "height": 512, "steps": 40, "response_format": "base64"})
        statuses.append(r.status_code)
        headers.append(r.headers)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 503 in statuses and 200 in statuses, statuses
    assert set(statuses) <= {200, 503}
    busy = headers[statuses.index(503)]
    assert busy["retry-after"] == "1"
