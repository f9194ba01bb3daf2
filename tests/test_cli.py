"""The `specdec` command end to end (tiny pair from fixtures_cli), the workload loader,
and the bundled default pair."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.bench import COLUMN_KEYS
from specdec.cli import main
from specdec.workload import builtin_prompts_path, cache_workload, load_builtin, load_jsonl, near_duplicate

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- bench


@pytest.fixture(scope="module")
def quick_bench(cli_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()  # --threads sets it for the whole process
    rc = main([
        "bench", "--quick", "--target", cli_pair.target, "--draft", cli_pair.draft,
        "--prompts", cli_pair.prompts, "--max-new-tokens", "8", "--num-draft-tokens", "3,2",
        "--out", str(out), "--no-progress", "--threads", "1",
    ])
    torch.set_num_threads(threads)
    return rc, out


def test_bench_quick_writes_every_file(quick_bench):
    rc, out = quick_bench
    assert rc == 0
    for name in ("results.json", "results.csv", "results.md", "speedup.png", "speedup_vs_k.png",
                 "acceptance_by_position.png"):
        assert (out / name).stat().st_size > 0, name
    with (out / "results.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMN_KEYS
        assert len(list(reader)) == len(json.loads((out / "results.json").read_text())["rows"])
    report = (out / "results.md").read_text()
    assert "greedy, draft model K=3: " in report and "x hf-assisted-k" in report


def test_bench_json_has_every_column_and_method(quick_bench):
    _, out = quick_bench
    doc = json.loads((out / "results.json").read_text())
    assert doc["command"].startswith("specdec bench --quick")
    assert doc["machine"]["device_name"]
    rows = doc["rows"]
    for row in rows:
        assert set(COLUMN_KEYS) <= set(row)
    methods = {(r["setting"], r["method"], r["k"]) for r in rows}
    for method in ("baseline", "hf", "hf-assisted"):
        assert ("greedy", method, None) in methods
    for k in (2, 3):
        for method in ("model", "ngram", "hf-assisted-k", "hf-lookup"):
            assert ("greedy", method, k) in methods
    # The sampled setting sweeps specdec's drafters; transformers' run at the main K only.
    assert ("sampled", "model", 3) in methods and ("sampled", "model", 2) in methods
    assert ("sampled", "hf-lookup", 3) in methods and ("sampled", "hf-lookup", 2) not in methods
    assert {"cache-cold", "cache-warm"} <= {r["method"] for r in rows if r["workload"] == "cache"}
    assert doc["cost"]["c"] > 0


def test_bench_numbers_are_consistent(quick_bench):
    _, out = quick_bench
    rows = json.loads((out / "results.json").read_text())["rows"]
    for row in rows:
        assert row["tokens_per_s"] > 0
        if row["method"] == "baseline":
            assert row["speedup"] == pytest.approx(1.0)
            assert row["mean_accepted_length"] == pytest.approx(1.0)
        if row["setting"] == "greedy":
            # Lossless: every greedy method (ours and transformers') reproduces baseline.
            assert row["greedy_equals_baseline"] is True, row["method"]
        else:
            assert row["greedy_equals_baseline"] is None
        if row["bound"] is not None:
            assert row["efficiency"] == pytest.approx(row["speedup"] / row["bound"])
    # The draft is the target's twin: greedy drafts are always accepted, so every
    # target forward emits K+1 tokens except where max_new_tokens cuts a step short.
    for row in rows:
        if row["setting"] == "greedy" and row["method"] == "model":
            assert row["acceptance_rate"] == pytest.approx(1.0)
            assert row["per_position_acceptance"] == [1.0] * row["k"]
            assert 1.0 < row["mean_accepted_length"] <= row["k"] + 1
            assert row["target_forwards_per_token"] == pytest.approx(1 / row["mean_accepted_length"])


def test_bench_prints_the_table(cli_pair, tmp_path, capsys):
    rc = main([
        "bench", "--quick", "--target", cli_pair.target, "--draft", "none", "--prompts", cli_pair.prompts,
        "--max-new-tokens", "4", "--methods", "baseline,ngram", "--settings", "greedy", "--no-warmup",
        "--out", str(tmp_path), "--no-progress",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| setting | workload | method |" in printed
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"baseline", "ngram"}


# --------------------------------------------------------------------------- generate


def test_generate_prints_text_then_stats(cli_pair, capsys):
    rc = main(["generate", "def add(a, b):", "--target", cli_pair.target, "--draft", cli_pair.draft,
               "--max-new-tokens", "6", "--ignore-eos"])
    assert rc == 0
    captured = capsys.readouterr()
    gen = SpeculativeGenerator.from_pretrained(cli_pair.target, cli_pair.draft)
    expected = gen.generate("def add(a, b):", max_new_tokens=6, ignore_eos=True, drafter="none")[0].text
    assert captured.out == expected + "\n"
    assert "6 tokens in" in captured.err and "mean accepted length" in captured.err


def test_generate_with_stable_numerics(cli_pair, capsys):
    argv = ["generate", "def add(a, b):", "--target", cli_pair.target, "--draft", cli_pair.draft,
            "--max-new-tokens", "6", "--ignore-eos", "--dtype", "bfloat16", "--numerics", "stable"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    gen = SpeculativeGenerator.from_pretrained(cli_pair.target, cli_pair.draft, dtype="bfloat16", numerics="stable")
    expected = gen.generate("def add(a, b):", max_new_tokens=6, ignore_eos=True, drafter="none")[0].text
    assert out == expected + "\n"
    with pytest.raises(SystemExit):
        main(argv[:-1] + ["fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_generate_stream_prints_text_then_stats(cli_pair, capsys, monkeypatch):
    written = []
    real_write = sys.stdout.write

    def write(text):  # what reaches stdout, call by call
        written.append(text)
        return real_write(text)

    monkeypatch.setattr(sys.stdout, "write", write)
    rc = main(["generate", "for i in", "--target", cli_pair.target, "--draft", cli_pair.draft,
               "--max-new-tokens", "5", "--ignore-eos", "--stream", "--drafter", "none"])
    monkeypatch.undo()
    assert rc == 0
    captured = capsys.readouterr()
    gen = SpeculativeGenerator.from_pretrained(cli_pair.target)
    expected = gen.generate("for i in", max_new_tokens=5, ignore_eos=True, drafter="none")[0].text
    assert captured.out == expected + "\n"
    assert len(written) > 2  # one token per step: the text arrived in pieces, then the newline
    assert "5 tokens in" in captured.err and "tok/s" in captured.err and "mean accepted length" in captured.err


def test_generate_stop_string(cli_pair, capsys):
    gen = SpeculativeGenerator.from_pretrained(cli_pair.target)
    full = gen.generate("def add(a, b):", max_new_tokens=12, ignore_eos=True)[0].text
    stop = full[len(full) // 2]
    rc = main(["generate", "def add(a, b):", "--target", cli_pair.target, "--draft", "none",
               "--max-new-tokens", "12", "--ignore-eos", "--stop", stop, "--stop", "\x00unused"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out == full[: full.find(stop)] + "\n"
    assert "finish=stop" in captured.err


@pytest.mark.parametrize("stream", [False, True])
def test_cache_hit_reports_latency_not_tokens_per_second(cli_pair, capsys, stream):
    argv = ["generate", "class Point:", "--target", cli_pair.target, "--draft", "none", "--max-new-tokens", "6",
            "--ignore-eos", "--cache", f"memory://cli-hit-{stream}"] + (["--stream"] if stream else [])
    # The first call fills the in-process memory:// store, the second is answered from it.
    assert main(argv) == 0
    first = capsys.readouterr()
    assert main(argv) == 0
    second = capsys.readouterr()
    assert second.out == first.out
    assert "cache hit" not in first.err and "tok/s" in first.err
    assert "[cache hit: 6 tokens in " in second.err and " ms" in second.err
    assert "tok/s" not in second.err and "mean accepted length" not in second.err


def test_version(capsys):
    from specdec import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"specdec {__version__}"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--drafter", "medusa"], "--drafter 'medusa' is unknown; choose one of"),
        (["--cache", "http://localhost"], "unsupported cache URL 'http://localhost'"),
        (["--cache", "redis://h:1/0?bogus=1"], "unknown cache URL option 'bogus'"),
        (["--drafter", "model", "--draft", "none"], "--drafter model needs a draft model"),
        (["--drafter", "model"], "--drafter model needs a draft model; pass --draft with a draft model"),
        (["--stop", ""], "stop holds an empty string"),
    ],
)
def test_generate_checks_options_before_loading_models(tmp_path, capsys, extra, message):
    """The target does not exist: an error about the option proves it was checked before loading."""
    rc = main(["generate", "x", "--target", str(tmp_path / "never-loaded")] + extra)
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "never-loaded" not in err


def test_help_lists_the_registered_drafters_and_methods(capsys):
    """--drafter's and --methods' help come from the drafter registry, not a list of their own."""
    from specdec.bench import all_methods
    from specdec.drafters import available_drafters

    for command in ("generate", "bench"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        if command == "generate":
            entry = " ".join(text[text.rindex("--drafter DRAFTER"):].split("--num-draft-tokens")[0].split())
            for name in available_drafters():
                assert name in entry, name
        else:
            entry = "".join(text[text.rindex("--methods METHODS"):].split("--cache")[0].split())
            assert ",".join(all_methods()) in entry


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--num-draft-tokens", "0"], "--num-draft-tokens values must be in 1.."),
        (["bench", "--num-draft-tokens", "4,4"], "repeated values"),
        (["bench", "--methods", "model,turbo"], "unknown method 'turbo'"),
        (["bench", "--methods", "model"], "must include baseline"),
        (["bench", "--settings", "fast"], "unknown setting 'fast'"),
        (["bench", "--temperature", "0"], "must be > 0"),
        (["bench", "--device", "cpu", "--device-map", "auto"], "either --device or --device-map"),
        (["bench", "--device", "nonsense"], "is not a torch device"),
        (["bench", "--prompts", "no/such/file.jsonl"], "does not exist"),
        (["bench", "--cache", "ftp://x", "--full"], "unsupported cache URL 'ftp://x'"),
        (["generate", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "x", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, cli_pair, capsys):
    rc = main(argv + ["--target", cli_pair.target])
    assert rc == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--num-draft-tokens", "a,b"], "expected one integer or a comma-separated list"),
        (["bench", "--repeats", "0"], "must be >= 1"),
        (["bench", "--dtype", "int8"], "invalid choice: 'int8'"),
        (["generate"], "the following arguments are required: prompt"),
        (["bench", "--full", "--quick"], "argument --quick: not allowed with argument --full"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_argparse_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_device_without_cuda_is_an_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_draft_without_target_is_an_error(cli_pair, capsys):
    assert main(["bench", "--draft", cli_pair.draft]) == 2
    assert "--draft needs --target" in capsys.readouterr().err


def test_bad_prompt_file_names_the_line(tmp_path, cli_pair, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"question": "no prompt key"}\n')
    assert main(["bench", "--prompts", str(bad), "--target", cli_pair.target]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl line 3" in err and "neither \"prompt\" nor \"turns\"" in err


def test_missing_model_path_is_an_error(tmp_path, capsys):
    rc = main(["generate", "x", "--target", str(tmp_path / "missing-model")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing-model" in err and "no such local folder" in err


def test_cache_subcommand_is_wired(capsys):
    if importlib.util.find_spec("specdec.cache.cli") is None:
        assert main(["cache"]) == 2
        assert "cache command line is not available" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as exc:
            main(["cache", "--help"])
        assert exc.value.code == 0
        assert "specdec cache" in capsys.readouterr().out


# --------------------------------------------------------------------------- workload


def test_jsonl_prompt_and_turns(cli_pair):
    prompts = load_jsonl(cli_pair.prompts)
    assert [p.text for p in prompts] == [
        "def add(a, b):\n    return", "for i in range(10):", "class Point:\n    def __init__(self, x, y):\n"
    ]
    assert [p.chat for p in prompts] == [False, True, False]
    assert prompts[1].id == "q2"


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json\n", "line 1 is not valid JSON"),
        ('["a list"]\n', "must be a JSON object"),
        ('{"prompt": ""}\n', "\"prompt\" must be a non-empty string"),
        ('{"turns": []}\n', "\"turns\" must be a non-empty list"),
        ("\n\n", "holds no prompts"),
    ],
)
def test_bad_jsonl(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_jsonl(path)


def test_cache_workload_has_repeats_and_near_duplicates():
    prompts = load_builtin(4)
    work = cache_workload(prompts, 2)
    assert [p.kind for p in work] == ["heldout"] * 2 + ["repeat"] * 2 + ["near-duplicate"] * 2
    assert work[2].text == work[0].text
    near = work[4].text
    assert near != work[0].text and work[0].text.endswith(near)
    assert near_duplicate("one line only") == "line only"


def _train_pair_module():
    spec = importlib.util.spec_from_file_location("train_pair", REPO / "benchmarks" / "train_pair.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_builtin_prompts_are_held_out_and_deterministic():
    train_pair = _train_pair_module()
    lines = [json.loads(line) for line in builtin_prompts_path().read_text().splitlines()]
    assert len(lines) >= 16
    for record in lines:
        # Every prompt comes from a file the pair was not trained on.
        assert train_pair.is_heldout(record["source"]), record["source"]
        assert record["prompt"].endswith("\n")  # cut at a line boundary
    assert [p.text for p in load_builtin()] == [r["prompt"] for r in lines]


# --------------------------------------------------------------------------- bundled pair


def test_bundled_pair_loads_and_generates():
    gen = SpeculativeGenerator.from_pretrained("bundled")  # the documented one-call load
    assert gen.draft_model is not None
    assert gen.target_dtype == torch.float32  # stored float16, declared float32
    assert gen.tokenizer.bos_token_id is not None
    n_target = sum(p.numel() for p in gen.target_model.parameters())
    n_draft = sum(p.numel() for p in gen.draft_model.parameters())
    assert n_target > 3 * n_draft
    prompt = load_builtin(1)[0].text
    spec = gen.generate(prompt, max_new_tokens=24, drafter="model", num_draft_tokens=4)[0]
    plain = gen.generate(prompt, max_new_tokens=24, drafter="none")[0]
    assert spec.token_ids == plain.token_ids
    assert spec.text and spec.stats.accepted_tokens > 0


def test_bench_command_for_acceptance_numbers(cli_pair, tmp_path):
    """The shape of run used to compare engines: two methods, one K, both settings, one thread."""
    threads = torch.get_num_threads()
    try:
        rc = main(["bench", "--methods", "baseline,model", "--k", "4", "--settings", "greedy,sampled",
                   "--threads", "1", "--out", str(tmp_path), "--target", cli_pair.target, "--draft", cli_pair.draft,
                   "--prompts", cli_pair.prompts, "--max-new-tokens", "6", "--repeats", "1", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["setting"], r["method"], r["k"]) for r in rows] == [
        ("greedy", "baseline", None), ("greedy", "model", 4), ("sampled", "baseline", None), ("sampled", "model", 4)
    ]
    for r in rows:
        if r["method"] == "model":
            assert r["acceptance_rate"] is not None and len(r["per_position_acceptance"]) == 4
