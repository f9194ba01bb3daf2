"""Stop strings: where a row's output ends when its text contains one of them.

The rule, the same on every path (decoding, a verified or a trusted cache hit, stream):
a row stops at the first token n whose prefix text, decode(tokens[:n]) with the
tokenizer's decode and the same options as the final text, contains a stop string.
What the caller gets:

- `token_ids`: tokens[:n] (like a stop token id, the token that ended the row is kept,
  so the ids still say why the row stopped);
- `text`: decode(tokens[:n]) cut before the earliest stop string in it (the stop string
  and anything the same token decoded after it are not part of the text).

Every prefix is judged, in order, not the text of a whole row or of a whole step: a
prefix can show text that a longer one does not (a multi-byte character half decoded
reads "\\ufffd" until its last byte arrives; a tokenizer that cleans up spaces drops one
once punctuation follows). Judging the whole row would make the answer depend on how
many tokens a path happened to hold (a decode step that emits several tokens, a cached
response decoded past the stop); judging prefixes in order makes it a function of the
tokens up to the stop alone, so every path that holds at least those tokens cuts at the
same place, and a row's tokens never depend on what comes after them.

Cost: a prefix is judged from the text of its last tokens (a window holding the longest
stop string, the last token's text and a margin), not from the whole prefix, so judging
a row costs O(row x window), not O(row^2). A window decoded alone can differ from the
whole text at its start (a character cut in half, a leading space dropped): matches in
its first `MARGIN` characters do not count there, and a match is confirmed on the whole
prefix's text, which also gives the exact cut. (This relies on the decoders' text of a
window agreeing with the end of the whole text past its first few characters, as
byte-level BPE, SentencePiece and WordPiece decoders do.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

# Characters at each end of a window's text that may differ from the whole text's
# (a replacement character per byte of a character cut in half, a dropped space, ...).
MARGIN = 8


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


class StopRule:
    """The stop-string rule of one request: judges prefixes of a row's new tokens.

    `decode` turns token ids into text (the tokenizer's decode with the same options as
    the final text). `at(tokens, n)` judges one prefix; `cut(tokens)` finds the first
    prefix that stops the row. Both depend on tokens[:n] alone.
    """

    def __init__(self, stops: Sequence[str], decode: Callable[[Sequence[int]], str]) -> None:
        self.stops = tuple(stops)  # non-empty strings (checked by specdec.params)
        self.decode = decode
        self.longest = max(len(s) for s in self.stops)
        # Tokens a window starts with: every token decodes to at least one character or to
        # nothing (special tokens), so this usually holds enough text at the first try.
        self.window = self.longest + MARGIN
        self._token_chars: dict[int, int] = {}  # token id -> characters it decodes to alone

    def _chars(self, token: int) -> int:
        n = self._token_chars.get(token)
        if n is None:
            n = self._token_chars[token] = len(self.decode([token]))
        return n

    def at(self, tokens: Sequence[int], n: int) -> int | None:
        """If the text of tokens[:n] contains a stop string, the index of the earliest one
        in that text; else None. Called for prefixes in order, a row's earlier prefixes
        having none (a stop string in the text of tokens[:n] then ends in its last tokens)."""
        if n <= 0:
            return None
        # Enough text before the last token's for a stop string that ends in it, plus the
        # margins at both ends: grown while the window's text is shorter than that.
        need = self._chars(tokens[n - 1]) + self.longest + 2 * MARGIN
        span = self.window
        while True:
            start = max(0, n - span)
            text = self.decode(tokens[start:n])
            if start == 0 or len(text) >= need:
                break
            span *= 2
        if start == 0:
            return find_stop(text, self.stops)
        if find_stop(text[MARGIN:], self.stops) is None:
            return None
        return find_stop(self.decode(tokens[:n]), self.stops)

    def cut(self, tokens: Sequence[int], start: int = 0) -> StopCut | None:
        """The first prefix longer than `start` tokens whose text contains a stop string
        (prefixes of `start` tokens or fewer known to have none), or None."""
        for n in range(start + 1, len(tokens) + 1):
            i = self.at(tokens, n)
            if i is not None:
                return StopCut(num_tokens=n, text_end=i)
        return None

    def text(self, tokens: Sequence[int], cut: StopCut | None) -> str:
        """The text a row of `tokens` gives: cut before the stop string when there is one."""
        return cut_text(tokens, cut, self.decode)


def cut_text(tokens: Sequence[int], cut: StopCut | None, decode: Callable[[Sequence[int]], str]) -> str:
    """The text of `tokens` (all of them without a cut), cut before the stop string."""
    if cut is None:
        return decode(tokens)
    return decode(tokens[: cut.num_tokens])[: cut.text_end]


def cut_at_stop(
    token_ids: Sequence[int], stops: Sequence[str], decode: Callable[[Sequence[int]], str]
) -> StopCut | None:
    """The first prefix of `token_ids` whose decoded text contains a stop string, or None
    (see the module docstring for the rule)."""
    if not stops or not token_ids:
        return None
    return StopRule(stops, decode).cut(token_ids)


class StopStringChecker:
    """Tells the decode loop that a row has stopped (an early exit).

    Called after each step with the row's new tokens so far and how many of them the step
    added; judges each prefix the step completed, in order, by the same rule as the final
    cut (StopRule), so it says "stop" exactly at the step that holds the stopping token.
    The generator cuts exactly afterwards, so the loop's exit only saves steps.
    """

    def __init__(self, stops: Sequence[str], decode: Callable[[Sequence[int]], str]) -> None:
        self.rule = StopRule(stops, decode)
        self.stops = self.rule.stops
        self.window = self.rule.window

    def __call__(self, tokens: Sequence[int], added: int = 1) -> bool:
        first = max(1, len(tokens) - added + 1)
        return any(self.rule.at(tokens, n) is not None for n in range(first, len(tokens) + 1))
