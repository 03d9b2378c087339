"""Nothing lost off the tested path: destructive steps last, no link followed, identity checked, one set of
rules for the planner and the trainer, every file read checked, and Ctrl-C or SIGTERM ending in one line
with a run that resumes exactly."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data
import evaluate
import sweep
import train

from harness import checkpoint
from harness import preflight
from harness import rundir
from harness import safe_io
from harness import sweep_jobs
from tests.conftest import TINY_MODEL, finished_summary, make_text, micro_sweep, refused, snapshot, tiny, tiny_run_argv

ROOT = Path(__file__).resolve().parent.parent


def copy_data(tiny_data, to):
    import shutil
    shutil.copytree(tiny_data, to)
    return to


# ----------------------------------------------------------------------------- destroy last
@pytest.mark.parametrize("bad", [["--Dm=1000000000000"], ["--lr=5"], ["--min_lr=0.5", "--lr=0.01"], ["--L=100000"],
                                 ["--batch_seqs=100000000"], ["--vocab_size=100"], ["--data=/nonexistent"]])
def test_overwrite_that_fails_its_checks_deletes_nothing(finished, tiny_data, capsys, bad):
    before = snapshot(finished)
    refused(train.main, tiny(tiny_data, finished, "--overwrite=true", *bad), capsys)
    assert snapshot(finished) == before


def test_overwrite_that_fails_after_the_old_run_was_moved_aside_puts_it_back(finished, tiny_data, monkeypatch):
    before = snapshot(finished)

    def broken(*args, **kwargs):
        raise RuntimeError("the model could not be built")
    monkeypatch.setattr(train, "GPT", broken)
    with pytest.raises(RuntimeError, match="could not be built"):
        train.train(tiny(tiny_data, finished, "--overwrite=true", "--seed=9"))
    assert snapshot(finished) == before  # and no .replaced/ left behind


def test_overwrite_refuses_a_run_folder_with_files_no_run_writes(finished, tiny_data, capsys):
    (finished / "summary.json").unlink()
    (finished / "summary.json").mkdir()
    (finished / "summary.json" / "notes.txt").write_text("mine")
    before = snapshot(finished)
    err = refused(train.main, tiny(tiny_data, finished, "--overwrite=true"), capsys)
    assert "summary.json is a folder where a run keeps a file" in err and snapshot(finished) == before


@pytest.mark.parametrize("name,content,message", [
    ("ckpt.pt", b"weights I downloaded", "ckpt.pt is not a checkpoint of train.py"),
    ("log.jsonl", b"my notes\n", "log.jsonl holds no record of a run"),
    ("summary.json", b'{"mine": 1}', "summary.json is not a run's summary"),
    ("config.toml", b"[train]\niters = 5\n", "config.toml is not a run's config")])
def test_overwrite_refuses_run_file_names_holding_something_else(tiny_data, tmp_path, capsys, name, content, message):
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / name).write_bytes(content)
    assert message in refused(train.main, tiny(tiny_data, tmp_path / "u", "--overwrite=true"), capsys)
    assert (tmp_path / "u" / name).read_bytes() == content


def test_only_this_runs_own_temporary_files_are_cleared(tiny_data, tmp_path):
    (tmp_path / "u").mkdir()
    mine = {".draft.1.tmp": "important", ".ckpt.pt.1.tmp": "pid 1 is alive"}
    for name, text in mine.items():
        (tmp_path / "u" / name).write_text(text)
    (tmp_path / "u" / ".ckpt.pt.999999999.tmp").write_text("a killed writer's")
    train.train(tiny(tiny_data, tmp_path / "u"))
    assert {n: (tmp_path / "u" / n).read_text() for n in mine} == mine
    assert not (tmp_path / "u" / ".ckpt.pt.999999999.tmp").exists()


def test_hard_links_are_never_written_through(tiny_data, tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (tmp_path / "hl").mkdir()
    os.link(precious, tmp_path / "hl" / ".lock")
    assert "other hard link" in refused(train.main, tiny(tiny_data, tmp_path / "hl"), capsys)
    out = tmp_path / "r"
    train.train(tiny(tiny_data, out, "--stop_at=3"))
    os.link(out / "log.jsonl", tmp_path / "log-copy.jsonl")
    assert "log.jsonl is a file with 1 other hard link" in refused(train.main, tiny(tiny_data, out) + ["--resume"], capsys)
    assert precious.read_text() == "keep me"


def test_outputs_are_written_only_over_their_own_kind(finished, tmp_path, capsys):
    summary = (finished / "summary.json").read_bytes()
    err = refused(bench_main, ["expert", "--T=64", "--Dm=32", "--E=4", "--K=2", "--De=16", "--rounds=1", "--warmup=0",
                               "--compile=false", f"--json={finished / 'summary.json'}"], capsys)
    assert "summary.json exists and is not a bench.py result" in err and (finished / "summary.json").read_bytes() == summary
    (finished.parent / "report.md").write_text("# my notes")
    assert "report.md exists and is not a sweep report" in refused(sweep.main, ["report", str(finished.parent)], capsys)
    assert (finished.parent / "report.md").read_text() == "# my notes"


def bench_main(argv):
    from dev import bench
    bench.main(argv)


def test_overwrite_replaces_only_what_train_wrote(finished, tiny_data, tmp_path, capsys):
    before = snapshot(finished)
    (finished / "ckpt").mkdir()
    (finished / "ckpt" / "analysis.ipynb").write_text("mine")
    err = refused(train.main, tiny(tiny_data, finished, "--overwrite=true"), capsys)
    assert "ckpt holds files that are no checkpoint (analysis.ipynb)" in err
    err = refused(train.main, tiny(tiny_data, finished) + ["--resume"], capsys)
    assert "analysis.ipynb" in err and (finished / "ckpt" / "analysis.ipynb").read_text() == "mine"
    (finished / "ckpt" / "analysis.ipynb").unlink()
    (finished / "ckpt" / "step-00000099").mkdir()  # a folder named like a checkpoint's, holding a notebook
    (finished / "ckpt" / "step-00000099" / "notes.ipynb").write_text("mine")
    err = refused(train.main, tiny(tiny_data, finished, "--overwrite=true"), capsys)
    assert "ckpt holds files that are no checkpoint (step-00000099/notes.ipynb)" in err
    (finished / "ckpt" / "step-00000099" / "notes.ipynb").unlink()
    (finished / "ckpt" / "step-00000099").rmdir()
    (finished / "ckpt").rmdir()
    assert snapshot(finished) == before
    # a config file that the user wrote where a run keeps its config.toml, given to this very command
    mine = tmp_path / "exp"
    mine.mkdir()
    (mine / "config.toml").write_text("# my experiment\n[train]\niters = 6\n")
    argv = [str(mine / "config.toml")] + tiny(tiny_data, mine, "--overwrite=true")
    assert "is the config file of this command" in refused(train.main, argv, capsys)
    argv = tiny(tiny_data, mine, "--overwrite=true")
    assert "config.toml is not a run's config" in refused(train.main, argv, capsys)
    assert (mine / "config.toml").read_text().startswith("# my experiment")


def test_a_failing_compiler_is_found_before_the_old_run_goes(finished, tiny_data, capsys, monkeypatch):
    before = snapshot(finished)

    def no_compiler(fn, *args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
    monkeypatch.setattr(train.torch, "compile", no_compiler)
    preflight.check_compile.cache_clear()
    err = refused(train.main, tiny(tiny_data, finished, "--overwrite=true", "--compile=true"), capsys)
    preflight.check_compile.cache_clear()
    assert "train.compile=true: torch.compile does not work on cpu here" in err and snapshot(finished) == before


def test_an_aside_that_is_a_link_or_a_half_restored_run_is_handled_whole(finished, tiny_data, tmp_path, capsys):
    before = snapshot(finished)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine")
    (finished / ".replaced").symlink_to(elsewhere)
    err = refused(train.main, tiny(tiny_data, finished) + ["--resume"], capsys)
    assert ".replaced is not a folder an --overwrite made" in err
    assert sorted(p.name for p in elsewhere.iterdir()) == ["notes.txt"]
    (finished / ".replaced").unlink()
    # a restore stopped halfway (a second Ctrl-C, a kill): the marker goes first, and the next start finishes it
    (finished / ".replaced").mkdir()
    for name in ("ckpt.pt", "log.jsonl"):
        (finished / name).rename(finished / ".replaced" / name)
    summary = train.train(tiny(tiny_data, finished) + ["--resume"])
    assert "the old run is put back" in capsys.readouterr().err and summary["finished"]
    assert snapshot(finished) == before
    # the same names on both sides: nobody can tell which is whose, so nothing is touched
    (finished / ".replaced").mkdir()
    (finished / ".replaced" / "log.jsonl").write_text("")
    err = refused(train.main, tiny(tiny_data, finished) + ["--resume"], capsys)
    assert "holds files of the same names (log.jsonl)" in err

def test_a_failed_data_overwrite_leaves_the_prepared_data_as_it_was(tiny_data, tmp_path, capsys):
    prepared = copy_data(tiny_data, tmp_path / "prepared")
    before = snapshot(prepared)
    (tmp_path / "train.txt").write_text(make_text(1, 3000))
    (tmp_path / "bad.txt").write_bytes(b"valid text\n\xff\xfe not UTF-8")
    err = refused(data.main, ["--train", str(tmp_path / "train.txt"), "--val", str(tmp_path / "bad.txt"),
                              "--out", str(prepared), "--overwrite", "--workers=1"], capsys)
    assert "bad.txt: invalid UTF-8" in err and snapshot(prepared) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "prepared", "train.txt"]  # no temporary folder


@pytest.mark.parametrize("files,message", [
    ({"thesis.tex": "years of work"}, "holds files and no meta.json of data.py (thesis.tex)"),
    ({"firmware.bin": "not tokens"}, "holds files and no meta.json of data.py (firmware.bin)"),  # .bin alone is no data
    ({"meta.json/thesis.tex": "a folder named meta.json"}, "holds files and no meta.json of data.py (meta.json)"),
    ({"meta.json": '{"model_type": "gpt2"}', "pytorch_model.bin": "weights"}, "no meta.json of data.py (meta.json, "),
    ({"meta.json": '{"format": 3, "splits": {"train": {"file": "train.bin"}}}', "train.bin": "", "val.bin": "mine"},
     "holds other files than prepared data (val.bin)"),
])
def test_data_is_prepared_only_into_a_new_empty_or_prepared_folder(tmp_path, capsys, files, message):
    for name, text in files.items():
        (tmp_path / "mine" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "mine" / name).write_text(text)
    before = snapshot(tmp_path / "mine")
    (tmp_path / "t.txt").write_text(make_text(2, 500))
    for flags in ([], ["--overwrite"]):
        err = refused(data.main, ["--train", str(tmp_path / "t.txt"), "--out", str(tmp_path / "mine"), *flags], capsys)
        assert message in err and snapshot(tmp_path / "mine") == before


def test_prepared_data_keeps_the_usual_permissions_and_no_temporary_folder(tmp_path):
    (tmp_path / "t.txt").write_text(make_text(2, 500))
    (tmp_path / ".d.999999999.tmp").mkdir()  # what a data.py killed by SIGKILL left (its process is no more)
    data.prepare_files(tmp_path / "d", [str(tmp_path / "t.txt")], {}, workers=1)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "t.txt"]


def test_prepared_data_is_replaced_whole(tiny_data, tmp_path):
    prepared = copy_data(tiny_data, tmp_path / "prepared")
    (tmp_path / "t.txt").write_text(make_text(4, 3000))
    (tmp_path / "v.txt").write_text(make_text(5, 600))
    meta = data.prepare_files(prepared, [str(tmp_path / "t.txt")], {"val": [str(tmp_path / "v.txt")]}, workers=1,
                              overwrite=True)
    assert sorted(p.name for p in prepared.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # other.bin is gone
    assert data.load_meta(prepared) == meta and len(data.open_split(prepared, "val")) == meta["splits"]["val"]["tokens"]


# ----------------------------------------------------------------------------- no link followed


@pytest.mark.parametrize("name", ["ckpt.pt", "log.jsonl", "config.toml", "summary.json"])
def test_a_run_file_that_is_a_link_is_refused(finished, tiny_data, tmp_path, capsys, name):
    target = tmp_path / f"elsewhere-{name}"
    (finished / name).rename(target)
    (finished / name).symlink_to(target)
    before, kept = snapshot(finished), target.read_bytes()
    for extra in (["--resume"], ["--overwrite=true"]):
        err = refused(train.main, tiny(tiny_data, finished) + extra, capsys)
        assert f"{name} is a symbolic link" in err
    assert snapshot(finished) == before and target.read_bytes() == kept


def test_a_fifo_or_a_dangling_link_where_a_run_keeps_a_file_is_refused_without_hanging(finished, tiny_data, tmp_path,
                                                                                     capsys):
    (finished / "summary.json").unlink()
    os.mkfifo(finished / "summary.json")
    assert "summary.json is not a plain file" in refused(train.main, tiny(tiny_data, finished) + ["--resume"], capsys)
    (tmp_path / "fresh").mkdir()
    os.mkfifo(tmp_path / "fresh" / ".lock")
    assert ".lock is not a plain file" in refused(train.main, tiny(tiny_data, tmp_path / "fresh"), capsys)
    fifo_data = copy_data(tiny_data, tmp_path / "fifo-data")
    (fifo_data / "meta.json").unlink()
    os.mkfifo(fifo_data / "meta.json")
    assert "meta.json is not a plain file" in refused(train.main, tiny(fifo_data, tmp_path / "r2"), capsys)
    os.mkfifo(tmp_path / "sweep.toml")
    assert "sweep.toml is not a plain file" in refused(sweep.main, ["plan", str(tmp_path / "sweep.toml")], capsys)
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    assert "train.out_dir=" in refused(train.main, tiny(tiny_data, tmp_path / "gone"), capsys)

# ----------------------------------------------------------------------------- identity
def test_resume_on_data_prepared_again_with_other_contents_is_refused(tiny_data, tmp_path, capsys):
    prepared = copy_data(tiny_data, tmp_path / "prepared")
    out = tmp_path / "run"
    train.train(tiny(prepared, out, "--stop_at=3"))
    groups = {}
    for s in data.load_meta(prepared)["sources"]:
        groups.setdefault(s["split"], []).append(s["path"])
    data.prepare_files(prepared, groups.pop("train"), groups, workers=1, shuffle_seed=99, overwrite=True)
    before = snapshot(out)
    err = refused(train.main, tiny(prepared, out) + ["--resume"], capsys)
    assert "data split 'train' of" in err and "prepared again with other contents" in err
    assert snapshot(out) == before


def fake_runs(monkeypatch, bpc=2.5):
    """sweep.run_all writing, for each run, the summary train.py would write (training itself is tested elsewhere)."""
    def fake(todo, total, s, over, out, nproc, slots):
        for _, r in todo:
            (out / r.name).mkdir(parents=True, exist_ok=True)
            (out / r.name / "summary.json").write_text(json.dumps(finished_summary(r, s, over, out, bpc)))
    monkeypatch.setattr(sweep, "run_all", fake)


def test_a_sweep_edited_after_its_runs_finished_is_refused_not_reused(tiny_data, tmp_path, monkeypatch, capsys):
    fake_runs(monkeypatch)
    out = tmp_path / "out"
    sweep.run_sweep(micro_sweep(tmp_path, tiny_data), out)
    before = snapshot(out)
    err = refused(sweep.main, ["run", str(micro_sweep(tmp_path, tiny_data, compute="3e9")), f"--out={out}"], capsys)
    assert "holds runs of another plan" in err and "dense-2C: train.iters: run " in err and "train.lr: run" in err
    assert snapshot(out) == before
    # and a finished run on data that has since changed is refused too
    summary = json.loads((out / "dense-C" / "summary.json").read_text())
    summary["data"]["splits"]["val"] = "0" * 64
    (out / "dense-C" / "summary.json").write_text(json.dumps(summary))
    err = refused(sweep.main, ["run", str(micro_sweep(tmp_path, tiny_data)), f"--out={out}"], capsys)
    assert "dense-C: data split 'val'" in err


def test_the_report_refuses_a_run_of_another_plan(tiny_data, tmp_path, monkeypatch, capsys):
    fake_runs(monkeypatch)
    out = tmp_path / "out"
    sweep.run_sweep(micro_sweep(tmp_path, tiny_data), out)
    summary = json.loads((out / "dense-2C" / "summary.json").read_text())
    summary["D"] += 1
    (out / "dense-2C" / "summary.json").write_text(json.dumps(summary))
    err = refused(sweep.main, ["report", str(out)], capsys)
    assert "dense-2C/summary.json is a run of another plan" in err and "D: run" in err


def test_resume_before_the_first_checkpoint_keeps_the_runs_config(tiny_data, tmp_path, capsys):
    out = tmp_path / "r"
    train.train(tiny(tiny_data, out, "--stop_at=3"))
    (out / "ckpt.pt").unlink()  # as a run killed before its first checkpoint leaves its folder
    (out / "summary.json").unlink()
    err = refused(train.main, tiny(tiny_data, out, "--seed=99") + ["--resume"], capsys)
    assert "has no checkpoint yet, and its config.toml is not this run's" in err and "train.seed: config.toml 1337, now 99" in err
    assert train.train([f"--out_dir={out}", "--resume"])["finished"]


@pytest.mark.parametrize("edit,message", [
    (lambda m: {**m, "tokenizer": "cl100k_base"}, "it says tokenizer cl100k_base has 256 tokens (end of text None), "
                                                  "which has 100,277"),
    (lambda m: {**m, "vocab_size": 50000, "dtype": "uint16"}, "it says tokenizer byte has 50,000 tokens"),
    (lambda m: {**m, "tokenizer": "nonesuch"}, "its tokenizer 'nonesuch' cannot be loaded here")])
def test_a_meta_json_whose_tokenizer_disagrees_is_refused(tiny_data, tmp_path, capsys, edit, message):
    prepared = copy_data(tiny_data, tmp_path / "prepared")
    (prepared / "meta.json").write_text(json.dumps(edit(json.loads((prepared / "meta.json").read_text()))))
    err = refused(train.main, tiny(prepared, tmp_path / "r"), capsys)
    assert message in err and not (tmp_path / "r").exists()


def test_a_log_whose_numbers_are_not_numbers_is_named(tiny_data, tmp_path, capsys):
    out = tmp_path / "r"
    train.train(tiny(tiny_data, out))
    (out / "log.jsonl").write_text((out / "log.jsonl").read_text().replace('"bpc_val": ', '"bpc_val": "oops", "x": '))
    (out / "summary.json").unlink()
    assert "finite bits per character" in refused(train.main, tiny(tiny_data, out) + ["--resume"], capsys)


def test_a_run_folder_named_in_any_unicode_resumes(tiny_data, tmp_path):
    out = tmp_path / "run 😀 ü"
    train.train(tiny(tiny_data, out, "--stop_at=3"))
    assert train.train([f"--out_dir={out}", "--resume"])["finished"]


def test_evaluate_on_the_runs_own_data_checks_it_is_still_that_data(tiny_data, tmp_path, capsys):
    import evaluate
    prepared = copy_data(tiny_data, tmp_path / "prepared")
    out = tmp_path / "r"
    train.train(tiny(prepared, out))
    meta = data.load_meta(prepared)
    groups = {}
    for s in meta["sources"]:
        groups.setdefault(s["split"], []).append(s["path"])
    data.prepare_files(prepared, groups.pop("train"), {"val": groups["val"]}, workers=1, overwrite=True)
    err = refused(evaluate.main, [str(out)], capsys)
    assert "was trained on other data" in err and "data split 'other'" in err
    assert evaluate.main([str(out), f"--data={prepared}"])["val"] > 0


def test_a_sweep_runs_its_children_where_it_was_started(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = sweep_jobs.Job("[1/1]", "r", tmp_path / "r", [sys.executable, "-c", "import os; open('here', 'w').write(os.getcwd())"],
                         1.0, 1)
    assert sweep_jobs.run_jobs([job], [{}]) == []
    assert (tmp_path / "here").read_text() == str(tmp_path)

# ----------------------------------------------------------------------------- one set of rules
def test_the_planner_refuses_what_train_refuses(tiny_data, tmp_path, capsys):
    k_list = micro_sweep(tmp_path, tiny_data)
    k_list.write_text(k_list.read_text().replace("ra = [0.413, 0.496]", "K = [2, 3]\nDe = 12"))
    err = refused(sweep.main, ["plan", str(k_list)], capsys)
    assert "train.py refuses it: De=12 is not allowed: expected a multiple of 8" in err
    over = micro_sweep(tmp_path, tiny_data, extra="")
    over.write_text(over.read_text().replace("eval_tokens = 512", "eval_tokens = 512\nmin_lr = 0.5"))
    err = refused(sweep.main, ["plan", str(over)], capsys)
    assert "train.min_lr=0.5 is above train.lr=0.0104" in err


@pytest.mark.parametrize("argv,message", [
    (["--iters=0", "--tokens=10"], "train.tokens=10 buys 10 tokens, less than half a step"),
    (["--iters=0", "--compute=1"], "train.compute=1 buys"),
    (["--unique_tokens=0.5"], "train.unique_tokens=0.5 is not allowed: expected a whole number of tokens"),
    (["--gpu_mem=1"], "train.gpu_mem=1.0 is not allowed: expected more than the 2 GiB"),
    (["--lr=0.001", "--min_lr=0.01"], "train.min_lr=0.01 is above train.lr=0.001"),
    (["--min_lr=0.9"], "train.min_lr=0.9 is above the peak, the StepLaw rate"),
    (["--lr=0.5", "--weight_decay=5"], "AdamW multiplies every weight by 1 − lr·weight_decay"),
    (["--S=20000"], "fewer than one evaluation window of S+1 = 20001"),
])
def test_meaningless_schedules_and_shapes_are_refused_before_any_file(tiny_data, tmp_path, capsys, argv, message):
    err = refused(train.main, tiny(tiny_data, tmp_path / "r", "--eval_tokens=0", *argv), capsys)
    assert message in err and not (tmp_path / "r").exists()


def test_a_split_too_short_to_evaluate_is_refused_before_training_or_evaluating(tmp_path, capsys, finished):
    (tmp_path / "t.txt").write_text(make_text(1, 3000))
    (tmp_path / "v.txt").write_text("just a few words\n")
    data.prepare_files(tmp_path / "d", [str(tmp_path / "t.txt")], {"val": [str(tmp_path / "v.txt")]}, workers=1)
    err = refused(train.main, tiny(tmp_path / "d", tmp_path / "r"), capsys)
    n = data.load_meta(tmp_path / "d")["splits"]["val"]["tokens"]
    says = f"val.bin (split 'val') holds {n} tokens, fewer than one evaluation window of S+1 = 33"
    assert says in err and not (tmp_path / "r").exists()
    err = refused(evaluate.main, [str(finished), f"--data={tmp_path / 'd'}"], capsys)  # the run's S is 32 too
    assert says in err and "leave it out with --splits" in err
    with pytest.raises(ValueError, match="the val split holds 1 token"):
        data.prepare(tmp_path / "e", {"train": [("some text", True)], "val": [("x", False)]}, workers=1)
    assert not (tmp_path / "e").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["d", "run", "t.txt", "v.txt"]


def test_resume_never_goes_back_and_keeps_the_bpc_of_the_step_it_stops_at(tiny_data, tmp_path, capsys):
    out = tmp_path / "r"
    first = train.train(tiny(tiny_data, out, "--stop_at=3"))  # step 3 is evaluated (eval_interval 3)
    again = train.train([f"--out_dir={out}", "--resume", "--stop_at=3"])
    assert first["final"] and again["final"] == first["final"]
    train.train([f"--out_dir={out}", "--resume", "--stop_at=4"])
    err = refused(train.main, [f"--out_dir={out}", "--resume", "--stop_at=2"], capsys)
    assert "train.stop_at=2 is before step 4" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is here")
def test_a_device_that_is_not_here_is_refused(tiny_data, tmp_path, capsys):
    err = refused(train.main, tiny(tiny_data, tmp_path / "r", "--device=cuda"), capsys)
    assert "train.device=cuda: no such CUDA device here" in err and not (tmp_path / "r").exists()

# ----------------------------------------------------------------------------- every file read is checked
def damaged_copy(tiny_data, tmp_path, split, change):
    prepared = copy_data(tiny_data, tmp_path / "prepared")
    path = prepared / f"{split}.bin"
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(change(raw)))
    return prepared


# the val split's token count n and bytes per token b (uint16: 2) → what the message must say
@pytest.mark.parametrize("change,message", [
    (lambda raw: raw + b"\x00", lambda n, b: f"its {n * b + 1:,} bytes are no whole number of {b}-byte tokens"),
    (lambda raw: raw + b"\x00\x00", lambda n, b: f"holds {n + 1:,} tokens but meta.json says {n:,}"),
    (lambda raw: raw[:-2], lambda n, b: f"holds {n - 1:,} tokens but meta.json says {n:,}"),
    (lambda raw: raw[:10] + b"\xff\x7f" + raw[12:],
     lambda n, b, id_=int.from_bytes(b"\xff\x7f", "little"): f"token {10 // b} is id {id_:,}, outside the vocabulary of 256"),
    (lambda raw: raw[:10] + bytes([raw[10] ^ 1]) + raw[11:], lambda n, b: "its sha256 is not the one in meta.json"),
])
def test_a_damaged_token_file_is_named_and_never_trained_on(tiny_data, tmp_path, capsys, change, message):
    prepared = damaged_copy(tiny_data, tmp_path, "val", change)
    meta = data.load_meta(tiny_data)
    message = message(meta["splits"]["val"]["tokens"], np.dtype(meta["dtype"]).itemsize)
    err = refused(train.main, tiny(prepared, tmp_path / "r"), capsys)
    assert f"{prepared / 'val.bin'}" in err and message in err and not (tmp_path / "r").exists()
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("edit,message", [
    (lambda m: {**m, "vocab_size": "256"}, "no tokenizer name and vocab_size"),
    (lambda m: {**m, "dtype": "uint8"}, "dtype 'uint8' does not hold a vocabulary of 256"),
    (lambda m: {**m, "splits": {**m["splits"], "val": {**m["splits"]["val"], "file": "../../etc/passwd"}}},
     "split 'val' names the file '../../etc/passwd', expected val.bin"),
    (lambda m: {**m, "splits": {**m["splits"], "val": {**m["splits"]["val"], "tokens": -3}}}, "split 'val' has no counts of tokens"),
    (lambda m: {**m, "splits": {k: v for k, v in m["splits"].items() if k != "train"}}, "no splits, or no train split"),
    (lambda m: {**m, "format": 1}, "it is of format 1, this data.py reads format 3"),
    (lambda m: [m], "not a JSON object"),
])
def test_a_damaged_meta_json_is_named(tiny_data, tmp_path, capsys, edit, message):
    prepared = copy_data(tiny_data, tmp_path / "prepared")
    meta = json.loads((prepared / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps(edit(meta)))
    err = refused(train.main, tiny(prepared, tmp_path / "r"), capsys)
    assert f"{prepared / 'meta.json'} was not read: {message}" in err


def test_a_log_line_that_is_no_record_is_named(tiny_data, tmp_path, capsys):
    train.train(tiny(tiny_data, tmp_path / "r", "--stop_at=4"))
    log = tmp_path / "r" / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2] + ["[1, 2, 3]"] + lines[2:]) + "\n")
    err = refused(train.main, tiny(tiny_data, tmp_path / "r") + ["--resume"], capsys)
    assert f"{log}:3 is damaged: expected a JSON object with a kind" in err


@pytest.mark.parametrize("edit", [lambda s: {**s, "final": "good"}, lambda s: {**s, "finished": "yes"},
                                  lambda s: {**s, "config": []}, lambda s: [s]])
def test_a_summary_with_wrong_fields_counts_as_damaged(finished, tiny_data, capsys, edit):
    summary = json.loads((finished / "summary.json").read_text())
    (finished / "summary.json").write_text(json.dumps(edit(summary)))
    assert sweep_jobs.status(finished) == "resumable"
    again = train.train(tiny(tiny_data, finished) + ["--resume"])
    assert "is damaged" in capsys.readouterr().err and again["final"] == summary["final"]


@pytest.mark.parametrize("plan", ['[{"name": 3}]', '{"runs": []}', "[" * 100000,
                                  '[{"name": "run", "arm": "a", "reuse": "weird", "kind": "moe", "shape": {}, "iters": 1, '
                                  '"batch_seqs": 1, "D": 1, "lr": 0.1, "warmup": 1}]'])
def test_a_damaged_plan_json_is_named(finished, capsys, plan):
    (finished.parent / "plan.json").write_text(plan)
    err = refused(sweep.main, ["report", str(finished.parent)], capsys)
    assert "plan.json is damaged" in err


def test_inputs_that_are_no_text_are_named(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(make_text(3, 500))
    (tmp_path / "s.jsonl").write_text('{"text": "fine"}\n{"text": "ok \\ud800"}\n')
    err = refused(data.main, ["--train", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "d"), "--workers=1"], capsys)
    assert "s.jsonl:2: the field 'text' holds a lone surrogate" in err
    err = refused(data.main, ["--train", str(tmp_path / "t.txt"), "--val", str(tmp_path / "t.txt"),
                              "--out", str(tmp_path / "d"), "--workers=1"], capsys)
    assert f"--val val={tmp_path / 't.txt'} holds the same bytes as --train {tmp_path / 't.txt'}" in err
    (tmp_path / "u.txt").write_text(make_text(4, 500))
    data.main(["--train", str(tmp_path / "t.txt"), "--train", str(tmp_path / "u.txt"), "--out", str(tmp_path / "e"),
               "--workers=1"])
    meta = data.load_meta(tmp_path / "e")
    assert [s["path"] for s in meta["sources"]] == [str(tmp_path / "t.txt"), str(tmp_path / "u.txt")]

# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM
def start(argv, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def wait_for(path, timeout=120):
    for _ in range(int(timeout / 0.05)):
        if path.exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def wait_for_tokens(proc, out, timeout=120):
    """Until data.py (proc) has written the first tokens of its training split into its temporary folder beside
    out: it is then mid-way, with most of the work still to do (a sleep instead would race a fast machine)."""
    part = out.parent / f".{out.name}.{proc.pid}.tmp" / "train.bin"
    for _ in range(int(timeout / 0.01)):
        if part.exists() and part.stat().st_size > 0:
            return
        assert proc.poll() is None, f"data.py ended ({proc.returncode}) before it wrote any token: give it more text"
        time.sleep(0.01)
    raise AssertionError(f"{part} never got tokens")


@pytest.mark.slow
def test_an_interrupted_run_says_where_to_resume_in_one_line_and_resumes_exactly(tiny_data, tmp_path):
    # Ctrl-C (SIGINT, exit 130) to one run and SIGTERM (143) to another, side by side; each resumed, and one
    # uninterrupted run as far as the later of the two, all three side by side
    common = TINY_MODEL + [f"--data={tiny_data}", "--iters=400", "--batch_seqs=4", "--eval_interval=200",
                           "--eval_tokens=1024", "--log_interval=1", "--sample_tokens=0", "--ckpt_interval=2"]
    signals = {"int": (signal.SIGINT, 130), "term": (signal.SIGTERM, 143)}
    procs = {cut: start([str(ROOT / "train.py"), *common, f"--out_dir={tmp_path / cut}"]) for cut in signals}
    for cut, (sig, _) in signals.items():
        wait_for(tmp_path / cut / "ckpt.pt")
        time.sleep(0.5)
        procs[cut].send_signal(sig)
    stopped = {}
    for cut, (_, code) in signals.items():
        _, err = procs[cut].communicate(timeout=120)
        assert procs[cut].returncode == code, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "ckpt.pt (step" in lines[0] and f"--out_dir={tmp_path / cut} --resume" in lines[0], err
        stopped[cut] = int(lines[0].split("ckpt.pt (step ")[1].split(")")[0])
        assert stopped[cut] >= 2 and checkpoint.load_file(tmp_path / cut / "ckpt.pt", 0, 1)["step"] == stopped[cut]
    procs = [start([str(ROOT / "train.py"), *argv])  # on one thread, as the cut runs
             for argv in [[f"--out_dir={tmp_path / cut}", "--resume", f"--stop_at={stopped[cut] + 4}"] for cut in signals] +
             [common + [f"--out_dir={tmp_path / 'whole'}", f"--stop_at={max(stopped.values()) + 4}"]]]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    timing = ("tokens_per_s", "mfu", "data_share")
    logs = {p: [{k: v for k, v in json.loads(x).items() if k not in timing}
                for x in (tmp_path / p / "log.jsonl").read_text().splitlines()] for p in (*signals, "whole")}
    for cut in signals:  # the interrupted run's log is the uninterrupted one's, to the step it was resumed to
        assert logs[cut][-1]["step"] == stopped[cut] + 4
        assert logs[cut] == [r for r in logs["whole"] if r["step"] <= stopped[cut] + 4]


@pytest.mark.slow
def test_an_interrupted_data_preparation_leaves_nothing_behind(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(make_text(7, 100_000) * 30)  # 17 MB: the tokens are of no matter, only that there are many
    proc = start([str(ROOT / "data.py"), "--train", str(big), "--out", str(tmp_path / "d"), "--workers=1"])
    wait_for_tokens(proc, tmp_path / "d")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and len(err.strip().splitlines()) == 1 and "nothing was written" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]


@pytest.mark.slow
def test_an_interrupted_sweep_stops_its_run_and_says_how_to_go_on(tiny_data, tmp_path):
    proc = start([str(ROOT / "sweep.py"), "run", str(micro_sweep(tmp_path, tiny_data)), f"--out={tmp_path / 'out'}"])
    wait_for(tmp_path / "out" / "dense-C" / "ckpt.pt")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("sweep.py: interrupted (Ctrl-C); the runs that finished are kept")
    rundir.Lock(tmp_path / "out" / "dense-C").acquire().release()  # the run's train.py has ended: its lock is free
    assert sweep_jobs.status(tmp_path / "out" / "dense-C") in ("resumable", "finished")


def test_ctrl_c_while_starting_ends_in_one_line(tiny_data, tmp_path):
    proc = start([str(ROOT / "train.py"), *tiny(tiny_data, tmp_path / "r")])
    for _ in range(6000):  # until torch's library is mapped: torch is loading (at a fixed delay, a loaded
        maps = Path(f"/proc/{proc.pid}/maps")  # machine was still importing the standard library)
        if proc.poll() is not None or "libtorch" in maps.read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_ctrl_c_while_starting_is_not_swallowed_by_a_bare_except():
    # a library's bare except around an import caught the SystemExit: the program said "nothing was done",
    # then went on (seen once in ~20 runs of the test above: SIGINT half a second into `import torch`)
    code = ("import os, signal, time\nfrom harness import interrupts\ninterrupts.quit_while_starting('x.py')\n"
            "try:\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(5)\nexcept:\n    pass\nprint('went on')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and "went on" not in r.stdout
    assert r.stderr.strip() == "x.py: interrupted (Ctrl-C) while starting: nothing was done"


@pytest.mark.slow
def test_sigterm_to_a_data_preparation_and_its_workers_ends_it_cleanly(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(make_text(8, 200_000) * 30)  # 34 MB: the tokens are of no matter, only that there are many
    proc = start([str(ROOT / "data.py"), "--train", str(big), "--out", str(tmp_path / "d"), "--workers=2"],
                 start_new_session=True)
    wait_for_tokens(proc, tmp_path / "d")  # the two workers are tokenising
    os.killpg(proc.pid, signal.SIGTERM)  # as Slurm, Docker and timeout do: the whole group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]


def test_a_stop_after_the_work_is_done_says_so(tiny_data, tmp_path, capsys, monkeypatch):
    def ctrl_c(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "show_sample", ctrl_c)
    with pytest.raises(SystemExit) as exit_:
        train.main(tiny(tiny_data, tmp_path / "r", "--sample_tokens=50"))
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and "while sampling; the run had finished" in err and sweep_jobs.status(tmp_path / "r") == "finished"
    swap = safe_io.replace_folder

    def swap_then_ctrl_c(new, old):
        swap(new, old)
        os.kill(os.getpid(), signal.SIGINT)  # held back until the new data is in place
    monkeypatch.setattr(safe_io, "replace_folder", swap_then_ctrl_c)
    (tmp_path / "t.txt").write_text(make_text(5, 500))
    with pytest.raises(SystemExit) as exit_:
        data.main(["--train", str(tmp_path / "t.txt"), "--out", str(tmp_path / "d"), "--workers=1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and "after the data was prepared" in err and data.load_meta(tmp_path / "d")


# ----------------------------------------------------------------------------- a run is resumed whole, or refused
@pytest.fixture(scope="module")
def stopped_once(tiny_data, tmp_path_factory):
    """tiny_run's run stopped at step 6 with a checkpoint (whole_run is the same run to its end)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train.train(tiny_run_argv(tiny_data, out, "--stop_at=6"))
    (out / ".lock").unlink(missing_ok=True)  # as a run copied elsewhere has none
    return out


