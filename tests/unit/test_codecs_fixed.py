"""The fixed-width codec: PIC parsing, EBCDIC text, zoned overpunch, packed and binary numbers."""

from __future__ import annotations

import codecs
import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.codecs import DecodeError, EncodeError, codec_from_config
from gateway.codecs import numeric as num
from gateway.codecs.fixed_codec import FixedWidthCodec
from gateway.codecs.pic import parse_pic
from gateway.errors import ConfigurationError


def exact(n: int, scale: int) -> Decimal:
    """n * 10**-scale without the default context's 28-digit rounding."""
    return Decimal(f"{n}E-{scale}")


def fixed(layout: list[dict[str, Any]], **opts: Any) -> FixedWidthCodec:
    codec = codec_from_config({"format": "fixed", "layout": layout, **opts})
    assert isinstance(codec, FixedWidthCodec)
    return codec


# -- PIC ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pic", "kind", "digits", "scale", "signed", "size"),
    [
        ("X(10)", "text", 10, 0, False, 10),
        ("XXX", "text", 3, 0, False, 3),
        ("A(2)X", "text", 3, 0, False, 3),
        ("9999", "zoned", 4, 0, False, 4),
        ("9(3)V9(2)", "zoned", 5, 2, False, 5),
        ("S9(5)", "zoned", 5, 0, True, 5),
        ("S9(7)V99", "zoned", 9, 2, True, 9),
        ("V99", "zoned", 2, 2, False, 2),
        ("PIC S9(5) COMP-3", "packed", 5, 0, True, 3),
        ("PIC S9(7)V99 COMP-3", "packed", 9, 2, True, 5),
        ("9(4) COMP-3", "packed", 4, 0, False, 3),
        ("pic s9(7)v99 usage is packed-decimal.", "packed", 9, 2, True, 5),
        ("S9(4) COMP", "binary", 4, 0, True, 2),
        ("9(9) BINARY", "binary", 9, 0, False, 4),
        ("S9(16)V99 COMP-4", "binary", 18, 2, True, 8),
        ("S9(5) COMP-5", "binary", 5, 0, True, 4),
    ],
)
def test_pic_forms(pic: str, kind: str, digits: int, scale: int, signed: bool, size: int) -> None:
    p = parse_pic(pic)
    assert (p.kind, p.digits, p.scale, p.signed, p.size) == (kind, digits, scale, signed, size)


