"""Benchmark workloads: the built-in held-out prompts, the cache subset, and user files.

Built-in prompts ship as `specdec/assets/prompts/stdlib_heldout.jsonl`. They are code
prefixes (cut at line boundaries) from standard-library files that the bundled model
pair never saw in training; benchmarks/train_pair.py writes them with the same
held-out split it trains on. Shipping them, rather than cutting them from the running
interpreter's standard library, keeps the workload identical on every machine and
Python version, and guarantees it stays held out.

User workloads: `--prompts FILE.jsonl`, one JSON object per line, either
{"prompt": "..."} or Spec-Bench / MT-bench style {"turns": ["...", ...]} (the first turn
is the prompt; it is rendered with the tokenizer's chat template when there is one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

BUILTIN_PROMPTS = ("prompts", "stdlib_heldout.jsonl")  # inside the specdec.assets package


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt."""

    id: str
    text: str  # the prompt as given (a user turn is rendered later, see `chat`)
    kind: str = "heldout"  # "heldout" | "repeat" | "near-duplicate" | "user"
    chat: bool = False  # True: a conversation turn, rendered with the chat template if any


def builtin_prompts_path() -> Path:
    """Where the shipped held-out prompts live (a real file inside the installed package)."""
    return Path(str(resources.files("specdec.assets").joinpath(*BUILTIN_PROMPTS)))


def load_builtin(limit: int | None = None) -> list[Prompt]:
    """The held-out standard-library prompts, in their shipped (deterministic) order.

    `limit` keeps the first N; the file lists two cut points per held-out file, so the
    first N still cover about N/2 different files.
    """
    path = builtin_prompts_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"the built-in prompt file {path} is missing from the installed package; "
            "reinstall specdec or pass --prompts FILE.jsonl"
        )
    prompts = load_jsonl(path)
    prompts = [Prompt(p.id, p.text, "heldout") for p in prompts]
    return prompts if limit is None else prompts[:limit]


def load_jsonl(path: str | Path) -> list[Prompt]:
    """Prompts from a JSON-lines file ({"prompt": str} or {"turns": [str, ...]} per line).

    Raises ValueError naming the file and line for anything that is not one of those
    two shapes, so that a bad file fails before any model is loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist or is not a file; pass a .jsonl file")
    prompts: list[Prompt] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where} is not valid JSON ({exc.msg}); each line must be one JSON object") from None
            prompts.append(_parse_record(record, where, default_id=f"{path.stem}:{lineno}"))
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts; add lines like {{\"prompt\": \"...\"}}")
    return prompts


def _parse_record(record, where: str, default_id: str) -> Prompt:
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a JSON object with \"prompt\" or \"turns\", got {type(record).__name__}")
    ident = record.get("id", record.get("question_id", default_id))
    if "prompt" in record:
        text = record["prompt"]
        if not isinstance(text, str) or not text:
            raise ValueError(f"{where}: \"prompt\" must be a non-empty string, got {text!r:.60}")
        return Prompt(str(ident), text, "user")
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise ValueError(f"{where}: \"turns\" must be a non-empty list of non-empty strings, got {turns!r:.60}")
        return Prompt(str(ident), turns[0], "user", chat=True)
    raise ValueError(
        f"{where} has neither \"prompt\" nor \"turns\" (keys: {sorted(record)}); "
        "use {\"prompt\": \"...\"} or Spec-Bench style {\"turns\": [\"...\"]}"
    )


def cache_workload(prompts: list[Prompt], num_base: int) -> list[Prompt]:
    """Prompts for the cache benchmark: originals, then exact repeats, then near-duplicates.

    The first `num_base` prompts are each sent three times: as given, verbatim again
    (a repeated request), and as a near-duplicate whose window starts one line later
    (the same code seen through a shifted window, as when a user edits the top of a
    file). Near-duplicates share most of their text, so the draft-token store can
    propose earlier continuations even though the exact prompt is new.
    """
    if num_base < 1:
        raise ValueError(f"num_base must be >= 1, got {num_base}")
    base = prompts[:num_base]
    repeats = [Prompt(p.id + ":repeat", p.text, "repeat", p.chat) for p in base]
    near = [Prompt(p.id + ":near", near_duplicate(p.text), "near-duplicate", p.chat) for p in base]
    return base + repeats + near


def near_duplicate(text: str) -> str:
    """The text without its first line (or, for a one-line text, without its first word)."""
    lines = text.splitlines(keepends=True)
    if len(lines) > 1:
        return "".join(lines[1:])
    head, _, rest = text.partition(" ")
    return rest if rest else text


def render(prompt: Prompt, tokenizer) -> str:
    """The text a prompt is encoded from: a chat turn goes through the chat template, if any."""
    if prompt.chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
        )
    return prompt.text
