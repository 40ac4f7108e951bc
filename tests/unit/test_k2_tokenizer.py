import json

import pytest
import regex
import tiktoken
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from k2serve.models.tiny_k2_tokenizer import tiny_k2_ranks, write_tiny_k2_tokenizer_files
from k2serve.text import k2_tokenizer as k2
from k2serve.text.byte_level import CHAR_TO_BYTE, spell_bytes
from k2serve.text.detokenizer import IncrementalDetokenizer
from k2serve.text.gguf_tokenizer import pre_tokenizer_for
from k2serve.text.k2_tokenizer import (
    PAT_STR,
    K2Tokenizer,
    packaged_k2_chat_template,
    read_tiktoken_bpe,
)
from k2serve.text.loading import load_tokenizer
from k2serve.text.tokenizer import Tokenizer

TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("k2tok")
    write_tiny_k2_tokenizer_files(str(d))
    return d


@pytest.fixture(scope="module")
def tok(tiny_dir):
    t = load_tokenizer(str(tiny_dir))
    assert isinstance(t, K2Tokenizer)
    return t


@pytest.fixture(scope="module")
def reference(tok):
    """tiktoken's own Encoding on the same ranks, pattern and specials: the reference."""
    ranks = read_tiktoken_bpe(str(tok.name_or_path) + "/tiktoken.model")
    specials = {tok.id_to_token(i): i for i in range(len(ranks), tok.vocab_size)}
    return tiktoken.Encoding("ref", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


# ---- files and special tokens ------------------------------------------------------------------


def test_tiny_files_match_the_k2_layout(tiny_dir, tok):
    n = len(tiny_k2_ranks())
    assert write_tiny_k2_tokenizer_files(str(tiny_dir / "again")) == n + 256 == tok.vocab_size
    assert (tiny_dir / "tiktoken.model").read_bytes() == (tiny_dir / "again" / "tiktoken.model").read_bytes()
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"][str(n + 2)]["content"] == "<|im_end|>"
    assert config["added_tokens_decoder"][str(n + 11)] == {
        "content": "<|tool_calls_section_begin|>", "lstrip": False, "normalized": False,
        "rstrip": False, "single_word": False, "special": False}
    assert (tok.bos_token_id, tok.bos_token, tok.eos_token_id, tok.eos_token) == (n, "[BOS]", n + 1, "[EOS]")
    assert (tok.unk_token_id, tok.pad_token_id) == (n + 254, n + 255)
    assert tok.special_tokens_map == {"bos_token": "[BOS]", "eos_token": "[EOS]",
                                      "unk_token": "[UNK]", "pad_token": "[PAD]"}
    # K2 ends its turns with <|im_end|>; [EOS] stops too.
    assert tok.stop_token_ids == frozenset({n + 1, n + 2})
    tool_tokens = {n + 11, n + 12, n + 13, n + 14, n + 15}
    assert tok.special_ids == frozenset(range(n, n + 256)) - tool_tokens
    assert tok.id_to_token(n + 5) == f"<|reserved_token_{n + 5}|>"
    assert tok.chat_template == packaged_k2_chat_template()


def test_special_tokens_in_text_are_single_ids(tok):
    n = tok.num_base_tokens
    text = "<|im_user|>user<|im_middle|>hi<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == n + 3 and ids[-1] == n + 2 and (n + 17) in ids
    assert tok.decode(ids) == "userhi"
    assert tok.decode(ids, skip_special_tokens=False) == text
    # Tool-call markers are not "special": skipping keeps them for the tool parser.
    call = "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}"
    assert tok.decode(tok.encode(call)) == call
    # Untrusted text can be encoded with the markers as plain text; K2 adds no BOS either way.
    plain = tok.encode(text, allow_special_tokens=False)
    assert not set(plain) & set(range(n, tok.vocab_size)) and tok.decode(plain) == text
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")
    # Every reserved text (tool-call markers too) is a control token a user must not type.
    assert len(tok.control_tokens) == 256 and "<|tool_calls_section_begin|>" in tok.control_tokens
    every = "".join(sorted(tok.control_tokens))
    assert max(tok.encode(every, allow_special_tokens=False)) < n


def test_unknown_ids_and_token_strings(tok):
    assert tok.decode([10**9, -1, tok.encode("a")[0]]) == "a"
    assert tok.token_bytes(10**9) == b"" and tok.token_bytes(-1) == b""
    assert tok.id_to_token(10**9) is None and tok.token_to_id("no such token") is None
    assert tok.convert_ids_to_tokens(tok.encode(" the")) == ["Ġthe"]
    assert tok.token_bytes(tok.token_to_id("Ġthe")) == b" the"
    assert tok.token_bytes(tok.eos_token_id) == b"[EOS]"
    assert all(tok.token_to_id(tok.id_to_token(i)) == i for i in range(tok.vocab_size))


@pytest.mark.parametrize("text", [
    "", "Hello World!", "def f(x):\n    return {'a': [1, 2]}  # ok\n", "北京今天天气晴朗。你好，世界！",
    "emoji 😀🎉👍🏽 ✨ and ZWJ 👨‍👩‍👧", "Café naïve Ωmega Здравствуйте", " \t\n\r\n  trailing   ",
    "mixed中文English混合123456", "\x00\x7f\u200b\ufeff",
])
def test_round_trip(tok, reference, text):
    ids = tok.encode(text)
    assert ids == reference.encode(text, allowed_special="all")
    assert tok.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
@example(text="<|end_header_id|>")
@example(text="a<|im_end|>b")
def test_property_same_ids_as_tiktoken_and_round_trip(tok, reference, text):
    ids = tok.encode(text)
    assert ids == reference.encode(text, allowed_special="all")
    # keeping special tokens: hypothesis does write "<|end_header_id|>" now and then, which
    # encodes to the special id that decode() skips by default
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


# ---- the split pattern ---------------------------------------------------------------------------


def tiktoken_pieces(text: str) -> list[str]:
    """How tiktoken itself splits `text`: with every substring of it in the vocabulary, BPE merges
    each regex piece into one token, so the tokens are the pieces."""
    data = text.encode("utf-8")
    ranks = {bytes([b]): b for b in range(256)}
    for length in range(2, len(data) + 1):
        for i in range(len(data) - length + 1):
            ranks.setdefault(data[i:i + length], len(ranks))
    enc = tiktoken.Encoding("pieces", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    return [enc.decode_single_token_bytes(t).decode("utf-8") for t in enc.encode_ordinary(text)]


def gguf_kimi_pieces(text: str) -> list[str]:
    # The `tokenizers` pre-tokenizer k2serve uses for K2 GGUF files.
    return ["".join(chr(CHAR_TO_BYTE[c]) for c in p).encode("latin-1").decode()
            for p, _ in pre_tokenizer_for("kimi-k2").pre_tokenize_str(text)]


@pytest.mark.parametrize("text, pieces", [
    ("中文English混合", ["中文", "English", "混合"]),
    ("北京市 Pascal 12345", ["北京市", " Pascal", " ", "123", "45"]),
    ("Hello World!", ["Hello", " World", "!"]),
    ("I'm DON'T they'LL", ["I'm", " DON'T", " they'LL"]),
    ("x  =  1\n\n  y", ["x", " ", " =", " ", " ", "1", "\n\n", " ", " y"]),
    ("naïve Ωmega", ["naïve", " Ωmega"]),
    ("a😀😀 b", ["a", "😀😀", " b"]),
])
def test_split_pattern(text, pieces):
    assert tiktoken_pieces(text) == pieces
    # Python's `regex` reads `&&` as intersection only in V1 mode.
    assert regex.findall(PAT_STR, text, flags=regex.V1) == pieces
    assert gguf_kimi_pieces(text) == pieces


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("aZé中文1 \n\r\t'!😀Ω_-"), max_size=14))
def test_property_split_pattern_agrees_with_tiktoken(text):
    pieces = tiktoken_pieces(text)
    assert "".join(pieces) == text
    assert regex.findall(PAT_STR, text, flags=regex.V1) == pieces
    assert gguf_kimi_pieces(text) == pieces


