"""specdec.graph_store: compiled graphs kept for later processes, keyed by what their trace
depended on, loaded only when everything in the key matches, and never trusted blindly."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile

import torch
from fixtures_models import make_model

from specdec import graph_store
from specdec.compiled import _DirectCall


def test_the_key_follows_the_structure_not_the_weights():
    a = make_model("llama", 64, seed=0)
    same_structure = make_model("llama", 64, seed=1)  # other weights
    deeper = make_model("llama", 64, seed=0, layers=3)
    wider_vocab = make_model("llama", 96, seed=0)
    frame = {"forward": a.forward, "input_ids": torch.zeros(1, 2, dtype=torch.long), "mask_value": -1.0}
    key = graph_store.key({"arguments": graph_store.structure(frame)})
    assert key == graph_store.key({"arguments": graph_store.structure({**frame, "forward": same_structure.forward})})
    for changed in ({"forward": deeper.forward}, {"forward": wider_vocab.forward},
                    {"forward": make_model("llama", 64, seed=0).to(torch.float32).forward},  # the fixtures are float64
                    {"input_ids": torch.zeros(1, 2, dtype=torch.int32)},  # another dtype
                    {"input_ids": torch.zeros(2, dtype=torch.long)},  # another rank
                    {"mask_value": -2.0}):  # a constant the trace read
        assert graph_store.key({"arguments": graph_store.structure({**frame, **changed})}) != key, changed
    assert graph_store.key({"kind": "a", "arguments": 1}) != graph_store.key({"kind": "b", "arguments": 1})


def test_a_damaged_or_foreign_file_is_not_loaded(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    name = graph_store.key({"test": "damaged"})
    folder = tmp_path / "specdec-graphs"
    folder.mkdir()
    (folder / f"{name}.json").write_text(json.dumps({"recipe": {}, "env": graph_store._environment()}))
    (folder / f"{name}.graph").write_bytes(b"not a graph")
    with caplog.at_level(logging.WARNING, logger="specdec.graph_store"):
        assert graph_store.load(name) is None
    assert any("could not load the compiled graph" in r.getMessage() for r in caplog.records)
    # written by another torch (or another version of this code): not even read
    other = {**graph_store._environment(), "torch": "0.0.0"}
    (folder / f"{name}.json").write_text(json.dumps({"recipe": {}, "env": other}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="specdec.graph_store"):
        assert graph_store.load(name) is None
    assert not caplog.records
    assert graph_store.load(graph_store.key({"test": "absent"})) is None


def test_a_recipe_names_only_plain_argument_paths():
    """A kept recipe is evaluated against a call's arguments: only subscripts, attributes (no
    dunders but a bound method's __self__) and sizes pass; anything else is refused."""
    model = torch.nn.Linear(2, 2)
    frame = {"forward": model.forward, "x": torch.zeros(3, 2)}
    recipe = {"names": ["L['forward'].__self__._parameters['weight']", "L['x'].size()[0]", "L['x']"],
              "params": [0], "dtypes": {"2": "float32"}}
    direct = _DirectCall.from_recipe(lambda *inputs: inputs, recipe, frame)
    assert direct is not None
    weight, size, x = direct({"forward": model.forward, "x": torch.ones(5, 2)})
    assert weight is model.weight and size == 5 and torch.equal(x, torch.ones(5, 2))
    assert direct({"forward": model.forward, "x": torch.ones(5, 2, dtype=torch.float64)}) is None  # dtype checked
    for name in ("L['x'].__class__", "G['torch']", "__import__('os')", "L['x'].size()[0] or 1"):
        assert _DirectCall.from_recipe(lambda *inputs: inputs, {**recipe, "names": [name]}, frame) is None, name


CHILD = """
import json, sys, torch
from torch._dynamo.utils import counters
from specdec import fused
vocab = 48
logits = torch.randn(3, 1, vocab, generator=torch.Generator().manual_seed(0))
seeds, counters_ = torch.arange(3, dtype=torch.int64), torch.full((3,), 7, dtype=torch.int64)
drafts, num_draft = torch.zeros(3, 0, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
tokens, accepted = fused.sample_step(seeds, counters_, drafts, None, logits, num_draft, temperature=0.7,
                                     noise_dtype=torch.float32)
print(json.dumps({**fused.compile_stats(), "traced": int(counters["stats"]["unique_graphs"]),
                  "tokens": tokens.tolist()}))
"""


def test_a_second_process_loads_the_sampled_steps_graph_without_a_trace(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path), PYTHONSAFEPATH="1")

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600,
                             cwd=tempfile.gettempdir())
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert (first["graphs"], first["loaded"]) == (1, 0) and first["traced"] == 1
    assert (second["graphs"], second["loaded"], second["traced"]) == (0, 1, 0)
    assert second["direct"] == 1 and second["tokens"] == first["tokens"]
    assert len(list((tmp_path / "specdec-graphs").glob("*.graph"))) == 1
