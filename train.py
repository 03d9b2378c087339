"""Train a dense or MoE GPT with the paper's recipe (its Table 4; docs/method.md §5, whose equations
the (Mn) tags cite).

    python train.py                                   # the CPU toy: a 1dense+SE MoE at r_a ≈ 20 %
    python train.py configs/<name>.toml --iters=2000  # a config file, then --key=value overrides
    python train.py --out_dir=out/x --resume          # continue a stopped or killed run exactly
    torchrun --standalone --nproc_per_node=8 train.py configs/<name>.toml     # DDP or FSDP, one node
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py …
    python train.py configs/moe-7b.toml --plan --nproc=32 --gpu_mem=80       # memory per rank; nothing runs

The budget is iterations, tokens D or compute C (C = M_train·D, M11). Peak LR and batch follow
StepLaw (M15) unless given. AdamW (weight decay 0.1 on matrices), clipping at 1.0, linear warmup of
clip(0.01·iters, 200, 2000) iterations, cosine to 1e-5. Every run directory holds config.toml (the
resolved config), log.jsonl (one line per log and per evaluation), ckpt.pt (ckpt/ under FSDP) and
summary.json. In harness/: config.py reads the configuration, schedule.py plans the run, preflight.py
checks all of it before anything is written; run_guard.py holds the run directory (rundir.py keeps it
whole); parallel.py shares the run over the ranks; checkpoint.py saves, checks and restores; logbook.py
logs. evaluate.py measures BPC.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import interrupts  # first: Ctrl-C while torch loads ends in one line, not a traceback
if __name__ == "__main__":
    interrupts.quit_while_starting("train.py")
    if {"-h", "--help"} & set(sys.argv[1:]):  # answered before torch loads: helptext reads the keys' sources
        from harness import helptext
        helptext.show(helptext.train_help(__doc__))
        sys.exit(0)

import torch
import torch.distributed as dist

import data
import flops
from evaluate import evaluate_splits
from kernels.custom_ops import expert_path
from model import GPT, GPTConfig
from sample import sample_text

from harness import checkpoint
from harness import config
from harness import helptext
from harness import logbook
from harness import parallel
from harness import preflight
from harness import run_guard
from harness import rundir
from harness import safe_io
from harness import schedule
from harness import trackers
from harness.config import TRAJECTORY, changed_keys, load_config, read_toml, to_toml
from harness.logbook import Logbook


# ----------------------------------------------------------------------------- the run
def train(argv):
    mvals, tcfg, given, resume = load_config(argv)
    rank, world, device = parallel.setup_distributed(tcfg)
    try:
        if device.type == "cpu":
            parallel.tune_malloc()
        setup = preflight.check_run(mvals, tcfg, given, resume, world, device, rank)
        config_file = argv[0] if argv and not argv[0].startswith("--") else None
        with run_guard.protect(tcfg.out_dir, resume, tcfg.overwrite, config_file, rank, world) as aside:
            return run_training(setup, rank, world, device, aside)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_training(setup, rank, world, device, aside):
    """The run that preflight checked (setup), trained in its run directory, which run_guard.protect holds
    (aside: on rank 0, the old run that --overwrite replaces); returns its summary."""
    tcfg, sched = setup.tcfg, setup.sched
    t = assemble(setup, rank, world, device)
    step, last_ckpt, done = resume(t) if setup.resume else (0, None, None)
    if done is not None:
        return done  # finished already: its summary stands
    records = write_config(t, aside, step)
    end = min(sched.iters, tcfg.stop_at) if tcfg.stop_at else sched.iters
    book = open_logbook(t, step)
    t.step_ctx.model.train()
    try:
        while step < end:
            lr = schedule.lr_at(step, sched, tcfg.min_lr)
            for group in t.step_ctx.optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            batches = t.loader.next_step(sched.micro(world), sched.accum, rank, world)
            book.data_time += time.perf_counter() - t0
            book.add(*train_step(t.step_ctx, batches))
            step += 1
            is_log, is_eval, is_ckpt = due(step, sched.iters, end, tcfg)
            record = {}
            if is_log:
                record = book.train_record(step, lr, t.loader.epoch, last_ckpt or "none: no checkpoint was written")
            if is_eval:
                book.eval_record(step, t.loader.epoch, evaluate(t), record)
            if is_ckpt:
                with interrupts.signals_held() as came:  # a checkpoint is written whole; a Ctrl-C then stops the run
                    last_ckpt = save(t, step)
                interrupts.raise_held(came)
        final = final_bpc(t, book, records, step)
        book.close()
        summary = finish(t, step, final)
    except KeyboardInterrupt as e:
        book.close()
        raise stopped(e, t.out, step, sched, last_ckpt) from None
    if rank == 0 and t.strategy != "fsdp" and tcfg.sample_tokens and summary["finished"]:  # under FSDP every rank would have to sample
        sample_at_end(t)
    return summary


# ----------------------------------------------------------------------------- the step
@dataclass
class Step:
    """What train_step needs besides the batches, made once before the loop: by train.py (assemble), and
    by dev/bench.py and dev/gpucheck.py, which time and check this same step."""
    model: GPT                 # its parameters are clipped and stepped, its expert bias moved
    fwd: object                # what the step calls: the model, its compiled blocks, DDP or FSDP (parallel.wrap)
    optimizer: torch.optim.Optimizer
    autocast: object           # the forward's autocast (parallel.autocast_for)
    device: torch.device
    accum: int = 1             # micro-batches per optimizer step
    grad_clip: float = 1.0     # the gradient norm clipped to; 0: no clipping
    scaler: torch.amp.GradScaler = None  # None: a disabled one (only float16 needs one)
    strategy: str = "single"   # parallel.choose: single, ddp or fsdp
    world: int = 1             # ranks

    def __post_init__(self):
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)


def train_step(s, batches):
    """One optimizer step (s: a Step) over the step's micro-batches (numpy (x, y) pairs), then loss-free
    balancing's bias update when it is on: (sums over the micro-batches of loss, CE, balance loss and
    z-loss, of the expert loads [Le, E] and of the router logits' mean squares [Le]; the gradient norm
    before clipping)."""
    sums, load_sum, logit_ms_sum = torch.zeros(4, device=s.device), 0, 0
    for j, (x, y) in enumerate(batches):
        x = torch.from_numpy(x).to(s.device, non_blocking=True)
        y = torch.from_numpy(y).to(s.device, non_blocking=True)
        with parallel.accumulating(s.fwd, s.strategy, last=j == s.accum - 1), s.autocast:
            _, loss, stats = s.fwd(x, y)
            s.scaler.scale(loss / s.accum).backward()
        sums += torch.stack([loss.detach(), stats["ce"], stats["balance"], stats["z_loss"]]).float()
        load_sum = load_sum + stats["load"].float()
        logit_ms_sum = logit_ms_sum + stats["logit_ms"].float()
    s.scaler.unscale_(s.optimizer)
    grad_norm = parallel.clip_grad_norm(s.model, s.grad_clip)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    if s.model.cfg.expert_bias_rate:  # from the load of the whole step on all ranks, so every rank moves alike
        s.model.update_expert_bias(parallel.summed_over_ranks(load_sum, s.world))
    return sums, load_sum, logit_ms_sum, grad_norm


def make_optimizer(model, sched, tcfg, strategy):
    """AdamW; weight decay on matrices (embeddings and stacked experts included), not on norms. Made after
    FSDP has sharded the model: it then steps each rank's shards."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tcfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel per tensor, on CPU too (AdamW's step about 2.7× faster for the CPU toy's dense twin,
    # the same bits on 1 and 2 threads: docs/results.md); sharded (DTensor) parameters are not fused (foreach on CUDA)
    return torch.optim.AdamW(groups, lr=sched.lr, betas=(tcfg.beta1, tcfg.beta2), fused=strategy != "fsdp")


