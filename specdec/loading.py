"""Loading a target (and a draft) with their tokenizers: hub ids, local folders, GGUF files,
the named real models (specdec.real_models), the bundled pair, offline checks that fail fast
instead of retrying, and dtype names."""

from __future__ import annotations

import os
import re
import socket
from typing import Any

import torch

BUNDLED = "bundled"  # from_pretrained("bundled"): the pair shipped in specdec/assets/default_pair
HUB_PROBE_TIMEOUT_S = 3.0  # one connection attempt to the hub before a download is tried


def load_models(
    target: str | os.PathLike,
    draft: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any, torch.nn.Module | None, Any]:  # target, tokenizer, draft, draft tokenizer
    """Load target and draft through transformers' Auto classes (see
    SpeculativeGenerator.from_pretrained for the arguments); the draft follows the
    target's input device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if target is None:
        raise TypeError(
            "from_pretrained needs a target model: a hub id, a local path, or \"bundled\" for the bundled "
            "pair (also a .gguf file, or a named model: \"smollm2-135m\", \"gemma3-270m\"), "
            "e.g. SpeculativeGenerator.from_pretrained(\"bundled\")"
        )
    if isinstance(target, str) and target == BUNDLED:
        bundled_target, bundled_draft = bundled_pair()
        target, draft = bundled_target, (bundled_draft if draft is None else draft)
    if device is not None and device_map is not None:
        raise ValueError("pass either device= or device_map=, not both")
    torch_dtype = _resolve_dtype(dtype)
    # Every name and path is resolved, and every missing package reported, before anything loads.
    target, target_local, target_gguf = _source("target", target, revision)
    draft, draft_local, draft_gguf = _source("draft", draft, None) if draft is not None else (None, False, None)
    target_gguf, draft_gguf = _gguf_path(target_gguf), _gguf_path(draft_gguf)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    on_map = {"device_map": device_map} if device_map is not None else {}

    if target_gguf is not None:
        target_model, tokenizer = _load_gguf(target_gguf, kwargs, on_map)
    else:
        rev = {"revision": revision} if revision is not None else {}
        target_only = {"local_files_only": True} if target_local else {}
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code, **rev, **target_only)
        target_model = AutoModelForCausalLM.from_pretrained(target, **kwargs, **rev, **target_only, **on_map)
    draft_model, draft_tokenizer = None, None
    if draft_gguf is not None:
        draft_model, draft_tokenizer = _load_gguf(draft_gguf, kwargs, {})
    elif draft is not None:
        draft_only = {"local_files_only": True} if draft_local else {}
        try:
            draft_tokenizer = AutoTokenizer.from_pretrained(draft, **draft_only)
        except (OSError, ValueError):  # a draft checkpoint may ship without a tokenizer
            draft_tokenizer = None
        draft_model = AutoModelForCausalLM.from_pretrained(draft, **kwargs, **draft_only)
    if device is not None:
        target_model = target_model.to(device)
    target_device = input_device(target_model)
    if draft_model is not None:
        draft_model = draft_model.to(target_device)
    return target_model, tokenizer, draft_model, draft_tokenizer


def _source(name: str, value: Any, revision: str | None) -> tuple[Any, bool, str | None]:
    """(what to pass to transformers, local_files_only, GGUF) for a target/draft argument.
    GGUF is None, a .gguf file's path, or the name of a named real model (specdec.real_models),
    whose packages and the gguf package are checked here: MissingPackageError before anything loads."""
    from . import real_models

    if real_models.is_real_model(value):
        real_models.require(value)
        return value, True, value
    value, local = _locate(name, value, revision)
    gguf = _gguf_file(name, value)
    if gguf is not None:
        real_models.require_gguf(f"the {name} {gguf!r} (a GGUF file)")
    return value, local, gguf


def _gguf_path(gguf: str | None) -> str | None:
    """The file to load: a named model's GGUF (assembled into the cache if it ships in parts)."""
    from . import real_models

    if gguf is not None and real_models.is_real_model(gguf):
        return str(real_models.gguf_path(gguf))
    return gguf


def _gguf_file(name: str, value: str) -> str | None:
    """The GGUF file a resolved target/draft names: the .gguf file itself, or the one .gguf
    file in a folder without config.json; None for anything else (a checkpoint, a hub id)."""
    local = os.path.expanduser(value)
    if os.path.isfile(local):
        return os.path.abspath(local)  # _locate lets only .gguf files through
    if not os.path.isdir(local) or os.path.exists(os.path.join(local, "config.json")):
        return None
    found = sorted(f for f in os.listdir(local) if _is_gguf(f) and os.path.isfile(os.path.join(local, f)))
    if len(found) > 1:
        raise ValueError(
            f"{name} {value!r} holds {len(found)} GGUF files ({', '.join(found)}) and no config.json; "
            "pass the path of the one to load"
        )
    return os.path.abspath(os.path.join(local, found[0])) if found else None


def _is_gguf(filename: str) -> bool:
    return filename.lower().endswith(".gguf")


