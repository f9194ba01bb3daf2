"""Cache values: a 16-byte versioned header, int32 little-endian tokens, a short UTF-8 tail,
and (signed values) an HMAC-SHA256 tag.

Layout (all little-endian):

    offset    size  field
    0         3     magic b"SDC"
    3         1     format version (FORMAT_VERSION)
    4         1     kind (KIND_RESPONSE / KIND_DRAFT)
    5         1     length of the UTF-8 tail in bytes (finish reason; 0 for drafts)
    6         2     flags: bit 0 = signed (a 32-byte tag follows the tail)
    8         4     token count n
    12        4     CRC-32 of (Redis key bytes + body)
    16        4n    tokens, int32
    16+4n     t     tail
    16+4n+t   32    HMAC-SHA256(secret, Redis key bytes + 0x00 + every byte before the tag)

The CRC catches accidents (a truncated write, a value copied to another key); it
proves nothing about who wrote the value, since anyone can compute it. The tag does:
only a holder of the secret can produce one, and it covers the full Redis key, so a
signed value moved to another key fails too. Whether a value is trusted is decided by
the reader (`DecodedValue.authenticated`), never by a flag in the value. Nothing here
ever executes on load: no pickle.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import sys
import zlib
from array import array
from dataclasses import dataclass
from typing import Sequence

MAGIC = b"SDC"
FORMAT_VERSION = 2
FLAG_SIGNED = 1
TAG_BYTES = 32
KIND_RESPONSE = 1
KIND_DRAFT = 2
HEADER = struct.Struct("<3sBBBHII")
MAX_TAIL_BYTES = 255
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_LITTLE = sys.byteorder == "little"


class CorruptValue(ValueError):
    """A stored value that does not decode: wrong magic, version, kind, size or checksum."""


class ValueTooLarge(ValueError):
    """A value that would exceed the configured size cap."""


@dataclass(frozen=True)
class DecodedValue:
    tokens: list[int]  # [n]
    tail: str  # finish reason for responses, "" for drafts
    authenticated: bool = False  # carries a valid tag under the reader's secret


def _tag(secret: bytes, key: str, signed_part: bytes | memoryview) -> bytes:
    mac = hmac.new(secret, key.encode("utf-8") + b"\x00", hashlib.sha256)
    mac.update(signed_part)
    return mac.digest()


def _token_bytes(tokens: Sequence[int]) -> bytes:
    try:
        arr = array("i", tokens)
    except OverflowError:
        bad = next(t for t in tokens if not _INT32_MIN <= t <= _INT32_MAX)
        raise ValueError(f"token id {bad} does not fit in int32; token ids must be in [0, 2**31)") from None
    except TypeError:
        bad = next(t for t in tokens if not isinstance(t, int))
        raise TypeError(f"token ids must be ints, got {type(bad).__name__} ({bad!r})") from None
    if arr.itemsize != 4:  # pragma: no cover - no supported platform has a 2- or 8-byte C int
        raise RuntimeError("array('i') is not 32-bit on this platform")
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr.tobytes()


def encode_value(
    kind: int,
    tokens: Sequence[int],
    key: str,
    *,
    tail: str = "",
    max_bytes: int,
    secret: bytes | None = None,
) -> bytes:
    """Encode tokens (+ optional short text) for storage under `key`; signed when `secret` is given.

    Raises ValueTooLarge when the encoded value would exceed max_bytes, ValueError /
    TypeError for token ids that are not int32 ints or a tail longer than 255 bytes.
    """
    tail_bytes = tail.encode("utf-8")
    if len(tail_bytes) > MAX_TAIL_BYTES:
        raise ValueError(f"tail is {len(tail_bytes)} bytes; at most {MAX_TAIL_BYTES} allowed")
    size = HEADER.size + 4 * len(tokens) + len(tail_bytes) + (TAG_BYTES if secret else 0)
    if size > max_bytes:
        raise ValueTooLarge(f"value of {size} bytes exceeds the cap of {max_bytes} bytes")
    body = _token_bytes(tokens) + tail_bytes
    crc = zlib.crc32(body, zlib.crc32(key.encode("utf-8")))
    flags = FLAG_SIGNED if secret else 0
    value = HEADER.pack(MAGIC, FORMAT_VERSION, kind, len(tail_bytes), flags, len(tokens), crc) + body
    return value + _tag(secret, key, value) if secret else value


def encode_token_bytes(kind: int, token_bytes: bytes, key: str, *, max_bytes: int) -> bytes:
    """encode_value for tokens already packed as int32 little-endian bytes (no tail).

    The draft store packs a whole sequence once and slices it, instead of converting
    every continuation from a list again.
    """
    size = HEADER.size + len(token_bytes)
    if size > max_bytes:
        raise ValueTooLarge(f"value of {size} bytes exceeds the cap of {max_bytes} bytes")
    crc = zlib.crc32(token_bytes, zlib.crc32(key.encode("utf-8")))
    return HEADER.pack(MAGIC, FORMAT_VERSION, kind, 0, 0, len(token_bytes) // 4, crc) + token_bytes


def pack_tokens(tokens: Sequence[int]) -> bytes:
    """Tokens as int32 little-endian bytes (ValueError/TypeError for ids that do not fit)."""
    return _token_bytes(tokens)


def decode_value(
    data: bytes, key: str, *, kind: int, max_bytes: int, secret: bytes | None = None
) -> DecodedValue:
    """Decode a value read from `key`; raise CorruptValue if anything does not add up.

    With `secret`, `authenticated` tells whether the value carries a valid tag under it;
    an unsigned or wrongly signed value still decodes (the caller decides what an
    unauthenticated value may be used for: a draft to verify, or nothing).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):  # a reply of another type is no value
        raise CorruptValue(f"a value must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise CorruptValue(f"value of {len(data)} bytes exceeds the cap of {max_bytes} bytes")
    if len(data) < HEADER.size:
        raise CorruptValue(f"value of {len(data)} bytes is shorter than the {HEADER.size}-byte header")
    magic, version, got_kind, tail_len, flags, count, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptValue(f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise CorruptValue(f"format version {version}, this code reads {FORMAT_VERSION}")
    if got_kind != kind:
        raise CorruptValue(f"value kind {got_kind}, expected {kind}")
    if flags & ~FLAG_SIGNED:
        raise CorruptValue(f"unknown flags {flags:#x}")
    tag_len = TAG_BYTES if flags & FLAG_SIGNED else 0
    end = HEADER.size + 4 * count + tail_len
    if len(data) != end + tag_len:
        raise CorruptValue(
            f"value length {len(data)} does not match {count} tokens + {tail_len} tail bytes + {tag_len} tag bytes"
        )
    view = memoryview(data)
    body = view[HEADER.size : end]
    if zlib.crc32(body, zlib.crc32(key.encode("utf-8"))) != crc:
        raise CorruptValue("checksum mismatch (corrupted, or stored under another key)")
    authenticated = bool(
        secret and tag_len and hmac.compare_digest(_tag(secret, key, view[:end]), bytes(view[end:]))
    )
    arr = array("i")
    arr.frombytes(body[: 4 * count])
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        arr.byteswap()
    try:
        tail = bytes(body[4 * count :]).decode("utf-8")
    except UnicodeDecodeError as exc:  # a writer with the key can compute the CRC of anything
        raise CorruptValue(f"tail is not UTF-8: {exc}") from None
    return DecodedValue(tokens=arr.tolist(), tail=tail, authenticated=authenticated)