# a resume that changes what the checkpoint fixes: [flags], what the refusal names
CHANGED_RESUMES = [(["--lr=0.5"], "schedule lr"), (["--S=16"], "model.S"), (["--iters=20"], "schedule D"),
                   (["--batch_seqs=8"], "schedule D"), (["--seed=5"], "train.seed"), (["--dtype=float16"], "train.dtype"),
                   (["--Dm=64"], "model.Dm"), (["--scheme=dense"], "scheme='dense'"), (["--K=3"], "model.K"),
                   (["--balance_coef=0.5"], "model.balance_coef"), (["--unique_tokens=2000"], "train.unique_tokens"),
                   (["--stop_at=2"], "train.stop_at=2 is before step 6")]


@pytest.mark.parametrize("flags,names", CHANGED_RESUMES, ids=[f[0] for f, _ in CHANGED_RESUMES])
def test_a_refused_resume_names_what_differs_and_leaves_the_run_as_it_was(stopped_once, tmp_path, capsys, flags, names):
    run = tmp_path / "run"
    shutil.copytree(stopped_once, run)
    before = snapshot(run)
    err = refused(train.main, [f"--out_dir={run}", "--resume", *flags], capsys)
    assert names in err and snapshot(run) == before  # config.toml as it was, and no .lock left behind


