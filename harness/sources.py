"""The corpora data.py reads, as documents: text (.txt, .md), JSON lines (.jsonl) and parquet files, and
text or JSON lines compressed with gzip or zstd; found in folders and globs, streamed in bounded pieces
that tokenise exactly as the whole would. The optional readers (pyarrow, zstandard) are loaded only
for their files, and a missing one is refused with the line that installs it.
"""
import codecs
import glob
import gzip
import importlib
import io
import json
from pathlib import Path

from harness import rundir

CHUNK_CHARS = 1 << 22  # a big text file is tokenised in ~4 MB pieces cut at line ends: bounded memory
# the inputs data.py reads, by how a name ends: (layout, compression). A folder gives up its files of these kinds.
KINDS = {".txt": ("text", None), ".md": ("text", None), ".jsonl": ("jsonl", None), ".parquet": ("parquet", None),
         ".txt.gz": ("text", "gzip"), ".txt.zst": ("text", "zstd"), ".jsonl.gz": ("jsonl", "gzip"),
         ".jsonl.zst": ("jsonl", "zstd"), ".json.gz": ("jsonl", "gzip"), ".json.zst": ("jsonl", "zstd")}
READERS = {"parquet": ("pyarrow.parquet", "pyarrow"), "zstd": ("zstandard", "zstandard")}  # optional: (module, pip name)
PARQUET_ROWS = 64  # a parquet file is read in batches of this many rows: memory follows a batch, not a row group


def read_documents(source, text_field="text"):
    """(text, ends_document) pieces of one source, none longer than CHUNK_CHARS: a text file read in
    bounded chunks, JSON lines one document per line, a parquet file one document per row of its
    text_field column; .gz and .zst files decompressed as they are read (source_kind). Each is cut
    where no tokenizer merges across (safe_cut). Binary files, invalid UTF-8, malformed lines and
    damaged archives are refused with the file named, and the line, row group or offset."""
    path = str(source)
    layout, packing = source_kind(path) or ("text", None)
    if layout == "parquet":
        yield from _parquet_documents(path, text_field)
        return
    with open_input(path, packing) as f:
        head = f.read(8192)
    if not head:
        raise ValueError(f"{path}: " + ("decompresses to nothing" if packing else "the file is empty") + ": expected text")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{path}: looks binary (a NUL byte at offset {nul}): expected UTF-8 text")
    with open_input(path, packing) as f:
        yield from _jsonl_documents(path, f, text_field) if layout == "jsonl" else _text_chunks(path, f)


def _jsonl_documents(path, f, text_field):
    for n, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid UTF-8 at byte {e.start} of the line") from None
        if not line.strip():
            continue
        try:
            text = json.loads(line)[text_field]
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
            raise ValueError(f"{path}:{n}: expected a JSON object with a string field "
                             f"{text_field!r} ({type(e).__name__})") from None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{n}: the field {text_field!r} holds {type(text).__name__}, expected a string")
        if not rundir.utf8(text):
            raise ValueError(f"{path}:{n}: the field {text_field!r} holds a lone surrogate escape (\\ud800-\\udfff), "
                             f"which is no Unicode text")
        pieces = _document(normalise(text))
        del line, raw, text  # the pieces hold the one copy
        yield from pieces


def _document(text):
    """One document's pieces: a huge one goes out in pieces, so memory follows the piece size."""
    while len(text) > CHUNK_CHARS:
        cut = safe_cut(text, CHUNK_CHARS)
        yield text[:cut], False
        text = text[cut:]
    yield text, True


def _text_chunks(path, f):
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, buf = 0, ""
    while True:
        block = f.read(CHUNK_CHARS)
        try:
            buf += decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: invalid UTF-8 at byte {offset + e.start}") from None
        offset += len(block)
        if not block:
            break
        while len(buf) > CHUNK_CHARS:
            cut = safe_cut(buf, CHUNK_CHARS)
            yield normalise(buf[:cut]), False
            buf = buf[cut:]
    yield normalise(buf), True


def _parquet_documents(path, text_field):
    """One document per row of a parquet file's text column, row group by row group, in batches of
    PARQUET_ROWS rows: memory follows a batch. A damaged row group is named, and so is a null row."""
    with _parquet_file(path, text_field) as pf:
        for group in range(pf.num_row_groups):
            yield from _row_group(path, pf, group, text_field)


def _row_group(path, pf, group, text_field):
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
            yield from _document(normalise(text))
        row += len(texts)


def _parquet_file(path, text_field):
    """A parquet file opened, with a string column text_field and rows, or refused with the file named."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)  # pages streamed: no row group read whole
        schema, rows = pf.schema_arrow, pf.metadata.num_rows
    except Exception as e:  # not a parquet file, a damaged footer: ArrowInvalid, OSError, …
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {rundir.one_line(e)})") from None
    if text_field not in schema.names:
        raise ValueError(f"{path}: no column {text_field!r} (it has {', '.join(schema.names[:12])}): name the column "
                         f"of the text with --text_field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: the column {text_field!r} holds {kind}, expected strings")
    if not rows:
        raise ValueError(f"{path}: holds no rows: expected text")
    return pf


def source_kind(path):
    """(layout, compression) of an input by how its name ends (KINDS), or None for a name of no such kind."""
    name = Path(path).name
    return next((kind for end, kind in KINDS.items() if name.endswith(end)), None)


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
    """Files from paths, folders (their files of the KINDS, recursively) and globs, sorted."""
    files = []
    for spec in specs:
        if not spec.strip():
            raise ValueError(f"{flag}: an empty path: expected a file, a folder or a glob")
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if source_kind(q) and q.is_file())
        else:
            found = sorted(Path(q) for q in glob.glob(spec)) if any(c in spec for c in "*?[") else [p]
        if not found:
            raise ValueError(f"{flag}: no input files match {spec!r}")
        for q in found:
            if not q.is_file():
                raise ValueError(f"{flag}: input {str(q)!r} is not a file")
            if not source_kind(q) and q.name.endswith((".gz", ".zst")):
                raise ValueError(f"{flag}: input {str(q)!r} is compressed text of no kind data.py reads: expected "
                                 f"{', '.join(k for k in KINDS if k.endswith(('.gz', '.zst')))}")
        files.extend(found)
    return files
