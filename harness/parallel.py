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
import datetime
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

import flops
from model import GPT

from harness.config import GPU_RESERVE

GiB = 2**30
RESERVE = GPU_RESERVE * GiB  # per GPU, kept out of the plan: CUDA context, NCCL buffers, allocator slack
KINDS = ("auto", "ddp", "fsdp")


# ----------------------------------------------------------------------------- processes
def setup_distributed(tcfg):
    """(rank, world, device): a process group under torchrun (NCCL on GPU, gloo on CPU), else one process.
    A collective that waits longer than train.dist_timeout_s (a rank that died or hangs) fails the run.
    NCCL is bound to the rank's GPU at once (device_id), so that its communicators are made eagerly there."""
    device = device_of(tcfg)  # a device that is not here is refused before anything starts
    if "RANK" not in os.environ:
        return 0, 1, device
    timeout = datetime.timedelta(seconds=tcfg.dist_timeout_s)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def parse_device(name, flag="--device"):
    """A --device of the tools (cpu, cuda or cuda:N), refused where there is no such device."""
    if not (name in ("cpu", "cuda") or re.fullmatch(r"cuda:\d{1,3}", name)):
        raise ValueError(f"{flag}={name!r}: expected cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"{flag}={name}: no such CUDA device here")
    return device


def device_name(device):
    """The GPU's name (dev/bench.py and dev/gpucheck.py results say where they were measured), or cpu."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_of(tcfg):
    """The device a run of this config gets on this machine (rank 0's, under torchrun), or refused."""
    if tcfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(tcfg.device, "train.device")


def gpu_bytes(tcfg, device):
    """Memory of one device for the plan: train.gpu_mem (GiB) when given, else what CUDA reports; None on CPU."""
    if tcfg.gpu_mem:
        return int(tcfg.gpu_mem * GiB)
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def choose(mcfg, tcfg, sched, world, dtype, capacity):
    """'single', 'ddp' or 'fsdp': what train.parallel asks for; 'auto' takes DDP when it fits the device."""
    if world == 1:
        return "single"
    if tcfg.parallel != "auto":
        return tcfg.parallel
    if capacity is None:
        return "ddp"
    need = memory(mcfg, sched.micro(world), "ddp", world, dtype, tcfg.activation_checkpointing).total
    return "ddp" if need <= capacity - RESERVE else "fsdp"


def wrap(model, strategy, tcfg, device, dtype):
    """The module the training step calls: the model itself, DDP around it, or the model sharded in place.
    Compiled first, sharded second, as torchtitan does (tested together on CPU: tests/test_parallel.py)."""
    model.checkpointing = tcfg.activation_checkpointing
    fwd = model.compile_regions() if tcfg.compile else model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(fwd, device_ids=ids, gradient_as_bucket_view=True,
                                                         **no_buffer_sync())
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.tensor import Shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
                                  reduce_dtype=torch.float32)
        # FSDP would cast every floating input of a block; only x is cast (cast_x), so that the SDPA path's
        # ALiBi bias stays fp32 (GPT.alibi_bias_for), as under autocast without FSDP
        block_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype, cast_forward_inputs=False)
        world = dist.get_world_size()

        def placement(p):
            return Shard(shard_dim(tuple(p.shape), world))
        for block in model.blocks:
            fully_shard(block, mp_policy=block_mp, shard_placement_fn=placement)
            if mp.param_dtype is not None:
                block.register_forward_pre_hook(cast_x(mp.param_dtype))
        fully_shard(model, mp_policy=mp, shard_placement_fn=placement)  # the root: embedding, final norm, LM head
    return fwd


def no_buffer_sync():
    """DDP's argument that turns off its broadcast of the buffers before every forward (a collective each time):
    the buffers are the constant ALiBi slopes and the expert bias, which every rank moves alike from the step's
    all-reduced load (train.train_step). torch 2.13 renamed it forward_sync_buffers and warns on the old name;
    under the new name DDP still broadcasts the buffers once when it wraps the model, which changes nothing
    here (every rank builds them alike, and a resume restores them after the wrap on every rank)."""
    new = "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers" if new else "broadcast_buffers": False}


def cast_x(dtype):
    """A block's forward pre-hook: its residual-stream input x in dtype, its other inputs as they are. On
    CUDA a block's output can be fp32 (autocast runs rms_norm in fp32, and the MoE returns its input's dtype)."""
    def hook(block, args):
        return (args[0].to(dtype), *args[1:])
    return hook


