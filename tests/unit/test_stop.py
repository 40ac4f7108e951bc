from hypothesis import given, settings
from hypothesis import strategies as st

from k2serve.text.stop import StopMatcher


def run(stops, deltas):
    m = StopMatcher(stops)
    out = []
    stopped = False
    for d in deltas:
        text, stopped = m.feed(d)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return "".join(out), stopped, m


def truncate_at_first_stop(text, stops):
    """Text before the first stop string to complete (earliest end; on a tie, the longest)."""
    found = [(i + len(s), i) for s in stops if s and (i := text.find(s)) != -1]
    return text[: min(found)[1]] if found else text


def test_stop_split_across_deltas_never_leaks():
    m = StopMatcher(["</answer>"])
    assert m.feed("The answer is 4<") == ("The answer is 4", False)
    assert m.feed("/ans") == ("", False)
    assert m.feed("wer> trailing") == ("", True)
    assert m.matched == "</answer>"
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_false_alarm_is_released():
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("ART") == ("START", False)
    assert m.feed("S") == ("", False)
    assert m.flush() == "S"


def test_first_completed_match_wins_across_stops():
    text, stopped, m = run(["bc", "abcd"], ["xab", "cd"])
    assert (text, stopped, m.matched) == ("xa", True, "bc")


def test_overlapping_stops_stop_at_first_completed():
    # "a" completes before "<a<" could, so generation stops there, however the text is split.
    assert run(["a", "<a<"], ["<", "a", "<"])[0] == "<"
    assert run(["a", "<a<"], ["<a<"])[0] == "<"


def test_no_stops_passes_through():
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", False)
    assert StopMatcher(None).feed("x") == ("x", False)
    assert StopMatcher([""]).feed("x") == ("x", False)


def test_stop_at_very_start_and_in_single_delta():
    assert run(["Hi"], ["Hi there"])[:2] == ("", True)
    assert run(["\n\n"], ["a\n", "\nb"])[:2] == ("a", True)


def test_hold_back_is_longest_possible_prefix():
    m = StopMatcher(["aab"])
    assert m.feed("aaa") == ("a", False)  # "aa" may still become "aab"
    assert m.feed("b") == ("", True)


alphabet = st.text(alphabet="ab\né😀<>/", max_size=40)


@settings(max_examples=400, deadline=None)
@given(
    text=alphabet,
    stops=st.lists(st.text(alphabet="ab\né😀<>/", min_size=1, max_size=5), max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
)
def test_property_emitted_text_is_text_up_to_first_stop(text, stops, cuts):
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    deltas = [text[a:b] for a, b in zip(points, points[1:])]
    expected = truncate_at_first_stop(text, stops)
    got, stopped, _ = run(stops, deltas)
    assert got == expected
    assert stopped == (expected != text or any(s in text for s in stops))


@settings(max_examples=200, deadline=None)
@given(text=alphabet, stops=st.lists(st.text(alphabet="ab<>", min_size=1, max_size=4), min_size=1, max_size=3))
def test_property_char_by_char_never_emits_part_of_a_stop(text, stops):
    # Whatever has been emitted so far must be a prefix of the final answer.
    m = StopMatcher(stops)
    expected = truncate_at_first_stop(text, stops)
    sent = ""
    for ch in text:
        out, stopped = m.feed(ch)
        sent += out
        assert expected.startswith(sent)
        if stopped:
            break
    else:
        sent += m.flush()
    assert sent == expected
