"""Drafter "eagle": EAGLE-3 heads drafting from the target's hidden states.

A head is trained here for the tiny float64 llama target (specdec.eagle_training, the code
benchmarks/train_head.py drives), saved in the published EAGLE-3 layout and loaded back
through from_pretrained, as a user loads one. Greedy output must equal plain decoding token
for token (ragged batches, both engine paths, fixed and adaptive K, beside the draft model
under drafter "auto"), and the head must really be accepted, so that rollback is exercised.
A head written by hand with the names and shapes vLLM's and SGLang's loaders expect loads
and runs; heads that do not fit the target are refused before any compute.
"""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_models import TinyPair, make_model, perturbed, save
from safetensors.torch import save_file

from specdec import SpeculativeGenerator
from specdec.eagle import (
    EagleHead,
    load_head,
    save_head,
    shipped_head,
    weight_fingerprint,
)
from specdec.eagle_training import head_config, init_head, target_states, ttt_loss

PROMPTS = [
    [5, 17, 42, 9, 100, 7, 33],
    [61],
    [3, 9, 11, 202, 202, 15, 15, 15, 8, 1, 40, 4, 90, 91, 92],
    [250, 251],
]


def _train_head(target, *, draft_vocab: int, steps: int, seed: int = 0) -> EagleHead:
    """A head trained on the target's own greedy continuations of random prompts."""
    torch.manual_seed(seed)
    vocab = target.get_input_embeddings().weight.shape[0]
    gen = SpeculativeGenerator(target)
    prompts = torch.randint(3, vocab, (48, 6), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [p + r.token_ids for p, r in zip(prompts, gen.generate_ids(prompts, max_new_tokens=42, ignore_eos=True,
                                                                      drafter="none"))]
    ids = torch.tensor(rows)
    config = head_config(target, draft_vocab=draft_vocab)
    layers = tuple(config["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
    feats, final, greedy = target_states(target, ids, layers)
    counts = torch.bincount(greedy.flatten(), minlength=vocab)
    draft_ids = torch.sort(torch.argsort(counts, descending=True, stable=True)[:draft_vocab]).values
    head = init_head(config, target, draft_ids).double()
    embed = target.get_input_embeddings()
    with torch.no_grad():
        labels = torch.softmax(final @ target.get_output_embeddings().weight[draft_ids].T, dim=-1)
    ok = head.t2d[greedy]
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for step in range(steps):
        rows_ = torch.arange(step * 8, step * 8 + 8) % len(ids)
        loss, _, _ = ttt_loss(head, lambda t: embed(t).detach(), ids[rows_], feats[rows_], labels[rows_], ok[rows_], 3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.config["specdec"] = {"target": "tiny llama", "target_fingerprint": weight_fingerprint(target)}
    return head.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_tokenizer) -> TinyPair:
    """A tiny float64 llama whose attention is damped (o_proj x 0.05), so that its next token
    depends mostly on the current one and a head trained for a few seconds is accepted often
    (the fixtures' targets are so chaotic that it never is), and a perturbed copy as draft."""
    root = tmp_path_factory.mktemp("eagle-pair")
    model = make_model("llama", len(tiny_tokenizer), seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.05)
    return TinyPair("llama", save(model, tiny_tokenizer, root / "target"),
                    {"partial": save(perturbed(model, 0.1, seed=2), tiny_tokenizer, root / "draft")})


@pytest.fixture(scope="module")
def target(pair):
    return SpeculativeGenerator.from_pretrained(str(pair.target), dtype=torch.float64).target_model


@pytest.fixture(scope="module")
def trained(target) -> EagleHead:
    return _train_head(target, draft_vocab=200, steps=150)


@pytest.fixture(scope="module")
def head_dir(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eagle-head")
    save_head(trained, folder, dtype=torch.float64)
    return folder


def _load(pair, head_dir, with_draft: bool = False) -> SpeculativeGenerator:
    draft = str(pair.drafts["partial"]) if with_draft else None
    gen = SpeculativeGenerator.from_pretrained(str(pair.target), draft, head=str(head_dir), dtype=torch.float64)
    assert "head" in gen.draft_resources
    return gen


def test_published_layout_round_trip(trained, head_dir):
    config = json.loads((head_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["draft_vocab_size"] == 200 and config["vocab_size"] == 320
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 1, 0]
    from safetensors import safe_open

    with safe_open(str(head_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("d2t").dtype == torch.int64 and f.get_tensor("t2d").dtype == torch.bool
        assert tuple(f.get_tensor("fc.weight").shape) == (32, 96)
        assert tuple(f.get_tensor("midlayer.self_attn.q_proj.weight").shape) == (32, 64)
    assert {"fc.weight", "norm.weight", "lm_head.weight", "midlayer.hidden_norm.weight",
            "midlayer.input_layernorm.weight", "midlayer.mlp.down_proj.weight"} <= names
    assert "embed_tokens.weight" not in names  # shared with the target
    head = load_head(head_dir)
    assert head.config["specdec"]["target_fingerprint"] == trained.config["specdec"]["target_fingerprint"]
    for name, tensor in trained.state_dict().items():
        assert torch.equal(head.state_dict()[name], tensor), name


@pytest.mark.parametrize("k", [1, 4, "auto"])
def test_greedy_equals_plain_decoding(pair, head_dir, engine_path, k):
    gen = _load(pair, head_dir)
    plain = gen.generate_ids(PROMPTS, max_new_tokens=40, ignore_eos=True, drafter="none")
    out = gen.generate_ids(PROMPTS, max_new_tokens=40, ignore_eos=True, drafter="eagle", num_draft_tokens=k)
    assert [r.token_ids for r in out] == [r.token_ids for r in plain]
    if k != "auto":  # (K "auto" may stop drafting where the head does not pay)
        accepted = sum(r.stats.accepted_tokens for r in out)
        assert accepted > 40  # the head is really accepted, so rollback after partial acceptance runs


def test_greedy_auto_beside_draft_model_equals_plain(pair, head_dir, engine_path):
    gen = _load(pair, head_dir, with_draft=True)
    assert gen.draft_resources == {"model", "head"}
    plain = gen.generate_ids(PROMPTS, max_new_tokens=40, ignore_eos=True, drafter="none")
    used = set()
    for drafter, k in (("auto", "auto"), ("auto", 3), ("eagle", "auto")):
        out = gen.generate_ids(PROMPTS, max_new_tokens=40, ignore_eos=True, drafter=drafter, num_draft_tokens=k)
        assert [r.token_ids for r in out] == [r.token_ids for r in plain], (drafter, k)
        for r in out:
            used |= {name for name, steps in r.stats.drafter_steps.items() if steps}
    assert "eagle" in used


def test_seeded_sampling_reproducible_and_batch_invariant(pair, head_dir):
    gen = _load(pair, head_dir)
    settings = dict(max_new_tokens=24, ignore_eos=True, drafter="eagle", temperature=0.8, top_k=50, top_p=0.9)
    batch = gen.generate_ids(PROMPTS, seed=[1, 2, 3, 4], **settings)
    again = gen.generate_ids(PROMPTS, seed=[1, 2, 3, 4], **settings)
    alone = [gen.generate_ids([p], seed=s, **settings)[0] for p, s in zip(PROMPTS, [1, 2, 3, 4])]
    assert [r.token_ids for r in batch] == [r.token_ids for r in again] == [r.token_ids for r in alone]


def test_hand_written_published_layout_loads_and_runs(pair, tmp_path):
    """Names and shapes as vLLM's and SGLang's llama_eagle3 loaders read them, random weights."""
    gen0 = SpeculativeGenerator.from_pretrained(str(pair.target), dtype=torch.float64)
    hidden, heads, kv_heads, head_dim, inter, vocab, draft_vocab = 32, 4, 2, 8, 48, 320, 64
    g = torch.Generator().manual_seed(5)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    draft_ids = torch.sort(torch.randperm(vocab, generator=g)[:draft_vocab]).values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[draft_ids] = True
    weights = {
        "fc.weight": rand(hidden, 3 * hidden),
        "midlayer.input_layernorm.weight": torch.ones(hidden),
        "midlayer.hidden_norm.weight": torch.ones(hidden),
        "midlayer.post_attention_layernorm.weight": torch.ones(hidden),
        "midlayer.self_attn.q_proj.weight": rand(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": rand(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": rand(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": rand(inter, hidden),
        "midlayer.mlp.up_proj.weight": rand(inter, hidden),
        "midlayer.mlp.down_proj.weight": rand(hidden, inter),
        "norm.weight": torch.ones(hidden),
        "lm_head.weight": rand(draft_vocab, hidden),
        "d2t": draft_ids - torch.arange(draft_vocab),
        "t2d": t2d,
    }
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": vocab,
        "draft_vocab_size": draft_vocab, "max_position_embeddings": 256, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }))
    gen = SpeculativeGenerator.from_pretrained(str(pair.target), draft=str(tmp_path), dtype=torch.float64)
    assert gen.draft_model is None and gen.draft_head is not None
    assert gen.draft_head.aux_layers == (2, 1, 0)  # EAGLE-3's default for a config that names none
    plain = gen0.generate_ids(PROMPTS, max_new_tokens=20, ignore_eos=True, drafter="none")
    for settings in (dict(), dict(temperature=0.9, seed=[1, 2, 3, 4])):
        out = gen.generate_ids(PROMPTS, max_new_tokens=20, ignore_eos=True, drafter="eagle", num_draft_tokens=3,
                               **settings)
        if not settings:
            assert [r.token_ids for r in out] == [r.token_ids for r in plain]
        for r in out:
            assert r.stats.drafted_tokens > 0
            assert all(0 <= t < vocab for t in r.token_ids)
    # A plain head loaded by the loader names the same weights
    head = load_head(tmp_path)
    assert torch.equal(head.fc.weight, weights["fc.weight"].to(torch.bfloat16))
    assert torch.equal(head.draft_to_target(), draft_ids)


def _bad_head(tmp_path, target, **change):
    config = head_config(target, draft_vocab=50)
    config.update(change)
    head = EagleHead(config)
    save_head(head, tmp_path, dtype=torch.float32)
    return tmp_path


@pytest.mark.parametrize("change, words", [
    (dict(target_hidden_size=48, hidden_size=48, head_dim=12), ["target hidden states of size 48", "hidden size is 32"]),
    (dict(vocab_size=400), ["400 target ids", "vocabulary has 320"]),
    (dict(hidden_size=64, head_dim=16), ["no embed_tokens", "hidden size 64", "32"]),
    (dict(eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 2, 7]}), ["layers [1, 2, 7]", "has 2 layers"]),
])
def test_heads_that_do_not_fit_are_refused(pair, target, tmp_path, change, words):
    folder = _bad_head(tmp_path, target, **change)
    with pytest.raises(ValueError) as err:
        SpeculativeGenerator.from_pretrained(str(pair.target), draft=str(folder), dtype=torch.float64)
    for word in words:
        assert word in str(err.value)


def test_head_for_other_target_weights_is_refused(pair, target, head_dir, tmp_path):
    other = SpeculativeGenerator.from_pretrained(str(pair.drafts["partial"]), dtype=torch.float64)
    assert other.target_model.config.hidden_size == target.config.hidden_size
    with pytest.raises(ValueError, match="trained for other target weights"):
        SpeculativeGenerator.from_pretrained(str(pair.drafts["partial"]), head=str(head_dir), dtype=torch.float64)
    # In another dtype the same target is recognised.
    gen = SpeculativeGenerator.from_pretrained(str(pair.target), head=str(head_dir), dtype=torch.float32)
    assert gen.draft_head is not None


def test_not_a_head_and_no_head(pair, head_dir):
    with pytest.raises(ValueError, match="not a local folder holding an EAGLE-3 head"):
        SpeculativeGenerator.from_pretrained(str(pair.target), head=str(pair.drafts["partial"]))
    with pytest.raises(ValueError, match="as draft= or as head=, not both"):
        SpeculativeGenerator.from_pretrained(str(pair.target), draft=str(head_dir), head=str(head_dir))
    gen = SpeculativeGenerator.from_pretrained(str(pair.target), dtype=torch.float64)
    with pytest.raises(ValueError, match='drafter="eagle" needs an EAGLE-3 head'):
        gen.generate_ids([[5, 6, 7]], max_new_tokens=4, drafter="eagle")


@pytest.mark.skipif(shipped_head("bundled") is None, reason="the bundled head is not built")
def test_bundled_head_ships_and_is_exact():
    gen = SpeculativeGenerator.from_pretrained("bundled", dtype=torch.float64)
    assert gen.draft_resources == {"model", "head"}
    card = gen.draft_head.config["specdec"]
    assert card["target"] == "bundled" and "training" in card
    prompts = [gen.tokenizer("def parse(self, text):\n")["input_ids"], gen.tokenizer("import os\n\n")["input_ids"]]
    plain = gen.generate_ids(prompts, max_new_tokens=48, drafter="none", ignore_eos=True)
    out = gen.generate_ids(prompts, max_new_tokens=48, drafter="eagle", num_draft_tokens=4, ignore_eos=True)
    assert [r.token_ids for r in out] == [r.token_ids for r in plain]
    assert sum(r.stats.accepted_tokens for r in out) > 40
    without = SpeculativeGenerator.from_pretrained("bundled", head=None)
    assert without.draft_resources == {"model"}


@pytest.mark.parametrize("settings", [
    dict(drafter="eagle", num_draft_tokens=3),
    dict(drafter="auto", num_draft_tokens="auto"),
    dict(drafter="eagle", num_draft_tokens="auto", temperature=0.8, top_p=0.9),
], ids=["greedy-eagle-3", "greedy-auto", "seeded-eagle-auto"])
def test_rows_join_a_running_eagle_batch(pair, head_dir, settings):
    """Continuous batching (a server's batch): rows join between steps and each decodes as it would
    alone, the head's KV cache and pending windows merged with the target's."""
    from test_continuous_batching import BUDGETS, alone, drive, start

    gen = _load(pair, head_dir, with_draft=True)
    running = start(gen, [0, 1], settings)
    done = drive(running, steps=3)
    joining = start(gen, [2, 3, 4], settings)
    done.update(drive(joining, steps=1))
    assert running.can_merge and joining.can_merge
    running.merge(joining)
    running.streamed.update(joining.streamed)
    done.update(drive(running))
    running.close()
    for row in range(5):
        assert done[row] == alone(gen, row, settings), row
        assert len(done[row]) == BUDGETS[row]


def _smollm2_ready() -> str | None:
    from specdec import real_models
    from specdec.real_models import MissingPackageError

    try:
        real_models.require("smollm2-135m")
    except MissingPackageError as exc:
        return f"real weights not installed: {exc}"
    return None if shipped_head("smollm2-135m") else "the SmolLM2-135M head is not built"


@pytest.mark.real
@pytest.mark.skipif(_smollm2_ready() is not None, reason=_smollm2_ready() or "")
def test_smollm2_head_ships_and_is_exact():
    """The shipped SmolLM2-135M-Instruct head, float64, a ragged batch of code prompts."""
    gen = SpeculativeGenerator.from_pretrained("smollm2-135m", dtype=torch.float64)
    assert gen.draft_resources == {"head"}
    assert gen.draft_head.config["draft_vocab_size"] < gen.draft_head.config["vocab_size"]
    prompts = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
               "from typing import List\n\n\ndef mean(values: List[float]) -> float:\n"]
    plain = gen.generate(prompts, max_new_tokens=24, drafter="none", ignore_eos=True)
    out = gen.generate(prompts, max_new_tokens=24, drafter="eagle", num_draft_tokens=4, ignore_eos=True)
    assert [r.token_ids for r in out] == [r.token_ids for r in plain]
    assert sum(r.stats.accepted_tokens for r in out) > 8


@pytest.mark.parametrize("k", [3, "auto"])
def test_rows_of_one_batch_drafting_from_different_costly_sources_equal_alone(pair, head_dir, k):
    """Seeded sampling with drafter "auto" beside a draft model: each row plans alone, so rows of
    one batch may draft from the draft model and from the head in the same step; each row's
    sample equals its sample alone."""
    gen = _load(pair, head_dir, with_draft=True)
    prompts = PROMPTS * 2
    seeds = list(range(11, 11 + len(prompts)))
    settings = dict(max_new_tokens=32, ignore_eos=True, drafter="auto", num_draft_tokens=k, temperature=0.9)
    batch = gen.generate_ids(prompts, seed=seeds, **settings)
    alone = [gen.generate_ids([p], seed=s, **settings)[0] for p, s in zip(prompts, seeds)]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    if k == 3:  # (K "auto" may leave both to prompt lookup)
        used = set()
        for r in batch:
            used |= {name for name, steps in r.stats.drafter_steps.items() if steps}
        assert {"model", "eagle"} <= used


# --------------------------------------------------------------------------- compiled head steps


@pytest.fixture(scope="module")
def compiled_pair(pair, head_dir, tmp_path_factory):
    """(eager, compiled) generators over the same float32 target, draft model and head (inductor
    compiles float32 on CPU, as users run it); the compiled one warmed up."""
    import os

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    eager = SpeculativeGenerator.from_pretrained(str(pair.target), str(pair.drafts["partial"]), head=str(head_dir),
                                                 dtype=torch.float32)
    compiled = SpeculativeGenerator(eager.target_model, eager.tokenizer, eager.draft_model, engine="static",
                                    compile=True, draft_head=eager.draft_head)
    compiled.warmup()
    return eager, compiled


def _count_head_calls(monkeypatch, compiled) -> list:
    """The kinds of the compiled head's calls from now on: its steps and its greedy chains."""
    from specdec.compiled import CompiledChain, CompiledHead

    calls = []
    for cls in (CompiledHead, CompiledChain):
        def counting(self, kind, *args, _original=cls.__call__, **kwargs):
            calls.append(kind)
            return _original(self, kind, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", counting)
    return calls


@pytest.mark.parametrize("drafter", ["eagle", "auto"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": [5, 6, 7, 8]}],
                         ids=["greedy", "seeded"])
def test_compiled_head_steps_give_the_eager_tokens(compiled_pair, monkeypatch, drafter, sampling):
    """A ragged batch (a one-token prompt among them), compiled target, draft model and head
    against the same models eager; the head's steps really run as graphs."""
    eager, compiled = compiled_pair
    calls = _count_head_calls(monkeypatch, compiled)
    kwargs = dict(max_new_tokens=24, drafter=drafter, num_draft_tokens=3, ignore_eos=True, **sampling)
    expected = eager.generate_ids(PROMPTS, **kwargs)
    got = compiled.generate_ids(PROMPTS, **kwargs)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    if drafter == "eagle":
        assert sum(r.stats.drafter_steps.get("eagle", 0) for r in got) > 0
        assert sum(r.stats.accepted_tokens for r in got) > 0
        # greedy: each step's drafts come from one chain graph (a window grown long is fed by a
        # step of its own); sampled: a graph per draft token
        kinds = {kind[0] for kind in calls}
        assert kinds == {"features", "own"} if sampling else ("chain" in kinds and "own" not in kinds)
    if not sampling:  # and greedy output is plain greedy decoding's
        assert [r.token_ids for r in got] == [r.token_ids for r in eager.generate_ids(PROMPTS, max_new_tokens=24,
                                                                                      drafter="none", ignore_eos=True)]


def test_warm_up_compiles_the_heads_steps(compiled_pair):
    """After warmup(), single-row requests of any length and draft width, through the head,
    compile nothing: the head's windows and drafting steps have their graphs, and the target's
    step forwards return hidden states on every call (one kind for every drafter)."""
    _, compiled = compiled_pair
    stats = compiled._compiler.stats
    assert compiled._compiler.target_hidden
    graphs, recompiles = stats.graphs, stats.recompiles
    for prompt, k, drafter in [(PROMPTS[0], 2, "eagle"), (PROMPTS[2], 5, "eagle"), (PROMPTS[1], 3, "auto"),
                               (PROMPTS[3], 4, "none"), (PROMPTS[2] * 3, 4, "eagle")]:
        compiled.generate_ids([prompt], max_new_tokens=20, drafter=drafter, num_draft_tokens=k, ignore_eos=True)
    assert (stats.graphs, stats.recompiles) == (graphs, recompiles)


def test_a_greedy_chain_drafts_what_the_token_by_token_loop_drafts(pair, head_dir):
    """HeadKV.chain (the compiled greedy path's one graph, here eager in float64) against the
    drafter's loop of step() calls from the same cache: the same drafts and probabilities,
    the same keys and values written, and the lengths of the window's step."""
    from specdec.eagle import HeadKV

    head = _load(pair, head_dir).draft_head  # float64, the target's embeddings attached
    gen = torch.Generator().manual_seed(3)
    features = head.fc.in_features

    def window(width):
        return (torch.randint(3, 200, (2, width), generator=gen),
                torch.randn(2, width, features, generator=gen, dtype=torch.float64))

    loop = HeadKV(head, 2, torch.device("cpu"), torch.float64)
    history, history_features = window(6)
    loop.forward(history, history_features, torch.tensor([6, 4]), features=True)  # rows of unequal lengths
    chained = HeadKV(head, 2, torch.device("cpu"), torch.float64)
    chained.forward(history, history_features, torch.tensor([6, 4]), features=True)
    tokens, hidden = window(3)
    num_valid = torch.tensor([3, 2])
    last = num_valid - 1
    length = 5

    at, logits = loop.step(tokens, hidden, num_valid, features=True, last=last)
    base = (loop.lengths.clone(), loop.bound)
    to_target = head.draft_to_target()
    drafts, confidence = [], []
    for i in range(length):
        best = torch.argmax(logits, dim=-1)
        drafts.append(to_target[best])
        confidence.append(torch.softmax(logits.float(), dim=-1).gather(1, best.unsqueeze(1)).squeeze(1))  # as the drafter
        if i < length - 1:
            at, logits = loop.step(drafts[-1].unsqueeze(1), at, features=False)
    got, got_confidence = chained.chain(tokens, hidden, num_valid, last, length)

    assert torch.equal(got, torch.stack(drafts, dim=1))
    # the chain takes the softmax at the argmax as 1 / sum(exp(x - max)): float32 rounding apart
    assert torch.allclose(got_confidence, torch.stack(confidence, dim=1), rtol=1e-6, atol=0)
    assert torch.equal(chained.lengths, base[0]) and chained.bound == base[1]
    assert torch.equal(chained.lengths, torch.tensor([9, 6]))
    # The window's keys and values are the loop's bit for bit; the drafts' agree to rounding
    # (the chain attends over the whole buffer, the loop over the written part).
    written = int(base[0].max()) + length - 1
    for mine, theirs in ((chained.k, loop.k), (chained.v, loop.v)):
        for row, end in enumerate(base[0].tolist()):  # a row's drafts start at its own length
            assert torch.equal(mine[row, :, :end], theirs[row, :, :end])
        assert torch.allclose(mine[:, :, :written], theirs[:, :, :written], rtol=0, atol=1e-12)


def test_an_early_stop_ends_a_compiled_chains_drafts(compiled_pair, monkeypatch):
    """The chain drafts CHAIN_LENGTH tokens in one graph; the step keeps those an early stop
    keeps (here one that stops every row after two), and greedy output is plain decoding's."""
    from specdec.drafters.eagle import EagleDrafter
    from specdec.planning.early_stop import EarlyStop

    eager, compiled = compiled_pair
    original = EagleDrafter.propose

    def stopped(self, state, k, early_stop=None):
        bars = [0.0] + [2.0] * (k - 2)  # the chance of reaching slot 2 (1 here) is below 2: stop there
        return original(self, state, k, early_stop=EarlyStop([1.0] * 10, bars, state.batch_size, state.device))

    monkeypatch.setattr(EagleDrafter, "propose", stopped)
    calls = _count_head_calls(monkeypatch, compiled)
    got = compiled.generate_ids(PROMPTS, max_new_tokens=24, drafter="eagle", num_draft_tokens=6, ignore_eos=True)
    assert any(kind[0] == "chain" for kind in calls)
    lengths = {}
    for r in got:
        for drafted, steps in r.stats.draft_lengths.items():
            lengths[drafted] = lengths.get(drafted, 0) + steps
    assert max(lengths) == 2 and lengths[2] > 0, lengths
    plain = eager.generate_ids(PROMPTS, max_new_tokens=24, drafter="none", ignore_eos=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in plain]


def test_an_eager_step_joins_projections_and_reads_weights_written_after(pair, head_dir):
    """Inference outside a graph runs the head with q|k|v and gate|up stacked and rope from a
    table (head_step's eager path); with gradients on it runs the modules one by one. Both
    give the same outputs, also after weights are written in place or replaced, which the
    stacked copies must follow."""
    from specdec.eagle import HeadKV

    head = _load(pair, head_dir).draft_head  # float64
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, 200, (2, 7), generator=gen)
    features = torch.randn(2, 7, head.fc.in_features, generator=gen, dtype=torch.float64)
    num_valid = torch.tensor([7, 5])

    def both():
        outputs = []
        for grad in (False, True):
            kv = HeadKV(head, 2, torch.device("cpu"), torch.float64)
            with torch.inference_mode(not grad), torch.set_grad_enabled(grad):
                # HeadKV.step runs in inference mode: call the step function itself with grad on
                from specdec.eagle import head_step

                positions = kv._advance(7, num_valid)
                out = head_step(head, kv.k, kv.v, tokens, features, positions, num_valid - 1, features=True,
                                keys=kv.bound)
            outputs.append([o.detach() for o in out])
        (at, logits), (at_plain, logits_plain) = outputs
        assert torch.allclose(at, at_plain, rtol=1e-12, atol=1e-12)
        assert torch.allclose(logits, logits_plain, rtol=1e-12, atol=1e-12)
        return logits

    joined_calls = []
    original = head.joined_weights
    head.joined_weights = lambda: joined_calls.append(1) or original()
    try:
        first = both()
        assert joined_calls, "the eager step did not take the joined projections"
        with torch.no_grad():
            head.midlayer.self_attn.k_proj.weight.mul_(-1.5)  # in place
            head.midlayer.mlp.up_proj.weight.mul_(0.5)
        second = both()
        assert not torch.allclose(first, second)
        head.midlayer.self_attn.v_proj.weight = torch.nn.Parameter(head.midlayer.self_attn.v_proj.weight * 2)  # replaced
        third = both()
        assert not torch.allclose(second, third)
    finally:
        del head.joined_weights


def _with_greedy_ids(head_dir, tmp_path, ids) -> str:
    """A copy of the head folder whose config names greedy draft ids."""
    import shutil

    folder = tmp_path / "greedy-head"
    shutil.copytree(head_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("specdec", {})["greedy_draft_ids"] = [int(i) for i in ids]
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_greedy_draft_ids_draft_what_the_whole_head_drafts_among_them(pair, head_dir, tmp_path):
    """A head whose checkpoint names greedy draft ids chooses its greedy drafts among them: the
    same token as over the whole draft vocabulary wherever that one is among them (token by
    token and in the chain), another where it is not; the ids survive a load, and greedy output
    stays plain decoding's."""
    from specdec.eagle import HeadKV

    full = _load(pair, head_dir).draft_head  # float64
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(3, 200, (2, 6), generator=gen)
    features = torch.randn(2, 6, full.fc.in_features, generator=gen, dtype=torch.float64)
    num_valid, length = torch.tensor([6, 4]), 5

    def drafts(head, greedy):
        kv = HeadKV(head, 2, torch.device("cpu"), torch.float64)
        at, logits = kv.step(tokens, features, num_valid, features=True, last=num_valid - 1, greedy=greedy)
        columns, out = kv.columns(greedy), []
        for i in range(length):
            out.append(columns[torch.argmax(logits, dim=-1)])
            at, logits = kv.step(out[-1].unsqueeze(1), at, features=False, greedy=greedy)
        chain = HeadKV(head, 2, torch.device("cpu"), torch.float64)
        chained, _ = chain.chain(tokens, features, num_valid, num_valid - 1, length)
        return torch.stack(out, dim=1), chained, logits.shape[-1]

    expected, expected_chain, width = drafts(full, greedy=False)
    assert torch.equal(expected, expected_chain)
    to_draft = {int(t): d for d, t in enumerate(full.draft_to_target().tolist())}
    used = sorted({to_draft[int(t)] for t in expected.flatten()})
    others = [d for d in range(full.draft_vocab_size) if d not in used][::3]
    folder = _with_greedy_ids(head_dir, tmp_path, used + others)
    head = _load(pair, folder).draft_head
    assert head.greedy_ids.tolist() == sorted(used + others)
    assert load_head(folder).greedy_ids.tolist() == sorted(used + others)
    got, got_chain, got_width = drafts(head, greedy=True)
    assert got_width == len(used + others) < width  # the smaller LM head ran
    assert torch.equal(got, expected) and torch.equal(got_chain, expected)

    # without the head's first choice among them, its drafts change
    (tmp_path / "again").mkdir()
    missing = _load(pair, _with_greedy_ids(head_dir, tmp_path / "again", others)).draft_head
    changed, changed_chain, _ = drafts(missing, greedy=True)
    assert not torch.equal(changed[:, 0], expected[:, 0]) and torch.equal(changed, changed_chain)

    gen_small = SpeculativeGenerator.from_pretrained(str(pair.target), head=str(folder), dtype=torch.float64)
    plain = gen_small.generate_ids(PROMPTS, max_new_tokens=20, drafter="none", ignore_eos=True)
    for drafter in ("eagle", "auto"):
        out = gen_small.generate_ids(PROMPTS, max_new_tokens=20, drafter=drafter, num_draft_tokens=3, ignore_eos=True)
        assert [r.token_ids for r in out] == [r.token_ids for r in plain]
        if drafter == "eagle":  # its drafts were verified, and some kept
            assert sum(r.stats.accepted_tokens for r in out) > 0


@pytest.mark.parametrize("ids", [[], [0, 0], [-1], [10**6], "all", [1.5]])
def test_bad_greedy_draft_ids_are_refused_at_load(pair, head_dir, tmp_path, ids):
    import shutil

    folder = tmp_path / "greedy-head"
    shutil.copytree(head_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("specdec", {})["greedy_draft_ids"] = ids
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="greedy_draft_ids"):
        load_head(folder)


def test_greedy_draft_ids_are_the_most_emitted(trained):
    """greedy_draft_ids keeps the draft ids whose target ids the target emitted most often and
    reports the share of emissions they cover."""
    from specdec.eagle_training import greedy_draft_ids

    to_target = trained.draft_to_target()
    counts = torch.zeros(trained.vocab_size, dtype=torch.long)
    counts[to_target[7]], counts[to_target[3]], counts[to_target[150]] = 50, 30, 20
    outside = next(t for t in range(trained.vocab_size) if not trained.t2d[t])
    counts[outside] = 100  # never drafted: not a draft id, but counted in the coverage's whole
    ids, coverage = greedy_draft_ids(counts, trained, 2)
    assert ids == [3, 7] and coverage == pytest.approx(80 / 200)


def test_draft_to_target_follows_d2t_and_places_q_only_where_needed(trained):
    """draft_to_target() is kept between calls and built again when d2t is written; q is placed
    at the target's ids unless the draft vocabulary is the target's, in order."""
    import copy

    head = copy.deepcopy(trained).eval()
    with torch.inference_mode():
        q = torch.softmax(torch.randn(2, head.draft_vocab_size, dtype=torch.float64), dim=-1)
        placed = head.target_probs(q)
        assert placed.shape[-1] == head.vocab_size and torch.equal(placed[:, head.draft_to_target()], q)
        assert placed.sum().item() == pytest.approx(q.sum().item(), abs=1e-12)  # zero elsewhere
    first = head.draft_to_target().clone()
    with torch.no_grad():
        head.d2t[-1] += 1  # in place: the last draft id now names the next target id
    with torch.inference_mode():
        assert torch.equal(head.draft_to_target(), first + torch.nn.functional.one_hot(
            torch.tensor(head.draft_vocab_size - 1), head.draft_vocab_size))

    whole = EagleHead(dict(head.config, draft_vocab_size=head.vocab_size))  # d2t all zero: every id, in order
    with torch.inference_mode():
        q = torch.softmax(torch.randn(2, head.vocab_size), dim=-1)
        assert whole.target_probs(q) is q
        with torch.no_grad():
            whole.d2t[:] = 0
        whole.d2t.data = torch.roll(torch.arange(head.vocab_size), 1) - torch.arange(head.vocab_size)  # a permutation
        assert torch.equal(whole.target_probs(q)[:, whole.draft_to_target()], q)
