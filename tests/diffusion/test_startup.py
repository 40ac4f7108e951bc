"""`serve --image-model` / `--video-model` fail at start-up with a message a user can act on:
diffusers missing (which extra installs it), or a directory that is no pipeline."""

from __future__ import annotations

import subprocess
import sys

import pytest


def serve(*args: str, block_diffusers: bool = False) -> subprocess.CompletedProcess:
    code = ("import sys\n"
            + ("sys.modules['diffusers'] = None\n" if block_diffusers else "")
            + "from k2serve.cli import main\n"
            + f"sys.exit(main(['serve', '--families=', '--port', '1', *{list(args)!r}]))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_without_diffusers_the_server_says_which_extra_to_install(tmp_path):
    done = serve("--image-model", str(tmp_path), block_diffusers=True)
    assert done.returncode == 2
    assert "pip install 'k2serve[images]'" in done.stderr


@pytest.mark.parametrize("flag", ["--image-model", "--video-model"])
def test_a_directory_that_is_no_pipeline_is_refused(tmp_path, flag):
    pytest.importorskip("diffusers")
    done = serve(flag, str(tmp_path))
    assert done.returncode == 2
    assert "is not a diffusers pipeline directory (it has no model_index.json)" in done.stderr
