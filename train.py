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
summary.json. config.py reads the configuration, schedule.py plans the run, preflight.py checks all of
it before anything is written; parallel.py shares the run over the ranks; checkpoint.py saves, checks
and restores; evaluate.py measures BPC; logbook.py logs; rundir.py keeps the run directory whole.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict
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

from harness import checkpoint
import data
import flops
from harness import helptext
from harness import logbook
from harness import parallel
from harness import preflight
from harness import rundir
from harness import safe_io
from harness import schedule
from harness import trackers
from harness.config import TRAJECTORY, differences, is_run_config, load_config, read_toml, to_toml  # noqa: F401
from evaluate import evaluate_splits
from harness.logbook import Logbook
from model import GPT, GPTConfig
from sample import sample_text


# ----------------------------------------------------------------------------- the run
def train(argv):
    mvals, tcfg, given, resume = load_config(argv)
    rank, world, device = parallel.setup_distributed(tcfg)
    lock = aside = None
    try:
        if device.type == "cpu":
            parallel.tune_malloc()
        run = preflight.check_run(mvals, tcfg, given, resume, world, device, rank)
        if resume and not rundir.run_files(tcfg.out_dir) and not (Path(tcfg.out_dir) / rundir.ASIDE).exists():
            raise FileNotFoundError(f"--resume: no run in {tcfg.out_dir} (no config.toml, no checkpoint)")
        if not resume:  # every rank refuses before any work; rank 0 checks again, locked
            rundir.check_new_run(tcfg.out_dir, tcfg.overwrite)
        if world > 1:
            dist.barrier()  # every rank has checked before rank 0 writes a file
        if rank == 0:
            lock, aside = open_run_dir(tcfg, resume, argv[0] if argv and not argv[0].startswith("--") else None)
        return run_training(run, rank, world, device, aside)
    finally:
        if aside:
            aside.undo()  # the new run failed before its config was written: the old run is put back
        if lock:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_training(run, rank, world, device, aside):
    tcfg, mcfg, sched, resume = run.tcfg, run.mcfg, run.sched, run.resume
    out, master = Path(tcfg.out_dir), rank == 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    autocast = parallel.autocast_for(device, run.dtype)
    loader = data.Loader(run.train_tokens, mcfg.S, tcfg.seed, tcfg.unique_tokens)
    table = data.char_table(data.get_tokenizer(run.meta["tokenizer"]))
    torch.manual_seed(tcfg.seed)
    model = GPT(mcfg, run.attention).to(device)
    if world > 1:
        model.count_balance_over(dist.group.WORLD, world)
    strategy = parallel.choose(mcfg, tcfg, sched, world, run.dtype, parallel.gpu_bytes(tcfg, device))
    if master and world == 1 and tcfg.parallel != "auto":
        rundir.warn(f"train.parallel={tcfg.parallel!r} on one process: it applies under torchrun with 2 or more ranks")
    fwd = parallel.wrap(model, strategy, tcfg, device, run.dtype)  # the parallelism lives here and in train_step alone
    optimizer = make_optimizer(model, sched, tcfg, strategy)
    scaler = torch.amp.GradScaler(device.type, enabled=run.dtype == "float16")  # fp16 gradients underflow unscaled
    step, last_ckpt, records = 0, None, []
    numbers = describe(run, loader, strategy, rank, world, device)
    if resume:
        step, where = resume_from(out, run, model, optimizer, scaler, loader, rank, world, device)
        summary = rundir.read_summary(out / "summary.json")
        if step >= sched.iters and rundir.finished(summary):
            if master:
                print(f"{out} finished at step {step} already: nothing to resume")
            return summary
        if tcfg.stop_at and tcfg.stop_at < step:
            raise ValueError(f"train.stop_at={tcfg.stop_at} is before step {step} of the checkpoint {where}: a run never "
                             f"goes back; give a later stop_at, or none")
        last_ckpt = f"{where} (step {step})" if step else None
    if master:
        safe_io.write_text(out / "config.toml", to_toml({"model": asdict(mcfg), "train": asdict(tcfg)}))
        aside.discard()  # the new run has written its config: the run it replaces goes now
        records = rundir.truncate_log(out / "log.jsonl", step) if resume else []

    def save(at_step):
        path = checkpoint.save(out, strategy == "fsdp", model, optimizer, {
            "scaler": scaler.state_dict(), "loader": loader.state_dict(), "step": at_step, "schedule": sched.trajectory(),
            "world": world, "config": {"model": asdict(mcfg), "train": asdict(tcfg)}, "data": data.identity(run.meta),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}, rank, world)
        return f"{path} (step {at_step})"

    def run_eval():
        return evaluate_splits(model, run.val_splits, mcfg.S, tcfg.eval_tokens, table, autocast, rank, world, sched.micro(world))

    end = min(sched.iters, tcfg.stop_at) if tcfg.stop_at else sched.iters
    tracking = trackers.start(tcfg, out, step, sched.M_train, {"model": asdict(mcfg), "train": asdict(tcfg), **numbers}) \
        if master else None  # TensorBoard and W&B, when the config asks (off by default)
    book = Logbook(out / "log.jsonl", sched, mcfg.S, step, rank, world, device, numbers["M_exec"], logbook.peak_flops(tcfg, device),
                   tcfg.eval_tokens, tracking)
    model.train()
    try:
        while step < end:
            lr = schedule.lr_at(step, sched, tcfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            batches = loader.next_step(sched.micro(world), sched.accum, rank, world)
            book.data_time += time.perf_counter() - t0
            book.add(*train_step(fwd, model, optimizer, scaler, batches, sched, strategy, autocast, device, tcfg.grad_clip,
                                 world))
            step += 1
            is_log, is_eval, is_ckpt = due(step, sched.iters, end, tcfg)
            record = {}
            if is_log:
                record = book.train_record(step, lr, loader.epoch, last_ckpt or "none: no checkpoint was written")
            if is_eval:
                book.eval_record(step, loader.epoch, run_eval(), record)
            if is_ckpt:
                with interrupts.signals_held() as came:  # a checkpoint is written whole; a Ctrl-C then stops the run
                    last_ckpt = save(step)
                interrupts.raise_held(came)
        final = book.last_bpc
        logged = [r for r in records if r["kind"] == "eval" and r["step"] == step and r.get("eval_tokens") == tcfg.eval_tokens]
        if not final and world == 1 and logged:  # resumed at a step that was evaluated: its numbers stand
            final = {k: v for k, v in logged[-1].items() if k.startswith("bpc_")}
        elif not final and step >= sched.iters:  # resumed after the last checkpoint: finish the final evaluation
            final = book.eval_record(step, loader.epoch, run_eval(), {})
        book.close()
        summary = finish(out, numbers, run, rank, step, loader.epoch, final)
    except KeyboardInterrupt as e:
        book.close()
        raise stopped(e, out, step, sched, last_ckpt) from None
    if master and strategy != "fsdp" and tcfg.sample_tokens and summary["finished"]:  # FSDP: every rank would have to
        try:
            show_sample(model, run.meta, tcfg.sample_tokens, out)
        except KeyboardInterrupt as e:
            stop = interrupts.interrupted(e)
            stop.message = f"{stop.what} while sampling; the run had finished, and its summary is in {out / 'summary.json'}"
            raise stop from None
    return summary


# ----------------------------------------------------------------------------- its parts
def due(step, iters, end, tcfg):
    """(log, evaluate, checkpoint) after optimizer step `step` of `iters`, the run stopping at `end`:
    five evaluations per run unless eval_interval says, a checkpoint at each unless ckpt_interval says,
    and at the end; a log line every log_interval steps and with each evaluation and checkpoint."""
    eval_every = tcfg.eval_interval or math.ceil(iters / 5)
    ckpt_every = tcfg.ckpt_interval or eval_every
    is_eval, is_ckpt = step % eval_every == 0 or step == iters, step % ckpt_every == 0 or step == end
    return step % tcfg.log_interval == 0 or is_eval or is_ckpt, is_eval, is_ckpt


def train_step(fwd, model, optimizer, scaler, batches, sched, strategy, autocast, device, grad_clip, world):
    """One optimizer step over the step's micro-batches, then loss-free balancing's bias update when it is on:
    (sums over the micro-batches of loss, CE, balance loss and z-loss, of the expert loads [Le, E] and of
    the router logits' mean squares [Le]; the gradient norm before clipping)."""
    sums, load_sum, logit_ms_sum = torch.zeros(4, device=device), 0, 0
    for j, (x, y) in enumerate(batches):
        x = torch.from_numpy(x).to(device, non_blocking=True)
        y = torch.from_numpy(y).to(device, non_blocking=True)
        with parallel.accumulating(fwd, strategy, last=j == sched.accum - 1), autocast:
            _, loss, stats = fwd(x, y)
            scaler.scale(loss / sched.accum).backward()
        sums += torch.stack([loss.detach(), stats["ce"], stats["balance"], stats["z_loss"]]).float()
        load_sum = load_sum + stats["load"].float()
        logit_ms_sum = logit_ms_sum + stats["logit_ms"].float()
    scaler.unscale_(optimizer)
    grad_norm = parallel.clip_grad_norm(model, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if model.cfg.expert_bias_rate:  # from the load of the whole step on all ranks, so every rank moves alike
        model.update_expert_bias(parallel.summed_over_ranks(load_sum, world))
    return sums, load_sum, logit_ms_sum, grad_norm


def make_optimizer(model, sched, tcfg, strategy):
    """AdamW; weight decay on matrices (embeddings and stacked experts included), not on norms. Made after
    FSDP has sharded the model: it then steps each rank's shards."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tcfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel per tensor, on CPU too (2.4 against 6.6 ms a step for the CPU toy's dense twin, the
    # same bits on 1 and 2 threads); sharded (DTensor) parameters are not fused (foreach on CUDA)
    return torch.optim.AdamW(groups, lr=sched.lr, betas=(tcfg.beta1, tcfg.beta2), fused=strategy != "fsdp")


def resume_from(out, run, model, optimizer, scaler, loader, rank, world, device):
    """(step, checkpoint path) to continue from: the newest checkpoint in out, verified, checked and loaded;
    step 0 when the run stopped before its first one."""
    got = checkpoint.read(out, rank, world)
    if got is None:
        if not (out / "config.toml").exists():
            raise FileNotFoundError(f"--resume: no run in {out} (no config.toml, no checkpoint)")
        diff = differences(read_toml(out / "config.toml"), run.mcfg, run.tcfg, TRAJECTORY, then="config.toml")
        if diff:
            raise ValueError(f"{out} has no checkpoint yet, and its config.toml is not this run's:\n  " + "\n  ".join(diff)
                             + f"\nresume it with its own config (python train.py --out_dir={out} --resume), or start "
                             f"afresh with --overwrite=true")
        if rank == 0:
            rundir.warn(f"{out}: the run stopped before its first checkpoint; starting it again from step 0")
        return 0, None
    form, path, state = got
    checkpoint.check(state, path, run.mcfg, run.tcfg, run.meta, run.sched)
    return checkpoint.restore(form, path, state, model, optimizer, scaler, loader, device), path


def describe(run, loader, strategy, rank, world, device):
    """The run's numbers for summary.json, printed once by rank 0."""
    tcfg, mcfg, sched = run.tcfg, run.mcfg, run.sched
    M_exec = flops.M_exec(mcfg, mcfg.vocab_size)
    numbers = dict(N=sched.N, Na=sched.Na, ra=sched.Na / sched.N, M_train=sched.M_train, D=sched.D, C=sched.C,
                   iters=sched.iters, batch_seqs=sched.batch_seqs, micro_batch=sched.micro_batch, accum=sched.accum,
                   world=world, lr=sched.lr, warmup=sched.warmup, unique_tokens=loader.unique_tokens,
                   epochs=sched.D / (loader.n_windows * mcfg.S), tokenizer=run.meta["tokenizer"], device=str(device),
                   dtype=run.dtype, attention=run.attention, parallel=strategy,
                   activation_checkpointing=tcfg.activation_checkpointing, M_exec=M_exec)
    if rank == 0:
        print(f"model {mcfg.scheme}: N={sched.N:,} Na={sched.Na:,} r_a={100 * sched.Na / sched.N:.1f}% "
              f"M_train={sched.M_train:.3g} FLOPs/token (M11, for C); executed {M_exec:.3g} (LM head, causal attention: for MFU)")
        print(f"schedule: {sched.iters} iters × {sched.batch_seqs} seqs × {mcfg.S} = D {sched.D:.3g} tokens, C {sched.C:.3g} "
              f"FLOPs, lr {sched.lr:.3g}, warmup {sched.warmup}, {numbers['epochs']:.2f} epochs over "
              f"{loader.unique_tokens:,} unique tokens; micro-batch {sched.micro_batch} ({sched.micro(world)} per rank "
              f"× {world} ranks) × accum {sched.accum}; {device} {run.dtype} {run.attention} {strategy}"
              f"{' compiled' if tcfg.compile else ''}{' checkpointed' if tcfg.activation_checkpointing else ''}")
    return numbers


def finish(out, numbers, run, rank, step, epoch, final):
    tcfg, mcfg, sched = run.tcfg, run.mcfg, run.sched
    summary = {**numbers, "step": step, "finished": step >= sched.iters, "final": final,
               "config": {"model": asdict(mcfg), "train": asdict(tcfg)}, "data": data.identity(run.meta)}
    if rank == 0:
        safe_io.write_text(out / "summary.json", json.dumps(summary, indent=1))
        print(("finished" if summary["finished"] else f"stopped at step {step} of {sched.iters} (resume with --resume)")
              + f": D {step * sched.batch_seqs * mcfg.S:.3g} tokens, {epoch:.2f} epochs; "
              + ", ".join(f"{k.replace('bpc_', 'BPC ')} {v:.4f}" for k, v in final.items()))
    return summary


def stopped(e, out, step, sched, last_ckpt):
    """Ctrl-C or SIGTERM during training: the Interrupted that says, in one line, how to go on."""
    stop = interrupts.interrupted(e)
    stop.message = (f"{stop.what} at step {step} of {sched.iters}; " + (
        f"the last checkpoint is {last_ckpt}: resume with python train.py --out_dir={out} --resume" if last_ckpt
        else f"no checkpoint was written: python train.py --out_dir={out} --resume starts it again"))
    return stop


def show_sample(model, meta, tokens, out):
    """A few lines of what the model writes, so that a newcomer sees it learned (python sample.py for more)."""
    with torch.compiler.set_stance("force_eager"):  # compiled blocks would compile again for every length
        text = sample_text(model, data.get_tokenizer(meta["tokenizer"]), "\n", tokens, vocab=meta["vocab_size"])
    print(f"sample (more: python sample.py {out}):\n" + text.strip("\n"))


# ----------------------------------------------------------------------------- the run directory
def check_replaceable(out, overwrite, config_file):
    """The run files that --overwrite may move aside, all of them train.py's, or refused with nothing
    touched: a config.toml that is a run's resolved config and not this command's config file, a ckpt.pt
    of train.py, a log and a summary that read as a run's, tracker folders (tb/, wandb/) that hold only what
    the trackers wrote (rundir.check_new_run checks the kinds of file and the ckpt/ folder)."""
    found = rundir.check_new_run(out, overwrite)

    def refuse(name, what):
        raise safe_io.RunDirError(f"{out / name} {what}: --overwrite replaces only what train.py wrote; move it away by hand")
    if "config.toml" in found:
        if config_file and Path(config_file).resolve() == (out / "config.toml").resolve():
            raise safe_io.RunDirError(f"{out / 'config.toml'} is the config file of this command: --overwrite would "
                                     f"replace it; copy it elsewhere first, or give another --out_dir")
        try:
            ours = is_run_config(read_toml(out / "config.toml"))
        except ValueError:
            ours = False
        if not ours:
            refuse("config.toml", "is not a run's config (train.py writes every [model] and [train] key)")
    if "ckpt.pt" in found and not checkpoint.looks_like_ours(out / "ckpt.pt"):
        refuse("ckpt.pt", "is not a checkpoint of train.py")
    if "log.jsonl" in found and (out / "log.jsonl").stat().st_size and not rundir.read_log(out / "log.jsonl"):
        refuse("log.jsonl", "holds no record of a run")
    if "summary.json" in found and rundir.read_summary(out / "summary.json") is None:
        refuse("summary.json", "is not a run's summary")
    for name, others in trackers.strangers(out, found).items():  # tb/, wandb/
        refuse(name, f"holds what no tracker wrote ({', '.join(others[:5])})")
    return found


def open_run_dir(tcfg, resume, config_file=None):
    """Rank 0's hold on out_dir: the lock, what a killed --overwrite left finished, the run files checked
    (no link, no stranger), and with --overwrite the old run moved aside (rundir.Aside)."""
    out = Path(tcfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = rundir.Lock(out).acquire()
    aside = rundir.Aside(out)
    try:
        rundir.remove_temporaries(out)
        aside.recover()
        if resume:
            rundir.check_run_files(out)
        else:
            aside.move(check_replaceable(out, tcfg.overwrite, config_file))
    except BaseException:
        aside.undo()
        lock.release()
        raise
    return lock, aside


# ----------------------------------------------------------------------------- the command line
def show_plan(argv):
    """--plan [--nproc=N]: the config's schedule and its per-rank memory on N ranks; nothing is allocated."""
    nproc = [a for a in argv if a.startswith("--nproc=")]
    try:
        world = int(nproc[-1].split("=", 1)[1]) if nproc else 1
    except ValueError:
        world = 0
    if not 1 <= world <= 2**20:
        raise ValueError(f"{nproc[-1]}: expected a number of ranks in 1..2^20")
    mvals, tcfg, given, _ = load_config([a for a in argv if a != "--plan" and not a.startswith("--nproc=")])
    vocab = mvals.get("vocab_size") or preflight.planned_vocab(tcfg.data)
    mcfg = GPTConfig(**{**mvals, "vocab_size": vocab})
    sched = schedule.for_training(mcfg, tcfg, world)
    dtype = tcfg.dtype if tcfg.dtype != "auto" else "bfloat16"  # the memory plan is for GPUs
    capacity = int(tcfg.gpu_mem * parallel.GiB) if tcfg.gpu_mem else None
    text, _, _ = parallel.format_memory_plan(mcfg, tcfg, sched, world, dtype, capacity)
    print(f"model {mcfg.scheme}: N={sched.N:,} (+ vocabulary {vocab:,} × Dm {mcfg.Dm}), schedule {sched.iters} iters × "
          f"{sched.batch_seqs} seqs × {mcfg.S} tokens")
    print(text)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):  # the command forms, then every [model] and [train] key
        helptext.show(helptext.train_help(__doc__))
        return
    interrupts.stop_on_signals()
    try:
        show_plan(argv) if "--plan" in argv else train(argv)
    except (ValueError, OSError, FloatingPointError) as e:  # bad input, damaged or missing files, a full disk
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, whatever rank 0 was doing
        interrupts.exit_interrupted("train.py", e, " before training began: nothing was changed",
                                quiet=os.environ.get("RANK", "0") != "0")


if __name__ == "__main__":
    main()
