"""Model families beside the chat model, and which of them `serve` loads.

Each family lives in its own package and exposes `register(registry, options)`, which adds
its models' specs to the registry at once (so /v1/models lists them within seconds) with
backends whose weights load in the background (`BackgroundModel`). A family whose packages
are not installed is skipped with a note, never a failed start-up.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

from k2serve.serving.registry import ModelRegistry

# family -> "module:function" registering its models. Imported only when selected.
FAMILY_REGISTRARS: dict[str, str] = {
    "embedding": "k2serve.embeddings.serving:register",  # also serves rerank
    "moderation": "k2serve.safety.serving:register",
    "audio": "k2serve.audio.serving:register",  # speech and transcription
}
FAMILIES = ("chat", *FAMILY_REGISTRARS)


@dataclass
class FamilyOptions:
    data_dir: str  # where a family may unpack or convert weights once
    progress: bool = True
    extra: dict = field(default_factory=dict)


def parse_families(value: str) -> set[str]:
    """`--families chat,embedding` / `all`; unknown names are a usage error."""
    names = {n.strip() for n in value.split(",") if n.strip()}
    if "all" in names:
        return set(FAMILIES)
    unknown = names - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown model families {sorted(unknown)}; choose from "
                         f"{', '.join(FAMILIES)} or all")
    return names


def register_families(registry: ModelRegistry, families: set[str],
                      options: FamilyOptions) -> None:
    for family, target in FAMILY_REGISTRARS.items():
        if family not in families:
            continue
        module_name, function = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            print(f"k2serve: not serving {family} models: {exc}", file=sys.stderr)
            continue
        getattr(module, function)(registry, options)