def _kimi_split(s: str, limit: int):
    # tokenization_kimi.py's _split_whitespaces_or_nonwhitespaces, verbatim in behaviour.
    current_len, current_is_space, start = 0, s[0].isspace() if s else False, 0
    for i in range(len(s)):
        now_space = s[i].isspace()
        if current_is_space ^ now_space:
            current_len, current_is_space = 1, now_space
        else:
            current_len += 1
            if current_len > limit:
                yield s[start:i]
                start, current_len = i, 1
    yield s[start:]


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("ab \n\u3000"), max_size=40))
def test_property_long_runs_are_cut_like_tokenization_kimi(text):
    expected = [p for start in range(0, len(text), 11) for p in _kimi_split(text[start:start + 11], 3)]
    with pytest.MonkeyPatch.context() as mp:  # small limits stand in for 400k / 25k characters
        mp.setattr(k2, "_MAX_ENCODE_CHARS", 11)
        mp.setattr(k2, "_MAX_RUN_CHARS", 3)
        assert [p for p in k2._encode_pieces(text) if p] == [p for p in expected if p]


def test_long_whitespace_run_encodes(tok, reference):
    text = "a" + " " * 60_000 + "b"  # cut into runs of 25k, as the reference tokenizer does
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == [t for p in ("a" + " " * 25_000, " " * 25_000, " " * 10_000 + "b")
                   for t in reference.encode(p)]


