"""The seed's image and video snippets (copied verbatim below) run against a server with an
image and a video model configured: curl and the together SDK, as written, with three
substitutions — the server's address for Together's, the served model's id for the chat
model's id they name (not an image or video model), and a loopback copy of their input
image (the tests stay on 127.0.0.1; the server's media policy allows that host)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from tests.diffusion.conftest import IMAGE_MODEL, VIDEO_MODEL
from tests.media.servers import MediaServer, png_bytes, reply

SEED_MODEL = "moonshotai/Kimi-K2-Instruct-0905"
IMAGE_URLS = ("https://huggingface.co/datasets/patrickvonplaten/random_img/resolve/main/"
              "yosemite.png", "https://cdn.pixabay.com/photo/2020/05/20/08/27/cat-5195431_1280.jpg")

SEED_IMAGE_CURL = """curl -X POST "https://api.together.xyz/v1/images/generations" \\
-H "Authorization: Bearer $TOGETHER_API_KEY" \\
-H "Content-Type: application/json" \\
-d '{
"model": "moonshotai/Kimi-K2-Instruct-0905",
"prompt": "Draw an anime style version of this image.",
"width": 1024,
"height": 768,
"steps": 28,
"n": 1,
"response_format": "url",
"image_url": "https://huggingface.co/datasets/patrickvonplaten/random_img/resolve/main/yosemite.png"
}'"""

SEED_VIDEO_CURLS = ["""curl --request POST \\
--url https://api.together.xyz/v2/videos \\
--header "Authorization: Bearer $TOGETHER_API_KEY" \\
--header "Content-Type: application/json" \\
--data '{
"model": "moonshotai/Kimi-K2-Instruct-0905",
"prompt": "some penguins building a snowman"
}'""", """curl --request POST \\
--url https://api.together.xyz/v2/videos \\
--header "Authorization: Bearer $TOGETHER_API_KEY" \\
--header "Content-Type: application/json" \\
--data '{
"model": "moonshotai/Kimi-K2-Instruct-0905",
"frame_images": [{"input_image": "https://cdn.pixabay.com/photo/2020/05/20/08/27/cat-5195431_1280.jpg"}]
}'"""]

SEED_IMAGE_SDK = """from together import Together
client = Together()
imageCompletion = client.images.generate(
model="moonshotai/Kimi-K2-Instruct-0905",
width=1024,
height=768,
steps=28,
prompt="Draw an anime style version of this image.",
image_url="https://huggingface.co/datasets/patrickvonplaten/random_img/resolve/main/yosemite.png",
)
print(imageCompletion.data[0].url)"""

SEED_VIDEO_SDK = """from together import Together
client = Together()
# Create a video generation job
job = client.videos.create(
prompt="A serene sunset over the ocean with gentle waves",
model="moonshotai/Kimi-K2-Instruct-0905"
)"""


@pytest.fixture(scope="module")
def images_host():
    """The seed's input images, served on loopback under their own paths."""
    routes = {}
    for url in IMAGE_URLS:
        routes["/" + url.split("/", 3)[3]] = reply(png_bytes((96, 64), (30, 120, 200)))
    with MediaServer(routes=routes) as server:
        yield f"http://127.0.0.1:{server.port}"


def localized(snippet: str, root: str, model: str, images_host: str) -> str:
    snippet = snippet.replace("https://api.together.xyz", root).replace(SEED_MODEL, model)
    for url in IMAGE_URLS:
        snippet = snippet.replace(url, images_host + "/" + url.split("/", 3)[3])
    return snippet


def run_curl(snippet: str, key: str) -> dict:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(["bash", "-c", snippet + " --silent --show-error"], check=True,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TOGETHER_API_KEY=key))
    return json.loads(out.stdout)


def wait_for_video(root: str, key: str, video_id: str, timeout: float = 120.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{root}/v2/videos/{video_id}",
                        headers={"Authorization": f"Bearer {key}"}).json()
        if job["status"] != "in_progress":
            return job
        time.sleep(0.2)
    raise AssertionError(f"video job {video_id} did not finish")


def test_seed_image_curl_and_sdk(diffusion_stack, images_host):
    root, key = diffusion_stack.server.root, diffusion_stack.key
    reply_ = run_curl(localized(SEED_IMAGE_CURL, root, IMAGE_MODEL, images_host), key)
    assert reply_["object"] == "list" and reply_["model"] == IMAGE_MODEL
    (item,) = reply_["data"]
    image = httpx.get(item["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    import io

    from PIL import Image
    assert Image.open(io.BytesIO(image.content)).size == (1024, 768)

    out = subprocess.run([sys.executable, "-c", localized(SEED_IMAGE_SDK, root, IMAGE_MODEL,
                                                          images_host)],
                         check=True, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TOGETHER_API_KEY=key, TOGETHER_BASE_URL=root))
    assert httpx.get(out.stdout.strip()).status_code == 200


def test_seed_video_curls_and_sdk(diffusion_stack, images_host):
    root, key = diffusion_stack.server.root, diffusion_stack.key
    for snippet in SEED_VIDEO_CURLS:
        job = run_curl(localized(snippet, root, VIDEO_MODEL, images_host), key)
        assert job["object"] == "video" and job["status"] == "in_progress", job
        done = wait_for_video(root, key, job["id"])
        assert done["status"] == "completed", done
        assert httpx.get(done["outputs"]["video_url"]).headers["content-type"] == "video/mp4"
    code = localized(SEED_VIDEO_SDK, root, VIDEO_MODEL, images_host) + "\nprint(job.id)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120,
                         env=dict(os.environ, TOGETHER_API_KEY=key, TOGETHER_BASE_URL=root))
    assert wait_for_video(root, key, out.stdout.strip())["status"] == "completed"
