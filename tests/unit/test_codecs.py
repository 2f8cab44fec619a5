"""Codecs for legacy record formats: the API, discovery, JSON, XML (hardened) and CSV.

The fixed-width codec has its own module, tests/unit/test_codecs_fixed.py.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from importlib.metadata import EntryPoint
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.codecs import (
    CODEC_GROUP,
    Codec,
    CodecConfig,
    CodecError,
    DecodeError,
    DecodeResult,
    EncodeError,
    codec_from_config,
    codec_names,
    load_codec,
    registry,
)
from gateway.codecs.csv_codec import CsvCodec, CsvCodecConfig
from gateway.codecs.errors import hex_excerpt
from gateway.codecs.fixed_codec import FixedWidthCodec
from gateway.codecs.json_codec import JsonCodec
from gateway.codecs.xml_codec import XmlCodec
from gateway.errors import ConfigurationError, GatewayError, PermanentError
from tests.plugins import install_fake_plugins

MARKER = "PAYLOAD-MARKER-b81e"

# -- errors ------------------------------------------------------------------------------


def test_codec_errors_are_permanent() -> None:
    assert issubclass(CodecError, PermanentError) and issubclass(CodecError, GatewayError)
    assert issubclass(DecodeError, CodecError) and issubclass(EncodeError, CodecError)
    assert not issubclass(DecodeError, EncodeError)


def test_error_message_names_record_field_and_bytes() -> None:
    err = DecodeError(
        "packed decimal has invalid sign nibble 0x7 (expected C, D or F)",
        record_index=3, field="amount", offset=20, length=5,
    )
    assert str(err) == (
        "record 3, field 'amount' (bytes 20-24): packed decimal has invalid sign nibble 0x7 (expected C, D or F)"
    )
    assert (err.record_index, err.field, err.offset, err.length) == (3, "amount", 20, 5)
    assert str(DecodeError("bad", offset=7)) == "byte 7: bad"
    assert str(DecodeError("bad", record_index=0, line=4)) == "record 0 (line 4): bad"
    assert str(DecodeError("bad")) == "bad"


def test_error_survives_pickling_with_its_location() -> None:
    err = pickle.loads(pickle.dumps(DecodeError("x", record_index=2, field="f", offset=1, length=3, line=9)))
    assert isinstance(err, DecodeError)
    assert (err.record_index, err.field, err.offset, err.length, err.line, err.reason) == (2, "f", 1, 3, 9, "x")
    assert str(err) == "record 2 (line 9), field 'f' (bytes 1-3): x"


def test_hex_excerpt_shows_at_most_16_bytes() -> None:
    assert hex_excerpt(b"\x12\x34\x5c") == "12 34 5C"
    shown = hex_excerpt(bytes(range(40)))
    assert shown.endswith(" ...") and len(shown.split()) == 17  # 16 bytes and the marker


# -- discovery ---------------------------------------------------------------------------


class UpperConfig(CodecConfig):
    format: Literal["upper"] = "upper"


class UpperCodec(Codec):
    """A third-party codec: one record per line, {"line": TEXT} upper-cased."""

    name = "upper"
    config_model = UpperConfig

    def iter_decode(self, payload: bytes, *, content_type: str | None = None) -> Iterator[dict[str, Any] | DecodeError]:
        for i, line in enumerate(payload.decode().splitlines()):
            yield {"line": line.upper()} if line != "bad" else DecodeError("bad line", record_index=i)

    def encode(self, records: Sequence[Mapping[str, Any]]) -> bytes:
        return "".join(f"{r['line']}\n" for r in records).encode()


class NotACodec:
    pass


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    fakes = [
        EntryPoint("upper", f"{__name__}:UpperCodec", CODEC_GROUP),
        EntryPoint("broken", "tests.unit.no_such_codec_module:Codec", CODEC_GROUP),
        EntryPoint("notacodec", f"{__name__}:NotACodec", CODEC_GROUP),
    ]
    hijackers = [
        EntryPoint("json", f"{__name__}:UpperCodec", CODEC_GROUP),  # may not hijack a built-in
    ]
    yield from install_fake_plugins(monkeypatch, CODEC_GROUP, fakes, hijackers, registry._clear_cache)


def test_builtins_are_registered_by_entry_points() -> None:
    registry._clear_cache()
    assert {"json", "xml", "csv", "fixed"} <= set(codec_names())
    expected = {"json": JsonCodec, "xml": XmlCodec, "csv": CsvCodec, "fixed": FixedWidthCodec}
    for name, cls in expected.items():
        assert load_codec(name) is cls and cls.name == name


def test_unknown_format_lists_the_available_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown codec format 'cobol'; available: .*csv, fixed, json, xml"):
        codec_from_config({"format": "cobol"})
    with pytest.raises(ConfigurationError, match="need a 'format'; available: .*json"):
        codec_from_config({"delimiter": ";"})


def test_invalid_settings_name_the_path() -> None:
    with pytest.raises(ConfigurationError, match=r"codec 'csv' settings are invalid: delimiter: .*at most 1 character"):
        codec_from_config({"format": "csv", "delimiter": ";;"})
    with pytest.raises(ConfigurationError, match=r"separator: Extra inputs are not permitted"):
        codec_from_config({"format": "csv", "separator": ";"})


def test_codec_from_config_accepts_a_validated_model() -> None:
    codec = codec_from_config(CsvCodecConfig(delimiter=";"))
    assert isinstance(codec, CsvCodec) and codec.decode(b"a;b\n1;2\n") == [{"a": "1", "b": "2"}]


def test_a_codec_refuses_another_codecs_config() -> None:
    with pytest.raises(ConfigurationError, match="needs a JsonCodecConfig, got CsvCodecConfig"):
        JsonCodec(CsvCodecConfig())


def test_plugin_codec_is_discovered_and_used(plugins: None) -> None:
    assert "upper" in codec_names()
    codec = codec_from_config({"format": "upper"})
    assert isinstance(codec, UpperCodec)
    assert codec.decode(b"a\nb\n") == [{"line": "A"}, {"line": "B"}]


def test_broken_plugin_warns_and_is_skipped(plugins: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.codecs.registry")
    with pytest.raises(ConfigurationError, match=r"plugin failed to load \(ModuleNotFoundError\) 'broken'; available: .*upper"):
        codec_from_config({"format": "broken"})
    assert "codec plugin 'broken'" in caplog.text and "skipped" in caplog.text
    assert "broken" not in codec_names()
    with pytest.raises(ConfigurationError, match="not a Codec subclass 'notacodec'"):
        load_codec("notacodec")
    assert "notacodec" not in codec_names()
    # The other codecs still work.
    assert codec_from_config({"format": "upper"}).decode(b"x") == [{"line": "X"}]


def test_a_plugin_cannot_take_a_builtin_name(plugins: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.codecs.registry")
    assert load_codec("json") is JsonCodec
    assert "registered twice" in caplog.text


# -- fail or skip ------------------------------------------------------------------------


def test_decode_fails_on_first_bad_record_by_default() -> None:
    codec = UpperCodec(UpperConfig())
    with pytest.raises(DecodeError, match="record 1: bad line") as ei:
        codec.decode(b"a\nbad\nc\nbad\n")
    assert ei.value.record_index == 1


def test_skip_mode_returns_good_records_and_logs_the_bad(caplog: pytest.LogCaptureFixture) -> None:
    codec = UpperCodec(UpperConfig(on_record_error="skip"))
    caplog.set_level(logging.WARNING, logger="gateway.codecs.base")
    assert codec.decode(b"a\nbad\nc\nbad\n") == [{"line": "A"}, {"line": "C"}]
    assert "skipped 2 of 4 records" in caplog.text
    result = codec.decode_all(b"a\nbad\nc\nbad\n")
    assert isinstance(result, DecodeResult)
    assert result.records == [{"line": "A"}, {"line": "C"}]
    assert [e.record_index for e in result.errors] == [1, 3]


def test_decode_all_reports_errors_in_fail_mode_too() -> None:
    result = UpperCodec(UpperConfig()).decode_all(b"bad\nok\n")
    assert result.records == [{"line": "OK"}] and [e.record_index for e in result.errors] == [0]


# -- json --------------------------------------------------------------------------------


def json_codec(**opts: Any) -> JsonCodec:
    codec = codec_from_config({"format": "json", **opts})
    assert isinstance(codec, JsonCodec)
    return codec


def test_json_object_is_one_record_and_array_is_records() -> None:
    assert json_codec().decode(b'{"id": 1, "name": "A"}') == [{"id": 1, "name": "A"}]
    assert json_codec().decode(b'[{"id": 1}, {"id": 2}]') == [{"id": 1}, {"id": 2}]
    assert json_codec().decode(b"[]") == []


def test_json_records_path() -> None:
    codec = json_codec(records_path="data.orders")
    assert codec.decode(b'{"data": {"orders": [{"id": 1}, {"id": 2}]}, "meta": 1}') == [{"id": 1}, {"id": 2}]
    assert codec.decode(b'{"data": {"orders": {"id": 3}}}') == [{"id": 3}]
    with pytest.raises(DecodeError, match=r"records_path 'data.orders': no object key 'data.orders' \(no such key\)"):
        codec.decode(b'{"data": {"order": []}}')
    with pytest.raises(DecodeError, match=r"no object key 'data' \(found array\)"):
        codec.decode(b"[1]")


def test_json_rejects_non_object_records() -> None:
    with pytest.raises(DecodeError, match="record 1: expected a JSON object, got array") as ei:
        json_codec().decode(b'[{"a": 1}, [1, 2], "x"]')
    assert ei.value.record_index == 1
    result = json_codec().decode_all(b'[{"a": 1}, [1, 2], "x"]')
    assert result.records == [{"a": 1}]
    assert [str(e) for e in result.errors] == [
        "record 1: expected a JSON object, got array",
        "record 2: expected a JSON object, got string",
    ]
    with pytest.raises(DecodeError, match="expected a JSON object or an array of objects, got number"):
        json_codec().decode(b"42")


def test_invalid_json_names_the_position_not_the_payload() -> None:
    with pytest.raises(DecodeError) as ei:
        json_codec().decode(f'{{"secret": "{MARKER}",}}'.encode())
    err = ei.value
    assert str(err).startswith("byte ") and "invalid JSON: trailing comma is not allowed (line 1, column" in str(err)
    assert MARKER not in str(err) + repr(err)
    # The native error carries the whole document: it must not travel along.
    assert err.__cause__ is None and err.__context__ is None


def test_json_lines_with_a_bad_line_in_skip_mode() -> None:
    payload = b'{"id": 1}\n\n{"id": 2, oops}\n[3]\r\n{"id": 4}\n'
    result = json_codec(lines=True, on_record_error="skip").decode_all(payload)
    assert result.records == [{"id": 1}, {"id": 4}]
    assert [(e.record_index, e.line) for e in result.errors] == [(1, 3), (2, 4)]
    assert str(result.errors[0]).startswith("record 1 (line 3): invalid JSON: ")
    assert str(result.errors[1]) == "record 2 (line 4): expected a JSON object, got array"
    assert json_codec(lines=True, on_record_error="skip").decode(payload) == [{"id": 1}, {"id": 4}]
    with pytest.raises(DecodeError, match=r"record 1 \(line 3\)"):
        json_codec(lines=True).decode(payload)


def test_json_decimals_are_exact_on_request() -> None:
    payload = b'{"amount": 0.1000000000000000055511151231257827, "n": 2}'
    assert json_codec(decimals=True).decode(payload) == [{"amount": Decimal("0.1000000000000000055511151231257827"), "n": 2}]
    assert json_codec().decode(payload) == [{"amount": 0.1, "n": 2}]


def test_json_encoding_and_content_type_charset() -> None:
    data = '{"name": "Müller"}'.encode("cp1252")
    assert json_codec(encoding="cp1252").decode(data) == [{"name": "Müller"}]
    assert json_codec().decode(data, content_type="application/json; charset=cp1252") == [{"name": "Müller"}]
    with pytest.raises(DecodeError, match=r"byte 11: payload is not valid utf-8: byte 0xFC cannot be decoded"):
        json_codec(decimals=True).decode(data)
    with pytest.raises(DecodeError, match="unknown charset 'klingon'"):
        json_codec().decode(b"{}", content_type="application/json; charset=klingon")


def test_json_encode() -> None:
    records = [{"id": 1, "amount": Decimal("12.50"), "name": "Ä"}, {"id": 2, "amount": None, "name": ""}]
    assert json_codec().encode(records) == b'[{"id":1,"amount":"12.50","name":"\xc3\x84"},{"id":2,"amount":null,"name":""}]'
    assert json_codec(lines=True).encode(records).count(b"\n") == 2
    assert json_codec(records_path="data.orders").encode(records[:1]).startswith(b'{"data":{"orders":[{"id":1')
    assert json_codec(single_object=True).encode(records[:1]) == b'{"id":1,"amount":"12.50","name":"\xc3\x84"}'
    assert json_codec(encoding="cp1252").encode([{"n": "Ä"}]) == '[{"n":"Ä"}]'.encode("cp1252")
    for opts in ({}, {"lines": True}, {"records_path": "a.b"}):
        codec = json_codec(**opts)
        assert codec.decode(codec.encode(records)) == [{**r, "amount": None if r["amount"] is None else str(r["amount"])} for r in records]


def test_json_encode_errors() -> None:
    with pytest.raises(EncodeError, match="record 1: expected a mapping, got list"):
        json_codec().encode([{"a": 1}, [1]])  # type: ignore[list-item]
    with pytest.raises(EncodeError, match="record 0, field 'when': cannot convert object to JSON"):
        json_codec().encode([{"when": object()}])
    with pytest.raises(EncodeError, match=r"U\+20AC cannot be encoded in latin-1"):
        json_codec(encoding="latin-1").encode([{"p": "€"}])


def test_json_config_errors() -> None:
    with pytest.raises(ConfigurationError, match="records_path cannot be combined with lines"):
        json_codec(lines=True, records_path="a")
    with pytest.raises(ConfigurationError, match="records_path 'a..b' must be dot-separated"):
        json_codec(records_path="a..b")
    with pytest.raises(ConfigurationError, match="unknown text encoding 'utf-9'"):
        json_codec(encoding="utf-9")


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=20))
_records = st.lists(st.dictionaries(st.text(min_size=1, max_size=8), _scalars, max_size=5), max_size=5)


@settings(max_examples=60, deadline=None)
@given(records=_records, lines=st.booleans())
def test_json_round_trip(records: list[dict[str, Any]], lines: bool) -> None:
    codec = json_codec(lines=lines)
    assert codec.decode(codec.encode(records)) == records


# -- xml ---------------------------------------------------------------------------------


def xml_codec(**opts: Any) -> XmlCodec:
    codec = codec_from_config({"format": "xml", "record_path": "Orders/Order", **opts})
    assert isinstance(codec, XmlCodec)
    return codec


def _laughs() -> bytes:
    ents = ['<!ENTITY lol0 "lol">'] + [f'<!ENTITY lol{i} "{("&lol%d;" % (i - 1)) * 10}">' for i in range(1, 10)]
    return f'<?xml version="1.0"?><!DOCTYPE Orders [{"".join(ents)}]><Orders><Order><a>{MARKER}&lol9;</a></Order></Orders>'.encode()


XML_ATTACKS = {
    "billion-laughs": _laughs,
    "xxe-file": lambda: (
        '<?xml version="1.0"?><!DOCTYPE Orders [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        f"<Orders><Order><a>{MARKER}&xxe;</a></Order></Orders>"
    ).encode(),
    "xxe-http": lambda: (
        '<?xml version="1.0"?><!DOCTYPE Orders [<!ENTITY xxe SYSTEM "http://127.0.0.1:9/x">]>'
        f"<Orders><Order><a>{MARKER}&xxe;</a></Order></Orders>"
    ).encode(),
    "external-dtd": lambda: (
        f'<!DOCTYPE Orders SYSTEM "http://127.0.0.1:9/evil.dtd"><Orders><Order><a>{MARKER}</a></Order></Orders>'
    ).encode(),
    "xxe-utf16": lambda: (
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE Orders [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        f"<Orders><Order><a>{MARKER}&xxe;</a></Order></Orders>"
    ).encode("utf-16"),
    "xxe-utf32": lambda: (  # not caught by the byte pre-scan: refused after parsing
        '<?xml version="1.0" encoding="UTF-32"?><!DOCTYPE Orders [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        f"<Orders><Order><a>{MARKER}&xxe;</a></Order></Orders>"
    ).encode("utf-32"),
    "deep-nesting-100k": lambda: ("<Orders><Order>" + MARKER + "<x>" * 100_000 + "</x>" * 100_000 + "</Order></Orders>").encode(),
    "text-node-20mb": lambda: ("<Orders><Order><a>" + MARKER + "A" * (20 * 1024 * 1024) + "</a></Order></Orders>").encode(),
    "undeclared-entity": lambda: f"<Orders><Order><a>{MARKER}&xxe;</a></Order></Orders>".encode(),
}


@pytest.mark.parametrize("attack", list(XML_ATTACKS))
def test_xml_attack_is_refused_fast_without_the_payload(attack: str, caplog: pytest.LogCaptureFixture) -> None:
    payload = XML_ATTACKS[attack]()
    codec = xml_codec(on_record_error="skip")
    t0 = time.monotonic()
    with pytest.raises(DecodeError) as ei:
        codec.decode(payload)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"{attack} took {elapsed:.2f}s"
    err = ei.value
    assert isinstance(err, PermanentError)
    assert "XML rejected by the hardened parser" in str(err) and "payload not shown" in str(err)
    if attack in ("billion-laughs", "xxe-file", "xxe-http", "external-dtd", "xxe-utf16", "xxe-utf32"):
        assert "a DOCTYPE is forbidden" in str(err)
    text = repr(err) + str(err) + caplog.text
    assert MARKER not in text and "passwd" not in text
    assert err.__cause__ is None and err.__context__ is None


def test_xml_records() -> None:
    doc = b"""<?xml version="1.0"?>
    <o:Orders xmlns:o="urn:legacy:orders" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
      <o:Order id="1">
        <o:customer> ACME </o:customer>
        <o:line><o:sku>A</o:sku><o:qty>2</o:qty></o:line>
        <o:line><o:sku>B</o:sku><o:qty>1</o:qty></o:line>
        <o:amount currency="EUR">12.50</o:amount>
        <o:note/>
        <o:closed xsi:nil="true"/>
        <!-- a comment -->
      </o:Order>
      <o:Other/>
      <o:Order id="2"><o:customer>B</o:customer></o:Order>
    </o:Orders>"""
    assert xml_codec(attribute_prefix="@").decode(doc) == [
        {
            "@id": "1",
            "customer": "ACME",
            "line": [{"sku": "A", "qty": "2"}, {"sku": "B", "qty": "1"}],
            "amount": {"@currency": "EUR", "#text": "12.50"},
            "note": None,
            "closed": None,
        },
        {"@id": "2", "customer": "B"},
    ]
    assert xml_codec(strip_whitespace=False).decode(doc)[0]["customer"] == " ACME "
    assert xml_codec(record_path="Order").decode(b'<Order id="9"><a>x</a></Order>') == [{"id": "9", "a": "x"}]


def test_xml_deeper_record_path_and_empty_result() -> None:
    doc = b"<Env><Body><Orders><Order><id>1</id></Order></Orders><Orders><Order><id>2</id></Order></Orders></Body></Env>"
    assert xml_codec(record_path="Env/Body/Orders/Order").decode(doc) == [{"id": "1"}, {"id": "2"}]
    assert xml_codec().decode(b"<Orders/>") == []


def test_xml_wrong_root_and_malformed() -> None:
    with pytest.raises(DecodeError, match=r"line 1: root element is <Invoices>, record_path 'Orders/Order' expects <Orders>"):
        xml_codec().decode(b"<Invoices/>")
    with pytest.raises(DecodeError, match=r"line 2: XML rejected .*not well-formed \(ERR_TAG_NAME_MISMATCH\)") as ei:
        xml_codec().decode(f"<Orders>\n<Order>{MARKER}</Orderx></Orders>".encode())
    assert MARKER not in str(ei.value)


def test_xml_attribute_and_child_collision_is_a_record_error() -> None:
    doc = b'<Orders><Order id="1"><id>2</id></Order><Order><id>3</id></Order></Orders>'
    result = xml_codec(on_record_error="skip").decode_all(doc)
    assert result.records == [{"id": "3"}]
    assert [str(e) for e in result.errors] == [
        "record 0 (line 1), field 'id': an attribute and a child element share this name (set attribute_prefix)"
    ]
    assert xml_codec(attribute_prefix="@").decode(doc)[0] == {"@id": "1", "id": "2"}


def test_xml_content_type_charset_overrides_the_declaration() -> None:
    doc = '<?xml version="1.0" encoding="utf-8"?><Orders><Order><name>Müller</name></Order></Orders>'
    assert xml_codec().decode(doc.encode("cp037"), content_type="text/xml; charset=cp037") == [{"name": "Müller"}]
    assert xml_codec().decode(doc.encode("cp1252"), content_type="application/xml;charset=cp1252") == [{"name": "Müller"}]
    hostile = f'<!DOCTYPE Orders [<!ENTITY x SYSTEM "file:///etc/passwd">]><Orders><Order><a>{MARKER}&x;</a></Order></Orders>'
    with pytest.raises(DecodeError, match="a DOCTYPE is forbidden") as ei:
        xml_codec().decode(hostile.encode("cp037"), content_type="text/xml; charset=cp037")
    assert MARKER not in str(ei.value)
    with pytest.raises(DecodeError, match=r"^byte 1: payload is not valid ascii: byte 0xC4 cannot be decoded$") as ei:
        xml_codec().decode(b"<\xc4/>", content_type="text/xml; charset=ascii")
    assert ei.value.__context__ is None


def test_xml_encode_round_trip() -> None:
    records = [
        {"@id": "1", "customer": "ACME & Co <x>", "line": [{"sku": "A"}, {"sku": "B"}], "amount": {"@currency": "EUR", "#text": "12.50"}, "note": None},
        {"@id": "2", "customer": "Ä"},
    ]
    for opts in ({}, {"namespace": "urn:legacy:orders"}, {"encoding": "iso-8859-1"}):
        codec = xml_codec(attribute_prefix="@", **opts)
        payload = codec.encode(records)
        assert codec.decode(payload) == records
    assert b'<Orders xmlns="urn:legacy:orders"><Order id="1">' in xml_codec(attribute_prefix="@", namespace="urn:legacy:orders").encode(records)
    typed = xml_codec().encode([{"n": 1, "d": Decimal("1.50"), "b": True}])
    assert xml_codec().decode(typed) == [{"n": "1", "d": "1.50", "b": "true"}]


def test_xml_encode_errors() -> None:
    with pytest.raises(EncodeError, match="record 1, field '1st': not a valid XML name"):
        xml_codec().encode([{"a": "x"}, {"1st": "x"}])
    with pytest.raises(EncodeError, match="record 0, field 'a': not a valid XML name, or a value with characters"):
        xml_codec().encode([{"a": "nul\x00"}])
    with pytest.raises(EncodeError, match="record 0, field 'a.b': a object value cannot be written as text"):
        xml_codec().encode([{"a": {"b": object()}}])
    with pytest.raises(EncodeError, match="holds exactly one record, got 2"):
        xml_codec(record_path="Order").encode([{}, {}])


def test_xml_config_errors() -> None:
    with pytest.raises(ConfigurationError, match="record_path 'Orders//Order' must be element names"):
        xml_codec(record_path="Orders//Order")


# -- csv ---------------------------------------------------------------------------------


def csv_codec(**opts: Any) -> CsvCodec:
    codec = codec_from_config({"format": "csv", **opts})
    assert isinstance(codec, CsvCodec)
    return codec


def test_csv_header_and_columns() -> None:
    assert csv_codec().decode(b"id,name\r\n1,A\r\n2,B\r\n") == [{"id": "1", "name": "A"}, {"id": "2", "name": "B"}]
    assert csv_codec(header=False, columns=["id", "name"]).decode(b"1,A\n") == [{"id": "1", "name": "A"}]
    # header and columns: the file's header is skipped and the columns rename it
    assert csv_codec(columns=["id", "name"]).decode(b"KDNR,NAME1\n1,A\n") == [{"id": "1", "name": "A"}]
    with pytest.raises(DecodeError, match="line 1: header has 3 fields, columns lists 2"):
        csv_codec(columns=["id", "name"]).decode(b"a,b,c\n1,2,3\n")
    with pytest.raises(DecodeError, match=r"line 1: header names must be distinct and non-empty \(repeated: a\)"):
        csv_codec().decode(b"a,b,a\n1,2,3\n")
    assert csv_codec().decode(b"") == []


def test_csv_cp1252_with_quoted_newlines_and_delimiters() -> None:
    text = 'id;name;amount\r\n1;"Müller;\r\nKöln ""Süd""";12,50 €\r\n2;Straße;0\r\n'
    records = csv_codec(delimiter=";", encoding="cp1252").decode(text.encode("cp1252"))
    assert records == [
        {"id": "1", "name": 'Müller;\r\nKöln "Süd"', "amount": "12,50 €"},
        {"id": "2", "name": "Straße", "amount": "0"},
    ]


