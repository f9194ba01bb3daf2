"""Model fingerprints: a hash over every weight, so any change to any weight is a new fingerprint."""

from __future__ import annotations

import copy

import pytest
import torch

from specdec.cache.fingerprint import model_fingerprint, weights_sha256


@pytest.fixture(scope="module")
def model():
    from fixtures_models import make_model

    return make_model("llama", 320, seed=0)


def test_every_single_weight_counts(model):
    base = weights_sha256(model)
    assert base == weights_sha256(copy.deepcopy(model))  # same weights, another object: same hash
    for name, param in model.named_parameters():
        changed = copy.deepcopy(model)
        with torch.no_grad():
            target = dict(changed.named_parameters())[name]
            target.view(-1)[target.numel() // 2] += 1e-9  # one element, far below any sampling
        assert weights_sha256(changed) != base, name


def test_dtype_and_buffers_count(model):
    base = weights_sha256(model)
    assert weights_sha256(copy.deepcopy(model).to(torch.float32)) != base
    assert weights_sha256(copy.deepcopy(model).to(torch.bfloat16)) not in (base, None)  # bf16 bytes hash too
    changed = copy.deepcopy(model)
    changed.register_buffer("extra", torch.zeros(3))
    assert weights_sha256(changed) != base


def test_chunks_of_a_large_tensor_all_count(monkeypatch, model):
    import specdec.cache.fingerprint as fp

    monkeypatch.setattr(fp, "_CHUNK_BYTES", 1024)  # many chunks per tensor, on worker threads
    base = weights_sha256(model)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.embed_tokens.weight.view(-1)[-1] += 1.0  # the last chunk of the largest tensor
    assert weights_sha256(changed) != base
    monkeypatch.undo()
    assert weights_sha256(model) == fp.weights_sha256(copy.deepcopy(model))


def test_fingerprint_is_memoised_per_object(model):
    a = model_fingerprint(model)
    assert model_fingerprint(model) is a and a["weights_sha256"] == weights_sha256(model)
