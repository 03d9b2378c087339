"""The corpora data.py reads, as documents: text (.txt, .md), JSON (.json: an array of objects, or JSON lines),
JSON lines (.jsonl) and parquet files, and text, JSON or JSON lines compressed with gzip or zstd; found in
folders and globs, streamed in bounded pieces that tokenise exactly as the whole would. The optional readers
(pyarrow, zstandard) are loaded only for their files, and a missing one is refused with the line that installs it.
Every container is read by the same rules: a document that is empty or whitespace only is dropped (and counted),
a file with no text in it is refused, and so is a NUL character anywhere.
"""
import codecs
import glob
import gzip
import importlib
import io
import json
import os
from collections import Counter
from pathlib import Path

from harness import rundir

CHUNK_CHARS = 1 << 22  # a big text file is tokenised in ~4 MB pieces cut at line ends: bounded memory
# the inputs data.py reads, by how a name ends, in any case: (layout, compression). A folder gives up its files of
# these kinds and names the others. "json" is a JSON array of objects, or JSON lines (Dolma's .json.gz are lines).
KINDS = {".txt": ("text", None), ".md": ("text", None), ".json": ("json", None), ".jsonl": ("jsonl", None),
         ".parquet": ("parquet", None), ".txt.gz": ("text", "gzip"), ".txt.zst": ("text", "zstd"),
         ".jsonl.gz": ("jsonl", "gzip"), ".jsonl.zst": ("jsonl", "zstd"), ".json.gz": ("json", "gzip"),
         ".json.zst": ("json", "zstd")}
READERS = {"parquet": ("pyarrow.parquet", "pyarrow"), "zstd": ("zstandard", "zstandard")}  # optional: (module, pip name)
PARQUET_ROWS = 64  # a parquet file is read in batches of this many rows: memory follows a batch, not a row group
SNIFF = 8192  # the first bytes of a file, looked at before it is read: a NUL there is a binary file, refused at once
# archives and compressions of no kind data.py reads: such a file named on the command line is refused, not read as text
PACKED = (".gz", ".zst", ".bz2", ".xz", ".lzma", ".lz4", ".br", ".zip", ".7z", ".tar", ".tgz", ".rar")


def read_documents(source, text_field="text", tally=None):
    """(text, ends_document) pieces of one source, none longer than CHUNK_CHARS: a text file read in
    bounded chunks (one document), JSON lines one document per line, a JSON array one per item, a parquet
    file one per row of its text_field column; .gz and .zst files decompressed as they are read
    (source_kind). Each is cut where no tokenizer merges across (safe_cut). Documents that are empty or
    whitespace only are dropped; tally (a Counter) adds up "documents" kept and "empty" ones dropped.
    A file with no text, binary files (a NUL anywhere), invalid UTF-8, malformed JSON and damaged archives
    are refused with the file named, and the line, item, row or offset."""
    path = str(source)
    layout, packing = source_kind(path) or ("text", None)
    count, head = Counter(), b""
    if layout == "parquet":
        yield from _parquet_documents(path, text_field, count)
    else:
        with open_input(path, packing) as f:
            head = f.read(SNIFF)
            nul = head.find(b"\x00")
            if nul >= 0:
                raise ValueError(f"{path}: looks binary (a NUL byte at offset {nul}): expected UTF-8 text")
            first = head.lstrip()[:1]  # a JSON array begins with [
            while layout == "json" and not first and (more := f.read(1 << 16)):  # a .json of many blank lines first
                first = more.lstrip()[:1]
        if layout == "json":
            layout = "array" if first == b"[" else "lines"
        read = {"text": _text_chunks, "jsonl": _jsonl_documents, "lines": _jsonl_documents, "array": _array_documents}
        with open_input(path, packing) as f:
            yield from read[layout](path, f, text_field, count, layout)
    if not count["documents"]:
        why = ("the file is empty" if not os.path.getsize(path) else "it decompresses to nothing" if packing and
               not head else "only whitespace" if layout == "text" else "no document" if not count["empty"] else
               f"{count['empty']:,} document{'s, each' if count['empty'] > 1 else ','} empty or whitespace only")
        raise ValueError(f"{path}: no text in it ({why}): expected at least one document that is not empty or "
                         f"whitespace only")
    if tally is not None:
        tally.update(count)


