"""Reading a corpus: listing its files, planning shards, and turning one shard into (id, text, payload) rows.

Shards are whole small files, row-group ranges of big Parquet files, and line (record) ranges of big JSONL/CSV
files, found by one sequential scan of byte offsets so that each worker seeks straight to its range. Every
input row either comes out as a row or as a rejection naming the file, the row number and the reason.
"""

from __future__ import annotations

import csv
import difflib
import errno
import gzip
import hashlib
import io
import json
import logging
import re
import string
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from reembed.indexing.storage import StorageError, StorageOptions, filesystem, full_uri, transient

logger = logging.getLogger(__name__)

Format = Literal["auto", "jsonl", "jsonl.gz", "parquet", "csv", "tsv"]
_SUFFIXES = [
    (".jsonl.gz", "jsonl.gz"), (".ndjson.gz", "jsonl.gz"), (".json.gz", "jsonl.gz"),
    (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"),
    (".parquet", "parquet"), (".pq", "parquet"), (".csv", "csv"), (".tsv", "tsv"),
]


class CorpusError(RuntimeError):
    """A job-level problem with the corpus (no files, missing column, unreadable file)."""


class UnreadableFile(CorpusError):
    """One corpus file cannot be read (corrupt, truncated, permission denied): quarantined under that policy."""


def _unreadable(uri: str, what: str, exc: BaseException) -> BaseException:
    """What to raise for a file that could not be read: ``UnreadableFile`` (quarantined, or fatal with
    on_bad_rows=fail) when the file is at fault; the store's own error when the store is (it did not answer,
    or failed mid-read), so that the shard is retried and no row is lost to a quarantine entry."""
    return exc if transient(uri, exc) else UnreadableFile(f"{uri}: {what}: {exc}")


class CorpusSettings(BaseModel):
    """The `corpus:` section of a job file."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(..., description="file, directory or glob; local path, file:// or s3://")
    format: Format = Field("auto", description="jsonl, jsonl.gz, parquet, csv, tsv; auto from the extension")
    id: str = Field("id", description="column holding the document id")
    text: str = Field("{text}", description="template over columns, e.g. '{title} {text}'")
    payload: list[str] = Field(default_factory=list, description="columns copied into Parquet and the Qdrant payload")
    max_text_bytes: int = Field(1_000_000, ge=1, description="rows with longer rendered text are quarantined")
    on_bad_rows: Literal["quarantine", "fail"] = Field(
        "quarantine", description="quarantine bad rows and unreadable files with their reason, or fail the run")
    storage_options: StorageOptions = Field(default_factory=StorageOptions)

    def template_fields(self) -> list[str]:
        fields = [name for _, name, _, _ in string.Formatter().parse(self.text) if name]
        if not fields:
            raise CorpusError(f"corpus.text template {self.text!r} names no column; write e.g. '{{text}}'")
        return fields


@dataclass(frozen=True)
class Shard:
    """One unit of work: a file, or a row-group / byte range of one."""

    shard_id: str
    uri: str
    format: str
    start: int | None = None  # byte offset (jsonl/csv) or first row group (parquet)
    end: int | None = None  # exclusive
    first_row: int = 1  # row number of the shard's first row in its file (1-based)
    rows_hint: int | None = None
    limit: int | None = None  # read at most this many input rows (trial runs: `reembed run --limit N`)
    bytes_hint: int | None = None  # bytes the shard covers: progress estimates rows from it when rows_hint is None


@dataclass
class ShardRows:
    """A shard read into memory: accepted rows and rejected ones."""

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    payload: dict[str, list[Any]] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    @property
    def input_rows(self) -> int:
        return len(self.ids) + len(self.rejected)


def detect_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    lower = path.lower()
    for suffix, fmt in _SUFFIXES:
        if lower.endswith(suffix):
            return fmt
    raise CorpusError(f"cannot tell the format of {path!r} from its extension; set corpus.format")


def list_files(settings: CorpusSettings) -> list[str]:
    """Every corpus file as a URI, sorted, so plans are stable across runs."""
    fs, path = filesystem(settings.uri, settings.storage_options)
    try:
        if any(ch in path for ch in "*?["):
            paths = fs.glob(path)
        elif fs.isdir(path):
            paths = [p for p in fs.find(path) if not p.rsplit("/", 1)[-1].startswith((".", "_"))]
        elif fs.exists(path):
            paths = [path]
        else:
            paths = []
    except PermissionError as exc:
        raise CorpusError(f"access denied listing corpus {settings.uri!r}: {exc}") from None
    except OSError as exc:
        raise CorpusError(f"cannot list corpus {settings.uri!r}: {exc}") from None
    if settings.format == "auto":
        paths = [p for p in paths if any(p.lower().endswith(s) for s, _ in _SUFFIXES)]
    if not paths:
        raise CorpusError(f"no corpus files found at {settings.uri!r}")
    return sorted(full_uri(fs, p) for p in paths)


def _shard_id(uri: str, start: int | None, end: int | None, limit: int | None = None) -> str:
    key = f"{uri}|{start}|{end}" + (f"|limit={limit}" if limit is not None else "")
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _scan_records(fh: io.BufferedIOBase, quoted: bool) -> list[tuple[int, int]]:
    """(byte offset, row number) where each record starts, plus the end of the file.

    JSONL rows are numbered by physical line (blank lines are no records but keep the numbering); CSV rows by
    record, the header being record 0, and a record may span lines inside quotes.
    """
    starts: list[tuple[int, int]] = []
    offset = 0
    line_no = 0
    record_no = -1 if quoted else 0
    open_quotes = False
    for line in fh:
        line_no += 1
        if not open_quotes and line.strip():
            record_no += 1
            starts.append((offset, record_no if quoted else line_no))
        if quoted and line.count(b'"') % 2:
            open_quotes = not open_quotes
        offset += len(line)
    starts.append((offset, (record_no if quoted else line_no) + 1))
    return starts


class ShardMemo(Protocol):
    """Remembers the shards of a line-scanned file under a key that includes the file's fingerprint (size plus
    ETag or modification time, what commit markers trust), so that planning an unchanged big JSONL or CSV file
    does not read it again to find its record boundaries: a no-op re-run stays O(files), not O(bytes)."""

    def get(self, uri: str, key: str) -> list[Shard] | None: ...
    def put(self, uri: str, key: str, shards: list[Shard]) -> None: ...


def scan_key(uri: str, fmt: str, file_fp: str, shard_bytes: int, shard_rows: int | None) -> str:
    """What decides a scanned file's shards: the file (its URI and fingerprint), its format and the cut."""
    key = json.dumps([uri, fmt, file_fp, shard_bytes, shard_rows])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def plan_file(uri: str, settings: CorpusSettings, shard_bytes: int, shard_rows: int | None,
              memo: ShardMemo | None = None, scans: dict[str, list[tuple[int, int]]] | None = None) -> list[Shard]:
    """Shards for one file: whole when small, else row-group or record ranges near the target size (found by
    one scan of the file, or recalled from ``memo`` when the file has not changed since)."""
    fmt = detect_format(uri, settings.format)
    fs, path = filesystem(uri, settings.storage_options)
    size = fs.size(path)
    if fmt == "parquet":
        try:
            meta = pq.ParquetFile(fs.open(path, "rb")).metadata
        except Exception as exc:
            raise _unreadable(uri, "not a readable Parquet file", exc) from None
        if size <= shard_bytes and (shard_rows is None or meta.num_rows <= shard_rows):
            return [Shard(_shard_id(uri, None, None), uri, fmt, rows_hint=meta.num_rows, bytes_hint=size)]
        shards, first, acc_bytes, acc_rows, row_base = [], 0, 0, 0, 1
        for rg in range(meta.num_row_groups):
            acc_bytes += meta.row_group(rg).total_byte_size
            acc_rows += meta.row_group(rg).num_rows
            if acc_bytes >= shard_bytes or (shard_rows and acc_rows >= shard_rows) or rg == meta.num_row_groups - 1:
                shards.append(Shard(_shard_id(uri, first, rg + 1), uri, fmt, first, rg + 1, row_base, acc_rows,
                                    bytes_hint=acc_bytes))
                row_base += acc_rows
                first, acc_bytes, acc_rows = rg + 1, 0, 0
        return shards
    if fmt == "jsonl.gz" or (size <= shard_bytes and shard_rows is None):
        return [Shard(_shard_id(uri, None, None), uri, fmt, bytes_hint=size)]
    if memo is None:
        return _scan_file(uri, fs, path, fmt, shard_bytes, shard_rows, scans)
    key = scan_key(uri, fmt, file_fingerprint(uri, settings), shard_bytes, shard_rows)
    shards = memo.get(uri, key)
    if shards is None:
        shards = _scan_file(uri, fs, path, fmt, shard_bytes, shard_rows, scans)
        memo.put(uri, key, shards)
    return shards


