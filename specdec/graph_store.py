"""Compiled graphs kept across processes: a later process calls them without dynamo.

torch's compile caches (inductor's FX graph cache, the AOTAutograd cache) skip code
generation in a second process, but not dynamo: every graph is traced again to compute the
keys those caches look up, which for a 16-layer model's step is most of a warm process's
warm-up (transformers' forward in Python, traced op by op). specdec calls its graphs
directly anyway once it knows how (specdec.compiled._DirectCall, specdec.fused._Graph): what
the graph's inputs are, read from the call's arguments. So it keeps each such graph here with
that recipe, under a key of everything the trace depended on, and a later process with the
same key loads the graph and calls it directly, with no trace.

The key (`key`): the torch, transformers and Python versions, the CPU's model and vector
ISA, the code that shapes the graphs (specdec.compiled._graph_code_hash) and the caller's own
parts: the kind of call (the non-shape inputs that select a graph, see specdec.kv) and the structure of
every argument, models by class, config and parameter names, shapes and dtypes (never their
values: parameters are graph inputs, read from the call), tensors by dtype, rank and device,
plain values by value. What the key leaves out is what a direct call already checks: each
input's dtype (the caller) and its sizes and strides (the graph's C++ wrapper).

The graph itself is torch's bundled AOTAutograd entry (its serialize(); pickled by torch,
as torch's own caches are), the recipe a JSON file beside it. Files live under
`$TORCHINDUCTOR_CACHE_DIR/specdec-graphs`, beside the compiled code they load, and are
written atomically. Everything here is best effort: a graph that cannot be saved or loaded
is compiled through dynamo as before, never a failed request.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when what is stored changes meaning


def directory() -> str:
    from .compiled import inductor_cache_dir

    return os.path.join(inductor_cache_dir(), "specdec-graphs")


@functools.cache
def _environment() -> dict:
    import transformers

    from .compiled import _graph_code_hash

    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - an older torch: the key just names the machine type
        isa = "unknown"
    return {"format": FORMAT, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": list(sys.version_info[:2]), "isa": isa, "cpu": _cpu_model(), "code": _graph_code_hash()}


def _cpu_model() -> str:
    """The CPU's model name: kernels are built for the machine they are built on (-march=native),
    so a cache shared between different machines keeps their graphs apart."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def key(parts: dict) -> str:
    """The file name for a graph whose trace depended on `parts` (JSON-able) and this environment."""
    text = json.dumps({"env": _environment(), **parts}, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _module_structure(module: torch.nn.Module) -> str:
    """A module by class, config and parameter/buffer names, shapes and dtypes (a hash; read
    afresh each time: a model moved to another dtype is another structure)."""
    digest = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    config = getattr(module, "config", None)
    if config is not None:
        try:  # where the model was loaded from does not shape its graphs
            fields = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
            text = json.dumps(fields, sort_keys=True, default=repr)
        except Exception:  # noqa: BLE001 - a config that is not a dict: its repr
            text = repr(config)
        digest.update(text.encode())
        digest.update(repr(getattr(config, "_attn_implementation", None)).encode())
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{tensor.device.type};".encode())
    return digest.hexdigest()[:32]


def structure(value: Any) -> Any:
    """What a graph's trace may depend on in one argument (see the module docstring)."""
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype), value.dim(), value.device.type]
    if isinstance(value, torch.nn.Module):
        return ["module", _module_structure(value)]
    if isinstance(getattr(value, "__self__", None), torch.nn.Module):  # a model's bound forward
        return ["method", value.__name__, _module_structure(value.__self__)]
    if isinstance(value, dict):
        return {str(k): structure(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [structure(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return repr(value)
    layers = getattr(value, "layers", None)  # a KV cache object: its class and depth
    return ["object", f"{type(value).__module__}.{type(value).__qualname__}",
            len(layers) if isinstance(layers, (list, tuple)) else None]


@contextlib.contextmanager
def bundled():
    """Compile so that the result can be saved (AOTAutograd's bundled cache entries)."""
    try:
        patch = torch._functorch.config.patch(bundled_autograd_cache=True)
    except Exception:  # noqa: BLE001 - a torch without the option: nothing can be saved, nothing else changes
        yield
        return
    with patch:
        yield


def _serializer():
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable
    except ImportError:  # pragma: no cover - an older torch: graphs are traced in every process
        return None
    return BundledAOTAutogradSerializableCallable


def _write(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def save(name: str, fn: Callable, recipe: dict) -> bool:
    """Keep compiled graph `fn` (as compile_fx returned it under `bundled()`) with its call
    recipe (JSON-able) under `name` (key()); False where it cannot be kept."""
    serializer = _serializer()
    if serializer is None or getattr(fn, "serialize", None) is None:
        return False
    try:
        data = serializer.serialize_compile_artifacts(serializer(fn))
        base = os.path.join(directory(), name)
        _write(base + ".graph", data)
        _write(base + ".json", json.dumps({"recipe": recipe, "env": _environment()}).encode())
    except Exception:  # noqa: BLE001 - best effort: the next process traces this graph again
        logger.debug("could not keep a compiled graph", exc_info=True)
        return False
    return True


def load(name: str, options: dict | None = None) -> tuple[Callable, dict] | None:
    """The graph kept under `name` and its recipe, or None (none kept, or it would not load).
    `options`: the inductor config the graph was compiled with (compile_fx's config_patches):
    loading finds its compiled code by them (a C++ wrapper built at another -O level is another
    file, which loading would build)."""
    base = os.path.join(directory(), name)
    serializer = _serializer()
    if serializer is None or not os.path.exists(base + ".json") or not os.path.exists(base + ".graph"):
        return None
    try:
        with open(base + ".json", "rb") as f:
            meta = json.loads(f.read())
        if meta.get("env") != json.loads(json.dumps(_environment())):
            return None
        with open(base + ".graph", "rb") as f:
            data = f.read()
        from torch._inductor import config as inductor_config

        with inductor_config.patch(options or {}):
            fn = serializer.deserialize_compile_artifacts(data)
    except Exception:  # noqa: BLE001 - a damaged or foreign file: compile instead
        logger.warning("could not load the compiled graph %s; compiling it", name, exc_info=True)
        return None
    return fn, meta["recipe"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

