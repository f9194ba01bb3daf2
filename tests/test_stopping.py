"""Stop strings on a byte-level "tokenizer" (one token per UTF-8 byte), worked out by hand."""

from __future__ import annotations

from specdec.stopping import StopCut, StopStringChecker, cut_at_stop, find_stop


def decode(tokens) -> str:
    return bytes(tokens).decode("utf-8", errors="replace")


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_cut_before_the_stop_string_keeping_the_token_that_completed_it():
    assert cut_at_stop(ids("abc\n\ndef"), ["\n\n"], decode) == StopCut(num_tokens=5, text_end=3)
    assert cut_at_stop(ids("abc"), ["\n\n"], decode) is None
    assert cut_at_stop([], ["x"], decode) is None and cut_at_stop(ids("x"), [], decode) is None
    assert cut_at_stop(ids("xyz"), ["x"], decode) == StopCut(1, 0)  # at the very start: empty text


def test_the_earliest_completed_stop_string_wins():
    # "cd" completes (at token 4) before "bcde" would (token 5), though "bcde" starts earlier.
    assert cut_at_stop(ids("abcdef"), ["bcde", "cd"], decode) == StopCut(4, 2)
    # Both complete with the same token: the one that starts first gives the cut.
    assert cut_at_stop(ids("abcd"), ["cd", "abcd"], decode) == StopCut(4, 0)


def test_a_multibyte_stop_string_split_across_tokens():
    # "é" is two bytes: after the first the text ends in a replacement character, no match yet.
    tokens = ids("aébé")
    assert decode(tokens[:2]) == "a\ufffd"
    assert cut_at_stop(tokens, ["é"], decode) == StopCut(num_tokens=3, text_end=1)


def test_find_stop_from_a_start():
    assert find_stop("xxab", ["ab"], start=3) == 2  # ends at or after index 3
    assert find_stop("abxx", ["ab"], start=3) is None
    assert find_stop("abab", ["b", "ab"]) == 0


def test_checker_confirms_on_the_whole_row():
    check = StopStringChecker(["\n\n"], decode)
    assert check.window == 10
    assert not check(ids("no stop here, a long line of text"))
    assert check(ids("a long first paragraph\n\nsecond"))
    # A window that starts inside a multi-byte character decodes a replacement character first;
    # a stop string made of it must not stop the row unless the whole row contains it.
    tricky = StopStringChecker(["\ufffd"], decode)
    row = ids("ééééééééééé")  # 22 bytes: the 9-byte window starts mid-character
    assert decode(row[-tricky.window:]).startswith("\ufffd")
    assert not tricky(row)