@pytest.mark.parametrize("gone", ["config.toml", "config.toml and log.jsonl"])
def test_a_run_whose_config_is_gone_resumes_from_its_checkpoints_config(stopped_once, whole_run, tmp_path, capsys, gone):
    run = tmp_path / "run"
    shutil.copytree(stopped_once, run)
    for name in gone.split(" and "):
        (run / name).unlink()
    summary = train.train([f"--out_dir={run}", "--resume"])
    assert "config.toml is missing: the run's config comes from its checkpoint" in capsys.readouterr().err
    assert summary["final"] == json.loads((whole_run / "summary.json").read_text())["final"]  # the same run, whole
    assert (run / "config.toml").read_text().replace(str(run), "") == \
        (whole_run / "config.toml").read_text().replace(str(whole_run), "")
    assert not (tmp_path / "data").exists()  # no default corpus prepared on the way


def test_data_is_known_by_its_content_not_its_path(tiny_data, stopped_once, whole_run, tmp_path, monkeypatch, capsys):
    moved = tmp_path / "moved data"
    shutil.copytree(tiny_data, moved)
    # a run resumed on a byte-identical copy under another path goes on, saying so in one line, to the same end
    run = tmp_path / "run"
    shutil.copytree(stopped_once, run)
    summary = train.train([f"--out_dir={run}", "--resume", f"--data={moved}"])
    assert f"data: {moved} holds the data the run trained on in {tiny_data}" in capsys.readouterr().out
    assert summary["final"] == json.loads((whole_run / "summary.json").read_text())["final"]
    # data of other contents is refused, naming the split that differs
    for seed, name in enumerate(("t.txt", "v.txt")):
        (tmp_path / name).write_text(make_text(40 + seed, 6000))
    other = tmp_path / "other"
    data.prepare_files(other, [str(tmp_path / "t.txt")], {"val": [str(tmp_path / "v.txt")]}, workers=1)
    run2 = tmp_path / "run2"
    shutil.copytree(stopped_once, run2)
    err = refused(train.main, [f"--out_dir={run2}", "--resume", f"--data={other}"], capsys)
    assert f"data split 'train' of {other}: run sha256" in err
    # a sweep whose data folder moved keeps its finished runs
    fake_runs(monkeypatch)
    sweep.run_sweep(micro_sweep(tmp_path, tiny_data), tmp_path / "out")
    capsys.readouterr()
    sweep.run_sweep(micro_sweep(tmp_path, moved), tmp_path / "out")
    assert f"dense-C: data: {moved} holds the data the run trained on in {tiny_data}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- one kind and one writer per folder
