"""The benchmark's own numbers, against hand computation, and how a run behaves.

Rows are built by the bench's real code (specdec.bench.metrics) from samples whose
counts are written down here, so every expected value below is worked out by hand,
not read back from the bench.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from specdec.bench import COLUMNS, PRESETS, BenchConfig, apply_threads, format_duration
from specdec.bench import metrics
from specdec.bench.methods import Run, Sample
from specdec.bench.report import auto_lines, column_prose, markdown_table, warmup_lines
from specdec.bench.runner import Bench
from specdec.cli import main


def _run(method, samples_per_repeat, *, k=None, uses_draft_model=False, setting="greedy"):
    run = Run(setting, "main", method, k, execute=None, uses_draft_model=uses_draft_model)
    run.samples = samples_per_repeat
    return run


def _baseline():
    # 2 prompts, 16 tokens per repeat in 2.0 s (8 tokens/s) and in 2.5 s (6.4 tokens/s):
    # median over the two repeats = (8 + 6.4) / 2 = 7.2 tokens/s. One target forward per token.
    rep = lambda seconds: [Sample(list(range(10)), seconds / 2, target_forwards=10),  # noqa: E731
                           Sample(list(range(6)), seconds / 2, target_forwards=6)]
    return _run("baseline", [rep(2.0), rep(2.5)])


def _model(tokens_b=None):
    # Same tokens; 1.0 s and 1.25 s per repeat: 16 and 12.8 tokens/s, median 14.4 -> speedup 2.0.
    # Target forwards 4 + 4 = 8 for 16 tokens -> tau = 2. Draft forwards 12 + 12 = 24 -> k = 3 per step.
    def rep(seconds):
        return [
            Sample(list(range(10)), seconds / 2, target_forwards=4, draft_forwards=12, drafted=12, accepted=6,
                   drafted_per_position=[4, 4, 4], accepted_per_position=[3, 2, 1]),
            Sample(list(tokens_b or range(6)), seconds / 2, target_forwards=4, draft_forwards=12, drafted=12,
                   accepted=2, drafted_per_position=[4, 4, 4], accepted_per_position=[2, 0, 0]),
        ]

    return _run("model", [rep(1.0), rep(1.25)], k=3, uses_draft_model=True)


def test_bound_and_efficiency_by_hand():
    c = 0.1
    row = metrics.rows([_baseline(), _model()], c)[1]
    assert row["tokens_per_s"] == pytest.approx(14.4)
    assert row["speedup"] == pytest.approx(14.4 / 7.2)  # 2.0
    assert row["mean_accepted_length"] == pytest.approx(2.0)
    assert row["target_forwards_per_token"] == pytest.approx(0.5)
    # Leviathan et al.: tau / (k c + 1) = 2 / (3 * 0.1 + 1) = 2 / 1.3
    assert row["bound"] == pytest.approx(2 / 1.3)
    assert row["efficiency"] == pytest.approx(2.0 * 1.3 / 2)  # 1.3
    assert row["acceptance_rate"] == pytest.approx(8 / 24)
    # Per position over both prompts and both repeats: accepted (3+2)*2 / drafted (4+4)*2, ...
    assert row["per_position_acceptance"] == pytest.approx([5 / 8, 2 / 8, 1 / 8])
    assert row["spread"] == pytest.approx((16 - 12.8) / 14.4)


def test_bound_without_a_draft_model_is_tau():
    ngram = _model()
    ngram.method, ngram.uses_draft_model = "ngram", False
    row = metrics.rows([_baseline(), ngram], c=0.1)[1]
    assert row["c"] == 0.0 and row["bound"] == pytest.approx(2.0) and row["efficiency"] == pytest.approx(1.0)


def test_a_method_whose_output_differs_is_reported_as_differing():
    same, differs = _model(), _model(tokens_b=[0, 1, 2, 3, 4, 99])  # prompt 1's last token differs
    differs.method = "ngram"
    rows = metrics.rows([_baseline(), same, differs], c=0.1)
    assert rows[1]["greedy_equals_baseline"] is True and rows[1]["greedy_mismatches"] == []
    assert rows[2]["greedy_equals_baseline"] is False and rows[2]["greedy_mismatches"] == [1]
    assert "| NO |" in markdown_table(rows)
    # A difference in a later repeat counts too.
    late = _model()
    late.samples[1][0] = Sample([7] * 10, 0.5, target_forwards=4, draft_forwards=12, drafted=12, accepted=6)
    assert metrics.rows([_baseline(), late], c=0.1)[1]["greedy_mismatches"] == [0]


def test_sampled_rows_have_no_equality_flag():
    base, model = _baseline(), _model()
    base.setting = model.setting = "sampled"
    assert metrics.rows([base, model], 0.1)[1]["greedy_equals_baseline"] is None


def test_suspect_measurements_are_flagged():
    rows = metrics.rows([_baseline(), _model()], c=0.1)
    cheap_verify = {"target_forward_ms": 6.0, "target_verify_ms_k4": 5.0}
    flags = metrics.suspect(rows, cheap_verify, repeats=2)
    assert any("measured cheaper than a one-token forward" in f for f in flags)
    # Both rows' repeats differ by 22% (16 vs 12.8 and 8 vs 6.4 tokens/s): over the 10% limit.
    assert any("2 row(s) vary more than 10% between repeats" in f for f in flags)
    assert any("a single repeat" in f for f in metrics.suspect(rows, {}, repeats=1))
    steady = _model()
    steady.samples[1] = steady.samples[0]
    base = _baseline()
    base.samples[1] = base.samples[0]
    assert metrics.suspect(metrics.rows([base, steady], 0.1), {"target_forward_ms": 6.0,
                                                               "target_verify_ms_k4": 7.0}, repeats=2) == []


def test_one_column_definition_drives_csv_table_and_prose(tmp_path):
    from specdec.bench.report import TABLE_KEYS, write_csv

    rows = metrics.rows([_baseline(), _model()], c=0.1)
    write_csv(tmp_path / "r.csv", rows)
    with (tmp_path / "r.csv").open() as fh:
        assert csv.DictReader(fh).fieldnames == [c.key for c in COLUMNS]
    header = markdown_table(rows).splitlines()[0]
    prose = column_prose()
    for c in COLUMNS:
        if c.key in TABLE_KEYS:
            assert f"| {c.header} |" in header or header.startswith(f"| {c.header} |")
            assert f"{c.header} = {c.meaning}" in prose


def test_speedup_pairs_each_repeat_with_the_baseline_of_the_same_repeat():
    # The machine slows down after the first repeat: baseline 8, 4, 4 tokens/s; the method
    # 16, 8, 12. Per repeat it is 2x, 2x and 3x: the median is 2x. The ratio of the medians
    # (12 / 4 = 3x) would credit the method with the machine's drift.
    def rep(tokens_per_s):
        return [Sample(list(range(16)), 16 / tokens_per_s, target_forwards=16)]

    base = _run("baseline", [rep(8), rep(4), rep(4)])
    fast = _run("ngram", [rep(16), rep(8), rep(12)], k=3)
    row = metrics.rows([base, fast], c=None)[1]
    assert row["tokens_per_s"] == pytest.approx(12)
    assert row["speedup"] == pytest.approx(2.0)


def test_a_stall_during_one_generation_spoils_one_pair_not_the_speedup():
    # 3 repeats x 3 prompts, the method 2x faster on every prompt, but one of its generations
    # stalled for 10x its time. Per prompt pair, 8 of 9 ratios are 2.0: the median is 2.0.
    def rep(seconds_per_prompt):
        return [Sample(list(range(16)), s, target_forwards=16) for s in seconds_per_prompt]

    base = _run("baseline", [rep([1.0, 1.0, 1.0])] * 3)
    fast = _run("ngram", [rep([0.5, 0.5, 0.5]), rep([0.5, 5.0, 0.5]), rep([0.5, 0.5, 0.5])], k=3)
    row = metrics.rows([base, fast], c=None)[1]
    assert row["speedup"] == pytest.approx(2.0)
    assert row["speedup_repeats"][1] == pytest.approx((48 / 6.0) / (48 / 3.0))  # the repeat itself: 0.5x


def _per_prompt(tokens_per_s_by_repeat, method="ngram", k=3, setting="greedy"):
    """A run whose repeat r decodes prompt i at tokens_per_s_by_repeat[r][i] (16 tokens each)."""
    return _run(method, [[Sample(list(range(16)), 16 / v, target_forwards=16) for v in rep]
                         for rep in tokens_per_s_by_repeat], k=k, setting=setting)


def test_speedup_weighs_every_prompt_alike():
    # 5 prompts, 3 repeats, baseline 10 tokens/s throughout. The method runs two prompts at 1x
    # and three at 3x (with a little noise). A median over all 15 pairs would say 3x, and
    # would fall to 1x if one 3x prompt were 1x instead: it jumps between prompts. Per prompt
    # the median over repeats (1, 1, 3, 3, 3), then the geometric mean: 3 ** (3 / 5).
    base = _per_prompt([[10] * 5] * 3, method="baseline", k=None)
    fast = _per_prompt([[10, 10.2, 30, 30.3, 29.7], [9.9, 10, 30.3, 29.7, 30], [10, 9.8, 30, 30, 30]])
    row = metrics.rows([base, fast], c=None)[1]
    assert row["speedup"] == pytest.approx(3 ** (3 / 5))


def test_auto_rows_are_held_against_the_best_fixed_k_side_by_side():
    # greedy: model K=2 at 2x, model K=4 at 2.5x, ngram K=4 at 1.5x; model-auto and auto at 2.4x,
    # ngram-auto at 1.2x. A sampled model row at 5x must not count for the greedy rows.
    # model-auto chooses among the model rows (best: K=4), auto among model and ngram (K=4 too);
    # auto's better single drafter is model-auto. Each ratio is of the two runs' own
    # generations: 2.4 / 2.5 = 0.96 and 2.4 / 2.4 = 1.
    def at(speed, method, k=None, setting="greedy"):
        return _per_prompt([[10 * speed] * 2] * 3, method=method, k=k, setting=setting)

    runs = [at(1, "baseline"), at(2.4, "auto"), at(2.4, "model-auto"), at(1.2, "ngram-auto"),
            at(2, "model", 2), at(2.5, "model", 4), at(1.5, "ngram", 4),
            at(1, "baseline", setting="sampled"), at(5, "model", 4, setting="sampled")]
    rows = metrics.rows(runs, c=None)
    auto, model_auto, ngram_auto = rows[1], rows[2], rows[3]
    assert (auto["vs_best_fixed"]["method"], auto["vs_best_fixed"]["k"]) == ("model", 4)
    assert auto["vs_best_fixed"]["ratio"] == pytest.approx(0.96)
    assert auto["vs_better_single"]["method"] == "model-auto"
    assert auto["vs_better_single"]["ratio"] == pytest.approx(1.0)
    assert model_auto["vs_best_fixed"]["ratio"] == pytest.approx(0.96) and "vs_better_single" not in model_auto
    assert (ngram_auto["vs_best_fixed"]["method"], ngram_auto["vs_best_fixed"]["ratio"]) == ("ngram", pytest.approx(0.8))
    lines = auto_lines(rows)
    assert "greedy, auto: 2.40x baseline, 0.96x the best fixed K (model K=4, 2.50x baseline; ratio of the " \
           "speedups 0.96x), 1.00x the better single drafter (model-auto; ratio of the speedups 1.00x)" in lines
    assert not any(line.startswith("sampled") for line in lines)  # no sampled auto row ran


def test_every_method_gets_the_same_seeds_and_each_repeat_new_ones(tmp_path):
    # Two methods take turns on 3 prompts for 2 repeats: for a (repeat, prompt) both decode with
    # one seed, and no seed is used in two repeats (a seed fixes a sampled run's luck).
    bench = Bench(BenchConfig(target="unused", draft=None, out=tmp_path, num_prompts=3, repeats=2, warmup=False, progress=False, seed=7))
    bench.ids = [[1, 2], [3, 4], [5, 6]]
    seen = {"a": [], "b": []}

    def method(name):
        def execute(ids, seed):
            seen[name].append((ids[0], seed))
            return Sample([1], 0.1, target_forwards=1)
        return Run("sampled", "main", name, None, execute)

    bench.execute([method("a"), method("b")])
    assert sorted(seen["a"]) == sorted(seen["b"])
    seeds = [seed for _, seed in seen["a"]]
    assert len(seeds) == 6 and len(set(seeds)) == 6 and min(seeds) == 7


def test_interrupted_run_reports_what_finished():
    base, model = _baseline(), _model()
    model.samples = model.samples[:1]  # interrupted in the second repeat
    unmeasured = _run("ngram", [], k=3)
    rows = metrics.rows([base, model, unmeasured], c=0.1)
    # The finished repeat against the baseline's repeat of the same moments: 16 / 8.
    assert rows[1]["repeats"] == 1 and rows[1]["speedup"] == pytest.approx(16 / 8)
    assert rows[2]["repeats"] == 0 and rows[2]["tokens_per_s"] is None


# --------------------------------------------------------------------------- a run, end to end


def test_durations_read_in_minutes_and_seconds():
    assert format_duration(0.4) == "0 s" and format_duration(48.2) == "48 s"
    assert format_duration(59.6) == "1 min 0 s"  # rounded before splitting: never "60 s"
    assert format_duration(229.4) == "3 min 49 s" and format_duration(3600) == "60 min 0 s"


def test_default_is_the_headline_and_full_adds_the_sweep():
    head, full = PRESETS["headline"], PRESETS["full"]
    assert head.num_draft_tokens == (4,) and "cache" not in head.methods
    assert {"baseline", "model", "ngram", "hf", "hf-assisted", "hf-lookup"} <= set(head.methods)
    assert full.num_draft_tokens == (4, 2, 6, 8) and "cache" in full.methods and full.num_prompts == 16


def _bench_argv(cli_pair, out, *extra):
    return ["bench", "--target", cli_pair.target, "--draft", cli_pair.draft, "--prompts", cli_pair.prompts,
            "--max-new-tokens", "4", "--num-prompts", "2", "--no-warmup", "--no-progress", "--out", str(out), *extra]


def test_ctrl_c_writes_partial_results(cli_pair, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of the timed runs: exit 130, no traceback, the finished rows written."""
    from specdec.bench import runner

    real = runner.specdec_method
    calls = {"n": 0}

    def interrupted_after_a_while(*args, **kwargs):
        execute = real(*args, **kwargs)

        def wrapped(ids, seed):
            calls["n"] += 1
            if calls["n"] == 7:  # repeat 1 done (3 runs x 2 prompts), first call of repeat 2
                raise KeyboardInterrupt
            return execute(ids, seed)

        return wrapped

    monkeypatch.setattr(runner, "specdec_method", interrupted_after_a_while)
    threads = torch.get_num_threads()
    rc = main(_bench_argv(cli_pair, tmp_path, "--methods", "baseline,model,ngram", "--settings", "greedy",
                          "--repeats", "2", "--threads", str(threads)))
    captured = capsys.readouterr()
    assert rc == 130
    assert "Traceback" not in captured.err and "interrupted: wrote the partial results" in captured.err
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["partial"] is True
    assert [r["repeats"] for r in doc["rows"]] == [1, 1, 1]
    assert "PARTIAL" in (tmp_path / "results.md").read_text()
    assert any("interrupted (Ctrl-C) during repeat 2 of 2" in n for n in doc["notes"])


