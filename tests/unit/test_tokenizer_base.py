"""Both tokenizers are a `TokenizerBase` and handle special tokens the same way."""

import pytest

from k2serve.models.tiny_k2_tokenizer import write_tiny_k2_tokenizer_files
from k2serve.text.k2_tokenizer import K2Tokenizer
from k2serve.text.loading import load_tokenizer
from k2serve.text.tokenizer import Tokenizer
from k2serve.text.tokenizer_base import TokenizerBase
from tests.tiny_models import smollm2_gguf_path


@pytest.fixture(scope="module", params=["smollm2-gguf", "tiny-k2"])
def tok(request, tmp_path_factory):
    if request.param == "smollm2-gguf":
        t = load_tokenizer(smollm2_gguf_path())
        assert type(t) is Tokenizer
    else:
        d = tmp_path_factory.mktemp("k2tok")
        write_tiny_k2_tokenizer_files(str(d))
        t = load_tokenizer(str(d))
        assert type(t) is K2Tokenizer
    return t


def test_the_base_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        TokenizerBase({})


def test_is_a_tokenizer_base(tok):
    assert isinstance(tok, TokenizerBase)
    assert repr(tok).startswith(f"{type(tok).__name__}(")


def test_named_special_tokens_are_their_ids(tok):
    assert tok.special_tokens_map["eos_token"] == tok.eos_token
    for name, text in tok.special_tokens_map.items():
        assert tok.token_to_id(text) == getattr(tok, name + "_id"), name
    assert tok.eos_token_id in tok.stop_token_ids
    assert tok.chat_template and tok.chat_template == tok.chat_templates["default"]


def test_added_tokens_are_special_control_and_stop_tokens(tok):
    added = set(tok.added_tokens)
    assert tok.special_ids <= added and tok.special_ids
    assert tok.control_tokens <= {text for text, _ in tok.added_tokens.values()}
    assert tok.stop_token_ids <= added
    assert tok.token_to_id("<|im_end|>") in tok.stop_token_ids  # both end turns with it


def test_control_token_text_is_one_id_or_plain_text(tok):
    for text in sorted(tok.control_tokens):
        token_id = tok.added_token_ids[text]
        assert tok.encode(text) == [token_id], text
        assert tok.token_bytes(token_id) == text.encode("utf-8")
        plain = tok.encode(text, allow_special_tokens=False)
        assert not set(plain) & set(tok.added_tokens), text
        assert tok.decode(plain) == text
        shown = tok.decode([token_id])
        assert shown == ("" if token_id in tok.special_ids else text)
        assert tok.decode([token_id], skip_special_tokens=False) == text
        assert tok.convert_ids_to_tokens([token_id]) == [tok.id_to_token(token_id)]
