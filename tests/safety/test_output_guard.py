"""The guard's output checks on scripted generations (real classifier, no LLM): what is
released, where it stops, how often it checks, and that the generation is closed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from k2serve.api import safety_guard as guard_module
from k2serve.api.request_scope import STATE_KEY, RequestScope
from k2serve.api.safety_guard import SafetyGuard
from k2serve.safety.serving import ModerationBackend
from k2serve.serving.backend import TextDelta
from k2serve.serving.background import BackgroundModel


class CountingBackend(ModerationBackend):
    def __init__(self, classifier):
        super().__init__(BackgroundModel("safety", lambda: classifier, announce=False))
        self.checked: list[str] = []

    async def classify(self, texts, *, tail=False):
        self.checked += texts
        return await super().classify(texts, tail=tail)


class Generation:
    """merged_choices' stand-in: yields scripted (index, delta) pairs, notes being closed."""

    def __init__(self, pieces: list[tuple[int, str]]):
        self.pieces = pieces
        self.closed = False
        self.consumed = 0

    async def iterator(self):
        try:
            counts: dict[int, int] = {}
            for i, (index, text) in enumerate(self.pieces):
                counts[index] = counts.get(index, 0) + 1
                last = all(j != index for j, _ in self.pieces[i + 1:])
                self.consumed += 1
                yield index, TextDelta(text, [i], None, "stop" if last else None, 5,
                                       counts[index])
        finally:
            self.closed = True


def run_guard(classifier, pieces, n=1, inputs=("Tell me about the weather.",)):
    backend = CountingBackend(classifier)
    guard = SafetyGuard("safety", backend)
    generation = Generation(pieces)
    tracker = SimpleNamespace(marks=[], mark=lambda s, e=None: tracker.marks.append((s, e)),
                              finish=lambda *a: None)
    request = SimpleNamespace(scope={"state": {STATE_KEY: RequestScope("r1")}})

    async def consume():
        out = []
        inner = generation.iterator()
        async for item in guard.guarded(request, inner, list(inputs), n, 5, tracker):
            out.append(item)
        return out

    return asyncio.run(consume()), generation, backend, tracker


def words(text):  # one token per word, as a model streams
    return [(0, w + " ") for w in text.split()]


def test_a_clean_output_is_released_whole_in_checked_pieces(classifier):
    text = ("The weather today is mild and sunny. A light breeze comes from the west, and "
            "the evening should stay dry. Tomorrow brings some clouds but little rain.")
    out, generation, backend, tracker = run_guard(classifier, words(text))
    assert "".join(d.text for _, d in out) == "".join(t for _, t in words(text))
    assert out[-1][1].finish_reason == "stop" and out[-1][1].completion_tokens == len(words(text))
    assert len(out) < len(words(text))  # merged into pieces, not one per token
    assert tracker.marks == [] and generation.closed


def test_toxic_output_after_clean_text_releases_the_clean_part_then_stops(classifier):
    clean = "Thanks for asking about the trip. The museum opens at nine."
    toxic = "You are a stupid idiot and everyone hates you, moron."
    rest = "This part is never generated because the guard stops the generation first."
    out, generation, backend, tracker = run_guard(classifier, words(clean + " " + toxic + " " +
                                                                    rest))
    released = "".join(d.text for _, d in out)
    assert released.startswith("Thanks for asking") and "museum" in released
    assert "stupid" not in released and "idiot" not in released and "moron" not in released
    assert out[-1][1].finish_reason == "content_filter"
    assert generation.closed and generation.consumed < len(words(clean + toxic + rest))
    assert tracker.marks and tracker.marks[0][0] == "content_filter"
    assert tracker.marks[0][1].startswith("output: toxic")


def test_checks_are_bounded_in_number_and_size(classifier):
    text = " ".join(["The river runs past the old mill and on to the sea."] * 40)  # 480 words
    out, _, backend, _ = run_guard(classifier, words(text))
    output_checks = backend.checked[1:]  # the first is the input check
    assert len(output_checks) <= len(text.split()) / guard_module.MIN_WORDS + 1
    assert max(len(t) for t in output_checks) <= guard_module.TAIL_CHARS
    assert "".join(d.text for _, d in out).split() == text.split()


def test_with_two_choices_only_the_flagged_one_ends(classifier):
    clean = [(1, w + " ") for w in "The museum opens at nine and closes at five.".split()]
    toxic = [(0, w + " ") for w in "You are a stupid idiot, shut up moron.".split()]
    pieces = [p for pair in zip(toxic, clean) for p in pair] + clean[len(toxic):]
    out, _, _, tracker = run_guard(classifier, pieces, n=2)
    by_choice = {0: "", 1: ""}
    finish = {}
    for index, delta in out:
        by_choice[index] += delta.text
        if delta.finish_reason:
            finish[index] = delta.finish_reason
    assert finish == {0: "content_filter", 1: "stop"}
    assert "museum" in by_choice[1] and "stupid" not in by_choice[0]
    assert tracker.marks[0][0] == "content_filter"


def test_flagged_input_generates_nothing(classifier):
    out, generation, _, tracker = run_guard(classifier, words("never generated"), n=3,
                                            inputs=("Shut up, you stupid idiot.",))
    assert [(i, d.text, d.finish_reason, d.completion_tokens) for i, d in out] == [
        (i, "", "content_filter", 0) for i in range(3)]
    assert generation.consumed == 0
    assert tracker.marks[0][1].startswith("input: toxic")
