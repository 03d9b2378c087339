"""The training schedule from a budget: iterations, batch, micro-batches, peak learning rate, warmup and
the tokens D a run consumes, by the paper's recipe (Table 4, StepLaw: docs/method.md §5, (M15)). The one
planner: train.py plans its run with it and sweep.py plans every run of a sweep with it, so the two
agree to the token. No torch: planning a sweep loads none.
"""
import math
from dataclasses import dataclass

import flops

from harness.config import MAX_TOKENS


@dataclass(frozen=True)
class Schedule:
    iters: int
    batch_seqs: int   # B: sequences per optimizer step, over all ranks
    micro_batch: int  # sequences per forward, over all ranks: the balance loss (M6) is counted over them
    accum: int        # micro-batches per step: B = micro_batch·accum
    lr: float         # peak learning rate
    warmup: int       # iterations of linear warmup
    D: int            # tokens consumed: iters·B·S
    N: int
    Na: int
    M_train: float    # FLOPs per token for C (M11)

    @property
    def C(self):
        return self.M_train * self.D  # (M11)

    def micro(self, world):
        """Sequences per forward on each of `world` ranks."""
        return self.micro_batch // world

    def trajectory(self):
        """What fixes a run's trajectory, whatever the number of ranks: a resume must find it unchanged."""
        return {k: getattr(self, k) for k in ("iters", "batch_seqs", "micro_batch", "accum", "lr", "warmup", "D")}


def make_schedule(shape, *, iters=0, tokens=0, compute=0, batch_seqs=0, batch_mult=1.0, batch_unit=1,
                  micro_batch=0, world=1, lr=0.0, lr_mult=1.0, warmup=-1, warmup_frac=0.0, min_lr=0.0,
                  weight_decay=0.0, include_router=True, budget=None):
    """The schedule for exactly one budget: `iters`, `tokens` (D) or `compute` (C = M_train·D, M11).
    Unless given, the batch is StepLaw's (M15, × batch_mult) rounded to a multiple of `batch_unit`
    sequences, and the peak rate StepLaw's for N and the D consumed (× lr_mult). micro_batch (0: the
    whole batch) counts sequences over all ranks, so the schedule is the same on any number of ranks:
    they split each micro-batch, or the run is refused. Warmup: `warmup` iterations when >= 0, else
    warmup_frac of the run, else the paper's clip(0.01·iters, 200, 2000). Errors name train.py's keys, and the
    budget as `budget` says when given."""
    budgets = {k: v for k, v in (("iters", iters), ("tokens", tokens), ("compute", compute)) if v}
    if len(budgets) != 1:
        raise ValueError(f"give exactly one budget of train.iters, train.tokens and train.compute "
                         f"(got {budgets or 'none'})")
    budget = budget or next(f"train.{k}={v:.4g}" for k, v in budgets.items())
    c = flops.count(shape, include_router)
    M = flops.M_train(shape, include_router)
    S = shape.S
    D_target = flops.steplaw_tokens_for_iters(iters) if iters else tokens or compute / M
    B = batch_seqs or batch_unit * max(1, round(batch_mult * flops.steplaw_batch_tokens(D_target) / S / batch_unit))
    m = micro_batch or B
    check_batch(B, m, world, given_micro=bool(micro_batch))
    if D_target / (B * S) > MAX_TOKENS:
        raise ValueError(f"{budget} makes {D_target / (B * S):.3g} iterations: expected a budget of at most 2^53 tokens")
    if not iters and D_target < B * S / 2:
        raise ValueError(f"{budget} buys {D_target:.4g} tokens, less than half a step of {B:,} × S={S:,} tokens: "
                         f"expected a budget of at least one step")
    iters = iters or max(1, round(D_target / (B * S)))
    D = iters * B * S
    if D > MAX_TOKENS:
        raise ValueError(f"{budget} plans D = {iters:,} iters × train.batch_seqs={B:,} × S={S:,} = {D:.4g} tokens: "
                         f"expected at most 2^53 = {MAX_TOKENS:.4g}")
    peak = lr or lr_mult * flops.steplaw_lr(c.N, D)
    check_lr(peak, min_lr, weight_decay, given=f"train.lr={peak:.4g}" if lr else (
        f"the StepLaw rate for N = {c.N:,} and D = {D:.4g} ({budget}) × train.lr_mult={lr_mult:g} = {peak:.4g}"))
    if warmup >= 0:
        warmup = min(warmup, iters)
    else:
        warmup = max(1, round(warmup_frac * iters)) if warmup_frac else flops.warmup_iters(iters)
    return Schedule(iters=iters, batch_seqs=B, micro_batch=m, accum=B // m, lr=peak, warmup=warmup, D=D,
                    N=c.N, Na=c.Na, M_train=M)


def check_batch(B, m, world, given_micro):
    """A step is whole micro-batches, and a micro-batch splits evenly over the ranks."""
    if m > B or B % m:
        raise ValueError(f"train.micro_batch={m} does not divide train.batch_seqs={B}: a step would run "
                         f"{m * math.ceil(B / m)} sequences, not {B}; give a micro_batch that divides the batch")
    if m % world:
        raise ValueError(f"train.micro_batch={m}{'' if given_micro else ' (the whole batch: the default)'} "
                         f"cannot be split evenly over {world} ranks: give a micro_batch that is a multiple of "
                         f"{world} (it is a count over all ranks, so the run is the same on any number of them)")


def check_lr(lr, min_lr, weight_decay, given):
    if lr > 1:
        raise ValueError(f"{given}: expected a peak learning rate of at most 1")
    if min_lr > lr:
        raise ValueError(f"train.min_lr={min_lr:g} is above the peak, {given}: the cosine would rise to the "
                         f"end; expected min_lr <= lr")
    if lr * weight_decay > 1:
        raise ValueError(f"train.weight_decay={weight_decay:g} with {given}: AdamW multiplies every weight by "
                         f"1 − lr·weight_decay each step; expected lr·weight_decay <= 1")


def for_training(shape, tcfg, world):
    """train.py's schedule: the budget and overrides of its [train] table (config.TrainConfig)."""
    return make_schedule(shape, iters=tcfg.iters, tokens=tcfg.tokens, compute=tcfg.compute,
                         batch_seqs=tcfg.batch_seqs, batch_unit=tcfg.micro_batch or 1, micro_batch=tcfg.micro_batch,
                         world=world, lr=tcfg.lr, lr_mult=tcfg.lr_mult, warmup=tcfg.warmup, min_lr=tcfg.min_lr,
                         weight_decay=tcfg.weight_decay, include_router=tcfg.include_router)


def lr_at(step, schedule, min_lr):
    """Linear warmup to the peak, then cosine to min_lr (Table 4; docs/method.md §5)."""
    if step < schedule.warmup:
        return schedule.lr * (step + 1) / schedule.warmup
    t = (step - schedule.warmup) / max(1, schedule.iters - schedule.warmup)
    return min_lr + 0.5 * (schedule.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))
