"""Plain-PyTorch reference implementations of the verification and sampling ops.

These are the oracle that the Triton kernels are tested against and the path the
engine takes on CPU. They are written to be obviously right, not fast.

Conventions shared with the kernels (keep them in sync, never bend these to match):
  * Logits processing order: temperature, then top-k, then top-p, renormalised.
    - top-k keeps every token whose logit is >= the k-th largest logit (ties kept).
    - top-p keeps every token whose probability is >= p_m, where m is the last rank
      (in descending order) whose exclusive cumulative mass is still < top_p; tokens
      tied with p_m are kept too, so the kept set never depends on sort order.
  * Greedy argmax ties resolve to the lowest token id (torch.argmax semantics).
  * Sampling is an exponential race: argmax(r / E), E ~ Exp(1), samples a token with
    probability proportional to r without normalising r. Ties go to the lowest id.
  * A draft token d_i with target prob p and draft prob q is accepted iff u * q < p,
    i.e. u < min(1, p / q) for u ~ U[0, 1). Without draft probs (one-hot q), q = 1.
  * Computation happens in float64 for float64 logits, otherwise in float32.

Non-finite logits (the policy the kernels follow too):
  * -inf excludes a token: it gets probability 0 and is never the argmax.
  * NaN is treated as -inf. One bad entry (an overflowed fp16 value, a NaN in a padded
    vocabulary slot) then costs that token only, instead of turning the whole row into
    NaN or making it the argmax (torch.argmax picks NaN).
  * +inf, after temperature scaling, becomes the dtype's largest finite value, so the
    tokens at +inf share the row's mass equally (the limit of softmax) instead of
    producing NaN; greedy picks the lowest such id.
  * A row with no allowed token (every entry -inf or NaN) has no next token: the
    verifiers emit -1 in that row's slot (num_accepted still counts the drafts accepted
    before it) and logits_to_probs returns an all-zero row. A -1 at
    tokens[b, num_accepted[b]] is how a caller sees a broken row without an extra
    device-to-host transfer: the engine should stop that row with an error rather
    than decode on from an invented token. No draft is ever accepted against such a row.
"""

from __future__ import annotations

import torch

__all__ = [
    "compute_dtype",
    "logits_to_probs",
    "sample_exponential_race",
    "sanitize_logits",
    "top_p_threshold",
    "top_p_threshold_of_logits",
    "verify_by_position",
    "verify_greedy",
    "verify_sampling",
]

# Exponential noise of exactly 0 would turn r / E into inf or nan and let that token win at
# any weight. The engine's noise (specdec.noise) is never below 1.1e-16; this clamp only
# keeps noise passed in by a caller finite.
_MIN_EXPONENTIAL = 1e-30


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sanitize_logits(x: torch.Tensor) -> torch.Tensor:  # [..., V] float -> same shape and dtype
    """NaN -> -inf (excluded), +inf -> the dtype's largest finite value (see the module docstring)."""
    return torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max, neginf=float("-inf"))