@pytest.mark.parametrize(
    ("pic", "message"),
    [
        ("Z(5)9", "only X, A, 9, S and V are supported"),
        ("S9(5)P", "no P scaling"),
        ("-9(4).99", "no editing symbols"),
        ("S9(5) COMP-1", "COMP-1/COMP-2 floating point is not supported"),
        ("X(4) COMP-3", "text picture 'X(4) COMP-3' cannot have a binary or packed usage"),
        ("9(39)", "at most 38 are supported"),
        ("S9(19) COMP", "at most 18 are supported for binary"),
        ("9(0)", "invalid repeat count"),
        ("9(3) VALUE 0", "unsupported usage 'VALUE 0'"),
        ("99S", "expected X(n) text or [S]9(n)[V9(m)] numbers"),
    ],
)
def test_unsupported_pic(pic: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        parse_pic(pic)


# -- code pages ---------------------------------------------------------------------------


def test_ebcdic_text_vectors() -> None:
    assert "HELLO".encode("cp037") == bytes.fromhex("C8C5D3D3D6")
    assert "HELLO".encode("cp500") == bytes.fromhex("C8C5D3D3D6")
    # cp037 and cp500 differ in the punctuation: [ ] ! | ^
    assert "[]!".encode("cp037") == bytes.fromhex("BABB5A")
    assert "[]!".encode("cp500") == bytes.fromhex("4A5A4F")
    codec = fixed([{"name": "t", "pic": "X(5)"}], encoding="cp500", record_length=5)
    assert codec.decode(bytes.fromhex("4AC8C95A40")) == [{"t": "[HI]"}]
    assert codec.encode([{"t": "[HI]"}]) == bytes.fromhex("4AC8C95A40")


def test_cp1047_is_available_and_differs_from_cp037_where_ibm_says() -> None:
    table = {0x5F: "^", 0xAD: "[", 0xB0: "¬", 0xBA: "Ý", 0xBB: "¨", 0xBD: "]"}
    for byte, char in table.items():
        assert bytes([byte]).decode("cp1047") == char
        assert char.encode("ibm-1047") == bytes([byte])
    others = [b for b in range(256) if b not in table]
    assert bytes(others).decode("cp1047") == bytes(others).decode("cp037")
    # one-to-one, like every single-byte EBCDIC page
    assert bytes(range(256)).decode("cp1047").encode("cp1047") == bytes(range(256))
    assert codecs.lookup("IBM1047").name == "cp1047"
    assert fixed([{"name": "t", "pic": "X(3)"}], encoding="cp1047", record_length=3).decode(b"\xad\xf1\xbd") == [{"t": "[1]"}]


# -- packed decimal (COMP-3) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("pic", "value", "hex_bytes"),
    [
        ("S9(5) COMP-3", 12345, "12345C"),
        ("S9(5) COMP-3", -12345, "12345D"),
        # 9 digits + sign = 10 nibbles = 5 bytes (not "01 23 45 67 89 C", which would be 11 nibbles)
        ("S9(7)V99 COMP-3", Decimal("1234567.89"), "123456789C"),
        ("S9(7)V99 COMP-3", Decimal("-0.01"), "000000001D"),
        ("9(4) COMP-3", 1234, "01234F"),  # even digit count: a leading pad nibble
        ("S9(3) COMP-3", 0, "000C"),
        ("SV99 COMP-3", Decimal("-0.5"), "050D"),
    ],
)
def test_packed_vectors(pic: str, value: int | Decimal, hex_bytes: str) -> None:
    codec = fixed([{"name": "n", "pic": pic}], record_length=parse_pic(pic).size)
    assert codec.encode([{"n": value}]) == bytes.fromhex(hex_bytes)
    [record] = codec.decode(bytes.fromhex(hex_bytes))
    assert record["n"] == value and type(record["n"]) is type(value)


def test_packed_accepts_f_as_plus() -> None:
    assert num.decode_packed(bytes.fromhex("12345F"), digits=5, scale=0, signed=True) == 12345
    assert num.decode_packed(bytes.fromhex("12345F"), digits=5, scale=2, signed=False) == Decimal("123.45")


@pytest.mark.parametrize(
    ("hex_bytes", "pic", "message"),
    [
        ("123457", "S9(5) COMP-3", r"packed decimal has invalid sign nibble 0x7 \(expected C, D or F\) at byte 2"),
        ("1A345C", "S9(5) COMP-3", r"packed decimal has invalid digit nibble 0xA \(expected 0-9\) at byte 0"),
        ("12345D", "9(5) COMP-3", r"packed decimal has a minus sign \(D\) in an unsigned field at byte 2"),
        ("11234C", "S9(4) COMP-3", r"packed decimal has more than 4 digits \(pad nibble not 0\) at byte 0"),
    ],
)
def test_packed_errors(hex_bytes: str, pic: str, message: str) -> None:
    codec = fixed([{"name": "amount", "pic": pic}], record_length=3)
    with pytest.raises(DecodeError, match=rf"^record 0, field 'amount' \(bytes 0-2\): {message} \(PIC {re.escape(pic)}; bytes {hex_bytes[:2]}") as ei:
        codec.decode(bytes.fromhex(hex_bytes))
    assert (ei.value.record_index, ei.value.field, ei.value.offset, ei.value.length) == (0, "amount", 0, 3)


