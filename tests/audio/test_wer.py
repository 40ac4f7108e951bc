"""The WER the round-trip test relies on."""

from tests.audio.wer import word_error_rate


def test_word_error_rate():
    assert word_error_rate("Hello there, world!", "hello there world.") == 0.0
    assert word_error_rate("a b c d", "a x c d") == 0.25  # one substitution
    assert word_error_rate("a b c d", "a c d") == 0.25  # one deletion
    assert word_error_rate("a b c d", "a b b c d") == 0.25  # one insertion
    assert word_error_rate("a b", "c d e f") == 2.0  # two substitutions, two insertions
