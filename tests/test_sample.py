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
import sample
import train
from model import GPT, GPTConfig
from sample import sample_text

from harness import schedule
from harness.config import load_config
from tests.conftest import refused, tiny
from tests.test_parallel import sharded_weights

ROOT = Path(__file__).resolve().parent.parent


def cli(prog, *args):
    return subprocess.run([sys.executable, str(ROOT / prog), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def run_main(main, argv, capsys):
    """stdout of a program run in this process (main(argv)), which must finish."""
    main([str(a) for a in argv])
    out, _ = capsys.readouterr()
    return out


@pytest.fixture(scope="session")
def runs(whole_run, fsdp_resumed):
    """A finished one-process run (ckpt.pt) and a 2-rank FSDP run (sharded checkpoint) of the same config."""
    return {"whole": whole_run, "sharded": fsdp_resumed}


def checkpoint_weights(runs, run):
    """A run's final weights, read from its checkpoint files without checkpoint.py: ckpt.pt, or the DCP shards
    that ckpt/latest.json names."""
    whole = torch.load(runs["whole"] / "ckpt.pt", weights_only=True)["model"]
    return whole if run == "whole" else sharded_weights(runs[run], whole)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # reading the shards here, on one process
def test_sample_continues_the_prompt_reproducibly_from_either_checkpoint(runs, capsys):
    # sample.py's text is the sample, with that seed and the data's vocabulary, of the weights the checkpoint
    # holds, whole or sharded; the two runs' weights differ by rounding only (2 ranks against 1 process)
    r = cli("sample.py", runs["whole"], "--prompt=ROMEO:", "--tokens=40", "--seed=3")  # as a program, once
    assert r.returncode == 0, r.stderr
    texts = [r.stdout] + [run_main(sample.main, [runs[run], "--prompt=ROMEO:", "--tokens=40", "--seed=3"], capsys)
                          for run in ("sharded", "whole")]
    assert texts[0].startswith("ROMEO:") and all(len(t.encode()) > 40 for t in texts)
    assert texts[0] == texts[2]  # the same seed, the same text
    weights = {}
    for run, text in zip(("whole", "sharded"), texts):
        summary = json.loads((runs[run] / "summary.json").read_text())
        model = GPT(GPTConfig(**summary["config"]["model"]))
        weights[run] = checkpoint_weights(runs, run)
        model.load_state_dict(weights[run])
        assert text == sample_text(model, data.ByteTokenizer(), "ROMEO:", 40, seed=3, vocab=256) + "\n"
    assert all(torch.allclose(weights["whole"][k], weights["sharded"][k], atol=1e-5) for k in weights["whole"])
    assert texts[0] != run_main(sample.main, [runs["whole"], "--prompt=ROMEO:", "--tokens=40", "--seed=4"], capsys)
    assert run_main(sample.main, [runs["whole"], "--samples=2", "--tokens=10"], capsys).count("-" * 40) == 1


def test_sample_and_evaluate_name_a_missing_run(tmp_path, capsys):
    for main in (sample.main, evaluate.main):
        assert "no such run directory" in refused(main, [str(tmp_path / "nothing")], capsys)
    (tmp_path / "empty").mkdir()
    assert "no checkpoint in it" in refused(sample.main, [str(tmp_path / "empty")], capsys)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_evaluate_gives_the_final_bpc_of_training_from_either_checkpoint(runs):
    for run, tol in (("whole", 1e-9), ("sharded", 1e-6)):
        final = json.loads((runs[run] / "summary.json").read_text())["final"]
        bpc, _ = evaluate.evaluate_run(runs[run])
        assert bpc == pytest.approx({k.removeprefix("bpc_"): v for k, v in final.items()}, abs=tol)
    r = cli("evaluate.py", runs["whole"], "--splits=val,train", "--eval_tokens=0", "--json")  # as a program
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["step"] == 12 and set(out) == {"run", "step", "bpc_val", "bpc_train"}


@pytest.mark.slow
def test_evaluate_refuses_data_of_another_tokenizer_and_unknown_splits(runs, tmp_path, capsys):
    meta = json.loads((Path(json.loads((runs["whole"] / "summary.json").read_text())["config"]["train"]["data"])
                       / "meta.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({**meta, "tokenizer": "cl100k_base", "vocab_size": 100277,
                                                        "eot": 100257, "dtype": "uint32"}))
    err = refused(evaluate.main, [str(runs["whole"]), f"--data={other}"], capsys)
    assert "tokenised with cl100k_base" in err and "--tokenizer=byte" in err
    assert "has no split 'test'" in refused(evaluate.main, [str(runs["whole"]), "--splits=test"], capsys)


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


def test_sampling_uses_the_runs_precision(tiny_data, tmp_path, monkeypatch, capsys):
    """At the end of a run and in sample.py, under the run's autocast: on CUDA, fp32 would send the MoE to
    torch's slow grouped-GEMM fallback (evaluation: evaluate.py and train.py pass the same autocast)."""
    seen, real = [], GPT.generate

    def generate(self, *args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(GPT, "generate", generate)
    for name, dtype in (("bf", ["--dtype=bfloat16"]), ("fp", [])):
        train.train(tiny(tiny_data, tmp_path / name, "--sample_tokens=5", *dtype))
        sample.main([str(tmp_path / name), "--tokens=5", "--device=cpu"])
    assert seen == [torch.bfloat16, torch.bfloat16, None, None]
