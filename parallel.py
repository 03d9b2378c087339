"""How the ranks share a run (one process, DDP or FSDP2), and the memory plan that chooses between them.

    python train.py configs/moe-7b.toml --plan --nproc=32 --gpu_mem=80   # bytes per rank; nothing allocated

DDP keeps the whole model on every rank: fp32 weights, gradients and AdamW's two moments, 16 bytes per
parameter (101 GiB for moe-7b before any activation). FSDP2 (torch.distributed.fsdp.fully_shard, per
block and at the root) shards all four over the ranks on dim 0 and gathers one block's weights, in the
compute dtype, just before it runs: 16/world bytes per parameter, plus the blocks in flight. Both reduce
gradients in fp32 over the same micro-batches, so the plan (and the data each step sees) is the same;
under bf16, FSDP computes from bf16 copies of the weights (torchtitan's policy) where DDP autocasts
each op, so the two round differently. Expert parallelism is out of scope: every rank holds (a shard of)
every expert.
"""
import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

import flops

GiB = 2**30
RESERVE = 2 * GiB  # per GPU, kept out of the plan: CUDA context, NCCL buffers, allocator slack
KINDS = ("auto", "ddp", "fsdp")


# ----------------------------------------------------------------------------- processes
def setup_distributed(tcfg):
    """(rank, world, device): a process group under torchrun (NCCL on GPU, gloo on CPU), else one process."""
    use_cuda = tcfg.device.startswith("cuda") or (tcfg.device == "auto" and torch.cuda.is_available())
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if use_cuda:
            local = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local)
            return rank, world, torch.device("cuda", local)
        return rank, world, torch.device("cpu")
    return 0, 1, torch.device("cuda" if use_cuda else tcfg.device if tcfg.device != "auto" else "cpu")


def gpu_bytes(tcfg, device):
    """Memory of one device for the plan: train.gpu_mem (GiB) when given, else what CUDA reports; None on CPU."""
    if tcfg.gpu_mem:
        return int(tcfg.gpu_mem * GiB)
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def choose(mcfg, tcfg, plan, world, dtype, capacity):
    """'single', 'ddp' or 'fsdp': what train.parallel asks for; 'auto' takes DDP when it fits the device."""
    if world == 1:
        return "single"
    if tcfg.parallel != "auto":
        return tcfg.parallel
    if capacity is None:
        return "ddp"
    need = memory(mcfg, plan, "ddp", world, dtype, tcfg.activation_checkpointing).total
    return "ddp" if need <= capacity - RESERVE else "fsdp"


def wrap(model, kind, tcfg, device, dtype):
    """The module the training step calls: the model itself, DDP around it, or the model sharded in place.
    Compiled first, sharded second (torchtitan's order): FSDP's hooks stay outside the compiled blocks."""
    model.checkpointing = tcfg.activation_checkpointing
    fwd = model.compile_regions() if tcfg.compile else model
    if kind == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(fwd, device_ids=ids, gradient_as_bucket_view=True)
    if kind == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
                                  reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)  # the root: embedding, final norm and LM head
    return fwd


def accumulating(fwd, kind, last):
    """Under DDP, gradients are all-reduced on the last micro-batch of a step only. FSDP reduce-scatters
    every micro-batch into the sharded gradients: unsharded gradients are what it exists to avoid."""
    return fwd.no_sync() if kind == "ddp" and not last else contextlib.nullcontext()


