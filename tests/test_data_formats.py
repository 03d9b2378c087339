"""data.py's input kinds beyond .txt, .md and .jsonl: parquet and gzip- or zstd-compressed text and JSON
lines give the token files that the plain files give; damage is named (file, row group or offset) and
leaves nothing written; a kind whose package is missing is refused with the line that installs it."""
import gzip
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

import data

from harness import sources
from tests.conftest import make_text, refused

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

DOCS = [make_text(i, 300 + 40 * i) for i in range(12)] + ["", "CR LF\r\nline ünï — “x”\r\n", make_text(99, 4000)]


def jsonl_bytes(docs, field="text"):
    return "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()


def write_kinds(folder, docs=DOCS):
    """The same documents as .jsonl, .jsonl.gz, .json.gz, .jsonl.zst and .parquet (row groups of 4 rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = jsonl_bytes(docs)
    (folder / "d.jsonl").write_bytes(raw)
    (folder / "d.jsonl.gz").write_bytes(gzip.compress(raw))
    (folder / "d.json.gz").write_bytes(gzip.compress(raw, mtime=1))  # not the bytes of d.jsonl.gz
    (folder / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), folder / "d.parquet", row_group_size=4)
    return folder


def prepared(tmp_path, name, train, tokenizer="byte", **kw):
    out = tmp_path / name
    meta = data.prepare_files(out, train, {}, tokenizer, workers=1, **kw)
    return meta["splits"]["train"], (out / "train.bin").read_bytes()


@pytest.mark.parametrize("tokenizer", ["byte", "cl100k_base"])
def test_parquet_gz_and_zst_give_the_token_files_of_jsonl(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_CHARS", 1000)  # long documents go out in pieces: the cuts are the same too
    src = write_kinds(tmp_path / "src")
    want_stats, want = prepared(tmp_path, "jsonl", [str(src / "d.jsonl")], tokenizer)
    for name in ("d.jsonl.gz", "d.json.gz", "d.jsonl.zst", "d.parquet"):
        stats, got = prepared(tmp_path, name, [str(src / name)], tokenizer)
        assert got == want, name
        assert {k: stats[k] for k in ("tokens", "chars", "bytes", "documents")} == \
            {k: want_stats[k] for k in ("tokens", "chars", "bytes", "documents")}, name


def test_compressed_text_gives_the_tokens_of_the_text(tmp_path):
    text = make_text(5, 3000).encode()
    (tmp_path / "a.txt").write_bytes(text)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text))
    (tmp_path / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    want = prepared(tmp_path, "txt", [str(tmp_path / "a.txt")])[1]
    assert prepared(tmp_path, "gz", [str(tmp_path / "a.txt.gz")])[1] == want
    assert prepared(tmp_path, "zst", [str(tmp_path / "a.txt.zst")])[1] == want


def test_several_frames_and_members_are_read_whole(tmp_path):
    """zstd -T and pzstd write several frames, and a concatenated .gz has several members: all of it is text."""
    halves = jsonl_bytes(DOCS[:6]), jsonl_bytes(DOCS[6:])
    z = zstandard.ZstdCompressor()
    (tmp_path / "m.jsonl.zst").write_bytes(z.compress(halves[0]) + z.compress(halves[1]))
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(halves[0]) + gzip.compress(halves[1]))
    (tmp_path / "m.jsonl").write_bytes(halves[0] + halves[1])
    want = list(sources.read_documents(tmp_path / "m.jsonl"))
    assert len(want) == len(DOCS) - 1  # the empty document is dropped
    assert list(sources.read_documents(tmp_path / "m.jsonl.zst")) == want
    assert list(sources.read_documents(tmp_path / "m.jsonl.gz")) == want


def test_a_folder_of_every_kind_mixed_with_the_plain_ones(tmp_path):
    src = write_kinds(tmp_path / "src")
    (src / "notes.md").write_text("# notes\n" + make_text(7, 200))
    (src / "skip.csv").write_text("a,b\n")  # no kind data.py reads: a folder leaves it out, and names it
    files = [p.name for p in sources.expand_sources([str(src)])]
    assert files == ["d.json.gz", "d.jsonl", "d.jsonl.gz", "d.jsonl.zst", "d.parquet", "notes.md"]
    assert [p.name for p in sources.expand_sources([str(src / "*.parquet"), str(src / "d.j*")])] == \
        ["d.parquet", "d.json.gz", "d.jsonl", "d.jsonl.gz", "d.jsonl.zst"]
    (src / "again.json.gz").write_bytes((src / "d.json.gz").read_bytes())  # a source is hashed as it is on disk
    with pytest.raises(ValueError, match=r"d.json.gz holds the same bytes as --train .*again.json.gz"):
        data.prepare_files(tmp_path / "o", [str(src)], {}, "byte", workers=1)
    (src / "again.json.gz").unlink()
    meta = data.prepare_files(tmp_path / "o", [str(src / "d.parquet")], {"val": [str(src / "d.jsonl.zst")]}, "byte",
                              workers=1)
    assert [s["path"].rsplit("/", 1)[1] for s in meta["sources"]] == ["d.parquet", "d.jsonl.zst"]
    assert meta["splits"]["val"]["documents"] == meta["splits"]["train"]["documents"] == len(DOCS) - 1  # "" dropped
    assert meta["splits"]["val"]["empty_documents"] == meta["splits"]["train"]["empty_documents"] == 1


def test_the_text_column_is_chosen_with_text_field(tmp_path):
    pq.write_table(pa.table({"body": ["one doc", "two"], "n": [1, 2]}), tmp_path / "b.parquet")
    assert [t for t, _ in sources.read_documents(tmp_path / "b.parquet", "body")] == ["one doc", "two"]
    with pytest.raises(ValueError, match=r"b.parquet: no column 'text' \(it has body, n\): name the column"):
        list(sources.read_documents(tmp_path / "b.parquet"))
    with pytest.raises(ValueError, match=r"b.parquet: the column 'n' holds int64, expected strings"):
        list(sources.read_documents(tmp_path / "b.parquet", "n"))
    pq.write_table(pa.table({"text": ["a", "b", "c", None]}), tmp_path / "null.parquet", row_group_size=3)
    with pytest.raises(ValueError, match=r"null.parquet: row group 1, row 0: the column 'text' is null"):
        list(sources.read_documents(tmp_path / "null.parquet"))


def damaged(tmp_path):
    """{file name: what its error must say}: truncated, bit-flipped and mislabelled archives and parquet files."""
    src = write_kinds(tmp_path / "src", DOCS * 20)
    bad = tmp_path / "bad"
    bad.mkdir()
    gz, zst, par = ((src / n).read_bytes() for n in ("d.jsonl.gz", "d.jsonl.zst", "d.parquet"))
    (bad / "cut.jsonl.gz").write_bytes(gz[:len(gz) // 2])
    (bad / "cut.jsonl.zst").write_bytes(zst[:len(zst) // 2])
    (bad / "plain.jsonl.zst").write_bytes(b'{"text": "not compressed"}\n')
    (bad / "plain.txt.gz").write_bytes(b"not compressed at all\n")
    (bad / "cut.parquet").write_bytes(par[:len(par) // 2])
    pages = bytearray(par)
    pages[4:4000] = bytes(b ^ 0x5A for b in pages[4:4000])  # the first row group's pages, footer intact
    (bad / "pages.parquet").write_bytes(bytes(pages))
    return bad, {
        "cut.jsonl.gz": r"cut.jsonl.gz: damaged gzip data after [\d,]+ bytes of its contents \(EOFError",
        "cut.jsonl.zst": r"cut.jsonl.zst: damaged zstd data after [\d,]+ bytes .*ends inside a zstd frame",
        "plain.jsonl.zst": r"plain.jsonl.zst: damaged zstd data after 0 bytes",
        "plain.txt.gz": r"plain.txt.gz: damaged gzip data after 0 bytes .*Not a gzipped file",
        "cut.parquet": r"cut.parquet: not a readable parquet file",
        "pages.parquet": r"pages.parquet: row group 0 \(of \d+\) cannot be read"}


def test_damaged_inputs_are_named_and_nothing_is_half_written(tmp_path, capsys):
    bad, messages = damaged(tmp_path)
    out = tmp_path / "out"
    data.prepare_files(out, [str(tmp_path / "src" / "d.jsonl")], {}, "byte", workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for name, message in messages.items():
        for workers in ("--workers=1", "--workers=2"):
            err = refused(data.main, ["--train", str(bad / name), "--out", str(out), "--overwrite", workers], capsys)
            assert err.count("\n") == 1 and re.search(message, err), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the prepared data is as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "out", "src"]  # no folder left beside it


def test_a_kind_whose_package_is_missing_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    src = write_kinds(tmp_path / "src")
    for module, package, name in (("zstandard", "zstandard", "d.jsonl.zst"), ("pyarrow.parquet", "pyarrow", "d.parquet")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # the import fails, as when the package is not installed
            err = refused(data.main, ["--train", str(src / "d.jsonl"), str(src / name), "--out", str(tmp_path / "o")],
                          capsys)
        assert f"{name}: reading " in err and f"needs the {package} package: pip install {package}" in err
        assert not (tmp_path / "o").exists()


def test_compressed_files_of_no_known_kind_are_refused(tmp_path, capsys):
    (tmp_path / "t.csv.gz").write_bytes(gzip.compress(b"a,b\n"))
    err = refused(data.main, ["--train", str(tmp_path / "t.csv.gz"), "--out", str(tmp_path / "o")], capsys)
    assert "t.csv.gz' is an archive or compressed file of no kind data.py reads: expected .txt.gz, .txt.zst, " in err


def documented_command(program):
    """The `python <program>` command of docs/data.md's worked example, its continued lines joined."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "data.md").read_text(encoding="utf-8")
    section = page.split("## A worked example: FineWeb-Edu", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return next(line.split("#")[0].strip() for line in block.splitlines() if line.startswith(f"python {program}"))


def test_the_worked_example_on_a_small_local_parquet_file(tmp_path, monkeypatch, capsys):
    """FineWeb-Edu's file names and columns, a few documents each: the documented data.py command prepares
    data/web, a run trains on it, and sweep-gpu's plan refuses the few tokens with the numbers."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "web" / "fineweb-edu" / "sample" / "10BT"
    folder.mkdir(parents=True)
    for name, seed in (("000_00000.parquet", 0), ("013_00000.parquet", 1)):
        texts = [make_text(100 * seed + i, 400) for i in range(40)]
        n = len(texts)
        pq.write_table(pa.table({
            "text": texts, "id": [f"<urn:uuid:{seed}-{i}>" for i in range(n)], "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.org/{i}" for i in range(n)], "file_path": ["s3://x.warc.gz"] * n,
            "language": ["en"] * n, "language_score": [0.95] * n, "token_count": [100] * n, "score": [3.1] * n,
            "int_score": [3] * n}), folder / name, row_group_size=16)
    argv = shlex.split(documented_command("data.py"))
    data.main(argv[2:] + ["--workers=1"])
    meta = data.load_meta("data/web")
    assert meta["tokenizer"] == "cl100k_base" and set(meta["splits"]) == {"train", "val"}
    assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 40
    import train
    from tests.conftest import TINY_MODEL
    train.main(TINY_MODEL + ["--data=data/web", "--out_dir=run", "--iters=2", "--batch_seqs=2", "--eval_tokens=256",
                             "--sample_tokens=0"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["finished"]
    import sweep
    plan = shlex.split(documented_command("sweep.py plan"))
    assert plan[2:] == ["plan", "configs/sweep-gpu.toml"]
    err = refused(sweep.main, ["plan", str(Path(sweep.__file__).parent / plan[3])], capsys)
    assert "unique_tokens=" in err and "is more than the training split holds" in err
