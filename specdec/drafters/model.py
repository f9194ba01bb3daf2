"""Drafter "model": a small causal LM with its own KV cache drafts K tokens a step.

Bookkeeping per row: `pending` holds tokens the target has emitted that the draft
has not yet seen (1 token, or 2 when all K drafts were accepted: d_K was sampled but
never fed, followed by the bonus token). Each propose() feeds the pending tokens and
then d_1..d_{K-1}; observe() keeps what the target kept and drops the rest.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..engine import KVState, RowRandom, prefill
from . import register_drafter
from .base import DraftProposal, Drafter


@register_drafter("model")
class ModelDrafter(Drafter):
    """Autoregressive drafting with a draft model; returns q for lossless verification."""

    provides_probs = True
    uses_draft_model = True

    def __init__(self, generator, cache_layer=None) -> None:
        super().__init__(generator, cache_layer)
        if generator.draft_model is None:
            raise ValueError(
                'drafter="model" needs a draft model, but none is loaded; pass draft=... to '
                'SpeculativeGenerator.from_pretrained (or draft_model=... to the constructor), '
                'or choose drafter="ngram" or "none"'
            )

    def start(self, state) -> None:
        self.kv = KVState(
            self.generator.draft_model, state.batch_size, state.device, self.generator.draft_vocab_size
        )
        prefill(self.kv, state.sequences)
        self.pending = [[seq[-1]] for seq in state.sequences]
        self.fed_drafts = 0  # drafts fed to the draft model in the last propose()
        self.proposed = False  # whether the engine asked for drafts this step

    @torch.inference_mode()
    def propose(self, state, k: int) -> DraftProposal:
        params = state.params
        device = state.device
        width = max(len(p) for p in self.pending)
        # Right-align pending tokens so that the last column is always a real token.
        ids = torch.zeros(state.batch_size, width, dtype=torch.long)
        valid = torch.zeros(state.batch_size, width, dtype=torch.bool)
        for b, p in enumerate(self.pending):
            ids[b, width - len(p):] = torch.tensor(p)
            valid[b, width - len(p):] = True
        ids, valid = ids.to(device), valid.to(device)
        self.pending_valid = valid
        logits = self.kv.forward(ids, valid, logits_to_keep=1)[:, -1]  # [B, V_draft]
        counters = [len(s) for s in state.sequences]
        ones = torch.ones(state.batch_size, 1, dtype=torch.bool, device=device)
        tokens, probs = [], []
        for i in range(k):
            if params.greedy:
                token = torch.argmax(logits, dim=-1)  # [B]
            else:
                q = kernels.logits_to_probs(logits, params.temperature, params.top_k, params.top_p)
                noise = state.rng.exponential(q.shape[-1], q.dtype, counters, RowRandom.DRAFT_STREAM + i)
                token = kernels.sample_exponential_race(q, noise)
                probs.append(q)
            tokens.append(token)
            if i < k - 1:
                logits = self.kv.forward(token.unsqueeze(1), ones, logits_to_keep=1)[:, -1]
        self.fed_drafts = max(k - 1, 0)
        drafts = torch.stack(tokens, dim=1)  # [B, k]
        self.proposed = True
        return DraftProposal(
            tokens=drafts,
            num_draft=torch.full((state.batch_size,), k, dtype=torch.long, device=device),
            probs=torch.stack(probs, dim=1) if probs else None,  # [B, k, V_draft]
        )

    def observe(self, state, num_accepted: torch.Tensor, emitted: torch.Tensor) -> None:
        if not self.proposed:  # no drafting this step (k = 0): nothing was fed
            for b, tokens in enumerate(state.step_emitted):
                self.pending[b].append(tokens[0])
            return
        self.proposed = False
        fed = self.fed_drafts
        slots = torch.arange(fed, device=state.device).unsqueeze(0)
        keep = torch.cat([self.pending_valid, slots < num_accepted.unsqueeze(1)], dim=1)
        self.kv.rollback(keep)
        for b, (n, tokens) in enumerate(zip(state.step_accepted, state.step_emitted)):
            # The emitted tokens are the n accepted drafts, then the target's correction or
            # bonus token; the draft model has already seen the first `fed` drafts.
            self.pending[b] = tokens[min(fed, n):]

    def select_rows(self, keep: torch.Tensor) -> None:
        self.kv.select_rows(keep)
        self.pending = [self.pending[i] for i in keep.tolist()]