# ----------------------------------------------------------------------------- the loop's parts
@dataclass
class Training:
    """A run's parts, made once (assemble), that the loop and its helpers share."""
    setup: preflight.Setup
    out: Path
    rank: int
    world: int
    device: torch.device
    loader: data.Loader
    table: object              # characters per token, for bits per character (data.char_table)
    strategy: str              # single, ddp or fsdp
    step_ctx: Step             # what train_step needs: the model, the optimizer, …
    numbers: dict              # the run's numbers for summary.json (describe)

    @property
    def config(self):
        """The resolved config, as config.toml, the checkpoint, the trackers and summary.json hold it."""
        return {"model": asdict(self.setup.mcfg), "train": asdict(self.setup.tcfg)}


def assemble(setup, rank, world, device):
    """The run's parts, in the order that fixes its bits (the seed, then the model's initialisation): the
    loader, the model, its parallelism, the optimizer and the step's record; the run's numbers printed."""
    tcfg, mcfg, sched = setup.tcfg, setup.mcfg, setup.sched
    # TF32 stays off (torch's default): under autocast every matmul is bf16 but the router's, which is fp32 on
    # purpose (MoE.route), and a float32 run is fp32 throughout
    autocast = parallel.autocast_for(device, setup.dtype)
    loader = data.Loader(setup.train_tokens, mcfg.S, tcfg.seed, tcfg.unique_tokens)
    table = data.char_table(data.get_tokenizer(setup.meta["tokenizer"]))
    torch.manual_seed(tcfg.seed)
    model = GPT(GPTConfig(**asdict(mcfg)), setup.attention).to(device)  # preflight checked the values
    if world > 1:
        model.count_balance_over(dist.group.WORLD, world)
    strategy = parallel.choose(mcfg, tcfg, sched, world, setup.dtype, parallel.gpu_bytes(tcfg, device))
    if rank == 0 and world == 1 and tcfg.parallel != "auto":
        rundir.warn(f"train.parallel={tcfg.parallel!r} on one process: it applies under torchrun with 2 or more ranks")
    fwd = parallel.wrap(model, strategy, tcfg, device, setup.dtype)  # the parallelism lives here and in train_step alone
    optimizer = make_optimizer(model, sched, tcfg, strategy)
    scaler = torch.amp.GradScaler(device.type, enabled=setup.dtype == "float16")  # fp16 gradients underflow unscaled
    step_ctx = Step(model=model, fwd=fwd, optimizer=optimizer, autocast=autocast, device=device, accum=sched.accum,
                    grad_clip=tcfg.grad_clip, scaler=scaler, strategy=strategy, world=world)
    numbers = describe(setup, loader, strategy, rank, world, device)
    return Training(setup=setup, out=Path(tcfg.out_dir), rank=rank, world=world, device=device, loader=loader,
                    table=table, strategy=strategy, step_ctx=step_ctx, numbers=numbers)


