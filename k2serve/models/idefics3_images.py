"""Idefics3 (SmolVLM) image preprocessing and prompt layout, as the checkpoint's processor
config says: transformers' Idefics3 image processor (PIL backend) and Idefics3Processor,
step for step, so the pixels and the prompt's image tokens are the ones the model was
trained on.

An image is resized so its longest edge is `size.longest_edge`, then up to multiples of
`max_image_size.longest_edge` (the vision encoder's frame); with `do_image_splitting` it is cut
into rows x cols tiles of that frame, followed by the whole image downscaled to one frame.
Each frame becomes `image_seq_len` `<image>` tokens in the prompt, laid out as
`<fake_token_around_image><row_R_col_C><image>...` per tile and
`<fake_token_around_image><global-img><image>...<fake_token_around_image>` for the whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

MAX_IMAGE_SIZE = 4096  # transformers' absolute bound on the resized image's longest edge
FAKE, IMAGE, GLOBAL = "<fake_token_around_image>", "<image>", "<global-img>"


@dataclass(frozen=True)
class ImageProcessorConfig:
    longest_edge: int = 4 * 364  # size.longest_edge
    frame: int = 364  # max_image_size.longest_edge: the vision encoder's input side
    do_resize: bool = True
    do_image_splitting: bool = True
    do_convert_rgb: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: int = Image.Resampling.LANCZOS
    image_seq_len: int = 169  # tokens per frame (the processor's)

    @classmethod
    def from_checkpoint(cls, directory: str, image_seq_len: int) -> ImageProcessorConfig:
        """preprocessor_config.json (the image processor's keys), or processor_config.json's
        `image_processor` (transformers 5 writes it there). `image_seq_len`: the model's; a
        processor config that says otherwise is an error."""
        processor = _read(os.path.join(directory, "processor_config.json"))
        images = _read(os.path.join(directory, "preprocessor_config.json")) or \
            processor.get("image_processor") or {}
        if not images:
            raise ValueError(f"{directory}: no image processor config (preprocessor_config.json "
                             f"or processor_config.json)")
        said = processor.get("image_seq_len")
        if said is not None and int(said) != image_seq_len:
            raise ValueError(f"{directory}: processor image_seq_len {said} does not match the "
                             f"model's {image_seq_len} tokens per frame")
        defaults = cls()
        size = images.get("size") or {}
        frame = images.get("max_image_size") or {}
        return cls(
            longest_edge=int(size.get("longest_edge", defaults.longest_edge)),
            frame=int(frame.get("longest_edge", defaults.frame)),
            do_resize=bool(images.get("do_resize", True)),
            do_image_splitting=bool(images.get("do_image_splitting", True)),
            do_convert_rgb=bool(images.get("do_convert_rgb", True)),
            do_rescale=bool(images.get("do_rescale", True)),
            rescale_factor=float(images.get("rescale_factor", 1 / 255)),
            do_normalize=bool(images.get("do_normalize", True)),
            image_mean=_channels(images.get("image_mean", defaults.image_mean)),
            image_std=_channels(images.get("image_std", defaults.image_std)),
            resample=int(images.get("resample", defaults.resample)),
            image_seq_len=image_seq_len)

    @property
    def max_frames(self) -> int:
        """The most frames one image can become: a full grid of tiles plus the whole."""
        if not self.do_image_splitting:
            return 1
        side = math.ceil(min(self.longest_edge, MAX_IMAGE_SIZE) / self.frame)
        return side * side + 1 if side > 1 else 1


@dataclass(frozen=True)
class PreparedImage:
    """One image, ready for the model: its frames and where they go in the prompt."""

    pixel_values: torch.Tensor  # [frames, 3, frame, frame] float32
    rows: int  # tiles down (0: not split)
    cols: int  # tiles across
    content_hash: bytes  # of the frames' pixels: equal hashes, equal image embeddings

    @property
    def num_frames(self) -> int:
        return self.pixel_values.shape[0]


def _read(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _channels(value) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency composited onto white (as transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """transformers' _resize_output_size_rescale_to_max_len then ..._scale_below_upper_bound."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def _frame_multiple_size(height: int, width: int, frame: int) -> tuple[int, int]:
    """transformers' resize_for_vision_encoder: both sides up to multiples of the frame."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / frame) * frame
        height = math.ceil(int(width / aspect) / frame) * frame
    else:
        height = math.ceil(height / frame) * frame
        width = math.ceil(int(height * aspect) / frame) * frame
    return height, width


def prepare_image(image: Image.Image, config: ImageProcessorConfig) -> PreparedImage:
    if config.do_convert_rgb:
        image = to_rgb(image)
    resample = Image.Resampling(config.resample)

    def resized(img: Image.Image, height: int, width: int) -> Image.Image:
        return img.resize((width, height), resample=resample)

    if config.do_resize:
        image = resized(image, *_longest_edge_size(image.height, image.width,
                                                   config.longest_edge))
    rows = cols = 0
    if config.do_image_splitting:
        image = resized(image, *_frame_multiple_size(image.height, image.width, config.frame))
        frames = []
        if image.height > config.frame or image.width > config.frame:
            rows, cols = image.height // config.frame, image.width // config.frame
            pixels = np.asarray(image)
            frames = [pixels[r * config.frame:(r + 1) * config.frame,
                             c * config.frame:(c + 1) * config.frame]
                      for r in range(rows) for c in range(cols)]
            image = resized(image, config.frame, config.frame)
        frames.append(np.asarray(image))
    else:
        frames = [np.asarray(resized(image, config.frame, config.frame))]
    stacked = np.stack(frames).transpose(0, 3, 1, 2)  # [F, C, H, W] uint8
    values = stacked.astype(np.float32)
    if config.do_rescale:  # float64 then float32, as transformers rounds
        values = (stacked.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.do_normalize:
        mean = np.array(config.image_mean, dtype=np.float32)[None, :, None, None]
        std = np.array(config.image_std, dtype=np.float32)[None, :, None, None]
        values = (values - mean) / std
    digest = hashlib.blake2b(stacked.tobytes(), digest_size=16, person=b"k2serve-image")
    digest.update(f"{stacked.shape}".encode())
    return PreparedImage(torch.from_numpy(np.ascontiguousarray(values)), rows, cols,
                         digest.digest())


def image_prompt_text(rows: int, cols: int, image_seq_len: int) -> str:
    """What one `<image>` of the rendered prompt becomes (Idefics3Processor's text)."""
    tokens = IMAGE * image_seq_len
    whole = f"{FAKE}{GLOBAL}{tokens}{FAKE}"
    if rows == 0 and cols == 0:
        return whole
    tiles = "".join("".join(f"{FAKE}<row_{r + 1}_col_{c + 1}>{tokens}" for c in range(cols))
                    + "\n" for r in range(rows))
    return f"{tiles}\n{whole}"
