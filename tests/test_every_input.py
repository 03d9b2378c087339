"""Every key and every flag against a table of bad values, generated from the code itself so that a new key
or flag is covered the day it is added: each [model], [train] and [sweep] key (and the [moe] and [dense]
keys of a sweep file), as a --key=value flag and in a TOML file, and every flag of every command line
(train, sample, evaluate, data, flops, sweep, bench). A value outside what the key accepts must be refused:
exit code 2, the key and the value named, no traceback (and for train.py, nothing written). A legal value must
run to the end, or (train.py) be refused by a rule between keys, the key named. What a key accepts is its type, its range
(harness/config.RANGES) and its choices for [model] and [train]; for the sweep keys and the flags it is the
tables SWEEP_ACCEPTS and ACCEPTS below (the rest of BAD is refused). The hand-written cases of test_safety.py
test what the messages mean; these test that nothing gets through unnamed."""
import argparse
import contextlib
import io
import math
import re
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

import data
import evaluate
import flops
import sample
import sweep
import train

from harness import rundir
from harness import sweep_plan
from harness.config import CHOICES, RANGES, SECTIONS

from dev import bench
from tests.conftest import MICRO, TINY_MODEL, make_text, micro_sweep

# bench step runs its benchmark of training steps for each legal value: a second or more each (pytest -m slow)
SLOW_CASES = {"test_every_flag[bench-step---peak_flops]", "test_every_flag[bench-step---json]"}
BAD = {"negative": "-1", "zero": "0", "nan": "nan", "inf": "inf", "huge": "1e308", "10**20": str(10**20),
       "wrong type": "abc", "empty": ""}
# in a TOML file: for a string key a number is the wrong type, and for a number a boolean is
BAD_TOML = {**BAD, "wrong type": '"abc"', "empty": '""', "bool": "true"}
FREE_TEXT = {"wandb_run_name", "wandb_group"}  # any printable name of up to 128 characters, "" included
BOOL_WORDS = {"1", "0", "true", "false", "yes", "no", "on", "off"}  # what a true-or-false flag reads (rundir.true_or_false)


def named(key, err):
    """The key as a flag (--key), a table's key (train.key) or a value (key=…), not a word of the prose."""
    k = re.escape(key)
    return re.search(rf"--{k}(?!\w)|\.{k}(?!\w)|(?<![\w.-]){k} ?=", err) is not None


def shown(value, err):
    """The refused value is in the message, as given or as the program read it (-1 as -1.0, 1e308 as 1e+308,
    true as True)."""
    v = value.strip('"')
    forms = {v}
    with contextlib.suppress(ValueError, OverflowError):
        x = float(v)
        forms |= {repr(x), f"{x:.4g}", f"{x:,.0f}" if math.isfinite(x) else v}
    return not v or any(f.lower() in err.lower() for f in forms)


def outcome(main, argv, key, capsys):
    """('ran' or 'refused', stderr); refused is exit 2 with the key named and no traceback; anything else fails."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if code == 0:
        return "ran", err
    assert code == 2 and named(key, err), f"{argv}: exit {code}, {key!r} not named:\n{err}"
    return "refused", err


def must_refuse(got, err, argv, name, value):
    assert got == "refused", f"{argv}: the {name} value {value!r} is not one the key accepts, and it ran"
    assert shown(value, err), f"{argv}: the value {value!r} is not in the message:\n{err}"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A prepared byte-level corpus small enough that evaluating all of it (eval_tokens=0) takes milliseconds."""
    root = tmp_path_factory.mktemp("small")
    for name, seed, words in (("train", 0, 3000), ("val", 10, 200), ("other", 11, 200)):
        (root / f"{name}.txt").write_text(make_text(seed, words), encoding="utf-8")
    out = root / "prepared"
    data.prepare_files(out, [str(root / "train.txt")], {"val": [str(root / "val.txt")],
                                                        "other": [str(root / "other.txt")]}, "byte", workers=1)
    return out


