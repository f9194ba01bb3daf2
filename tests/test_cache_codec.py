"""Cache values: versioned header + int32 tokens, size-capped, bound to their key, never pickle."""

from __future__ import annotations

import pickle
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.cache.codec import (
    FORMAT_VERSION,
    HEADER,
    TAG_BYTES,
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
    assert value[:3] == b"SDC" and value[3] == FORMAT_VERSION and value[4] == KIND_DRAFT
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


SECRET = b"k" * 32


def test_signed_values_authenticate_only_under_the_same_secret_and_key():
    value = encode_value(KIND_RESPONSE, [5, 6], KEY, tail="stop", max_bytes=CAP, secret=SECRET)
    assert len(value) == HEADER.size + 8 + 4 + TAG_BYTES
    assert decode_value(value, KEY, kind=KIND_RESPONSE, max_bytes=CAP, secret=SECRET).authenticated
    # Another secret, or no secret: it still decodes (usable as a draft), but is not authenticated.
    assert not decode_value(value, KEY, kind=KIND_RESPONSE, max_bytes=CAP, secret=b"x" * 32).authenticated
    assert not decode_value(value, KEY, kind=KIND_RESPONSE, max_bytes=CAP).authenticated
    # An unsigned value never authenticates, even though anyone can compute its CRC.
    plain = encode_value(KIND_RESPONSE, [5, 6], KEY, tail="stop", max_bytes=CAP)
    assert not decode_value(plain, KEY, kind=KIND_RESPONSE, max_bytes=CAP, secret=SECRET).authenticated


def test_a_forged_body_with_a_recomputed_crc_does_not_authenticate():
    import zlib

    value = bytearray(encode_value(KIND_RESPONSE, [5, 6], KEY, tail="stop", max_bytes=CAP, secret=SECRET))
    value[HEADER.size : HEADER.size + 4] = struct.pack("<i", 7)  # change a token
    body = bytes(value[HEADER.size : HEADER.size + 12])
    value[12:16] = struct.pack("<I", zlib.crc32(body, zlib.crc32(KEY.encode())))  # what any writer can do
    out = decode_value(bytes(value), KEY, kind=KIND_RESPONSE, max_bytes=CAP, secret=SECRET)
    assert out.tokens == [7, 6] and not out.authenticated
    # A signed value copied under another key fails its checksum and its tag.
    signed = encode_value(KIND_RESPONSE, [5, 6], KEY, tail="stop", max_bytes=CAP, secret=SECRET)
    with pytest.raises(CorruptValue, match="checksum"):
        decode_value(signed, KEY[:-1] + "1", kind=KIND_RESPONSE, max_bytes=CAP, secret=SECRET)
