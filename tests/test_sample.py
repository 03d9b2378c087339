"""sample.py and evaluate.py on a run's checkpoint (whole and sharded), the end-of-run sample, the dense twin."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import evaluate
import flops
from harness import schedule
import train
from harness.config import load_config
from model import GPT, GPTConfig
from sample import sample_text
from tests.test_parallel import sharded_weights
from tests.test_train import run_ddp

ROOT = Path(__file__).resolve().parent.parent


def cli(prog, *args):
    return subprocess.run([sys.executable, str(ROOT / prog), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """A finished one-process run (ckpt.pt) and a 2-rank FSDP run (sharded checkpoint) of the same config."""
    root = tmp_path_factory.mktemp("runs")
    argv = ["--scheme=1dense", "--L=2", "--Dm=32", "--H=2", "--Dffn=64", "--E=4", "--K=2", "--De=16", "--Dse=16",
            "--S=32", f"--data={tiny_data}", "--iters=12", "--batch_seqs=4", "--eval_tokens=1024", "--sample_tokens=0"]
    whole = train.train(argv + [f"--out_dir={root / 'whole'}"])
    run_ddp(argv + [f"--out_dir={root / 'sharded'}", "--parallel=fsdp"], nproc=2)
    return root, whole


def checkpoint_weights(run_dir):
    """A run's final weights, read from its checkpoint files without checkpoint.py: ckpt.pt, or the DCP shards
    that ckpt/latest.json names."""
    if (run_dir / "ckpt.pt").exists():
        return torch.load(run_dir / "ckpt.pt", weights_only=True)["model"]
    return sharded_weights(run_dir, checkpoint_weights(run_dir.parent / "whole"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # reading the shards here, on one process
def test_sample_continues_the_prompt_reproducibly_from_either_checkpoint(runs):
    # sample.py's text is the sample, with that seed and the data's vocabulary, of the weights the checkpoint
    # holds, whole or sharded; the two runs' weights differ by rounding only (2 ranks against 1 process)
    root, _ = runs
    texts = []
    for run in ("whole", "sharded", "whole"):
        r = cli("sample.py", root / run, "--prompt=ROMEO:", "--tokens=40", "--seed=3")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("ROMEO:") and len(r.stdout.encode()) > 40
        texts.append(r.stdout)
    assert texts[0] == texts[2]  # the same seed, the same text
    weights = {}
    for run, text in zip(("whole", "sharded"), texts):
        summary = json.loads((root / run / "summary.json").read_text())
        model = GPT(GPTConfig(**summary["config"]["model"]))
        weights[run] = checkpoint_weights(root / run)
        model.load_state_dict(weights[run])
        assert text == sample_text(model, data.ByteTokenizer(), "ROMEO:", 40, seed=3, vocab=256) + "\n"
    assert all(torch.allclose(weights["whole"][k], weights["sharded"][k], atol=1e-5) for k in weights["whole"])
    assert texts[0] != cli("sample.py", root / "whole", "--prompt=ROMEO:", "--tokens=40", "--seed=4").stdout
    r = cli("sample.py", root / "whole", "--samples=2", "--tokens=10")
    assert r.returncode == 0 and r.stdout.count("-" * 40) == 1


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--tokens=0"], "--tokens=0: expected an integer in 1..1,000,000"),
    (["--temperature=0"], "--temperature=0.0: expected a finite number > 0"),
    (["--top_k=-1"], "--top_k=-1: expected an integer >= 0")])
def test_sample_refuses_bad_arguments(runs, args, message):
    r = cli("sample.py", runs[0] / "whole", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_sample_and_evaluate_name_a_missing_run(tmp_path):
    for prog in ("sample.py", "evaluate.py"):
        r = cli(prog, tmp_path / "nothing")
        assert r.returncode == 2 and "no such run directory" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = cli("sample.py", tmp_path / "empty")
    assert r.returncode == 2 and "no checkpoint in it" in r.stderr


@pytest.mark.slow
def test_evaluate_gives_the_final_bpc_of_training_from_either_checkpoint(runs):
    root, whole = runs
    bpc, _ = evaluate.evaluate_run(root / "whole")
    assert bpc == pytest.approx({k.removeprefix("bpc_"): v for k, v in whole["final"].items()}, abs=1e-9)
    sharded = json.loads((root / "sharded" / "summary.json").read_text())["final"]
    bpc, _ = evaluate.evaluate_run(root / "sharded")
    assert bpc == pytest.approx({k.removeprefix("bpc_"): v for k, v in sharded.items()}, abs=1e-6)
    r = cli("evaluate.py", root / "whole", "--splits=val,train", "--eval_tokens=0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["step"] == 12 and set(out) == {"run", "step", "bpc_val", "bpc_train"}


@pytest.mark.slow
def test_evaluate_refuses_data_of_another_tokenizer_and_unknown_splits(runs, tmp_path):
    root, _ = runs
    meta = json.loads((Path(json.loads((root / "whole" / "summary.json").read_text())["config"]["train"]["data"])
                       / "meta.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({**meta, "tokenizer": "cl100k_base", "vocab_size": 100277,
                                                        "eot": 100257, "dtype": "uint32"}))
    r = cli("evaluate.py", root / "whole", f"--data={other}")
    assert r.returncode == 2 and "tokenised with cl100k_base" in r.stderr and "--tokenizer=byte" in r.stderr
    r = cli("evaluate.py", root / "whole", "--splits=test")
    assert r.returncode == 2 and "has no split 'test'" in r.stderr


def test_a_finished_run_prints_a_sample(tiny_run, capsys):
    train.train(tiny_run("s", "--sample_tokens=30"))
    out = capsys.readouterr().out
    assert "sample (more: python sample.py" in out and out.rstrip().splitlines()[-1]


def test_the_dense_twin_has_the_toy_models_N_and_C():
    m, t, _, _ = load_config([str(ROOT / "configs" / "toy.toml")])
    md, td, _, _ = load_config([str(ROOT / "configs" / "toy-dense.toml")])
    toy, dense = GPTConfig(**{"vocab_size": 256, **m}), GPTConfig(**{"vocab_size": 256, **md})
    assert dense.scheme == "dense" and flops.count(dense).N == pytest.approx(flops.count(toy).N, rel=0.01)
    C_toy, C_dense = schedule.for_training(toy, t, 1).C, schedule.for_training(dense, td, 1).C
    assert C_dense == pytest.approx(C_toy, rel=0.01)
