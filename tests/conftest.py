import hashlib
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

# One OpenMP thread for the tests and the programs they start, unless the caller sets OMP_NUM_THREADS: the tiny
# models gain nothing from more, and on a busy 2-core machine spinning OpenMP threads made the fast subset ten
# times slower. Set before torch is first imported; test_model.py checks gradients on 1 and 2 threads itself.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import data  # noqa: E402

WORDS = ("the king queen sword crown night day love death honour fool storm sea land heart blood "
         "café naïve señor Straße déjà vu — “quoted” ½").split()


def make_text(seed, n_words):
    """Pseudo-text with non-ASCII characters, so that characters and UTF-8 bytes differ."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n_words // 7)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared byte-level corpus: train (three documents), val and a second validation set."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (root / f"train{i}.txt").write_text(make_text(i, 6000), encoding="utf-8")
    (root / "val.txt").write_text(make_text(10, 1500), encoding="utf-8")
    (root / "other.txt").write_text(make_text(11, 1500).upper(), encoding="utf-8")
    out = root / "prepared"
    data.prepare_files(out, [str(root / "train*.txt")], {"val": [str(root / "val.txt")],
                                                          "other": [str(root / "other.txt")]}, "byte", workers=1)
    return out


def pytest_collection_modifyitems(items):
    """A test module's SLOW_CASES (names of parametrized cases, as pytest shows them) are marked slow."""
    for item in items:
        if item.name in getattr(getattr(item, "module", None), "SLOW_CASES", ()):
            item.add_marker(pytest.mark.slow)


TINY_MODEL = ["--scheme=1dense", "--L=2", "--Dm=32", "--H=2", "--Dffn=64", "--E=4", "--K=2", "--De=16", "--Dse=16",
              "--S=32"]


def on_top(base, extra):
    """base with the flags of extra in place of its own (train.py refuses a flag given twice); with
    --scheme=dense on top, without base's MoE-only keys (train.py refuses them on a dense model)."""
    from harness.config import MOE_ONLY
    given = {a.partition("=")[0] for a in extra}
    if "--scheme=dense" in extra:
        given |= {f"--{k}" for k in MOE_ONLY}
    return [a for a in base if a.partition("=")[0] not in given] + list(extra)


def tiny_run_argv(tiny_data, out, *extra):
    """argv for a 12-iteration run of a tiny MoE on the tiny corpus into out, logging every step."""
    return on_top(TINY_MODEL + [f"--data={tiny_data}", f"--out_dir={out}", "--iters=12", "--batch_seqs=4", "--warmup=3",
                                "--eval_interval=6", "--eval_tokens=1024", "--log_interval=1", "--sample_tokens=0"], extra)


@pytest.fixture
def tiny_run(tiny_data, tmp_path):
    """argv for a 12-iteration run of a tiny MoE on the tiny corpus, logging every step."""
    def argv(out="run", *extra):
        return tiny_run_argv(tiny_data, tmp_path / out, *extra)
    return argv


# tiny_run's config, trained once for the session by the tests that read the runs (copy a folder before changing it)
@pytest.fixture(scope="session")
def whole_run(tiny_data, tmp_path_factory):
    """tiny_run's run, on one process, to the end."""
    import train
    out = tmp_path_factory.mktemp("session-runs") / "whole"
    train.train(tiny_run_argv(tiny_data, out))
    return out


@pytest.fixture(scope="session")
def fsdp_half(tiny_data, tmp_path_factory):
    """tiny_run's run on 2 FSDP ranks (torchrun), stopped with a sharded checkpoint at step 6."""
    from tests.test_train import run_ddp
    out = tmp_path_factory.mktemp("session-runs") / "half"
    run_ddp(tiny_run_argv(tiny_data, out, "--parallel=fsdp", "--stop_at=6"), nproc=2)
    return out


def torn_next_save(run_dir):
    """What a kill during the save after step 6 leaves in a sharded run: a step folder that latest.json does not
    name, with a torn shard. Returns that folder."""
    half = Path(run_dir) / "ckpt" / "step-00000009"
    shutil.copytree(Path(run_dir) / "ckpt" / "step-00000006", half)
    (half / "__1_0.distcp").write_bytes(b"torn")
    return half


