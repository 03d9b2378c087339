"""Every key and every flag against a table of bad values, generated from the code itself so that a new key
or flag is covered the day it is added: each [model], [train] and [sweep] key (and the [moe] and [dense]
keys of a sweep file), as a --key=value flag and in a TOML file, and every flag of every command line
(train, sample, evaluate, data, flops, sweep, bench). The outcome must be exit code 2 with the key named and
no traceback, or a run that finishes (the value is legal). The hand-written cases of test_safety.py test
what the messages mean; these test that nothing gets through unnamed."""
import argparse
import re
from pathlib import Path
from dataclasses import fields

import pytest

from dev import bench
import data
import evaluate
import flops
import sample
import sweep
from harness import sweep_plan
import train
from harness.config import SECTIONS
from tests.conftest import MICRO, TINY_MODEL, micro_sweep

# the cases whose values are mostly legal, so that each runs a benchmark of training steps: seconds each
# (pytest -m slow); a training key whose values all run takes about a second (eight tiny runs)
SLOW_CASES = {"test_every_flag[bench-step---peak_flops]", "test_every_flag[bench-step---json]"}
BAD = {"negative": "-1", "zero": "0", "nan": "nan", "inf": "inf", "huge": "1e308", "10**20": str(10**20),
       "wrong type": "abc", "empty": ""}
BAD_TOML = {**BAD, "10**20": str(10**20), "wrong type": '"abc"', "empty": '""'}  # for a string key, a number is wrong
FREE_TEXT = {"wandb_run_name", "wandb_group"}  # any printable name of up to 128 characters: as a flag, all of BAD is legal
def named(key, err):
    """The key as a flag (--key), a table's key (train.key) or a value (key=…), not a word of the prose."""
    k = re.escape(key)
    return re.search(rf"--{k}(?!\w)|\.{k}(?!\w)|(?<![\w.-]){k} ?=", err) is not None


def outcome(main, argv, key, capsys):
    """'ran' or 'refused' (exit 2, the key named, no traceback); anything else fails the test."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if code == 0:
        return "ran"
    assert code == 2 and named(key, err), f"{argv}: exit {code}, {key!r} not named:\n{err}"
    return "refused"


# ----------------------------------------------------------------------------- train.py: [model] and [train]
TRAIN_KEYS = [(sec, f.name) for sec, cls in SECTIONS.items() for f in fields(cls) if f.name != "vocab_size"] + \
             [("model", "vocab_size")]


def train_base(key, tiny_data):
    """A tiny run of two steps, with the fuzzed key's own flag left out."""
    base = TINY_MODEL + [f"--data={tiny_data}", "--out_dir=run", "--iters=2", "--stop_at=2", "--batch_seqs=2",
                         "--eval_tokens=256", "--sample_tokens=0"]
    if key in ("tokens", "compute"):
        base.remove("--iters=2")
    return [a for a in base if not a.startswith(f"--{key}=")]


