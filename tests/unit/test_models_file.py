"""`--models-file`: what a valid file gives, and the errors a wrong one gets (each names the
entry and the key)."""

from __future__ import annotations

import pytest

from k2serve.serving.models_file import entry_pricing, read_models_file
from k2serve.serving.registry import Pricing

VALID = '''
[[models]]
id = "moonshotai/Kimi-K2-Instruct-0905"
kind = "openai"
urls = ["http://h1:8000/v1", "http://h2:8000/v1"]
upstream_model = "kimi-k2"
api_key_env = "K2_KEY"
tokenizer = "/models/k2"
context_length = 131072
price_input = 0.6
price_output = 2.5
batch_price = 0.25

[[models]]
id = "sglang/model"
kind = "openai"
urls = ["http://h3:30000/v1"]
engine = "sglang"

[[models]]
id = "local/smol"
kind = "local"
'''


def write(tmp_path, text):
    path = tmp_path / "models.toml"
    path.write_text(text)
    return str(path)


def test_a_valid_file(tmp_path):
    upstream, sglang, local = read_models_file(write(tmp_path, VALID))
    assert upstream.kind == "openai" and upstream.urls == ["http://h1:8000/v1",
                                                          "http://h2:8000/v1"]
    assert (upstream.upstream_model, upstream.api_key_env, upstream.context_length) == \
        ("kimi-k2", "K2_KEY", 131072)
    assert (upstream.price_input, upstream.price_output, upstream.constrains) == (0.6, 2.5, True)
    assert (upstream.engine, sglang.engine) == ("vllm", "sglang")
    assert local.kind == "local" and local.path is None and local.urls == []
    # The batch price: the entry's share replaces the default half price; unnamed, it stays.
    assert entry_pricing(Pricing(input=1.0, output=3.0), upstream) == Pricing(
        input=0.6, output=2.5, batch=0.25)
    assert entry_pricing(Pricing(input=1.0, output=3.0), local).batch == 0.5


@pytest.mark.parametrize("text, message", [
    ('[[models]]\nid = "a"\nkind = "openai"\n', "needs 'urls'"),
    ('[[models]]\nid = "a"\nkind = "openai"\nurls = ["ftp://x"]\n', "needs 'urls'"),
    ('[[models]]\nid = "a"\nkind = "remote"\n', "kind must be one of"),
    ('[[models]]\nkind = "local"\n', "'id' is required"),
    ('[[models]]\nid = "a"\nkind = "local"\nprice = 3\n', "unknown keys price"),
    ('[[models]]\nid = "a"\nkind = "local"\nprice_input = -1\n', "must not be negative"),
    ('[[models]]\nid = "a"\nkind = "local"\ncontext_length = "big"\n', "wrong type"),
    ('[[models]]\nid = "a"\nkind = "local"\nbatch_price = 2\n', "from 0 to 1"),
    ('[[models]]\nid = "a"\nkind = "local"\n[[models]]\nid = "a"\nkind = "local"\n',
     "listed twice"),
    ('[[models]]\nid = "a"\nkind = "local"\n[[models]]\nid = "b"\nkind = "local"\n',
     "at most one model of kind 'local'"),
    ('[[models]]\nid = "a"\nkind = "openai"\nurls = ["http://x/v1"]\nengine = "tgi"\n',
     "one of vllm, sglang, k2serve, not 'tgi'"),
    ('[[models]]\nid = "a"\nkind = "local"\nengine = "vllm"\n', "an 'openai' model's engine"),
    ('title = "no models"\n', "no [[models]] entries"),
    ('[[models]\n', "cannot read"),
])
def test_a_wrong_file_names_what_is_wrong(tmp_path, text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_models_file(write(tmp_path, text))
