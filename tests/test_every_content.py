"""Inputs are read as what they are, or refused by name: every input kind data.py reads (harness.sources.KINDS, in
lower and upper case, and .json as an array and as JSON lines) against a table of degenerate contents (empty,
whitespace only, a NUL character at the start and after the first 8 KB, empty documents among good ones) and a
normal text. The same content gives the same outcome in every container: the same tokens, or a refusal (exit code
2, one line, no traceback) that names the file, with --out left as it was. Folders name every file they do not
read, and a folder with nothing to read is refused. The cases are generated from KINDS: a kind added tomorrow is
walked too."""
import gzip
import json
import os
import re

import pytest

import data

from harness import sources
from tests.conftest import make_text, refused, snapshot

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

NORMAL = make_text(3, 2500)  # about 14 KB: the NUL of "nul after 8 KB" lies past the first 8 KB that were sniffed
assert len(NORMAL.encode()) > 9000
# one document each: what every container must treat alike
CONTENTS = {"empty": "", "whitespace": " \n\t\r\n  \n" * 300, "nul at start": "\x00" + NORMAL,
            "nul after 8 KB": NORMAL[:9000] + "\x00" + NORMAL[9000:], "normal": NORMAL}
REFUSED = {"empty": "no text", "whitespace": "no text", "nul at start": "NUL", "nul after 8 KB": "NUL"}


def jsonl(docs, field="text"):
    return "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()