def test_error_message_like_the_spec_example() -> None:
    layout = [{"name": "id", "pic": "X(20)"}, {"name": "amount", "pic": "S9(7)V99 COMP-3"}]
    codec = fixed(layout, record_length=25)
    good = codec.encode([{"id": "A", "amount": 1}])
    payload = good * 3 + good[:24] + b"\x97"
    with pytest.raises(DecodeError) as ei:
        codec.decode(payload)
    assert str(ei.value).startswith(
        "record 3, field 'amount' (bytes 20-24): packed decimal has invalid sign nibble 0x7 (expected C, D or F)"
    )
    assert str(ei.value).endswith("(PIC S9(7)V99 COMP-3; bytes 00 00 00 10 97)")


_packed_pics = st.integers(1, 31).flatmap(
    lambda d: st.tuples(st.just(d), st.integers(0, d), st.booleans())
)


@settings(max_examples=300, deadline=None)
@given(pic=_packed_pics, data=st.data())
def test_packed_round_trip(pic: tuple[int, int, bool], data: st.DataObject) -> None:
    digits, scale, signed = pic
    limit = 10**digits - 1
    n = data.draw(st.integers(-limit if signed else 0, limit))
    raw = num.encode_packed(n, digits=digits, signed=signed)
    assert len(raw) == digits // 2 + 1
    value = num.decode_packed(raw, digits=digits, scale=scale, signed=signed)
    assert value == (n if scale == 0 else exact(n, scale))
    assert num.to_scaled_int(value, digits=digits, scale=scale, signed=signed) == n


# -- zoned decimal with overpunch -----------------------------------------------------------


@pytest.mark.parametrize(
    ("hex_bytes", "signed", "value"),
    [
        ("F1F2C3", True, 123),
        ("F1F2D3", True, -123),
        ("F1F2F3", True, 123),
        ("F1F2F3", False, 123),
        ("F0F0D0", True, 0),  # minus zero reads as 0
    ],
)
def test_ebcdic_zoned_vectors(hex_bytes: str, signed: bool, value: int) -> None:
    assert num.decode_zoned(bytes.fromhex(hex_bytes), scale=0, signed=signed, ebcdic=True) == value


def test_zoned_encode_vectors() -> None:
    assert num.encode_zoned(123, digits=3, signed=True, ebcdic=True) == bytes.fromhex("F1F2C3")
    assert num.encode_zoned(-123, digits=3, signed=True, ebcdic=True) == bytes.fromhex("F1F2D3")
    assert num.encode_zoned(123, digits=5, signed=False, ebcdic=True) == bytes.fromhex("F0F0F1F2F3")
    assert num.encode_zoned(123, digits=3, signed=True, ebcdic=False) == b"12C"
    assert num.encode_zoned(-120, digits=3, signed=True, ebcdic=False) == b"12}"
    assert num.encode_zoned(120, digits=4, signed=True, ebcdic=False) == b"012{"
    assert num.encode_zoned(-9, digits=2, signed=True, ebcdic=False) == b"0R"
    assert num.encode_zoned(7, digits=2, signed=False, ebcdic=False) == b"07"


@pytest.mark.parametrize(
    ("text", "value"),
    [("12C", 123), ("12L", -123), ("12{", 120), ("12}", -120), ("123", 123), ("00A", 1), ("00J", -1), ("99I", 999), ("99R", -999)],
)
def test_ascii_overpunch_vectors(text: str, value: int) -> None:
    assert num.decode_zoned(text.encode("ascii"), scale=0, signed=True, ebcdic=False) == value


def test_overpunch_characters_are_the_ebcdic_sign_zones() -> None:
    # {ABCDEFGHI are C0-C9 and }JKLMNOPQR D0-D9 in EBCDIC: the same sign, read as text.
    assert "{ABCDEFGHI".encode("cp037") == bytes(range(0xC0, 0xCA))
    assert "}JKLMNOPQR".encode("cp037") == bytes(range(0xD0, 0xDA))


