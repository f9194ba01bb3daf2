"""A drafter from outside the package: one module with a Drafter subclass under
`@register_drafter(name)`, and nothing else changed, runs through generate(drafter=...),
`specdec generate --drafter` (and its help) and `specdec bench --methods`.

In this process the module is imported by hand, into a copy of the registry that the
test's end restores (other tests must not see it); the commands find it through
SPECDEC_DRAFTERS in subprocesses.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec import drafters as registry
from specdec.bench import BenchConfig, all_methods
from specdec.bench.runner import Bench
from specdec.drafters import Drafter, get_drafter_class, pack_proposals, register_drafter

MODULE = "toy_repeat_drafter"
NAME = "toy-repeat"
TOY_SOURCE = '''"""Drafter "toy-repeat": k copies of each row's last token (one-hot drafts, needs nothing)."""

from specdec.drafters import Drafter, pack_proposals, register_drafter


@register_drafter("toy-repeat")
class ToyRepeatDrafter(Drafter):
    def propose(self, state, k, early_stop=None):
        return pack_proposals([[seq[-1]] * k for seq in state.sequences], k, state.device)
'''
PROMPTS = ["def add(a, b):\n    return", "for i in range(10):\n"]


@pytest.fixture
def toy_dir(tmp_path) -> Path:
    """A folder holding the plug-in's one file."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(TOY_SOURCE)
    return folder


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registrations made during the test go to a copy of the registry, dropped at its end."""
    registry.available_drafters()  # the built-in drafters registered first, into the real one
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_AUTO_SOURCES", list(registry._AUTO_SOURCES))


@pytest.fixture
def toy_registered(toy_dir, isolated_registry, monkeypatch):
    """The plug-in imported in this process, as a user's code would (sys.path and importlib)."""
    monkeypatch.syspath_prepend(str(toy_dir))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    module = importlib.import_module(MODULE)
    yield module
    sys.modules.pop(MODULE, None)


# --------------------------------------------------------------------------- in process


def test_registered_by_importing_its_module(isolated_registry, toy_dir, monkeypatch):
    assert NAME not in registry.available_drafters()
    monkeypatch.syspath_prepend(str(toy_dir))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    module = importlib.import_module(MODULE)
    try:
        assert NAME in registry.available_drafters()
        cls = get_drafter_class(NAME)
        assert cls is module.ToyRepeatDrafter and cls.name == NAME
        assert cls.needs == frozenset() and not cls.gives_probs
        assert registry.source_names(NAME, has_draft_model=False) == [NAME]
        assert not registry.reads_draft_model(NAME, has_draft_model=True)
        assert NAME not in registry.source_names("auto", has_draft_model=True)  # not registered auto=True
    finally:
        sys.modules.pop(MODULE, None)


def test_generate_with_the_plug_in_equals_plain_greedy(toy_registered, cli_pair):
    gen = SpeculativeGenerator.from_pretrained(cli_pair.target)
    kwargs = {"max_new_tokens": 12, "ignore_eos": True}
    plain = gen.generate(PROMPTS, drafter="none", **kwargs)
    toy = gen.generate(PROMPTS, drafter=NAME, num_draft_tokens=2, **kwargs)
    assert [r.token_ids for r in toy] == [r.token_ids for r in plain]
    for result in toy:
        s = result.stats
        assert s.drafted_tokens > 0 and s.drafter_steps.get(NAME, 0) > 0, s
        assert s.draft_forwards == 0  # no model: drafting costs no forward
        assert set(s.drafter_steps) <= {NAME, "none"}


@pytest.mark.parametrize("name", ["auto", "none"])
def test_planner_mode_names_cannot_be_registered(isolated_registry, name):
    before = registry.available_drafters()
    with pytest.raises(ValueError, match=f"got {name!r}"):
        @register_drafter(name)
        class Impostor(Drafter):
            def propose(self, state, k, early_stop=None):
                return pack_proposals([[]] * state.batch_size, k, state.device)
    assert registry.available_drafters() == before
    with pytest.raises(ValueError):
        get_drafter_class(name)  # still a planner mode, not a class


def test_bench_methods_read_the_registry_when_checked(isolated_registry, toy_dir, monkeypatch, tmp_path):
    config = BenchConfig(target="unused", draft=None, out=tmp_path / "out", methods=("baseline", NAME))
    with pytest.raises(ValueError, match=f"unknown method '{NAME}'"):
        config.validate()
    monkeypatch.syspath_prepend(str(toy_dir))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    importlib.import_module(MODULE)
    try:
        config.validate()  # the same config: the plug-in registered since
        methods = all_methods()
        assert NAME in methods and f"{NAME}-auto" in methods
        assert methods.index("ngram") < methods.index(NAME) < methods.index("auto")
    finally:
        sys.modules.pop(MODULE, None)


def test_bench_plan_runs_the_plug_in_and_drops_model_drafters_without_a_model(toy_registered, tmp_path):
    """A drafter that needs the draft model is skipped, with a note, when none is loaded; one that
    needs nothing runs at every K, and with K chosen per step."""

    @register_drafter("toy-model")
    class NeedsModel(Drafter):
        needs = frozenset({"model"})

        def propose(self, state, k, early_stop=None):
            raise AssertionError("never planned without a draft model")

    methods = ("baseline", NAME, f"{NAME}-auto", "toy-model", "toy-model-auto", "model")
    config = BenchConfig(target="unused", draft=None, out=tmp_path / "out", num_draft_tokens=[3, 2],
                         settings=("greedy",), methods=methods)
    bench = Bench(config)
    bench.gen = SimpleNamespace(draft_model=None, draft_head=None, draft_resources=frozenset(), device=torch.device("cpu"))
    runs = bench.plan()
    assert [(r.method, r.k) for r in runs] == [
        ("baseline", None), (f"{NAME}-auto", None), (NAME, 3), (NAME, 2),
    ]
    assert not any(r.uses_draft_model for r in runs)
    assert bench.notes == ["toy-model, toy-model-auto and model rows skipped: no draft model (pass --draft)"]


# --------------------------------------------------------------------------- the commands


def _specdec(args: list[str], toy_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`specdec ARGS` in a fresh process that finds the plug-in through SPECDEC_DRAFTERS."""
    path = os.pathsep.join(p for p in (str(toy_dir), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, SPECDEC_DRAFTERS=MODULE)
    return subprocess.run([sys.executable, "-P", "-m", "specdec.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_help_lists_the_plug_in(toy_dir, tmp_path):
    gen_help = _specdec(["generate", "--help"], toy_dir, tmp_path)
    assert gen_help.returncode == 0, gen_help.stderr[-3000:]
    # The option's own entry (the last mention: the usage line names it first).
    drafter_help = gen_help.stdout[gen_help.stdout.rindex("--drafter DRAFTER"):].split("--num-draft-tokens")[0]
    assert f" {NAME}," in " ".join(drafter_help.split())
    bench_help = _specdec(["bench", "--help"], toy_dir, tmp_path)
    assert bench_help.returncode == 0, bench_help.stderr[-3000:]
    methods_help = bench_help.stdout[bench_help.stdout.rindex("--methods METHODS"):].split("--cache")[0]
    methods_help = "".join(methods_help.split())  # argparse wraps long words across lines
    assert f",{NAME}," in methods_help and f",{NAME}-auto," in methods_help


def test_cli_generate_with_the_plug_in(toy_dir, tmp_path, cli_pair):
    proc = _specdec(["generate", PROMPTS[0], "--target", cli_pair.target, "--drafter", NAME,
                     "--num-draft-tokens", "2", "--max-new-tokens", "8", "--ignore-eos", "--device", "cpu",
                     "--threads", "1"], toy_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gen = SpeculativeGenerator.from_pretrained(cli_pair.target)
    expected = gen.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True, drafter="none")[0].text
    assert proc.stdout == expected + "\n"
    assert "8 tokens in" in proc.stderr and "acceptance=" in proc.stderr  # it drafted


def test_cli_bench_with_the_plug_in(toy_dir, tmp_path, cli_pair):
    out = tmp_path / "bench"
    proc = _specdec(["bench", "--quick", "--target", cli_pair.target, "--draft", "none", "--prompts",
                     cli_pair.prompts, "--num-prompts", "1", "--max-new-tokens", "6", "--k", "2",
                     "--methods", f"baseline,{NAME},{NAME}-auto", "--settings", "greedy", "--repeats", "1",
                     "--no-warmup", "--no-progress", "--threads", "1", "--device", "cpu", "--out", str(out)],
                    toy_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"baseline", NAME, f"{NAME}-auto"}
    toy = rows[NAME]
    assert toy["k"] == 2 and toy["greedy_equals_baseline"] is True and toy["tokens_per_s"] > 0
    assert toy["acceptance_rate"] is not None and toy["drafter_steps"].get(NAME, 0) > 0
    assert toy["c"] == 0.0 and toy["bound"] == pytest.approx(toy["mean_accepted_length"])  # no model forwards
    assert rows[f"{NAME}-auto"]["greedy_equals_baseline"] is True
    assert f"| {NAME} |" in proc.stdout