def pack(raw, packing):
    return {None: lambda b: b, "gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress}[packing](raw)


def write(path, docs):
    """docs (a list of documents) as the kind that path's name says, in the layout that kind reads. A text file
    holds one document: its docs are joined (a list of one, in the generated cases)."""
    layout, packing = sources.source_kind(path)
    if layout == "parquet":
        table = pa.table({"id": pa.array(range(len(docs)), pa.int64()), "text": pa.array(docs, pa.string())})
        pq.write_table(table, path, row_group_size=2)
        return path
    raw = {"text": lambda: "".join(docs).encode(), "jsonl": lambda: jsonl(docs),
           "json": lambda: json.dumps([{"text": d} for d in docs], indent=1).encode()}[layout]()
    path.write_bytes(pack(raw, packing))
    return path


# every kind of KINDS (.json kinds written as arrays), some in upper case, and each .json kind written as JSON lines
CONTAINERS = [*sources.KINDS, ".TXT", ".JSONL.GZ", ".Parquet",
              *(f"lines{end}" for end, (layout, _) in sources.KINDS.items() if layout == "json")]


def container_file(folder, container, docs):
    """docs written into a file of the container's kind, in folder."""
    path = folder / ("doc" + container if container.startswith(".") else container)
    if container.startswith("lines"):
        path.write_bytes(pack(jsonl(docs), sources.source_kind(path)[1]))
        return path
    return write(path, docs)


def prepare(tmp_path, source):
    """data.main on one training source into tmp_path/out, byte level, one process; the token file."""
    data.main(["--train", source, "--out", str(tmp_path / "out"), "--workers=1"])
    return (tmp_path / "out" / "train.bin").read_bytes()


@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("container", CONTAINERS)
def test_the_same_content_alike_in_every_container(container, content, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_CHARS", 1000)  # text is read in several blocks: a NUL or text in any one of them
    src = container_file(tmp_path, container, [CONTENTS[content]])
    if content not in REFUSED:
        (tmp_path / "plain.txt").write_text(CONTENTS[content], encoding="utf-8")
        assert prepare(tmp_path / "b", str(src)) == prepare(tmp_path / "a", str(tmp_path / "plain.txt"))
        return
    out = tmp_path / "out"
    err = refused(data.main, ["--train", str(src), "--out", str(out), "--workers=1"], capsys)
    assert err.count("\n") == 1 and f"--train {src}" in err and REFUSED[content] in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # nothing left beside


# empty and whitespace-only documents among good ones: dropped and counted, alike in every container of several
MIXED = [make_text(i, 300) for i in range(4)]
WITH_EMPTY = [MIXED[0], "", MIXED[1], "  \n ", MIXED[2], "\n", MIXED[3]]


@pytest.mark.parametrize("container", [c for c in CONTAINERS if sources.source_kind("x" + c)[0] != "text"])
def test_empty_documents_among_good_ones_are_dropped_and_counted(container, tmp_path):
    (tmp_path / "a").mkdir()
    want = data.prepare_files(tmp_path / "want", [str(write(tmp_path / "a" / "good.jsonl", MIXED))], {}, "byte",
                              workers=1)["splits"]["train"]
    (tmp_path / "b").mkdir()
    src = container_file(tmp_path / "b", container, WITH_EMPTY)
    got = data.prepare_files(tmp_path / "got", [str(src)], {}, "byte", workers=1)["splits"]["train"]
    assert (tmp_path / "got" / "train.bin").read_bytes() == (tmp_path / "want" / "train.bin").read_bytes()
    assert got["documents"] == len(MIXED) and got["empty_documents"] == 3 and want["empty_documents"] == 0
    assert json.loads((tmp_path / "got" / "meta.json").read_text())["splits"]["train"]["empty_documents"] == 3


@pytest.mark.parametrize("container", [c for c in CONTAINERS if sources.source_kind("x" + c)[0] != "text"])
def test_a_file_of_no_documents_is_refused_in_every_container(container, tmp_path, capsys):
    """No line, an empty array, no row: the file holds no text, as an empty text file holds none."""
    src = container_file(tmp_path, container, [])
    err = refused(data.main, ["--train", str(src), "--out", str(tmp_path / "out")], capsys)
    assert f"--train {src}: no text in it (" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("where", ["train", "val"])
def test_a_refusal_names_the_split_and_leaves_out_as_it_was(where, tmp_path, capsys):
    good = write(tmp_path / "good.txt", [NORMAL])
    bad = write(tmp_path / "blank.jsonl", ["", " "])
    out = tmp_path / "out"
    data.main(["--train", str(good), "--out", str(out), "--workers=1"])
    before = snapshot(out)
    argv = ["--train", str(bad), "--val", f"held={good}"] if where == "train" else \
        ["--train", str(write(tmp_path / "g2.txt", [NORMAL[:5000]])), "--val", f"held={bad}"]
    err = refused(data.main, [*argv, "--out", str(out), "--overwrite", "--workers=1"], capsys)
    flag = "--train " if where == "train" else "--val held="
    assert f"{flag}{bad}: no text in it" in err and "2 documents, each empty or whitespace only" in err, err
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- NUL wherever it is
def test_raw_nul_bytes_are_named_in_every_container(tmp_path, capsys):
    """A NUL byte (not the escape \\u0000) in a JSON line or array is binary, not JSON: named with its place."""
    line = b'{"text": "fine"}\n{"text": "a\x00b"}\n'
    for name, raw in (("n.jsonl", line), ("n.json", line), ("n.jsonl.gz", gzip.compress(line)),
                      ("a.json", b'[{"text": "a\x00b"}]'), ("t.txt.zst", pack(NORMAL.encode() * 3 + b"\x00", "zstd"))):
        (tmp_path / name).write_bytes(raw)
        err = refused(data.main, ["--train", str(tmp_path / name), "--out", str(tmp_path / "o")], capsys)
        assert f"{tmp_path / name}" in err and "NUL" in err and err.count("\n") == 1, err
    assert "n.jsonl: looks binary (a NUL byte at offset 28)" in refused(  # in the first 8 KB, sniffed before any line
        data.main, ["--train", str(tmp_path / "n.jsonl"), "--out", str(tmp_path / "o")], capsys)
    assert f"t.txt.zst: looks binary (a NUL byte at offset {3 * len(NORMAL.encode()):,})" in refused(
        data.main, ["--train", str(tmp_path / "t.txt.zst"), "--out", str(tmp_path / "o")], capsys)
    far = b'{"text": "fine"}\n' * 1000 + b'{"text": "a\x00b"}\n'  # past the first 8 KB: named with its line
    (tmp_path / "far.jsonl").write_bytes(far)
    assert "far.jsonl:1001: looks binary (a NUL byte at byte 11 of the line)" in refused(
        data.main, ["--train", str(tmp_path / "far.jsonl"), "--out", str(tmp_path / "o")], capsys)


def test_nul_in_parquet_text_is_named_with_its_row(tmp_path):
    pq.write_table(pa.table({"text": ["fine", "fine", "x\x00y"]}), tmp_path / "n.parquet", row_group_size=2)
    with pytest.raises(ValueError, match=r"n.parquet: row group 1, row 0: the column 'text' holds a NUL character "
                                         r"\(\\u0000\) at character 1"):
        list(sources.read_documents(tmp_path / "n.parquet"))


# ----------------------------------------------------------------------------- .json: read as what it is
def test_json_arrays_and_lines_give_the_documents_of_jsonl(tmp_path):
    docs = [*MIXED, "café \u00e9 “q” \\ {\"braces\": 1}"]
    want = list(sources.read_documents(write(tmp_path / "d.jsonl", docs)))
    assert want[-1] == (docs[-1], True)  # escapes decoded; braces, keys and quotes are the JSON's, not the text's
    for name in ("d.json", "d.json.gz", "d.json.zst"):
        assert list(sources.read_documents(write(tmp_path / name, docs))) == want, name
    (tmp_path / "lines.json").write_bytes(jsonl(docs))
    (tmp_path / "compact.json").write_text(json.dumps([{"text": d, "n": 1} for d in docs]))
    (tmp_path / "spaced.json").write_text("\n\n  " + json.dumps([{"text": d} for d in docs], indent=4))
    for name in ("lines.json", "compact.json", "spaced.json"):
        assert list(sources.read_documents(tmp_path / name)) == want, name


@pytest.mark.parametrize("text, message", [
    ('{\n "text": "one object over lines"\n}\n', r"o.json:1: expected a JSON array of objects with a string field "
                                                 r"'text', or JSON lines of them"),
    ('["a", "b"]', r"o.json: item 0: expected a JSON object with a string field 'text'"),
    ('[{"text": "a"}, {"body": "b"}]', r"o.json: item 1: expected a JSON object with a string field 'text'"),
    ('[{"text": 3}]', r"o.json: item 0: the field 'text' holds int, expected a string"),
    ('[{"text": "a"}', r"o.json: not a JSON array \(.* at line 1, column 15\): expected a JSON array of objects"),
    ('[{"text": "a"}] [', r"o.json: not a JSON array \(Extra data at line 1, column 17\)"),
    ('[]', r"o.json: no text in it \(no document\)"),
    ('[{"text": "\\ud800"}]', r"o.json: item 0: the field 'text' holds a lone surrogate"),
    ('not json at all\n', r"o.json:1: expected a JSON array of objects"),
])
def test_a_json_file_that_is_neither_is_refused_by_name(text, message, tmp_path, capsys):
    (tmp_path / "o.json").write_text(text)
    err = refused(data.main, ["--train", str(tmp_path / "o.json"), "--out", str(tmp_path / "out")], capsys)
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- folders: read, or named as skipped
UNREAD = ["notes.csv", "dump.bz2", "README", ".DS_Store", "x.json.bz2", "table.tsv"]


def test_every_file_of_a_folder_is_read_or_named(tmp_path, capsys):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    read = [container_file(folder if i % 2 else folder / "sub", c, [make_text(i, 200)]) for i, c in enumerate(CONTAINERS)]
    for name in UNREAD:
        (folder / name).write_bytes(b"a,b\n")
    os.mkfifo(folder / "pipe.txt")  # of a kind by its name, but no file to read: named, never opened
    (folder / "sub" / "gone.jsonl").symlink_to(folder / "nowhere")
    data.main(["--train", str(folder), "--out", str(tmp_path / "out"), "--workers=1"])
    meta = data.load_meta(tmp_path / "out")
    assert sorted(s["path"] for s in meta["sources"]) == sorted(str(p) for p in read)  # meta.json lists every file read
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--train {folder}: skipped {len(UNREAD)} files of no kind data.py reads" in err, err
    assert sum(name in err for name in UNREAD) == 5 and "and 1 more; 2 files that are not plain files" in err, err
    assert err.rstrip().endswith(": pipe.txt, sub/gone.jsonl"), err


@pytest.mark.parametrize("files", [[], UNREAD], ids=["empty folder", "no readable file"])
def test_a_folder_with_nothing_to_read_is_refused(files, tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (tmp_path / "ok.txt").write_text(NORMAL)
    for name in files:
        (folder / name).write_bytes(b"a,b\n")
    err = refused(data.main, ["--train", str(tmp_path / "ok.txt"), "--val", f"v={folder}",
                              "--out", str(tmp_path / "out")], capsys)
    assert f"--val v=: the folder {str(folder)!r} holds no file of a kind data.py reads (.txt, .md, .json" in err, err
    if not files:
        assert "it holds nothing" in err, err
    else:
        assert "it holds 6 files: .bz2 ×2, " in err and all(k in err for k in (".csv", "README", ".DS_Store", ".tsv")), err


@pytest.mark.parametrize("name", ["d.bz2", "d.txt.xz", "d.zip", "d.jsonl.lz4", "d.tar", "d.7z"])
def test_a_named_archive_of_no_kind_is_refused(name, tmp_path, capsys):
    (tmp_path / name).write_bytes(b"BZh91AY&SY")
    err = refused(data.main, ["--train", str(tmp_path / name), "--out", str(tmp_path / "out")], capsys)
    assert f"{name}' is an archive or compressed file of no kind data.py reads: expected" in err, err
