"""benchmarks/bench_gpu.py end to end on CPU with the tiny preset (random fp32 models).

Runs in a subprocess: importing the benchmark registers drafter "oracle", which must
not leak into the registry other tests see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_tiny_preset_runs_every_method_and_reports(tmp_path):
    proc = _run("--preset", "tiny", "--out", str(tmp_path), "--threads", "1", "--rounds", "2", "--new-tokens", "24",
                "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((tmp_path / "bench_gpu_tiny_b1.json").read_text())
    assert doc["command"].startswith("python benchmarks/bench_gpu.py --preset tiny")
    assert doc["machine"]["torch"] and doc["machine"]["transformers"] and doc["machine"]["device_name"]
    res = doc["results"]
    assert res["copy_bandwidth_gbps"] > 0 and 0 < res["streamed_weight_bytes"] < res["target_weight_bytes"]
    assert res["floor_ms_per_forward"] > 0
    part = res["batches"]["1"]
    assert 0 < part["costs"]["c"] and part["costs"]["target_verify_ms"] > 0
    rows = {r["method"]: r for r in part["rows"]}
    assert sorted(rows) == sorted(["baseline", "oracle-a0.7", "oracle-a1", "model-random", "model-self", "hf",
                                   "hf-assisted-random", "hf-assisted-self"])
    for name, row in rows.items():
        assert row["ms_per_token"] > 0 and len(row["ms_per_token_rounds"]) == 2, name
        # fp32 on CPU: every greedy method reproduces the baseline.
        assert row["equal_to_baseline"] == 1.0, f"{name} differs from baseline greedy output"
    assert rows["baseline"]["speedup"] == 1.0 and rows["baseline"]["tau"] == 1.0
    assert rows["baseline"]["over_floor"] > 1.0
    # The oracle controls acceptance: every draft kept at alpha 1, a prefix law at alpha 0.7
    # (expected tau 1 + 0.7 + ... + 0.7^4 = 2.77, acceptance 1.77 / 4 = 0.44 when K=4 fits).
    a1, a07 = rows["oracle-a1"], rows["oracle-a0.7"]
    assert a1["acceptance"] == 1.0 and a1["tau"] > 4.0
    assert 1.5 < a07["tau"] < 4.0 and 0.2 < a07["acceptance"] < 0.8
    assert rows["model-random"]["acceptance"] < 0.2 and rows["model-self"]["acceptance"] == 1.0
    assert rows["hf-assisted-self"]["acceptance"] == 1.0 and rows["hf-assisted-random"]["acceptance"] < 0.2
    for row in (a1, a07, rows["model-random"]):
        assert row["bound"] == pytest.approx(row["tau"] / (4 * row["c"] + 1))
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["bound"])
    md = (tmp_path / "bench_gpu_tiny_b1.md").read_text()
    assert "| method | B | K | ms/token |" in md and "| oracle-a0.7 | 1 | 4 |" in md and doc["command"] in md


def test_graphs_and_missing_cuda_are_refused_before_any_work(tmp_path):
    proc = _run("--preset", "tiny", "--out", str(tmp_path), "--graphs", timeout=120)
    assert proc.returncode == 2 and "--graphs is not available yet" in proc.stderr
    proc = _run("--preset", "llama3-8b-1b", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_oracle_drafter_refuses_sampling():
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import torch, oracle_drafter\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from specdec import SpeculativeGenerator\n"
        "cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
        "num_attention_heads=2, num_key_value_heads=1)\n"
        "m = LlamaForCausalLM(cfg).eval()\n"
        "gen = SpeculativeGenerator(m, None, m)\n"
        "oracle_drafter.OracleDrafter.configure({(5, 6, 7): [1, 2, 3, 4]}, 1.0)\n"
        "print(gen.generate_ids([[5, 6, 7]], max_new_tokens=4, drafter='oracle', ignore_eos=True)[0].token_ids)\n"
        "try:\n"
        "    gen.generate_ids([[5, 6, 7]], max_new_tokens=4, drafter='oracle', temperature=0.8, seed=1)\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: drafter=\"oracle\" proposes greedy continuations" in proc.stdout