@pytest.mark.parametrize(
    ("raw", "signed", "ebcdic", "message"),
    [
        ("F1C2F3", True, True, r"invalid zoned digit 0xC2 \(expected F0-F9\) at byte 1"),
        ("F1F2B3", True, True, r"invalid sign zone 0xB in 0xB3 \(expected C, D or F\) at byte 2"),
        ("F1F2FA", True, True, r"invalid zoned digit 0xFA \(expected a digit nibble 0-9\) at byte 2"),
        ("F1F2D3", False, True, r"negative sign \(zone D\) in an unsigned field at byte 2"),
        ("313A33", True, False, r"invalid zoned digit 0x3A \(expected ASCII 0-9\) at byte 1"),
        ("31324C", False, False, r"invalid last zoned byte 0x4C \(expected ASCII 0-9\) at byte 2"),
        ("31325A", True, False, r"invalid last zoned byte 0x5A \(expected 0-9, \{, A-I, \} or J-R\) at byte 2"),
    ],
)
def test_zoned_errors(raw: str, signed: bool, ebcdic: bool, message: str) -> None:
    pic = "S9(3)" if signed else "9(3)"
    codec = fixed([{"name": "qty", "pic": pic}], record_length=3, encoding="cp037" if ebcdic else "ascii")
    with pytest.raises(DecodeError, match=rf"^record 0, field 'qty' \(bytes 0-2\): {message} \(PIC {re_escape(pic)}; bytes {' '.join([raw[:2], raw[2:4], raw[4:]])}\)$"):
        codec.decode(bytes.fromhex(raw))


def re_escape(text: str) -> str:
    return text.replace("(", r"\(").replace(")", r"\)")


@settings(max_examples=300, deadline=None)
@given(digits=st.integers(1, 38), data=st.data(), signed=st.booleans(), ebcdic=st.booleans())
def test_zoned_round_trip(digits: int, data: st.DataObject, signed: bool, ebcdic: bool) -> None:
    scale = data.draw(st.integers(0, digits))
    limit = 10**digits - 1
    n = data.draw(st.integers(-limit if signed else 0, limit))
    raw = num.encode_zoned(n, digits=digits, signed=signed, ebcdic=ebcdic)
    assert len(raw) == digits
    if ebcdic:
        assert all(b >> 4 == 0xF for b in raw[:-1]) and raw[-1] >> 4 == ((0xD if n < 0 else 0xC) if signed else 0xF)
    else:
        assert all(0x30 <= b <= 0x39 for b in raw[:-1])
    value = num.decode_zoned(raw, scale=scale, signed=signed, ebcdic=ebcdic)
    assert value == (n if scale == 0 else exact(n, scale))


# -- binary ------------------------------------------------------------------------------


def test_binary_vectors() -> None:
    codec = fixed(
        [{"name": "a", "pic": "S9(4) COMP"}, {"name": "b", "pic": "9(9) BINARY"}, {"name": "c", "pic": "S9(16)V99 COMP-4"}],
        record_length=14,
    )
    payload = codec.encode([{"a": -2, "b": 305419896, "c": Decimal("-1.00")}])
    assert payload == bytes.fromhex("FFFE" "12345678" "FFFFFFFFFFFFFF9C")
    assert codec.decode(payload) == [{"a": -2, "b": 305419896, "c": Decimal("-1.00")}]
    with pytest.raises(EncodeError, match=r"record 0, field 'a' \(bytes 0-1\): 10000 is out of range for S9\(4\) \(at most 9999\)"):
        codec.encode([{"a": 10000, "b": 0, "c": 0}])


# -- records -----------------------------------------------------------------------------

ORDER = [
    {"name": "id", "pic": "9(6)"},
    {"name": "customer", "pic": "X(12)"},
    {"name": "amount", "pic": "S9(7)V99 COMP-3"},
    {"name": "FILLER", "offset": 23, "length": 3},
    {"name": "qty", "offset": 26, "pic": "S9(3)V9"},
]


