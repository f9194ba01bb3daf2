"""compile=True: compiled decoding steps give eager's tokens, compile once, and say so when they recompile.

The models are the tiny llama pair in float32 (torch.compile's CPU backend, as users run it);
each graph takes a few seconds to build, so one module-wide pair of generators serves all tests.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.caching import CacheLayer

PROMPTS = ["the cat sat on", "a b c d e f g h i j k", "once upon a time there was a"]
DRAFTERS = ["none", "model", "ngram", "auto"]


@pytest.fixture(scope="module")
def pair(llama_pair, tmp_path_factory):
    """(eager, compiled) generators over the same float32 models; the compiled one warmed up."""

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    eager = SpeculativeGenerator.from_pretrained(llama_pair.target, llama_pair.drafts["partial"], dtype="float32")
    compiled = SpeculativeGenerator(
        eager.target_model, eager.tokenizer, eager.draft_model, engine="static", compile=True,
    )
    compiled.warmup()
    return eager, compiled


def _ids(results):
    return [r.token_ids for r in results]


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": [5, 6, 7]}],
                         ids=["greedy", "seeded"])
def test_compiled_steps_give_the_eager_tokens(pair, drafter, sampling):
    eager, compiled = pair
    kwargs = dict(max_new_tokens=24, drafter=drafter, ignore_eos=True, **sampling)
    expected = _ids(eager.generate(PROMPTS, **kwargs))  # a ragged batch: rows leave at different steps
    got = compiled.generate(PROMPTS, **kwargs)
    assert _ids(got) == expected
    assert all(r.stats.target_forwards > 0 for r in got)
    alone = compiled.generate(PROMPTS[1], **{**kwargs, "seed": 6} if sampling else kwargs)[0]
    assert alone.token_ids == expected[1]


def test_compiled_cache_drafter_gives_the_eager_tokens(pair, redis_server, cache_namespace):
    """Seeded rows (verified by position, priced by a fixed proxy: whether the store's drafts
    are tried does not depend on measured timings) get seeded plain decoding's tokens."""
    eager, compiled = pair
    url = redis_server.url + f"?namespace={cache_namespace}-compiled&deadline_ms=10000"
    kwargs = dict(max_new_tokens=24, drafter="cache", ignore_eos=True, temperature=0.8, seed=[5, 6, 7])
    with CacheLayer.open(url, compiled, response_cache=False) as layer:
        first = compiled.generate(PROMPTS, cache=layer, **kwargs)
        layer.flush()
        again = compiled.generate(PROMPTS, cache=layer, **kwargs)  # drafts from the store this time
    assert sum(r.stats.accepted_tokens for r in again) > 0
    expected = _ids(eager.generate(PROMPTS, **{**kwargs, "drafter": "none"}))
    assert _ids(first) == expected and _ids(again) == expected


def test_compiled_path_really_runs_compiled_graphs(pair, monkeypatch):
    """The test above would pass on an eager fallback: count calls into the compiled forward."""
    _, compiled = pair
    forward = compiled._compiler.forward_for(compiled.target_model, "target")
    calls = []
    original = type(forward).__call__

    def counting(self, kind, buffers, **kwargs):
        calls.append(kind)
        return original(self, kind, buffers, **kwargs)

    monkeypatch.setattr(type(forward), "__call__", counting)
    result = compiled.generate(PROMPTS[0], max_new_tokens=8, drafter="none", ignore_eos=True)[0]
    assert len(calls) == result.stats.target_forwards - 1  # every step but the (eager) prefill


def test_compiled_attention_reads_the_bucket_not_the_capacity(pair, monkeypatch):
    """A compiled step attends over the first W columns (W the next multiple of BUCKET past the
    longest row, as eager), not the whole buffer: a request whose capacity is far past its
    length pays for its length. Every position a query may see is inside the view."""
    from specdec.compiled import CompiledForward
    from specdec.kv import BUCKET

    eager, compiled = pair
    seen = []
    original = CompiledForward.__call__

    def recording(self, kind, buffers, **kwargs):
        seen.append((kwargs["span"].shape[0], buffers[0].shape[2], int(kwargs["write_positions"].max())))
        return original(self, kind, buffers, **kwargs)

    monkeypatch.setattr(CompiledForward, "__call__", recording)
    kwargs = dict(max_new_tokens=150, drafter="model", num_draft_tokens=3, ignore_eos=True)
    got = compiled.generate(PROMPTS[0], **kwargs)[0]
    assert got.token_ids == eager.generate(PROMPTS[0], **kwargs)[0].token_ids
    assert seen
    for view, capacity, last in seen:
        assert last < view <= capacity and (view % BUCKET == 0 or view == capacity), (view, capacity, last)
    assert min(view for view, _, _ in seen) == BUCKET < seen[0][1]  # early steps read one bucket of a larger buffer
    assert len({view for view, _, _ in seen}) >= 3  # the view grows with the rows, in one graph


