"""--help and -h of every command line: exit 0, no traceback, and train.py, sweep.py and flops.py list every
config key with its default and meaning. The meaning is the comment on the dataclass field's line
(helptext.py): a field without one fails test_every_field_has_a_line_of_meaning."""
import inspect
import json
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

import data
import evaluate
import flops
import sample
import sweep
import train
from model import GPTConfig

from harness import helptext
from harness import sweep_plan
from harness.config import SECTIONS

from dev import bench
from dev import gpucheck
from dev import ladder_report

ROOT = Path(__file__).resolve().parent.parent
# every config dataclass whose fields are keys of a file or flags: its fields must each have a line of meaning
CLASSES = [GPTConfig, SECTIONS["train"], flops.Shape, sweep_plan.Sweep, sweep_plan.Arm]


def default(f):
    return f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else MISSING


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_every_field_has_a_line_of_meaning(cls):
    keys = helptext.keys(inspect.getsourcefile(cls), cls.__name__)
    assert [k.name for k in keys] == [f.name for f in fields(cls)]  # read from the source as the dataclass has them
    assert [k.default for k in keys] == [default(f) for f in fields(cls)]
    undocumented = [k.name for k in keys if not k.doc.strip()]
    assert not undocumented, (f"{cls.__name__}: give {', '.join(undocumented)} a comment on its line, its meaning "
                              f"in --help (helptext.py)")
    assert all("\n" not in k.doc for k in keys)


def test_train_tables_are_the_config_sections():
    # train.py --help reads model.py and harness/config.py without importing them: model.GPTConfig and TrainConfig
    assert list(helptext.TRAIN_TABLES) == list(SECTIONS)
    for cls, (path, name) in zip((GPTConfig, SECTIONS["train"]), helptext.TRAIN_TABLES.values()):
        assert (Path(inspect.getsourcefile(cls)), cls.__name__) == (path, name)
    # the torch-free [model] table that checks and plans is model.GPTConfig, field for field
    assert [(f.name, f.type, f.default) for f in fields(SECTIONS["model"])] == \
           [(f.name, f.type, f.default) for f in fields(GPTConfig)]


def test_the_comment_rules(tmp_path):
    """The comment on a field's line, and comment lines under it indented past the field; a comment line at
    the field's indentation (a note before the next field) is no one's meaning; a field without a comment has none."""
    (tmp_path / "base.py").write_text(textwrap.dedent('''\
        from dataclasses import dataclass, field


        @dataclass
        class Base:
            a: int = 1          # the a
        '''))
    (tmp_path / "conf.py").write_text(textwrap.dedent('''\
        from dataclasses import dataclass, field
        import base


        @dataclass
        class Conf(base.Base):
            b: str = "x"   # the b, which
            #                goes on here
                           # and here
            c: list = field(default_factory=lambda: [1, 2])  # the c
            # a note about d and e
            d: float = 2.5e6
            e: bool = True  # the e
            #   (and more)
            f: dict = field(default_factory=dict)
            g: float
        '''))
    keys = helptext.keys(tmp_path / "conf.py", "Conf")
    assert [(k.name, k.default, k.doc) for k in keys] == [
        ("a", 1, "the a"), ("b", "x", "the b, which goes on here and here"), ("c", [1, 2], "the c"),
        ("d", 2.5e6, ""), ("e", True, "the e (and more)"), ("f", {}, ""), ("g", MISSING, "")]
    assert helptext.table("[t]", keys[1:4]).splitlines() == [
        "[t]", '  b = "x"      the b, which goes on here and here', "  c = [1, 2]   the c", "  d = 2.5e6"]


def listed(out, keys):
    """Every key on a line of its own as `key = default` (the default as TOML reads it back), then its meaning."""
    lines = [ln.strip() for ln in out.splitlines()]
    for k in keys:
        line = next((ln for ln in lines if ln.startswith(f"{k.name} = ")), None)
        assert line is not None, f"{k.name} is not listed"
        assert line.endswith(k.doc)
        if k.default is not MISSING:
            value = line[:len(line) - len(k.doc)].strip()
            assert tomllib.loads(value)[k.name] == k.default, line


def keys_of(cls):
    return helptext.keys(inspect.getsourcefile(cls), cls.__name__)


HELP_ARGVS = [["--help"], ["-h"], ["configs/toy.toml", "--iters=3", "--help"], ["--out_dir=x", "--resume", "-h"],
              ["--plan", "--help"]]


