"""Drafter registry: each drafter lives in its own module and registers a name.

Two names are modes of the planner (specdec.planning), not drafters: "none" drafts
nothing (plain decoding, the baseline), and "auto" chooses per row and step among the
registered sources marked `auto=True` whose needs are met (the draft model only when one
is loaded).

Drafters outside this package register the same way; their modules are imported when the
registry is first read, from the `specdec.drafters` entry-point group of installed
packages and from SPECDEC_DRAFTERS (comma-separated module names, imported as given), so
that `generate(drafter=...)`, `specdec generate --drafter` and `specdec bench --methods`
all know them.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

from .base import DecodeState, DraftContext, DraftProposal, Drafter, empty_proposal, pack_proposals

AUTO, NONE = "auto", "none"
PLUGIN_ENV = "SPECDEC_DRAFTERS"
ENTRY_POINT_GROUP = "specdec.drafters"

_REGISTRY: dict[str, type[Drafter]] = {}
_AUTO_SOURCES: list[str] = []  # in registration order
_loaded = False


def register_drafter(name: str, *, auto: bool = False) -> Callable[[type[Drafter]], type[Drafter]]:
    """Class decorator: make a Drafter available as `drafter=name` (auto=True: also one of the
    sources drafter "auto" plans over)."""
    if not isinstance(name, str) or not name or name in (AUTO, NONE) or "," in name:
        raise ValueError(f"a drafter name is a non-empty str other than {AUTO!r} and {NONE!r}, without commas, "
                         f"got {name!r}")

    def wrap(cls: type[Drafter]) -> type[Drafter]:
        if not (isinstance(cls, type) and issubclass(cls, Drafter)):
            raise TypeError(f"register_drafter({name!r}) decorates a Drafter subclass, got {cls!r}")
        cls.name = name
        _REGISTRY[name] = cls
        if auto and name not in _AUTO_SOURCES:
            _AUTO_SOURCES.append(name)
        return cls

    return wrap


def available_drafters() -> list[str]:
    """Every name `drafter=` accepts: the registered drafters, "auto" and "none"."""
    _load()
    return sorted([*_REGISTRY, AUTO, NONE])


def get_drafter_class(name: str) -> type[Drafter]:
    """The registered class of a drafter name ("auto" and "none" have none: see source_names)."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown drafter {name!r}; choose one of {', '.join(available_drafters())}"
        ) from None


def _resources(has) -> frozenset[str]:
    """What a generator offers its drafters: a collection of "model" (a draft model is loaded)
    and "head" (an EAGLE-3 head is); a bool stands for the draft model alone."""
    if isinstance(has, bool):
        return frozenset({"model"}) if has else frozenset()
    return frozenset(has)


_LOADED_NEEDS = ("model", "head")  # needs met only by something the generator has loaded
# The built-in auto sources' order (the planner's tie-break), whatever order their modules were
# imported in; plug-ins follow in registration order.
_BUILTIN_ORDER = ("model", "eagle", "ngram")


def _auto_order() -> list[str]:
    rank = {name: i for i, name in enumerate(_BUILTIN_ORDER)}
    return sorted(_AUTO_SOURCES, key=lambda n: (rank.get(n, len(rank)), _AUTO_SOURCES.index(n)))


def source_names(name: str, has_draft_model) -> list[str]:
    """The drafters a request with `drafter=name` plans over: none for "none", one for a
    registered name, and for "auto" every auto source whose needs are met (a source that
    needs the draft model or a head only when one is loaded; one that needs the shared store
    never: it is chosen by name). `has_draft_model`: what is loaded (see _resources)."""
    if name == NONE:
        return []
    if name != AUTO:
        get_drafter_class(name)
        return [name]
    _load()
    have = _resources(has_draft_model)
    out = []
    for source in _auto_order():
        needs = _REGISTRY[source].needs
        if "store" in needs or any(n in needs and n not in have for n in _LOADED_NEEDS):
            continue
        out.append(source)
    return out


def resolve_drafter_name(name: str, has_draft_model) -> str:
    """The name a request's drafting goes by in cache keys: "auto" over a single source is
    that source (their outputs are the same)."""
    sources = source_names(name, has_draft_model)
    return sources[0] if name == AUTO and len(sources) == 1 else name


def reads_draft_model(name: str, has_draft_model) -> bool:
    """Whether `drafter=name` may run the draft model or the head (their weights shape seeded samples)."""
    return any(set(_LOADED_NEEDS) & get_drafter_class(s).needs for s in source_names(name, has_draft_model))


def reads_shared_state(name: str, has_draft_model) -> bool:
    """Whether `drafter=name` drafts from state other requests change (the draft store)."""
    return any("store" in get_drafter_class(s).needs for s in source_names(name, has_draft_model))


def _load() -> None:
    """Import the built-in drafters, then installed and named plug-ins (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import cache, eagle, model, ngram  # noqa: F401  (imported here: each imports this registry)

    from importlib.metadata import entry_points

    try:
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            entry.load()
        for module in filter(None, (m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(","))):
            importlib.import_module(module)
    except Exception:
        _loaded = False  # the next read raises the same error instead of running without the plug-in
        raise


__all__ = [
    "AUTO",
    "NONE",
    "DecodeState",
    "DraftContext",
    "DraftProposal",
    "Drafter",
    "available_drafters",
    "empty_proposal",
    "get_drafter_class",
    "pack_proposals",
    "reads_draft_model",
    "reads_shared_state",
    "register_drafter",
    "resolve_drafter_name",
    "source_names",
]
