"""Our BERT (all-MiniLM-L6-v2) and MPNet (all-mpnet-base-v2) encoders against the
sentence-transformers library on the same packaged files: cosine >= 0.9999 per vector for
short, near-limit, unicode and padded-batch inputs."""

from __future__ import annotations

import numpy as np
import pytest

from k2serve.embeddings.sentence_encoder import SentenceEncoder

TEXTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: naïve café — 日本語のテキスト, русский текст, emoji 😀🚀, and math ∑∫√.",
    "   leading and trailing spaces   ",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z " * 3,
    "def add(a, b):\n    return a + b  # code has its own tokens\n",
]


def long_text(encoder: SentenceEncoder) -> str:
    """A text whose tokens fill the model's window exactly (no truncation on either side)."""
    words = ("Embeddings map sentences to vectors so that similar meanings land close "
             "together in the space. ").split()
    text, i = "", 0
    while True:
        candidate = (text + " " + words[i % len(words)]).strip()
        if len(encoder.tokenize([candidate])[0]) > encoder.max_tokens:
            return text
        text, i = candidate, i + 1


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module", params=["minilm", "mpnet"])
def pair(request, one_torch_thread, minilm_path):
    from sentence_transformers import SentenceTransformer

    path = minilm_path if request.param == "minilm" else request.getfixturevalue("mpnet_path")
    return SentenceEncoder(str(path)), SentenceTransformer(str(path), device="cpu")


def test_vectors_match_sentence_transformers(pair):
    ours, reference = pair
    texts = [*TEXTS, long_text(ours)]
    assert len(ours.tokenize([texts[-1]])[0]) >= ours.max_tokens - 3  # really near the limit
    expected = reference.encode(texts, batch_size=len(texts), convert_to_numpy=True)
    # One padded batch, as the server runs them...
    batched = ours.embed(ours.tokenize(texts))
    # ...and one at a time: padding must not change a vector.
    single = np.stack([ours.embed(ours.tokenize([t]))[0] for t in texts])
    assert cosines(batched, expected).min() >= 0.9999
    assert cosines(single, expected).min() >= 0.9999
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)  # normalized
    assert batched.shape == (len(texts), ours.config.dimensions)


def test_window_and_special_tokens_match_the_reference_tokenizer(pair):
    ours, reference = pair
    assert ours.max_tokens == reference.max_seq_length
    tok = reference.tokenizer
    for text in TEXTS:
        assert ours.tokenize([text])[0] == tok(text)["input_ids"]
        bare = tok(text, add_special_tokens=False)["input_ids"]
        assert ours.wrap(bare) == tok(text)["input_ids"]