def _jsonl_documents(path, f, text_field, count, layout):
    """One document per line; a .json of lines (layout "lines") may have been an array too: its error says so."""
    expected = (f"a JSON object with a string field {text_field!r}" if layout == "jsonl" else
                f"a JSON array of objects with a string field {text_field!r}, or JSON lines of them")
    for n, raw in enumerate(f, 1):
        nul = raw.find(b"\x00")
        if nul >= 0:
            raise ValueError(f"{path}:{n}: looks binary (a NUL byte at byte {nul} of the line): expected UTF-8 text")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid UTF-8 at byte {e.start} of the line") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{path}:{n}: expected {expected} ({type(e).__name__})") from None
        pieces = _document(f"{path}:{n}", _field(f"{path}:{n}", record, text_field), text_field, count)
        del line, raw, record  # the pieces hold the one copy
        yield from pieces


def _array_documents(path, f, text_field, count, layout):
    """A JSON array of objects, parsed whole: memory follows the file (JSON lines stream line by line)."""
    raw = f.read()
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{path}: looks binary (a NUL byte at offset {nul:,}): expected UTF-8 text")
    try:
        items = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 at byte {e.start:,}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON array ({e.msg} at line {e.lineno}, column {e.colno}): expected a JSON "
                         f"array of objects with a string field {text_field!r}") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deep to read: expected a JSON array of objects") from None
    del raw
    for i in range(len(items)):
        record, items[i] = items[i], None  # each item freed once read
        yield from _document(f"{path}: item {i}", _field(f"{path}: item {i}", record, text_field), text_field, count)


def _field(where, record, text_field):
    """The text of one JSON record: its string field text_field, or refused with where it is."""
    if not isinstance(record, dict) or text_field not in record:
        raise ValueError(f"{where}: expected a JSON object with a string field {text_field!r}")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: the field {text_field!r} holds {type(text).__name__}, expected a string")
    return text


def _document(where, text, text_field, count, what="field"):
    """One document's pieces, checked: none when it is empty or whitespace only (counted as empty), a NUL character
    or a lone surrogate escape refused with where it is. A huge one goes out in pieces, so memory follows the piece
    size."""
    nul = text.find("\x00")
    if nul >= 0:
        raise ValueError(f"{where}: the {what} {text_field!r} holds a NUL character (\\u0000) at character {nul:,}: "
                         f"expected text")
    if not rundir.utf8(text):
        raise ValueError(f"{where}: the {what} {text_field!r} holds a lone surrogate escape (\\ud800-\\udfff), "
                         f"which is no Unicode text")
    if not text or text.isspace():
        count["empty"] += 1
        return
    count["documents"] += 1
    text = normalise(text)
    while len(text) > CHUNK_CHARS:
        cut = safe_cut(text, CHUNK_CHARS)
        yield text[:cut], False
        text = text[cut:]
    yield text, True