def test_one_warm_up_serves_every_length_and_draft_width(pair):
    """No recompiles after warm-up for single requests: capacity and verify width are dynamic."""
    _, compiled = pair
    before = compiled.compile_stats()
    for n, prompt in ((5, "x"), (40, " ".join(["word"] * 30)), (90, PROMPTS[2])):
        for drafter, k in (("none", 4), ("model", 2), ("model", 6), ("ngram", 3)):
            compiled.generate(prompt, max_new_tokens=n, drafter=drafter, num_draft_tokens=k, ignore_eos=True)
    after = compiled.compile_stats()
    assert after["recompiles"] == 0, after["reasons"]
    assert after["graphs"] == before["graphs"]


def test_a_recompile_is_logged_with_its_reason(pair, caplog):
    _, compiled = pair
    forward = compiled._compiler.forward_for(compiled.target_model, "target")
    from specdec.kv import make_kv, prefill_logits

    kv = make_kv(compiled.target_model, "static", 1, 128, compiled.device, compiled.vocab_size, compiled=forward)
    prefill_logits(kv, [[1, 2, 3, 4]])
    kv.forward(torch.tensor([[5, 6]]), torch.tensor([2]))  # the warmed-up graph
    before = compiled.compile_stats()["recompiles"]
    with caplog.at_level(logging.WARNING, logger="specdec.compiled"):
        kv.forward(torch.tensor([[5, 6]], dtype=torch.int32), torch.tensor([2]))  # another dtype: a guard fails
    stats = compiled.compile_stats()
    assert stats["recompiles"] > before
    assert any("recompiled the target step forward" in r.getMessage() for r in caplog.records)
    assert any("dtype" in reason or "mismatch" in reason for reason in stats["reasons"])


def test_a_short_request_does_not_pay_a_compile(llama_pair):
    gen = SpeculativeGenerator.from_pretrained(llama_pair.target, dtype="float32", compile=True, compile_min_tokens=64)
    gen.generate(PROMPTS, max_new_tokens=8, drafter="none")  # 3 x 8 = 24 tokens < 64: eager
    stats = gen.compile_stats()
    assert stats["graphs"] == 0 and stats["loaded"] == 0
    gen.generate(PROMPTS[0], max_new_tokens=64, drafter="none")  # earns it back: warms up (builds or loads graphs)
    stats = gen.compile_stats()
    assert stats["graphs"] + stats["loaded"] > 0
    assert stats["warmup_s"] is not None  # the request ran the warm-up ...
    assert gen._graphs_kept()  # ... which noted the kept graphs for later processes