@pytest.fixture
def folders(finished, tiny_data, tmp_path, monkeypatch):
    """A folder of each kind: a finished run, a sweep's folder (plan.json and a run folder per run), prepared data."""
    fake_runs(monkeypatch)
    sweep.run_sweep(micro_sweep(tmp_path, tiny_data), tmp_path / "sweep")
    shutil.copytree(tiny_data, tmp_path / "data")
    return {"run": finished, "sweep": tmp_path / "sweep", "data": tmp_path / "data"}


WRITERS = {  # each program that writes a folder, as it is told to write into X, and the kind of folder it owns
    "train": ("run", lambda t, d, x: (train.main, tiny(d, x))),
    "train --overwrite": ("run", lambda t, d, x: (train.main, tiny(d, x, "--overwrite=true"))),
    "sweep run": ("sweep", lambda t, d, x: (sweep.main, ["run", str(micro_sweep(t, d)), f"--out={x}"])),
    "data.py --overwrite": ("data", lambda t, d, x: (data.main, ["--train", str(t / "t.txt"), "--out", str(x), "--workers=1",
                                                                  "--overwrite"])),
}


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("kind", ["run", "sweep", "data"])
def test_no_program_writes_into_a_folder_of_another_kind(writer, kind, folders, tiny_data, tmp_path, capsys):
    owns, command = WRITERS[writer]
    if owns == kind:
        return  # its own kind: the tests of that program
    (tmp_path / "t.txt").write_text(make_text(3, 3000))
    before = snapshot(folders[kind])
    main, argv = command(tmp_path, tiny_data, folders[kind])
    err = refused(main, argv, capsys)
    assert str(folders[kind]) in err and snapshot(folders[kind]) == before, err


