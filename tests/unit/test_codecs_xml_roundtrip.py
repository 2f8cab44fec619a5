"""Property test: XML records survive encode-then-decode (the JSON, CSV and fixed-width codecs have theirs)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.codecs import EncodeError, codec_from_config

_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,7}", fullmatch=True).filter(lambda n: not n.lower().startswith("xml"))
# Any XML character (no controls, no surrogates), at least one that is not whitespace: an empty
# element reads as null, and that is documented.
_texts = st.text(st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from("\t\n"), min_size=1, max_size=12).filter(
    lambda t: t.strip() != ""
)
_scalars = _texts
_leaf = st.one_of(_scalars, st.lists(_scalars, min_size=2, max_size=3))  # one item would read back as a scalar
_nested = st.dictionaries(_names, _leaf, min_size=1, max_size=3)
_field = st.one_of(_leaf, _nested, st.lists(_nested, min_size=2, max_size=2))
_attrs = st.dictionaries(_names.map(lambda n: "@" + n), _texts, max_size=2)
_records = st.lists(
    st.tuples(_attrs, st.dictionaries(_names, _field, max_size=4)).map(lambda ab: {**ab[0], **ab[1]}), max_size=4
)


def _stripped(value: Any) -> Any:
    """What ``strip_whitespace`` reads back: element text stripped, attribute values as they are."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        return [_stripped(v) for v in value]
    return {k: v if k.startswith("@") else _stripped(v) for k, v in value.items()}


@settings(max_examples=150, deadline=None)
@given(records=_records, strip=st.booleans(), encoding=st.sampled_from(["utf-8", "iso-8859-1", "cp037", "cp500"]),
       namespace=st.sampled_from([None, "urn:legacy:orders"]))
def test_xml_round_trip(records: list[dict[str, Any]], strip: bool, encoding: str, namespace: str | None) -> None:
    codec = codec_from_config({"format": "xml", "record_path": "Orders/Order", "attribute_prefix": "@",
                               "strip_whitespace": strip, "encoding": encoding, "namespace": namespace})
    payload = codec.encode(records)
    decoded = codec.decode(payload, content_type=f"text/xml; charset={encoding}")
    assert decoded == (records if not strip else [_stripped(r) for r in records])


def test_xml_encodes_in_any_configured_encoding_ebcdic_included() -> None:
    codec = codec_from_config({"format": "xml", "record_path": "Orders/Order", "encoding": "cp037"})
    payload = codec.encode([{"customer": "MÜLLER [€]"}])
    assert payload.startswith('<?xml version="1.0" encoding="cp037"?>'.encode("cp037"))
    assert "<customer>MÜLLER [&#8364;]</customer>".encode("cp037") in payload  # € is not in cp037: a reference
    assert codec.decode(payload, content_type="text/xml; charset=cp037") == [{"customer": "MÜLLER [€]"}]
    latin = codec_from_config({"format": "xml", "record_path": "Orders/Order", "encoding": "latin-1"})
    payload = latin.encode([{"customer": "Ä"}])
    assert payload.startswith(b'<?xml version="1.0" encoding="iso8859-1"?>') and b"\xc4" in payload
    assert latin.decode(payload) == [{"customer": "Ä"}]  # the declaration alone is enough here


def test_xml_a_name_the_encoding_cannot_write_is_an_encode_error() -> None:
    codec = codec_from_config({"format": "xml", "record_path": "Orders/Order", "encoding": "cp037"})
    with pytest.raises(EncodeError, match=r"^record 1, field 'Łódź': the name cannot be written in cp037"):
        codec.encode([{"a": "1"}, {"Łódź": "x"}])
