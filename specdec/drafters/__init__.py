"""Drafter registry: each drafter lives in its own module and registers a name."""

from __future__ import annotations

from typing import Callable

from .base import DecodeState, DraftProposal, Drafter, empty_proposal, pack_proposals

_REGISTRY: dict[str, type[Drafter]] = {}


def register_drafter(name: str) -> Callable[[type[Drafter]], type[Drafter]]:
    """Class decorator: make a Drafter available as `drafter=name`."""

    def wrap(cls: type[Drafter]) -> type[Drafter]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_drafters() -> list[str]:
    """Registered drafter names ("auto" among them)."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_drafter_class(name: str) -> type[Drafter]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown drafter {name!r}; choose one of {', '.join(available_drafters())}"
        ) from None


def resolve_drafter_name(name: str, has_draft_model: bool) -> str:
    """The registered drafter that `name` stands for ("auto": the draft model and prompt lookup
    combined per row when a draft model is loaded, else prompt lookup)."""
    if name == "auto":
        return "auto" if has_draft_model else "ngram"
    return name


def _load_builtin() -> None:
    # Imported lazily so that each module can import this registry.
    from . import auto, cache, model, ngram, none  # noqa: F401


__all__ = [
    "DecodeState",
    "DraftProposal",
    "Drafter",
    "available_drafters",
    "empty_proposal",
    "get_drafter_class",
    "pack_proposals",
    "register_drafter",
    "resolve_drafter_name",
]