def _text_chunks(path, f, text_field, count, layout):
    """A text file as one document, in chunks. A file of whitespace only is counted empty once read through (its
    chunks went out already: read_documents then refuses the file, so they are never kept)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, buf, blank = 0, "", True
    while True:
        block = f.read(CHUNK_CHARS)
        nul = block.find(b"\x00")
        if nul >= 0:
            raise ValueError(f"{path}: looks binary (a NUL byte at offset {offset + nul:,}): expected UTF-8 text")
        try:
            buf += decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: invalid UTF-8 at byte {offset + e.start}") from None
        offset += len(block)
        if not block:
            break
        while len(buf) > CHUNK_CHARS:
            cut = safe_cut(buf, CHUNK_CHARS)
            piece, buf = buf[:cut], buf[cut:]
            blank = blank and piece.isspace()
            yield normalise(piece), False
    blank = blank and (not buf or buf.isspace())
    count["empty" if blank else "documents"] += 1
    yield normalise(buf), True


def _parquet_documents(path, text_field, count):
    """One document per row of a parquet file's text column, row group by row group, in batches of
    PARQUET_ROWS rows: memory follows a batch. A damaged row group is named, and so is a null row."""
    with _parquet_file(path, text_field) as pf:
        for group in range(pf.num_row_groups):
            yield from _row_group(path, pf, group, text_field, count)


def _row_group(path, pf, group, text_field, count):
    batches, row = pf.iter_batches(PARQUET_ROWS, row_groups=[group], columns=[text_field], use_threads=False), 0
    while True:
        try:
            batch = next(batches, None)
            texts = [] if batch is None else batch.column(0).to_pylist()
        except Exception as e:  # pyarrow raises many kinds (ArrowInvalid, OSError, …); invalid UTF-8 too
            raise ValueError(f"{path}: row group {group} (of {pf.num_row_groups}) cannot be read: "
                             f"{type(e).__name__}: {rundir.one_line(e)}") from None
        if batch is None:
            return
        for i, text in enumerate(texts):
            if text is None:
                raise ValueError(f"{path}: row group {group}, row {row + i}: the column {text_field!r} is null, "
                                 f"expected a string")
            yield from _document(f"{path}: row group {group}, row {row + i}", text, text_field, count, "column")
        row += len(texts)


def _parquet_file(path, text_field):
    """A parquet file opened, with a string column text_field, or refused with the file named. (One with no rows
    gives no document: read_documents refuses it as it refuses any file with no text in it.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)  # pages streamed: no row group read whole
        schema = pf.schema_arrow
    except Exception as e:  # not a parquet file, a damaged footer: ArrowInvalid, OSError, …
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {rundir.one_line(e)})") from None
    if text_field not in schema.names:
        raise ValueError(f"{path}: no column {text_field!r} (it has {', '.join(schema.names[:12])}): name the column "
                         f"of the text with --text_field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: the column {text_field!r} holds {kind}, expected strings")
    return pf


def source_kind(path):
    """(layout, compression) of an input by how its name ends (KINDS), or None for a name of no such kind."""
    name = Path(path).name.lower()  # .TXT and .Parquet are text and parquet too
    return next((KINDS[end] for end in sorted(KINDS, key=len, reverse=True) if name.endswith(end)), None)


def open_input(path, packing):
    """A source's bytes as a binary stream, decompressed as it is read when packing is gzip or zstd."""
    return open(path, "rb") if packing is None else io.BufferedReader(_Unpacked(path, packing), 1 << 20)


def check_reader(path):
    """Refuse, before any work, an input whose optional reader is not installed, with the line that installs it."""
    for need in source_kind(path) or ():
        module, package = READERS.get(need, (None, None))
        if module:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ValueError(f"{path}: reading {need} files needs the {package} package: pip install {package} "
                                 f"(or pip install -r requirements-extras.txt)") from None


class _Unpacked(io.RawIOBase):
    """The decompressed bytes of a .gz or .zst file, read in order in bounded blocks; damage or a truncated
    file is a ValueError that names the file and how many bytes it gave before."""

    def __init__(self, path, packing):
        self.path, self.packing, self.offset, self.left = path, packing, 0, b""
        self.file = open(path, "rb")
        self.blocks = _gzip_blocks(self.file) if packing == "gzip" else _zstd_blocks(self.file)

    def readable(self):
        return True

    def readinto(self, buffer):
        if not self.left:
            try:
                self.left = memoryview(next(self.blocks))
            except StopIteration:
                return 0
            except Exception as e:  # zlib.error, EOFError, gzip.BadGzipFile, zstandard.ZstdError, a read error
                raise ValueError(f"{self.path}: damaged {self.packing} data after {self.offset:,} bytes of its "
                                 f"contents ({type(e).__name__}: {rundir.one_line(e)})") from None
        n = min(len(buffer), len(self.left))
        buffer[:n], self.left = self.left[:n], self.left[n:]
        self.offset += n
        return n

    def close(self):
        self.file.close()
        super().close()


def _gzip_blocks(f, size=1 << 16):
    """gzip (every member, CRC-checked)."""
    with gzip.GzipFile(fileobj=f) as g:
        while block := g.read(size):
            yield block


