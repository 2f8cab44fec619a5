"""XML codec, hardened like the SOAP adapter: no DTD, no entities, no network, no huge trees.

Any document with a DOCTYPE is refused before or right after parsing, so XXE, billion laughs and
external DTDs never get a chance; libxml2's default limits (depth 256, 10 MB text nodes) stand,
so deep nesting and huge text nodes fail fast. Refusals never quote the payload.

Example::

    codec:
      format: xml
      record_path: Orders/Order        # root <Orders>, one record per <Order> child
      attribute_prefix: "@"            # <Order id="7"> -> {"@id": "7", ...}
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from lxml import etree
from pydantic import Field, field_validator

from gateway.codecs._text import scalar_text
from gateway.codecs.base import Codec, CodecConfig, charset_of, check_encoding
from gateway.codecs.errors import DecodeError, EncodeError

__all__ = ["XmlCodec", "XmlCodecConfig"]

_XSI = "http://www.w3.org/2001/XMLSchema-instance"
_NAME = re.compile(r"^[A-Za-z_][\w.\-]*$")
_ROOT_START = re.compile(rb"<[A-Za-z_]")
_DOCTYPE = [b"<!DOCTYPE", "<!DOCTYPE".encode("utf-16-le"), "<!DOCTYPE".encode("utf-16-be")]
_ERROR_NAMES = {v: k for k, v in vars(etree.ErrorTypes).items() if k.isupper() and isinstance(v, int)}


class XmlCodecConfig(CodecConfig):
    """Settings of the ``xml`` codec."""

    format: Literal["xml"] = "xml"
    record_path: str = Field(
        "Records/Record",
        description=(
            "Element names from the root to the repeated record element, e.g. 'Orders/Order' "
            "(local names: namespaces are ignored). A single name means the root is the one record."
        ),
    )
    attribute_prefix: str = Field(
        "", description="Prefix for fields read from attributes (e.g. '@'); encode writes prefixed fields as attributes."
    )
    text_key: str = Field(
        "#text", description="Field holding an element's text when the element also has attributes or children."
    )
    strip_whitespace: bool = Field(True, description="Strip surrounding whitespace from text values.")
    encoding: str = Field(
        "utf-8",
        description="Encoding encode writes (and declares). decode follows the document's declaration, or a content type's charset.",
    )
    namespace: str | None = Field(None, description="Namespace URI encode puts every element in (as the default namespace).")

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, value: str) -> str:
        return check_encoding(value)

    @field_validator("record_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not all(_NAME.match(p) for p in value.split("/")):
            raise ValueError(f"record_path {value!r} must be element names separated by '/', e.g. 'Orders/Order'")
        return value


def _local(tag: Any) -> str:
    return str(etree.QName(tag).localname)


def _refused(kind: str, *, line: int | None = None) -> DecodeError:
    return DecodeError(f"XML rejected by the hardened parser: {kind} (payload not shown)", line=line)


class XmlCodec(Codec):
    """Records as repeated XML elements; child elements and attributes become fields."""

    name = "xml"
    config_model = XmlCodecConfig
    config: XmlCodecConfig

    def _parse(self, payload: bytes, content_type: str | None) -> Any:
        charset = charset_of(content_type)
        if charset is not None:
            # The content type wins over the declaration (RFC 7303). Python transcodes, so any
            # Python codec works (libxml2 knows fewer, and no EBCDIC page).
            payload = self._transcode(payload, charset)
        m = _ROOT_START.search(payload)
        prolog = payload[: m.start()] if m else payload
        if any(p in prolog for p in _DOCTYPE):
            raise _refused("a DOCTYPE is forbidden")
        parser = etree.XMLParser(
            resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
            encoding="utf-8" if charset else None, remove_comments=True, remove_pis=True,
        )
        failure = None
        try:
            root = etree.fromstring(payload, parser)
        except etree.XMLSyntaxError as exc:
            # Only the libxml2 error name and position: its message may quote the document.
            failure = (_ERROR_NAMES.get(exc.code, f"code {exc.code}"), exc.position[0] if exc.position else None)
        except ValueError as exc:  # e.g. an unsupported encoding declaration
            failure = (type(exc).__name__, None)
        if failure is not None:
            code, line = failure
            kind = {
                "ERR_RESOURCE_LIMIT": "beyond the depth/size limits",
                "ERR_UNSUPPORTED_ENCODING": "an encoding libxml2 cannot read",
                "ERR_UNDECLARED_ENTITY": "an entity reference (entities are not supported)",
            }.get(code, "not well-formed")
            raise _refused(f"{kind} ({code})", line=line)
        info = root.getroottree().docinfo
        if info.doctype or info.internalDTD is not None or info.externalDTD is not None:
            raise _refused("a DOCTYPE is forbidden")
        return root

    @staticmethod
    def _transcode(payload: bytes, charset: str) -> bytes:
        try:
            return payload.decode(charset).encode("utf-8")
        except UnicodeDecodeError as exc:
            bad = exc.start  # raised below, outside this block: exc.object is the whole payload
        raise DecodeError(f"payload is not valid {charset}: byte 0x{payload[bad]:02X} cannot be decoded", offset=bad)

    def iter_decode(self, payload: bytes, *, content_type: str | None = None) -> Iterator[dict[str, Any] | DecodeError]:
        """Yield one dict per record element.

        A ``charset`` in ``content_type`` overrides the document's encoding declaration.

        Raises:
            DecodeError: the document is refused (DOCTYPE, not well-formed, beyond limits) or its
                root element is not the first name of ``record_path``.
        """
        root = self._parse(payload, content_type)
        steps = self.config.record_path.split("/")
        if _local(root.tag) != steps[0]:
            raise DecodeError(
                f"root element is <{_local(root.tag)[:40]}>, record_path {self.config.record_path!r} expects <{steps[0]}>",
                line=root.sourceline,
            )
        elements = [root]
        for step in steps[1:]:
            elements = [c for e in elements for c in e if isinstance(c.tag, str) and _local(c.tag) == step]
        for i, element in enumerate(elements):
            try:
                yield self._record(element)
            except DecodeError as exc:
                yield DecodeError(exc.reason, record_index=i, field=exc.field, line=element.sourceline)

    def _text(self, element: Any) -> str | None:
        text: str | None = element.text
        if text is not None and self.config.strip_whitespace:
            text = text.strip()
        return text

    def _record(self, element: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for name, value in element.attrib.items():
            qname = etree.QName(name)
            if qname.namespace != _XSI:
                fields[self.config.attribute_prefix + qname.localname] = value
        from_attrs = set(fields)
        repeated: set[str] = set()
        children = [c for c in element if isinstance(c.tag, str)]
        for child in children:
            key, value = _local(child.tag), self._value(child)
            if key in from_attrs or key == self.config.text_key:
                raise DecodeError(
                    "an attribute and a child element share this name (set attribute_prefix)", field=key
                )
            if key in repeated:
                fields[key].append(value)
            elif key in fields:
                fields[key] = [fields[key], value]
                repeated.add(key)
            else:
                fields[key] = value
        text = self._text(element)
        if text is not None and text.strip():  # indentation between children is not a value
            fields[self.config.text_key] = text
        return fields

    def _value(self, element: Any) -> Any:
        if element.get(f"{{{_XSI}}}nil") in ("true", "1"):
            return None
        plain_attrs = [n for n in element.attrib if etree.QName(n).namespace != _XSI]
        if plain_attrs or any(isinstance(c.tag, str) for c in element):
            return self._record(element)
        return self._text(element)

    def encode(self, records: Sequence[Mapping[str, Any]]) -> bytes:
        """A document along ``record_path`` with one record element per record.

        Fields become child elements (lists repeat them, mappings nest), fields starting with
        ``attribute_prefix`` (when set) attributes, ``text_key`` the element's text; None
        writes an empty element.

        Raises:
            EncodeError: a field name that is not an XML name, a value XML cannot hold (a
                control character, an unsupported type), or several records for a one-name
                ``record_path``.
        """
        steps = self.config.record_path.split("/")
        if len(steps) == 1 and len(records) != 1:
            raise EncodeError(f"record_path {self.config.record_path!r} holds exactly one record, got {len(records)}")
        root = etree.Element(self._tag(steps[0]), nsmap={None: self.config.namespace} if self.config.namespace else None)
        parent = root
        for step in steps[1:-1]:
            parent = etree.SubElement(parent, self._tag(step))
        for i, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise EncodeError(f"expected a mapping, got {type(record).__name__}", record_index=i)
            element = root if len(steps) == 1 else etree.SubElement(parent, self._tag(steps[-1]))
            try:
                self._fill(element, record)
                self._check_names(element)
            except EncodeError as exc:
                raise EncodeError(exc.reason, record_index=i, field=exc.field) from None
        # Serialised as text and encoded by Python, so every encoding the config accepts works (libxml2
        # knows neither cp037/cp500 nor aliases such as latin-1); characters the encoding lacks are
        # written as character references, as libxml2 does. The declaration names Python's canonical
        # name (latin-1 -> iso8859-1); decode needs a content type's charset for EBCDIC documents.
        name = codecs.lookup(self.config.encoding).name
        document = f'<?xml version="1.0" encoding="{name}"?>\n' + etree.tostring(root, encoding="unicode")
        return document.encode(name, errors="xmlcharrefreplace")

    def _check_names(self, element: Any) -> None:
        """Element and attribute names must be encodable as they are (a reference is no name)."""
        encoding = self.config.encoding
        for el in element.iter():
            for name in (_local(el.tag), *(_local(a) for a in el.attrib)):
                try:
                    name.encode(encoding)
                except UnicodeEncodeError:
                    raise EncodeError(f"the name cannot be written in {encoding}", field=name) from None

    def _tag(self, name: str) -> str:
        return f"{{{self.config.namespace}}}{name}" if self.config.namespace else name

    def _fill(self, element: Any, record: Mapping[str, Any]) -> None:
        prefix = self.config.attribute_prefix
        for key, value in record.items():
            key = str(key)
            try:
                if key == self.config.text_key:
                    element.text = scalar_text(value)
                elif prefix and key.startswith(prefix):
                    text = scalar_text(value)
                    if text is not None:
                        element.set(key[len(prefix):], text)
                else:
                    for item in value if isinstance(value, (list, tuple)) else [value]:
                        child = etree.SubElement(element, self._tag(key))
                        if isinstance(item, Mapping):
                            self._fill(child, item)
                        else:
                            child.text = scalar_text(item)
            except EncodeError as exc:
                raise EncodeError(exc.reason, field=f"{key}.{exc.field}" if exc.field else key) from None
            except (TypeError, ValueError) as exc:
                reason = str(exc) if isinstance(exc, TypeError) else "not a valid XML name, or a value with characters XML cannot hold"
                raise EncodeError(reason, field=key) from None
