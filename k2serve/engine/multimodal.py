"""Images in a prompt, as the engine carries them: each image's model input and the prompt
positions (placeholder tokens) whose input embeddings its encoding replaces.

The model encodes an image (`model.embed_images(pixel_values)`, one embedding row per
position) at the first step whose prompt chunk reaches it — so chunked prefill keeps working
and an image whose positions all come from the prefix cache is never encoded. Prefix-cache
block hashes mix in each image's content hash at the block holding its first position
(`block_keys`); the hashes chain, so every later block depends on the image too, and two
prompts with equal token ids but different images never share KV."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageInput:
    pixel_values: torch.Tensor  # what model.embed_images takes ([frames, C, H, W])
    positions: tuple[int, ...]  # prompt positions its embedding rows go to, ascending
    content_hash: bytes


def block_keys(images: list[ImageInput], block_size: int) -> dict[int, bytes]:
    """Block index -> the key its prefix hash mixes in: the content hashes of the images
    whose first position lies in that block."""
    by_block: dict[int, list[bytes]] = {}
    for image in images:
        by_block.setdefault(image.positions[0] // block_size, []).append(image.content_hash)
    return {block: hashlib.blake2b(b"".join(hashes), digest_size=16,
                                   person=b"k2serve-images").digest()
            for block, hashes in by_block.items()}


def check_images(images: list[ImageInput], prompt_len: int) -> None:
    """ValueError unless every image's positions lie inside the prompt, ascending, apart."""
    seen: set[int] = set()
    for image in images:
        positions = image.positions
        if not positions or list(positions) != sorted(set(positions)):
            raise ValueError("an image's prompt positions must be ascending and distinct")
        if positions[0] < 0 or positions[-1] >= prompt_len:
            raise ValueError("an image's prompt positions lie outside the prompt")
        if seen.intersection(positions):
            raise ValueError("two images claim the same prompt position")
        seen.update(positions)


class ImageRows:
    """The rows of one step's flattened batch that take image embeddings, and those
    embeddings; each image is encoded once per admission and dropped once its last
    position has been computed."""

    def __init__(self, model):
        self.model = model

    def gather(self, batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        rows: list[torch.Tensor] = []
        embeds: list[torch.Tensor] = []
        offset = 0
        for seq, count in batch:
            images = seq.request.images
            start, end = seq.num_computed, seq.num_computed + count
            if images and start < len(seq.prompt_ids):
                for index, image in enumerate(images):
                    if image.positions[-1] < start or image.positions[0] >= end:
                        continue
                    encoded = seq.image_embeds.get(index)
                    if encoded is None:
                        encoded = self.model.embed_images(image.pixel_values)
                        if encoded.shape[0] != len(image.positions):
                            raise ValueError(f"an image encodes to {encoded.shape[0]} "
                                             f"embeddings for {len(image.positions)} positions")
                        seq.image_embeds[index] = encoded
                    positions = torch.tensor(image.positions)
                    inside = (positions >= start) & (positions < end)
                    rows.append(positions[inside] - start + offset)
                    embeds.append(encoded[inside])
                    if image.positions[-1] < end:  # fully placed: not needed again
                        del seq.image_embeds[index]
            offset += count
        if not rows:
            return None
        return torch.cat(rows), torch.cat(embeds)