def _scan_file(uri: str, fs: Any, path: str, fmt: str, shard_bytes: int, shard_rows: int | None,
               scans: dict[str, list[tuple[int, int]]] | None = None) -> list[Shard]:
    """Record ranges of a JSONL or CSV file near the target size, from one sequential scan of it (kept in
    ``scans`` while one plan cuts the same file twice, first by the target size, then smaller)."""
    starts = scans.get(uri) if scans is not None else None
    if starts is None:
        try:
            with fs.open(path, "rb") as fh:
                starts = _scan_records(fh, quoted=fmt in ("csv", "tsv"))
        except OSError as exc:
            raise _unreadable(uri, "unreadable", exc) from None
        if scans is not None:
            scans[uri] = starts
    if fmt in ("csv", "tsv"):
        starts = starts[1:]  # the header opens every shard's read, it is no data row
    shards: list[Shard] = []
    begin = 0
    for i in range(1, len(starts)):
        rows = i - begin
        last = i == len(starts) - 1
        if last or starts[i][0] - starts[begin][0] >= shard_bytes or (shard_rows and rows >= shard_rows):
            if rows:
                s, e = starts[begin][0], starts[i][0]
                shards.append(Shard(_shard_id(uri, s, e), uri, fmt, s, e, starts[begin][1], rows, bytes_hint=e - s))
            begin = i
    return shards


