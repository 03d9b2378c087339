"""parallel.py and checkpoint.py: FSDP2 against one process, sharded checkpoints that resume on any
number of ranks, activation checkpointing, and the memory plan against the real tensors."""
import contextlib
import datetime
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import sweep
import train
from model import GPT, GPTConfig

from harness import parallel
from harness import schedule
from harness.config import TrainConfig, read_toml
from tests.conftest import refused, tiny_run_argv, torn_next_save
from tests.test_train import records, run_ddp, weights

ROOT = Path(__file__).resolve().parent.parent
DENSE = ["--scheme=dense", "--L=2", "--Dm=32", "--H=2", "--Dffn=80"]


def cmdline(proc):
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")  # empty for a zombie
    except OSError:
        return ""


def lock_free(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def sharded_weights(out_dir, like):
    """The weights of a sharded (DCP) checkpoint, read into whole tensors shaped as `like`'s."""
    manifest = json.loads((Path(out_dir) / "ckpt" / "latest.json").read_text())
    state = {"model": {k: torch.empty_like(v) for k, v in like.items()}}
    dcp.load(state, checkpoint_id=Path(out_dir) / "ckpt" / manifest["dir"])
    return state["model"]


def assert_same_run(a_dir, b_dir, tol=1e-5):
    a, b = records(a_dir), records(b_dir)
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert x["step"] == y["step"] and x["tokens"] == y["tokens"]
        assert abs(x["loss"] - y["loss"]) < tol and abs(x["balance"] - y["balance"]) < tol
    ea, eb = records(a_dir, "eval"), records(b_dir, "eval")
    assert [e["step"] for e in ea] == [e["step"] for e in eb]


pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.mark.slow
@pytest.mark.parametrize("model, extra", [("moe", ["--micro_batch=2"]), ("dense", [])], ids=["moe-accum2", "dense"])
def test_fsdp_on_two_ranks_follows_one_process(tiny_run, tmp_path, model, extra):
    shape = (DENSE if model == "dense" else []) + extra
    one = train.train(tiny_run("one", *shape))
    run_ddp(tiny_run("two", *shape, "--parallel=fsdp"), nproc=2)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["parallel"] == "fsdp" and two["final"] == pytest.approx(one["final"], abs=1e-5)
    assert not (tmp_path / "two" / "ckpt.pt").exists()
    whole = weights(tmp_path / "one")
    sharded = sharded_weights(tmp_path / "two", whole)
    assert all(torch.allclose(whole[k], sharded[k], atol=1e-5) for k in whole)


@pytest.mark.slow
def test_fsdp_in_bf16_computes_from_bf16_weights_and_stays_close(tiny_run, tmp_path):
    # MixedPrecisionPolicy (bf16 weights and residual stream, fp32 reduction) against bf16 autocast on one
    # process: other rounding, the same run within bf16's precision
    train.train(tiny_run("one", "--dtype=bfloat16"))
    run_ddp(tiny_run("two", "--dtype=bfloat16", "--parallel=fsdp"), nproc=2)
    assert_same_run(tmp_path / "one", tmp_path / "two", tol=0.05)
    assert 0 < abs(records(tmp_path / "one")[-1]["loss"] - records(tmp_path / "two")[-1]["loss"])


@pytest.mark.slow
def test_fsdp_composes_with_compile_and_activation_checkpointing(tiny_run, tmp_path):
    train.train(tiny_run("one", "--micro_batch=2"))
    run_ddp(tiny_run("two", "--micro_batch=2", "--parallel=fsdp", "--compile=true", "--activation_checkpointing=true"),
            nproc=2)
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_killed_fsdp_run_resumes_on_two_and_on_one_rank(whole_run, fsdp_half, fsdp_resumed, tmp_path):
    # fsdp_resumed: the 2-rank run stopped at step 6 (fsdp_half), with what a kill during the next save leaves (a
    # half-written step folder that latest.json does not name), resumed on 2 ranks again; b: the same, on one process
    shutil.copytree(fsdp_half, tmp_path / "b")
    torn_next_save(tmp_path / "b")
    train.train(["--out_dir=" + str(tmp_path / "b"), "--resume"])
    assert_same_run(whole_run, fsdp_resumed)
    assert_same_run(whole_run, tmp_path / "b")
    assert not (fsdp_resumed / "ckpt" / "step-00000009").exists()  # the next save cleared it
    assert (tmp_path / "b" / "ckpt.pt").exists() and not (tmp_path / "b" / "ckpt").exists()  # one form at a time
    whole = weights(whole_run)
    resumed = sharded_weights(fsdp_resumed, whole)
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-5) for k in whole)


