"""Stop strings: where a row's output ends when its text contains one of them.

A row stops at the first token whose decoded text, together with the tokens before
it, contains a stop string. What the caller gets:

- `token_ids`: the new tokens up to and including that token (like a stop token id,
  the token that ended the row is kept, so the ids still say why the row stopped);
- `text`: the decoded text cut just before the stop string (the stop string and
  anything the same token decoded after it are not part of the text).

The cut is computed from the row's tokens alone, after decoding, so it is exact
whatever the decode loop did: a row that the loop stopped early (an optimisation, see
`StopStringChecker`) and a row decoded to `max_new_tokens` and then cut give the same
answer, because a row's tokens never depend on what comes after them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class StopCut:
    """Where a stop string ends a row."""

    num_tokens: int  # tokens kept: the token that completed the stop string is the last
    text_end: int  # characters of the text kept (the text before the stop string)


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest stop string in `text` that ends at or after `start`, or None."""
    best = None
    for s in stops:
        # A match that ends at or after `start` begins at or after start - len(s) + 1.
        i = text.find(s, max(0, start - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def cut_at_stop(
    token_ids: Sequence[int], stops: Sequence[str], decode: Callable[[Sequence[int]], str]
) -> StopCut | None:
    """The first point where the decoded tokens contain a stop string, or None.

    `decode` turns a prefix of `token_ids` into text (the tokenizer's decode with the
    same options as the final text). Each prefix is decoded in turn: the first one
    whose text contains a stop string gives the cut. Decoding prefixes rather than
    concatenating per-token strings keeps multi-byte characters split across tokens
    and tokenizers that merge spaces exact.
    """
    if not stops or not token_ids:
        return None
    full = decode(token_ids)
    if find_stop(full, stops) is None:  # the common case: one decode, no scan
        return None
    seen = 0  # characters already checked (no stop ends before them)
    for n in range(1, len(token_ids) + 1):
        text = full if n == len(token_ids) else decode(token_ids[:n])
        i = find_stop(text, stops, seen)
        if i is not None:
            return StopCut(num_tokens=n, text_end=i)
        # The last characters may still change (an incomplete multi-byte character):
        # a later prefix is checked again from a little before its end.
        seen = max(0, len(text) - 1)
    return None  # unreachable when the full text contains a stop string


class StopStringChecker:
    """Tells the decode loop that a row's text contains a stop string (an early exit).

    Called with the row's new tokens so far; decodes only a tail window of them, long
    enough to hold the longest stop string, so a check costs O(window), not O(row).
    It says "stop" only when the whole row's text contains a stop string, so never before
    `cut_at_stop` would cut, and the generator cuts
    exactly afterwards, so a missed early exit costs time, never correctness.
    """

    def __init__(self, stops: Sequence[str], decode: Callable[[Sequence[int]], str]) -> None:
        self.stops = tuple(stops)
        self.decode = decode
        # Every token decodes to at least one character or to nothing (special tokens);
        # the tail window covers the longest stop string plus tokens that decode to nothing.
        self.window = max(len(s) for s in self.stops) + 8

    def __call__(self, tokens: Sequence[int]) -> bool:
        if find_stop(self.decode(tokens[-self.window:]), self.stops) is None:
            return False
        # A window's first characters may decode differently from the whole row (a
        # multi-byte character cut in half): confirm on the whole row before stopping it.
        return find_stop(self.decode(tokens), self.stops) is not None