def test_csv_wrong_field_count_names_record_and_line() -> None:
    payload = b'id,name\n1,"two\nlines"\n2,B,extra\n3,C\n4\n'
    with pytest.raises(DecodeError, match=r"^record 1 \(line 4\): expected 2 fields, got 3$") as ei:
        csv_codec().decode(payload)
    assert (ei.value.record_index, ei.value.line) == (1, 4)
    result = csv_codec(on_record_error="skip").decode_all(payload)
    assert result.records == [{"id": "1", "name": "two\nlines"}, {"id": "3", "name": "C"}]
    assert [(e.record_index, e.line) for e in result.errors] == [(1, 4), (3, 6)]


def test_csv_blank_lines() -> None:
    payload = b"id,name\n\n1,A\n\n"
    assert csv_codec().decode(payload) == [{"id": "1", "name": "A"}]
    with pytest.raises(DecodeError, match=r"record 0 \(line 2\): expected 2 fields, got 1"):
        csv_codec(skip_blank_lines=False).decode(payload)


def test_csv_encoding_errors_and_bom() -> None:
    with pytest.raises(DecodeError, match=r"byte 8: payload is not valid cp1252: byte 0x81 cannot be decoded") as ei:
        csv_codec(encoding="cp1252").decode(b"id,name\n\x81,A\n")
    assert ei.value.offset == 8 and ei.value.__context__ is None
    assert csv_codec().decode(b"\xef\xbb\xbfid\n1\n") == [{"id": "1"}]
    assert csv_codec().decode("id\nÄ\n".encode("latin-1"), content_type="text/csv; charset=latin-1") == [{"id": "Ä"}]


