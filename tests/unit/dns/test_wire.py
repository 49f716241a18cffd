"""UPDATE messages and TSIG by hand (usher.dns.wire), checked against dnspython's own.

dnspython parses what usher.dns.wire builds and verifies its TSIG; answers
that dnspython signs are verified by usher.dns.wire. The real server (BIND)
is in tests/integration/dns.
"""

from __future__ import annotations

import base64
import time

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update
import pytest

from usher.dns.wire import (
    MAX_MESSAGE,
    TsigKey,
    UpdateMessage,
    check_answer,
    encode_name,
    encode_rdata,
)
from usher.errors import DnsError

SECRET = base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def keys(algorithm: str = "hmac-sha256") -> tuple[TsigKey, dns.tsig.Key]:
    theirs = dns.tsig.Key("usher-update.", SECRET, algorithm)
    return TsigKey("usher-update.", theirs.algorithm.to_text(), base64.b64decode(SECRET)), theirs


def update(key: TsigKey) -> UpdateMessage:
    message = UpdateMessage("usher.test.", key)
    message.add(UpdateMessage.record("web.seuss.usher.test.", "A", "10.0.0.5", 60))
    message.add(UpdateMessage.record("web.seuss.usher.test.", "TXT",
                                     '"heritage=usher,site=s1"', 60))
    message.add(UpdateMessage.record("old.seuss.usher.test.", "A", "10.0.0.9", 60,
                                     delete=True))
    return message


@pytest.mark.parametrize("algorithm", ["hmac-sha256", "hmac-sha512", "hmac-sha1",
                                       "hmac-md5.sig-alg.reg.int"])
def test_dnspython_reads_and_verifies_the_update(algorithm: str) -> None:
    ours, theirs = keys(algorithm)
    message = update(ours)
    parsed = dns.message.from_wire(message.to_wire(), keyring={theirs.name: theirs})
    assert isinstance(parsed, dns.update.UpdateMessage)
    assert parsed.had_tsig and parsed.opcode() == dns.opcode.UPDATE
    assert parsed.id == message.id and parsed.mac == message.mac
    expected = dns.update.UpdateMessage("usher.test.")
    expected.add("web.seuss.usher.test.", 60, "A", "10.0.0.5")
    expected.add("web.seuss.usher.test.", 60, "TXT", '"heritage=usher,site=s1"')
    expected.delete("old.seuss.usher.test.", "A", "10.0.0.9")
    assert parsed.zone == expected.zone and parsed.update == expected.update


def test_a_tampered_update_does_not_verify() -> None:
    ours, theirs = keys()
    wire = bytearray(update(ours).to_wire())
    wire[40] ^= 1
    with pytest.raises(dns.tsig.BadSignature):
        dns.message.from_wire(bytes(wire), keyring={theirs.name: theirs})


def answer(message: UpdateMessage, theirs: dns.tsig.Key, *,
           rcode: dns.rcode.Rcode = dns.rcode.NOERROR, tsig_error: int = 0,
           signer: dns.tsig.Key | None = None) -> bytes:
    request = dns.message.from_wire(message.to_wire(), keyring={theirs.name: theirs})
    response = dns.message.make_response(request)
    response.set_rcode(rcode)
    if tsig_error or signer is not None:
        response.use_tsig(signer or theirs, tsig_error=tsig_error)
    return response.to_wire()  # type: ignore[no-any-return]


def test_a_signed_answer_is_verified_and_its_rcode_returned() -> None:
    ours, theirs = keys()
    message = update(ours)
    assert check_answer(answer(message, theirs), message) == 0
    message = update(ours)
    assert check_answer(answer(message, theirs, rcode=dns.rcode.REFUSED), message) == 5


def test_answers_that_must_not_be_trusted_are_refused() -> None:
    ours, theirs = keys()
    message = update(ours)
    good = answer(message, theirs)
    tampered = bytearray(good)
    tampered[3] ^= 0x05  # the rcode
    with pytest.raises(DnsError, match="signature does not verify"):
        check_answer(bytes(tampered), message)
    with pytest.raises(DnsError, match="not one to this UPDATE"):
        check_answer(good, update(ours))  # another message's id
    with pytest.raises(DnsError, match="off this clock"):
        check_answer(good, message, now=time.time() + 3600)
    unsigned = dns.message.Message(id=message.id)
    unsigned.flags = dns.flags.QR
    unsigned.set_opcode(dns.opcode.UPDATE)
    with pytest.raises(DnsError, match="not signed"):
        check_answer(unsigned.to_wire(), message)
    with pytest.raises(DnsError, match="malformed|not its TSIG"):
        check_answer(good[:-5], message)
    other_key = dns.tsig.Key("usher-update.", base64.b64encode(b"x" * 32).decode())
    with pytest.raises(DnsError, match="does not verify"):
        check_answer(answer(message, theirs, signer=other_key), message)


@pytest.mark.parametrize(("error", "says"), [(16, "BADSIG"), (17, "BADKEY"), (18, "BADTIME")])
def test_tsig_errors_say_what_to_check(error: int, says: str) -> None:
    ours, theirs = keys()
    message = update(ours)
    with pytest.raises(DnsError, match=says) as caught:
        check_answer(answer(message, theirs, rcode=dns.rcode.NOTAUTH, tsig_error=error),
                     message)
    assert caught.value.details == {"tsig_error": error}


@pytest.mark.parametrize(("rdtype", "value"), [
    ("A", "10.1.2.3"), ("AAAA", "fd00::1"), ("AAAA", "::ffff:10.1.2.3"),
    ("PTR", "web.seuss.usher.test."), ("TXT", '"heritage=usher,site=s1"'),
    ("TXT", '"a" "b c" ""'), ("TXT", '"with \\"escape\\""'), ("MX", "10 mail.usher.test."),
])
def test_record_data_match_dnspython(rdtype: str, value: str) -> None:
    theirs = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), value)
    assert encode_rdata(rdtype, value) == (int(theirs.rdtype), theirs.to_digestable())


@pytest.mark.parametrize("name", ["usher.test.", "5.0.0.10.in-addr.arpa.", "_srv._tcp.x.",
                                  "a\\.b.usher.test.", "\\065.usher.test.", "."])
def test_names_match_dnspython(name: str) -> None:
    assert encode_name(name) == dns.name.from_text(name).to_wire()


@pytest.mark.parametrize("name", ["relative.name", "a" * 64 + ".test.", "bad..test."])
def test_bad_names_and_data_are_refused(name: str) -> None:
    with pytest.raises(DnsError):
        encode_name(name)
    with pytest.raises(DnsError, match="not valid A data"):
        encode_rdata("A", "10.1.2")
    with pytest.raises(DnsError, match="TSIG algorithm"):
        TsigKey("k.", "hmac-whirlpool.", b"x")


def test_a_message_stops_fitting_before_64_kib() -> None:
    ours, _ = keys()
    message = UpdateMessage("usher.test.", ours)
    record = UpdateMessage.record("a-fairly-long-name-for-a-vm.seuss.usher.test.", "TXT",
                                  '"' + "x" * 200 + '"', 60)
    while message.fits(record):
        message.add(record)
    assert len(message.to_wire()) <= MAX_MESSAGE
    assert len(message.to_wire()) + len(record) > MAX_MESSAGE