# ----------------------------------------------------------------------------- train.py: [model] and [train]
TRAIN_KEYS = [(sec, f.name) for sec, cls in SECTIONS.items() for f in fields(cls) if f.name != "vocab_size"] + \
             [("model", "vocab_size")]


def legal(key, typ, value, how):
    """Whether a value is within what a [model] or [train] key accepts by its type, its range and its choices
    (a legal value may still be refused by a rule between keys: no budget, more tokens than a run may take)."""
    v = tomllib.loads(f"v = {value}")["v"] if how == "toml" else value
    if typ is bool:
        return isinstance(v, bool) if how == "toml" else v.lower() in BOOL_WORDS
    if typ is str:
        if not isinstance(v, str):
            return False
        choices = {**CHOICES, "scheme": flops.SCHEMES, "device": ("auto", "cpu", "cuda")}  # (and cuda:N)
        if key in choices:
            return v in choices[key]
        if key == "data":
            return False  # no value of the table is a prepared data folder
        return key in FREE_TEXT or bool(v.strip())  # out_dir, wandb_project: a name
    if how == "flag":
        try:
            v = int(v)
        except ValueError:
            try:
                v = float(v)
            except ValueError:
                return False
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (typ is int and v != int(v)):
        return False
    lo, hi, _ = RANGES[key]
    return lo <= v <= hi


def train_base(key, data_dir, out):
    """A tiny run of two steps into out, with the fuzzed key's own flag left out."""
    base = TINY_MODEL + [f"--data={data_dir}", f"--out_dir={out}", "--iters=2", "--stop_at=2", "--batch_seqs=2",
                         "--eval_tokens=256", "--sample_tokens=0"]
    if key in ("tokens", "compute"):
        base.remove("--iters=2")
    return [a for a in base if not a.startswith(f"--{key}=")]


