"""One set of rules in every program (docs/safety.md), each walked over its whole class, generated from the code:
- a flag given twice is refused, naming the flag and both values, by every flag of every command line (a flag
  meant to repeat, action="append" or "extend", stays repeatable);
- a key read by MoE layers only, set to anything but its default on a dense model, is refused naming the key, in
  train.py (flag and config file), flops.py (flag and config file) and sweep.py (its [dense] and [train] tables);
- a sweep's [moe] arm is an MoE and its [dense] arm dense, and an moe.mu too small to build one is named;
- data.py prepares into exactly the folders that train.py reads: a table of names goes through both;
- a config file reads alike in train.py and flops.py: every integer key written as a float (Dm = 32.0)."""
import argparse
import contextlib
import io
import json
from dataclasses import fields

import pytest

import data
import evaluate
import flops
import sample
import sweep
import train

from dev import bench, corpus, gpucheck, ladder_report
from harness import config, preflight
from harness.helptext import Parser
from tests.conftest import MICRO, make_text
from tests.test_every_input import flags, named, shown

PROGRAMS = {"data": data, "evaluate": evaluate, "flops": flops, "sample": sample, "sweep": sweep, "bench": bench,
            "gpucheck": gpucheck, "ladder_report": ladder_report, "corpus": corpus}
PARSERS = {prog: module.parser() for prog, module in PROGRAMS.items()}
ARGS = [(prog, sub, flag, action) for prog, p in PARSERS.items() for sub, flag, action in flags(p)]
ONCE = [(prog, sub, flag) for prog, sub, flag, action in ARGS
        if flag.startswith("-") and not isinstance(action, Parser.REPEATABLE)]
TRAIN_FLAGS = [f"--{f.name}" for cls in config.SECTIONS.values() for f in fields(cls)] + ["--resume", "--plan", "--nproc"]


def ident(prog, sub, flag):
    return " ".join((prog, *sub, flag))


def two_values(action):
    """Two values the flag reads (its type and choices accept them), so that only the repetition is wrong."""
    if action.nargs == 0:
        return None, None

    def reads(v):
        try:
            x = action.type(v) if action.type else v
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            return False
        return not action.choices or x in action.choices
    d = action.default
    near = [str(d), str(d + 1)] if isinstance(d, (int, float)) and not isinstance(d, bool) else []
    tries = [*map(str, action.choices or ()), *near, "true", "false", "2", "3", "1", "0", "0.5", "1e3", "a", "b"]
    ok = [v for v in tries if reads(v)]
    assert ok, f"{action.option_strings[0]}: no value of {tries} is read"
    return ok[0], ok[1 if len(ok) > 1 else 0]


def parse_error(parser, argv, capsys):
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, f"{argv}: exit {e.value.code}:\n{err}"
    return err


def test_every_parser_is_a_parser_of_the_rule():
    """Every program's command line (and each subcommand) is a helptext.Parser: the rule is built in, not copied."""
    for prog, p in PARSERS.items():
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        assert all(isinstance(s, Parser) for s in [p] + [c for a in subs for c in a.choices.values()]), prog


@pytest.mark.parametrize("prog,sub,flag", ONCE, ids=[ident(*a) for a in ONCE])
def test_every_flag_given_twice(prog, sub, flag, capsys):
    action = dict(((p, s, f), a) for p, s, f, a in ARGS)[prog, sub, flag]
    first, second = two_values(action)
    if first is None:  # a switch: --json --json
        forms = [[flag, flag]]
    else:
        forms = [[f"{flag}={first}", f"{flag}={second}"], [flag, first, f"{flag}={second}"]]
    for form in forms:
        err = parse_error(PARSERS[prog], list(sub) + form, capsys)
        assert f"argument {flag}: given twice" in err, f"{form}:\n{err}"
        assert first is None or (first in err and second in err), f"{form}: both values are not named:\n{err}"


def test_repeatable_flags_stay_repeatable():
    """The flags meant to repeat take each value they are given, in order."""
    a = PARSERS["data"].parse_args(["--train", "a", "--train", "b", "c", "--val", "x", "--val", "y"])
    assert (a.train, a.val) == (["a", "b", "c"], ["x", "y"])
    a = PARSERS["ladder_report"].parse_args(["report", "r1", "r2", "--split", "val", "--split", "milton"])
    assert a.split == ["val", "milton"]


