"""Nothing lost, nothing silent: bad input across the five programs, and faults in a run directory.

Every bad input gets exit code 2, one message that names the key or file and what is accepted, no
traceback, and leaves an existing run directory exactly as it was. The programs run in-process
(main(argv)), so an unexpected exception fails the test as a traceback would fail a user."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data
import flops
import sweep
import train

from harness import rundir
from harness import sources
from harness import sweep_jobs

from dev import bench
from tests.conftest import TINY_MODEL, on_top, snapshot

ROOT = Path(__file__).resolve().parent.parent
TOY_SWEEP = (ROOT / "configs" / "sweep-toy.toml").read_text()


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """A finished run directory that no bad input may touch."""
    out = tmp_path_factory.mktemp("runs") / "done"
    train.train(TINY_MODEL + [f"--data={tiny_data}", f"--out_dir={out}", "--iters=4", "--batch_seqs=4",
                              "--eval_tokens=1024"])
    return out


def sweep_file(tmp, **changes):
    """The toy sweep file with [section] key = value lines replaced or added."""
    text = TOY_SWEEP
    for key, value in changes.items():
        section, name = key.split("__")
        lines, out, inside = text.splitlines(), [], False
        for line in lines:
            if line.startswith("["):
                if inside:
                    out.append(f"{name} = {value}")
                    inside = False
                inside = line.split("#")[0].strip() == f"[{section}]"
            if not (inside and line.split("=")[0].strip() == name):
                out.append(line)
        if inside:
            out.append(f"{name} = {value}")
        text = "\n".join(out) + "\n"
    path = tmp / f"sweep-{len(list(tmp.glob('sweep-*')))}.toml"
    path.write_text(text)
    return path


def text_file(tmp, name, content):
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# (program, argv from (tmp, run, data) , what the message must name). A key's type, range and choices (a negative,
# zero, nan, inf, a huge number, a word, nothing, a boolean in a file) are test_every_input.py's, for every key and
# flag of every program; these are what that table has no row for: rules between keys, bounds (beta2 = 1), the
# state of a run directory, of files and of data
CASES = [
    # train.py: bounds and rules between keys, all before any work
    ("train", lambda t, r, d: [f"--out_dir={text_file(t, 'afile', 'x')}"], "train.out_dir="),
    ("train", lambda t, r, d: ["--iters=4", "--eval_tokens=10"], "train.eval_tokens=10 is less than one window"),
    ("train", lambda t, r, d: ["--beta1=1.5"], "train.beta1=1.5 is not allowed"),
    ("train", lambda t, r, d: ["--beta2=1"], "train.beta2=1.0 is not allowed"),
    ("train", lambda t, r, d: ["--iters=4", "--micro_batch=8", "--batch_seqs=4"], "train.micro_batch=8 is more than"),
    ("train", lambda t, r, d: ["--iters=4", "--micro_batch=3", "--batch_seqs=4"], "micro_batch=3 does not divide"),
    ("train", lambda t, r, d: ["--warmup=-2"], "train.warmup=-2 is not allowed"),
    ("train", lambda t, r, d: ["--attention=flex", "--iters=4"], "train.attention='flex' on cpu"),
    ("train", lambda t, r, d: ["--iters=5", "--compute=1e12"], "give exactly one budget"),
    ("train", lambda t, r, d: ["--K=9", "--E=8"], "K=9 is not allowed"),
    ("train", lambda t, r, d: ["--De=20"], "De=20 is not allowed"),
    ("train", lambda t, r, d: ["--vocab_size=100", "--iters=4"], "vocab_size=100 is smaller than the vocabulary"),
    ("train", lambda t, r, d: ["--bogus=1"], "unknown config key 'bogus'"),
    ("train", lambda t, r, d: [str(t / "missing.toml")], "missing.toml"),
    ("train", lambda t, r, d: [str(text_file(t, "u.toml", "[optim]\nlr = 3\n"))], "unknown table [optim]"),
    ("train", lambda t, r, d: ["--iters=4", "--unique_tokens=1e12"], "is more than the training split holds"),
    ("train", lambda t, r, d: ["--iters=4"], "holds a run (config.toml, log.jsonl, ckpt.pt, summary.json)"),
    ("train", lambda t, r, d: ["--iters=4", "--resume", "--overwrite=true"], "give one of them"),
    ("train", lambda t, r, d: ["--iters=4", "--resume", "--seed=7"], "ckpt.pt is from another config:\n  train.seed: checkpoint 1337, now 7"),
    ("train", lambda t, r, d: ["--iters=4", "--resume", "--lr=0.5"], "train.lr: checkpoint 0.0, now 0.5"),
    # sweep.py
    ("sweep", lambda t, r, d: ["run", str(ROOT / "configs" / "sweep-toy.toml"), "--only=99", f"--out={t / 's'}"],
     "--only=99 names no run"),
    ("sweep", lambda t, r, d: ["plan", str(sweep_file(t, sweep__reuse='["sometimes"]'))], "sweep.reuse 'sometimes'"),
    ("sweep", lambda t, r, d: ["plan", str(sweep_file(t, sweep__ra="[1.5]"))], "sweep.ra entries are fractions"),
    ("sweep", lambda t, r, d: ["plan", str(sweep_file(t, sweep__tolerance="2.0"))], "sweep.tolerance = 2.0"),
    ("sweep", lambda t, r, d: ["plan", str(sweep_file(t, train__micro_batch="-1"))], "train.micro_batch=-1"),
    ("sweep", lambda t, r, d: ["plan", str(sweep_file(t, train__bogus="1"))], "train.bogus is unknown"),
    ("sweep", lambda t, r, d: ["plan", str(sweep_file(t, train__iters="5"))], "train.iters is set by the sweep"),
    ("sweep", lambda t, r, d: ["plan", str(sweep_file(t, train__log_interval="true"))], "train.log_interval=True: expected int"),
    # flops.py
    ("flops", lambda t, r, d: ["--D=1e9", "--C=1e18"], "--D and --C both given"),
    ("flops", lambda t, r, d: [str(ROOT / "configs" / "sweep-toy.toml")], "it is a sweep file"),
    # data.py
    ("data", lambda t, r, d: ["--train", str(t / "nomatch*.txt"), f"--out={t / 'o1'}"], "no input files match"),
    ("data", lambda t, r, d: ["--train", str(text_file(t, "empty.txt", "")), f"--out={t / 'o2'}"], "empty.txt: no text in it (the file is empty)"),
    ("data", lambda t, r, d: ["--train", str(text_file(t, "bin.txt", b"ab\x00\x01cd")), f"--out={t / 'o3'}"],
     "bin.txt: looks binary (a NUL byte at offset 2)"),
    ("data", lambda t, r, d: ["--train", str(text_file(t, "bad.txt", b"fine text\n\xff\xfe more")), f"--out={t / 'o4'}"],
     "bad.txt: invalid UTF-8 at byte 10"),
    ("data", lambda t, r, d: ["--train", str(text_file(t, "n.jsonl", '{"text": 3}\n')), f"--out={t / 'o5'}"],
     "n.jsonl:1: the field 'text' holds int"),
    ("data", lambda t, r, d: ["--train", str(text_file(t, "x.jsonl", '{"txt": "a"}\n')), f"--out={t / 'o6'}"],
     "x.jsonl:1: expected a JSON object with a string field 'text'"),
    ("data", lambda t, r, d: ["--train", str(text_file(t, "a.txt", "some text\n")), "--val",
                              f"train={text_file(t, 'b.txt', 'other text')}", f"--out={t / 'o7'}"], "'train' is the training split"),
    ("data", lambda t, r, d: ["--train", str(text_file(t, "c.txt", "some text\n")), f"--out={d}"], "holds prepared data already"),
    ("data", lambda t, r, d: ["--train", str(text_file(t, "d.txt", "text")), f"--out={text_file(t, 'ofile', 'x')}"],
     "expected a folder to prepare the data into (it is a file)"),
    # bench.py
    ("bench", lambda t, r, d: ["expert", "--K=9", "--E=8", "--compile=false"], "K=9 is not allowed"),
    ("bench", lambda t, r, d: ["expert", f"--json={t / 'no' / 'such' / 'x.json'}"], "expected a file in a folder that exists"),
    ("bench", lambda t, r, d: ["gpu-check", "--device=cuda"], "--device=cuda: no such CUDA device here"),
    ("bench", lambda t, r, d: ["profile", str(text_file(t, "nomodel.toml", "[train]\niters = 3\n"))], "no [model] table"),
]
PROGRAMS = {"train": train.main, "sweep": sweep.main, "flops": flops.main, "data": data.main, "bench": bench.main}


@pytest.mark.parametrize("program,argv,message", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_exits_2_naming_it_and_touches_no_run(program, argv, message, finished_run, tiny_data, tmp_path,
                                                        capsys):
    before = snapshot(finished_run)
    args = argv(tmp_path, finished_run, tiny_data)
    if program == "train":  # every train.py case aims at the finished run, unless it names another folder
        config = args[:1] if args and not args[0].startswith("--") else []
        args = config + on_top(TINY_MODEL + [f"--data={tiny_data}", f"--out_dir={finished_run}"], args[len(config):])
    with pytest.raises(SystemExit) as exit_:
        PROGRAMS[program](args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err, err
    assert snapshot(finished_run) == before


# ----------------------------------------------------------------------------- faults in a run directory
def tiny(tiny_data, out, *extra):
    return TINY_MODEL + [f"--data={tiny_data}", f"--out_dir={out}", "--iters=8", "--batch_seqs=4", "--eval_interval=4",
                         "--eval_tokens=1024", "--log_interval=1", *extra]


@pytest.fixture(scope="module")
def whole(tiny_data, tmp_path_factory):
    """tiny's run, to the end (copy it before changing it)."""
    out = tmp_path_factory.mktemp("whole") / "a"
    train.train(tiny(tiny_data, out))
    return out