def test_consecutive_records_in_ebcdic() -> None:
    codec = fixed(ORDER, record_length=30)
    records = [
        {"id": 1, "customer": "HELLO", "amount": Decimal("1234567.89"), "qty": Decimal("-1.5")},
        {"id": 42, "customer": "MÜLLER & CO", "amount": Decimal("-0.01"), "qty": Decimal("0.0")},
        {"id": 999999, "customer": "", "amount": Decimal("0.00"), "qty": Decimal("999.9")},
    ]
    payload = codec.encode(records)
    assert len(payload) == 90
    first = payload[:30]
    assert first[:6] == bytes.fromhex("F0F0F0F0F0F1")
    assert first[6:18] == bytes.fromhex("C8C5D3D3D6") + b"\x40" * 7
    assert first[18:23] == bytes.fromhex("123456789C")
    assert first[23:26] == b"\x40\x40\x40"  # FILLER as EBCDIC spaces
    assert first[26:30] == bytes.fromhex("F0F0F1D5")
    assert codec.decode(payload) == records


def test_line_separated_records() -> None:
    layout = [{"name": "id", "pic": "9(3)"}, {"name": "name", "pic": "X(5)"}, {"name": "amt", "pic": "S9(3)V99"}]
    lines = ["001ALICE1234E", "002BOB  0000{", "", "003EVE  9999R"]
    for sep in ("\n", "\r\n"):
        codec = fixed(layout, encoding="latin-1", record_separator=sep)
        payload = (sep.join(lines) + sep).encode("latin-1")
        assert codec.decode(payload) == [
            {"id": 1, "name": "ALICE", "amt": Decimal("123.45")},
            {"id": 2, "name": "BOB", "amt": Decimal("0.00")},
            {"id": 3, "name": "EVE", "amt": Decimal("-999.99")},
        ]
        assert codec.encode(codec.decode(payload)) == payload.replace(sep.encode() * 2, sep.encode())


def test_line_separated_short_line_names_record_and_line() -> None:
    codec = fixed([{"name": "id", "pic": "9(3)"}, {"name": "name", "pic": "X(5)"}], encoding="ascii", record_separator="\n")
    payload = b"001ALICE\n002BO\n003EVE  \n"
    with pytest.raises(DecodeError, match=r"^record 1 \(line 2\): record is 5 bytes, expected at least 8, the layout's length$"):
        codec.decode(payload)
    result = codec.decode_all(payload)
    assert result.records == [{"id": 1, "name": "ALICE"}, {"id": 3, "name": "EVE"}]
    # longer lines are fine: bytes past the layout are ignored
    assert codec.decode(b"001ALICE and more\n") == [{"id": 1, "name": "ALICE"}]


def test_record_length_with_separator() -> None:
    layout = [{"name": "n", "pic": "S9(3) COMP-3"}, {"name": "t", "pic": "X(2)"}]
    codec = fixed(layout, encoding="cp037", record_length=4, record_separator="\n")
    records = [{"n": 10, "t": "AB"}, {"n": -25, "t": "C"}]  # 0x025 would be a cp037 newline, framing must not care
    payload = codec.encode(records)
    assert payload == bytes.fromhex("010C" "C1C2" "25" "025D" "C340" "25")
    assert codec.decode(payload) == records
    assert codec.decode(payload[:-1]) == records  # no separator after the last record
    with pytest.raises(DecodeError, match=r"^record 0, byte 4: expected the record separator after 4 bytes, found C1$"):
        codec.decode(payload[:4] + b"\xc1" + payload[5:])


def test_short_last_record_names_record_and_expected_length() -> None:
    codec = fixed(ORDER, record_length=30)
    payload = codec.encode([{"id": 1, "customer": "A", "amount": 1, "qty": 1}]) * 2
    with pytest.raises(DecodeError, match=r"^record 1: record is 29 bytes, expected record_length 30$") as ei:
        codec.decode(payload[:-1])
    assert ei.value.record_index == 1
    assert len(fixed(ORDER, record_length=30, on_record_error="skip").decode(payload[:-1])) == 1


