
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import SentencePieceBPETokenizer

from k2serve.text.detokenizer import IncrementalDetokenizer
from k2serve.text.tokenizer import Tokenizer
from tests.tiny_models import smollm2_gguf_path


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def spm_tok():
    # A SentencePiece-style vocabulary: its decoder drops the space of the first token it sees,
    # so a token's text depends on what came before it.
    sp = SentencePieceBPETokenizer()
    corpus = ["hello world", "the quick brown fox jumps over the lazy dog", "hello there world"] * 20
    sp.train_from_iterator(corpus, vocab_size=120, min_frequency=1, show_progress=False)
    return Tokenizer(sp._tokenizer)


def stream(tokenizer, ids, prompt_ids=None, skip=True):
    d = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids, skip_special_tokens=skip)
    deltas = [d.add(i) for i in ids]
    deltas.append(d.flush())
    return deltas


def test_multibyte_char_is_held_until_complete(tok):
    ids = tok.encode("a😀b")
    assert len(ids) > 3  # the emoji spans tokens
    deltas = stream(tok, ids)
    assert "".join(deltas) == "a😀b"
    assert all("\ufffd" not in d for d in deltas)
    assert "😀" in deltas  # emitted whole, in one delta, once its last byte arrives


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("<|im_start|>assistant\nHi there<|im_end|>")
    assert "".join(stream(tok, ids)) == "assistant\nHi there"
    assert "".join(stream(tok, ids, skip=False)) == "<|im_start|>assistant\nHi there<|im_end|>"


def test_unfinished_char_at_end_is_flushed_like_decode(tok):
    ids = tok.encode("x😀")[:-1]  # cut inside the emoji
    d = IncrementalDetokenizer(tok)
    assert "".join(d.add(i) for i in ids) == "x"
    assert d.flush() == tok.decode(ids)[1:]
    assert tok.decode(ids).endswith("\ufffd")


def test_work_per_token_is_bounded(tok):
    text = "The quick brown fox 🦊 jumps over 13 lazy dogs. 中文字符 " * 60
    ids = tok.encode(text)
    seen = []

    class Spy:
        def decode(self, ids, skip_special_tokens=True):
            seen.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    assert "".join(stream(Spy(), ids)) == text
    assert len(ids) > 500 and max(seen) <= 8


def test_leading_space_follows_context(spm_tok):
    ids = spm_tok.encode("hello world")
    assert spm_tok.decode(ids[1:]) == "world"  # alone, the first token loses its space
    assert "".join(stream(spm_tok, ids)) == "hello world"
    # With the prompt as context, the first output token keeps its space.
    assert "".join(stream(spm_tok, ids[1:], prompt_ids=ids[:1])) == " world"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans())
def test_property_random_ids_concat_equals_decode(tok, data, skip):
    ids = data.draw(st.lists(st.integers(min_value=0, max_value=tok.vocab_size - 1), max_size=30))
    # Bias towards tokens that are pieces of multi-byte characters, where the bugs live.
    pieces = data.draw(st.lists(st.sampled_from(tok.encode("é中😀🦊ñ€ 😀😀 中文")), max_size=10))
    ids = ids + pieces
    ids = data.draw(st.permutations(ids))
    deltas = stream(tok, ids, skip=skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=60))
def test_property_encoded_text_streams_back_exactly(tok, text):
    ids = tok.encode(text)
    # SmolLM2's vocabulary has no token for a few bytes (0xF1, 0xF2, some C0 controls), so BPE
    # drops them, as it does in transformers and llama.cpp: such text cannot round-trip.
    assume(tok.decode(ids, skip_special_tokens=False) == text)
    d = IncrementalDetokenizer(tok, skip_special_tokens=False)
    sent = ""
    for n, i in enumerate(ids, 1):
        delta = d.add(i)
        assert "\ufffd" not in delta or "\ufffd" in text
        sent += delta
        assert tok.decode(ids[:n], skip_special_tokens=False).startswith(sent)
    sent += d.flush()
    assert sent == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text("helo wrdthquick中😀", max_size=20), out=st.text("helo wrdthquick中😀", max_size=30))
def test_property_prompt_context_gives_the_continuation(tok, spm_tok, prompt, out):
    for t in (tok, spm_tok):
        p_ids, o_ids = t.encode(prompt), t.encode(out)
        whole = t.decode(p_ids + o_ids)
        head = t.decode(p_ids)
        assert whole.startswith(head)
        assert "".join(stream(t, o_ids, prompt_ids=p_ids)) == whole[len(head):]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_spm_random_ids(spm_tok, data):
    ids = data.draw(st.lists(st.integers(min_value=0, max_value=spm_tok.vocab_size - 1), max_size=25))
    assert "".join(stream(spm_tok, ids)) == spm_tok.decode(ids)
