"""Our Idefics3 (SmolVLM architecture) against transformers' Idefics3ForConditionalGeneration
and Idefics3Processor, on a tiny random checkpoint: the same pixels, the same prompt ids,
logits within 1e-4 (float32), with one image and with two."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from k2serve.models.idefics3_images import ImageProcessorConfig, prepare_image  # noqa: E402
from k2serve.models.layers.attention import (  # noqa: E402
    ContiguousAttention,
    Segment,
    SequenceKVCache,
)
from k2serve.models.loader import load_model  # noqa: E402
from k2serve.serving.vision import VisionPrompter  # noqa: E402
from k2serve.text.chat_template import ChatTemplate  # noqa: E402
from k2serve.text.loading import load_tokenizer  # noqa: E402
from tests.tiny_vision import write_tiny_idefics3  # noqa: E402

LOGITS_ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def picture(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(mode)
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
                           .squeeze(), mode)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tiny-idefics3"))
    hf_model, processor = write_tiny_idefics3(directory)
    return directory, hf_model, processor


@pytest.fixture(scope="module")
def ours(checkpoint):
    directory = checkpoint[0]
    model, config = load_model(directory, progress=False)
    tokenizer = load_tokenizer(directory)
    prompter = VisionPrompter.from_checkpoint(directory, tokenizer, config)
    return model, config, tokenizer, prompter


CONVERSATIONS = {
    "one image": ([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}],
        [(50, 37, 1)]),
    "two images": ([{"role": "user", "content": [
        {"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " and "},
        {"type": "image"}, {"type": "text", "text": "."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "They differ."}]},
        {"role": "user", "content": [{"type": "text", "text": "How?"}]}],
        [(24, 30, 2), (64, 20, 3)]),
}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("size", [(50, 37), (20, 30), (64, 64), (31, 90), (5, 200)])
def test_pixels_match_the_processor(checkpoint, size, mode):
    directory, _, processor = checkpoint
    config = ImageProcessorConfig.from_checkpoint(directory, image_seq_len=4)
    image = picture(*size, seed=7, mode=mode)
    ref = processor.image_processor(image, return_tensors="pt", return_row_col_info=True)
    prepared = prepare_image(image, config)
    assert (prepared.rows, prepared.cols) == (ref["rows"][0][0], ref["cols"][0][0])
    assert torch.equal(prepared.pixel_values, ref["pixel_values"][0])


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_logits_match_transformers(checkpoint, ours, name):
    _, hf_model, processor = checkpoint
    model, config, tokenizer, prompter = ours
    messages, sizes = CONVERSATIONS[name]
    images = [picture(w, h, seed) for w, h, seed in sizes]

    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    ref_inputs = processor(text=text, images=[images], return_tensors="pt")
    with torch.no_grad():
        ref = hf_model(**ref_inputs).logits[0]

    template = ChatTemplate.from_tokenizer(tokenizer)
    rendered = template.render(messages, add_generation_prompt=True)
    assert str(rendered) == text
    prepared = [prepare_image(image, prompter.images) for image in images]
    ids = prompter.encode(rendered, prepared)
    assert ids == ref_inputs["input_ids"][0].tolist()
    inputs = prompter.image_inputs(ids, prepared)
    assert len(inputs) == len(images)

    ids_t = torch.tensor(ids)
    rows = torch.cat([torch.tensor(i.positions) for i in inputs])
    embeds = torch.cat([model.embed_images(i.pixel_values) for i in inputs])
    cache = SequenceKVCache(config.text.num_layers, config.text.num_kv_heads,
                            config.text.head_dim)
    ctx = ContiguousAttention([Segment(cache, 0, len(ids))])
    hidden = model(ids_t, torch.arange(len(ids)), ctx, image_rows=rows, image_embeds=embeds)
    logits = model.compute_logits(hidden)
    diff = (logits - ref).abs().max().item()
    print(f"{name}: {len(ids)} tokens, max abs logits diff {diff:.2e}")
    assert diff <= LOGITS_ATOL
    # the images matter: without them the logits move well past the tolerance
    plain = model.compute_logits(model(ids_t, torch.arange(len(ids)), ContiguousAttention(
        [Segment(SequenceKVCache(config.text.num_layers, config.text.num_kv_heads,
                                 config.text.head_dim), 0, len(ids))])))
    assert (plain - ref).abs().max().item() > 100 * LOGITS_ATOL


def test_tied_embeddings_load(tmp_path):
    hf_model, _ = write_tiny_idefics3(str(tmp_path), seed=1, tie=True)
    model, _ = load_model(str(tmp_path), progress=False)
    assert torch.equal(model.language.model.embed_tokens.weight,
                       hf_model.lm_head.weight)
    assert model.language.lm_head is None