def resume(t):
    """--resume: (step, the last checkpoint, None) to go on from the newest checkpoint, or (step, None, its
    summary) when the run has finished already."""
    step, where = resume_from(t)
    summary = rundir.read_summary(t.out / "summary.json")
    if step >= t.setup.sched.iters and rundir.finished(summary):
        if t.rank == 0:
            print(f"{t.out} finished at step {step} already: nothing to resume")
        return step, None, summary
    stop_at = t.setup.tcfg.stop_at
    if stop_at and stop_at < step:
        raise ValueError(f"train.stop_at={stop_at} is before step {step} of the checkpoint {where}: a run never "
                         f"goes back; give a later stop_at, or none")
    return step, f"{where} (step {step})" if step else None, None


def resume_from(t):
    """(step, checkpoint path) to continue from: the newest checkpoint in the run directory, verified,
    checked and loaded; step 0 when the run stopped before its first one."""
    out, setup, s = t.out, t.setup, t.step_ctx
    got = checkpoint.read(out, t.rank, t.world)
    if got is None:
        if not (out / "config.toml").exists():
            raise FileNotFoundError(f"--resume: no run in {out} (no config.toml, no checkpoint)")
        diff = changed_keys(read_toml(out / "config.toml"), setup.mcfg, setup.tcfg, TRAJECTORY, then="config.toml")
        if diff:
            raise ValueError(f"{out} has no checkpoint yet, and its config.toml is not this run's:\n  " + "\n  ".join(diff)
                             + f"\nresume it with its own config (python train.py --out_dir={out} --resume), or start "
                             f"afresh with --overwrite=true")
        if t.rank == 0:
            rundir.warn(f"{out}: the run stopped before its first checkpoint; starting it again from step 0")
        return 0, None
    form, path, state = got
    moved = checkpoint.check(state, path, setup.mcfg, setup.tcfg, setup.meta, setup.sched)
    if moved and t.rank == 0:
        print(moved)
    t.numbers["threads"] = threads_so_far(state.get("threads"), t.numbers["threads"], path, t.rank)
    return checkpoint.restore(form, path, state, s.model, s.optimizer, s.scaler, t.loader, t.device), path


