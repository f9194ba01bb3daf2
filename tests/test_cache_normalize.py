"""Prompt normalisation: NFKC, whitespace, case folding, chat; idempotent (property tests)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.cache.normalize import (
    NormalizationOptions,
    normalize_messages,
    normalize_text,
    render_prompt,
)

ALL_OPTIONS = [
    NormalizationOptions(form, ws, cf)
    for form in ("NFKC", "NFC", "none")
    for ws in ("collapse", "lines", "none")
    for cf in (False, True)
]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), st.sampled_from(ALL_OPTIONS))
def test_normalisation_is_idempotent(text, options):
    once = normalize_text(text, options)
    assert normalize_text(once, options) == once


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_whitespace_variants_normalise_equal(text):
    words = text.split()
    a = " ".join(words)
    b = "\t " + "   \n".join(words) + " \r\n"
    assert normalize_text(a) == normalize_text(b)


def test_examples():
    opts = NormalizationOptions()
    assert normalize_text("  Hello\t\tworld \n", opts) == "Hello world"
    assert normalize_text("ﬁle №５", opts) == "file No5"  # NFKC: ligature, numero, fullwidth digit
    assert normalize_text("Cafe\u0301", opts) == "Café"  # combining accent composed
    assert normalize_text("Hello", opts) != normalize_text("hello", opts)
    folded = NormalizationOptions(casefold=True)
    assert normalize_text("HELLO Straße", folded) == normalize_text("hello strasse", folded)
    lines = NormalizationOptions(whitespace="lines")
    assert normalize_text("a  b \r\n\r\n\r\n  c", lines) == "a b\n\nc"
    assert normalize_text("a\nb", lines) != normalize_text("a b", lines)
    raw = NormalizationOptions("none", "none", False)
    assert normalize_text(" x  ", raw) == " x  "


def test_spec_names_the_rules():
    assert NormalizationOptions().spec() == {
        "version": 2,
        "unicode_form": "NFKC",
        "whitespace": "collapse",
        "casefold": False,
    }
    assert NormalizationOptions(casefold=True).spec() != NormalizationOptions().spec()


def test_bad_options_and_inputs():
    with pytest.raises(ValueError, match="unicode_form"):
        NormalizationOptions(unicode_form="NFD2")
    with pytest.raises(ValueError, match="whitespace"):
        NormalizationOptions(whitespace="squash")
    with pytest.raises(TypeError, match="casefold"):
        NormalizationOptions(casefold="yes")
    with pytest.raises(TypeError, match="must be str"):
        normalize_text(b"bytes")
    with pytest.raises(ValueError, match="role"):
        normalize_messages([{"content": "x"}])


def test_chat_messages_use_the_chat_template(tiny_tokenizer):
    a = [{"role": "user", "content": "  Hello\u00a0 world "}]
    b = [{"role": "user", "content": "Hello world"}]
    c = [{"role": "user", "content": "Hello world!"}]
    text_a = render_prompt(a, tiny_tokenizer)
    assert text_a == render_prompt(b, tiny_tokenizer)
    assert text_a != render_prompt(c, tiny_tokenizer)
    assert text_a.endswith("assistant:")  # the generation prompt of the template
    assert "user: Hello world" in text_a
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt(a, None)