@pytest.mark.parametrize("how", ["flag", "toml"])
@pytest.mark.parametrize("sec,key", TRAIN_KEYS, ids=[k for _, k in TRAIN_KEYS])
def test_every_train_key(sec, key, how, tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen = {}
    for name, value in (BAD if how == "flag" else BAD_TOML).items():
        out = tmp_path / name.replace("*", "")
        out.mkdir()
        base = [a.replace("--out_dir=run", f"--out_dir={out / 'run'}") for a in train_base(key, tiny_data)]
        if how == "flag":
            argv = base + [f"--{key}={value}"]
        else:
            (out / "c.toml").write_text(f"[{sec}]\n{key} = {value}\n")
            argv = [str(out / "c.toml")] + base
        seen[name] = outcome(train.main, argv, key, capsys)
    assert "refused" in seen.values() or (how == "flag" and key in FREE_TEXT)  # every key has a value out of range


# ----------------------------------------------------------------------------- sweep files
SWEEP_KEYS = [("sweep", f.name) for f in fields(sweep_plan.Sweep)] + \
             [("moe", k) for k in (*sweep_plan.BACKBONE[1:], "mu", "lr_mult", "batch_mult")] + \
             [("dense", k) for k in (*sweep_plan.BACKBONE[1:], "lr_mult", "batch_mult")]


@pytest.mark.parametrize("sec,key", SWEEP_KEYS, ids=[f"{s}.{k}" for s, k in SWEEP_KEYS])
def test_every_sweep_key(sec, key, tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen = {}
    for name, value in BAD_TOML.items():
        lines, inside = [], False
        for line in MICRO.format(data=tiny_data, compute="2e9", ra="[0.413, 0.496]", reuse='["none"]', dense_Dm=48).splitlines():
            if line.startswith("["):
                inside = line == f"[{sec}]"
                lines.append(line)
                if inside:
                    lines.append(f"{key} = {value}")
            elif not (inside and line.split(" = ")[0] == key):
                lines.append(line)
        path = tmp_path / f"{name.replace('*', '')}.toml"
        path.write_text("\n".join(lines) + "\n")
        seen[name] = outcome(sweep.main, ["plan", str(path)], key, capsys)
    assert "refused" in seen.values()  # every key has a value out of its range among these


# ----------------------------------------------------------------------------- every command line's flags
def flags(p, prefix=()):
    """(subcommand path, option string or positional name) of every argument of an argparse parser."""
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from flags(sub, prefix + (name,))
        else:
            yield prefix, action.option_strings[0] if action.option_strings else action.dest


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):
    """A finished tiny run, and the sweep folder that holds it."""
    root = tmp_path_factory.mktemp("finished")
    train.train(TINY_MODEL + [f"--data={tiny_data}", f"--out_dir={root / 'one'}", "--iters=2", "--batch_seqs=2",
                              "--eval_tokens=256", "--sample_tokens=0"])
    return root


def cli_base(program, sub, tiny_data, finished, tmp):
    """A quick, legal command line of each program (and subcommand); the fuzzed flag goes on top."""
    moe = tmp / "moe.toml"
    moe.write_text('[model]\nscheme = "1dense"\nL = 2\nDm = 32\nH = 2\nDffn = 64\nE = 4\nK = 2\nDe = 16\nDse = 16\nS = 32\n')
    dense = tmp / "dense.toml"
    dense.write_text('[model]\nscheme = "dense"\nL = 2\nDm = 32\nH = 2\nDffn = 160\nS = 32\n')
    text = tmp / "in.txt"
    text.write_text("Some words of text, and more words.\n" * 20)
    sweep_file = micro_sweep(tmp, tiny_data)
    quick = ["--rounds=1", "--warmup=0", "--compile=false", "--malloc=default"]
    return {
        ("sample", ()): [str(finished / "one"), "--tokens=4"],
        ("evaluate", ()): [str(finished / "one"), "--eval_tokens=256"],
        ("data", ()): ["--train", str(text), "--out", str(tmp / "prepared"), "--workers=1"],
        ("flops", ()): [],
        ("sweep", ("plan",)): ["plan", str(sweep_file)],
        ("sweep", ("run",)): ["run", str(sweep_file), f"--out={tmp / 'sweep'}", "--emit=slurm"],
        ("sweep", ("report",)): ["report", str(finished)],
        ("bench", ("expert",)): ["expert", "--T=64", "--Dm=32", "--E=4", "--K=2", "--De=16", *quick],
        ("bench", ("attention",)): ["attention", "--B=1", "--H=2", "--S=32", "--Dh=8", *quick],
        ("bench", ("step",)): ["step", f"--moe={moe}", f"--dense={dense}", f"--data={tiny_data}", "--iters=2",
                               "--log_interval=1", "--batch_seqs=2", "--peak_flops=1e11", *quick],
        ("bench", ("profile",)): ["profile", str(moe), "--batch_seqs=1", "--steps=1", "--top=2", *quick],
        ("bench", ("parts",)): ["parts", str(moe), f"--data={tiny_data}", "--steps=4", "--warmup=3", "--malloc=default"],
        ("bench", ("nanogpt",)): ["nanogpt", f"--moe={moe}", f"--data={tiny_data}", "--batch_seqs=1", "--rounds=1",
                                  "--warmup=0", "--malloc=default"],
        ("bench", ("versions",)): ["versions", str(ROOT), f"--config={moe}", f"--data={tiny_data}", "--iters=1",
                                   "--batch_seqs=1", "--eval_tokens=33", "--rounds=1"],
    }[program, sub]


ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = {"sample": sample, "evaluate": evaluate, "data": data, "flops": flops, "sweep": sweep, "bench": bench}
# the flags every bench subcommand shares (--device, --compile, --threads, --malloc, --json) are fuzzed on
# `expert`: on `gpu-check`, a legal value would run all of its checks, a minute on a CPU
FLAGS = [(prog, sub, flag) for prog, module in PROGRAMS.items() for sub, flag in flags(module.parser())
         if sub != ("gpu-check",)]
POSITIONAL = {"run_dir", "config", "sweep", "dir"}


def with_flag(base, flag, value, positional):
    """base with the flag set to value: a positional replaced, an option's earlier value dropped."""
    if positional:
        first = [i for i, a in enumerate(base) if not a.startswith("-")]
        argv = list(base)
        subcommands = ("plan", "run", "report", "profile", "parts", "versions")
        at = first[1] if base and base[0] in subcommands and len(first) > 1 else \
            (first[0] if first and base[0] not in subcommands else None)
        if at is None:
            return argv + [value]
        argv[at] = value
        return argv
    argv = [a for a in base if not (a == flag or a.startswith(flag + "="))]
    if flag in ("--train", "--out") and flag in base:  # nargs options: drop their values too
        i = base.index(flag)
        argv = base[:i] + base[i + 2:]
    return argv + [f"{flag}={value}"]


# bench's `versions` and `parts` time whole train.py processes: where a fuzzed value is legal, seconds each
SLOW_SUBS = {("bench", ("versions",)), ("bench", ("parts",))}


@pytest.mark.parametrize("prog,sub,flag", [pytest.param(p, s, f, marks=[pytest.mark.slow] if (p, s) in SLOW_SUBS else [])
                                           for p, s, f in FLAGS],
                         ids=[f"{p}-{' '.join(s)}-{f}".replace(" -", "-") for p, s, f in FLAGS])
def test_every_flag(prog, sub, flag, tiny_data, finished, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    positional = not flag.startswith("-")
    key = flag.lstrip("-")
    for name, value in BAD.items():
        tmp = tmp_path / name.replace("*", "")
        tmp.mkdir()
        base = cli_base(prog, sub, tiny_data, finished, tmp)
        argv = with_flag(base, flag, value, positional)
        if positional:  # a path: the message names the argument or the path given
            try:
                PROGRAMS[prog].main(argv)
            except SystemExit as e:
                err = capsys.readouterr().err
                assert "Traceback" not in err and (e.code in (0, None) or (e.code == 2 and (named(key, err) or value in err)))
            continue
        outcome(PROGRAMS[prog].main, argv, key, capsys)


def test_the_generated_tables_reach_every_program():
    assert {p for p, _, _ in FLAGS} == set(PROGRAMS) and len(TRAIN_KEYS) == sum(len(fields(c)) for c in SECTIONS.values())
    assert {s for s, _ in SWEEP_KEYS} == {"sweep", "moe", "dense"}