def file_fingerprint(uri: str, settings: CorpusSettings) -> str:
    """Size plus ETag or modification time: changes whenever the file's content is replaced."""
    fs, path = filesystem(uri, settings.storage_options)
    info = fs.info(path)
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}|{stamp}"


def shard_fingerprint(shard: Shard, file_fp: str, settings: CorpusSettings) -> str:
    """What decides a shard's rows: its file's content, its range, and how rows are read and rendered."""
    how = settings.model_dump(include={"id", "text", "payload", "max_text_bytes", "format"})
    key = json.dumps([shard.uri, shard.start, shard.end, file_fp, how] + ([shard.limit] if shard.limit else []),
                     sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


SAMPLE_ROWS = 200  # rows preflight reads from the start of a JSON lines file


def sample_keys(uri: str, settings: CorpusSettings, rows: int = SAMPLE_ROWS) -> tuple[list[str], str] | None:
    """The columns a file offers and what they were read from: the schema of Parquet and CSV files, the keys
    seen in the first ``rows`` records of JSON lines (plain or gzip); None when the file cannot be read here
    (its shard reports it) or has no records."""
    fmt = detect_format(uri, settings.format)
    fs, path = filesystem(uri, settings.storage_options)
    try:
        if fmt == "parquet":
            return pq.ParquetFile(fs.open(path, "rb")).schema_arrow.names, "the file's schema"
        with fs.open(path, "rb") as raw:
            fh = gzip.GzipFile(fileobj=raw) if fmt == "jsonl.gz" else raw
            if fmt in ("csv", "tsv"):
                header = fh.readline().decode("utf-8", errors="replace")
                return next(csv.reader([header], delimiter="\t" if fmt == "tsv" else ","), []), "the file's header"
            keys: dict[str, None] = {}
            seen = 0
            for line in fh:
                if seen >= rows:
                    break
                if not line.strip():
                    continue
                seen += 1
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    keys.update(dict.fromkeys(record))
    except Exception:
        return None  # unreadable files are reported (or fail) when their shard is read
    if not seen:
        return None
    return list(keys), f"the first {seen} row(s)"


def check_columns(uri: str, settings: CorpusSettings) -> None:
    """Fail fast, naming the columns the file does have, when the id, a template field or a payload column
    appears nowhere in it (Parquet/CSV: the schema; JSON lines: a bounded sample of the first rows).

    Without this a wrong ``corpus.id`` quarantines every row and a misspelled template field renders as an
    empty string in every document: both run to the end and look like success.
    """
    found = sample_keys(uri, settings)
    if found is None:
        return
    columns, source = found
    wanted = [("corpus.id", settings.id)] + [("corpus.text", f) for f in settings.template_fields()]
    wanted += [("corpus.payload", p) for p in settings.payload]
    problems = []
    for setting, name in wanted:
        if name in columns:
            continue
        close = difflib.get_close_matches(name, columns, n=1, cutoff=0.6)
        if not close:
            close = [c for c in columns if c.strip("_").lower() == name.strip("_").lower()]
        problems.append(f"{setting} names {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if problems:
        raise CorpusError(f"{uri}: {'; '.join(problems)}, but no such column is in {source}; "
                          f"columns found: {columns}")


MIN_SPLIT_BYTES = 64 * 1024  # below this a file is never cut further to feed more actors


def _plan_files(uris: list[str], settings: CorpusSettings, shard_bytes: int, shard_rows: int | None,
                memo: ShardMemo | None = None, scans: dict[str, list[tuple[int, int]]] | None = None) -> list[Shard]:
    shards: list[Shard] = []
    for uri in uris:
        try:
            shards.extend(plan_file(uri, settings, shard_bytes, shard_rows, memo, scans))
        except UnreadableFile:
            if settings.on_bad_rows == "fail":
                raise
            # Whole-file shard: reading it again in the worker reports the file in the quarantine.
            shards.append(Shard(_shard_id(uri, None, None), uri, detect_format(uri, settings.format)))
    return shards


def plan_shards(settings: CorpusSettings, shard_bytes: int, shard_rows: int | None = None,
                min_shards: int = 1, memo: ShardMemo | None = None) -> list[Shard]:
    """Shards for the whole corpus, in a stable order.

    When files smaller than ``shard_bytes`` would give fewer than ``min_shards`` shards, they are cut by a
    smaller byte target (never below 64 KiB), so that one 8 MB file still keeps every actor busy. With a
    ``memo``, big JSONL and CSV files unchanged since an earlier plan are not scanned again.
    """
    uris = list_files(settings)
    scans: dict[str, list[tuple[int, int]]] = {}  # each file is read once, however many cuts are tried
    shards = _plan_files(uris, settings, shard_bytes, shard_rows, memo, scans)
    if len(shards) >= min_shards:
        return shards
    total = 0
    for uri in uris:
        fs, path = filesystem(uri, settings.storage_options)
        total += fs.size(path)
    smaller = max(MIN_SPLIT_BYTES, total // min_shards)
    if smaller >= shard_bytes:
        return shards
    return _plan_files(uris, settings, smaller, shard_rows, memo, scans)


def limit_shards(settings: CorpusSettings, limit: int, shard_rows: int | None = None) -> list[Shard]:
    """The first ``limit`` input rows of the corpus as shards (trial runs), scanning only the files needed.

    Files are cut at ``min(shard_rows, limit)`` rows so each shard knows its row count; the last shard reads
    only the rows still missing. A gzip file's rows are unknown until read, so it ends the plan.
    """
    shards: list[Shard] = []
    remaining = limit
    for uri in list_files(settings):
        for shard in _plan_files([uri], settings, 1 << 62, min(shard_rows or limit, limit)):
            take = remaining if shard.rows_hint is None else min(remaining, shard.rows_hint)
            last = shard.rows_hint is None or take < shard.rows_hint
            if last:
                shard = Shard(_shard_id(shard.uri, shard.start, shard.end, take), shard.uri, shard.format,
                              shard.start, shard.end, shard.first_row, take, take, shard.bytes_hint)
            shards.append(shard)
            remaining -= take
            if last or remaining <= 0:
                return shards
    return shards


def _render(template: str, fields: list[str], record: dict[str, Any]) -> str:
    values = {}
    for name in fields:
        value = record.get(name)
        values[name] = "" if value is None else str(value)
    return template.format_map(values).strip()


def _read_records(shard: Shard, settings: CorpusSettings) -> tuple[list[tuple[int, dict | None, str | None]], list[str] | None]:
    """(row number, record or None, error) per input row, and the file's columns when it has a schema."""
    fs, path = filesystem(shard.uri, settings.storage_options)
    out: list[tuple[int, dict | None, str | None]] = []
    if shard.format == "parquet":
        try:
            pf = pq.ParquetFile(fs.open(path, "rb"))
            groups = list(range(pf.metadata.num_row_groups)) if shard.start is None else list(range(shard.start, shard.end))
            table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
        except Exception as exc:
            raise _unreadable(shard.uri, "corrupt or unreadable Parquet", exc) from None
        if shard.limit is not None:
            table = table.slice(0, shard.limit)
        for i, rec in enumerate(table.to_pylist()):
            out.append((shard.first_row + i, rec, None))
        return out, table.column_names
    try:
        with fs.open(path, "rb") as fh:
            if shard.format == "jsonl.gz":
                data = gzip.decompress(fh.read())
            elif shard.start is None:
                data = fh.read()
            else:
                header = fh.readline() if shard.format in ("csv", "tsv") else b""
                fh.seek(shard.start)
                body = fh.read(shard.end - shard.start)
                if len(body) != shard.end - shard.start:  # shortened since it was planned, or cut off mid-read
                    raise OSError(errno.EIO, f"read {len(body)} of the {shard.end - shard.start} bytes at "
                                             f"offset {shard.start}")
                data = header + body
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise _unreadable(shard.uri, "unreadable", exc) from None
    if shard.format in ("csv", "tsv"):
        text = data.decode("utf-8", errors="replace")
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if shard.format == "tsv" else ",")
        columns = list(reader.fieldnames or [])
        for i, rec in enumerate(reader):
            if shard.limit is not None and i >= shard.limit:
                break
            bad = "\ufffd" in "".join(str(v) for v in rec.values() if v is not None)
            out.append((shard.first_row + i, None if bad else rec, "invalid UTF-8" if bad else None))
        return out, columns
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    for i, raw in enumerate(lines):
        row = shard.first_row + i
        if not raw.strip():
            continue
        if shard.limit is not None and len(out) >= shard.limit:
            break
        rec = _fast_json(raw)
        if rec is _UNPARSED:  # json itself, which says what is wrong, or reads what orjson would misread
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                out.append((row, None, f"invalid UTF-8 at byte {exc.start}"))
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                out.append((row, None, f"malformed JSON: {exc}"))
                continue
        if not isinstance(rec, dict):
            out.append((row, None, f"malformed JSON: expected a JSON object, got {type(rec).__name__}"))
            continue
        out.append((row, rec, None))
    return out, None


_UNPARSED = object()
# orjson reads integers past 64 bits as floats (an id 123456789012345678901234567890 would change); json keeps
# them exact, so a line with 19 digits or more in a row goes to json (strings with long numbers included)
_LONG_NUMBER = re.compile(rb"\d{19,}")


def _fast_json(raw: bytes) -> Any:
    """One JSON line through orjson (3-5x faster than json, the same values for every line it accepts but
    for long integers, kept away from it), or ``_UNPARSED`` for json to read: lines orjson refuses (invalid
    UTF-8, NaN, lone surrogates, numbers past a double) are read by json as before, or rejected with its
    reason."""
    if _LONG_NUMBER.search(raw):
        return _UNPARSED
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _UNPARSED


def _utf8_size(text: str) -> int | None:
    """Bytes of ``text`` in UTF-8, or None when it cannot be written as UTF-8 at all (a lone surrogate, which
    JSON's ``\\ud800`` escapes can produce: the tokenizer and Parquet would fail on it later, far from the row)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def read_shard(shard: Shard, settings: CorpusSettings) -> ShardRows:
    """Read one shard, render texts, and reject bad rows with their reasons."""
    fields = settings.template_fields()
    try:
        records, columns = _read_records(shard, settings)
    except StorageError as exc:
        raise CorpusError(str(exc)) from None
    except UnreadableFile as exc:
        if settings.on_bad_rows == "fail":
            raise
        return ShardRows(payload={name: [] for name in settings.payload},
                         rejected=[{"file": shard.uri, "row": None, "doc_id": None, "reason": f"unreadable file: {exc}"}])
    if columns is not None:
        missing = [c for c in [settings.id, *fields] if c not in columns]
        if missing:
            raise CorpusError(f"{shard.uri}: missing column(s) {missing}; the file has {columns}")
    elif records and not any(rec and any(f in rec for f in fields) for _, rec, _ in records):
        raise CorpusError(f"{shard.uri}: no row has any of the text column(s) {fields}")
    out = ShardRows(payload={name: [] for name in settings.payload})
    seen: dict[str, int] = {}
    for row, rec, error in records:
        reason = error
        doc_id = text = None
        if rec is not None:
            raw_id = rec.get(settings.id)
            doc_id = None if raw_id is None else str(raw_id)
            if doc_id is None or not doc_id.strip():
                reason = f"missing id (column {settings.id!r})"
            elif not any(rec.get(f) is not None for f in fields):
                reason = f"missing text column(s) {fields}"
            else:
                text = _render(settings.text, fields, rec)
                size = _utf8_size(text)
                if not text:
                    reason = "empty text"
                elif size is None or _utf8_size(doc_id) is None:
                    reason = "not valid Unicode: a lone surrogate (an unpaired \\ud800-\\udfff escape)"
                elif size > settings.max_text_bytes:
                    reason = f"text over {settings.max_text_bytes} bytes"
                elif doc_id in seen:
                    reason = f"duplicate id {doc_id!r} (first at row {seen[doc_id]})"
        if reason is not None:
            if settings.on_bad_rows == "fail":
                raise CorpusError(f"{shard.uri}: row {row}: {reason} (corpus.on_bad_rows is 'fail')")
            out.rejected.append({"file": shard.uri, "row": row, "doc_id": doc_id, "reason": reason})
            continue
        seen[doc_id] = row  # type: ignore[index]
        out.ids.append(doc_id)  # type: ignore[arg-type]
        out.texts.append(text)  # type: ignore[arg-type]
        out.rows.append(row)
        for name in settings.payload:
            out.payload[name].append(rec.get(name))  # type: ignore[union-attr]
    return out
