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


# ---------------------------------------------------------------------- the rule: every prefix, in order


def test_a_stop_string_in_a_prefix_counts_though_the_whole_row_no_longer_shows_it():
    # "é" half decoded reads "a\ufffd"; the whole row "aéb" holds no replacement character.
    tokens = ids("aéb")
    assert "\ufffd" in decode(tokens[:2]) and "\ufffd" not in decode(tokens)
    assert cut_at_stop(tokens, ["\ufffd"], decode) == StopCut(num_tokens=2, text_end=1)


def test_the_cut_depends_on_the_tokens_up_to_it_alone():
    tokens = ids("abc déf\n\nxyz ü end")
    for stops in (["\ufffd"], ["\n\n"], ["z ü"], ["absent"]):
        expected = _first_prefix(tokens, stops, decode)
        # Every path holding at least the stopping tokens (or the whole row) cuts alike.
        for m in range(expected.num_tokens if expected else len(tokens), len(tokens) + 1):
            assert cut_at_stop(tokens[:m], stops, decode) == expected, (stops, m)


def test_checker_judges_every_prefix_the_step_added():
    check = StopStringChecker(["\ufffd"], decode)
    row = ids("aéb")  # one step that emitted all four bytes
    assert check(row, len(row))  # "a\ufffd" after the second token
    assert not check(row, 1)  # the last prefix alone holds no stop string


def _first_prefix(tokens, stops, decode_fn):
    """The rule spelled out: decode every prefix in full, stop at the first with a stop string."""
    for n in range(1, len(tokens) + 1):
        i = find_stop(decode_fn(tokens[:n]), stops)
        if i is not None:
            return StopCut(n, i)
    return None


def test_windowed_judgement_equals_decoding_every_prefix_in_full():
    import random

    rng = random.Random(0)
    pieces = ["a", "b", " ", "\n", "é", "ü", "€", "😀", "ab c", "x"]
    stops_list = [["\ufffd"], ["\n\n"], ["é"], ["ab c"], ["😀x"], ["zz", "€ "], ["never"]]
    for trial in range(60):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(20, 120)))
        tokens = ids(text)
        if trial % 3 == 0:  # stray invalid bytes: replacement characters that stay
            tokens.insert(rng.randrange(len(tokens)), rng.choice([0xFF, 0x80, 0xC3]))
        for stops in stops_list:
            assert cut_at_stop(tokens, stops, decode) == _first_prefix(tokens, stops, decode), (text, stops)


def test_windowed_judgement_equals_decoding_every_prefix_with_a_real_tokenizer(tiny_tokenizer):
    import random

    rng = random.Random(1)

    def decode_tok(t):
        return tiny_tokenizer.decode(list(t), skip_special_tokens=True)

    for trial in range(12):
        tokens = [rng.randrange(len(tiny_tokenizer)) for _ in range(150)]  # specials decode to nothing
        for stops in (["\ufffd"], [" ", "é"], ["e", "\n"], ["never"]):
            assert cut_at_stop(tokens, stops, decode_tok) == _first_prefix(tokens, stops, decode_tok), stops
