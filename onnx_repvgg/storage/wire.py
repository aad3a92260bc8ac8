"""The protobuf wire format, just enough to move tensor bytes without parsing them.

An ONNX file is one serialized ModelProto. Python protobuf parses and re-serializes every
weight byte; this module lets the loader find where each initializer's raw_data lies in the
file (so weights are read from disk only for the blocks that need them) and lets the writer
splice tensor bytes between serialized headers (so they are never copied into a message).

Only top-level fields of a message are walked: a length-delimited field is skipped by its
length. Any malformed input raises WireError; callers then fall back to protobuf itself,
which gives the user its own error.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5

# Field numbers (onnx.proto).
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_RAW_DATA = 9
TENSOR_EXTERNAL_DATA = 13
TENSOR_DATA_LOCATION = 14
ENTRY_KEY, ENTRY_VALUE = 1, 2


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message (or not the shape we expect)."""


class Field(NamedTuple):
    number: int
    wire_type: int
    start: int        # where the tag begins
    value_start: int  # the first byte after the tag (and after the length, when LENGTH_DELIMITED)
    end: int          # one past the field's last byte


def read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def fields(buf, start: int = 0, end: int | None = None) -> Iterator[Field]:
    """The top-level fields of the message in buf[start:end], in file order."""
    for span in spans(buf, start, end):
        yield Field(*span)


def spans(buf, start: int = 0, end: int | None = None, number: int | None = None,
          min_length: int = 0) -> Iterator[tuple[int, int, int, int, int]]:
    """fields() as plain tuples (number, wire_type, start, value_start, end): the walk of a
    graph of 10^5 nodes, with one-byte tags and lengths read in place. Given `number`, only the
    length-delimited fields of that number whose payload is `min_length` bytes or more (every
    field is still checked)."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        field_start = pos
        key = buf[pos]
        if key & 7 == LENGTH_DELIMITED and 8 <= key < 0x80 and pos + 2 < end:
            # the common field (a node, a tensor, a name): a one-byte tag, a one- or two-byte length
            length = buf[pos + 1]
            if length < 0x80:
                value_start = pos + 2
            elif buf[pos + 2] < 0x80:
                length, value_start = (length & 0x7F) | (buf[pos + 2] << 7), pos + 3
            else:
                length, value_start = read_varint(buf, pos + 1, end)
            pos = value_start + length
            if pos > end:
                raise WireError("field runs past the end of its message")
            if number is None or (key >> 3 == number and length >= min_length):
                yield key >> 3, LENGTH_DELIMITED, field_start, value_start, pos
            continue
        if key < 0x80:
            pos += 1
        else:
            key, pos = read_varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        if wire_type == LENGTH_DELIMITED:
            if pos < end and buf[pos] < 0x80:
                length, value_start = buf[pos], pos + 1
            else:
                length, value_start = read_varint(buf, pos, end)
            pos = value_start + length
            if number is not None and (field != number or length < min_length):
                if pos > end:
                    raise WireError("field runs past the end of its message")
                continue
        elif wire_type == VARINT:
            value_start = pos
            _, pos = read_varint(buf, pos, end)
            if number is None:
                yield field, wire_type, field_start, value_start, pos
            continue
        elif wire_type == FIXED64:
            value_start, pos = pos, pos + 8
        elif wire_type == FIXED32:
            value_start, pos = pos, pos + 4
        else:  # groups (3, 4) are not used by onnx.proto; 6 and 7 are invalid
            raise WireError(f"unsupported wire type {wire_type}")
        if pos > end:
            raise WireError("field runs past the end of its message")
        if number is None or wire_type == LENGTH_DELIMITED:
            yield field, wire_type, field_start, value_start, pos


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


def length_delimited(number: int, payload_length: int) -> bytes:
    """The tag and length that precede a length-delimited field's payload."""
    return tag(number, LENGTH_DELIMITED) + encode_varint(payload_length)


def split_before(message: bytes, number: int, known: frozenset[int] | None = None) -> int:
    """Where a field numbered `number` goes in a serialized message: before the first field with
    a higher number, or (given the message type's `known` field numbers) before its first
    unknown field. Protobuf serializes known fields in ascending order and unknown ones after
    them, so inserting there gives the bytes SerializeToString would give (any position would
    parse the same)."""
    for f in fields(message):
        if f.number > number or (known is not None and f.number not in known):
            return f.start
    return len(message)