def logits_to_probs(
    logits: torch.Tensor,  # [..., V]
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:  # [..., V] in compute_dtype(logits.dtype), rows sum to 1
    """Temperature, top-k and top-p processing followed by a softmax.

    `temperature` must be > 0 (greedy decoding never calls this); `top_k` 0 and
    `top_p` 1.0 disable the respective filter.
    """
    if temperature <= 0:
        raise ValueError(f"logits_to_probs needs temperature > 0, got {temperature}")
    probs, excluded = _before_top_p(logits, temperature, top_k)
    if top_p < 1.0:
        threshold = top_p_threshold(probs, top_p)  # [..., 1]
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs.masked_fill(excluded, 0.0)  # softmax of an all -inf row is nan


def _before_top_p(logits: torch.Tensor, temperature: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits_to_probs up to top-p: (the softmax after temperature and top-k [..., V], the rows
    with no allowed token [..., 1])."""
    x = sanitize_logits(logits.to(compute_dtype(logits.dtype)) / temperature)
    excluded = x.amax(dim=-1, keepdim=True) == float("-inf")  # [..., 1] rows with no allowed token
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]  # [..., 1]
        x = x.masked_fill(x < kth, float("-inf"))
    return torch.softmax(x, dim=-1), excluded


def top_p_threshold_of_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The top-p threshold logits_to_probs(logits, temperature, top_k, top_p) masks with
    [..., 1] (what a compiled step takes as an input instead of sorting in its graph)."""
    return top_p_threshold(_before_top_p(logits, temperature, top_k)[0], top_p)


# A CPU top-p looks for the nucleus among the largest TOP_P_PREFIXES[0] probabilities first,
# then among the next prefix's, then in the whole sorted row (see top_p_threshold). On one
# core at 131k ids, 5 rows: topk of 256 1.4 ms, of 4096 7 ms, of 65536 29 ms; a sort 51 ms.
TOP_P_PREFIXES = (256, 4096)


def top_p_threshold(probs: torch.Tensor, top_p: float) -> torch.Tensor:  # [..., V] -> [..., 1]
    """p_m of the module docstring: the probability at the last rank m (descending) whose
    exclusive cumulative mass is still < top_p.

    By definition: sort the row descending, take the cumulative sum, count the ranks whose
    exclusive mass (cumulative minus the rank's own) is < top_p; p_m is the sorted value at
    that count minus one. A full sort of the vocabulary costs 3.6 ms a row at 49k ids and 21 ms
    at 262k on one CPU core, most of a sampled step's own work. On CPU the same numbers come
    from a prefix: torch.topk(probs, n) gives the n largest values in the sort's order, and
    the CPU cumsum adds sequentially (in float64 for float32), so the prefix's cumulative and
    exclusive masses are bit for bit the full sort's first n. The exclusive masses never
    decrease along the sort (values are >= 0 and sorted descending, and rounding is
    monotonic), so once a rank inside the prefix reaches top_p, no later rank counts: the
    count inside the prefix is the count over the whole row. When every rank of the prefix
    still counts (a nucleus of n or more ids in some row), the next, longer prefix is tried,
    then the whole row. Elsewhere (no sequential cumsum promised, and reading the count would
    cost a device sync) the full sort runs as written.
    """
    vocab = probs.shape[-1]
    prefixes = [n for n in TOP_P_PREFIXES if 2 * n <= vocab] if probs.device.type == "cpu" else []
    for n in [*prefixes, vocab]:
        values = torch.topk(probs, n, dim=-1).values if n < vocab else torch.sort(probs, dim=-1, descending=True).values
        exclusive_mass = torch.cumsum(values, dim=-1) - values  # [..., n]
        count = (exclusive_mass < top_p).sum(dim=-1, keepdim=True)  # [..., 1]
        if n == vocab or bool((count < n).all()):
            return values.gather(-1, (count - 1).clamp(min=0))
    raise AssertionError("unreachable: the whole row always answers")


def sample_exponential_race(
    weights: torch.Tensor,  # [..., V] non-negative, need not sum to 1
    exponentials: torch.Tensor,  # [..., V] Exp(1) noise
) -> torch.Tensor:  # [...] int64
    """Sample proportionally to `weights`: argmax(weights / E); -1 for a row of zeros."""
    noise = exponentials.to(weights.dtype).clamp(min=_MIN_EXPONENTIAL)
    sample = torch.argmax(weights / noise, dim=-1)
    return torch.where((weights > 0).any(dim=-1), sample, torch.full_like(sample, -1))


def _draft_mask(num_draft: torch.Tensor | None, batch: int, k: int, device) -> torch.Tensor:
    """[B, K] bool: which draft slots hold a real draft token."""
    positions = torch.arange(k, device=device).unsqueeze(0)  # [1, K]
    if num_draft is None:
        return positions.expand(batch, k) >= 0
    return positions < num_draft.to(device).view(-1, 1)


def _accepted_count(accept: torch.Tensor) -> torch.Tensor:  # [B, K] bool -> [B] int64
    """Length of the all-True prefix of each row."""
    return torch.cumprod(accept.to(torch.int64), dim=-1).sum(dim=-1)


def _emit(draft_tokens: torch.Tensor, num_accepted: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """tokens [B, K+1]: accepted drafts, then `last`, then -1 padding."""
    batch, k = draft_tokens.shape
    positions = torch.arange(k + 1, device=draft_tokens.device).unsqueeze(0)  # [1, K+1]
    padded = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), -1)], dim=1)
    n = num_accepted.view(-1, 1)
    tokens = torch.where(positions < n, padded, torch.full_like(padded, -1))
    return tokens.scatter(1, n, last.view(-1, 1).to(tokens.dtype))


def verify_greedy(
    draft_tokens: torch.Tensor,  # [B, K] int64
    target_logits: torch.Tensor,  # [B, K+1, V]
    num_draft: torch.Tensor | None = None,  # [B] drafts per row (<= K); None = all K
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, K+1] int64 (-1 padded), num_accepted [B]
    """Accept the longest prefix where draft == argmax(target); then emit the target's
    argmax at the first mismatch (or the bonus token after all drafts).

    A position whose logits allow no token (all -inf / NaN) has argmax -1: no draft
    matches it, and -1 is emitted there.
    """
    batch, k = draft_tokens.shape
    x = sanitize_logits(target_logits.to(compute_dtype(target_logits.dtype)))  # [B, K+1, V]
    best = torch.argmax(x, dim=-1)  # [B, K+1]
    best = torch.where(x.amax(dim=-1) == float("-inf"), torch.full_like(best, -1), best)
    valid = _draft_mask(num_draft, batch, k, draft_tokens.device) & (best[:, :k] >= 0)
    num_accepted = _accepted_count((draft_tokens == best[:, :k]) & valid)  # [B]
    last = best.gather(1, num_accepted.view(-1, 1)).squeeze(1)  # [B]
    return _emit(draft_tokens.to(torch.int64), num_accepted, last), num_accepted