@pytest.mark.parametrize("flag", TRAIN_FLAGS)
def test_every_train_flag_given_twice(flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    twice = [flag, flag] if flag in ("--resume", "--plan") else [f"{flag}=1", f"{flag}=2"]
    with pytest.raises(SystemExit) as e:
        train.main(twice + ([] if flag == "--plan" else ["--plan"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and f"{flag} given twice ({twice[0]} and {twice[1]})" in err, err
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- MoE keys on a dense model
DENSE = {"scheme": "dense", "L": 2, "Dm": 32, "H": 2, "Dffn": 64, "S": 32}


def not_default(key):
    """A legal value of an MoE-only key that is not its default."""
    default = getattr(config.ModelConfig, key)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    return default / 2 if default else config.RANGES[key][1] / 2


def toml(v):
    return str(v).lower() if isinstance(v, bool) else repr(v)


def refused(main, argv, key, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and named(key, err), f"{argv}: exit {e.value.code}:\n{err}"
    return err


@pytest.mark.parametrize("key", config.MOE_ONLY)
def test_every_moe_key_on_a_dense_model(key, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    value = not_default(key)
    flag = f"--{key}={toml(value)}"
    shape = key in {f.name for f in fields(flops.Shape)}
    dense_flags = [f"--{k}={v}" for k, v in DENSE.items()]
    (tmp_path / "c.toml").write_text("[model]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in {**DENSE, key: value}.items()))
    # train.py, as a flag and in its config file: refused before anything is written
    for argv in (dense_flags + [flag, "--iters=1", "--plan"], [str(tmp_path / "c.toml"), "--iters=1", "--plan"]):
        assert shown(toml(value), refused(train.main, argv, key, value, capsys))
    # flops.py: a shape key as a flag; every key in a config file
    if shape:
        refused(flops.main, dense_flags + [flag], key, value, capsys)
    refused(flops.main, [str(tmp_path / "c.toml")], key, value, capsys)
    # sweep.py: neither the [dense] arm nor [train] reads it
    text = MICRO.format(data="unused", compute="2e9", ra="[0.413]", reuse='["none"]', dense_Dm=48)
    for table in ("[dense]", "[train]"):
        (tmp_path / "s.toml").write_text(text.replace(f"{table}\n", f"{table}\n{key} = {toml(value)}\n"))
        refused(sweep.main, ["plan", str(tmp_path / "s.toml")], key, value, capsys)
    # its default, given, means what leaving it out does
    train.main(dense_flags + [f"--{key}={toml(getattr(config.ModelConfig, key))}", "--iters=1", "--plan"])


# ----------------------------------------------------------------------------- a sweep's two arms
@pytest.mark.parametrize("arm", ["moe", "dense"])
@pytest.mark.parametrize("scheme", flops.SCHEMES)
def test_every_scheme_in_each_arm(arm, scheme, tmp_path, capsys):
    text = MICRO.format(data="unused", compute="2e9", ra="[0.413]", reuse='["none"]', dense_Dm=48)
    text = text.replace('scheme = "1dense"\n', "").replace(f"[{arm}]\n", f'[{arm}]\nscheme = "{scheme}"\n')
    (tmp_path / "s.toml").write_text(text)
    if (scheme == "dense") == (arm == "dense"):  # planned, or refused for another reason (a width out of reach)
        with contextlib.suppress(SystemExit):
            sweep.main(["plan", str(tmp_path / "s.toml")])
        assert not named("scheme", capsys.readouterr().err)
        return
    err = refused(sweep.main, ["plan", str(tmp_path / "s.toml")], "scheme", scheme, capsys)
    assert f"{arm}.scheme = '{scheme}'" in err, err


@pytest.mark.parametrize("mu", [1e-300, 1e-9, 0.001, 0.5, 1.0, 2.0])
def test_a_small_mu_is_named(mu, tmp_path, capsys):
    text = MICRO.format(data="unused", compute="2e9", ra="[0.413]", reuse='["none"]', dense_Dm=48)
    (tmp_path / "s.toml").write_text(text.replace("mu = 12.0", f"mu = {mu!r}"))
    err = refused(sweep.main, ["plan", str(tmp_path / "s.toml")], "mu", mu, capsys)
    assert f"moe.mu = {mu!r}" in err, err


# ----------------------------------------------------------------------------- data.py --out and train.data
NAMES = ["plain", "a b", " lead", "trail ", "x=y", "a,b", "#hash", "'q\"", "-dash", "ünï ☃", "slash/", "./dot",
         "deep/er/one", "", " ", "a\tb", "a\nb", "esc\x1b", "del\x7f", "sur\udcff", "in.txt", "in.txt/under"]


def test_data_prepares_what_train_reads(tmp_path, monkeypatch):
    """Each name of the table is accepted by both (data.py prepares it, train.py reads that data) or refused by
    both, naming the flag or the key and the value, and then nothing is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text(make_text(0, 800), encoding="utf-8")
    (tmp_path / "v.txt").write_text(make_text(1, 200), encoding="utf-8")
    before, outcomes = set(tmp_path.iterdir()), set()
    for name in NAMES:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                data.main(["--train", "in.txt", "--val", "v.txt", f"--out={name}", "--workers=1"])
                prepared = True
            except SystemExit as e:
                assert e.code == 2 and "--out=" in err.getvalue() and repr(name) in err.getvalue(), err.getvalue()
                prepared = False
        try:
            mvals, tcfg, given, _ = config.load_config([f"--{k}={v}" for k, v in DENSE.items()] + [f"--data={name}", "--iters=1"])
            preflight.check_run(mvals, tcfg, given, False, prepare=False)
            read = True
        except ValueError as e:
            assert f"train.data={name!r}" in str(e), e
            read = False
        assert prepared == read, f"{name!r}: data.py {'prepares' if prepared else 'refuses'} it, train.py " \
                                 f"{'reads' if read else 'refuses'} it"
        if not prepared:
            assert set(tmp_path.iterdir()) == before, f"{name!r}: refused after writing"
        before = set(tmp_path.iterdir())
        outcomes.add(prepared)
    assert outcomes == {True, False}  # the table holds names of both kinds


# ----------------------------------------------------------------------------- one reading of a config file
def test_every_integer_key_written_as_a_float_reads_alike(tmp_path, monkeypatch, capsys):
    """Dm = 32.0 in a config file is Dm = 32 for train.py and for flops.py alike (they read it with one function)."""
    monkeypatch.chdir(tmp_path)
    moe = {"scheme": "1dense", "L": 2, "Dm": 32, "H": 2, "Dh": 16, "Dffn": 64, "E": 4, "K": 2, "De": 16, "Dse": 16, "S": 32}
    ints = [f.name for f in fields(config.ModelConfig) if f.type is int and f.name in moe]
    assert len(ints) == 10
    for key in ints:
        (tmp_path / "c.toml").write_text("[model]\n" + "".join(f"{k} = {toml(float(v) if k == key else v)}\n"
                                                               for k, v in moe.items()))
        train.main([str(tmp_path / "c.toml"), "--iters=1", "--plan"])
        flops.main([str(tmp_path / "c.toml"), "--json"])
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["shape"] == moe