def test_train_help_lists_every_key_before_torch_loads():
    # python train.py with each command line in turn, in one fresh process that no command line loads torch into
    code = ("import json, runpy, sys\nfor argv in json.loads(sys.argv[1]):\n    sys.argv = ['train.py'] + argv\n"
            "    try:\n        runpy.run_path('train.py', run_name='__main__')\n"
            "    except SystemExit as e:\n        assert not e.code, e.code\n"
            "    print('\\f', flush=True)\nprint('torch loaded:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(HELP_ARGVS)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and not r.stderr, r.stderr
    *helps, last = r.stdout.split("\f\n")
    assert len(helps) == len(HELP_ARGVS) and last.strip() == "torch loaded: False"
    for out in helps:
        assert out.startswith(train.__doc__.split("\n\n")[0].strip())
        assert "python train.py configs/<name>.toml --iters=2000" in out  # the command forms
        assert "[model]" in out and "[train]" in out
        listed(out, [k for cls in (GPTConfig, SECTIONS["train"]) for k in keys_of(cls)])


def test_train_main_answers_help_too(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(["--bogus=1", "--help"])  # --help wins over anything else given; nothing runs
    out, err = capsys.readouterr()
    assert not err and not list(tmp_path.iterdir())
    listed(out, [k for cls in (GPTConfig, SECTIONS["train"]) for k in keys_of(cls)])


def run_help(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code in (0, None) and not err, err
    assert out.startswith("usage:")
    return out


SWEEP_TABLES = {"sweep": keys_of(sweep_plan.Sweep),
                "moe": [k for k in keys_of(flops.Shape) if k.name in sweep_plan.BACKBONE] + keys_of(sweep_plan.Arm)[1:],
                "dense": [k for k in keys_of(flops.Shape) if k.name in sweep_plan.BACKBONE[1:]] + keys_of(sweep_plan.Arm)[2:],
                "train": [k for k in keys_of(SECTIONS["train"]) if k.name not in (*sweep_plan.SWEEP_OWNED, "overwrite")]}


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["plan", "--help"], ["plan", "x.toml", "-h"], ["run", "--help"]])
def test_sweep_help_lists_the_sweep_files_keys(argv, capsys):
    out = run_help(sweep.main, argv, capsys)
    assert "python sweep.py plan" in out or argv[0] in ("plan", "run")
    sections = {}
    for block in out.split("\n\n"):
        if block.startswith("["):
            sections[block[1:block.index("]")]] = block
    assert list(sections) == list(SWEEP_TABLES)
    for name, keys in SWEEP_TABLES.items():
        listed(sections[name], [k for k in keys if k.name != "mu"])
        assert len(sections[name].splitlines()) == len(keys) + 1  # those keys and no other
    assert "mu = (required)" in sections["moe"] and "compute = (required)" in sections["sweep"]
    # each table's keys are what load_sweep accepts: test_every_input.py fuzzes these very keys
    from tests.test_every_input import SWEEP_KEYS
    assert {(s, k.name) for s, keys in SWEEP_TABLES.items() if s != "train" for k in keys} == set(SWEEP_KEYS) | \
        {("moe", "scheme")}


def test_flops_help_gives_each_shape_key_its_meaning(capsys):
    out = " ".join(run_help(flops.main, ["--help"], capsys).split())  # argparse wraps the lines
    for k in keys_of(flops.Shape):
        assert f"--{k.name} " in out and " ".join(f"{k.doc} (default {helptext.toml_value(k.default)})".split()) in out


PROGRAMS = {"sample": (sample.main, []), "evaluate": (evaluate.main, []), "data": (data.main, []),
            "flops": (flops.main, []), "sweep": (sweep.main, ["report"]), "gpucheck": (gpucheck.main, []),
            "ladder_report": (ladder_report.main, []), "ladder_report report": (ladder_report.main, ["report"]),
            "ladder_report lr-check": (ladder_report.main, ["lr-check"]),
            **{f"bench {sub}": (bench.main, [sub]) for sub in ("gpu-check", "expert", "attention", "step", "profile")},
            "bench": (bench.main, [])}


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("program", PROGRAMS)
def test_every_program_answers_help(program, flag, capsys):
    main, sub = PROGRAMS[program]
    out = run_help(main, sub + [flag], capsys)
    assert "show this help message and exit" in out