def threads_so_far(before, now, path, rank):
    """The CPU thread counts the run has trained on, in order: a run's bits depend on its thread count, so
    a run resumed on another count is said to be one (older checkpoints did not record theirs)."""
    if not before or before[-1] == now[-1]:
        return before or now
    if rank == 0:
        rundir.warn(f"{path} trained on {before[-1]} CPU thread(s), this process has {now[-1]}: the run goes on, but "
                    f"its bits now differ from a run trained on one count throughout (summary.json lists both)")
    return before + now


def write_config(t, aside, step):
    """Rank 0: config.toml written, and then the run that --overwrite replaces (aside) deleted; on resume the
    log cut back to the checkpoint's step. The log's records so far (none on the other ranks)."""
    if t.rank != 0:
        return []
    safe_io.write_text(t.out / "config.toml", to_toml(t.config))
    aside.discard()  # the new run has written its config: the run it replaces goes now
    return rundir.truncate_log(t.out / "log.jsonl", step) if t.setup.resume else []


def open_logbook(t, step):
    """The log (log.jsonl, the progress bar) from step on, and on rank 0 TensorBoard and W&B when the config
    asks (off by default)."""
    tcfg, sched = t.setup.tcfg, t.setup.sched
    tracking = trackers.start(tcfg, t.out, step, sched.M_train, {**t.config, **t.numbers}) if t.rank == 0 else None
    return Logbook(t.out / "log.jsonl", sched, t.setup.mcfg.S, step, t.rank, t.world, t.device, t.numbers["M_exec"],
                   logbook.peak_flops(tcfg, t.device), tcfg.eval_tokens, tracking)


def evaluate(t):
    """Bits per character on each validation split ({bpc_<split>: value})."""
    setup = t.setup
    return evaluate_splits(t.step_ctx.model, setup.val_splits, setup.mcfg.S, setup.tcfg.eval_tokens, t.table,
                           t.step_ctx.autocast, t.rank, t.world, setup.sched.micro(t.world))


def save(t, at_step):
    """A checkpoint of all that the run needs to go on bit for bit; its name for the log."""
    s = t.step_ctx
    path = checkpoint.save(t.out, t.strategy == "fsdp", s.model, s.optimizer, {
        "scaler": s.scaler.state_dict(), "loader": t.loader.state_dict(), "step": at_step,
        "schedule": t.setup.sched.trajectory(), "world": t.world, "threads": t.numbers["threads"], "config": t.config,
        "data": data.identity(t.setup.meta),
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(t.device) if t.device.type == "cuda" else None}}, t.rank, t.world)
    return f"{path} (step {at_step})"


def final_bpc(t, book, records, step):
    """The run's final bits per character: its last evaluation's; resumed at a step that was evaluated, the
    numbers logged then (one process); resumed after the last checkpoint of a whole schedule, evaluated now;
    else none (the run stopped early)."""
    tcfg, sched = t.setup.tcfg, t.setup.sched
    final = book.last_bpc
    logged = [r for r in records if r["kind"] == "eval" and r["step"] == step and r.get("eval_tokens") == tcfg.eval_tokens]
    if not final and t.world == 1 and logged:  # resumed at a step that was evaluated: its numbers stand
        final = {k: v for k, v in logged[-1].items() if k.startswith("bpc_")}
    elif not final and step >= sched.iters:  # resumed after the last checkpoint: finish the final evaluation
        final = book.eval_record(step, t.loader.epoch, evaluate(t), {})
    return final


def sample_at_end(t):
    """Rank 0, the run finished: a few lines of what the model writes."""
    try:
        show_sample(t.step_ctx.model, t.setup.meta, t.setup.tcfg.sample_tokens, t.out, t.step_ctx.autocast)
    except KeyboardInterrupt as e:
        stop = interrupts.interrupted(e)
        stop.message = f"{stop.what} while sampling; the run had finished, and its summary is in {t.out / 'summary.json'}"
        raise stop from None


def due(step, iters, end, tcfg):
    """(log, evaluate, checkpoint) after optimizer step `step` of `iters`, the run stopping at `end`:
    five evaluations per run unless eval_interval says, a checkpoint at each unless ckpt_interval says,
    and at the end; a log line every log_interval steps and with each evaluation and checkpoint."""
    eval_every = tcfg.eval_interval or math.ceil(iters / 5)
    ckpt_every = tcfg.ckpt_interval or eval_every
    is_eval, is_ckpt = step % eval_every == 0 or step == iters, step % ckpt_every == 0 or step == end
    return step % tcfg.log_interval == 0 or is_eval or is_ckpt, is_eval, is_ckpt


