"""The playground's static files ship in the wheel (CI installs with `pip install .`, where
only package data exists) and reference only files that are there."""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path

import pytest

from k2serve.api.routes.playground import FILES, ROOT

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
API_PACKAGE = ROOT.parent.parent  # k2serve/api


def test_every_file_is_package_data():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    globs = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-data"]["k2serve.api"]
    on_disk = [p.relative_to(API_PACKAGE).as_posix() for p in ROOT.rglob("*") if p.is_file()]
    assert on_disk and len(on_disk) == len(FILES)
    missing = [f for f in on_disk if not any(fnmatch(f, g) and f.count("/") == g.count("/")
                                             for g in globs)]
    assert missing == [], f"add to [tool.setuptools.package-data] in pyproject.toml: {missing}"


def test_references_resolve_and_stay_local():
    for name, path in FILES.items():
        text = path.read_text()
        refs = re.findall(r'from "(\.[^"]+)"', text) + re.findall(r'(?:src|href)="([^"#]+)"', text)
        for ref in refs:
            assert not re.match(r"[a-z]+:|//", ref), f"{name} loads {ref} from elsewhere"
            target = (Path(name).parent / ref).as_posix()
            target = re.sub(r"(^|/)\./", r"\1", target)
            assert target in FILES, f"{name} references {ref}, which is not shipped"