def test_skip_mode_collects_bad_records() -> None:
    codec = fixed(ORDER, record_length=30, on_record_error="skip")
    good = codec.encode([{"id": 1, "customer": "A", "amount": 1, "qty": 1}])
    bad = good[:26] + bytes.fromhex("F0F0F1B5")
    result = codec.decode_all(good + bad + good)
    assert len(result.records) == 2
    [err] = result.errors
    assert (err.record_index, err.field, err.offset, err.length) == (1, "qty", 26, 4)
    assert str(err) == (
        "record 1, field 'qty' (bytes 26-29): invalid sign zone 0xB in 0xB5 (expected C, D or F) at byte 29 "
        "(PIC S9(3)V9; bytes F0 F0 F1 B5)"
    )


def test_messages_quote_at_most_16_bytes() -> None:
    codec = fixed([{"name": "big", "pic": "9(38)"}], encoding="ascii", record_length=38)
    secret = b"1234567890123456789012345678901234567X"
    with pytest.raises(DecodeError) as ei:
        codec.decode(secret)
    message = str(ei.value)
    assert "bytes 31 32 33 34 35 36 37 38 39 30 31 32 33 34 35 36 ..." in message
    assert secret.decode()[:20] not in message and secret.hex().upper()[:40] not in message.replace(" ", "")


def test_text_fields() -> None:
    layout = [{"name": "a", "offset": 0, "length": 4}, {"name": "b", "pic": "X(4)"}]
    assert fixed(layout, encoding="cp037", record_length=8).decode("AB  C   ".encode("cp037")) == [{"a": "AB", "b": "C"}]
    assert fixed(layout, encoding="cp037", record_length=8, trim=False).decode("AB  C   ".encode("cp037")) == [{"a": "AB  ", "b": "C   "}]
    with pytest.raises(DecodeError, match=r"^record 0, field 'b' \(bytes 4-7\): byte 0xE9 is not valid ascii at byte 5 \(PIC X\(4\); bytes 43 E9 20 20\)$"):
        fixed(layout, encoding="ascii", record_length=8).decode(b"AB  C\xe9  ")


def test_blank_numeric_fields() -> None:
    layout = [{"name": "n", "pic": "S9(3)V99"}, {"name": "p", "pic": "S9(3) COMP-3"}]
    payload = b"\x40" * 5 + b"\x00\x00"
    with pytest.raises(DecodeError, match=r"field 'n' \(bytes 0-4\): blank numeric field \(only spaces or 0x00; see blank_numeric\)"):
        fixed(layout, record_length=7).decode(payload)
    assert fixed(layout, record_length=7, blank_numeric="null").decode(payload) == [{"n": None, "p": None}]
    [zero] = fixed(layout, record_length=7, blank_numeric="zero").decode(payload)
    assert zero == {"n": Decimal("0.00"), "p": 0} and str(zero["n"]) == "0.00"
    codec = fixed(layout, record_length=7, blank_numeric="null")
    assert codec.encode([{"n": None}]) == b"\x40" * 7
    with pytest.raises(EncodeError, match=r"field 'n' \(bytes 0-4\): no value for a numeric field"):
        fixed(layout, record_length=7).encode([{"n": None, "p": 1}])


def test_encode_numbers_from_text_and_floats() -> None:
    codec = fixed([{"name": "a", "pic": "S9(5)V99 COMP-3"}, {"name": "s", "pic": "9V9999"}], record_length=9)
    [back] = codec.decode(codec.encode([{"a": " -12.5 ", "s": 0.1234}]))
    assert back == {"a": Decimal("-12.50"), "s": Decimal("0.1234")}