def describe(setup, loader, strategy, rank, world, device):
    """The run's numbers for summary.json, printed once by rank 0."""
    tcfg, mcfg, sched = setup.tcfg, setup.mcfg, setup.sched
    M_exec = flops.M_exec(mcfg, mcfg.vocab_size)
    numbers = dict(N=sched.N, Na=sched.Na, ra=sched.Na / sched.N, M_train=sched.M_train, D=sched.D, C=sched.C,
                   iters=sched.iters, batch_seqs=sched.batch_seqs, micro_batch=sched.micro_batch, accum=sched.accum,
                   world=world, lr=sched.lr, warmup=sched.warmup, unique_tokens=loader.unique_tokens,
                   epochs=sched.D / (loader.n_windows * mcfg.S), tokenizer=setup.meta["tokenizer"], device=str(device),
                   dtype=setup.dtype, attention=setup.attention, parallel=strategy,
                   activation_checkpointing=tcfg.activation_checkpointing, M_exec=M_exec,
                   threads=[torch.get_num_threads()])  # CPU threads, per segment of a resumed run (threads_so_far)
    if mcfg.scheme != "dense":  # the routed experts' GEMMs, for the device and the dtype they run in
        numbers["expert_path"], why = expert_path(device, getattr(torch, setup.dtype))
    if rank == 0:
        print(f"model {mcfg.scheme}: N={sched.N:,} Na={sched.Na:,} r_a={100 * sched.Na / sched.N:.1f}% "
              f"M_train={sched.M_train:.3g} FLOPs/token (M11, for C); executed {M_exec:.3g} (LM head, causal attention: for MFU)")
        print(f"schedule: {sched.iters} iters × {sched.batch_seqs} seqs × {mcfg.S} = D {sched.D:.3g} tokens, C {sched.C:.3g} "
              f"FLOPs, lr {sched.lr:.3g}, warmup {sched.warmup}, {numbers['epochs']:.2f} epochs over "
              f"{loader.unique_tokens:,} unique tokens; micro-batch {sched.micro_batch} ({sched.micro(world)} per rank "
              f"× {world} ranks) × accum {sched.accum}; {device} {setup.dtype} {setup.attention} {strategy}"
              f"{' compiled' if tcfg.compile else ''}{' checkpointed' if tcfg.activation_checkpointing else ''}")
        if "expert_path" in numbers:
            print(f"experts: {numbers['expert_path']} ({why})")
    return numbers


def finish(t, step, final):
    """summary.json, written by rank 0 with the run's last line: the summary."""
    mcfg, sched = t.setup.mcfg, t.setup.sched
    summary = {**t.numbers, "step": step, "finished": step >= sched.iters, "final": final,
               "config": t.config, "data": data.identity(t.setup.meta)}
    if t.rank == 0:
        safe_io.write_text(t.out / "summary.json", json.dumps(summary, indent=1))
        print(("finished" if summary["finished"] else f"stopped at step {step} of {sched.iters} (resume with --resume)")
              + f": D {step * sched.batch_seqs * mcfg.S:.3g} tokens, {t.loader.epoch:.2f} epochs; "
              + ", ".join(f"{k.replace('bpc_', 'BPC ')} {v:.4f}" for k, v in final.items()))
    return summary


def stopped(e, out, step, sched, last_ckpt):
    """Ctrl-C or SIGTERM during training: the Interrupted that says, in one line, how to go on."""
    stop = interrupts.interrupted(e)
    stop.message = (f"{stop.what} at step {step} of {sched.iters}; " + (
        f"the last checkpoint is {last_ckpt}: resume with python train.py --out_dir={out} --resume" if last_ckpt
        else f"no checkpoint was written: python train.py --out_dir={out} --resume starts it again"))
    return stop


