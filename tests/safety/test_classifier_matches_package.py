"""Our PyTorch classifier against the package's own TensorFlow model.

fixtures/package_scores.json holds `ToxicCommentClassifier().classify(text)` of the
package itself (TensorFlow 2.21 / Keras 3.15), written by make_package_reference.py in a
throwaway environment. Tolerance: 1e-5 absolute per label (measured: at most 1.8e-7).
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from k2serve.safety.labels import LABELS
from k2serve.safety.model import MAXLEN, pad

FIXTURE = json.loads((pathlib.Path(__file__).parent / "fixtures" / "package_scores.json")
                     .read_text())
TOLERANCE = 1e-5


def test_fixture_is_varied():
    rows = FIXTURE["rows"]
    assert len(rows) >= 30
    flagged = [r for r in rows if max(r["scores"].values()) >= 0.5]
    assert 10 <= len(flagged) <= len(rows) - 10  # clean and toxic texts both


@pytest.mark.parametrize("row", FIXTURE["rows"], ids=lambda r: r["text"][:40] or "<empty>")
def test_scores_match_the_package(classifier, row):
    ids = classifier.tokenizer.ids(classifier.tokenizer.words(row["text"]))
    with torch.inference_mode():  # what the package sees: the last MAXLEN ids
        package_view = classifier.net(torch.tensor([pad(ids)])).tolist()[0]
    for i, label in enumerate(LABELS):
        assert package_view[i] == pytest.approx(row["scores"][label], abs=TOLERANCE), label
    served = classifier.score([row["text"]])[0].scores
    if len(ids) <= MAXLEN:  # the served score is the package's own
        for label in LABELS:
            assert served[label] == pytest.approx(row["scores"][label], abs=TOLERANCE), label
    else:  # a long text's windows include the package's, so no score is lower
        for label in LABELS:
            assert served[label] >= row["scores"][label] - TOLERANCE


def test_long_text_is_scored_whole_where_the_package_sees_only_its_end(classifier):
    """The package scores only a text's last 100 words, so an insult opening a long text
    goes unseen there; the served score takes the max over windows."""
    row = next(r for r in FIXTURE["rows"] if r["text"].startswith("You are a stupid idiot. "))
    assert max(row["scores"].values()) < 0.5  # the package misses it
    ours = classifier.score([row["text"]])[0]
    assert ours.scores["toxic"] >= 0.5
    assert ours.words == len(row["text"].split())


def test_batch_scores_equal_single_scores(classifier):
    texts = [r["text"] for r in FIXTURE["rows"]]
    batch = classifier.score(texts)
    for text, scored in zip(texts[::7], batch[::7]):
        single = classifier.score([text])[0]
        for label in LABELS:
            assert scored.scores[label] == pytest.approx(single.scores[label], abs=1e-6)