@pytest.fixture(scope="session")
def fsdp_resumed(fsdp_half, tmp_path_factory):
    """fsdp_half killed during its next save (torn_next_save) and resumed on 2 FSDP ranks to the end: a finished
    run with a sharded checkpoint."""
    from tests.test_train import run_ddp
    out = tmp_path_factory.mktemp("session-runs") / "resumed"
    shutil.copytree(fsdp_half, out)
    torn_next_save(out)
    run_ddp(["--out_dir=" + str(out), "--resume"], nproc=2)
    return out


# ----------------------------------------------------------------------------- a short run, and what it must leave
def snapshot(folder):
    """Every file under folder, by relative path, with its sha256 (links and folders by what they are)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = "link" if p.is_symlink() else "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tiny(tiny_data, out, *extra):
    """argv for a 6-iteration run of the tiny MoE into out, evaluated every 3 steps, without a sample."""
    return on_top(TINY_MODEL + [f"--data={tiny_data}", f"--out_dir={out}", "--iters=6", "--batch_seqs=4", "--eval_interval=3",
                                "--eval_tokens=1024", "--log_interval=1", "--sample_tokens=0"], extra)


def refused(main, argv, capsys):
    """The stderr of a program (main) that must stop with exit code 2 and no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="session")
def finished_once(tiny_data, tmp_path_factory):
    """A finished short run (tiny), trained once for the session: finished copies it for each test."""
    import train
    out = tmp_path_factory.mktemp("finished") / "run"
    train.train(tiny(tiny_data, out))
    return out


@pytest.fixture
def finished(finished_once, tmp_path):
    """A finished short run (tiny) in tmp_path/run, the test's own: what a refused command must leave as it was.
    A copy, file for file, of finished_once: its config.toml, ckpt.pt and summary.json name finished_once's folder
    as out_dir, which no command reads back (a resume or an overwrite works in the --out_dir it is given)."""
    out = tmp_path / "run"
    shutil.copytree(finished_once, out, symlinks=True)
    return out


def micro_sweep(tmp_path, data="unused", compute="2e9", ra="[0.413, 0.496]", reuse='["none"]', dense_Dm=48, extra=""):
    """A MICRO sweep file in tmp_path, with extra [sweep] lines."""
    text = MICRO.format(data=data, compute=compute, ra=ra, reuse=reuse, dense_Dm=dense_Dm)
    path = tmp_path / f"sweep-{len(list(tmp_path.glob('sweep-*.toml')))}.toml"
    path.write_text(text.replace("tolerance = 0.02\n", "tolerance = 0.02\n" + extra))
    return path


def finished_summary(run, sweep_, train_over, out, bpc):
    """The summary.json that train.py writes for a finished run of a sweep's plan, with the given final BPC."""
    from harness import sweep_plan
    setup = sweep_plan.run_setup(run, sweep_, train_over, out)
    numbers = {k: getattr(run, k) for k in ("ra", "N", "C", "D", "iters", "batch_seqs", "lr", "warmup", "epochs")}
    return {"finished": True, "step": run.iters, "final": {"bpc_val": bpc}, "data": data.identity(setup.meta),
            "config": {"model": asdict(setup.mcfg), "train": asdict(setup.tcfg)}, "unique_tokens": run.unique_tokens,
            **numbers}


# a sweep of two MoE arms and the dense baselines on a 2-layer backbone: plans in milliseconds, runs in seconds
MICRO = """[sweep]
compute = {compute}
ra = {ra}
reuse = {reuse}
E_pref = 40
tolerance = 0.02
[moe]
scheme = "1dense"
L = 2
Dm = 32
H = 2
Dh = 16
Dffn = 88
S = 32
mu = 12.0
[dense]
L = 2
Dm = {dense_Dm}
H = 3
Dh = 16
Dffn = 128
S = 32
[train]
data = "{data}"
eval_tokens = 512
"""
