"""Drafter "model": a small causal LM with its own KV cache drafts K tokens a step.

Bookkeeping per row, all on the device: `pending` [B, W] holds the tokens the target
has emitted that the draft model has not yet seen, `num_pending` [B] how many (1, or 2
when all K drafts were accepted: d_K was sampled but never fed, followed by the bonus
token). Each propose() feeds the pending tokens (a right-padded window: row b's real
tokens are its first num_pending[b]) and then d_1..d_{K-1}; observe() moves the draft
cache's lengths back to what the target kept and builds the next window from the
step's emitted tokens. The window width W is known on the host from the step's one
transfer, so nothing here reads the device.
"""

from __future__ import annotations

import torch

from .. import kernels, noise
from ..kv import prefill
from . import register_drafter
from .base import DraftProposal, Drafter

# A window that has grown this wide (steps without drafting) is fed at once. Windows write up to
# this many positions past a row's length, which request capacities leave room for.
MAX_PENDING = 16


def sample_draft(state, logits: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sampled draft token of every row from logits [B, V] with the request's settings:
    (token [B], q [B, V] the processed probabilities, q at the token [B]). A compiled request
    on CPU runs it as one graph (specdec.fused.sample_draft), with the same values."""
    params = state.params
    if state.compiled and logits.device.type == "cpu":
        from .. import fused

        return fused.sample_draft(state.seeds, state.seq_lens, logits, stream, temperature=params.temperature,
                                  top_k=params.top_k, top_p=params.top_p,
                                  noise_dtype=kernels.compute_dtype(logits.dtype))
    q = kernels.logits_to_probs(logits, params.temperature, params.top_k, params.top_p)  # [B, V]
    race = state.exponential(stream, q.shape[-1], q.dtype)  # [B, V]
    token = kernels.sample_exponential_race(q, race)
    return token, q, q.gather(1, token.unsqueeze(1)).squeeze(1)


@register_drafter("model", auto=True)
class ModelDrafter(Drafter):
    """Autoregressive drafting with a draft model; returns q for lossless verification."""

    gives_probs = True
    needs = frozenset({"model"})

    def __init__(self, context) -> None:
        super().__init__(context)
        if context.model is None:
            raise ValueError(
                'drafter="model" needs a draft model, but none is loaded; pass draft=... to '
                'SpeculativeGenerator.from_pretrained (or draft_model=... to the constructor), '
                'or choose drafter="ngram" or "none"'
            )

    def start(self, state) -> None:
        self.kv = state.new_kv(self.context.model, self.context.model_vocab_size)
        # The sequences are fed on the first draft, not here: a request whose planner never
        # drafts with this model (a useless draft) then costs the draft model nothing at all, and
        # until then observe() has nothing to track.
        self.unfed = True
        self.pending = torch.tensor([[s[-1]] for s in state.sequences], dtype=torch.long, device=state.device)  # [B, 1]
        self.num_pending = torch.ones(state.batch_size, dtype=torch.long, device=state.device)  # [B]
        self.k = 0  # drafts proposed this step (0: the planner did not ask)

    def _prefill(self, state) -> None:
        """Feed each row's sequence so far (all but its last token, which opens the pending window)."""
        if self.unfed:
            prefill(self.kv, state.sequences)
            self.pending = torch.tensor([[s[-1]] for s in state.sequences], dtype=torch.long, device=state.device)
            self.num_pending = torch.ones(state.batch_size, dtype=torch.long, device=state.device)
            self.unfed = False

    @torch.inference_mode()
    def propose(self, state, k: int, early_stop=None) -> DraftProposal:
        catch_up = self.unfed or self.pending.shape[1] > 2
        self._prefill(state)
        params = state.params
        logits, _ = self.kv.forward(self.pending, self.num_pending)  # [B, W, V_draft]
        # The logits after each row's last real pending token.
        last = (self.num_pending - 1).view(-1, 1, 1).expand(-1, 1, logits.shape[-1])
        logits = logits.gather(1, last).squeeze(1)  # [B, V_draft]
        stop = early_stop  # K "auto": rows may stop drafting early (specdec.planning.early_stop)
        tokens, probs, confidence = [], [], []
        groups = state.sampling_groups()  # rows that sample differently (a server's batch), else None
        for i in range(k):
            if groups is not None:
                token, q, conf = _draft_by_group(state, groups, logits, i)
                if q is not None:
                    probs.append(q)
                confidence.append(conf)
            elif params.greedy:
                token = torch.argmax(logits, dim=-1)  # [B]
                if stop is not None:  # the draft's probability of its greedy token
                    confidence.append(torch.softmax(logits.float(), dim=-1).gather(1, token.unsqueeze(1)).squeeze(1))
            else:
                token, q, conf = sample_draft(state, logits, noise.DRAFT_STREAM + i)
                probs.append(q)
                confidence.append(conf)
            tokens.append(token)
            if stop is not None and stop.update(i, confidence[-1]):
                break  # every row has stopped: no draft forward for the next slot
            if i < k - 1:
                logits = self.kv.forward(token.unsqueeze(1))[0][:, -1]
        self.k = k = len(tokens)
        self.proposed = torch.stack(tokens, dim=1)  # [B, k] kept for observe() when rows verified other drafts
        return DraftProposal(
            tokens=torch.stack(tokens, dim=1),  # [B, k]
            num_draft=torch.full((state.batch_size,), k, dtype=torch.long, device=state.device),
            probs=torch.stack(probs, dim=1) if probs else None,  # [B, k, V_draft]
            confidence=torch.stack(confidence, dim=1) if confidence else None,  # [B, k]
            draft_forwards=k,  # the pending window, then d_1..d_{k-1}
            catch_up=catch_up,
        )

    def observe(self, state) -> None:
        if self.unfed:  # nothing fed yet: the first draft feeds the sequences as they are then
            return
        emitted = state.step_tokens  # [B, k+1], -1 padded
        n = state.step_num_accepted  # [B]
        if not self.k:  # this model did not draft: every emitted token joins the window
            add = max(state.step_accepted) + 1  # tokens the widest row emitted (other drafters' too)
            width = self.pending.shape[1]
            self.pending = torch.cat([self.pending, torch.zeros_like(emitted[:, :add])], dim=1)  # [B, W + add]
            slots = self.num_pending.unsqueeze(1) + torch.arange(add, device=emitted.device)  # [B, add]
            self.pending.scatter_(1, slots, emitted[:, :add].clamp(min=0))
            self.num_pending = self.num_pending + n + 1
            if width + add >= MAX_PENDING:
                self._absorb(state)
            return
        k, self.k = self.k, 0
        if not self._verified_own_drafts(state):
            return self._observe_replaced(state, k)
        fed = k - 1  # drafts d_1..d_{k-1} went through the draft model
        # The draft cache keeps the pending window and the accepted drafts it has seen.
        bound = max(len(s) for s in state.sequences) - 1
        self.kv.set_lengths(self.kv.lengths - fed + n.clamp(max=fed), bound)
        bonus = emitted.gather(1, n.unsqueeze(1))  # [B, 1] correction or bonus token
        both = n >= k  # all drafts accepted: d_k was never fed
        if any(a >= k for a in state.step_accepted):
            first = torch.where(both.unsqueeze(1), emitted[:, k - 1 : k], bonus)  # [B, 1]
            self.pending = torch.cat([first, bonus], dim=1)  # [B, 2]
        else:
            self.pending = bonus
        self.num_pending = 1 + both.to(torch.long)

    def _verified_own_drafts(self, state) -> bool:
        """Whether every row that verified drafts this step verified this model's."""
        return all(s == self.name or not d for s, d in zip(state.step_sources, state.step_drafted))

    def _observe_replaced(self, state, k: int) -> None:
        """observe() when some rows verified other drafts than this model's (drafter "auto").

        The draft cache keeps the fed drafts only as far as they equal what the target
        emitted; everything emitted after that becomes the row's pending window.
        """
        emitted = state.step_tokens  # [B, k+1], -1 padded
        n = state.step_num_accepted  # [B]
        fed = k - 1
        same = (self.proposed[:, :fed] == emitted[:, :fed]).long().cumprod(dim=1).sum(dim=1)  # [B]
        kept = torch.minimum(same, n)  # [B] fed drafts that stay in the draft cache
        bound = max(len(s) for s in state.sequences) - 1
        self.kv.set_lengths(self.kv.lengths - fed + kept, bound)
        width = max(state.step_accepted) + 1  # the widest pending window: kept = 0, n + 1 tokens
        slots = torch.arange(width, device=emitted.device).unsqueeze(0)  # [1, W]
        index = (kept.unsqueeze(1) + slots).clamp(max=emitted.shape[1] - 1)  # [B, W]
        self.pending = emitted.gather(1, index).clamp(min=0)  # [B, W] right-padded
        self.num_pending = n + 1 - kept  # [B]
        if self.pending.shape[1] >= MAX_PENDING:
            self._absorb(state)

    def _absorb(self, state) -> None:
        """Feed all but the last pending token now, so the window stays small."""
        self.kv.forward(self.pending, self.num_pending - 1)
        last = self.pending.gather(1, (self.num_pending - 1).unsqueeze(1))  # [B, 1]
        self.pending = last
        self.num_pending = torch.ones_like(self.num_pending)

    def merge(self, other, state, other_state) -> None:
        # Rows fed and rows not yet fed cannot share one draft cache: feed the unfed side now.
        if self.unfed != other.unfed:
            (self if self.unfed else other)._prefill(state if self.unfed else other_state)
        self.kv.merge(other.kv)
        width = max(self.pending.shape[1], other.pending.shape[1])
        pad = torch.nn.functional.pad
        self.pending = torch.cat([pad(p, (0, width - p.shape[1])) for p in (self.pending, other.pending)])  # [B, W]
        self.num_pending = torch.cat([self.num_pending, other.num_pending])  # [B]

    def select_rows(self, keep: list[int]) -> None:
        self.kv.select_rows(keep)
        index = torch.tensor(keep, dtype=torch.long, device=self.pending.device)
        self.pending = self.pending.index_select(0, index)
        self.num_pending = self.num_pending.index_select(0, index)


def _draft_by_group(state, groups, logits: torch.Tensor, slot: int, head=None):
    """Draft slot `slot` for rows whose sampling settings differ: each group as it would draft
    alone (greedy rows their argmax, sampled rows from their own q and noise). Returns tokens
    [B], q [B, V] (zeros in greedy rows, which verification never reads) or None when every
    row is greedy, and confidences [B]. `head`: an EAGLE-3 head whose draft-vocabulary logits
    these are; tokens and q are then placed at the target's ids."""
    batch, vocab = logits.shape
    token = torch.empty(batch, dtype=torch.long, device=logits.device)
    confidence = torch.empty(batch, dtype=torch.float32, device=logits.device)
    sampled = any(not params.greedy for params, _ in groups)
    to_target = head.draft_to_target() if head is not None else None
    q_all = None
    race = None
    for params, rows in groups:
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        part = logits.index_select(0, index)  # [b, V]
        if params.greedy:
            chosen = torch.argmax(part, dim=-1)
            conf = torch.softmax(part.float(), dim=-1).gather(1, chosen.unsqueeze(1)).squeeze(1)
        else:
            q = kernels.logits_to_probs(part, params.temperature, params.top_k, params.top_p)  # [b, V]
            if race is None:  # every row's noise for this slot, as each row draws it alone
                race = state.exponential(noise.DRAFT_STREAM + slot, vocab, q.dtype)  # [B, V]
            chosen = kernels.sample_exponential_race(q, race.index_select(0, index))
            conf = q.gather(1, chosen.unsqueeze(1)).squeeze(1).float()
            placed = q if head is None else head.target_probs(q)  # [b, V]
            if q_all is None:
                q_all = placed.new_zeros(batch, placed.shape[-1])
            q_all[index] = placed
        token[index] = chosen if head is None else to_target[chosen]
        confidence[index] = conf
    return token, (q_all if sampled else None), confidence
