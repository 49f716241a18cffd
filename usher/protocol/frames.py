"""Framing and envelope messages of the usher wire protocol.

A frame is a 4-byte big-endian length followed by a MessagePack body of at
most ``limit`` bytes. The body is one envelope: a tagged msgspec struct whose
``t`` field says which. Request arguments, results and push bodies stay as
``msgspec.Raw`` in the envelope and are decoded against the operation table
(``usher.protocol.ops``) by whoever handles them, so a frame is never decoded
into untyped Python objects.

Nesting depth is bounded twice: the typed schemas admit only shallow values,
and msgspec's own recursion guard turns a pathological frame (a million nested
arrays) into :class:`BadFrame` instead of a crash.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgspec

from usher.errors import BadFrame, ConnectionClosed, FrameTooLarge

PROTOCOL_VERSIONS = (1,)
"""Protocol versions this build speaks, oldest first."""

MAX_FRAME = 4 * 1024 * 1024
"""Largest frame accepted after hello (bytes)."""

PRELOGIN_MAX_FRAME = 16 * 1024
"""Largest frame accepted before the peer has completed hello."""

_HEADER = struct.Struct("!I")


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """An error as data: see ``UsherError.to_wire``."""

    code: str
    message: str
    family: str = "internal"
    details: dict[str, Any] = {}


class Hello(msgspec.Struct, tag="hello", tag_field="t", omit_defaults=True):
    """First frame from the dialling side.

    ``role`` is ``client`` (a person or program, authenticated by ``user`` and
    ``password``) or ``node`` (a node manager, authenticated by its host
    certificate, or by a one-time ``join_token`` exchanged for one).
    """

    versions: list[int]
    role: str
    software: str = ""
    user: str | None = None
    password: str | None = None
    hostname: str | None = None
    join_token: str | None = None


class Welcome(msgspec.Struct, tag="welcome", tag_field="t", omit_defaults=True):
    """The controller's answer to a good hello."""

    version: int
    site: str
    heartbeat_s: float
    session: str
    user: str | None = None
    site_admin: bool = False
    usher_user: bool = False
    host_cert_pem: str | None = None
    host_key_pem: str | None = None


class Refuse(msgspec.Struct, tag="refuse", tag_field="t"):
    """The controller's answer to a bad hello; the connection closes after it."""

    error: ErrorBody


class Request(msgspec.Struct, tag="req", tag_field="t"):
    """A call. ``id`` is chosen by the caller and is the idempotency key of a
    mutation (scoped to the caller)."""

    id: str
    op: str
    args: msgspec.Raw


class Reply(msgspec.Struct, tag="rep", tag_field="t"):
    """The answer to the request with the same ``id``: a result or an error."""

    id: str
    result: msgspec.Raw = msgspec.Raw(b"\xc0")  # MessagePack nil
    error: ErrorBody | None = None


class Push(msgspec.Struct, tag="push", tag_field="t"):
    """An unsolicited message: task progress, VM state, domain events."""

    topic: str
    body: msgspec.Raw


class Ping(msgspec.Struct, tag="ping", tag_field="t"):
    seq: int


class Pong(msgspec.Struct, tag="pong", tag_field="t"):
    seq: int


class Bye(msgspec.Struct, tag="bye", tag_field="t"):
    """Orderly close, with a reason for people."""

    reason: str


Envelope = Hello | Welcome | Refuse | Request | Reply | Push | Ping | Pong | Bye

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


def encode(value: Any) -> bytes:
    """MessagePack-encode a schema value (struct, list, scalar)."""
    return _encoder.encode(value)


def decode_as(data: bytes | msgspec.Raw, type_: Any) -> Any:
    """Decode ``data`` against ``type_``; a mismatch is :class:`BadFrame`."""
    try:
        return msgspec.msgpack.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        raise BadFrame(f"invalid message: {exc}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadFrame(f"malformed message: {exc}") from None


def pack(message: Envelope) -> bytes:
    """Encode one envelope as a complete frame (header included)."""
    body = _encoder.encode(message)
    return _HEADER.pack(len(body)) + body


def unpack(body: bytes) -> Envelope:
    """Decode a frame body into an envelope, or raise :class:`BadFrame`."""
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadFrame(f"invalid frame: {exc}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadFrame(f"malformed frame: {exc}") from None


async def read_frame(reader: asyncio.StreamReader, limit: int) -> Envelope:
    """Read one frame and decode it.

    Raises :class:`FrameTooLarge` when the header announces more than
    ``limit`` bytes (nothing of the body is read), :class:`BadFrame` for a
    body that is not a valid envelope, and :class:`ConnectionClosed` when the
    stream ends, cleanly between frames or in the middle of one.
    """
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        raise ConnectionClosed("connection closed by peer",
                               details={"by_peer": True, "mid_frame": bool(exc.partial)}) from None
    (length,) = _HEADER.unpack(header)
    if length > limit:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {limit} bytes")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ConnectionClosed("connection closed by peer in the middle of a frame",
                               details={"by_peer": True, "mid_frame": True}) from None
    return unpack(body)
