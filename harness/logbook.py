"""What a training run reports, and when it must stop: the loss and its parts summed over each log
interval (over all ranks), expert loads, throughput and MFU, one log.jsonl line per interval and per
evaluation (sent on to TensorBoard and W&B when the run asks: trackers.py), the progress bar on a terminal
(one line per evaluation in a log file instead), and the NaN policy: a non-finite loss stops the run,
naming the last good checkpoint.
"""
import math
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from harness import rundir


# bf16 dense tensor-core peak per device (vendor datasheets), matched against the CUDA device name
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
              "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "B200": 2250e12}


def peak_flops(tcfg, device):
    """Per-device peak FLOP/s for MFU: train.peak_flops, else the datasheet's for a known GPU, else 0 (no MFU)."""
    if tcfg.peak_flops:
        return tcfg.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_FLOPS.items():
            if key in name:
                return peak
    return 0.0  # unknown: no MFU


ROUTING = ("load_max_over_mean", "dead_experts", "load_entropy", "router_logit_rms")


def routing(load_LE, logit_ms_L):
    """Per MoE layer, from the interval's slots per expert and its router logits' mean square: the busiest
    expert's load over the mean (1 = perfect balance), the experts that got no token, the load's entropy
    over ln E (1 = perfect balance, 0 = one expert takes all), and the RMS of the logits. [] when dense."""
    if not torch.is_tensor(load_LE) or not load_LE.numel():
        return {k: [] for k in ROUTING}
    E = load_LE.shape[-1]
    p_LE = load_LE / load_LE.sum(-1, keepdim=True)
    entropy_L = -(p_LE * p_LE.clamp_min(1e-30).log()).sum(-1) / (math.log(E) if E > 1 else 1.0)
    return {"load_max_over_mean": (p_LE.amax(-1) * E).tolist(),
            "dead_experts": (load_LE == 0).sum(-1).tolist(), "load_entropy": entropy_L.tolist(),
            "router_logit_rms": logit_ms_L.sqrt().tolist()}


class Logbook:
    def __init__(self, log_path, sched, S, step, rank, world, device, M_exec, peak, eval_tokens=0, trackers=None):
        self.log_path, self.sched, self.S, self.world, self.device = log_path, sched, S, world, device
        self.trackers = trackers  # TensorBoard and W&B (trackers.py), on rank 0: each record goes there too
        self.eval_tokens = eval_tokens  # recorded with each evaluation: what its BPC was measured on
        self.master, self.M_exec, self.peak = rank == 0, M_exec, peak
        self.sums = torch.zeros(4, device=device)  # loss, ce, balance, z-loss over the interval's micro-batches
        self.load_sum, self.logit_ms_sum, self.data_time, self.last_bpc = 0, 0, 0.0, {}
        self.last_time, self.last_step = time.perf_counter(), step
        self.bar = tqdm(total=sched.iters, initial=step, disable=not (self.master and sys.stderr.isatty()),
                        dynamic_ncols=True, desc="train")

    def write(self, record):
        if self.master:
            rundir.append_log(self.log_path, record)
            if self.trackers:
                self.trackers.log(record)

    def add(self, step_sums, step_load, step_logit_ms, grad_norm):
        """One optimizer step's sums (train.train_step)."""
        self.sums += step_sums
        self.load_sum = self.load_sum + step_load
        self.logit_ms_sum = self.logit_ms_sum + step_logit_ms
        self.grad_norm = grad_norm
        self.bar.update(1)

    def train_record(self, step, lr, epoch, last_ckpt):
        """The interval's means over all ranks, logged; a non-finite loss raises FloatingPointError."""
        sched = self.sched
        n = (step - self.last_step) * sched.accum * self.world
        if self.world > 1:
            for t in (self.sums, self.load_sum, self.logit_ms_sum):
                dist.all_reduce(t)
        loss, ce, balance, z_loss = (self.sums / n).tolist()
        grad_norm = self.grad_norm.item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise FloatingPointError(f"the loss became {loss} (gradient norm {grad_norm}) between steps "
                                     f"{self.last_step + 1} and {step}; the last good checkpoint is {last_ckpt}")
        now = time.perf_counter()
        tok_s = (step - self.last_step) * sched.batch_seqs * self.S / (now - self.last_time)
        mfu = tok_s * self.M_exec / (self.world * self.peak) if self.peak else None  # FLOPs executed, head included
        record = {"kind": "train", "step": step, "tokens": step * sched.batch_seqs * self.S, "epoch": epoch, "lr": lr,
                  "loss": loss, "ce": ce, "balance": balance, "z_loss": z_loss, "grad_norm": grad_norm,
                  **routing(self.load_sum, self.logit_ms_sum / n),
                  "tokens_per_s": tok_s, "mfu": mfu, "data_share": self.data_time / (now - self.last_time)}
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.write(record)
        self.bar.set_postfix_str(f"loss {loss:.3f} " + "".join(f"{k} {v:.3f} " for k, v in self.last_bpc.items())
                                 + f"{tok_s:,.0f} tok/s" + (f" mfu {100 * mfu:.1f}%" if mfu else ""))
        self.sums.zero_()
        self.load_sum, self.logit_ms_sum, self.data_time = 0, 0, 0.0
        self.last_time, self.last_step = now, step
        return record

    def eval_record(self, step, epoch, bpc, record):
        """An evaluation's BPC per split, with the training record of the same step (if any)."""
        self.last_bpc = {f"bpc_{k}": v for k, v in bpc.items()}
        keep = ("lr", "loss", "ce", "balance", "z_loss", *ROUTING, "tokens_per_s")
        self.write({**{k: record[k] for k in keep if k in record}, "kind": "eval", "step": step,
                    "tokens": step * self.sched.batch_seqs * self.S, "epoch": epoch, "eval_tokens": self.eval_tokens,
                    **self.last_bpc})
        if self.master:
            tqdm.write(f"step {step}/{self.sched.iters}: loss {record.get('loss', math.nan):.4f} balance "
                       f"{record.get('balance', math.nan):.3f} epoch {epoch:.2f} "
                       + " ".join(f"{k} {v:.4f}" for k, v in self.last_bpc.items())
                       + f" {record.get('tokens_per_s', 0):,.0f} tok/s")
        self.last_time = time.perf_counter()  # evaluation time is not training throughput
        return self.last_bpc

    def close(self):
        self.bar.close()
        if self.trackers:
            self.trackers.close()
