"""Cache values: versioned header + int32 tokens, size-capped, bound to their key, never pickle."""

from __future__ import annotations

import pickle
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.cache.codec import (
    HEADER,
    KIND_DRAFT,
    KIND_RESPONSE,
    CorruptValue,
    ValueTooLarge,
    decode_value,
    encode_value,
)

KEY = "specdec:ns:resp:" + "0" * 64
CAP = 1 << 20


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=300), st.sampled_from(["stop", "length", ""]))
def test_roundtrip(tokens, tail):
    value = encode_value(KIND_RESPONSE, tokens, KEY, tail=tail, max_bytes=CAP)
    assert len(value) == HEADER.size + 4 * len(tokens) + len(tail)  # compact: 4 bytes a token
    out = decode_value(value, KEY, kind=KIND_RESPONSE, max_bytes=CAP)
    assert out.tokens == tokens and out.tail == tail


def test_layout_is_little_endian_int32():
    value = encode_value(KIND_DRAFT, [1, 256, -1], KEY, max_bytes=CAP)
    assert value[:3] == b"SDC" and value[3] == 1 and value[4] == KIND_DRAFT
    assert value[HEADER.size :] == struct.pack("<3i", 1, 256, -1)


def test_value_read_under_another_key_is_rejected():
    value = encode_value(KIND_RESPONSE, [5, 6], KEY, tail="stop", max_bytes=CAP)
    with pytest.raises(CorruptValue, match="checksum"):
        decode_value(value, KEY.replace("specdec:ns:", "specdec:other:"), kind=KIND_RESPONSE, max_bytes=CAP)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda v: b"XYZ" + v[3:], "magic"),
        (lambda v: v[:3] + b"\x09" + v[4:], "version"),
        (lambda v: v[:4] + bytes([KIND_DRAFT]) + v[5:], "kind"),
        (lambda v: v[:-1], "length"),
        (lambda v: v + b"\x00", "length"),
        (lambda v: v[:-5] + bytes([v[-5] ^ 1]) + v[-4:], "checksum"),
        (lambda v: v[:5], "shorter"),
        (lambda v: b"", "shorter"),
    ],
)
def test_corruption_is_detected(mutate, message):
    value = encode_value(KIND_RESPONSE, [1, 2, 3], KEY, tail="stop", max_bytes=CAP)
    with pytest.raises(CorruptValue, match=message):
        decode_value(mutate(value), KEY, kind=KIND_RESPONSE, max_bytes=CAP)


def test_pickles_are_not_values():
    blob = pickle.dumps({"token_ids": [1, 2]})
    with pytest.raises(CorruptValue):
        decode_value(blob, KEY, kind=KIND_RESPONSE, max_bytes=CAP)


def test_size_cap_on_write_and_read():
    with pytest.raises(ValueTooLarge, match="exceeds the cap"):
        encode_value(KIND_RESPONSE, list(range(100)), KEY, max_bytes=HEADER.size + 399)
    value = encode_value(KIND_RESPONSE, list(range(100)), KEY, max_bytes=CAP)
    with pytest.raises(CorruptValue, match="exceeds the cap"):
        decode_value(value, KEY, kind=KIND_RESPONSE, max_bytes=len(value) - 1)


def test_bad_tokens_raise_clearly():
    with pytest.raises(ValueError, match="int32"):
        encode_value(KIND_DRAFT, [2**31], KEY, max_bytes=CAP)
    with pytest.raises(TypeError, match="must be ints"):
        encode_value(KIND_DRAFT, [1.5], KEY, max_bytes=CAP)
    with pytest.raises(ValueError, match="tail"):
        encode_value(KIND_RESPONSE, [1], KEY, tail="x" * 256, max_bytes=CAP)