@pytest.mark.parametrize("how", ["flag", "toml"])
@pytest.mark.parametrize("sec,key", TRAIN_KEYS, ids=[k for _, k in TRAIN_KEYS])
def test_every_train_key(sec, key, how, small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    typ = {f.name: f.type for f in fields(SECTIONS[sec])}[key]
    text_ran = False
    for i, (name, value) in enumerate((BAD if how == "flag" else BAD_TOML).items()):
        if name == "bool" and typ is bool:
            continue  # legal, and not a bad value: true would run what the key turns on (torch.compile, W&B)
        out = tmp_path / f"case{i}"
        out.mkdir()
        base = train_base(key, small_data, out / "run")
        if how == "flag":
            argv = base + [f"--{key}={value}"]
        else:
            (out / "c.toml").write_text(f"[{sec}]\n{key} = {value}\n")
            argv = [str(out / "c.toml")] + base
        if text_ran:  # a text key reads every name alike, as text: one has run, the others are checked as a run's
            argv.append("--plan")  # config is (train.py --plan: every check of the config, then the plan)
        got, err = outcome(train.main, argv, key, capsys)
        text_ran = text_ran or (typ is str and got == "ran")
        if not legal(key, typ, value, how):
            must_refuse(got, err, argv, name, value)
        if got == "refused":
            assert not (out / "run").exists(), f"{argv}: refused after writing {out / 'run'}"


# ----------------------------------------------------------------------------- sweep files
SWEEP_KEYS = [("sweep", f.name) for f in fields(sweep_plan.Sweep)] + \
             [("moe", k) for k in (*sweep_plan.BACKBONE[1:], "mu", "lr_mult", "batch_mult")] + \
             [("dense", k) for k in (*sweep_plan.BACKBONE[1:], "lr_mult", "batch_mult")]
# what a sweep key accepts of BAD_TOML: 0 where it means "the default", true for a boolean; the rest is refused
SWEEP_ACCEPTS = {"sweep.De": {"zero"}, "sweep.warmup_frac": {"zero"}, "sweep.include_router": {"bool"},
                 "moe.Dh": {"zero"}, "dense.Dh": {"zero"}}


@pytest.mark.parametrize("sec,key", SWEEP_KEYS, ids=[f"{s}.{k}" for s, k in SWEEP_KEYS])
def test_every_sweep_key(sec, key, tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
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
        argv = ["plan", str(path)]
        got, err = outcome(sweep.main, argv, key, capsys)
        if name in SWEEP_ACCEPTS.get(f"{sec}.{key}", ()):
            assert got == "ran", f"{sec}.{key} = {value}: refused, and it is legal:\n{err}"
        else:
            must_refuse(got, err, argv, name, value)


# ----------------------------------------------------------------------------- every command line's flags
def flags(p, prefix=()):
    """(subcommand path, option string or positional name, argparse action) of every argument of a parser."""
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from flags(sub, prefix + (name,))
        else:
            yield prefix, action.option_strings[0] if action.option_strings else action.dest, action


@pytest.fixture(scope="module")
def finished(small_data, tmp_path_factory):
    """A finished tiny run, and the sweep folder that holds it."""
    root = tmp_path_factory.mktemp("finished")
    train.train(TINY_MODEL + [f"--data={small_data}", f"--out_dir={root / 'one'}", "--iters=2", "--batch_seqs=2",
                              "--eval_tokens=256", "--sample_tokens=0"])
    return root


def cli_base(program, sub, data_dir, finished, tmp):
    """A quick, legal command line of each program (and subcommand); the fuzzed flag goes on top."""
    moe = tmp / "moe.toml"
    moe.write_text('[model]\nscheme = "1dense"\nL = 2\nDm = 32\nH = 2\nDffn = 64\nE = 4\nK = 2\nDe = 16\nDse = 16\nS = 32\n')
    dense = tmp / "dense.toml"
    dense.write_text('[model]\nscheme = "dense"\nL = 2\nDm = 32\nH = 2\nDffn = 160\nS = 32\n')
    text = tmp / "in.txt"
    text.write_text("Some words of text, and more words.\n" * 20)
    sweep_file = micro_sweep(tmp, data_dir)
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
        ("bench", ("step",)): ["step", f"--moe={moe}", f"--dense={dense}", f"--data={data_dir}", "--iters=2",
                               "--log_interval=1", "--batch_seqs=2", "--peak_flops=1e11", *quick],
        ("bench", ("profile",)): ["profile", str(moe), "--batch_seqs=1", "--steps=1", "--top=2", *quick],
        ("bench", ("parts",)): ["parts", str(moe), f"--data={data_dir}", "--steps=4", "--warmup=3", "--malloc=default"],
        ("bench", ("nanogpt",)): ["nanogpt", f"--moe={moe}", f"--data={data_dir}", "--batch_seqs=1", "--rounds=1",
                                  "--warmup=0", "--malloc=default"],
        ("bench", ("versions",)): ["versions", str(ROOT), f"--config={moe}", f"--data={data_dir}", "--iters=1",
                                   "--batch_seqs=1", "--eval_tokens=33", "--rounds=1"],
    }[program, sub]


ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = {"sample": sample, "evaluate": evaluate, "data": data, "flops": flops, "sweep": sweep, "bench": bench}
# gpu-check is left out: a legal value of one of its flags would run all of its checks, a minute on a CPU
# (its flags are those every bench subcommand shares, fuzzed on each of the others)
PARSERS = {prog: module.parser() for prog, module in PROGRAMS.items()}
ACTIONS = {(prog, sub, flag): action for prog, p in PARSERS.items() for sub, flag, action in flags(p)
           if sub != ("gpu-check",)}
FLAGS = list(ACTIONS)
NAMES = set(BAD) - {"empty"}  # a new file or folder of that name, or free text
# what a flag accepts of BAD ("<program> <flag>"; a true-or-false flag takes 0, other flags nothing): 0 where it
# means "the default" or "none", a number within the flag's range, any name for what is written or is text
ACCEPTS = {
    "sample --prompt": set(BAD), "sample --temperature": {"huge", "10**20"}, "sample --top_k": {"zero", "10**20"},
    "sample --seed": {"zero"}, "evaluate --eval_tokens": {"zero"},
    "data --out": NAMES, "data --text_field": NAMES, "data --workers": {"zero"}, "data --shuffle_seed": {"zero"},
    "flops --Dh": {"zero"}, "flops --Dse": {"zero"}, "flops --C": {"10**20"},
    "sweep --out": NAMES,
    "bench --json": NAMES, "bench --Dse": {"zero"}, "bench --threads": {"zero"}, "bench --warmup": {"zero"},
    "bench --micro_batch": {"zero"}, "bench --by_op": {"zero"}, "bench --peak_flops": {"zero", "10**20"},
    "bench --eval_tokens": {"zero"},
}

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


# bench's `versions` and `parts` time whole train.py runs: where a fuzzed value is legal, a second each
SLOW_SUBS = {("bench", ("versions",)), ("bench", ("parts",))}


@pytest.fixture(autouse=True)
def parsers_built_once(monkeypatch):
    """Each program's own parser, built once for the module (bench.py's and sweep.py's take milliseconds to build,
    their help read from the sources, and main() runs hundreds of times here): parsed afresh for each value."""
    for prog, module in PROGRAMS.items():
        monkeypatch.setattr(module, "parser", lambda p=PARSERS[prog]: p)


@pytest.fixture
def cheap_bench(monkeypatch):
    """bench.py without its costly parts that no flag's checks are in: `versions` starts `python train.py` in this
    process (train.main, with the command line it would be given; the processes themselves are test_bench.py's),
    and `step` with --peak_flops=0 gets a fixed matmul rate instead of measuring one (test_bench.py measures it)."""
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        if cmd[:2] != [sys.executable, "train.py"]:
            return real_run(cmd, *args, **kwargs)
        assert Path(kwargs["cwd"]) == ROOT
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                train.main(cmd[2:])
                code = 0
            except SystemExit as e:
                code = e.code
        return subprocess.CompletedProcess(cmd, code, None, err.getvalue())
    monkeypatch.setattr(bench.subprocess, "run", run)
    monkeypatch.setattr(bench, "matmul_rate", lambda device, dtype: 1e11)


@pytest.mark.parametrize("prog,sub,flag", [pytest.param(p, s, f, marks=[pytest.mark.slow] if (p, s) in SLOW_SUBS else [])
                                           for p, s, f in FLAGS],
                         ids=[f"{p}-{' '.join(s)}-{f}".replace(" -", "-") for p, s, f in FLAGS])
def test_every_flag(prog, sub, flag, small_data, finished, tmp_path, monkeypatch, capsys, cheap_bench):
    monkeypatch.chdir(tmp_path)
    action = ACTIONS[prog, sub, flag]
    positional = not flag.startswith("-")
    key = flag.lstrip("-")
    boolean = action.type is rundir.true_or_false
    accepted = set() if positional else ACCEPTS.get(f"{prog} {flag}", {"zero"} if boolean else set())
    for i, (name, value) in enumerate(BAD.items()):
        tmp = tmp_path / f"case{i}"
        tmp.mkdir()
        argv = with_flag(cli_base(prog, sub, small_data, finished, tmp), flag, value, positional)
        if positional:  # a path that is not there: refused, naming the argument or the path given
            with pytest.raises(SystemExit) as e:
                PROGRAMS[prog].main(argv)
            err = capsys.readouterr().err
            assert e.value.code == 2 and "Traceback" not in err and (named(key, err) or shown(value, err)), \
                f"{argv}: exit {e.value.code}:\n{err}"
            continue
        got, err = outcome(PROGRAMS[prog].main, argv, key, capsys)
        if name in accepted:
            assert got == "ran", f"{argv}: refused, and {name} is a legal value of {prog} {flag}:\n{err}"
            if prog == "bench" and flag == "--json":  # the other names are written alike: no need to run it again
                monkeypatch.setattr(bench, f"bench_{sub[0]}", lambda a: {})
        else:
            must_refuse(got, err, argv, name, value)