def _zstd_blocks(f, size=1 << 16):
    """zstd, frame after frame (zstd -T, pzstd and concatenated files have several; windows up to 2 GiB as
    zstd --long=31 makes), from 64 kB reads. A file that ends inside a frame is refused: zstandard's own
    readers pass over that in silence."""
    import zstandard
    dctx, frame, data = zstandard.ZstdDecompressor(max_window_size=1 << 31), None, b""
    while data or (data := f.read(size)):
        if frame is None or frame.eof:
            frame = dctx.decompressobj()
        block = frame.decompress(data)
        data = frame.unused_data if frame.eof else b""
        if block:
            yield block
    if frame is not None and not frame.eof:
        raise EOFError("the file ends inside a zstd frame: it is truncated")


def safe_cut(text, limit):
    """Where to cut text at or before limit so that the pieces tokenise exactly as the whole: after a
    newline that a non-space character follows, where every BPE pre-tokeniser here (gpt2, cl100k, o200k)
    starts a new piece; else before a space that a letter follows and a non-space precedes; else at
    limit (a stretch of CHUNK_CHARS without either; never seen in text), never inside a CR LF pair."""
    i = text.rfind("\n", 0, limit)
    while i > 0:
        if i + 1 < len(text) and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", 0, i)
    j = text.rfind(" ", 0, limit)
    while j > 0:
        if j + 1 < len(text) and text[j + 1].isalpha() and not text[j - 1].isspace():
            return j
        j = text.rfind(" ", 0, j)
    return limit - (text[limit - 1] == "\r")


def normalise(text):
    return text.replace("\r\n", "\n")


def expand_sources(specs, flag="--train"):
    """Files from paths, folders (their files of the KINDS, recursively: folder_files) and globs, sorted. A file
    named or matched is read (as text when it is of no kind), except an archive of no kind, which is refused."""
    files = []
    for spec in specs:
        if not spec.strip():
            raise ValueError(f"{flag}: an empty path: expected a file, a folder or a glob")
        p = Path(spec)
        if p.is_dir():
            found = folder_files(p, flag)
        else:
            found = sorted(Path(q) for q in glob.glob(spec)) if any(c in spec for c in "*?[") else [p]
        if not found:
            raise ValueError(f"{flag}: no input files match {spec!r}")
        for q in found:
            if not q.is_file():
                raise ValueError(f"{flag}: input {str(q)!r} is not a file")
            if not source_kind(q) and q.name.lower().endswith(PACKED):
                raise ValueError(f"{flag}: input {str(q)!r} is an archive or compressed file of no kind data.py reads: "
                                 f"expected {', '.join(k for k in KINDS if k.endswith(('.gz', '.zst')))}")
        files.extend(found)
    return files


def folder_files(folder, flag, shown=5):
    """A folder's plain files of the KINDS, recursively, sorted. Every other file is named in one warning (the first
    `shown` for each reason, and how many more), and a folder with none to read is refused, with what it holds."""
    found, unread, odd = [], [], []
    for q in sorted(folder.rglob("*")):
        if not q.is_dir():
            (odd if not q.is_file() else found if source_kind(q) else unread).append(q)
    if not found:
        held = Counter(q.suffix.lower() or q.name for q in unread) + Counter("not a plain file" for q in odd)
        kinds = ", ".join(k + (f" ×{n}" if n > 1 else "") for k, n in held.most_common())
        raise ValueError(f"{flag}: the folder {str(folder)!r} holds no file of a kind data.py reads "
                         f"({', '.join(KINDS)}): it holds " + (f"{_files(len(unread) + len(odd))}: {kinds}" if held
                                                               else "nothing"))

    def names(qs):
        listed = ", ".join(str(q.relative_to(folder)) for q in qs[:shown])
        return listed + (f", and {len(qs) - shown} more" if len(qs) > shown else "")
    skipped = []
    if unread:
        skipped.append(f"{_files(len(unread))} of no kind data.py reads: {names(unread)}")
    if odd:
        skipped.append(f"{_files(len(odd))} that {'is not a plain file' if len(odd) == 1 else 'are not plain files'} "
                       f"(a FIFO, a link to nothing, …): {names(odd)}")
    if skipped:
        rundir.warn(f"{flag}{'' if flag.endswith('=') else ' '}{folder}: skipped " + "; ".join(skipped))
    return found


def _files(n):
    return f"{n} file" + "s" * (n != 1)