def test_encode_errors() -> None:
    codec = fixed(ORDER, record_length=30)
    base = {"id": 1, "customer": "A", "amount": 1, "qty": 1}
    cases = [
        ({"nope": 1}, r"record 1, field 'nope': not in the layout"),
        ({"id": -1}, r"field 'id' \(bytes 0-5\): -1 is negative but the picture is unsigned"),
        ({"id": 1234567}, r"field 'id' \(bytes 0-5\): 1234567 is out of range for 9\(6\) \(at most 999999\)"),
        ({"amount": Decimal("0.001")}, r"field 'amount' \(bytes 18-22\): 0.001 has more than 2 decimal places"),
        ({"amount": "ten"}, r"field 'amount' \(bytes 18-22\): expected a number, got text 'ten'"),
        ({"amount": True}, r"field 'amount' \(bytes 18-22\): expected a number, got bool"),
        ({"customer": "X" * 13}, r"field 'customer' \(bytes 6-17\): text is 13 bytes, PIC X\(12\) holds 12"),
        ({"customer": "12 €"}, r"field 'customer' \(bytes 6-17\): character U\+20AC at position 3 cannot be encoded in cp037"),
        ({"customer": ["a"]}, r"field 'customer' \(bytes 6-17\): a list value cannot be written as text"),
    ]
    for change, message in cases:
        with pytest.raises(EncodeError, match=message):
            codec.encode([base, {**base, **change}])


def test_rounding_on_encode() -> None:
    layout = [{"name": "a", "pic": "S9(3)V99 COMP-3"}]
    up = fixed(layout, record_length=3, rounding="half-up")
    even = fixed(layout, record_length=3, rounding="half-even")
    assert up.decode(up.encode([{"a": Decimal("1.005")}])) == [{"a": Decimal("1.01")}]
    assert even.decode(even.encode([{"a": Decimal("1.005")}])) == [{"a": Decimal("1.00")}]
    assert up.decode(up.encode([{"a": Decimal("-1.005")}])) == [{"a": Decimal("-1.01")}]


