"""Prompt normalisation for response-cache keys.

Two prompts that normalise to the same text share a cache entry, so the rules are
versioned: NORMALIZATION_VERSION and the options go into every key, and changing
either makes old entries unreachable instead of wrong.

Steps, in order: Unicode NFKC; optional case folding (followed by NFKC again,
because folding can produce unnormalised text); whitespace (CRLF/CR -> LF, then
"collapse": every run of whitespace becomes one space, or "lines": runs of
horizontal whitespace become one space and spaces around newlines go, keeping line
structure); strip both ends. The result is a fixed point: normalising it again
changes nothing.

Chat prompts (a list of {"role", "content"} messages) have each content normalised,
then go through the tokenizer's chat template, so the key sees exactly the text the
model would see. Normalising the rendered text instead cannot make near-duplicate chats
meet: a template that closes a message right after its content (`2022.  <|im_end|>`)
leaves a space that the clean chat (`2022.<|im_end|>`) does not have.

Versions: 2 keys chat prompts message by message as above; 1 normalised the rendered
chat text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NORMALIZATION_VERSION = 2
UNICODE_FORMS = ("NFKC", "NFC", "none")
WHITESPACE_MODES = ("collapse", "lines", "none")

_ANY_WS = re.compile(r"\s+")
_HORIZONTAL_WS = re.compile(r"[^\S\n]+")
_SPACE_AROUND_NL = re.compile(r" ?\n ?")
_MANY_NL = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class NormalizationOptions:
    """How prompts are normalised before keying; all of it goes into the key."""

    unicode_form: str = "NFKC"  # "NFKC" | "NFC" | "none"
    whitespace: str = "collapse"  # "collapse" | "lines" | "none"
    casefold: bool = False

    def __post_init__(self) -> None:
        if self.unicode_form not in UNICODE_FORMS:
            raise ValueError(f"unicode_form={self.unicode_form!r}; allowed: {', '.join(UNICODE_FORMS)}")
        if self.whitespace not in WHITESPACE_MODES:
            raise ValueError(f"whitespace={self.whitespace!r}; allowed: {', '.join(WHITESPACE_MODES)}")
        if not isinstance(self.casefold, bool):
            raise TypeError(f"casefold must be a bool, got {type(self.casefold).__name__}")

    def spec(self) -> dict[str, Any]:
        """The part of the cache key that names these rules."""
        return {
            "version": NORMALIZATION_VERSION,
            "unicode_form": self.unicode_form,
            "whitespace": self.whitespace,
            "casefold": self.casefold,
        }


def _one_pass(text: str, options: NormalizationOptions) -> str:
    if options.unicode_form != "none":
        text = unicodedata.normalize(options.unicode_form, text)
    if options.casefold:
        text = text.casefold()
        if options.unicode_form != "none":
            text = unicodedata.normalize(options.unicode_form, text)
    if options.whitespace == "collapse":
        text = _ANY_WS.sub(" ", text).strip()
    elif options.whitespace == "lines":
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _HORIZONTAL_WS.sub(" ", text)
        text = _SPACE_AROUND_NL.sub("\n", text)
        text = _MANY_NL.sub("\n\n", text).strip()
    return text


def normalize_text(text: str, options: NormalizationOptions = NormalizationOptions()) -> str:
    """Normalise one prompt string (idempotent: normalize_text(normalize_text(x)) == normalize_text(x))."""
    if not isinstance(text, str):
        raise TypeError(f"prompt text must be str, got {type(text).__name__}")
    # One pass is a fixed point for almost every string; a few case-folding corner cases
    # need a second, so iterate until stable (bounded: each pass only shortens or maps).
    for _ in range(4):
        nxt = _one_pass(text, options)
        if nxt == text:
            return nxt
        text = nxt
    return text


def normalize_messages(
    messages: Sequence[Mapping[str, Any]], options: NormalizationOptions = NormalizationOptions()
) -> list[dict[str, Any]]:
    """Normalise the text content of chat messages; roles and other fields are kept."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(
                f"chat message {i} must be a mapping with 'role' and 'content', got {message!r}"
            )
        item = dict(message)
        content = item["content"]
        if isinstance(content, str):
            item["content"] = normalize_text(content, options)
        elif isinstance(content, list):  # multi-part content: normalise the text parts
            item["content"] = [
                {**part, "text": normalize_text(part["text"], options)}
                if isinstance(part, Mapping) and isinstance(part.get("text"), str)
                else part
                for part in content
            ]
        else:
            raise TypeError(f"chat message {i} content must be str or a list of parts, got {type(content).__name__}")
        out.append(item)
    return out


def render_prompt(
    prompt: str | Sequence[Mapping[str, Any]],
    tokenizer: Any,
    options: NormalizationOptions = NormalizationOptions(),
) -> str:
    """The normalised text a prompt is keyed by.

    A string is normalised as is; a list of chat messages is normalised per message and
    rendered with the tokenizer's chat template (with the generation prompt).
    """
    if isinstance(prompt, str):
        return normalize_text(prompt, options)
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "chat messages need a tokenizer with a chat_template to be keyed; "
            "pass the prompt as a string or load a tokenizer that has one"
        )
    messages = normalize_messages(prompt, options)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
