"""Drafter "eagle": an EAGLE-3 head drafts K tokens a step from the target's hidden states.

The head (specdec.eagle) keeps its own one-layer KV cache of the positions the target has
verified. Per row, on the device: a pending window of (token, target features) pairs the
head has not yet seen; its first num_pending[b] entries are real. For a position t the
head reads the target's features there (three layers, concatenated) and the token at
t + 1, so a position enters the window once the token after it is known: the prompt's
positions 0..P-2 at the start, and after each step the step's inputs [last, d_1..d_n]
(whose features the verify forward returned) with the emitted tokens [d_1..d_n, c].

propose() feeds the window (the head's output at each row's last real entry gives d_1),
then feeds each draft with the head's own output in place of the target's features for
d_2..d_k. The drafted positions are never kept: observe() moves the head's lengths back
to before them and queues the step's verified positions with the target's real features,
whichever source drafted them. Draft probabilities live on the draft vocabulary and are
placed at their target ids, so q is zero outside it and verification stays lossless.
"""

from __future__ import annotations

import torch

from .. import noise
from ..eagle import HeadKV
from ..params import AUTO_MAX_DRAFT_TOKENS
from . import register_drafter
from .base import Drafter, DraftProposal
from .model import _draft_by_group, sample_draft

# A window that has grown this wide (steps in which the head did not draft) is fed at once.
MAX_PENDING = 16
# Greedy drafts of a compiled head come from one graph of this many steps (HeadKV.chain): the
# most an adaptive step drafts.
CHAIN_LENGTH = AUTO_MAX_DRAFT_TOKENS