def show_sample(model, meta, tokens, out, autocast):
    """A few lines of what the model writes, so that a newcomer sees it learned (python sample.py for more),
    in the run's precision."""
    with torch.compiler.set_stance("force_eager"):  # compiled blocks would compile again for every length
        text = sample_text(model, data.get_tokenizer(meta["tokenizer"]), "\n", tokens, vocab=meta["vocab_size"],
                           autocast=autocast)
    print(f"sample (more: python sample.py {out}):\n" + text.strip("\n"))


# ----------------------------------------------------------------------------- the command line
def show_plan(argv):
    """--plan [--nproc=N]: the config's schedule and its per-rank memory on N ranks; nothing is allocated."""
    nproc = [a for a in argv if a.startswith("--nproc=")]
    try:
        world = int(nproc[-1].split("=", 1)[1]) if nproc else 1
    except ValueError:
        world = 0
    lo, hi, allowed = config.RANGES["nproc"]
    if not lo <= world <= hi:
        raise ValueError(f"{nproc[-1]}: expected {allowed}")
    mvals, tcfg, given, _ = load_config([a for a in argv if a != "--plan" and not a.startswith("--nproc=")])
    vocab = mvals.get("vocab_size") or preflight.planned_vocab(tcfg.data)
    mcfg = GPTConfig(**{**mvals, "vocab_size": vocab})
    sched = schedule.for_training(mcfg, tcfg, world)
    dtype = tcfg.dtype if tcfg.dtype != "auto" else "bfloat16"  # the memory plan is for GPUs
    capacity = int(tcfg.gpu_mem * parallel.GiB) if tcfg.gpu_mem else None
    text, _, chosen = parallel.format_memory_plan(mcfg, tcfg, sched, world, dtype, capacity)
    print(f"model {mcfg.scheme}: N={sched.N:,} (+ vocabulary {vocab:,} × Dm {mcfg.Dm}), schedule {sched.iters} iters × "
          f"{sched.batch_seqs} seqs × {mcfg.S} tokens")
    print(text)
    print(plan_of_io(mcfg, tcfg, sched, world, chosen))


def plan_of_io(mcfg, tcfg, sched, world, strategy):
    """--plan's lines on what a run reads and writes besides training: its evaluations and checkpoints."""
    evals = ckpts = 0
    for step in range(1, sched.iters + 1):  # counted by the loop's own rule
        _, is_eval, is_ckpt = due(step, sched.iters, sched.iters, tcfg)
        evals, ckpts = evals + is_eval, ckpts + is_ckpt
    S = mcfg.S
    if (Path(tcfg.data) / "meta.json").exists():
        splits = {k: v["tokens"] for k, v in data.load_meta(tcfg.data)["splits"].items() if k != "train"}
        windows = {k: data.eval_window_count(n, S, tcfg.eval_tokens) for k, n in splits.items()}
        reads = (f"{S * sum(windows.values()):,} targets (" + ", ".join(f"{k} {w:,} windows" for k, w in windows.items())
                 + f" of {S})")
    elif tcfg.eval_tokens:
        n = data.eval_window_count(tcfg.eval_tokens, S)
        reads = f"{S * n:,} targets of each validation split ({n:,} windows of {S}; {tcfg.data} is not prepared here)"
    else:
        reads = f"all of each validation split (eval_tokens = 0; {tcfg.data} is not prepared here)"
    P = sum(math.prod(shape) for shape in parallel.param_shapes(mcfg).values())
    size = 12 * P / parallel.GiB  # fp32 weights and AdamW's two moments, 4 bytes each
    where = f"{size / world:.3g} GiB per rank, sharded" if strategy == "fsdp" else "one file, written by rank 0"
    return (f"evaluation: {evals} per run, each reading {reads}\n"
            f"checkpoint: {size:.3g} GiB ({P:,} parameters × 12 bytes: fp32 weights and AdamW's two moments; {where}), "
            f"{ckpts} per run")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):  # the command forms, then every [model] and [train] key
        helptext.show(helptext.train_help(__doc__))
        return
    interrupts.stop_on_signals()
    try:
        config.refuse_repeats(argv)  # --plan and --nproc too, which load_config never sees
        show_plan(argv) if "--plan" in argv else train(argv)
    except (ValueError, OSError, FloatingPointError) as e:  # bad input, damaged or missing files, a full disk
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, whatever rank 0 was doing
        interrupts.exit_interrupted("train.py", e, " before training began: nothing was changed",
                                quiet=os.environ.get("RANK", "0") != "0")


if __name__ == "__main__":
    main()
