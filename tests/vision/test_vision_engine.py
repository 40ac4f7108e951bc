"""The engine with images: chunked prefill places each image's embeddings where a whole
prefill does, and the prefix cache keys blocks by the images they hold."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from k2serve.engine.config import EngineConfig
from k2serve.engine.core import EngineCore
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import GenerationRequest
from k2serve.models.loader import load_model
from k2serve.serving.vision import VisionPrompter
from k2serve.text.chat_template import ChatTemplate
from k2serve.text.loading import load_tokenizer
from tests.tiny_vision import write_tiny_idefics3, write_tiny_text_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tiny-idefics3"))
    write_tiny_idefics3(directory)
    model, config = load_model(directory, progress=False)
    tokenizer = load_tokenizer(directory)
    return model, VisionPrompter.from_checkpoint(directory, tokenizer, config), \
        ChatTemplate.from_tokenizer(tokenizer)


def prompt(tiny, images, text="Tell me about these."):
    _, prompter, template = tiny
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    rendered = template.render([{"role": "user", "content": parts}])
    prepared = prompter.prepare(images)
    ids = prompter.encode(rendered, prepared)
    return ids, prompter.image_inputs(ids, prepared)


def run(core, request_id, ids, images, max_tokens=6):
    core.add(GenerationRequest(request_id, ids, SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True), images=images))
    tokens, cached = [], None
    while core.has_work():
        for out in core.step():
            if out.request_id == request_id:
                cached = out.num_cached_tokens if cached is None else cached
                tokens += out.token_ids
    return tokens, cached


def engine(model, **overrides):
    return EngineCore(model, EngineConfig(**{"context_length": 512, "num_kv_blocks": 128,
                                             "block_size": 8, **overrides}))


def test_chunked_prefill_places_images_as_a_whole_prefill_does(tiny):
    model = tiny[0]
    ids, images = prompt(tiny, [picture(50, 37, 1), picture(20, 40, 2)])
    assert len(ids) > 40
    whole, _ = run(engine(model, max_step_tokens=512), "whole", ids, images)
    chunked, _ = run(engine(model, max_step_tokens=7), "chunked", ids, images)
    assert chunked == whole
    # the images matter to the output: other pixels in the same layout answer otherwise
    _, others = prompt(tiny, [picture(50, 37, 8), picture(20, 40, 9)])
    outputs = {tuple(run(engine(model), f"other{i}", ids, imgs)[0])
               for i, imgs in enumerate([images, others])}
    assert len(outputs) == 2


def test_prefix_cache_keys_blocks_by_their_images(tiny):
    model = tiny[0]
    core = engine(model)
    ids, images = prompt(tiny, [picture(40, 40, 3)])
    same_ids, other_images = prompt(tiny, [picture(40, 40, 4)])
    assert same_ids == ids
    first_image = images[0].positions[0]
    assert run(core, "a", ids, images)[1] == 0
    assert run(core, "b", ids, images)[1] > first_image  # past the image: shared
    # equal ids, another image: only the blocks wholly before the image are shared
    assert run(core, "c", ids, other_images)[1] == first_image // 8 * 8
    assert core.stats()["kv_blocks_free"] == core.stats()["kv_blocks_total"]


def test_a_text_model_refuses_images(tiny, tmp_path):
    write_tiny_text_model(str(tmp_path))
    text_model, _ = load_model(str(tmp_path), progress=False)
    ids, images = prompt(tiny, [picture(10, 10, 5)])
    with pytest.raises(ValueError, match="takes no images"):
        engine(text_model).add(GenerationRequest("x", ids, SamplingParams(), images=images))
