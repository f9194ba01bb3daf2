"""What the cache holds never changes an answer: seeded samples with drafts from the store,
and stop strings on every path.

Seeded sampling: a seeded row's tokens are a function of its prompt and seed. Drafts from
the shared draft store depend on what other requests wrote, so with drafter "cache" the
target is sampled by position (kernels.reference.verify_by_position): the same seed gives
the same tokens on a fresh store, on one filled with other outputs and on a poisoned one,
and those are plain decoding's tokens. Drafter "auto" leaves the store out of seeded rows.

Stop strings: a row stops at the first token whose prefix text contains a stop string
(specdec.stopping), on the uncached, verified-hit, trusted-hit and streamed paths alike.
`stop=["\\ufffd"]` is the sharp case: a multi-byte character whose bytes are separate
tokens reads "\\ufffd" while half decoded, and no longer once its last byte arrives.

Every test runs against a real redis-server.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec import SpeculativeGenerator
from specdec.caching import CacheLayer
from specdec.drafters import DraftContext, get_drafter_class
from specdec.kernels import reference
from specdec.params import make_params
from specdec.planning import Planner

PROMPT = "def add(a, b):"
OTHER_PROMPTS = ["class Point:", "for i in range(10):", "import os"]
SECRET = "test-secret-0123456789abcdef"
NEW = 24
SEEDED = dict(max_new_tokens=NEW, ignore_eos=True, temperature=1.0, seed=7)


@pytest.fixture
def url(redis_server, cache_namespace):
    """A fresh namespace on the real redis-server (a suffix names another fresh one)."""
    def make(suffix: str = "") -> str:
        return redis_server.url + f"?namespace={cache_namespace}{suffix}&deadline_ms=10000"

    return make


@pytest.fixture(scope="module")
def gen(cache_models):
    return SpeculativeGenerator.from_pretrained(str(cache_models.target), dtype=torch.float64)


@pytest.fixture(scope="module")
def gen_draft(cache_models):
    return SpeculativeGenerator.from_pretrained(str(cache_models.target), str(cache_models.draft), dtype=torch.float64)


def one(gen, prompt=PROMPT, **kwargs):
    return gen.generate(prompt, **kwargs)[0]


def _poison(layer, sequence, rng):
    """Overwrite every context of `sequence` the drafter could look up with garbage."""
    ds = layer.draft_store
    for i in range(1, len(sequence) + 1):
        for n in ds.contexts:
            if n <= i:
                ds.put(sequence[i - n : i], [rng.randrange(layer.vocab_size) for _ in range(8)])


def _fillings(gen, layer, prompt_ids, tokens):
    """Ways to fill the store, one after another: the row's own output (every draft right),
    other seeds' outputs of the same prompt and other prompts' outputs, then garbage."""
    def replay():
        layer.draft_store.add(prompt_ids + tokens)

    def others():  # one batch: the same prompt under other seeds, and other prompts
        prompts = [PROMPT, PROMPT, *OTHER_PROMPTS]
        gen.generate(prompts, cache=layer, **{**SEEDED, "seed": list(range(1, len(prompts) + 1)), "drafter": "none"})

    def poison():
        _poison(layer, prompt_ids + tokens, random.Random(0))

    return {"replay": replay, "others": others, "poison": poison}


# ---------------------------------------------------------------------- seeded rows and the store


@pytest.mark.parametrize("k", [4, "auto"])
def test_seeded_cache_drafter_gives_the_same_tokens_whatever_the_store_holds(gen, url, k):
    kwargs = dict(SEEDED, drafter="cache", num_draft_tokens=k)
    plain = one(gen, cache=None, **{**SEEDED, "drafter": "none"})
    prompt_ids = gen.tokenizer(PROMPT)["input_ids"]
    with CacheLayer.open(url(), gen, response_cache=False) as layer:
        fresh = one(gen, cache=layer, **kwargs)
        assert fresh.stats.drafted_tokens == 0  # nothing in the store yet
        assert fresh.token_ids == plain.token_ids  # the tokens of plain decoding under the same seed
        for name, fill in _fillings(gen, layer, prompt_ids, fresh.token_ids).items():
            fill()
            layer.flush()
            again = one(gen, cache=layer, **kwargs)
            assert again.token_ids == fresh.token_ids, name
            assert again.stats.drafted_tokens > 0, name  # the store did offer drafts
            if name == "replay":  # the row's own output: drafts accepted, fewer forwards
                assert again.stats.accepted_tokens > 0
                assert again.stats.target_forwards < fresh.stats.target_forwards
        # In a batch beside other rows, each row still gets its own tokens.
        batch = gen.generate([OTHER_PROMPTS[0], PROMPT], cache=layer, **{**kwargs, "seed": [3, 7]})
        assert batch[1].token_ids == fresh.token_ids


def test_seeded_cache_drafter_in_a_stream_gives_the_same_text(gen, url):
    kwargs = dict(SEEDED, drafter="cache", num_draft_tokens=4)
    with CacheLayer.open(url(), gen, response_cache=False) as layer:
        fresh = one(gen, cache=layer, **kwargs)
        layer.draft_store.add(gen.tokenizer(PROMPT)["input_ids"] + fresh.token_ids)
        layer.flush()
        deltas = []
        stream = gen.stream(PROMPT, cache=layer, **kwargs)
        while True:
            try:
                deltas.append(next(stream))
            except StopIteration as done:
                result = done.value
                break
    assert result.token_ids == fresh.token_ids and "".join(deltas) == fresh.text
    assert result.stats.accepted_tokens > 0


@pytest.mark.parametrize("which,k", [("ngram", 4), ("ngram+model", "auto")])
def test_seeded_auto_with_a_cache_does_not_read_the_store(gen, gen_draft, url, which, k):
    g = gen_draft if which == "ngram+model" else gen
    kwargs = dict(SEEDED, drafter="auto", num_draft_tokens=k)
    without = one(g, cache=None, **kwargs)
    prompt_ids = g.tokenizer(PROMPT)["input_ids"]
    with CacheLayer.open(url(), g, response_cache=False) as layer:
        fresh = one(g, cache=layer, **kwargs)
        assert fresh.token_ids == without.token_ids
        lookups = layer.draft_store.lookups
        for name, fill in _fillings(g, layer, prompt_ids, fresh.token_ids).items():
            fill()
            layer.flush()
            assert one(g, cache=layer, **kwargs).token_ids == fresh.token_ids, name
        assert layer.draft_store.lookups == lookups  # not even scored from the store's offers


def test_seeded_planner_leaves_shared_state_sources_out(gen, url):
    """The rule in one place: beside other sources a store source is dropped for seeded rows;
    alone it is verified by position; greedy and unseeded rows keep it as it is."""
    with CacheLayer.open(url(), gen, response_cache=False) as layer:
        context = DraftContext(device=torch.device("cpu"), vocab_size=gen.vocab_size, store=layer.draft_store)
        ngram, cache = get_drafter_class("ngram"), get_drafter_class("cache")
        cpu = torch.device("cpu")
        for seed, temperature, keeps, by_position in ((5, 1.0, False, False), (None, 1.0, True, False),
                                                     (5, 0.0, True, False)):
            params = make_params(temperature=temperature, seed=seed, drafter="auto")
            both = Planner(params, [ngram(context), cache(context)], 1, cpu)
            assert ("cache" in both.sources) == keeps and not both.verify_by_position
            alone = Planner(params, [cache(context)], 1, cpu)
            assert "cache" in alone.sources and alone.verify_by_position == (seed is not None and temperature > 0)


def test_verify_by_position_emits_the_samples_whatever_the_drafts():
    torch.manual_seed(0)
    batch, k, vocab = 64, 5, 12
    logits = torch.randn(batch, k + 1, vocab, dtype=torch.float64) * 2
    exponentials = torch.distributions.Exponential(1.0).sample((batch, k + 1, vocab)).double()
    p = reference.logits_to_probs(logits, 0.9, 0, 1.0)
    samples = reference.sample_exponential_race(p, exponentials)  # [B, K+1]
    for trial in range(20):
        drafts = torch.randint(0, vocab, (batch, k))
        agree = torch.rand(batch, k) < 0.7  # most drafts right, so long accepted runs occur
        drafts = torch.where(agree, samples[:, :k], drafts)
        num_draft = torch.randint(0, k + 1, (batch,))
        tokens, accepted = reference.verify_by_position(drafts, logits, exponentials, temperature=0.9,
                                                        num_draft=num_draft)
        for b in range(batch):
            n = int(accepted[b])
            assert n <= int(num_draft[b]) and drafts[b, :n].tolist() == samples[b, :n].tolist()
            assert n == int(num_draft[b]) or drafts[b, n] != samples[b, n]  # the first mismatch
            assert tokens[b, : n + 1].tolist() == samples[b, : n + 1].tolist()  # the samples, drafts or not
            assert (tokens[b, n + 1 :] == -1).all()


# ---------------------------------------------------------------------- stop strings on every path


X, Y, Z = "x", "y", "z"
LEAD, CONT = "\u00c3", "\u00a9"  # byte-level symbols of 0xC3 and 0xA9: the two bytes of "é"


def chain_model(tokenizer, cycle: list[int]) -> LlamaForCausalLM:
    """A Llama whose next token depends on the last token alone: cycle[i] -> cycle[i + 1]
    (round the cycle), any other token -> cycle[0]. One-hot embeddings, layers that add
    nothing to the residual stream, and a head that maps each token to its successor with
    a margin of 18 logits, so greedy and sampled decoding both follow the chain."""
    vocab = len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float64)
    successor = dict(zip(cycle, cycle[1:] + cycle[:1]))
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(vocab, vocab, dtype=torch.float64)
        for t in range(vocab):
            head[successor.get(t, cycle[0]), t] = 1.0
        model.lm_head.weight.copy_(head)
    return model.eval()


@pytest.fixture(scope="module")
def chain(tiny_tokenizer):
    """Generators over x -> y -> 0xC3 -> 0xA9 -> z -> x: the text "yézxyéz..." with "é" split
    over two tokens (without and with the same chain as draft model: multi-token steps)."""
    cycle = tiny_tokenizer.convert_tokens_to_ids([X, Y, LEAD, CONT, Z])
    model = chain_model(tiny_tokenizer, cycle)
    plain = SpeculativeGenerator(model, tiny_tokenizer)
    drafted = SpeculativeGenerator(model, tiny_tokenizer, draft_model=copy.deepcopy(model))
    return plain, drafted, cycle


def _stream(gen, prompt, **kwargs):
    deltas, steps = [], gen.stream(prompt, **kwargs)
    while True:
        try:
            deltas.append(next(steps))
        except StopIteration as done:
            return "".join(deltas), done.value


def _every_path(gen, url, prompts, **kwargs):
    """(path, prompt, token_ids, text, finish_reason) of each prompt on every path: decoded
    (batched and streamed), then from a verified and from a trusted cache (the first call
    decodes, the next ones hit, batched and streamed)."""
    out = []

    def add(path, results):
        for prompt, r in zip(prompts, results):
            out.append((path, prompt, r.token_ids, r.text, r.finish_reason))

    def streams(path, **extra):
        texts, results = zip(*(_stream(gen, p, **kwargs, **extra) for p in prompts))
        add(path, results)
        out.extend((path + " (text)", p, r.token_ids, t, r.finish_reason) for p, t, r in zip(prompts, texts, results))
        return results

    add("uncached", gen.generate(prompts, cache=None, **kwargs))
    streams("uncached stream", cache=None)
    for mode, options in (("verified", {}), ("trusted", {"secret": SECRET})):
        with CacheLayer.open(url(f"-{mode}"), gen, **options) as layer:
            add(f"{mode}: first", gen.generate(prompts, cache=layer, **kwargs))
            layer.flush()
            hits = gen.generate(prompts, cache=layer, **kwargs)
            hit_streams = streams(f"{mode}: hit stream", cache=layer)
            assert all(r.stats.cache_kind == mode for r in [*hits, *hit_streams]), mode
            add(f"{mode}: hit", hits)
    return out


@pytest.mark.parametrize("drafter", ["none", "ngram", "model"])
def test_stop_at_a_half_decoded_character_is_judged_alike_on_every_path(chain, url, drafter):
    plain, drafted, cycle = chain
    gen = drafted if drafter == "model" else plain
    kwargs = dict(max_new_tokens=24, ignore_eos=True, drafter=drafter, num_draft_tokens=4, stop=["\ufffd"])
    # After "x": y, then 0xC3 alone decodes to "y\ufffd": the row stops there.
    for path, _, ids, text, reason in _every_path(gen, url, ["xyézx"], **kwargs):
        assert (ids, text, reason) == ([cycle[1], cycle[2]], "y", "stop"), path


@pytest.mark.parametrize("drafter", ["none", "ngram"])
@pytest.mark.parametrize("stop", [["\ufffd"], [" ", "é"]])
def test_stop_strings_are_judged_alike_on_every_path(gen, url, drafter, stop):
    """Tiny random model over byte-level tokens: its text is full of characters cut in half."""
    kwargs = dict(max_new_tokens=16, ignore_eos=True, drafter=drafter, num_draft_tokens=3, stop=stop)
    prompts = ["def add(a, b):", "café naïve"]
    results = _every_path(gen, url, prompts, **kwargs)
    expected = {prompt: got for path, prompt, *got in results if path == "uncached"}
    for path, prompt, *got in results:
        assert got == expected[prompt], (path, prompt)