def test_a_kill_before_the_summary_is_finished_by_resume(whole, tiny_data, tmp_path):
    shutil.copytree(whole, tmp_path / "a")  # a finished run
    whole = json.loads((whole / "summary.json").read_text())
    (tmp_path / "a" / "summary.json").unlink()  # killed after the final checkpoint, before the summary
    again = train.train(tiny(tiny_data, tmp_path / "a") + ["--resume"])
    assert again["finished"] and again["final"] == whole["final"]
    # killed even before the final evaluation was logged: it is run again, to the same numbers
    log = tmp_path / "a" / "log.jsonl"
    records = rundir.read_log(log)
    kept = [r for r in records if not (r["kind"] == "eval" and r["step"] == whole["step"])]
    assert len(kept) == len(records) - 1  # the final evaluation's record, and only it, is gone
    log.write_text("".join(json.dumps(r) + "\n" for r in kept))
    (tmp_path / "a" / "summary.json").write_text("")  # and a summary left empty by a kill mid-write
    assert sweep_jobs.status(tmp_path / "a") == "resumable"
    again = train.train(tiny(tiny_data, tmp_path / "a") + ["--resume"])
    assert again["final"] == pytest.approx(whole["final"], abs=1e-6)
    assert sweep_jobs.status(tmp_path / "a") == "finished"


