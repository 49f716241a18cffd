"""Tests of usher.protocol.frames: envelopes, framing limits and bad input."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgspec
import pytest

from usher.errors import BadFrame, ConnectionClosed, FrameTooLarge
from usher.protocol import frames
from usher.protocol.frames import (
    Bye,
    Envelope,
    ErrorBody,
    Hello,
    Ping,
    Pong,
    Push,
    Refuse,
    Reply,
    Request,
    Welcome,
)
from usher.protocol.ops import Empty, StartArgs, StartOptions, TaskInfo

ENC = msgspec.msgpack.encode
TASK = TaskInfo(id="t1", op="start", vm="web.seuss.usher.test", state="running", user="seuss")

ENVELOPES: list[Envelope] = [
    Hello(versions=[1], role="client"),
    Hello(versions=[1, 2, 7], role="client", software="ush/0.1", user="seuss",
          password="s3cret pass"),
    Hello(versions=[1], role="node", software="usher-lnm/0.1", hostname="vmm1.usher.test",
          join_token="tok"),
    Welcome(version=1, site="usher.test", heartbeat_s=5.0, session="s-1"),
    Welcome(version=1, site="usher.test", heartbeat_s=2.5, session="s-2", user="seuss",
            site_admin=True, usher_user=True, host_cert_pem="CERT", host_key_pem="KEY"),
    Refuse(error=ErrorBody(code="auth_failed", message="login failed",
                           family="permission_denied")),
    Refuse(error=ErrorBody(code="x", message="m", details={"a": [1, 2], "b": {"c": None}})),
    Request(id="r1", op="vm.start",
            args=msgspec.Raw(ENC(StartArgs(names=["web"], options=StartOptions(ram=512))))),
    Reply(id="r1", result=msgspec.Raw(ENC(TASK))),
    Reply(id="r1"),
    Reply(id="r2", error=ErrorBody(code="vm_not_found", message="no VM", family="not_found")),
    Push(topic="task", body=msgspec.Raw(ENC(TASK))),
    Ping(seq=1),
    Pong(seq=2 ** 40),
    Bye(reason="controller shutting down"),
]


def reader_of(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def frame_of(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def nested_arrays(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


def envelope_map(**fields: Any) -> bytes:
    """A MessagePack map whose values are already-encoded bytes."""
    out = bytearray(b"\xde" + struct.pack("!H", len(fields)))
    for key, value in fields.items():
        out += ENC(key) + value
    return bytes(out)


# --------------------------------------------------------------- round trip
@pytest.mark.parametrize("message", ENVELOPES, ids=lambda m: type(m).__name__)
def test_every_envelope_round_trips(message: Envelope) -> None:
    frame = frames.pack(message)
    (length,) = struct.unpack("!I", frame[:4])
    assert length == len(frame) - 4
    assert frames.unpack(frame[4:]) == message


@pytest.mark.parametrize("message", ENVELOPES, ids=lambda m: type(m).__name__)
async def test_every_envelope_reads_back_from_a_stream(message: Envelope) -> None:
    reader = reader_of(frames.pack(message) + frames.pack(Ping(seq=9)))
    assert await frames.read_frame(reader, frames.MAX_FRAME) == message
    assert await frames.read_frame(reader, frames.MAX_FRAME) == Ping(seq=9)


def test_envelope_tags_are_distinct() -> None:
    tags = {type(m).__struct_config__.tag for m in ENVELOPES}
    assert tags == {"hello", "welcome", "refuse", "req", "rep", "push", "ping", "pong", "bye"}


def test_reply_without_result_carries_nil() -> None:
    reply = frames.unpack(frames.pack(Reply(id="1"))[4:])
    assert isinstance(reply, Reply)
    assert frames.decode_as(reply.result, None) is None


def test_arguments_decode_against_their_schema() -> None:
    raw = msgspec.Raw(ENC(StartArgs(names=["a", "b"])))
    assert frames.decode_as(raw, StartArgs) == StartArgs(names=["a", "b"])
    assert frames.decode_as(ENC({}), Empty) == Empty()


def test_pack_of_a_non_envelope_fails_loudly() -> None:
    with pytest.raises(TypeError):
        frames.pack(object())  # type: ignore[arg-type]


# ------------------------------------------------------------------ limits
async def test_frame_at_the_limit_is_read() -> None:
    frame = frames.pack(Bye(reason="x" * 100))
    limit = len(frame) - 4
    assert await frames.read_frame(reader_of(frame), limit) == Bye(reason="x" * 100)


async def test_announced_length_over_the_limit_reads_nothing() -> None:
    frame = frames.pack(Bye(reason="x" * 100))
    reader = reader_of(frame)
    with pytest.raises(FrameTooLarge) as info:
        await frames.read_frame(reader, len(frame) - 5)
    assert info.value.code == "frame_too_large"
    # Only the header was consumed: the body is still in the stream.
    assert await reader.read() == frame[4:]


async def test_huge_announced_length_fails_before_any_body_arrives() -> None:
    # No body is ever sent: read_frame must not wait for 4 GiB first.
    reader = reader_of(struct.pack("!I", 2 ** 32 - 1), eof=False)
    with pytest.raises(FrameTooLarge):
        await asyncio.wait_for(frames.read_frame(reader, frames.MAX_FRAME), 1.0)


def test_prelogin_limit_is_small() -> None:
    assert frames.PRELOGIN_MAX_FRAME < frames.MAX_FRAME
    assert len(frames.pack(Hello(versions=[1], role="client", user="u" * 64,
                                 password="p" * 1024))) < frames.PRELOGIN_MAX_FRAME


# --------------------------------------------------------------- bad frames
GARBAGE = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\xc1", id="never-used-byte"),
    pytest.param(b"\x82\xa1t\xa5hello", id="truncated"),
    pytest.param(ENC({"t": "ping", "seq": 1}) + b"\x00", id="trailing-bytes"),
    pytest.param(b"\xdf\xff\xff\xff\xff", id="huge-map-header"),
    pytest.param(b"\xdd\xff\xff\xff\xff", id="huge-array-header"),
    pytest.param(b"\xdb\xff\xff\xff\xf0abc", id="huge-string-header"),
    pytest.param(bytes(range(256)), id="all-bytes"),
]

WRONG_TYPES = [
    pytest.param({"t": "nonsense"}, id="unknown-tag"),
    pytest.param({"seq": 1}, id="no-tag"),
    pytest.param([1, 2, 3], id="array"),
    pytest.param("hello", id="string"),
    pytest.param({"t": "ping"}, id="missing-field"),
    pytest.param({"t": "ping", "seq": "1"}, id="string-for-int"),
    pytest.param({"t": "ping", "seq": 1.5}, id="float-for-int"),
    pytest.param({"t": "hello", "versions": 1, "role": "client"}, id="int-for-list"),
    pytest.param({"t": "hello", "versions": [1], "role": None}, id="nil-for-string"),
    pytest.param({"t": "refuse", "error": {"code": 1, "message": "m"}}, id="bad-error-body"),
    pytest.param({"t": "rep", "id": "1", "error": "boom"}, id="string-for-error"),
]


@pytest.mark.parametrize("body", GARBAGE)
async def test_garbage_is_a_bad_frame(body: bytes) -> None:
    with pytest.raises(BadFrame):
        frames.unpack(body)
    with pytest.raises(BadFrame):
        await frames.read_frame(reader_of(frame_of(body)), frames.MAX_FRAME)


@pytest.mark.parametrize("value", WRONG_TYPES)
def test_wrong_types_are_a_bad_frame(value: Any) -> None:
    with pytest.raises(BadFrame) as info:
        frames.unpack(ENC(value))
    assert info.value.code == "bad_frame"


def test_arguments_of_the_wrong_shape_are_a_bad_frame() -> None:
    with pytest.raises(BadFrame):
        frames.decode_as(ENC({"names": "web"}), StartArgs)
    with pytest.raises(BadFrame):  # schemas forbid unknown fields
        frames.decode_as(ENC({"names": ["web"], "colour": "red"}), StartArgs)
    with pytest.raises(BadFrame):
        frames.decode_as(b"\xc1", StartArgs)


MILLION = 1_000_000


@pytest.mark.parametrize("body", [
    pytest.param(nested_arrays(MILLION), id="bare"),
    pytest.param(envelope_map(t=ENC("req"), id=ENC("1"), op=ENC("vm.list"),
                              args=nested_arrays(MILLION)), id="in-raw-args"),
    pytest.param(envelope_map(t=ENC("push"), topic=ENC("task"),
                              body=nested_arrays(MILLION)), id="in-raw-push-body"),
    pytest.param(envelope_map(t=ENC("refuse"), error=envelope_map(
        code=ENC("x"), message=ENC("m"), details=b"\x81" + ENC("a") + nested_arrays(MILLION))),
        id="in-any-details"),
    pytest.param(b"\x81\xa1a" * MILLION + b"\xc0", id="nested-maps"),
])
async def test_a_million_nested_arrays_is_a_bad_frame(body: bytes) -> None:
    with pytest.raises(BadFrame):
        frames.unpack(body)
    with pytest.raises(BadFrame):
        await frames.read_frame(reader_of(frame_of(body)), len(body))


def test_deep_values_are_refused_by_typed_decoding_too() -> None:
    with pytest.raises(BadFrame):
        frames.decode_as(nested_arrays(MILLION), Any)
    with pytest.raises(BadFrame):
        frames.decode_as(nested_arrays(MILLION), StartArgs)


# ---------------------------------------------------------------- closing
async def test_clean_end_between_frames_is_connection_closed() -> None:
    reader = reader_of(frames.pack(Ping(seq=1)))
    await frames.read_frame(reader, frames.MAX_FRAME)
    with pytest.raises(ConnectionClosed) as info:
        await frames.read_frame(reader, frames.MAX_FRAME)
    assert info.value.details == {"by_peer": True, "mid_frame": False}


@pytest.mark.parametrize("cut", [1, 3, 4, 5, -1], ids=lambda c: f"cut-at-{c}")
async def test_end_in_the_middle_of_a_frame_is_connection_closed(cut: int) -> None:
    frame = frames.pack(Bye(reason="cut short"))
    with pytest.raises(ConnectionClosed) as info:
        await frames.read_frame(reader_of(frame[:cut]), frames.MAX_FRAME)
    assert info.value.details == {"by_peer": True, "mid_frame": True}
