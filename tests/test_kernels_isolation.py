"""The interpreter switch stays out of GPU runs.

TRITON_INTERPRET=1 must be set before Triton is imported and then holds for the whole
process, so a test module that set it would make every later GPU test see interpreted
kernels (and skip). These tests collect the whole suite in a fresh process with CUDA
faked present and faked absent and check, at the end of collection, that
  * with CUDA: TRITON_INTERPRET is unset, the compiled kernels are available, and no
    GPU test carries a skip condition that holds;
  * without CUDA: every GPU test is skipped by a condition that holds;
  * the same GPU tests are collected both ways (no module skips itself on import).
With a real CUDA device, the interpreter tests of test_kernels.py run in a process of
their own with the device hidden.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

_PROBE = textwrap.dedent('''
    """pytest plugin: fake torch.cuda.is_available, report the GPU tests' skip state."""
    import json
    import os

    import torch

    _FAKE = os.environ["SPECDEC_FAKE_CUDA"] == "1"
    torch.cuda.is_available = lambda: _FAKE  # before conftest.py and any test module


    def pytest_collection_finish(session):
        import specdec.kernels as kernels

        items = []
        for item in session.items:
            if item.get_closest_marker("gpu") is None:
                continue
            conditions = []
            for mark in item.iter_markers("skipif"):
                condition = mark.args[0] if mark.args else mark.kwargs.get("condition")
                conditions.append(condition if isinstance(condition, bool) else repr(condition))
            items.append({"id": item.nodeid, "skipif": conditions,
                          "skip": sum(1 for _ in item.iter_markers("skip"))})
        report = {
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
            "triton_available": kernels.triton_available(),
            "gpu_items": items,
        }
        with open(os.environ["SPECDEC_PROBE_OUT"], "w") as f:
            json.dump(report, f)
''')


def _collect(tmp_path: Path, fake_cuda: bool) -> dict:
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir(exist_ok=True)
    (plugin_dir / "specdec_gpu_probe.py").write_text(_PROBE)
    out = tmp_path / f"probe_{int(fake_cuda)}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(SPECDEC_FAKE_CUDA="1" if fake_cuda else "0", SPECDEC_PROBE_OUT=str(out),
               PYTHONPATH=os.pathsep.join([str(plugin_dir)] + [p for p in [env.get("PYTHONPATH")] if p]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "specdec_gpu_probe",
         "--continue-on-collection-errors", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.exists(), f"collection did not finish (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_gpu_tests_skip_on_cuda_alone(tmp_path):
    with_cuda = _collect(tmp_path, fake_cuda=True)
    without = _collect(tmp_path, fake_cuda=False)

    assert with_cuda["TRITON_INTERPRET"] is None, (
        f"TRITON_INTERPRET={with_cuda['TRITON_INTERPRET']!r} after collecting the suite with CUDA present: "
        "some module sets it, so the GPU tests would run interpreted kernels or skip")
    assert with_cuda["triton_available"] is True
    ids = sorted(i["id"] for i in with_cuda["gpu_items"])
    assert len(ids) >= 10, f"too few GPU tests collected: {ids}"
    assert ids == sorted(i["id"] for i in without["gpu_items"]), "a GPU module skips itself at import"
    for item in with_cuda["gpu_items"]:
        assert all(c is False for c in item["skipif"]) and item["skip"] == 0, (
            f"{item['id']} would be skipped with CUDA present: skipif conditions {item['skipif']}")

    assert without["TRITON_INTERPRET"] == "1" and without["triton_available"] is False
    for item in without["gpu_items"]:
        assert True in item["skipif"], f"{item['id']} is not skipped without CUDA: {item['skipif']}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="without CUDA test_kernels.py runs in this process")
def test_interpreter_tests_in_their_own_process():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "tests/test_kernels.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]


def test_the_kernels_folder_is_never_imported_as_the_top_level_kernels_package():
    """Run from the repository root, python puts the root on sys.path, where kernels/ would
    shadow Hugging Face's `kernels` package (transformers >= 5.25 imports it): the folder
    refuses with what to do, and specdec, imported from there with a safe path, still works."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    shadowed = subprocess.run([sys.executable, "-c", "import kernels"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    assert shadowed.returncode != 0
    assert "top-level module `kernels`" in shadowed.stderr and "PYTHONSAFEPATH" in shadowed.stderr
    if sys.version_info < (3, 11):  # PYTHONSAFEPATH arrived in Python 3.11
        return
    safe = subprocess.run([sys.executable, "-c", "import specdec.kernels as k, transformers.activations; print(k.__name__)"],
                          cwd=ROOT, env={**env, "PYTHONSAFEPATH": "1"}, capture_output=True, text=True, timeout=300)
    assert safe.returncode == 0, safe.stderr[-2000:]
    assert safe.stdout.strip() == "specdec.kernels"