# ---- incremental detokenization ------------------------------------------------------------------


def stream(tok, ids, skip=True):
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    return [d.add(i) for i in ids] + [d.flush()]


def test_multibyte_characters_split_across_tokens(tok):
    for text in ("a😀b", "北京晴朗", "👨‍👩‍👧!", "Ωmega"):
        ids = tok.encode(text)
        deltas = stream(tok, ids)
        assert "".join(deltas) == text
        assert all("\ufffd" not in d for d in deltas)
    ids = tok.encode("a😀b")
    assert len(ids) > 3 and "😀" in "".join(stream(tok, ids)[1:-1])


@settings(max_examples=100, deadline=None)
@given(data=st.data(), skip=st.booleans())
def test_property_streamed_ids_concat_to_decode(tok, data, skip):
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=25))
    assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


# ---- construction ----------------------------------------------------------------------------------


def test_load_tokenizer_keeps_hugging_face_checkpoints(tmp_path):
    vocab = {spell_bytes(bytes([b])): b for b in range(256)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(str(tmp_path))
    assert isinstance(t, Tokenizer) and t.decode(t.encode("héllo")) == "héllo"


def test_config_fallbacks(tmp_path, tiny_dir):
    # Only tiktoken.model: K2's names for the reserved ids, the packaged template.
    (tmp_path / "tiktoken.model").write_bytes((tiny_dir / "tiktoken.model").read_bytes())
    t = load_tokenizer(str(tmp_path))
    n = t.num_base_tokens
    assert t.id_to_token(n + 13) == "<|tool_call_begin|>" and (n + 13) not in t.special_ids
    assert t.chat_template == packaged_k2_chat_template() and t.eos_token_id == n + 1
    # The config's template and generation_config's eos are used when present.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "[EOS]"}, "chat_template": "{{ messages }}",
        "added_tokens_decoder": {str(n + 1): {"content": "[EOS]", "special": True},
                                 str(n + 2): {"content": "<|im_end|>", "special": True}}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": n + 7}))
    t = load_tokenizer(str(tmp_path))
    assert t.chat_template == "{{ messages }}"
    assert t.id_to_token(n + 13) == f"<|reserved_token_{n + 13}|>"  # only the config names tokens
    assert t.stop_token_ids == frozenset({n + 1, n + 2, n + 7})


def test_bad_vocab_files_are_refused(tmp_path):
    (tmp_path / "a").write_bytes(b"YQ== 0\nYg== 2\n")
    with pytest.raises(ValueError, match="not exactly"):
        read_tiktoken_bpe(str(tmp_path / "a"))
    (tmp_path / "b").write_bytes(b"YQ== 0\nnot-base64!\n")
    with pytest.raises(ValueError, match=":2:"):
        read_tiktoken_bpe(str(tmp_path / "b"))
