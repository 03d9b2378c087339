"""config.py: a run's configuration from a TOML file and --key=value flags, every value checked and named
when bad; the run configs in configs/ resolve. (Bad values through each program's command line are
test_safety.py's and test_every_input.py's; end-to-end runs with a config file are test_train.py's.)"""
from pathlib import Path

import pytest

from model import GPTConfig

from harness import schedule
from harness import config
from harness.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


# a word for a number or a boolean is test_every_input.py's, for every key
@pytest.mark.parametrize("argv,message", [
    (["--bogus=1"], "unknown config key 'bogus'"), (["--iters=1.5"], "expected an integer"), (["iters=3"], "missing.toml"),
    (["--L"], "expected --key=value")])
def test_bad_arguments_name_the_key(argv, message):
    argv = ["missing.toml"] if argv == ["iters=3"] else argv
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_config(argv)


def test_bad_config_file_names_the_key(tmp_path):
    (tmp_path / "a.toml").write_text("[train]\nitres = 3\n")
    with pytest.raises(ValueError, match=r"a.toml: unknown config key train.itres"):
        load_config([str(tmp_path / "a.toml")])
    (tmp_path / "b.toml").write_text("[optim]\nlr = 3\n")
    with pytest.raises(ValueError, match=r"unknown table \[optim\]"):
        load_config([str(tmp_path / "b.toml")])
    (tmp_path / "c.toml").write_text('[model]\nL = "four"\n')
    with pytest.raises(ValueError, match="L='four': expected int"):
        load_config([str(tmp_path / "c.toml")])



RUN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.toml") if not p.name.startswith("sweep"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_run_config_resolves(path):
    # one plan whatever the number of ranks: on 8 ranks where the config's micro-batch splits over 8
    m, t, _, _ = load_config([str(path)])
    mcfg = GPTConfig(**{"vocab_size": 65536, **m})
    plan = schedule.for_training(mcfg, t, 1)
    assert plan.iters >= 1 and plan.lr > 0 and plan.batch_seqs % plan.micro_batch == 0
    if "2b" in path.name or "7b" in path.name:  # the paper's shapes: multi-GPU by design
        assert schedule.for_training(mcfg, t, 8) == plan and plan.micro(8) >= 1
    if t.compute:
        assert plan.C == pytest.approx(t.compute, rel=0.01)


def test_toy_config_is_the_default():
    m, t, _, _ = load_config([str(ROOT / "configs" / "toy.toml")])
    assert GPTConfig(**m) == GPTConfig() and t == TrainConfig()


@pytest.mark.parametrize("values,message", [
    (dict(K=9, E=8), "K=9"), (dict(H=3, Dm=128), "H=3 does not divide Dm=128"),
    (dict(K=1, norm_topk=True), "norm_topk=true needs K > 1"), (dict(De=20), "De=20"), (dict(E=2.5), "E"),
    (dict(scheme="dense", Dffn=0), "Dffn=0"), (dict(scheme="interleave", L=1), "L=1")])
def test_impossible_model_values_are_refused_naming_the_key(values, message):
    """The one set of [model] rules (harness/config.py's table) that train.py, sweep.py and flops.py check by: the
    rules between keys here; each key's own range (0, a negative, a word) is test_every_input.py's, for every key."""
    with pytest.raises(ValueError, match=message):
        config.check_model(values)


def test_model_values_read_alike_in_every_program():
    """Dm = 32.0 in a TOML file is the integer 32 for train.py's checks and for flops.py's."""
    assert config.check_model({"Dm": 32.0, "scheme": "dense"}) == {"Dm": 32, "scheme": "dense"}
    assert config.shape_from_dict({"Dm": 32.0, "scheme": "dense"}, "x.toml").Dm == 32
