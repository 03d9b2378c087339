"""Where the time of a CPU training run goes, by part of the model and of the loop (`python dev/bench.py parts`).
train.py itself runs with each part's function wrapped: a wall-clock timer for every part, and a
record_function scope that torch.profiler sees while it records a window of steps. A backward op belongs
to the part whose forward op made its autograd node (the profiler's sequence numbers link the two)."""
import contextlib
import functools
import tempfile
import time

import torch

import data
import model as model_module
import train
from model import GPT, Attention, MoE, SwiGLU

from harness import checkpoint
from harness import config
from harness import logbook
from harness import parallel
from harness import preflight

PART = "part: "
STEP = "step (embedding, norms, residual, backward engine)"  # the step's rest: the parts below nest inside
IN_STEP = ("attention", "router", "routed experts", "SwiGLU FFNs", "LM head and loss", "optimizer", STEP)
SCOPES = [  # (where the function lives, its name, its part)
    (Attention, "forward", "attention"),
    (MoE, "route", "router"), (MoE, "aux", "router"), (model_module, "routed_experts", "routed experts"),
    (SwiGLU, "forward", "SwiGLU FFNs"), (GPT, "head", "LM head and loss"), (parallel, "clip_grad_norm", "optimizer"),
    (train, "train_step", STEP), (data.Loader, "next_step", "loader"), (logbook.Logbook, "add", "logging"),
    (logbook.Logbook, "train_record", "logging"), (logbook.Logbook, "eval_record", "logging"),
    (train, "evaluate_splits", "evaluation"), (checkpoint, "save", "checkpoint save"), (train, "show_sample", "sample")]
PER_CALL = ("evaluation", "checkpoint save", "sample")


@contextlib.contextmanager
def part_scopes(window=None):
    """Every function of SCOPES wrapped for the duration, then put back. Yields {part: [seconds of each
    outermost call]}. window = (profiler, first, last): the profiler records steps first..last (1-based)."""
    walls, depth, steps = {}, {}, [0]

    def wrap(part, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if part == STEP:
                steps[0] += 1
                if window and steps[0] == window[1]:
                    window[0].start()
            depth[part] = depth.get(part, 0) + 1
            t = time.perf_counter()
            try:
                with torch.profiler.record_function(PART + part):
                    return fn(*args, **kwargs)
            finally:
                depth[part] -= 1
                if not depth[part]:  # a part inside itself (Logbook's records) is timed once
                    walls.setdefault(part, []).append(time.perf_counter() - t)
                if part == STEP and window and steps[0] == window[2]:
                    window[0].stop()
        return run
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in SCOPES]
    try:
        for owner, name, part in SCOPES:
            setattr(owner, name, wrap(part, owner.__dict__[name]))
        yield walls
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def owners(events):
    """{event id: part}: each event to the innermost part scope around it, a backward op to the part of the
    forward op with its sequence number, the optimizer's own scopes to "optimizer"; None outside them all."""
    seq_part, owner = {}, {}

    def part_of(e):
        chain = []
        while e is not None and e.id not in owner:
            chain.append(e)
            if e.name.startswith(PART):
                owner[e.id] = e.name[len(PART):]
            elif e.name.startswith(("Optimizer.step#", "Optimizer.zero_grad#")):
                owner[e.id] = "optimizer"
            elif e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr in seq_part:
                owner[e.id] = seq_part[e.sequence_nr]
            else:
                e = e.cpu_parent
                continue
            break
        found = owner.get(e.id) if e is not None else None
        for c in chain:
            owner.setdefault(c.id, found)
        return found
    events = sorted(events, key=lambda e: e.time_range.start)  # forward ops before their backward
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine") and part_of(e) in IN_STEP:
            seq_part.setdefault(e.sequence_nr, part_of(e))
    return {e.id: part_of(e) for e in events}


def attribute(events):
    """{part: self CPU µs} over the events (owners says which part each is in)."""
    owner, parts = owners(events), {}
    for e in events:
        part = owner[e.id] or "outside the parts"
        parts[part] = parts.get(part, 0.0) + e.self_cpu_time_total
    return parts


def whole_run(argv):
    """(schedule, evaluations, checkpoints, log lines) of the whole run that argv configures: train.py's own
    checks and plan (preflight), then train.due at every step."""
    mvals, tcfg, given, _ = config.load_config(argv)
    sched = preflight.check_run(mvals, tcfg, given, False, prepare=False).sched
    due = [train.due(step, sched.iters, sched.iters, tcfg) for step in range(1, sched.iters + 1)]
    return sched, sum(d[1] for d in due), sum(d[2] for d in due), sum(d[0] for d in due)


def measure(whole, steps, warmup):
    """The whole run's argv cut to `steps` steps of its batch, evaluated and saved once, at the end: run
    timed by part, then again with the steps after `warmup` profiled by part. Returns the schedule and
    counts of the whole run, the short run's wall time, walls by part (timed run) and the in-step
    parts' profiled ms per step, with the profiled and the unprofiled step."""
    sched, evals, saves, logs = whole_run(whole)
    short = whole + [f"--iters={steps}", f"--warmup={steps}", f"--eval_interval={steps}", f"--ckpt_interval={steps}",
                     f"--batch_seqs={sched.batch_seqs}", f"--micro_batch={sched.micro(1)}"]
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with tempfile.TemporaryDirectory() as tmp:
        with part_scopes() as walls:
            t = time.perf_counter()
            train.train(short + [f"--out_dir={tmp}/timed"])
            run_s = time.perf_counter() - t
        with part_scopes((prof, warmup + 1, steps)) as walls_profiled:
            train.train(short + [f"--out_dir={tmp}/profiled"])
    n = steps - warmup
    inside = {p: us / 1e3 / n for p, us in attribute(prof.events()).items() if p in IN_STEP}
    return {"sched": sched, "evals": evals, "saves": saves, "logs": logs, "run_s": run_s, "walls": walls,
            "inside_ms": inside, "step_ms": 1e3 * sum(walls[STEP][warmup:]) / n,
            "profiled_step_ms": 1e3 * sum(walls_profiled[STEP][warmup:]) / n}