def _load_gguf(path: str, kwargs: dict, on_map: dict):
    """A model and its tokenizer from one GGUF file. transformers dequantises the weights
    (into `dtype`, by default float32); the quantisation marker it leaves is dropped so the
    model is a plain one: save_pretrained writes an ordinary checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(path)
    extra: dict[str, Any] = {"gguf_file": filename, "local_files_only": True}
    try:  # dense weights, asked for outright: no look-up of packed-GGUF kernels on the hub
        from transformers import GgufConfig

        extra["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # transformers before GgufConfig always dequantises GGUF weights
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs, **extra, **on_map)
    tokenizer = AutoTokenizer.from_pretrained(
        folder, gguf_file=filename, local_files_only=True, trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    drop_gguf_marker(model)
    # The file, not its folder, names the model (cache keys; two files may share a folder).
    model.config.name_or_path = path
    tokenizer.name_or_path = path
    return model, tokenizer


def drop_gguf_marker(model) -> bool:
    """Remove what marks `model` as GGUF-quantised once its weights are plain tensors (the
    GGUF loader dequantises them), so save_pretrained works; True if there was a marker.
    A model that still holds packed GGUF blocks (integer weights) is left as it is."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    marker = getattr(config, "quantization_config", None)
    method = quantizer.quantization_config.quant_method if quantizer is not None else (
        marker.get("quant_method") if isinstance(marker, dict) else getattr(marker, "quant_method", None))
    if str(getattr(method, "value", method)).lower() != "gguf":
        return False
    if not all(p.is_floating_point() for p in model.parameters()):
        return False
    # What transformers' own remove_quantization_config clears (GgufConfig(dequantize=True)).
    for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):  # the last: GGUF renames
        if attr in vars(model):
            delattr(model, attr)
    if config is not None and "quantization_config" in vars(config):
        del config.quantization_config
    model.is_quantized = False
    for module in model.modules():
        sub = getattr(module, "config", None)
        if sub is not None and getattr(sub, "_is_quantized", False):
            sub._is_quantized = False
    return True


def bundled_pair() -> tuple[str, str]:
    """Local paths of the bundled target and draft (`from_pretrained("bundled")` loads both)."""
    from importlib import resources

    root = resources.files("specdec.assets").joinpath("default_pair")
    return str(root.joinpath("target")), str(root.joinpath("draft"))


def _locate(name: str, value: Any, revision: str | None) -> tuple[str, bool]:
    """(what to pass to transformers, local_files_only) for a target/draft argument.

    Fails at once, with the fix, on a missing local path and on a hub id that can be
    neither found in the local cache nor downloaded, so nobody waits on retries.
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
        is_path = True
    elif isinstance(value, str):
        is_path = False
    else:
        raise TypeError(
            f"{name} must be a hub id or a local path (str or os.PathLike), got {type(value).__name__}; "
            "e.g. \"Qwen/Qwen2.5-0.5B\", \"./my-checkpoint\" or \"bundled\" for the bundled pair"
        )
    if not value:
        raise ValueError(f"{name} is an empty string; pass a hub id or a local path")
    local = os.path.expanduser(value)
    if os.path.isdir(local):
        return local, False
    if os.path.exists(local):
        if _is_gguf(local):
            return local, True
        raise ValueError(
            f"{name} {value!r} is a file; pass the folder that holds config.json and the weights, or a .gguf file"
        )
    if is_path or not _HUB_ID.fullmatch(value):
        raise FileNotFoundError(
            f"{name} {value!r}: no such local folder ({os.path.abspath(local)} does not exist); "
            "pass the folder that holds config.json and the weights, a .gguf file, or a hub id like \"org/name\""
        )
    cached = _in_hub_cache(value, revision)
    if _hub_offline():
        if cached:
            return value, True
        raise OSError(
            f"{name} {value!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it "
            f"cannot be downloaded (nor is there a local folder {os.path.abspath(local)}); download it first "
            "(unset HF_HUB_OFFLINE) or pass a local path"
        )
    unreachable = _hub_unreachable()
    if unreachable is None:
        return value, False
    if cached:
        return value, True  # offline, but a copy is cached: load it without asking the hub
    raise OSError(
        f"{name} {value!r} is not in the local Hugging Face cache and the hub cannot be reached "
        f"({unreachable}), nor is there a local folder {os.path.abspath(local)}; connect to the network, "
        "set HF_ENDPOINT to a mirror, or pass a local path"
    )


# Hub repository ids: "name" or "org/name".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:  # an unreadable cache is a cache miss
        return False


def _hub_unreachable() -> str | None:
    """None when one TCP connection to the hub (or the proxy) opens in a few seconds, else why not."""
    from urllib.parse import urlsplit

    proxy = next((os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(v)), None)
    url = urlsplit(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme in ("https", "") else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
        return None
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


def input_device(model) -> torch.device:
    """Where a model takes its input ids (its embedding's device; accelerate may spread the rest)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return None
        value = getattr(torch, dtype, None)
        if isinstance(value, torch.dtype):
            return value
    raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or a name like 'float32', 'bfloat16', 'float16'")
