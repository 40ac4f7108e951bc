"""Writes fixtures/package_scores.json: the package's OWN model (TensorFlow/Keras) scoring
sample texts, the reference that test_classifier_matches_package.py holds our PyTorch
re-implementation to. TensorFlow never enters the project's environment; run this in a
throwaway one:

    python3 -m venv /tmp/tfref
    /tmp/tfref/bin/pip install tensorflow-cpu==2.21.0
    /tmp/tfref/bin/pip install --no-deps toxic-comment-classifier==0.3.0
    /tmp/tfref/bin/python tests/safety/make_package_reference.py
    rm -rf /tmp/tfref

The texts below are what gets scored (some are deliberately offensive: a toxicity
classifier is only tested by toxic text). It calls the package's public API,
`ToxicCommentClassifier().classify(text)`, unchanged.
"""

from __future__ import annotations

import json
import os
import pathlib
from importlib import metadata

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "package_scores.json"

LONG_CLEAN = ("The committee met on Tuesday to review the budget for the new library wing, "
              "and after a long discussion about shelving, lighting and the reading room, "
              "members agreed to ask the architect for two alternative layouts. ") * 3

TEXTS = [
    # clean
    "Thank you for the thoughtful edits to this article, they really improve it.",
    "This is wonderful news.",
    "Have a nice day :)",
    "Could you please add a citation for the population figure in the second paragraph?",
    "The meeting is moved to 3 PM on Thursday, room 204.",
    "I disagree with your reading of the source, but I see where you are coming from.",
    "What are some fun things to do in New York?",
    "Le chat est sur la table, et il dort depuis ce matin.",
    "Café, naïve, jalapeño — unicode words the vocabulary may not know.",
    "",
    "    ",
    "!!! ??? ... ###",
    "12345 67890",
    "Visit http://example.com/page?id=3 for the full report.",
    "Line one\nline two\tand a tab",
    # rude, insulting, obscene
    "You are so dumb and stupid!",
    "I hate you so much!",
    "You're disgusting!",
    "You're the worst person ever!",
    "Shut up, you idiot. Nobody cares about your opinion.",
    "What a pathetic loser, go away.",
    "This is complete bullshit and you know it.",
    "Fuck off and stop editing my page, asshole.",
    "YOU ARE AN IDIOT AND A MORON",
    # threats
    "I will kill you if you revert my edit again.",
    "I know where you live and I am going to hurt you.",
    # identity hate
    "Go back to your country, you people are all the same filth.",
    "I hate gay people, they should all disappear.",
    # long: more than 100 words, clean, then toxic at the very end / at the very start
    LONG_CLEAN,
    LONG_CLEAN + "You are a stupid idiot.",
    "You are a stupid idiot. " + LONG_CLEAN,
]


def main() -> None:
    import keras
    import tensorflow as tf
    from toxic_classifier.model import ToxicCommentClassifier

    model = ToxicCommentClassifier()
    rows = [{"text": text, "scores": model.classify(text)} for text in TEXTS]
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps({
        "package": "toxic-comment-classifier",
        "version": metadata.version("toxic-comment-classifier"),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "rows": rows}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {FIXTURE}")


if __name__ == "__main__":
    main()
