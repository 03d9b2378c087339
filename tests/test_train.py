"""train.py: exact resume, DDP against one process, budgets, the schedule, checkpoints, bad input."""
import json
import math
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import data
import flops
import train
from model import GPT, GPTConfig

from harness import parallel
from harness import rundir
from harness import schedule
from harness.config import TrainConfig
from tests.conftest import tiny_run_argv

ROOT = Path(__file__).resolve().parent.parent
TRAJECTORY_KEYS = ("step", "loss", "ce", "balance", "grad_norm", "lr", "tokens", "epoch")


def records(out_dir, kind="train"):
    return [{k: r[k] for k in TRAJECTORY_KEYS if k in r} for r in rundir.read_log(Path(out_dir) / "log.jsonl")
            if r["kind"] == kind]


def weights(out_dir):
    return torch.load(Path(out_dir) / "ckpt.pt", weights_only=True)["model"]


def test_resume_is_bit_exact(tiny_run, tmp_path):
    whole = train.train(tiny_run("whole"))
    first = train.train(tiny_run("parts", "--stop_at=5"))
    assert first["step"] == 5 and not first["finished"]
    rest = train.train(tiny_run("parts") + ["--resume"])
    assert rest["finished"] and rest["final"] == whole["final"]
    assert records(tmp_path / "parts") == records(tmp_path / "whole")  # losses, bit for bit
    assert train.train(tiny_run("parts") + ["--resume"]) == rest  # a finished run stays as it is
    assert records(tmp_path / "parts", "eval") == records(tmp_path / "whole", "eval")
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_summary_names_the_thread_counts_a_run_trained_on(tiny_run, capsys):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert train.train(tiny_run("r", "--stop_at=3"))["threads"] == [1]
        torch.set_num_threads(2)  # resumed on another count: its bits now differ from a run on one count throughout
        assert train.train(tiny_run("r") + ["--resume"])["threads"] == [1, 2]
    finally:
        torch.set_num_threads(before)
    assert "trained on 1 CPU thread(s), this process has 2" in capsys.readouterr().err


def test_killed_run_resumes_from_its_last_checkpoint(tiny_run, tmp_path):
    train.train(tiny_run("ref"))
    train.train(tiny_run("killed", "--stop_at=6"))
    with open(tmp_path / "killed" / "log.jsonl", "a") as f:  # what a process killed after step 7 leaves behind
        f.write(json.dumps({"kind": "train", "step": 7, "loss": 99.0}) + "\n")
    train.train(tiny_run("killed") + ["--resume"])
    assert records(tmp_path / "killed") == records(tmp_path / "ref")


def run_ddp(argv, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_ddp_follows_one_process(tiny_run, tmp_path):
    # the default micro-batch is the whole batch of 4 sequences, on any number of ranks: one forward of
    # 4 on one rank, two ranks of 2 whose expert counts are added up for the balance loss (M6 in docs/method.md)
    train.train(tiny_run("one"))
    run_ddp(tiny_run("two"), nproc=2)
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert len(one) == len(two) == 12
    for a, b in zip(one, two):
        assert a["step"] == b["step"] and a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["balance"] - b["balance"]) < 1e-5
    e1, e2 = records(tmp_path / "one", "eval")[-1], records(tmp_path / "two", "eval")[-1]
    assert abs(e1["loss"] - e2["loss"]) < 1e-5
    assert torch.allclose(weights(tmp_path / "one")["blocks.1.ffn.router.weight"],
                          weights(tmp_path / "two")["blocks.1.ffn.router.weight"], atol=1e-5)


@pytest.mark.slow
def test_default_toy_config_trains_alike_on_one_and_two_ranks(tiny_data, tmp_path):
    # the default model (E = 40, K = 2) and its StepLaw batch of 10, whole-batch micro-batches: 5 per rank on 2
    argv = [f"--data={tiny_data}", "--iters=6", "--tokens=0", "--batch_seqs=10", "--log_interval=1", "--eval_tokens=2560"]
    train.train(argv + [f"--out_dir={tmp_path / 'one'}"])
    run_ddp(argv + [f"--out_dir={tmp_path / 'two'}"], nproc=2)
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["balance"] - b["balance"]) < 1e-5 for a, b in zip(one, two))