@register_drafter("eagle", auto=True)
class EagleDrafter(Drafter):
    """Drafts from an EAGLE-3 head reading the target's hidden states; returns q for lossless
    verification."""

    gives_probs = True
    reads_hidden_states = True
    needs = frozenset({"head"})

    def __init__(self, context) -> None:
        super().__init__(context)
        head = context.head
        if head is None:
            raise ValueError(
                'drafter="eagle" needs an EAGLE-3 head, but none is loaded; pass head=HEAD or draft=HEAD (a folder '
                'in the EAGLE-3 layout; the CLI\'s --head) to SpeculativeGenerator.from_pretrained (the bundled pair '
                'and "smollm2-135m" load the heads shipped for them), or choose another drafter'
            )
        self.head = head
        self.hidden_layers = tuple(head.aux_layers)
        self.cost_ratio = context.head_cost_ratio

    def start(self, state) -> None:
        features = state.target_hidden  # [B, P, F] every prompt position's
        device = state.device
        lengths = [len(s) for s in state.sequences]
        width = max(max(lengths) - 1, 1)
        tokens = torch.zeros(state.batch_size, width, dtype=torch.long)
        for b, seq in enumerate(state.sequences):
            if len(seq) > 1:
                tokens[b, : len(seq) - 1] = torch.tensor(seq[1:], dtype=torch.long)
        self.kv = HeadKV(self.head, state.batch_size, device, self.head.fc.weight.dtype)
        compiler = getattr(state, "compiler", None)
        if compiler is not None:  # a compiled request: the head's steps run as graphs too
            self.kv.compiled = compiler.head_for(self.head)
            self.kv.chained = compiler.chain_for(self.head)
        self.tokens = tokens.to(device)  # [B, W] the token after each pending position
        self.features = features[:, :width]  # [B, W, F] the target's features there
        if self.features.shape[1] < width:  # prompts of one token: nothing is pending
            self.features = torch.nn.functional.pad(self.features, (0, 0, 0, width - self.features.shape[1]))
        self.num_pending = torch.tensor([n - 1 for n in lengths], dtype=torch.long, device=device)  # [B]
        self.drafted = False

    @torch.inference_mode()
    def propose(self, state, k: int, early_stop=None) -> DraftProposal:
        head, kv = self.head, self.kv
        catch_up = self.tokens.shape[1] > 2
        tokens, features = self._window()
        last = (self.num_pending - 1).clamp(min=0)  # [B] each row's last real entry
        if kv.chained is not None and 2 <= k <= CHAIN_LENGTH and state.params.greedy and state.sampling_groups() is None:
            return self._propose_chain(state, k, early_stop, tokens, features, last, catch_up)
        params = state.params
        groups = state.sampling_groups()
        # greedy drafts on eager steps come from the head's greedy draft ids where it names them
        greedy = params.greedy and groups is None
        hidden, draft_logits = kv.step(tokens, features, self.num_pending, features=True, last=last,
                                       greedy=greedy)  # [B, 1, H], [B, N]
        ready = self._window_fed(state)
        to_target = kv.columns(greedy)  # [N] the target id of each logit's column
        stop = early_stop
        tokens, probs, confidence = [], [], []
        for i in range(k):
            if groups is not None:
                token, q, conf = _draft_by_group(state, groups, draft_logits, i, head=head)
                if q is not None:
                    probs.append(q)
                confidence.append(conf)
            elif params.greedy:
                best = torch.argmax(draft_logits, dim=-1)  # [B]
                token = to_target[best]
                if stop is not None:
                    confidence.append(torch.softmax(draft_logits.float(), dim=-1).gather(1, best.unsqueeze(1)).squeeze(1))
            else:  # sampled on the draft vocabulary, then placed at the target's ids
                best, q_draft, conf = sample_draft(state, draft_logits, noise.DRAFT_STREAM + i)  # [B], [B, Vd], [B]
                token = to_target[best]
                probs.append(head.target_probs(q_draft))  # [B, V], zero outside the draft vocabulary
                confidence.append(conf)
            tokens.append(token)
            if stop is not None and stop.update(i, confidence[-1]):
                break
            if i < k - 1:
                hidden, draft_logits = kv.step(token.clamp(min=0).unsqueeze(1), hidden, features=False,
                                               greedy=greedy)  # [B, 1, H], [B, N]
        k = len(tokens)
        num_draft = torch.where(ready, k, 0)
        return DraftProposal(
            tokens=torch.stack(tokens, dim=1),  # [B, k]
            num_draft=num_draft,
            probs=torch.stack(probs, dim=1) if probs else None,  # [B, k, V]
            confidence=torch.stack(confidence, dim=1) if confidence else None,
            draft_forwards=k,
            catch_up=catch_up,
        )

    def _propose_chain(self, state, k: int, stop, tokens, features, last, catch_up: bool) -> DraftProposal:
        """Greedy drafting on a compiled head: CHAIN_LENGTH drafts in one graph (HeadKV.chain),
        of which the step keeps k, fewer where an early stop ends a row sooner. The stop reads
        the same probabilities as in the token-by-token loop, after the chain instead of
        between its calls: drafting past it costs no more calls, and what it saves, the
        verify width, it still saves."""
        kv = self.kv
        drafts, confidence = kv.chain(tokens, features, self.num_pending, last, CHAIN_LENGTH)  # [B, L], [B, L]
        ready = self._window_fed(state)
        if stop is not None:
            for i in range(k):
                if stop.update(i, confidence[:, i]):
                    k = i + 1
                    break
        return DraftProposal(
            tokens=drafts[:, :k],
            num_draft=torch.where(ready, k, 0),
            probs=None,
            confidence=confidence[:, :k] if stop is not None else None,  # as the token-by-token loop
            draft_forwards=CHAIN_LENGTH,
            catch_up=catch_up,
        )

    def _window_fed(self, state) -> torch.Tensor:
        """After the window's step: the lengths observe() rolls back to, the window emptied.
        Returns the rows that can draft [B] (a row whose prompt is one token has nothing to
        draft from yet)."""
        kv = self.kv
        kv.bound = min(kv.bound, max(len(s) for s in state.sequences) - 1)
        self.base = (kv.lengths, kv.bound)
        ready = self.num_pending > 0
        self._clear()
        self.drafted = True
        return ready

    def observe(self, state) -> None:
        if self.drafted:  # the drafted positions go: the target's features replace them
            self.kv.set_lengths(*self.base)
            self.drafted = False
        width = max(state.step_accepted) + 1  # the most positions any row verified this step
        tokens = state.step_tokens[:, :width].clamp(min=0)  # [B, w] the token after each verified position
        features = state.target_hidden[:, :width]  # [B, w, F]
        count = state.step_num_accepted + 1  # [B]
        self._append(tokens, features, count)
        if self.tokens.shape[1] >= MAX_PENDING:
            self._absorb()

    def _window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pending window, at least two slots wide on a compiled head: a one-slot window
        would need a graph of its own (width 1 specializes), and the extra slot is not real
        (its key lands past the row's length, where nothing reads it before it is rewritten)."""
        if self.kv.compiled is None or self.tokens.shape[1] >= 2:
            return self.tokens, self.features
        pad = 2 - self.tokens.shape[1]
        return (torch.nn.functional.pad(self.tokens, (0, pad)),
                torch.nn.functional.pad(self.features, (0, 0, 0, pad)))

    def _clear(self) -> None:
        batch, device = self.num_pending.shape[0], self.num_pending.device
        self.tokens = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.features = self.features[:, :0]
        self.num_pending = torch.zeros(batch, dtype=torch.long, device=device)

    def _append(self, tokens: torch.Tensor, features: torch.Tensor, count: torch.Tensor) -> None:
        """Queue count[b] new entries of row b after its pending ones."""
        add = tokens.shape[1]
        pad = torch.nn.functional.pad
        self.tokens = pad(self.tokens, (0, add))  # [B, W + w]
        self.features = pad(self.features.to(features.dtype), (0, 0, 0, add))  # [B, W + w, F]
        slots = self.num_pending.unsqueeze(1) + torch.arange(add, device=tokens.device)  # [B, w]
        self.tokens.scatter_(1, slots, tokens)
        self.features.scatter_(1, slots.unsqueeze(-1).expand(-1, -1, features.shape[-1]), features)
        self.num_pending = self.num_pending + count

    def _absorb(self) -> None:
        """Feed all but each row's last pending entry now, so the window stays small."""
        keep = (self.num_pending - 1).clamp(min=0)
        tokens, features = self._window()
        self.kv.step(tokens, features, keep, features=True)  # a step's graph where compiled; its output unused
        index = keep.view(-1, 1)
        tokens = self.tokens.gather(1, index)
        features = self.features.gather(1, index.unsqueeze(-1).expand(-1, 1, self.features.shape[-1]))
        count = (self.num_pending > 0).long()
        self._clear()
        self._append(tokens, features, count)

    def select_rows(self, keep: list[int]) -> None:
        self.kv.select_rows(keep)
        index = torch.tensor(keep, dtype=torch.long, device=self.tokens.device)
        self.tokens = self.tokens.index_select(0, index)
        self.features = self.features.index_select(0, index)
        self.num_pending = self.num_pending.index_select(0, index)

    def merge(self, other, state, other_state) -> None:
        self.kv.merge(other.kv)
        width = max(self.tokens.shape[1], other.tokens.shape[1])
        pad = torch.nn.functional.pad
        self.tokens = torch.cat([pad(t, (0, width - t.shape[1])) for t in (self.tokens, other.tokens)])
        self.features = torch.cat([pad(f, (0, 0, 0, width - f.shape[1])) for f in (self.features, other.features)])
        self.num_pending = torch.cat([self.num_pending, other.num_pending])