def test_csv_broken_quoting_fails_the_message() -> None:
    with pytest.raises(DecodeError, match=r"line 2: malformed CSV: ',' expected after '\"'"):
        csv_codec(on_record_error="skip").decode(b'id,name\n1,"A"B\n2,C\n')


def test_csv_ebcdic() -> None:
    payload = "ID,NAME\n1,HELLO\n".encode("cp037")
    assert payload[8:10] == b"\xf1\x6b"  # '1' ','
    codec = csv_codec(encoding="cp037", line_terminator="\n")
    assert codec.decode(payload) == [{"ID": "1", "NAME": "HELLO"}]
    assert codec.encode([{"ID": "1", "NAME": "HELLO"}]) == payload


def test_csv_encode() -> None:
    records = [{"id": 1, "name": 'a "b", c', "when": None}, {"id": 2, "name": "x\ny", "when": Decimal("1E+2")}]
    assert csv_codec().encode(records) == b'id,name,when\r\n1,"a ""b"", c",\r\n2,"x\ny",100\r\n'
    assert csv_codec(header=False, columns=["name", "id"]).encode([{"id": 1}]) == b",1\r\n"
    assert csv_codec(columns=["a"]).encode([]) == b"a\r\n"


def test_csv_encode_errors() -> None:
    with pytest.raises(EncodeError, match=r"record 1, field 'x': not a column \(columns: id\)"):
        csv_codec().encode([{"id": 1}, {"id": 2, "x": 3}])
    with pytest.raises(EncodeError, match=r"record 0, field 'name': character U\+20AC at position 3 cannot be encoded in cp037"):
        csv_codec(encoding="cp037").encode([{"id": 1, "name": "12 €"}])
    with pytest.raises(EncodeError, match="record 0, field 'id': a list value cannot be written as text"):
        csv_codec().encode([{"id": [1]}])


def test_csv_config_errors() -> None:
    with pytest.raises(ConfigurationError, match="set header: true"):
        csv_codec(header=False)
    with pytest.raises(ConfigurationError, match=r"distinct names \(repeated: a\)"):
        csv_codec(columns=["a", "b", "a"])
    with pytest.raises(ConfigurationError, match="delimiter and quotechar must differ"):
        csv_codec(delimiter='"')


_cells = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(st.tuples(_cells, _cells, _cells), max_size=6), delimiter=st.sampled_from([",", ";", "\t", "|"]))
def test_csv_round_trip(rows: list[tuple[str, str, str]], delimiter: str) -> None:
    codec = csv_codec(columns=["a", "b", "c"], delimiter=delimiter, skip_blank_lines=False)
    records = [dict(zip("abc", row)) for row in rows]
    assert codec.decode(codec.encode(records)) == records
