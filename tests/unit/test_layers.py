"""The package's layers point one way (docs/ARCHITECTURE.md): a module imports only from its
own layer or the layers below it. Every import counts, inside functions and under
TYPE_CHECKING too: a lazy import that points up is still a dependency that points up."""

from __future__ import annotations

import ast
from pathlib import Path

import k2serve

PACKAGE = Path(k2serve.__file__).parent

# Top to bottom. The first name of a module path below k2serve decides its layer.
LAYERS: list[tuple[str, set[str]]] = [
    ("entry points", {"cli", "client_cli", "endpoints_cli", "batch_cli", "doctor", "bench", "app", "top"}),
    ("platform", {"platform"}),
    ("api", {"api"}),
    ("model families", {"audio", "embeddings", "safety", "diffusion"}),
    ("serving", {"serving"}),
    ("engine", {"engine"}),
    ("models", {"models"}),
    ("foundations", {"text", "structured", "native", "errors", "telemetry", "media",
                     "__init__"}),
]

# (importing module, imported module) pairs allowed to point up, each with its reason.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> int:
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    for index, (_, names) in enumerate(LAYERS):
        if head in names:
            return index
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS "
                         f"(tests/unit/test_layers.py) and to docs/ARCHITECTURE.md")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str) -> set[str]:
    """The k2serve modules `path` imports (`from k2serve import native` imports
    k2serve.native; `from k2serve import __version__` the package itself)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("k2serve"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("k2serve"):
                continue
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                as_module = PACKAGE.parent / Path(*candidate.split("."))
                is_module = as_module.with_suffix(".py").exists() or as_module.is_dir()
                found.add(candidate if is_module else source)
    return found


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        here = layer_of(module)
        for target in sorted(imported_modules(path, module)):
            there = layer_of(target)
            if there < here and (module, target) not in ALLOWED_UPWARD:
                problems.append(f"{module} ({LAYERS[here][0]}) imports {target} "
                                f"({LAYERS[there][0]})")
    return problems


def test_every_import_points_down_or_sideways():
    assert upward_imports() == []


def test_the_allow_list_holds_only_imports_that_exist():
    stale = [pair for pair in ALLOWED_UPWARD
             if pair[1] not in imported_modules(
                 PACKAGE.parent / Path(*pair[0].split(".")).with_suffix(".py"), pair[0])]
    assert stale == []


def test_an_upward_import_is_caught(tmp_path, monkeypatch):
    """The walk sees a lazy import inside a function (the kind that hides best)."""
    module = PACKAGE / "engine" / "core.py"
    source = module.read_text() + "\n\ndef _probe():\n    from k2serve.api import usage\n"
    fake = tmp_path / "k2serve" / "engine" / "core.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    found = imported_modules(fake, "k2serve.engine.core")
    assert "k2serve.api.usage" in found
    assert layer_of("k2serve.api.usage") < layer_of("k2serve.engine.core")
