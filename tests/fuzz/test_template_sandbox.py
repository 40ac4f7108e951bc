"""Chat templates come with model files (untrusted): they render in Jinja2's sandbox, on a
Jinja2 without its known sandbox escapes (issue #12)."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest

from k2serve.text.chat_template import ChatTemplate, TemplateError

FIXED = (3, 1, 6)  # CVE-2025-27516 (|attr reaches str.format); 3.1.5: CVE-2024-56201/56326


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_declared_and_installed_jinja2_have_the_sandbox_fixes():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    floor = re.search(r'"jinja2>=([0-9.]+)"', pyproject, re.IGNORECASE)
    assert floor and _release(floor.group(1)) >= FIXED, "pyproject's jinja2 floor"
    assert _release(version("jinja2")) >= FIXED


@pytest.mark.parametrize("template", [
    # CVE-2025-27516's route: str.format reached through the attr filter
    '{% set f = "{0.__class__.__mro__}"|attr("format") %}{{ f(1) }}',
    "{{ messages.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
])
def test_template_escapes_are_refused(template):
    try:
        out = ChatTemplate(template).render([{"role": "user", "content": "x"}])
    except TemplateError as exc:
        assert "unsafe" in str(exc)
    else:
        assert out == ""  # the sandbox's undefined: nothing of Python's internals leaks
