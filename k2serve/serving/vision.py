"""A vision model's prompts: images prepared as its processor says, each `<image>` the chat
template wrote expanded into the image's tokens, and the positions those tokens take handed
to the engine with the image's pixels (k2serve.engine.multimodal.ImageInput).

Only the `<image>` markers the template itself writes are expanded: `<image>` text in a
message is plain text (the template's ChatPrompt marks it so), as every control token is."""

from __future__ import annotations

import json
import math
import os

from PIL import Image

from k2serve.engine.multimodal import ImageInput
from k2serve.models.idefics3 import Idefics3Config
from k2serve.models.idefics3_images import (
    IMAGE,
    MAX_IMAGE_SIZE,
    ImageProcessorConfig,
    PreparedImage,
    image_prompt_text,
    prepare_image,
)
from k2serve.text.chat_template import ChatPrompt
from k2serve.text.tokenizer import encode_prompt
from k2serve.text.tokenizer_base import TokenizerBase


def vision_config(path: str) -> Idefics3Config | None:
    """The vision model config of a checkpoint directory (config.json's model_type idefics3),
    else None (a text model, or a .gguf file)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    return Idefics3Config.from_hf_config(config) if config.get("model_type") == "idefics3" \
        else None


class VisionPrompter:
    def __init__(self, tokenizer: TokenizerBase, images: ImageProcessorConfig,
                 image_token_id: int):
        if tokenizer.token_to_id(IMAGE) != image_token_id:
            raise ValueError(f"the tokenizer's {IMAGE} token ({tokenizer.token_to_id(IMAGE)}) "
                             f"is not the model's image_token_id ({image_token_id})")
        self.tokenizer = tokenizer
        self.images = images
        self.image_token_id = image_token_id

    @classmethod
    def from_checkpoint(cls, directory: str, tokenizer: TokenizerBase,
                        config: Idefics3Config) -> VisionPrompter:
        images = ImageProcessorConfig.from_checkpoint(directory, config.image_seq_len)
        return cls(tokenizer, images, config.image_token_id)

    def prepare(self, images: list[Image.Image]) -> list[PreparedImage]:
        """Seconds for large images: run it off the event loop."""
        return [prepare_image(image, self.images) for image in images]

    def expand(self, rendered: str, prepared: list[PreparedImage] | None) -> ChatPrompt:
        """The prompt with each template-written `<image>` expanded for its image, in order.
        `prepared` None: every image at its largest layout (a bound on the prompt's tokens,
        before the images are fetched)."""
        segments = getattr(rendered, "segments", None) or ((str(rendered), False),)
        out: list[tuple[str, bool]] = []
        count = 0
        for text, plain in segments:
            if plain or IMAGE not in text:
                out.append((text, plain))
                continue
            pieces = text.split(IMAGE)
            for i, piece in enumerate(pieces):
                if i:
                    out.append((self._layout(prepared, count), False))
                    count += 1
                if piece:
                    out.append((piece, False))
        if prepared is not None and count != len(prepared):
            raise ValueError(f"the chat template placed {count} image(s) for the "
                             f"{len(prepared)} image part(s) in the messages")
        return ChatPrompt(out)

    def _layout(self, prepared: list[PreparedImage] | None, index: int) -> str:
        seq_len = self.images.image_seq_len
        if prepared is None:
            side = self._max_side()
            return image_prompt_text(side, side, seq_len) if side > 1 else \
                image_prompt_text(0, 0, seq_len)
        if index >= len(prepared):
            raise ValueError(f"the chat template placed more images than the "
                             f"{len(prepared)} image part(s) in the messages")
        image = prepared[index]
        return image_prompt_text(image.rows, image.cols, seq_len)

    def _max_side(self) -> int:
        if not self.images.do_image_splitting:
            return 1
        return math.ceil(min(self.images.longest_edge, MAX_IMAGE_SIZE) / self.images.frame)

    def encode(self, rendered: str, prepared: list[PreparedImage] | None) -> list[int]:
        return encode_prompt(self.tokenizer, self.expand(rendered, prepared))

    def image_inputs(self, ids: list[int], prepared: list[PreparedImage]) -> list[ImageInput]:
        """Each image with the prompt positions of its tokens (in order)."""
        positions = [i for i, token in enumerate(ids) if token == self.image_token_id]
        per_frame = self.images.image_seq_len
        needed = sum(image.num_frames for image in prepared) * per_frame
        if len(positions) != needed:
            raise ValueError(f"the prompt has {len(positions)} image tokens where its images "
                             f"need {needed}")
        inputs, start = [], 0
        for image in prepared:
            n = image.num_frames * per_frame
            inputs.append(ImageInput(image.pixel_values, tuple(positions[start:start + n]),
                                     image.content_hash))
            start += n
        return inputs
