"""CSV codec: delimited text with a header row or configured column names, strict column count.

Example::

    codec:
      format: csv
      encoding: cp1252
      delimiter: ";"
      columns: [id, customer, amount]   # names the fields; with header: true the file's header is skipped

Values are strings (CSV has no types); give them types with the source's ``mapping.parse``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gateway.codecs._text import scalar_text
from gateway.codecs.base import Codec, CodecConfig, charset_of, check_encoding
from gateway.codecs.errors import DecodeError, EncodeError

__all__ = ["CsvCodec", "CsvCodecConfig"]


class CsvCodecConfig(CodecConfig):
    """Settings of the ``csv`` codec."""

    format: Literal["csv"] = "csv"
    header: bool = Field(
        True,
        description="The first row is a header. Without columns it names the fields; with columns it is skipped (its width must match).",
    )
    columns: list[str] | None = Field(
        None, description="Field names in column order; required when header is false. encode writes them as the header."
    )
    delimiter: str = Field(",", min_length=1, max_length=1, description="Field separator, one character.")
    quotechar: str = Field('"', min_length=1, max_length=1, description="Quote character, one character (doubled inside quotes).")
    encoding: str = Field(
        "utf-8",
        description="Text encoding, any Python codec (utf-8, cp1252, cp037, ...); a content type's charset overrides it. A UTF-8 BOM is ignored.",
    )
    skip_blank_lines: bool = Field(True, description="Ignore empty lines instead of reporting them as rows with the wrong width.")
    line_terminator: str = Field("\r\n", description="Row end encode writes (decode accepts \\n, \\r\\n and \\r).")

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, value: str) -> str:
        return check_encoding(value)

    @model_validator(mode="after")
    def _consistent(self) -> CsvCodecConfig:
        if not self.header and not self.columns:
            raise ValueError("set header: true (the first row names the fields) or list the columns")
        if self.columns is not None:
            dupes = sorted({c for c in self.columns if self.columns.count(c) > 1})
            if dupes or not self.columns:
                raise ValueError(f"columns must be a non-empty list of distinct names (repeated: {', '.join(dupes)})")
        if self.delimiter == self.quotechar:
            raise ValueError("delimiter and quotechar must differ")
        return self


class CsvCodec(Codec):
    """Rows of delimited text as records, one field per column."""

    name = "csv"
    config_model = CsvCodecConfig
    config: CsvCodecConfig

    def _dialect(self) -> dict[str, Any]:
        return {"delimiter": self.config.delimiter, "quotechar": self.config.quotechar, "doublequote": True, "strict": True}

    def iter_decode(self, payload: bytes, *, content_type: str | None = None) -> Iterator[dict[str, Any] | DecodeError]:
        """Yield one dict per row, or an error naming the row and line for a row of the wrong width.

        Raises:
            DecodeError: the payload is not valid in its encoding, quoting is broken (the rows
                after it cannot be told apart), or the header is unusable.
        """
        enc = charset_of(content_type) or self.config.encoding
        try:
            text = payload.decode(enc)
        except UnicodeDecodeError as exc:
            # Raised outside this block, so the native error (whose .object is the payload) is not chained.
            bad: int | None = exc.start
        else:
            bad = None
        if bad is not None:
            raise DecodeError(f"payload is not valid {enc}: byte 0x{payload[bad]:02X} cannot be decoded", offset=bad)
        reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""), **self._dialect())
        names = self.config.columns
        header_pending = self.config.header
        index = last_line = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DecodeError(f"malformed CSV: {exc}", line=last_line + 1) from None
            line, last_line = last_line + 1, reader.line_num
            if not row:
                if self.config.skip_blank_lines:
                    continue
                row = [""]
            if header_pending:
                header_pending = False
                names = self._header(row, line)
                continue
            assert names is not None
            if len(row) != len(names):
                yield DecodeError(f"expected {len(names)} fields, got {len(row)}", record_index=index, line=line)
            else:
                yield dict(zip(names, row))
            index += 1

    def _header(self, row: list[str], line: int) -> list[str]:
        if self.config.columns is not None:
            if len(row) != len(self.config.columns):
                raise DecodeError(f"header has {len(row)} fields, columns lists {len(self.config.columns)}", line=line)
            return self.config.columns
        dupes = sorted({n for n in row if row.count(n) > 1})
        if dupes or not all(row):
            raise DecodeError(f"header names must be distinct and non-empty (repeated: {', '.join(d[:40] for d in dupes)})", line=line)
        return row

    def encode(self, records: Sequence[Mapping[str, Any]]) -> bytes:
        """The records as rows in the configured dialect, with a header row when ``header`` is on.

        Columns are ``columns``, else the first record's keys; a missing field or None writes
        an empty cell.

        Raises:
            EncodeError: a record with a field that is not a column, a non-scalar value, or a
                character the encoding cannot hold.
        """
        names = self.config.columns or (list(records[0]) if records else [])
        out = io.BytesIO()
        if self.config.header and names:
            out.write(self._row(names, None))
        for i, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise EncodeError(f"expected a mapping, got {type(record).__name__}", record_index=i)
            unknown = [k for k in record if k not in names]
            if unknown:
                raise EncodeError(f"not a column (columns: {', '.join(names)})", record_index=i, field=str(unknown[0]))
            cells = []
            for name in names:
                try:
                    cells.append(scalar_text(record.get(name)) or "")
                except TypeError as exc:
                    raise EncodeError(str(exc), record_index=i, field=name) from None
            out.write(self._row(cells, i, names))
        return out.getvalue()

    def _row(self, cells: list[str], index: int | None, names: list[str] | None = None) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator=self.config.line_terminator, quoting=csv.QUOTE_MINIMAL, **self._dialect()).writerow(cells)
        try:
            return buf.getvalue().encode(self.config.encoding)
        except UnicodeEncodeError:
            for n, cell in enumerate(cells):
                try:
                    cell.encode(self.config.encoding)
                except UnicodeEncodeError as exc:
                    char = cell[exc.start]
                    raise EncodeError(
                        f"character U+{ord(char):04X} at position {exc.start} cannot be encoded in {self.config.encoding}",
                        record_index=index, field=(names or cells)[n],
                    ) from None
            raise