def clip_grad_norm(model, max_norm):
    """The gradient norm over all parameters before clipping (max_norm 0: no clipping), as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor over the shards


# ----------------------------------------------------------------------------- the memory plan
@dataclass
class Memory:
    """Bytes on one rank. params/grads/optimizer: the fp32 state; working: weight copies the compute
    holds (autocast's bf16 casts under DDP, gathered blocks under FSDP); activations: one micro-batch."""
    params: int
    grads: int
    optimizer: int
    working: int
    activations: int

    @property
    def state(self):
        return self.params + self.grads + self.optimizer

    @property
    def total(self):
        return self.state + self.working + self.activations


def param_shapes(mcfg):
    """{name: shape} of the model's distinct parameters, from a model on the meta device (nothing allocated)."""
    from model import GPT
    with torch.device("meta"):
        model = GPT(mcfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def local_numel(shape, world, rank):
    """Elements of rank's shard: FSDP2 splits dim 0 as torch.chunk does, ceil(d0/world) rows per rank."""
    rows = math.ceil(shape[0] / world) if shape else 1
    mine = max(0, min(rows, shape[0] - rank * rows)) if shape else (1 if rank == 0 else 0)
    return mine * math.prod(shape[1:])


def state_bytes(shapes, kind, world, rank=0):
    """(params, grads, optimizer) bytes on `rank`: fp32 weights and gradients, AdamW's two moments and
    its fp32 step count (one 4-byte scalar per parameter tensor, on every rank)."""
    if kind == "fsdp":
        n = sum(local_numel(s, world, rank) for s in shapes.values())
    else:
        n = sum(math.prod(s) for s in shapes.values())
    return 4 * n, 4 * n, 8 * n + 4 * len(shapes)


def working_bytes(mcfg, shapes, kind, dtype):
    """Weight copies in flight: under DDP with autocast, the bf16 cast of every matrix (kept for the
    backward); under FSDP, two gathered blocks (one computing, one prefetched), the root, and one block's
    unsharded gradients in the compute dtype and in fp32 for the reduce-scatter."""
    b = 2 if dtype in ("bfloat16", "float16") else 4
    if kind != "fsdp":
        cast = [s for n, s in shapes.items() if len(s) >= 2 and (n != "wte.weight" or mcfg.tie_embeddings)]
        return 2 * sum(math.prod(s) for s in cast) if b == 2 else 0  # the lookup table itself is not cast
    block = max(sum(math.prod(s) for n, s in shapes.items() if n.startswith(f"blocks.{i}."))
                for i in range(mcfg.L))
    root = sum(math.prod(s) for n, s in shapes.items() if not n.startswith("blocks."))
    return b * (2 * block + root) + (b + 4) * block


def activation_bytes(mcfg, seqs, dtype, kind, checkpointing):
    """Bytes autograd keeps for `seqs` sequences (S tokens each) until the backward, counted tensor by
    tensor from model.py (a memory-efficient attention kernel: q, k, v, output and logsumexp, no T×T
    matrix), plus the working set of the backward: one layer's activations again and the head's logit
    gradients. Under autocast the residual stream stays fp32; FSDP's bf16 weights make it bf16."""
    a = 2 if dtype in ("bfloat16", "float16") else 4       # matmul inputs and outputs
    r = a if kind == "fsdp" else 4                        # the residual stream
    T, Dm, HD, V = seqs * mcfg.S, mcfg.Dm, mcfg.H * mcfg.Dh, mcfg.vocab_size
    norm = r * Dm + 4
    attn = norm + a * Dm + 5 * a * HD + 4 * mcfg.H       # qkv input, q k v, output, proj input, lse
    dense = norm + a * Dm + 4 * a * mcfg.Dffn            # w13 input, w13 output (2F), silu, product

    def moe():
        routed = mcfg.K * (a * (Dm + 5 * mcfg.De) + 28)    # dispatched x, h13 (2De), silu, product, gated; ids
        router = 4 * Dm + 8 * mcfg.E                      # fp32 input, exp and scores
        shared = a * Dm + 4 * a * mcfg.Dse if mcfg.Dse else 0
        return norm + router + routed + shared
    layers = [attn + (dense if kind_ == "dense" else moe()) for kind_ in flops.layer_kinds(mcfg)]
    head = norm + a * Dm + 4 * V + 8                     # norm, LM head input, fp32 log-softmax
    head_backward = (4 + a) * V                          # the logits' gradient, fp32 and cast
    kept = T * (len(layers) * r * Dm) if checkpointing else T * sum(layers)  # checkpointing: block inputs only
    return kept + T * (max(layers) + head + head_backward)


def memory(mcfg, plan, kind, world, dtype, checkpointing, rank=0, shapes=None):
    """Memory of one rank under `kind` ('single', 'ddp' or 'fsdp') for one micro-batch of the plan."""
    shapes = shapes or param_shapes(mcfg)
    params, grads, optimizer = state_bytes(shapes, kind, world, rank)
    return Memory(params, grads, optimizer, working_bytes(mcfg, shapes, kind, dtype),
                  activation_bytes(mcfg, plan.micro(world), dtype, kind, checkpointing))


def largest_micro(mcfg, plan, kind, world, dtype, checkpointing, capacity, shapes):
    """The largest micro_batch (over all ranks) that divides the batch, splits over the ranks and fits."""
    fits = [m for m in range(world, plan.batch_seqs + 1, world) if plan.batch_seqs % m == 0
            and memory(mcfg, _with_micro(plan, m), kind, world, dtype, checkpointing, 0, shapes).total
            <= capacity - RESERVE]
    return max(fits, default=0)


def _with_micro(plan, m):
    from dataclasses import replace
    return replace(plan, micro_batch=m, accum=plan.batch_seqs // m)


def plan_table(mcfg, tcfg, plan, world, dtype, capacity):
    """Per-rank memory of each way to run the plan on `world` ranks of `capacity` bytes, and the choice."""
    shapes = param_shapes(mcfg)
    kinds = ["single"] if world == 1 else ["ddp", "fsdp"]
    rows = []
    for kind in kinds:
        for ckpt in (False, True):
            m = memory(mcfg, plan, kind, world, dtype, ckpt, 0, shapes)
            largest = largest_micro(mcfg, plan, kind, world, dtype, ckpt, capacity, shapes) if capacity else None
            rows.append(dict(parallel=kind, activation_checkpointing=ckpt, params=m.params, grads=m.grads,
                             optimizer=m.optimizer, working=m.working, activations=m.activations, total=m.total,
                             fits=None if capacity is None else m.total <= capacity - RESERVE,
                             largest_micro_batch=largest))
    chosen = choose(mcfg, tcfg, plan, world, dtype, capacity)
    return rows, chosen


def format_plan(mcfg, tcfg, plan, world, dtype, capacity):
    rows, chosen = plan_table(mcfg, tcfg, plan, world, dtype, capacity)
    cap = f"{capacity / GiB:.0f} GiB per GPU ({RESERVE / GiB:.0f} GiB kept for CUDA and NCCL)" if capacity else "no GPU size"
    lines = [f"memory plan per rank: {world} rank(s), {cap}, {dtype}; micro-batch {plan.micro_batch} "
             f"({plan.micro(world)} per rank × {mcfg.S} tokens) × accum {plan.accum} = batch {plan.batch_seqs}",
             f"{'parallel':<8} {'act.ckpt':<8} {'params':>8} {'grads':>8} {'AdamW':>8} {'working':>8} "
             f"{'activ.':>8} {'total':>8}  fits  largest micro_batch"]
    for r in rows:
        fits = "-" if r["fits"] is None else "yes" if r["fits"] else "NO"
        largest = "-" if r["largest_micro_batch"] is None else r["largest_micro_batch"] or "none"
        lines.append(f"{r['parallel']:<8} {'on' if r['activation_checkpointing'] else 'off':<8} "
                     + " ".join(f"{r[k] / GiB:8.2f}" for k in ("params", "grads", "optimizer", "working",
                                                                "activations", "total"))
                     + f"  {fits:<4}  {largest}")
    lines.append(f"GiB per rank; train.parallel={tcfg.parallel!r} chooses {chosen}"
                 + (f" with activation checkpointing {'on' if tcfg.activation_checkpointing else 'off'}"))
    return "\n".join(lines), rows, chosen