@pytest.mark.slow
def test_two_rank_run_resumed_on_one_rank_matches_the_uninterrupted_run(tiny_run, tmp_path):
    run_ddp(tiny_run("split", "--micro_batch=2", "--stop_at=6"), nproc=2)
    resumed = train.train(tiny_run("split", "--micro_batch=2") + ["--resume"])
    whole = train.train(tiny_run("whole", "--micro_batch=2"))
    assert resumed["finished"] and resumed["final"] == pytest.approx(whole["final"], abs=1e-5)
    for a, b in zip(records(tmp_path / "split"), records(tmp_path / "whole")):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-5


def test_resume_with_another_micro_batch_is_refused(tiny_run, tmp_path):
    train.train(tiny_run("r", "--stop_at=6"))
    with pytest.raises(ValueError, match="train.micro_batch: checkpoint 0, now 2"):
        train.train(tiny_run("r", "--micro_batch=2") + ["--resume"])


def test_compute_budget_sets_tokens(tiny_run, tmp_path):
    argv = [a for a in tiny_run("c") if not a.startswith("--iters")]
    mcfg = GPTConfig(**train.load_config(argv)[0], vocab_size=256)
    C = flops.M_train(mcfg) * 4 * 32 * 10  # ten steps of 4 sequences of 32 tokens
    summary = train.train(argv + [f"--compute={C:.6e}"])
    assert summary["iters"] == 10 and summary["C"] == pytest.approx(C, rel=1e-5)
    assert summary["ra"] == pytest.approx(flops.count(mcfg).ra)


def test_plan_follows_steplaw_and_not_the_number_of_ranks():
    mcfg = GPTConfig()
    tcfg = TrainConfig(tokens=1e7)
    plan = schedule.for_training(mcfg, tcfg, 1)
    B = flops.steplaw_batch_seqs(1e7, mcfg.S)
    assert plan.batch_seqs == plan.micro_batch == B and plan.accum == 1 and plan.iters == round(1e7 / (B * mcfg.S))
    assert plan.lr == pytest.approx(flops.steplaw_lr(flops.count(mcfg).N, plan.D))
    assert plan.warmup == flops.warmup_iters(plan.iters)
    micro = TrainConfig(tokens=1e7, micro_batch=3)
    three = schedule.for_training(mcfg, micro, 3)
    assert three.batch_seqs % 3 == 0 and abs(three.batch_seqs - B) <= 1 and three.accum == three.batch_seqs // 3
    assert three.micro(3) == 1 and three.D == pytest.approx(1e7, rel=0.01)
    assert schedule.for_training(mcfg, micro, 1) == three  # the same run on 1 and on 3 ranks
    with pytest.raises(ValueError, match="micro_batch=3 cannot be split evenly over 2 ranks"):
        schedule.for_training(mcfg, micro, 2)
    with pytest.raises(ValueError, match=f"micro_batch={B} \\(the whole batch: the default\\) cannot be split"):
        schedule.for_training(mcfg, tcfg, B + 1)


@pytest.mark.parametrize("batch,micro", [(10, 4), (10, 20)])
def test_a_batch_that_is_no_whole_number_of_micro_batches_is_refused(batch, micro):
    # today's rounding would have run more sequences, and so more D and C, than the plan that gave batch_seqs
    tcfg = TrainConfig(iters=5, tokens=0, batch_seqs=batch, micro_batch=micro)
    with pytest.raises(ValueError, match=f"micro_batch={micro} does not divide train.batch_seqs={batch}"):
        schedule.for_training(GPTConfig(), tcfg, 1)


def test_schedule_warms_up_then_decays_to_min_lr():
    plan = schedule.Schedule(iters=1000, batch_seqs=1, micro_batch=1, accum=1, lr=1e-3, warmup=100, D=1, N=1, Na=1, M_train=1)
    lrs = [schedule.lr_at(s, plan, 1e-5) for s in range(1000)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[99] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:])) and lrs[-1] == pytest.approx(1e-5, rel=1e-2)