def test_layout_follows_on_when_offset_is_omitted() -> None:
    codec = fixed([{"name": "a", "pic": "X(2)"}, {"name": "b", "offset": 5, "pic": "9(2)"}, {"name": "c", "pic": "X"}], encoding="ascii", record_length=8)
    assert codec.decode(b"ab   12c") == [{"a": "ab", "b": 12, "c": "c"}]


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"layout": [{"name": "a", "pic": "X(4)"}, {"name": "b", "offset": 2, "pic": "X(4)"}], "record_length": 8},
         r"layout fields 'a' \(bytes 0-3\) and 'b' \(bytes 2-5\) overlap"),
        ({"layout": [{"name": "a", "pic": "X(4)"}, {"name": "b", "pic": "S9(7)V99 COMP-3"}], "record_length": 8},
         r"layout field 'b' \(bytes 4-8\) ends beyond record_length 8"),
        ({"layout": [{"name": "amount", "pic": "S9(5)P"}], "record_length": 8}, r"layout\[0\] 'amount': unsupported picture 'S9\(5\)P'"),
        ({"layout": [{"name": "a", "pic": "S9(7)V99 COMP-3", "length": 4}], "record_length": 8},
         r"layout\[0\] 'a': length 4 does not match PIC S9\(7\)V99 COMP-3 \(5 bytes\)"),
        ({"layout": [{"name": "a"}], "record_length": 8}, r"layout\[0\] 'a': give a pic or a length"),
        ({"layout": [{"name": "a", "pic": "X"}, {"name": "a", "pic": "X"}], "record_length": 8}, r"layout\[1\] 'a': the name is used twice"),
        ({"layout": [{"name": "a", "pic": "X"}]}, r"set record_length .* or record_separator"),
        ({"layout": [{"name": "a", "pic": "S9(3) COMP-3"}], "record_separator": "\n"}, r"packed and binary fields need record_length"),
        ({"layout": [{"name": "a", "pic": "9(3)"}], "record_length": 8, "encoding": "utf-16"}, r"zoned numbers need an ASCII- or EBCDIC-based encoding"),
        ({"layout": [{"name": "a", "pic": "X"}], "record_length": 8, "encoding": "cp9999"}, r"unknown text encoding 'cp9999'"),
        ({"layout": [], "record_length": 8}, r"layout: List should have at least 1 item"),
        ({"layout": [{"name": "a", "pic": "X", "width": 3}], "record_length": 8}, r"layout.0.width: Extra inputs are not permitted"),
    ],
)
def test_layout_is_validated_at_config_time(opts: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        codec_from_config({"format": "fixed", **opts})


def test_filler_may_repeat_and_is_not_decoded() -> None:
    layout = [{"name": "FILLER", "length": 2}, {"name": "a", "pic": "X"}, {"name": "filler", "length": 1}]
    codec = fixed(layout, encoding="ascii", record_length=4)
    assert codec.decode(b"zzaz") == [{"a": "a"}]
    assert codec.encode([{"a": "a"}]) == b"  a "
    with pytest.raises(EncodeError, match="field 'FILLER': not in the layout"):
        codec.encode([{"FILLER": "x"}])


# -- whole records, both ways -------------------------------------------------------------

_cp037_text = st.text(
    alphabet=st.sampled_from([c for c in bytes(range(0x40, 0x100)).decode("cp037") if c.isprintable() and c != " "]),
    max_size=8,
)
RECORD_LAYOUT = [
    {"name": "id", "pic": "9(8)"},
    {"name": "name", "pic": "X(8)"},
    {"name": "balance", "pic": "S9(9)V99 COMP-3"},
    {"name": "qty", "pic": "S9(4)"},
    {"name": "rate", "pic": "9V9(4)"},
    {"name": "count", "pic": "S9(9) COMP"},
    {"name": "FILLER", "length": 3},
]


def _dec(digits: int, scale: int, signed: bool) -> st.SearchStrategy[Decimal]:
    limit = 10**digits - 1
    return st.integers(-limit if signed else 0, limit).map(lambda n: exact(n, scale))


_order_records = st.fixed_dictionaries(
    {
        "id": st.integers(0, 10**8 - 1),
        "name": _cp037_text,
        "balance": _dec(11, 2, True),
        "qty": st.integers(-9999, 9999),
        "rate": _dec(5, 4, False),
        "count": st.integers(-(10**9) + 1, 10**9 - 1),
    }
)


@settings(max_examples=150, deadline=None)
@given(records=st.lists(_order_records, max_size=5), encoding=st.sampled_from(["cp037", "cp500", "cp1047"]), separator=st.booleans())
def test_whole_records_round_trip(records: list[dict[str, Any]], encoding: str, separator: bool) -> None:
    framing: dict[str, Any] = {"record_length": 38}
    if separator:
        framing["record_separator"] = "\r\n"
    codec = fixed(RECORD_LAYOUT, encoding=encoding, **framing)
    payload = codec.encode(records)
    assert len(payload) == len(records) * (40 if separator else 38)
    assert codec.decode(payload) == records


@settings(max_examples=100, deadline=None)
@given(
    records=st.lists(
        st.fixed_dictionaries({"id": st.integers(0, 999), "name": st.text(st.sampled_from("ABCxyz019 .-"), max_size=5).map(str.rstrip), "amt": _dec(5, 2, True)}),
        max_size=5,
    ),
)
def test_ascii_line_records_round_trip(records: list[dict[str, Any]]) -> None:
    layout = [{"name": "id", "pic": "9(3)"}, {"name": "name", "pic": "X(5)"}, {"name": "amt", "pic": "S9(3)V99"}]
    codec = fixed(layout, encoding="ascii", record_separator="\n")
    assert codec.decode(codec.encode(records)) == records
