"""The classifier's six labels, their thresholds, and how they map onto OpenAI's categories."""

from __future__ import annotations

# The model's output order (Jigsaw toxic-comment challenge labels).
LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")

# A label is flagged at a sigmoid score >= 0.5: the model was trained with binary
# cross-entropy per label, so 0.5 is its own decision boundary.
THRESHOLD = 0.5

# OpenAI's moderation categories, each from the labels that assess it (max of their
# scores). The model has no notion of sexual content, self-harm, illicit acts or graphic
# violence: those categories are always reported 0.0 / false and have no applied input
# type. Jigsaw's `obscene` is profanity, which has no OpenAI category: it shows in the raw
# labels and counts towards `flagged`, as every label does.
OPENAI_CATEGORIES: dict[str, tuple[str, ...]] = {
    "harassment": ("toxic", "severe_toxic", "insult"),
    "harassment/threatening": ("threat",),
    "hate": ("identity_hate",),
    "hate/threatening": (),  # identity_hate AND threat: the smaller of the two, below
    "illicit": (),
    "illicit/violent": (),
    "self-harm": (),
    "self-harm/intent": (),
    "self-harm/instructions": (),
    "sexual": (),
    "sexual/minors": (),
    "violence": ("threat",),
    "violence/graphic": (),
}


def flagged_labels(scores: dict[str, float]) -> list[str]:
    return [label for label in LABELS if scores[label] >= THRESHOLD]


def openai_scores(scores: dict[str, float]) -> dict[str, float]:
    out = {}
    for category, labels in OPENAI_CATEGORIES.items():
        out[category] = max((scores[label] for label in labels), default=0.0)
    # Threatening hate needs both: a threat aimed at an identity group.
    out["hate/threatening"] = min(scores["identity_hate"], scores["threat"])
    return out


def assessed(category: str) -> bool:
    return bool(OPENAI_CATEGORIES[category]) or category == "hate/threatening"
