"""The endpoints file (`k2serve serve --ray --endpoints-file`): a vLLM model's context length
is the one its vLLM serves (its --max-model-len) unless set, and bad entries are refused
naming the entry and key."""

from __future__ import annotations

import pytest

from k2serve.serving.dedicated_config import read_dedicated_config


def config(tmp_path, models: str):
    path = tmp_path / "endpoints.toml"
    path.write_text(models)
    return read_dedicated_config(str(path))


@pytest.mark.parametrize("args, expected", [
    ('["--enforce-eager", "--max-model-len", "1024"]', 1024),
    ('["--max-model-len=2048"]', 2048),
    ('["--max-model-len", "128k"]', None),  # not a plain integer: the checkpoint's applies
    ('[]', None),
])
def test_a_vllm_model_takes_its_max_model_len_as_context_length(tmp_path, args, expected):
    loaded = config(tmp_path, f'[[models]]\nid = "m"\nengine = "vllm"\npath = "/m"\n'
                              f'vllm_args = {args}\n')
    assert loaded.find_model("m").context_length == expected


def test_an_explicit_context_length_wins(tmp_path):
    loaded = config(tmp_path, '[[models]]\nid = "m"\nengine = "vllm"\npath = "/m"\n'
                              'context_length = 512\nvllm_args = ["--max-model-len", "1024"]\n')
    assert loaded.find_model("m").context_length == 512


@pytest.mark.parametrize("entry, message", [
    ('id = "m"\nengine = "vllm"\n', "needs 'path'"),
    ('id = "m"\nengine = "sglang"\n', "engine must be one of"),
    ('id = "m"\nengine = "vllm"\npath = "/m"\nvllm_args = [1]\n', "list of strings"),
])
def test_bad_model_entries_name_the_entry(tmp_path, entry, message):
    with pytest.raises(ValueError, match=message) as info:
        config(tmp_path, f"[[models]]\n{entry}")
    assert "models[0]" in str(info.value)
