"""Drafter "ngram": prompt lookup decoding.

Match the last n tokens of a row (n = max_ngram down to min_ngram) against everything
earlier in that row (prompt and output) and propose the tokens that followed the most
recent earlier occurrence, continuing the copy over its own output when it reaches the
end of the row (so a repeating pattern yields full-length drafts). No model, no
probabilities: the target verifies one-hot drafts.
"""

from __future__ import annotations

from . import register_drafter
from .base import DraftProposal, Drafter, pack_proposals


class NgramIndex:
    """Latest end position of every n-gram (min_n..max_n) of one token sequence,
    built incrementally as the sequence grows."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self.latest: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are indexed

    def extend(self, seq: list[int], upto: int) -> None:
        """Index every n-gram that ends at a position < upto."""
        for end in range(self.indexed, upto):
            for n in range(self.min_n, self.max_n + 1):
                if end - n + 1 < 0:
                    break
                self.latest[tuple(seq[end - n + 1 : end + 1])] = end
        self.indexed = max(self.indexed, upto)

    def propose(self, seq: list[int], k: int) -> list[int]:
        """Continuation (up to k tokens) of the longest suffix n-gram seen earlier."""
        length = len(seq)
        # Only occurrences that end before the current last token count as "earlier".
        self.extend(seq, length - 1)
        for n in range(min(self.max_n, length), self.min_n - 1, -1):
            end = self.latest.get(tuple(seq[length - n :]))
            if end is not None:
                return _copy_forward(seq, end + 1, k)
        return []


def _copy_forward(seq: list[int], start: int, k: int) -> list[int]:
    """k tokens copied from seq[start:], where a copy that reaches the end of seq goes
    on over the tokens it has just copied (an overlapping LZ77 copy): a loop of period
    p < k still gives k drafts instead of p."""
    out: list[int] = []
    length = len(seq)
    for i in range(k):
        j = start + i
        out.append(seq[j] if j < length else out[j - length])
    return out


@register_drafter("ngram", auto=True)
class NgramDrafter(Drafter):
    """Prompt-lookup drafter (one-hot drafts)."""

    min_ngram = 1
    max_ngram = 3

    def start(self, state) -> None:
        self.indexes = [NgramIndex(self.min_ngram, self.max_ngram) for _ in state.sequences]

    def propose(self, state, k: int, early_stop=None) -> DraftProposal:
        """Per row, what prompt lookup finds (at most k tokens), built on the host."""
        rows = [index.propose(seq, k) for index, seq in zip(self.indexes, state.sequences)]
        return pack_proposals(rows, k, state.device)

    def select_rows(self, keep: list[int]) -> None:
        self.indexes = [self.indexes[i] for i in keep]

    def merge(self, other, state, other_state) -> None:
        self.indexes = self.indexes + other.indexes
