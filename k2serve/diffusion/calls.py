"""A request's parameters as one pipeline call, checked against what the pipeline takes."""

from __future__ import annotations

from k2serve.diffusion.pipelines import Call, DiffusionModel
from k2serve.errors import bad_request


def pipeline_call(model: DiffusionModel, model_id: str, *, prompt: str | None, width: int,
                  height: int, steps: int, seed: int, image=None,
                  optional: dict[str, tuple[str, object]], fixed: dict | None = None) -> Call:
    """`optional`: pipeline argument -> (the request's parameter, its value), sent when the
    value is not None; a pipeline that does not take it is a 400 naming the parameter.
    The input `image` is resized to width x height (so every pipeline makes that size)."""
    if image is not None:
        try:
            accepted = model.parameters(with_image=True)
        except ValueError as exc:
            raise bad_request(f"The model '{model_id}' cannot take an input image: {exc}.",
                              param="image_url" if model.kind == "image" else "frame_images")
        if image.size != (width, height):
            from PIL import Image

            image = image.resize((width, height), Image.Resampling.LANCZOS)
    else:
        accepted = model.parameters(with_image=False)
    kwargs = {"num_inference_steps": steps}
    if prompt is not None:
        kwargs["prompt"] = prompt
    if "width" in accepted:
        kwargs.update(width=width, height=height)
    for argument, (param, value) in optional.items():
        if value is None:
            continue
        if argument not in accepted:
            raise bad_request(f"The model '{model_id}' ({model.class_name}) does not take "
                              f"'{param}'.", param=param, code="unsupported_parameter")
        kwargs[argument] = value
    kwargs.update(fixed or {})
    return Call(kwargs=kwargs, steps=steps, image=image, seed=seed)