@pytest.mark.slow
def test_fsdp_run_killed_by_sigkill_resumes_from_its_last_whole_checkpoint(tiny_run, tmp_path):
    argv = tiny_run("killed", "--iters=40", "--ckpt_interval=2", "--eval_interval=20")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(ROOT / "train.py"), *argv, "--parallel=fsdp"], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "ckpt" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and json.loads(latest.read_text() or "{}").get("step", 0) >= 6):
        time.sleep(0.02)
    ours = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and cmdline(p).find(str(tmp_path)) >= 0]
    for pid in ours:  # both ranks (torchrun starts them in sessions of their own) and torchrun, wherever they are
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.wait()
    while not lock_free(tmp_path / "killed" / ".lock") and time.time() < deadline:  # every thread of rank 0 gone
        time.sleep(0.02)
    stopped = json.loads(latest.read_text())["step"]
    assert 6 <= stopped < 40
    train.train(tiny_run("killed", "--iters=40", "--ckpt_interval=2", "--eval_interval=20") + ["--resume"])
    # the same path without the kill: 2 FSDP ranks stopped cleanly at that step, resumed on one process
    run_ddp(tiny_run("stopped", "--iters=40", "--ckpt_interval=2", "--eval_interval=20", "--parallel=fsdp",
                     f"--stop_at={stopped}"), nproc=2)
    train.train(tiny_run("stopped", "--iters=40", "--ckpt_interval=2", "--eval_interval=20") + ["--resume"])
    train.train(tiny_run("whole", "--iters=40", "--ckpt_interval=2", "--eval_interval=20"))
    a, b, whole = records(tmp_path / "killed"), records(tmp_path / "stopped"), records(tmp_path / "whole")
    assert [r["step"] for r in a] == list(range(1, 41)) == [r["step"] for r in whole]
    assert a == b  # bit for bit: the kill lost nothing and left nothing behind
    # 2 ranks round differently from 1 process (1e-5 after 12 steps, 1.0e-5 on this machine after 40)
    assert all(abs(x["loss"] - y["loss"]) < 3e-5 for x, y in zip(a, whole))


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_under_fsdp(whole_run, tiny_run, tmp_path):
    train.train(tiny_run("a", "--stop_at=6"))
    run_ddp(["--out_dir=" + str(tmp_path / "a"), "--resume", "--parallel=fsdp"], nproc=2)
    assert_same_run(whole_run, tmp_path / "a")
    assert (tmp_path / "a" / "ckpt" / "latest.json").exists() and not (tmp_path / "a" / "ckpt.pt").exists()