def test_config_file_overrides_and_saved_config(tiny_data, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nscheme = "interleave"\nL = 2\nDm = 32\nH = 2\nS = 32\nE = 4\nK = 2\nDe = 16\nDse = 0\n'
                   'Dffn = 64\n[train]\niters = 100\nbatch_seqs = 2\n')
    argv = [str(cfg), "--iters=3", f"--data={tiny_data}", f"--out_dir={tmp_path / 'o'}", "--eval_tokens=256"]
    summary = train.train(argv)
    assert summary["iters"] == 3 and summary["config"]["model"]["scheme"] == "interleave"
    saved = tmp_path / "o" / "config.toml"
    m, t, _, _ = train.load_config([str(saved)])
    assert GPTConfig(**m) == GPTConfig(**summary["config"]["model"]) and t.iters == 3


@pytest.mark.slow
def test_cli_reports_errors_with_exit_code_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--data={tmp_path / 'none'}"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "meta.json is missing" in r.stderr


def test_vocabulary_must_cover_the_data(tiny_run):
    with pytest.raises(ValueError, match=r"vocab_size=100 is smaller than the vocabulary of .* \(256, tokenizer byte\)"):
        train.train(tiny_run("v", "--vocab_size=100"))


def test_resume_refuses_another_config(tiny_run, tmp_path):
    train.train(tiny_run("a", "--stop_at=2"))
    with pytest.raises(ValueError, match=r"from another config:\n  model.L: checkpoint 2, now 3"):
        train.train(tiny_run("a", "--L=3") + ["--resume"])
    with pytest.raises(ValueError, match=r"train.seed: checkpoint 1337, now 7"):
        train.train(tiny_run("a", "--seed=7") + ["--resume"])
    with pytest.raises(ValueError, match=r"train.dtype: checkpoint 'auto', now 'float16'"):
        train.train(tiny_run("a", "--dtype=float16") + ["--resume"])
    # a config.toml edited by hand: the checkpoint itself is compared too
    saved = tmp_path / "a" / "config.toml"
    saved.write_text(saved.read_text().replace("L = 2", "L = 3"))
    with pytest.raises(ValueError, match=r"from another config:\n  model.L: checkpoint 2, now 3"):
        train.train([f"--out_dir={tmp_path / 'a'}", "--resume"])
    with pytest.raises(FileNotFoundError, match="no run in"):
        train.train(tiny_run("b") + ["--resume"])


def test_resume_needs_only_the_run_directory(tiny_run, tmp_path):
    # started with flags, resumed with none of them: the run's config.toml says what it was
    whole = train.train(tiny_run("whole"))
    train.train(tiny_run("parts", "--stop_at=5"))
    rest = train.train([f"--out_dir={tmp_path / 'parts'}", "--resume", "--eval_interval=6", "--log_interval=1"])
    assert rest["finished"] and rest["final"] == whole["final"]
    assert records(tmp_path / "parts") == records(tmp_path / "whole")


def test_nan_stops_the_run_and_keeps_the_good_checkpoint(tiny_run, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = GPT.forward

    def poisoned(self, idx, targets=None):
        logits, loss, stats = forward(self, idx, targets)
        calls["n"] += 1
        if self.training and calls["n"] > 8:  # from the 9th training forward on
            loss = loss * float("nan")
        return logits, loss, stats
    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"between steps \d+ and \d+; the last good checkpoint is .*ckpt.pt \(step 6\)"):
        train.train(tiny_run("nan", "--ckpt_interval=6"))
    state = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("value,message", [("flex", "train.attention='flex' on cpu: FlexAttention has no backward"),
                                           ("flash", "train.attention='flash' is not allowed: expected auto, flex or sdpa")])
def test_attention_other_than_sdpa_on_cpu_is_refused_before_any_file(tiny_run, tmp_path, value, message):
    # FlexAttention has no backward on CPU: training with it there is refused, as is an unknown value
    with pytest.raises(ValueError, match=message):
        train.train(tiny_run("att", f"--attention={value}"))
    assert not (tmp_path / "att").exists()


def test_grad_clip_zero_means_no_clipping(tiny_run, tmp_path):
    # clipping to norm 0 would scale every gradient by 0, and the weights would move by weight decay alone
    train.train(tiny_run("zero", "--grad_clip=0", "--iters=3"))
    train.train(tiny_run("huge", "--grad_clip=1e30", "--iters=3"))
    zero, huge = weights(tmp_path / "zero"), weights(tmp_path / "huge")
    assert all(torch.equal(zero[k], huge[k]) for k in zero)
    assert records(tmp_path / "zero")[0]["grad_norm"] > 0