def accumulating(fwd, strategy, last):
    """Under DDP, gradients are all-reduced on the last micro-batch of a step only. FSDP reduce-scatters
    every micro-batch into the sharded gradients: unsharded gradients are what it exists to avoid."""
    return fwd.no_sync() if strategy == "ddp" and not last else contextlib.nullcontext()


def summed_over_ranks(t, world):
    """t summed over the ranks (a copy; t itself on one process)."""
    if world == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def clip_grad_norm(model, max_norm):
    """The gradient norm over all parameters before clipping (max_norm 0: no clipping), as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor over the shards


def tune_malloc():
    """Keep freed memory in the process and back big tensors with 2 MB pages. glibc's defaults hand
    big buffers back to the OS after every step and fault them in again on the next, which made the
    CPU MoE step about 1.3× slower (dev/bench.py parts --malloc=default); 2 MB pages fault far less often when a
    step grows the heap. Measured: docs/results.md, "Memory allocation"."""
    import ctypes
    if not sys.platform.startswith("linux"):
        return
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # torch reads it lazily: works after import
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def autocast_for(device, dtype):
    """The forward's autocast for a run's dtype name: none in float32."""
    return torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else contextlib.nullcontext()


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


def dtype_bytes(dtype):
    """Bytes per element of a run's compute dtype (train.dtype, resolved)."""
    return 2 if dtype in ("bfloat16", "float16") else 4