@pytest.mark.slow
def test_resharding_that_breaks_the_batch_rules_is_refused(tiny_run, tmp_path):
    run_ddp(tiny_run("a", "--parallel=fsdp", "--micro_batch=2", "--stop_at=6"), nproc=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                        str(ROOT / "train.py"), f"--out_dir={tmp_path / 'a'}", "--resume"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "train.micro_batch=2 cannot be split evenly over 4 ranks" in r.stderr
    assert "[rank0]: Traceback" not in r.stderr  # (torchrun prints its own when a rank exits 2)
    assert train.train([f"--out_dir={tmp_path / 'a'}", "--resume"])["finished"]  # 1 rank: 2 per forward


def test_activation_checkpointing_changes_memory_not_the_run(tiny_run, tmp_path):
    train.train(tiny_run("plain"))
    train.train(tiny_run("ckpt", "--activation_checkpointing=true"))
    assert records(tmp_path / "plain") == records(tmp_path / "ckpt")
    assert records(tmp_path / "plain", "eval") == records(tmp_path / "ckpt", "eval")


# ----------------------------------------------------------------------------- DDP: process group, buffers, collectives
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_process_group_gets_the_timeout_and_nccl_the_rank_gpu(device, monkeypatch):
    calls = []
    monkeypatch.setattr(parallel.dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(parallel.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with 2 GPUs, this rank on the second
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    tcfg = train.load_config([f"--device={device}", "--dist_timeout_s=77"])[1]
    rank_world_device = parallel.setup_distributed(tcfg)
    timeout = datetime.timedelta(seconds=77)
    if device == "cpu":
        assert calls == [(("gloo",), {"timeout": timeout})] and rank_world_device == (3, 4, torch.device("cpu"))
    else:
        gpu = torch.device("cuda", 1)
        assert calls == [gpu, (("nccl",), {"timeout": timeout, "device_id": gpu})] and rank_world_device == (3, 4, gpu)


# two MoE layers with loss-free balancing, two micro-batches (of one sequence per rank) per step
BIASED = ("--L=3", "--expert_bias_rate=0.01", "--micro_batch=2")
ACCUM = 2


def traced_rank(out, argv):
    """One rank of a train.py run under torchrun (run_traced): train.train, with the collectives of each
    optimizer step counted (torch's profiler records every c10d op: DDP's gradient buckets, funcol's
    all-reduces, broadcasts), and the rank's buffers, collective counts and DDP's bucket count saved to out."""
    steps, held = [], []
    step, assemble = train.train_step, train.assemble

    def traced_step(s, batches):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            result = step(s, batches)
        steps.append(sum(e.name.startswith("c10d::") for e in prof.events()))
        return result

    def kept(*args):
        held.append(assemble(*args))
        return held[-1]
    train.train_step, train.assemble = traced_step, kept
    train.train(argv)
    s = held[0].step_ctx
    record = {"buffers": dict(s.model.named_buffers()), "collectives": steps,
              "buckets": s.fwd._get_ddp_logging_data()["num_buckets_reduced"]}
    torch.save(record, Path(out) / f"rank{os.environ['RANK']}.pt")


def run_traced(argv, out):
    """run_ddp's 2-rank run, each rank through traced_rank: [rank 0's record, rank 1's]."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    code = "import sys; from tests.test_parallel import traced_rank; traced_rank(sys.argv[1], sys.argv[2:])"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--no-python", sys.executable, "-c", code, str(out), *argv],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


@pytest.fixture(scope="module")
def traced_ddp(tiny_data, tmp_path_factory):
    """(run directory, each rank's record) of tiny_run's MoE with BIASED, under DDP on 2 gloo ranks."""
    out = tmp_path_factory.mktemp("traced-ddp")
    return out / "run", run_traced(tiny_run_argv(tiny_data, out / "run", *BIASED), out)


@pytest.mark.slow
def test_ddp_keeps_the_expert_bias_equal_on_every_rank_and_follows_one_process(traced_ddp, tiny_run, tmp_path):
    # DDP broadcasts no buffer: each rank moves its own expert bias, from the step's all-reduced load
    out, ranks = traced_ddp
    train.train(tiny_run("one", *BIASED))
    assert_same_run(tmp_path / "one", out)
    one = weights(tmp_path / "one")
    for name, buf in ranks[0]["buffers"].items():
        assert torch.equal(buf, ranks[1]["buffers"][name]), name  # bit for bit
        assert name == "slopes" or torch.equal(buf, one[name]), name  # as on one process (slopes: not saved)
    assert ranks[0]["buffers"]["blocks.2.ffn.expert_bias"].abs().sum() > 0  # it moved


@pytest.mark.slow
def test_a_ddp_step_makes_one_collective_per_forward_and_per_gradient_bucket(traced_ddp):
    # per micro-batch one all-reduce of both MoE layers' expert counts (GPT.balance; one per layer would make
    # two), on the last micro-batch one per gradient bucket, after the step one of the load (the expert bias).
    # The second step also broadcasts the bucket layout that DDP rebuilt from the first: it is left out.
    for rank in traced_ddp[1]:
        counted = rank["collectives"][:1] + rank["collectives"][2:]
        assert rank["buckets"] >= 1 and counted == [ACCUM + rank["buckets"] + 1] * 11, rank


@pytest.mark.slow
def test_ddp_composes_with_compile(traced_ddp, tiny_run, tmp_path):
    run_ddp(tiny_run("compiled", *BIASED, "--compile=true"), nproc=2)
    assert_same_run(traced_ddp[0], tmp_path / "compiled")  # to 1e-5: the same run, other kernels


# ----------------------------------------------------------------------------- the memory plan
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_planned_state_bytes_equal_the_fsdp_tensors_on_every_rank(nproc):
    # on 3 ranks no dim of the probe's model divides by 3, so shards are padded and the last rank holds less
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        str(ROOT / "tests" / "fsdp_probe.py")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = sorted((json.loads(m) for m in re.findall(r"\{[^{}]*\}", r.stdout)), key=lambda x: x["rank"])
    assert [x["rank"] for x in ranks] == list(range(nproc))
    for x in ranks:
        assert x["measured"] == x["planned"]  # parameters, gradients, AdamW: to the byte
    if nproc == 3:
        assert ranks[2]["planned"][2] < ranks[0]["planned"][2]  # the last rank holds fewer slices


def test_planned_state_bytes_equal_one_process_tensors():
    cfg = GPTConfig(vocab_size=259, scheme="interleave", L=4, Dm=40, H=3, Dh=12, Dffn=70, S=16, E=5, K=2, De=16, Dse=0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, cfg.vocab_size, (2, cfg.S))
    model(x, x)[1].backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    measured = (nbytes(model.parameters()), nbytes(p.grad for p in model.parameters()),
                nbytes(v for s in opt.state.values() for v in s.values()))
    assert measured == parallel.state_bytes(parallel.param_shapes(cfg), "single", 1)


@pytest.mark.parametrize("cfg", [
    GPTConfig(vocab_size=256, scheme="dense", L=2, Dm=128, H=4, Dh=32, Dffn=352, S=128),
    GPTConfig(vocab_size=256, L=3, Dm=64, H=2, Dh=32, Dffn=176, E=16, K=2, De=32, Dse=64, S=128),
    GPTConfig(vocab_size=512, scheme="full", L=2, Dm=64, H=4, Dh=16, E=8, K=4, De=16, Dse=0, S=64)],
    ids=["dense", "1dense", "full"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_planned_activations_match_what_autograd_saves(cfg, dtype, checkpointing):
    """Every tensor autograd keeps for the backward (storages counted once, weights and their bf16
    casts left out: the plan counts those apart), against parallel.saved_bytes for CPU's SDPA."""
    torch.manual_seed(0)
    model = GPT(cfg)
    model.checkpointing = checkpointing
    weights_ = {p.untyped_storage().data_ptr() for p in model.parameters()}
    casts = [p.detach().bfloat16() for p in model.parameters()]
    saved = {}

    def weight_cast(t):  # a weight's bf16 cast, or its transpose, as autocast hands it to a matmul
        views = (t, t.transpose(-2, -1)) if t.dim() >= 2 else (t,)
        return t.dtype == torch.bfloat16 and any(v.shape == c.shape and torch.equal(v, c) for v in views for c in casts)

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights_ and not weight_cast(t):
            saved[s.data_ptr()] = s.nbytes()
        return t
    x = torch.randint(0, cfg.vocab_size, (3, cfg.S))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(x, x)
    planned = parallel.saved_bytes(cfg, 3, dtype, "ddp", checkpointing, attention="sdpa")
    assert planned == pytest.approx(sum(saved.values()), rel=0.06)


def test_memory_plan_for_the_7b_moe_needs_fsdp_on_80gb_gpus(capsys):
    train.main(["configs/moe-7b.toml", "--plan", "--nproc=32", "--gpu_mem=80"])
    out = capsys.readouterr().out
    rows = {(r.split()[0], r.split()[1]): r.split() for r in out.splitlines() if r.split()[:1] in (["ddp"], ["fsdp"])}
    assert rows[("ddp", "off")][8] == "NO" and rows[("ddp", "on")][8] == "NO"
    assert rows[("fsdp", "off")][8] == "yes" and rows[("fsdp", "on")][8] == "yes"
    assert float(rows[("ddp", "off")][2]) * 4 > 100  # params + grads + AdamW: 16 bytes per parameter, > 100 GiB
    assert "chooses fsdp" in out


def test_memory_plan_state_is_sharded_over_the_ranks():
    mcfg = GPTConfig(**{**read_toml("configs/moe-7b.toml")["model"], "vocab_size": 100288})
    tcfg = TrainConfig(compute=2.86e21, tokens=0, micro_batch=32)
    plan = schedule.for_training(mcfg, tcfg, 32)
    ddp = parallel.memory(mcfg, plan.micro(32), "ddp", 32, "bfloat16", False)
    fsdp = parallel.memory(mcfg, plan.micro(32), "fsdp", 32, "bfloat16", False)
    assert ddp.state / fsdp.state == pytest.approx(32, rel=0.001)  # every tensor has a dim that 32 divides
    assert parallel.choose(mcfg, tcfg, plan, 32, "bfloat16", 80 * parallel.GiB) == "fsdp"
    assert parallel.choose(mcfg, TrainConfig(compute=1e20, tokens=0, micro_batch=32, parallel="ddp"), plan, 32,
                           "bfloat16", 80 * parallel.GiB) == "ddp"  # asked for: honoured
    small = GPTConfig(vocab_size=256)
    assert parallel.choose(small, tcfg, schedule.for_training(small, TrainConfig(iters=10, tokens=0, micro_batch=32), 32), 32,
                           "bfloat16", 80 * parallel.GiB) == "ddp"


# --plan's own flag (a [train] key's bad value with --plan is test_every_input.py's: the same checks)
@pytest.mark.parametrize("argv, message", [
    (["--plan", "--nproc=0"], "--nproc=0: expected a number of ranks in 1..2^20"),
    (["--plan", "--nproc=x"], "--nproc=x: expected a number of ranks in 1..2^20"),
    ([str(ROOT / "configs" / "moe-7b.toml"), "--plan", "--nproc=3"], "cannot be split evenly over 3 ranks")])
def test_bad_plan_arguments_exit_2(argv, message, capsys):
    assert message in refused(train.main, argv, capsys)


@pytest.mark.slow
def test_sweep_plan_shows_memory_per_run_and_warns_where_it_cannot_fit(capsys):
    def plan(*args):
        sweep.main(["plan", str(ROOT / "configs" / "sweep-7b.toml"), *args])
        return capsys.readouterr()
    ok, tight = plan("--nproc=8", "--gpu_mem=80"), plan("--nproc=8", "--gpu_mem=24")
    rows = [line.split() for line in ok.out.splitlines() if line.startswith(("dense-C ", "moe-ra20.1"))][-2:]
    assert [r[-1] for r in rows] == ["fsdp", "fsdp"] and all(float(r[2]) > 80 > float(r[3]) for r in rows)
    assert "warning" not in ok.err
    assert "DOES NOT FIT" in tight.out and "dense-C: needs 30.2 GiB per rank under fsdp" in tight.err
    assert "--nproc=0" in refused(sweep.main, ["plan", str(ROOT / "configs" / "sweep-7b.toml"), "--nproc=0",
                                               "--gpu_mem=80"], capsys)


def test_fsdp_in_bf16_casts_a_blocks_x_and_keeps_the_alibi_bias_fp32(tmp_path):
    # MixedPrecisionPolicy would cast every floating input of a sharded block to bf16: x is cast, whatever
    # dtype the block before returned (fp32 on CUDA, where autocast runs rms_norm in fp32), and the SDPA
    # bias stays fp32 (GPT.alibi_bias_for), as under autocast without FSDP
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.fail("a process group is already initialised in this process: this test needs its own")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cfg = GPTConfig(vocab_size=64, scheme="1dense", L=2, Dm=32, H=2, Dh=16, Dffn=48, S=16, E=4, K=2, De=16, Dse=16)
        model = GPT(cfg)
        seen = []
        for block in model.blocks:
            block.attn.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, args[1].dtype)))
        parallel.wrap(model, "fsdp", TrainConfig(), torch.device("cpu"), "bfloat16")
        x = torch.randint(0, cfg.vocab_size, (2, cfg.S))
        with parallel.autocast_for(torch.device("cpu"), "bfloat16"):
            model(x, x)[1].backward()
            model.blocks[1](torch.randn(2, cfg.S, cfg.Dm), model.alibi_bias_for(cfg.S))  # an fp32 x, as on CUDA
    finally:
        dist.destroy_process_group()
    assert seen == [(torch.bfloat16, torch.float32)] * (cfg.L + 1)  # bf16 activations, the fp32 bias