def test_a_torn_log_line_is_dropped_with_a_warning(whole, tiny_data, tmp_path, capsys):
    whole = json.loads((whole / "summary.json").read_text())
    train.train(tiny(tiny_data, tmp_path / "torn", "--stop_at=4"))
    with open(tmp_path / "torn" / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # killed mid-line
    capsys.readouterr()
    rest = train.train(tiny(tiny_data, tmp_path / "torn") + ["--resume"])
    assert "dropped a torn last line" in capsys.readouterr().err and rest["final"] == whole["final"]


def test_an_empty_summary_is_left_out_of_the_report_with_a_warning(finished_run, tmp_path, capsys):
    for name in ("one", "two"):  # two finished runs of a folder: what a report reads of them is their summary.json
        shutil.copytree(finished_run, tmp_path / name)
    (tmp_path / "two" / "summary.json").write_text("")
    rows = sweep.report(tmp_path)
    assert [r["arm"] for r in rows] == ["one"] and "two/summary.json: left out of the report" in capsys.readouterr().err


def test_overwrite_replaces_a_run_only_when_asked(finished_run, tiny_data, tmp_path):
    shutil.copytree(finished_run, tmp_path / "r")  # a finished run, of 4 steps
    first = json.loads((tmp_path / "r" / "summary.json").read_text())
    second = train.train(tiny(tiny_data, tmp_path / "r", "--seed=5", "--overwrite=true"))
    assert second["config"]["train"]["seed"] == 5 and second["final"] != first["final"]
    assert max(r["step"] for r in map(json.loads, (tmp_path / "r" / "log.jsonl").read_text().splitlines())) == 8


def ended(pid):
    """Whether a process has ended: it is gone, or it is a zombie, dead with its exit status not yet collected by
    the process that inherited it (PID 1 of a container may take a second or two)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return False


def test_a_killed_sweep_takes_its_training_child_with_it(tmp_path):
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from harness import sweep_jobs; "
         "sweep_jobs.run_jobs([sweep_jobs.Job('[1/1]', 'r', Path('r'), [sys.executable, '-c', "
         "'import os, sys, time; open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(120)', sys.argv[1]], 1.0, 1)], "
         "[{}, {}])", str(pid_file)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)  # no handler runs: the kernel's parent-death signal ends the child
    parent.wait()
    for _ in range(100):
        if ended(child):
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived its killed parent")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_pieces_tokenise_exactly_as_the_whole_document(tmp_path, monkeypatch, suffix):
    # documents are cut into pieces for bounded memory; the pieces encode to the tokens of the whole
    monkeypatch.setattr(sources, "CHUNK_CHARS", 64)
    text = ("First line.\n\n\nSecond  paragraph with  spaces,\r\nand CRLF; then numbers 12345 678.\n"
            "\n  indented\tand tabbed\n" + "word " * 40 + "\n\n\n\n\nnaïve café — “quoted”\nend\n") * 3
    path = tmp_path / f"doc{suffix}"
    path.write_text(json.dumps({"text": text}) + "\n" if suffix == ".jsonl" else text, newline="")
    pieces = list(sources.read_documents(path))
    assert len(pieces) > 5 and all(len(p) <= 64 for p, _ in pieces) and [e for _, e in pieces][-1]
    for name in ("byte", "cl100k_base"):
        tok = data.get_tokenizer(name)
        assert sum((tok.encode(p) for p, _ in pieces), []) == tok.encode(sources.normalise(text))