def test_float16_trains_with_a_grad_scaler_and_resumes_it(tiny_run, tmp_path):
    train.train(tiny_run("fp16", "--dtype=float16", "--stop_at=6"))
    state = torch.load(tmp_path / "fp16" / "ckpt.pt", weights_only=True)
    assert state["scaler"]["scale"] > 1  # a loss scale is in use, and saved for an exact resume
    summary = train.train(tiny_run("fp16", "--dtype=float16") + ["--resume"])
    assert summary["finished"] and all(math.isfinite(r["loss"]) for r in records(tmp_path / "fp16"))


def test_the_step_record_of_one_process_steps_as_a_plain_training_step():
    # dev/bench.py and dev/gpucheck.py time and check train.train_step with a train.Step of its defaults (one
    # process, one micro-batch, no loss scale, clipping at 1): the plain step of loss, backward, clip, AdamW
    cfg = GPTConfig(scheme="1dense", L=2, Dm=32, H=2, Dffn=64, E=4, K=2, De=16, Dse=16, S=32, vocab_size=256)
    idx = torch.randint(0, 256, (4, 33)).numpy()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = GPT(cfg)
        models.append((model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)))
    (ours, opt), (plain, plain_opt) = models
    step = train.Step(model=ours, fwd=ours, optimizer=opt, autocast=torch.autocast("cpu", enabled=False),
                      device=torch.device("cpu"))
    for _ in range(3):
        sums, load, _, grad_norm = train.train_step(step, [(idx[:, :-1], idx[:, 1:])])
        _, loss, stats = plain(torch.from_numpy(idx[:, :-1]), torch.from_numpy(idx[:, 1:]))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        assert torch.equal(sums[0], loss.detach()) and torch.equal(grad_norm, norm) and torch.equal(load, stats["load"].float())
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), plain.parameters()))


def test_plan_says_what_a_run_evaluates_and_checkpoints(tiny_data, tmp_path, capsys, monkeypatch):
    # --plan's evaluation and checkpoint lines against the run itself: its evaluations in log.jsonl, the
    # tokens each read, and its ckpt.pt's size
    argv = tiny_run_argv(tiny_data, tmp_path / "r", "--Dm=96", "--De=64", "--Dse=64", "--Dffn=256", "--eval_tokens=700")
    train.main(argv + ["--plan"])
    lines = {l.split(":")[0]: l for l in capsys.readouterr().out.splitlines()}
    windows = []  # every window the run's evaluations read
    eval_windows = data.eval_windows
    monkeypatch.setattr(data, "eval_windows", lambda *a, **kw: (windows.append(1) or w for w in eval_windows(*a, **kw)))
    train.train(argv)
    evals = [r for r in rundir.read_log(tmp_path / "r" / "log.jsonl") if r["kind"] == "eval"]
    assert lines["evaluation"].startswith(f"evaluation: {len(evals)} per run, each reading "
                                          f"{32 * len(windows) // len(evals):,} targets")
    gib = float(lines["checkpoint"].split()[1])
    assert gib * parallel.GiB == pytest.approx((tmp_path / "r" / "ckpt.pt").stat().st_size, rel=0.05)


@pytest.mark.parametrize("name", ["moe-2b", "dense-2b", "moe-7b", "dense-7b"])
def test_the_paper_configs_take_the_largest_micro_batch_their_plan_fits(name, capsys):
    # on 8 GPUs of 80 GB, for the strategy auto chooses; the 7B ones also split over 32 ranks
    train.main([str(ROOT / "configs" / f"{name}.toml"), "--plan", "--nproc=8", "--gpu_mem=80"])
    out = capsys.readouterr().out
    chosen = re.search(r"chooses (\w+) with activation checkpointing off", out).group(1)
    largest = int(next(l.split()[-1] for l in out.splitlines() if l.split()[:2] == [chosen, "off"]))
    micro = tomllib.loads((ROOT / "configs" / f"{name}.toml").read_text())["train"]["micro_batch"]
    assert micro == (largest if name.endswith("2b") else largest // 32 * 32)