def test_the_compile_budget_follows_what_the_compile_costs(llama_pair, monkeypatch, tmp_path):
    """Before warm-up a request compiles only where its budget (rows x max_new_tokens) earns
    the compile back. By default that is 131072 tokens where the graphs would be built and 4096
    where a finished warm-up of the same models kept them in this cache (the marker warmup()
    leaves, which a later process finds); an explicit compile_min_tokens wins either way."""
    from specdec.compiled import COLD_COMPILE_MIN_TOKENS, KEPT_COMPILE_MIN_TOKENS, mark_warm

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing kept
    cold = SpeculativeGenerator.from_pretrained(llama_pair.target, dtype="float32", compile=True)
    assert cold._compiler.threshold() == COLD_COMPILE_MIN_TOKENS
    cold.generate(PROMPTS, max_new_tokens=8, drafter="none")
    assert (cold.compile_stats()["graphs"], cold.compile_stats()["loaded"]) == (0, 0)  # eager
    assert not cold._compiler.ready_for(4, COLD_COMPILE_MIN_TOKENS // 4 - 1)
    assert cold._compiler.ready_for(4, COLD_COMPILE_MIN_TOKENS // 4)
    assert cold._compiler.ready_for(1, 1)  # warm from then on

    mark_warm(cold._warm_spec(False))  # as a finished warm-up of these models does
    kept = SpeculativeGenerator.from_pretrained(llama_pair.target, dtype="float32", compile=True)
    assert kept._compiler.threshold() == KEPT_COMPILE_MIN_TOKENS
    assert not kept._compiler.ready_for(3, KEPT_COMPILE_MIN_TOKENS // 3)
    assert kept._compiler.ready_for(2, KEPT_COMPILE_MIN_TOKENS // 2)
    other = SpeculativeGenerator.from_pretrained(llama_pair.target, llama_pair.drafts["partial"], dtype="float32",
                                                 compile=True)
    assert other._compiler.threshold() == COLD_COMPILE_MIN_TOKENS  # other models: nothing kept for them

    explicit = SpeculativeGenerator.from_pretrained(llama_pair.target, dtype="float32", compile=True,
                                                    compile_min_tokens=100)
    assert explicit._compiler.threshold() == 100
    unknown = SpeculativeGenerator(kept.target_model, kept.tokenizer, engine="static", compile=True)
    assert unknown._compiler.threshold() == COLD_COMPILE_MIN_TOKENS  # not from from_pretrained: no marker to find


@pytest.mark.parametrize("kwargs, message", [
    ({"compile": "yes"}, "compile must be True or False"),
    ({"compile": True, "compile_min_tokens": -1}, "compile_min_tokens"),
    ({"compile": True, "compile_min_tokens": 1.5}, "compile_min_tokens"),
    ({"compile": True, "numerics": "stable"}, "numerics"),
])
def test_bad_compile_options_fail_before_any_compute(llama_pair, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeGenerator.from_pretrained(llama_pair.target, **kwargs)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the helper runs only with a second core")
def test_a_first_warm_up_builds_graphs_in_a_helper_process(llama_pair, caplog, monkeypatch, tmp_path):
    """from_pretrained(compile=True).warmup() on two or more cores: a helper process builds the
    draft model's and the sampled step's graphs and keeps them (specdec.graph_store) while this
    one builds the target's; this one then loads the helper's graphs with no trace at all
    (dynamo builds only the target's two). The next warm-up of the same models starts no
    helper and loads every graph, the target's too. The tokens are those of a warm-up without
    one."""
    from specdec.compiled import COLD_COMPILE_MIN_TOKENS, KEPT_COMPILE_MIN_TOKENS, _graph_count

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cold cache, no warm-up noted in it
    gen = SpeculativeGenerator.from_pretrained(llama_pair.target, llama_pair.drafts["partial"], dtype="float32",
                                               compile=True)
    assert gen._warm_spec(False)["draft"] == str(llama_pair.drafts["partial"])
    assert gen._helper_parts() == ("draft", "sampling")  # no head: the draft model's graphs go to the helper
    assert gen._compiler.threshold() == COLD_COMPILE_MIN_TOKENS  # nothing kept here: a request would build them
    traced = _graph_count()
    with caplog.at_level(logging.INFO, logger="specdec.compiled"):
        gen.warmup()
    messages = [r.getMessage() for r in caplog.records]
    assert any("warm-up helper started" in m for m in messages)
    assert not any("warm-up helper ended with" in m for m in messages), messages
    assert any(m.startswith("warm-up helper: built draft in") for m in messages), messages
    stats = gen.compile_stats()
    assert (stats["graphs"], stats["loaded"]) == (2, 2)  # the target's built here, the draft model's loaded
    assert _graph_count() - traced == 2  # dynamo traced the target's graphs and nothing else
    caplog.clear()
    again = SpeculativeGenerator.from_pretrained(llama_pair.target, llama_pair.drafts["partial"], dtype="float32",
                                                 compile=True)
    assert again._compiler.threshold() == KEPT_COMPILE_MIN_TOKENS  # kept by that warm-up: a request loads them
    traced = _graph_count()
    with caplog.at_level(logging.INFO, logger="specdec.compiled"):
        again.warmup()
    assert not any("warm-up helper" in r.getMessage() for r in caplog.records)
    assert (again.compile_stats()["graphs"], again.compile_stats()["loaded"]) == (0, 4)
    assert _graph_count() == traced
    kwargs = dict(max_new_tokens=16, drafter="model", ignore_eos=True, temperature=0.8, seed=[1, 2, 3])
    assert _ids(gen.generate(PROMPTS, **kwargs)) == _ids(again.generate(PROMPTS, **kwargs))


def test_a_failing_helper_only_costs_the_overlap(llama_pair, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    gen = SpeculativeGenerator.from_pretrained(llama_pair.target, dtype="float32", compile=True)
    monkeypatch.setattr(type(gen), "_warm_spec", lambda self, batches: {"target": "/nonexistent/model", "draft": None,
                                                                         "head": None, "dtype": None, "batches": batches})
    with caplog.at_level(logging.INFO, logger="specdec.compiled"):
        gen.warmup()
    assert any("warm-up helper ended with 1" in r.getMessage() for r in caplog.records)
    assert gen.compile_stats()["graphs"] > 0
    result = gen.generate(PROMPTS[0], max_new_tokens=8, drafter="none", ignore_eos=True)[0]
    assert len(result.token_ids) == 8


def test_warmup_needs_compile(pair):
    eager, _ = pair
    with pytest.raises(ValueError, match="compile=True"):
        eager.warmup()
    assert eager.compile_stats() == {"compile": False}


def test_a_servers_batch_runs_compiled_and_gives_the_eager_tokens(pair):
    """A server warms up with batches=True: requests that join a running batch (rows merged,
    KV buffers concatenated) run through the compiled graphs with no further compile, and give
    eager's tokens, greedy and seeded, with their own sampling settings."""
    from specdec.serving import Scheduler

    eager, compiled = pair
    compiled.warmup(batches=True)
    before = compiled.compile_stats()
    requests = [
        (PROMPTS[0], dict(max_new_tokens=40, drafter="model")),
        (PROMPTS[1], dict(max_new_tokens=24, drafter="model")),
        (PROMPTS[2], dict(max_new_tokens=16, drafter="auto")),
        (PROMPTS[1], dict(max_new_tokens=20, drafter="model", temperature=0.8, seed=5)),
        (PROMPTS[2], dict(max_new_tokens=28, drafter="model", temperature=1.1, top_k=20, seed=6)),
    ]
    scheduler = Scheduler(compiled)
    tickets = []

    def join_the_first(event) -> None:  # on the first request's first text: the others queue now
        if len(tickets) == 1:
            tickets.extend(scheduler.submit(p, ignore_eos=True, **kw) for p, kw in requests[1:])

    tickets.append(scheduler.submit(requests[0][0], on_event=join_the_first, ignore_eos=True, **requests[0][1]))
    scheduler.start()
    got = [tickets[0].wait(300).token_ids] + [t.wait(300).token_ids for t in tickets[1:]]
    assert scheduler.counts["rows_joined"] >= 1  # the greedy model-drafted row joined the first's batch
    assert scheduler.shutdown(timeout=60)
    for (prompt, kw), tokens in zip(requests, got):
        assert tokens == eager.generate(prompt, ignore_eos=True, **kw)[0].token_ids, kw
    after = compiled.compile_stats()
    assert (after["graphs"], after["recompiles"]) == (before["graphs"], before["recompiles"])


def test_a_compiled_kv_write_stays_in_place():
    """A compiled step writes its keys and values into the cache buffers in place. Inductor
    turned the former scatter_ into a copy of each whole buffer, the write and a copy back,
    every layer and step (a third of a one-token step on the bundled target). The generated
    code must allocate nothing of a buffer's size, and the buffers must hold eager's values."""
    from torch._inductor.utils import run_and_get_code

    from specdec.kv import write_rows

    batch, heads, capacity, dim = 2, 3, 96, 8

    def step(keys, values, positions, k, v, q):
        write_rows(keys, values, positions, k, v)
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values)

    positions = torch.tensor([[4, 5, 6], [10, 11, 12]])
    k, v, q = (torch.randn(batch, heads, 3, dim) for _ in range(3))
    expected_k, expected_v = torch.zeros(batch, heads, capacity, dim), torch.zeros(batch, heads, capacity, dim)
    expected = step(expected_k, expected_v, positions, k, v, q)  # eager: scatter_
    keys, values = torch.zeros(batch, heads, capacity, dim), torch.zeros(batch, heads, capacity, dim)
    torch._dynamo.reset()
    out, codes = run_and_get_code(torch.compile(step, dynamic=False), keys, values, positions, k, v, q)
    assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
    torch.testing.assert_close(out, expected)
    code = "\n".join(codes)
    assert f"({batch}, {heads}, {capacity}, {dim})" in code  # the buffers are graph inputs of this shape
    assert f"empty_strided_cpu(({batch}, {heads}, {capacity}, {dim})" not in code, "a cache-sized copy was allocated"


def test_warm_steps_run_their_graphs_without_dynamo(pair, monkeypatch):
    """Once a kind of step has run through dynamo, its graph is called directly (no guards,
    no dynamo frame), and the tokens stay eager's: greedy and seeded, every drafter, a ragged
    batch and a row alone."""
    from specdec import compiled as compiled_module

    eager, compiled = pair
    assert compiled._compiler.forward_for(compiled.target_model, "target")._direct  # the warm-up's kinds
    through, direct = [], []
    real_dynamo, real_direct = compiled_module._Compiled._through_dynamo, compiled_module._DirectCall.__call__

    def through_dynamo(self, kind, slot, *args, **kwargs):
        assert (slot, kind) not in self._direct, f"the {self.role} step {kind} went through dynamo"
        through.append((self.role, slot, kind))
        return real_dynamo(self, kind, slot, *args, **kwargs)

    def direct_call(self, frame):
        out = real_direct(self, frame)
        direct.append(out is not None)
        return out

    monkeypatch.setattr(compiled_module._Compiled, "_through_dynamo", through_dynamo)
    monkeypatch.setattr(compiled_module._DirectCall, "__call__", direct_call)
    for drafter in DRAFTERS:
        for sampling in ({}, {"temperature": 0.8, "top_k": 20, "seed": [5, 6, 7]}):
            kwargs = dict(max_new_tokens=16, drafter=drafter, ignore_eos=True, **sampling)
            alone = {**kwargs, "seed": 6} if sampling else kwargs
            for _ in range(2):
                assert _ids(compiled.generate(PROMPTS, **kwargs)) == _ids(eager.generate(PROMPTS, **kwargs)), drafter
                assert compiled.generate(PROMPTS[1], **alone)[0].token_ids == eager.generate(PROMPTS[1], **alone)[0].token_ids
    assert all(direct) and len(direct) > 10 * len(through), (len(direct), through)


def test_a_graph_whose_trace_changed_python_state_keeps_going_through_dynamo():
    """Dynamo replays a trace's Python side effects after its graph; a direct call would skip
    them, so such a graph is never called directly (here a counter on an argument)."""
    from specdec.compiled import CompileStats, _Compiled

    class Counter:
        calls = 0

    def step(counter, x):
        counter.calls = counter.calls + 1
        return (x * 2,)

    fn = _Compiled(step, "test", torch.device("cpu"), CompileStats(), slots=("only",))
    counter, x = Counter(), torch.arange(4.0)
    for _ in range(3):
        assert torch.equal(fn._run(("k",), "only", counter, x)[0], x * 2)
    assert counter.calls == 3
    assert ("only", ("k",)) in fn._no_direct and not fn._direct

    def pure(counter, x):
        return (x * 3,)

    fn = _Compiled(pure, "test", torch.device("cpu"), CompileStats(), slots=("only",))
    for _ in range(2):
        assert torch.equal(fn._run(("k",), "only", counter, x)[0], x * 3)
    assert ("only", ("k",)) in fn._direct


def test_the_warm_marker_is_keyed_by_the_graph_code(monkeypatch):
    """A warm-up marker written by other step-graph code (an edited checkout, another build of
    the same version) does not make a warm-up skip its helper: its graphs are not in the cache."""
    from specdec import compiled as compiled_module

    spec = {"target": "some-model", "batches": False}
    marker = compiled_module._warm_marker(spec)
    assert marker == compiled_module._warm_marker(spec)
    monkeypatch.setattr(compiled_module, "_graph_code_hash", lambda: "other code")
    assert compiled_module._warm_marker(spec) != marker


def test_a_kept_graph_reads_the_weights_of_the_model_it_is_called_with(pair):
    """A graph kept by one generator (specdec.graph_store) serves another model of the same
    structure: the parameters are the graph's inputs, bound from the model it is called with,
    never the weights it was compiled with. Greedy and seeded tokens are that model's eager ones."""
    import copy

    from specdec.compiled import _graph_count

    eager, compiled = pair
    other = copy.deepcopy(eager.target_model)
    with torch.no_grad():
        for parameter in other.parameters():
            noise = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(parameter.numel()))
            parameter.add_(0.05 * noise)
    other_eager = SpeculativeGenerator(other, eager.tokenizer, engine="static")
    other_compiled = SpeculativeGenerator(other, eager.tokenizer, engine="static", compile=True)
    traced = _graph_count()
    other_compiled.warmup(parallel=False)
    stats = other_compiled.compile_stats()
    assert (stats["graphs"], stats["loaded"]) == (0, 2) and _graph_count() == traced  # the target's two, no trace
    for sampling in ({}, {"temperature": 0.8, "top_k": 20, "seed": [5, 6, 7]}):
        kwargs = dict(max_new_tokens=24, drafter="none", ignore_eos=True, **sampling)
        expected = _ids(other_eager.generate(PROMPTS, **kwargs))
        assert _ids(other_compiled.generate(PROMPTS, **kwargs)) == expected
        assert expected != _ids(eager.generate(PROMPTS, **kwargs))  # the other weights decode differently


def test_a_kept_graph_that_fails_is_dropped_and_compiled(pair, monkeypatch, caplog):
    """A kept graph is trusted by its key alone: should one fail when called, the step is not
    lost; that kind of call compiles as if nothing were kept, and the tokens are eager's."""
    from specdec import graph_store

    eager, _ = pair
    real_load = graph_store.load

    def failing_load(name, options=None):
        found = real_load(name, options)
        if found is None:
            return None

        def fails(*inputs):
            raise RuntimeError("a kept graph that no longer fits")

        return fails, found[1]

    monkeypatch.setattr(graph_store, "load", failing_load)
    compiled = SpeculativeGenerator(eager.target_model, eager.tokenizer, engine="static", compile=True)
    kwargs = dict(max_new_tokens=24, drafter="none", ignore_eos=True)
    with caplog.at_level(logging.WARNING, logger="specdec.compiled"):
        compiled.warmup(parallel=False)
        got = _ids(compiled.generate(PROMPTS, **kwargs))
    assert got == _ids(eager.generate(PROMPTS, **kwargs))
    assert any("the kept target graph" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)
    stats = compiled.compile_stats()
    assert stats["loaded"] == stats["graphs"] >= 2  # every kind loaded, failed, and was compiled
    assert stats["recompiles"] == 0


PROBE = r"""
import json, platform
from torch._inductor import cpu_vec_isa
from specdec.compiled import probe_vector_isa
probed = []
original = cpu_vec_isa.VecISA.check_build
def counting(self, code):
    probed.append(str(self))
    return original(self, code)
cpu_vec_isa.VecISA.check_build = counting
flags = cpu_vec_isa.x86_isa_checker()
candidates = [str(i) for i in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(i).split())]
probe_vector_isa()
assert not probed  # nothing runs before inductor asks
picked = str(cpu_vec_isa.pick_vec_isa())
print(json.dumps({"probed": probed, "picked": picked, "candidates": candidates}))
"""


@pytest.mark.skipif(not (os.uname().sysname == "Linux" and os.uname().machine in ("x86_64", "AMD64")),
                    reason="the in-order probe applies on x86 Linux")
def test_inductor_probes_vector_sets_in_order_and_stops_at_the_first_that_works(tmp_path):
    """Inductor probed every vector instruction set the CPU reports (a test build and a child
    process each) and then took the first that worked; probe_vector_isa has it probe in that
    order and stop there: the same choice, the later sets never built."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"), TMPDIR=str(tmp_path), PYTHONSAFEPATH="1")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    candidates = got["candidates"]
    probed = list(dict.fromkeys(got["probed"]))  # a set may build more than one test (avx512: bf16 too)
    if not candidates:
        pytest.skip("this CPU reports no vector set inductor uses")
    assert probed == candidates[: len(probed)]  # in inductor's order of preference
    assert got["picked"] == probed[-1]  # the first that worked, as inductor takes it
    assert len(probed) <= len(candidates)
    if probed[-1] != candidates[-1]:  # one worked before the last: the rest were never probed
        assert len(probed) < len(candidates)
