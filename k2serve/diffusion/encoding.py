"""Generated pixels to files: images as PNG/JPEG, videos as MP4 (H.264 through PyAV)."""

from __future__ import annotations

import io
from fractions import Fraction


def image_bytes(image, output_format: str) -> bytes:
    """A PIL image as `png` (lossless: the pipeline's pixels exactly), `webp` or `jpeg`."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    elif output_format == "webp":
        image.convert("RGB").save(buffer, format="WEBP", quality=95)
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def frames_to_uint8(frames):
    """A pipeline's frames (F, H, W, 3) in [0, 1] as uint8, rounded as diffusers' own
    `numpy_to_pil` does."""
    import numpy as np

    return (np.clip(np.asarray(frames), 0.0, 1.0) * 255).round().astype("uint8")


def mp4_bytes(frames, fps: int, crf: int = 20) -> bytes:
    """Frames (F, H, W, 3) in [0, 1] as an H.264 MP4 (yuv420p, `crf` quality; MPEG-4 Part 2
    where the PyAV build lacks libx264)."""
    import av

    pixels = frames_to_uint8(frames)
    height, width = pixels.shape[1:3]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        for frame in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()