def verify_sampling(
    draft_tokens: torch.Tensor,  # [B, K] int64
    draft_probs: torch.Tensor | None,  # [B, K, V] processed draft probs q; None = one-hot
    target_logits: torch.Tensor,  # [B, K+1, V] raw target logits
    uniforms: torch.Tensor,  # [B, K] U[0, 1) noise for the accept tests
    exponentials: torch.Tensor,  # [B, V] Exp(1) noise for the residual / bonus sample
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_draft: torch.Tensor | None = None,  # [B] drafts per row (<= K); None = all K
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, K+1] int64 (-1 padded), num_accepted [B]
    """Lossless rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

    p: target probs, q: draft probs, both after the same processing.
    Accept d_i with probability min(1, p(d_i) / q(d_i)). At the first rejection emit a
    sample of norm(max(0, p - q)) (one-hot q: p with d_i removed); if every draft is
    accepted emit a bonus sample of p at the next position.
    """
    batch, k = draft_tokens.shape
    p = logits_to_probs(target_logits, temperature, top_k, top_p)  # [B, K+1, V]
    tokens = draft_tokens.to(torch.int64)
    vocab = p.shape[-1]
    valid = _draft_mask(num_draft, batch, k, tokens.device)  # [B, K]
    # A draft outside [0, V) (a -1 in a real slot, an id past the vocabulary) has p = 0: rejected.
    in_vocab = (tokens >= 0) & (tokens < vocab)  # [B, K]
    safe_tokens = torch.where(in_vocab, tokens, 0).unsqueeze(-1)  # [B, K, 1]
    p_draft = torch.where(in_vocab, p[:, :k].gather(-1, safe_tokens).squeeze(-1), 0.0)  # [B, K]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.to(p.dtype).gather(-1, safe_tokens).squeeze(-1)  # [B, K]
    accept = (uniforms.to(p.dtype) * q_draft < p_draft) & valid
    num_accepted = _accepted_count(accept)  # [B]

    n = num_accepted.view(-1, 1, 1)
    p_next = p.gather(1, n.expand(-1, 1, p.shape[-1])).squeeze(1)  # [B, V]
    rejected = valid.gather(1, num_accepted.clamp(max=k - 1).view(-1, 1)).squeeze(1) if k else (
        torch.zeros(batch, dtype=torch.bool, device=tokens.device))
    rejected = rejected & (num_accepted < k)  # [B]: a real draft was rejected at n
    if k:  # computed for every row (no host read of `rejected`), used where a draft was rejected
        n_draft = n.clamp(max=k - 1)
        if draft_probs is None:
            d_rej = tokens.gather(1, n_draft.view(-1, 1))  # [B, 1], may be outside [0, V)
            columns = torch.arange(vocab, device=tokens.device).unsqueeze(0)  # [1, V]
            residual = torch.where(columns == d_rej, 0.0, p_next)  # p without d (nothing if d is not a token)
        else:
            q_next = draft_probs.to(p.dtype).gather(1, n_draft.expand(-1, 1, p.shape[-1])).squeeze(1)
            residual = (p_next - q_next).clamp(min=0.0)
        # Rounding can leave an all-zero residual when p == q; p itself is then exact.
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
        weights = torch.where(rejected.view(-1, 1), residual, p_next)
    else:
        weights = p_next
    last = sample_exponential_race(weights, exponentials)  # [B]
    return _emit(tokens, num_accepted, last), num_accepted


def verify_by_position(
    draft_tokens: torch.Tensor,  # [B, K] int64
    target_logits: torch.Tensor,  # [B, K+1, V] raw target logits
    exponentials: torch.Tensor,  # [B, K+1, V] Exp(1) noise, slot j keyed by its absolute position
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_draft: torch.Tensor | None = None,  # [B] drafts per row (<= K); None = all K
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, K+1] int64 (-1 padded), num_accepted [B]
    """Verification whose tokens do not depend on the drafts.

    The target is sampled at every slot, s_j = argmax(p_j / E_j) with the slot's own noise;
    d_j is accepted iff d_j == s_j; at the first mismatch (or after all K) s_j is emitted.
    Every emitted token is s_j given the tokens before it (accepted drafts equal the
    samples), so with E_j keyed by the absolute position a row's tokens are those of plain
    sampling, one token a step, whatever was drafted and wherever the steps began: exactly
    the target's distribution, each draft accepted with probability p(d_j) as in the
    one-hot test. Draft probabilities are not needed. Cost: noise over the vocabulary for
    every slot, [B, K+1, V], where verify_sampling draws one row of it.
    """
    batch, k = draft_tokens.shape
    p = logits_to_probs(target_logits, temperature, top_k, top_p)  # [B, K+1, V]
    samples = sample_exponential_race(p, exponentials)  # [B, K+1], -1 where no token is allowed
    tokens = draft_tokens.to(torch.int64)
    valid = _draft_mask(num_draft, batch, k, tokens.device)  # [B, K]
    accept = (tokens == samples[:, :k]) & (samples[:, :k] >= 0) & valid
    num_accepted = _accepted_count(accept)  # [B]
    last = samples.gather(1, num_accepted.view(-1, 1)).squeeze(1)  # [B]
    return _emit(tokens, num_accepted, last), num_accepted