def test_data_py_deletes_nothing_that_came_to_its_out_meanwhile(finished, tmp_path, monkeypatch, capsys):
    (tmp_path / "t.txt").write_text(make_text(3, 3000))
    (tmp_path / "u.txt").write_text(make_text(4, 3000))
    out, real = tmp_path / "d", data.write_split
    meanwhile = []

    def write_split(*args, **kwargs):  # while this data.py prepares, something else comes to its --out
        result = real(*args, **kwargs)
        if meanwhile:
            meanwhile.pop()()
        return result
    monkeypatch.setattr(data, "write_split", write_split)
    argv = ["--train", str(tmp_path / "t.txt"), "--out", str(out), "--workers=1"]
    # a run trained into it (a finished run is copied there)
    meanwhile.append(lambda: shutil.copytree(finished, out))
    err = refused(data.main, argv, capsys)
    assert f"{out} holds files and no meta.json of data.py (ckpt.pt" in err and (out / "ckpt.pt").exists()
    # a second data.py prepared it first: the one that ends last is refused, and the first one's data stays
    shutil.rmtree(out)
    second = [sys.executable, str(ROOT / "data.py"), "--train", str(tmp_path / "u.txt"), "--out", str(out), "--workers=1"]
    meanwhile.append(lambda: subprocess.run(second, check=True, capture_output=True))
    err = refused(data.main, argv, capsys)
    first = data.load_meta(out)
    assert "holds prepared data already" in err and first["sources"][0]["path"].endswith("u.txt")
    # a run being written there (it holds the folder's lock): refused, even with --overwrite
    held = rundir.Lock(out).acquire()
    try:
        err = refused(data.main, argv + ["--overwrite"], capsys)
    finally:
        held.release()
    assert f"{out} is in use by process {os.getpid()}" in err and data.load_meta(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "run", "t.txt", "u.txt"]  # no lock, no temporary left