def test_one_thread_per_cpu_process_by_default(cli_pair, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert apply_threads(None, "cpu", None) == 1
        torch.set_num_threads(2)
        assert apply_threads(3, "cpu", None) == 3
        torch.set_num_threads(2)
        rc = main(_bench_argv(cli_pair, tmp_path, "--methods", "baseline", "--settings", "greedy",
                              "--repeats", "1", "--device", "cpu"))
        assert rc == 0
        doc = json.loads((tmp_path / "results.json").read_text())
        assert doc["settings"]["threads"] == 1 and doc["machine"]["torch_threads"] == 1
        assert any("a single repeat" in w for w in doc["suspect"])  # flagged in the files ...
        out = capsys.readouterr().out
        assert "WARNING: a single repeat" in out  # ... and on screen
        # The run's own duration, model loading included, in the files and on screen.
        assert doc["elapsed_seconds"] >= doc["models"]["load_seconds"] > 0
        duration = format_duration(doc["elapsed_seconds"])
        assert f"Ran {duration}, model loading included." in (tmp_path / "results.md").read_text()
        assert f"the run took {duration}" in out
    finally:
        torch.set_num_threads(threads)


def test_urls_are_redacted_in_the_results(cli_pair, tmp_path):
    threads = torch.get_num_threads()
    rc = main(_bench_argv(cli_pair, tmp_path, "--methods", "baseline", "--settings", "greedy", "--repeats", "1",
                          "--cache", "memory://user:hunter2@bench", "--threads", str(threads)))
    assert rc == 0
    for name in ("results.json", "results.md"):
        text = (tmp_path / name).read_text()
        assert "hunter2" not in text, name
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["settings"]["cache_url"] == "memory://***@bench"
    assert "memory://***@bench" in doc["command"]


def test_the_cache_benchmark_script_describes_its_machine():
    """benchmarks/bench_cache.py runs for minutes before it writes anything: its report
    helpers must at least import and run (a broken import once lost a whole run)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cache.py"
    spec = importlib.util.spec_from_file_location("bench_cache_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    info = module.machine()
    assert info["torch"] and info["redis_py"] and "redis_server" in info


def test_rows_report_which_k_and_which_drafter_each_step_used():
    """Steps per draft length and per drafter, summed over every generation of the row, worked
    out by hand: 20 steps, 2 of them without drafts (drafter none)."""
    def rep():
        return [
            Sample(list(range(10)), 0.5, target_forwards=8, draft_lengths={0: 2, 3: 2, 8: 4},
                   drafter_steps={"model": 4, "ngram": 2}),
            Sample(list(range(6)), 0.5, target_forwards=2, draft_lengths={8: 2}, drafter_steps={"ngram": 2}),
        ]

    auto = _run("auto", [rep()])
    row = metrics.rows([_baseline(), auto], c=0.1)[1]
    assert row["draft_length_steps"] == {0: 2, 3: 2, 8: 6}
    assert row["drafter_steps"] == {"model": 4, "ngram": 4, "none": 2}
    assert row["k_used"] == "0:20% 3:20% 8:60%"
    assert row["drafters_used"] == "model:40% ngram:40% none:20%"
    assert metrics.rows([_baseline()], c=0.1)[0]["k_used"] is None  # nothing drafted: no histogram
    from specdec.bench.report import step_table

    lines = step_table([row])
    assert "| greedy | main | auto | 0:20% 3:20% 8:60% | model:40% ngram:40% none:20% |" in lines


def test_the_bench_reports_the_step_histograms_of_auto_rows(cli_pair, tmp_path, capsys):
    """A real run: the auto row's histogram counts every verification step of its generations,
    and the report (file and screen) shows it."""
    rc = main(_bench_argv(cli_pair, tmp_path, "--methods", "baseline,auto", "--settings", "greedy",
                          "--repeats", "1", "--max-new-tokens", "12", "--threads", "1"))
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    auto = next(r for r in doc["rows"] if r["method"] == "auto")
    steps = sum(auto["draft_length_steps"].values())
    assert steps == round(auto["new_tokens"] / auto["mean_accepted_length"])  # one per target forward
    assert sum(auto["drafter_steps"].values()) == steps
    assert auto["k_used"] and auto["drafters_used"]
    for text in ((tmp_path / "results.md").read_text(), capsys.readouterr().out):
        assert "Draft length and drafter per step" in text and auto["k_used"] in text


def test_methods_come_from_the_drafter_registry():
    """The built-in drafters give the method names and presets the bench always had."""
    from specdec.bench import ALL_METHODS, specdec_methods

    assert ALL_METHODS == ("baseline", "eagle", "model", "ngram", "auto", "auto-nohead", "eagle-auto", "model-auto",
                           "ngram-auto", "cache", "hf", "hf-compiled", "hf-assisted", "hf-lookup")
    # hf-compiled is opt-in: its compile warm-up does not fit the presets' time budgets.
    assert PRESETS["full"].methods == PRESETS["quick"].methods == tuple(m for m in ALL_METHODS if m != "hf-compiled")
    assert PRESETS["headline"].methods == ("baseline", "model", "eagle", "ngram", "auto", "hf", "hf-assisted",
                                           "hf-lookup")
    specs = specdec_methods()
    assert [(m.drafter, m.k) for m in specs.values()] == [
        ("none", "none"), ("eagle", "fixed"), ("model", "fixed"), ("ngram", "fixed"), ("auto", "auto"),
        ("auto", "auto"), ("eagle", "auto"), ("model", "auto"), ("ngram", "auto"), ("cache", "fixed"),
    ]
    assert [name for name, m in specs.items() if m.needs_model] == ["model", "model-auto"]
    assert [name for name, m in specs.items() if m.needs_head] == ["eagle", "auto-nohead", "eagle-auto"]
    assert [name for name, m in specs.items() if m.no_head] == ["auto-nohead"]
    assert [name for name, m in specs.items() if m.workload == "cache"] == ["cache"]
    assert metrics.AUTO_POOLS == {"eagle-auto": ("eagle",), "model-auto": ("model",), "ngram-auto": ("ngram",),
                                  "auto": ("model", "eagle", "ngram")}
    assert metrics.SINGLE_AUTOS == ("eagle-auto", "model-auto", "ngram-auto")


# --------------------------------------------------------------------------- compiled methods


def test_a_compile_warm_up_runs_first_with_every_prompt_and_is_reported_apart(tmp_path):
    """Run.prepare runs before any call of its run, the warm-up pass included (even with the
    pass off), with all the prompts the run decodes; its seconds go to warmup_s, and graphs
    compiled in untimed calls are counted as warm-up, never as timed."""
    bench = Bench(BenchConfig(target="unused", draft=None, out=tmp_path, num_prompts=2, repeats=2, warmup=True,
                              progress=False))
    bench.ids = [[1, 2, 3], [4, 5]]
    events = []

    def execute(ids, seed):
        if len(events) == 1:  # the warm-up pass's call compiles one more graph (counted as the real ones do)
            run.compile_graphs["timed"] += 1
        events.append(("execute", tuple(ids)))
        return Sample([1], 0.1, target_forwards=1)

    def prepare(prompts):
        events.append(("prepare", tuple(map(tuple, prompts))))
        run.compile_graphs.update(warmup=3, timed=0)
        return 12.5

    run = Run("greedy", "main", "hf-compiled", None, execute, prepare=prepare, compile_graphs={})
    plain = Run("greedy", "main", "hf", None, lambda ids, seed: Sample([1], 0.1, target_forwards=1))
    bench.execute([plain, run])
    assert events[0] == ("prepare", ((1, 2, 3), (4, 5)))
    assert events[1] == ("execute", (1, 2, 3))  # the warm-up pass, then 2 repeats x 2 prompts
    assert len(events) == 1 + 1 + 4
    assert run.warmup_s == 12.5 and plain.warmup_s is None
    assert run.compile_graphs == {"warmup": 3, "warmup_pass": 1, "timed": 0}  # no compile in the timed calls
    rows = metrics.rows([_baseline(), run], c=None)
    assert rows[1]["warmup_s"] == 12.5 and rows[1]["compile_graphs"] == run.compile_graphs
    assert rows[0]["warmup_s"] is None and "compile_graphs" not in rows[0]
    line = "Compile warm-up, excluded from the timings: greedy hf-compiled 12.5 s, 3 graph(s) (and 1 more in the " \
           "warm-up pass)."
    assert warmup_lines(rows) == ["", line]
    # A row whose timed calls compiled is flagged: its tokens/s include compile time.
    rows[1]["compile_graphs"]["timed"] = 2
    assert any("compiled graphs during their timed calls" in w and "greedy hf-compiled (2)" in w
               for w in metrics.suspect(rows, {}, repeats=3))


def test_hf_compiled_decodes_as_hf_and_gives_the_target_its_forward_back(cli_pair):
    """transformers' fast path (static cache, forward through torch.compile) on a tiny model:
    the warm-up compiles, the timed calls then compile nothing, greedy tokens and forward
    counts equal plain `generate`'s, and outside its calls the shared target model runs its
    own forward."""
    from transformers import AutoModelForCausalLM

    from specdec.bench.methods import CompiledForward, hf_compiled_prepare, hf_method

    model = AutoModelForCausalLM.from_pretrained(cli_pair.target).eval()
    own = type(model).forward
    prompts = [[1, 20, 21, 22], [1, 30, 31, 32, 33, 34, 35], [1, 40, 41]]
    common = {"eos": [], "pad": 0, "max_new_tokens": 6}
    compiled = CompiledForward(model)
    graphs: dict = {}
    fast = hf_method(model, None, temperature=None, compiled=compiled, graphs=graphs, **common)
    prepare = hf_compiled_prepare(fast, graphs, seed=0)
    assert "forward" not in vars(model)
    assert prepare(prompts + prompts[:1]) > 0  # one call per distinct length
    assert graphs["warmup"] >= 2 and graphs["timed"] == 0  # prefill and decoding step at least
    assert "forward" not in vars(model) and model.forward.__func__ is own

    plain = hf_method(model, None, temperature=None, **common)
    for ids in prompts:
        want, got = plain(ids, 0), fast(ids, 0)
        assert got.tokens == want.tokens and len(got.tokens) == 6
        assert got.target_forwards == want.target_forwards == 6
    sampled = hf_method(model, None, temperature=0.8, compiled=compiled, graphs=graphs, **common)
    assert len(sampled(prompts[0], 3).tokens) == 6
    assert graphs["timed"] == 0  # the warm-up covered every shape the calls present
    assert "forward" not in vars(model) and model.forward.__func__ is own

    # An instance forward (a wrapper someone installed) comes back too, also after an error.
    def wrapper(*args, **kwargs):
        return own(model, *args, **kwargs)

    model.forward = wrapper
    with pytest.raises(RuntimeError), compiled.installed():
        assert model.forward is compiled.compiled
        raise RuntimeError("generate failed")
    assert model.forward is wrapper


def test_the_bench_runs_hf_compiled_beside_hf(cli_pair, tmp_path, capsys):
    """hf-compiled is a method of the bench: its compile warm-up runs before its timed calls
    (under --no-warmup too), shows in the report apart from tokens/s, and the timed calls
    compile nothing; greedy, it decodes as baseline and hf do."""
    rc = main(_bench_argv(cli_pair, tmp_path, "--methods", "baseline,hf,hf-compiled", "--settings", "greedy",
                          "--repeats", "1", "--threads", "1"))
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert list(rows) == ["baseline", "hf", "hf-compiled"]
    fast, hf = rows["hf-compiled"], rows["hf"]
    assert fast["warmup_s"] > 0 and hf["warmup_s"] is None and rows["baseline"]["warmup_s"] is None
    assert fast["compile_graphs"]["timed"] == 0  # the warm-up compiled what the timed calls run
    assert fast["greedy_equals_baseline"] is True and hf["greedy_equals_baseline"] is True
    assert fast["mean_accepted_length"] == hf["mean_accepted_length"] == 1.0  # one forward per token
    assert not any("timed calls" in w for w in doc["suspect"])
    assert doc["compile"] == {"compile": False} and doc["models"]["compile"] is False
    line = f"greedy hf-compiled {fast['warmup_s']:.1f} s, {fast['compile_graphs']['warmup']} graph(s)"
    for text in ((tmp_path / "results.md").read_text(), capsys.readouterr().out):
        assert "Compile warm-up, excluded from the timings: " + line in text
    with (tmp_path / "results.csv").open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert float(csv_rows[2]["warmup_s"]) == pytest.approx(fast["warmup_s"]) and csv_rows[1]["warmup_s"] == ""


def test_compile_option_reaches_the_config(cli_pair, tmp_path):
    from specdec.cli import bench_config, build_parser

    def config(*extra):
        return bench_config(build_parser().parse_args(_bench_argv(cli_pair, tmp_path, *extra)))

    plain = config()
    assert plain.compile is False and "hf-compiled" not in plain.methods
    compiled = config("--compile")
    # Compiled specdec is held against compiled transformers: hf-compiled joins the preset's methods.
    assert compiled.compile is True and compiled.methods == (*plain.methods, "hf-compiled")
    assert config("--compile", "--methods", "baseline,hf").methods == ("baseline", "hf")
    assert config("--quick", "--compile").methods[-1] == "hf-compiled"


def test_compile_runs_specdec_on_a_compiled_generator_warmed_before_timing(cli_pair, tmp_path, capsys):
    """--compile: the generator is built with compile=True, warmed up once before any timed
    call (its seconds on every specdec row, apart from tokens/s) and its compile stats are in
    the results."""
    argv = ["bench", "--target", cli_pair.target, "--draft", "none", "--prompts", cli_pair.prompts,
            "--max-new-tokens", "4", "--num-prompts", "2", "--no-progress", "--out", str(tmp_path),
            "--methods", "baseline,ngram", "--settings", "greedy", "--repeats", "1", "--threads", "1", "--compile"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    stats = doc["compile"]
    assert stats["compile"] is True and doc["models"]["compile"] is True
    assert stats["graphs"] + stats["loaded"] >= 1 and stats["warmup_s"] > 0  # built, or kept by an earlier test
    rows = {r["method"]: r for r in doc["rows"]}
    assert list(rows) == ["baseline", "ngram"]
    for r in rows.values():
        assert r["warmup_s"] == pytest.approx(stats["warmup_s"], abs=1e-3)  # one warm-up, shared
        assert r["compile_graphs"]["timed"] == 0
        assert r["greedy_equals_baseline"] is True
    assert "specdec's step graphs (--compile)" in (tmp_path / "results.md").read_text()
    assert "specdec's step graphs (--compile)" in capsys.readouterr().out


# --------------------------------------------------------------------------- eager twins (--compile)


def test_eager_twins_name_specdec_methods_and_need_compile(cli_pair, tmp_path, capsys):
    """"X-eager" is specdec's main-workload method X on an eager generator; without --compile it
    would be X itself, so it is refused, in one line, before any model loads."""
    from specdec.bench.config import eager_base

    assert [eager_base(m) for m in ("baseline-eager", "auto-eager", "model-auto-eager", "ngram-eager")] == \
        ["baseline", "auto", "model-auto", "ngram"]
    assert [eager_base(m) for m in ("auto", "hf-eager", "nope-eager", "eager")] == [None] * 4

    def config(*methods, compile=True):
        return BenchConfig(target="unused", draft=None, out=tmp_path, compile=compile, methods=("baseline", *methods))

    config("baseline-eager", "auto", "auto-eager", "model-eager", "ngram-eager").validate()
    with pytest.raises(ValueError, match="'auto-eager' needs --compile"):
        config("auto-eager", compile=False).validate()
    with pytest.raises(ValueError, match="cache workload, which has no eager twin"):
        config("cache-eager").validate()
    with pytest.raises(ValueError, match=r"unknown method 'hf-eager'.*X-eager"):
        config("hf-eager").validate()
    assert main(_bench_argv(cli_pair, tmp_path, "--methods", "baseline,auto,auto-eager")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: method 'auto-eager' needs --compile" in err
    assert not (tmp_path / "results.json").exists()


def test_eager_twins_are_planned_beside_their_compiled_rows(tmp_path):
    """Each twin runs right after its method, on the eager generator (no compile warm-up, no
    compile counts); a twin whose method needs a draft model is skipped with it."""
    from types import SimpleNamespace

    cfg = BenchConfig(target="unused", draft=None, out=tmp_path, compile=True, settings=("greedy",),
                      methods=("baseline", "baseline-eager", "ngram", "ngram-eager", "auto", "auto-eager",
                               "model", "model-eager"), progress=False)
    bench = Bench(cfg)
    cpu = torch.device("cpu")
    bench.gen = SimpleNamespace(compile=True, draft_model=None, draft_head=None, draft_resources=frozenset(), device=cpu)
    bench.eager_gen = SimpleNamespace(compile=False, draft_model=None, draft_head=None, draft_resources=frozenset(),
                                      device=cpu)
    runs = bench.plan()
    plan = [(r.method, r.k, r.twin_of, r.compile_graphs is not None, r.prepare is not None) for r in runs]
    assert plan == [
        ("baseline", None, None, True, True), ("baseline-eager", None, "baseline", False, False),
        ("auto", None, None, True, True), ("auto-eager", None, "auto", False, False),
        ("ngram", 4, None, True, True), ("ngram-eager", 4, "ngram", False, False),
    ]
    assert any(n.startswith("model and model-eager rows skipped: no draft model") for n in bench.notes)


def test_auto_nohead_rows_warm_up_their_own_generator(tmp_path):
    """--compile with "auto-nohead": the generator without the head compiles too, so its rows
    are warmed by its own warm-up (once, before its first timed call); warmed by the main
    generator's alone, it would run every request below its compile budget eager."""
    from types import SimpleNamespace

    cfg = BenchConfig(target="unused", draft=None, out=tmp_path, compile=True, settings=("greedy", "sampled"),
                      methods=("baseline", "auto", "auto-nohead"), progress=False)
    bench = Bench(cfg)
    cpu = torch.device("cpu")
    warmed = []

    def generator(name, seconds, head):
        def warmup():
            warmed.append(name)
            return seconds
        return SimpleNamespace(compile=True, draft_model=None, draft_head=head, draft_resources=frozenset(),
                               device=cpu, warmup=warmup)

    bench.gen, bench.headless_gen = generator("main", 7.0, head=object()), generator("headless", 3.0, head=None)
    bench.eager_gen = None
    runs = bench.plan()
    assert [r.method for r in runs] == ["baseline", "auto", "auto-nohead"] * 2
    seconds = {r.method + "/" + r.setting: r.prepare([[1, 2]]) for r in runs}
    assert warmed == ["main", "headless"]  # each generator once, the first time one of its rows needs it
    assert seconds == {"baseline/greedy": 7.0, "auto/greedy": 7.0, "auto-nohead/greedy": 3.0,
                       "baseline/sampled": 7.0, "auto/sampled": 7.0, "auto-nohead/sampled": 3.0}
    from specdec.bench.report import warmup_lines

    rows = [{"method": r.method, "setting": r.setting, "warmup_s": seconds[r.method + "/" + r.setting],
             "compile_graphs": r.compile_graphs} for r in runs]
    line = warmup_lines(rows)[1]
    assert "specdec's step graphs (--compile) 7.0 s, 0 graph(s), one warm-up for its 4 rows" in line
    assert "the generator without the head (auto-nohead) 3.0 s, 0 graph(s), one warm-up for its 2 rows" in line


def test_compiled_rows_are_held_against_their_eager_twins_side_by_side(tmp_path):
    """A twin is one more specdec row (speedup against baseline); its compiled row gains the
    paired ratio of the two, which the report prints; the plots take the twins in."""
    from specdec.bench.report import eager_lines, headline, write_plots

    def at(speed, method, k=None, twin_of=None):
        run = _per_prompt([[10 * speed] * 2] * 3, method=method, k=k)
        run.twin_of = twin_of
        return run

    runs = [at(1, "baseline"), at(0.5, "baseline-eager", twin_of="baseline"), at(3, "auto"),
            at(2, "auto-eager", twin_of="auto"), at(2.5, "ngram", 4), at(1.25, "ngram-eager", 4, twin_of="ngram")]
    rows = metrics.rows(runs, c=None)
    by = {r["method"]: r for r in rows}
    assert by["auto-eager"]["speedup"] == pytest.approx(2.0) and by["baseline-eager"]["speedup"] == pytest.approx(0.5)
    assert by["auto"]["vs_eager"] == {"method": "auto-eager", "ratio": pytest.approx(1.5)}
    assert by["ngram"]["vs_eager"]["ratio"] == pytest.approx(2.0) and by["baseline"]["vs_eager"]["ratio"] == pytest.approx(2.0)
    # The compiled auto is held against the compiled fixed K only, and a twin against nothing.
    assert by["auto"]["vs_best_fixed"]["method"] == "ngram" and "vs_best_fixed" not in by["auto-eager"]
    assert "vs_eager" not in by["auto-eager"]
    lines = eager_lines(rows)
    assert lines == ["greedy, baseline compiled: 2.00x baseline-eager (the same prompts, side by side)",
                     "greedy, auto compiled: 1.50x auto-eager (the same prompts, side by side)",
                     "greedy, ngram K=4 compiled: 2.00x ngram-eager (the same prompts, side by side)"]
    assert set(lines) <= set(headline(rows, 4))
    assert "| greedy | main | auto-eager | - |" in markdown_table(rows)
    assert write_plots(tmp_path, rows, 4)[0] == "speedup.png"


def test_bench_runs_eager_twins_on_an_eager_generator_beside_the_compiled_one(cli_pair, tmp_path, capsys,
                                                                             monkeypatch):
    """--compile --methods baseline,baseline-eager: the twin decodes on a second generator that
    shares the compiled one's models and never compiles; greedy, its tokens are baseline's."""
    from specdec.bench import runner
    from specdec.bench.methods import graphs_compiled

    real = runner.specdec_method
    made = []  # (generator, graphs compiled during each call)

    def recording(gen, *args, **kwargs):
        execute = real(gen, *args, **kwargs)
        compiled_during: list[int] = []
        made.append((gen, compiled_during))

        def wrapped(ids, seed):
            before = graphs_compiled()
            sample = execute(ids, seed)
            compiled_during.append(graphs_compiled() - before)
            return sample

        return wrapped

    monkeypatch.setattr(runner, "specdec_method", recording)
    argv = ["bench", "--target", cli_pair.target, "--draft", "none", "--prompts", cli_pair.prompts,
            "--max-new-tokens", "4", "--num-prompts", "2", "--no-progress", "--out", str(tmp_path),
            "--methods", "baseline,baseline-eager", "--settings", "greedy", "--repeats", "1", "--threads", "1",
            "--compile"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert list(rows) == ["baseline", "baseline-eager"]
    (compiled, _), (eager, eager_compiles) = made
    assert compiled.compile is True and eager.compile_stats() == {"compile": False}
    assert eager.target_model is compiled.target_model and eager.draft_model is None
    assert len(eager_compiles) == 3 and sum(eager_compiles) == 0  # warm-up pass + 2 timed prompts
    twin = rows["baseline-eager"]
    assert twin["greedy_equals_baseline"] is True and twin["speedup"] > 0
    assert twin["warmup_s"] is None and "compile_graphs" not in twin
    assert rows["baseline"]["compile_graphs"]["timed"] == 0 and rows["baseline"]["warmup_s"] > 0
    assert rows["baseline"]["vs_eager"]["method"] == "baseline-eager"
    for text in ((tmp_path / "results.md").read_text(), capsys.readouterr().out):
        assert "greedy, baseline compiled: " in text and "x baseline-eager (the same prompts, side by side)" in text