def param_shapes(mcfg):
    """{name: shape} of the model's distinct parameters, from a model on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = GPT(mcfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def shard_dim(shape, world):
    """The dim FSDP splits a tensor on: the first that the ranks divide, else the one padded least. FSDP2
    would split dim 0, as torch.chunk does; E = 78 experts over 32 ranks would then allocate 96."""
    return next((d for d, n in enumerate(shape) if n % world == 0),
                min(range(len(shape)), key=lambda d: math.ceil(shape[d] / world) * world - shape[d]))


def shard_numel(shape, world, rank):
    """(allocated, held) elements of rank's shard. The split dim d gets ceil(n_d/world) slices per rank
    (torch.chunk's rule), and every rank's weight and gradient shard is allocated padded to that many;
    what a rank holds (and AdamW's moments copy) is its share of the real slices, fewer on the last ranks."""
    d = shard_dim(shape, world)
    per_rank = math.ceil(shape[d] / world)
    held = max(0, min(per_rank, shape[d] - rank * per_rank))
    rest = math.prod(shape) // shape[d]
    return per_rank * rest, held * rest


def state_bytes(shapes, strategy, world, rank=0):
    """(params, grads, optimizer) bytes allocated on `rank`: fp32 weights and gradients, AdamW's two
    moments and its fp32 step count (one 4-byte scalar per parameter tensor, on every rank)."""
    if strategy == "fsdp":
        allocated, held = (sum(n) for n in zip(*(shard_numel(s, world, rank) for s in shapes.values())))
    else:
        allocated = held = sum(math.prod(s) for s in shapes.values())
    return 4 * allocated, 4 * allocated, 8 * held + 4 * len(shapes)


def working_bytes(mcfg, shapes, strategy, dtype):
    """Weight copies in flight: under DDP with autocast, the bf16 cast of every matrix (kept for the
    backward); under FSDP, two gathered blocks (one computing, one prefetched), the root, and one block's
    unsharded gradients in the compute dtype and in fp32 for the reduce-scatter."""
    b = dtype_bytes(dtype)
    if strategy != "fsdp":
        cast = [s for n, s in shapes.items() if len(s) >= 2 and (n != "wte.weight" or mcfg.tie_embeddings)]
        return 2 * sum(math.prod(s) for s in cast) if b == 2 else 0  # the lookup table itself is not cast
    block = max(sum(math.prod(s) for n, s in shapes.items() if n.startswith(f"blocks.{i}."))
                for i in range(mcfg.L))
    root = sum(math.prod(s) for n, s in shapes.items() if not n.startswith("blocks."))
    return b * (2 * block + root) + (b + 4) * block


def saved_bytes(mcfg, seqs, dtype, strategy, checkpointing, attention="flex"):
    """Bytes autograd keeps from the forward of `seqs` sequences (S tokens each) for the backward,
    counted tensor by tensor from model.py. Under autocast the residual stream stays fp32; FSDP's bf16
    weights make it bf16. With activation checkpointing only each block's input is kept."""
    a = dtype_bytes(dtype)  # matmul inputs and outputs
    r = a if strategy == "fsdp" else 4                        # the residual stream
    T = seqs * mcfg.S
    bias = 4 * mcfg.H * mcfg.S ** 2 if attention == "sdpa" else 0  # the fp32 ALiBi bias, one for all layers
    if checkpointing:
        return T * (8 + mcfg.L * r * mcfg.Dm + head_bytes(mcfg, a, r, attention)) + bias
    layers = sum(layer_bytes(mcfg, layer, a, r, attention) for layer in flops.layer_kinds(mcfg))
    return T * (8 + layers + head_bytes(mcfg, a, r, attention)) + bias  # 8: the token ids


def layer_bytes(mcfg, layer, a, r, attention="flex"):
    """Per token, what one layer keeps: attention, then a dense FFN or an MoE layer."""
    Dm, HD = mcfg.Dm, mcfg.H * mcfg.Dh
    # the norm: on the CPU (sdpa) path kernels.custom_ops.RMSNormFn keeps the normalised input and 1/rms; on CUDA,
    # torch's rms_norm is counted as keeping the input too
    norm = r * Dm + 4 + (r * Dm if attention == "flex" else 0)
    if attention == "flex" or a == 4:   # FlexAttention, or SDPA's flash kernel in fp32: q, k, v, output and
        attn = norm + a * Dm + 5 * a * HD + 4 * mcfg.H   # logsumexp (+ qkv input and proj input)
    else:                               # SDPA's math path, under autocast: q, k, v in the bias's fp32
        attn = norm + a * Dm + 12 * HD + a * HD + 4 * mcfg.H * mcfg.S  # and the S×S probabilities
    if layer == "dense":
        return attn + norm + a * Dm + 4 * a * mcfg.Dffn  # w13 input, w13 output (2F), silu, product
    # the router: its fp32 input (in fp32 the shared expert's input already, when there is one), the
    # exponentials and the scores
    router = (0 if a == 4 and mcfg.Dse else 4 * Dm) + 8 * mcfg.E
    # routed, per slot: the dispatched x, h13 (2De) and silu(h1) (kernels.custom_ops.SwiGLUFn), the gated product (the
    # second grouped GEMM's input); slot ids and gate. The shared expert: its input, h13, silu, product
    routed = mcfg.K * (a * (Dm + 4 * mcfg.De) + 28)
    shared = a * Dm + 4 * a * mcfg.Dse if mcfg.Dse else 0
    return attn + norm + router + routed + shared


def head_bytes(mcfg, a, r, attention="flex"):
    norm = r * mcfg.Dm + 4 + (r * mcfg.Dm if attention == "flex" else 0)  # as layer_bytes counts it
    return norm + a * mcfg.Dm + 4 * mcfg.vocab_size  # norm, LM head input, fp32 log-softmax


def activation_bytes(mcfg, seqs, dtype, strategy, checkpointing, attention="flex"):
    """saved_bytes, plus the working set of the backward: one layer's activations again (recomputed
    under checkpointing, or the gradients of what it kept) and the logits' gradient, fp32 and cast."""
    a = dtype_bytes(dtype)
    r = a if strategy == "fsdp" else 4
    layer = max(layer_bytes(mcfg, layer, a, r, attention) for layer in flops.layer_kinds(mcfg))
    return saved_bytes(mcfg, seqs, dtype, strategy, checkpointing, attention) + seqs * mcfg.S * (layer + (4 + a) * mcfg.vocab_size)


def memory(mcfg, seqs, strategy, world, dtype, checkpointing, rank=0, shapes=None, attention="flex"):
    """Memory of one rank under `strategy` ('single', 'ddp' or 'fsdp') for a micro-batch of `seqs` sequences
    per rank."""
    shapes = shapes or param_shapes(mcfg)
    params, grads, optimizer = state_bytes(shapes, strategy, world, rank)
    return Memory(params, grads, optimizer, working_bytes(mcfg, shapes, strategy, dtype),
                  activation_bytes(mcfg, seqs, dtype, strategy, checkpointing, attention))


def largest_micro(mcfg, batch_seqs, strategy, world, dtype, checkpointing, capacity, shapes):
    """The largest micro_batch (over all ranks) that divides the batch, splits over the ranks and fits."""
    fits = [m for m in range(world, batch_seqs + 1, world) if batch_seqs % m == 0
            and memory(mcfg, m // world, strategy, world, dtype, checkpointing, 0, shapes).total <= capacity - RESERVE]
    return max(fits, default=0)


def host_bytes():
    """The machine's physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(mcfg, tcfg, sched, world, dtype, device, attention):
    """Refuse, before any tensor exists, a run that cannot fit its device. First the fp32 weights,
    gradients and AdamW moments (16 bytes per parameter, counted without building anything; sharded over
    the ranks at best), then on CPU the whole memory plan, activations included, against the machine's
    memory. On a GPU the plan beyond that is an estimate: train.py warns instead (parallel.choose)."""
    capacity = gpu_bytes(tcfg, device) if device.type == "cuda" else host_bytes()
    if not capacity:
        return
    where = f"the GPU ({capacity / GiB:.1f} GiB)" if device.type == "cuda" else f"this machine ({capacity / GiB:.1f} GiB)"
    params = flops.count(mcfg, True).N + mcfg.vocab_size * mcfg.Dm * (1 if mcfg.tie_embeddings else 2)
    state = 16 * params / world
    shape = ", ".join(f"{k}={getattr(mcfg, k):,}" for k in ("L", "Dm", "H", "Dh", "Dffn", "E", "De", "Dse", "vocab_size"))
    if state > capacity:
        raise ValueError(f"the model ({shape}) has {params:.3g} parameters: their weights, gradients and AdamW "
                         f"moments need {state / GiB:.4g} GiB per rank{' (sharded)' if world > 1 else ''}, more than "
                         f"{where}: give a smaller model{' or more ranks' if device.type == 'cuda' else ''}")
    if device.type == "cuda":
        return
    need = memory(mcfg, sched.micro(world), "fsdp" if tcfg.parallel == "fsdp" and world > 1 else "ddp", world,
                  dtype, tcfg.activation_checkpointing, attention=attention)
    if need.total > capacity:
        raise ValueError(f"a micro-batch of {sched.micro(world):,} sequences of model.S={mcfg.S:,} tokens per rank "
                         f"(train.micro_batch={tcfg.micro_batch or 'the whole batch of ' + str(sched.batch_seqs)}) needs "
                         f"{need.activations / GiB:.4g} GiB of activations beside the model's {need.state / GiB:.4g} "
                         f"GiB, more than {where}: give a smaller train.micro_batch (or train.batch_seqs)")


def memory_table(mcfg, tcfg, sched, world, dtype, capacity):
    """Per-rank memory of each way to run the schedule on `world` ranks of `capacity` bytes, and the choice."""
    shapes = param_shapes(mcfg)
    strategies = ["single"] if world == 1 else ["ddp", "fsdp"]
    rows = []
    for strategy in strategies:
        for checkpointing in (False, True):
            m = memory(mcfg, sched.micro(world), strategy, world, dtype, checkpointing, 0, shapes)
            largest = (largest_micro(mcfg, sched.batch_seqs, strategy, world, dtype, checkpointing, capacity, shapes)
                       if capacity else None)
            rows.append(dict(parallel=strategy, activation_checkpointing=checkpointing, params=m.params, grads=m.grads,
                             optimizer=m.optimizer, working=m.working, activations=m.activations, total=m.total,
                             fits=None if capacity is None else m.total <= capacity - RESERVE,
                             largest_micro_batch=largest))
    chosen = choose(mcfg, tcfg, sched, world, dtype, capacity)
    return rows, chosen


def format_memory_plan(mcfg, tcfg, sched, world, dtype, capacity):
    rows, chosen = memory_table(mcfg, tcfg, sched, world, dtype, capacity)
    cap = f"{capacity / GiB:.0f} GiB per GPU ({RESERVE / GiB:.0f} GiB kept for CUDA and NCCL)" if capacity else "no GPU size"
    lines = [f"memory plan per rank: {world} rank(s), {cap}, {dtype}; micro-batch {sched.micro_batch} "
             f"({sched.micro(world)} per rank × {mcfg.S} tokens) × accum {sched.accum} = batch {sched.batch_seqs}",
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
                 + f" with activation checkpointing {'on' if tcfg.activation_checkpointing else 'off'}")
    return "\n".join(lines), rows, chosen
