"""A run's configuration: [model] (GPTConfig) and [train] (TrainConfig), from a TOML file and
--key=value flags, every value checked before any work. A bad value raises one ValueError that names
the key, the value and what is accepted (train.py turns it into exit code 2). Tags (M11), (M15) are
equations of docs/method.md.

    python train.py configs/<name>.toml --key=value …   # a config file, then overrides
    python train.py --out_dir=out/x --resume            # the run's own config.toml, and flags on top
"""
import json
import math
from dataclasses import asdict, dataclass, fields, make_dataclass
from pathlib import Path

import flops

from harness import helptext
from harness import rundir
from harness import safe_io


# [model] is model.GPTConfig. Its fields, types and defaults are read from model.py's source, as --help reads
# them, into a dataclass of the same fields here: checking a config and planning a sweep load no torch.
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_SHAPE_KEYS = {f.name for f in fields(flops.Shape)}
ModelConfig = make_dataclass("ModelConfig", [(k.name, _TYPES[k.kind], k.default) for k in
                                             helptext.keys(helptext.source_of("model"), "GPTConfig")
                                             if k.name not in _SHAPE_KEYS], bases=(flops.Shape,))


def padded_vocab(v):
    """The model's vocabulary for a tokenizer of v tokens: a multiple of 64 (friendlier matmul shapes, as
    nanoGPT's 50304) above byte level."""
    return v if v <= 256 else 64 * math.ceil(v / 64)


@dataclass
class TrainConfig:
    data: str = "data/shakespeare-byte"  # a folder written by data.py (the default is prepared if missing)
    out_dir: str = "out/default"  # the run directory: config.toml, log.jsonl, checkpoints, summary.json
    seed: int = 1337          # the init's and the data order's
    # the budget: one of iters, tokens (D) and compute (C, FLOPs; M11). 0 = unset
    iters: int = 0            # training iterations (optimizer steps); 0 = unset
    tokens: float = 2.5e6     # D, training tokens; 0 = unset (the toy's 2.5e6 is dropped when iters or compute is given)
    compute: float = 0.0      # C in FLOPs: D = C / M_train tokens; 0 = unset
    unique_tokens: float = 0.0  # D̂: one epoch predicts the first D̂ tokens (0: the whole split); epochs as the budget needs (docs/method.md §6)
    batch_seqs: int = 0       # global batch in sequences of S tokens; 0 = StepLaw (M15)
    micro_batch: int = 0      # sequences per forward over all ranks (accumulation makes up the batch); 0 = the batch
    lr: float = 0.0           # peak learning rate; 0 = StepLaw (M15)
    lr_mult: float = 1.0      # multiplies the StepLaw learning rate
    min_lr: float = 1e-5      # where the cosine ends
    warmup: int = -1          # iterations; -1 = clip(0.01·iters, 200, 2000) (Table 4; docs/method.md §5)
    weight_decay: float = 0.1  # AdamW's, on the matrices only
    beta1: float = 0.9        # AdamW's β1
    beta2: float = 0.95       # AdamW's β2
    grad_clip: float = 1.0    # max gradient norm; 0 = no clipping
    include_router: bool = True  # count the router in N, Na and C (docs/method.md §4)
    eval_interval: int = 0    # iterations between evaluations; 0 = five per run
    eval_tokens: int = 65536  # BPC over the first eval_tokens tokens of each validation split; 0 = all of it
    log_interval: int = 10    # iterations between lines of log.jsonl (and of the console)
    sample_tokens: int = 200  # text sampled from the model when the run finishes (one process or DDP); 0 = none
    ckpt_interval: int = 0    # iterations between checkpoints; 0 = at every evaluation
    stop_at: int = 0          # stop with a checkpoint after this iteration (to train in chunks); 0 = run to the end
    device: str = "auto"      # auto = cuda when available, else cpu; or cpu, cuda, cuda:N
    dtype: str = "auto"       # auto = bfloat16 autocast on cuda, float32 elsewhere; or float32, bfloat16, float16
    compile: bool = False     # torch.compile each block and the head (model.GPT.compile_regions)
    attention: str = "auto"   # flex (FlexAttention) | sdpa (SDPA with the ALiBi bias); auto = flex on cuda
    parallel: str = "auto"    # over ranks: ddp | fsdp (FSDP2: weights, gradients and AdamW sharded); auto = ddp when it fits
    activation_checkpointing: bool = False  # keep each block's input only and recompute the rest in the backward
    gpu_mem: float = 0.0      # GiB per GPU for the memory plan and parallel=auto; 0 = what CUDA reports
    dist_timeout_s: int = 1800  # seconds a rank waits in a collective (NCCL or gloo) before the run fails
    peak_flops: float = 0.0   # per-device peak FLOP/s for MFU; 0 = look the GPU up in logbook.PEAK_FLOPS
    tensorboard: bool = False  # also log to TensorBoard in <out_dir>/tb/ (pip install tensorboard; harness/trackers.py)
    wandb: bool = False       # also log to Weights & Biases (pip install wandb); its run id is kept in <out_dir>/wandb.json
    wandb_project: str = "moe-equal"  # the W&B project
    wandb_run_name: str = ""  # the W&B run's name; "" = the run directory's name
    wandb_group: str = ""     # the W&B group (sweep.py run: the sweep's folder name); "" = none
    overwrite: bool = False   # start afresh in an out_dir that holds a run, deleting it


SECTIONS = {"model": ModelConfig, "train": TrainConfig}
# what shapes a run's trajectory: a resume is refused when one of these (or any [model] key) differs from
# its checkpoint's; the others (stop_at, the intervals, eval_tokens, compile, device, …) may change
TRAJECTORY = ("data", "seed", "iters", "tokens", "compute", "unique_tokens", "batch_seqs", "micro_batch", "lr",
              "lr_mult", "min_lr", "warmup", "weight_decay", "beta1", "beta2", "grad_clip", "include_router", "dtype",
              "attention")
# what shapes a finished run's results: a sweep reuses a finished run only when these (and [model]) are its plan's
RESULT_KEYS = TRAJECTORY + ("eval_tokens",)
# the data is known by its content (data.changed_data: the sha256 of every split), not by its path, wherever
# a run recorded it: a folder moved or copied whole is the same data
BY_CONTENT = ("data",)


def parse_value(key, raw, typ):
    """A --key=value flag's value as the field's type."""
    if typ is bool:
        try:
            return rundir.true_or_false(raw)
        except ValueError:
            raise ValueError(f"--{key}={raw}: expected true or false") from None
    if typ is str:
        return raw
    if typ is int:
        try:
            return int(raw)  # exactly, however long
        except ValueError:
            pass
    try:
        v = float(raw)  # so that --tokens=1e9 and --iters=2e4 read as numbers
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or (typ is int and not v.is_integer()):
        raise ValueError(f"--{key}={raw}: expected {'an integer' if typ is int else 'a number'}")
    return typ(v)


def read_toml(path, allowed=SECTIONS):
    """{section: {key: value}} of a config file, with unknown tables and keys refused."""
    owner = {f.name: sec for sec, cls in allowed.items() for f in fields(cls)}
    cfg = safe_io.load_toml(path)
    out = {name: {} for name in allowed}
    for sec, table in cfg.items():
        if sec not in allowed or not isinstance(table, dict):
            raise ValueError(f"{path}: unknown table [{sec}]: expected {' and '.join(f'[{s}]' for s in allowed)}")
        for key, v in table.items():
            if owner.get(key) != sec:
                raise ValueError(f"{path}: unknown config key {sec}.{key}")
            out[sec][key] = v
    return out


def coerce(sec, key, v, where=""):
    """A TOML value as the field's type: 3 for a float field or 1e6 for an int one, but a bool is no number."""
    typ = {f.name: f.type for f in fields(SECTIONS[sec])}[key]
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if typ is int and isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, typ) or (typ is not bool and isinstance(v, bool)):
        raise ValueError(f"{where}{sec}.{key}={v!r}: expected {'true or false' if typ is bool else typ.__name__}")
    return v


def refuse_repeats(argv):
    """A --key given twice on one command line (--lr=1 --lr=2: which one was meant?) is refused, naming both;
    the flags of train.py go on top of its config file, never on top of each other."""
    seen = {}
    for arg in argv:
        key = arg.partition("=")[0]
        if key.startswith("--") and key in seen:
            raise ValueError(f"{key} given twice ({seen[key]} and {arg}): give it once")
        seen[key] = arg


def load_config(argv):
    """(model values, TrainConfig, keys given, resume) from [config.toml] --key=value … [--resume].
    With --resume the base is the run's own config.toml (in --out_dir, or the config file's out_dir), and
    what is given goes on top: checkpoint.check then refuses what changes the trajectory."""
    refuse_repeats(argv)
    resume = "--resume" in argv
    args = [a for a in argv if a != "--resume"]
    given = {name: {} for name in SECTIONS}
    if args and not args[0].startswith("--"):
        path = args.pop(0)
        for sec, table in read_toml(path).items():
            given[sec].update({k: coerce(sec, k, v, f"{path}: ") for k, v in table.items()})
    owner = {f.name: (sec, f.type) for sec, cls in SECTIONS.items() for f in fields(cls)}
    for arg in args:
        key, eq, raw = arg[2:].partition("=")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"cannot read argument {arg!r}: expected --key=value")
        if key not in owner:
            raise ValueError(f"unknown config key {key!r} (in {arg})")
        sec, typ = owner[key]
        given[sec][key] = parse_value(key, raw, typ)
    if {"iters", "compute"} & set(given["train"]) and "tokens" not in given["train"]:
        given["train"]["tokens"] = 0.0  # the budget given replaces the default one
    values = {sec: dict(table) for sec, table in given.items()}
    if resume and given["train"].get("overwrite"):
        raise ValueError("--resume continues the run in out_dir and --overwrite=true deletes it: give one of them")
    if resume:
        values = resumed_values(given)
    check_model(values["model"])
    tcfg = TrainConfig(**values["train"])
    check_train(tcfg)
    return values["model"], tcfg, set(values["model"]) | set(values["train"]), resume


def resumed_values(given):
    """The run's saved config.toml with the given values on top. Whether they change its trajectory is
    checked in one place, against the checkpoint (checkpoint.check), which names every difference."""
    path = Path(given["train"].get("out_dir", TrainConfig.out_dir)) / "config.toml"
    where = path
    if path.is_file():
        saved = read_toml(path)
    else:  # a run whose config.toml is gone: its checkpoint holds the same config (torch is loaded for it)
        from harness import checkpoint
        saved, where = checkpoint.saved_config(path.parent)
        if saved is None:
            return given  # no run there: train.py says so
        rundir.warn(f"{path} is missing: the run's config comes from its checkpoint {where}, and config.toml is "
                    f"written again when the run goes on")
    saved = {sec: {k: coerce(sec, k, v, f"{where}: ") for k, v in table.items()} for sec, table in saved.items()}
    for key in ("stop_at", "overwrite"):  # what one invocation asks for, not a setting of the run
        saved["train"].pop(key, None)
    return {sec: {**saved[sec], **given[sec]} for sec in SECTIONS}


MAX_TOKENS = 2**53  # D, iterations·batch·S, and every token count: float64 still counts each token exactly
# The one table of ranges: each numeric key of [model] and [train], (lowest, highest, what is accepted). train.py,
# sweep.py and flops.py check by it; the rules between keys follow in check_model and check_train. The model's
# largest sizes are far beyond any model trained so far, and small enough that no tensor size, parameter
# count or FLOP count overflows on the way to the memory check.
RANGES = {
    # [model]: the shape (E, K, De, Dse only in an MoE; Dffn only where a layer is dense)
    "L": (1, 4096, "an integer in 1..4,096"),
    "Dm": (1, 2**20, "an integer in 1..1,048,576"),
    "H": (1, 2**14, "an integer in 1..16,384"),
    "Dh": (0, 2**16, "an integer in 1..65,536, or 0 for Dm // H"),
    "Dffn": (1, 2**22, "an integer in 1..4,194,304"),
    "E": (1, 2**20, "an integer in 1..1,048,576"),
    "K": (1, 2**20, "an integer with 1 <= K <= E"),
    "De": (1, 2**22, "an integer in 1..4,194,304"),
    "Dse": (0, 2**22, "0 (no shared expert) or an integer up to 4,194,304"),
    "S": (1, 2**22, "an integer in 1..4,194,304"),
    # [model]: the rest (λ: ours, the paper prints none, docs/method.md §9; std: GPT-2's; z-loss and bias off unless asked for)
    "vocab_size": (1, 2**32, "an integer in 1..2^32"),
    "balance_coef": (0, 1, "a number in 0..1"),
    "init_std": (0, 1, "a number in 0..1"),
    "router_z_coef": (0, 1, "a number in 0..1"),
    "expert_bias_rate": (0, 1, "a number in 0..1"),
    # [train]
    "seed": (0, 2**63 - 1, "an integer in 0..2^63-1"),
    "iters": (0, MAX_TOKENS, "iterations >= 0 (0: the budget is tokens or compute)"),
    "tokens": (0, MAX_TOKENS, "a number of tokens in 0..2^53 (0: the budget is iters or compute)"),
    "compute": (0, 1e30, "FLOPs in 0..1e30 (0: the budget is iters or tokens)"),
    "unique_tokens": (0, MAX_TOKENS, "a number of tokens >= 0 (0: all of the training split)"),
    "batch_seqs": (0, 2**31, "sequences in 0..2^31 (0: StepLaw)"),
    "micro_batch": (0, 2**31, "sequences in 0..2^31 (0: the whole batch)"),
    "lr": (0, 1, "a peak learning rate in 0..1 (0: StepLaw)"),
    "lr_mult": (1e-6, 1e6, "a multiple of the StepLaw rate in 1e-6..1e6"),
    "min_lr": (0, 1, "a final learning rate in 0..1"),
    "warmup": (-1, MAX_TOKENS, "iterations >= 0, or -1 for clip(0.01·iters, 200, 2000)"),
    "weight_decay": (0, 1e6, "a number in 0..1e6 (with lr·weight_decay <= 1)"),
    "beta1": (0, 1 - 1e-12, "a number in [0, 1)"),
    "beta2": (0, 1 - 1e-12, "a number in [0, 1)"),
    "grad_clip": (0, 1e30, "a gradient norm >= 0 (0: no clipping)"),
    "eval_interval": (0, 2**63 - 1, "iterations >= 0 (0: five evaluations per run)"),
    "eval_tokens": (0, 2**63 - 1, "tokens >= 0 (0: all of each split)"),
    "log_interval": (1, 2**63 - 1, "an integer >= 1"),
    "sample_tokens": (0, 10**6, "tokens in 0..1,000,000"),
    "ckpt_interval": (0, 2**63 - 1, "iterations >= 0 (0: at every evaluation)"),
    "stop_at": (0, 2**63 - 1, "an iteration >= 0 (0: run to the end)"),
    "gpu_mem": (0, 2**20, "GiB per GPU in 0..2^20 (0: what CUDA reports)"),
    "dist_timeout_s": (1, 7 * 86400, "seconds in 1..604,800 (a week)"),
    "peak_flops": (0, 1e30, "FLOP/s in 0..1e30 (0: the datasheet's)"),
    # the command lines' ranks per run (train.py --plan --nproc, sweep.py --nproc): no config key
    "nproc": (1, 2**20, "a number of ranks in 1..2^20"),
}
TRAIN_RANGED = [k for k in RANGES if k in {f.name for f in fields(TrainConfig)}]
GPU_RESERVE = 2  # GiB of each GPU kept for CUDA and NCCL (parallel.RESERVE): a gpu_mem must be more
CHOICES = {"dtype": ("auto", "float32", "bfloat16", "float16"), "parallel": ("auto", "ddp", "fsdp"),
           "attention": ("auto", "flex", "sdpa")}


def _check(name, v, ok, allowed):
    if not ok(v):
        shown = f"{v:.4g}" if isinstance(v, (int, float)) and abs(v) >= 1e16 else repr(v)
        raise ValueError(f"train.{name}={shown} is not allowed: expected {allowed}")


MOE_KEYS = ("E", "De", "Dse", "K")  # read only when the scheme has MoE layers
# what only an MoE layer reads: on a dense model each must be left at its default, or it is refused
MOE_ONLY = MOE_KEYS + ("norm_topk", "balance_coef", "router_z_coef", "expert_bias_rate")
FFN_SCHEMES = ("dense", "1dense", "interleave")  # the schemes with a dense SwiGLU layer (Dffn)


def check_model(mvals):
    """The [model] table's values (the defaults for what is not given): type, range and the rules between keys,
    before any data or tensor exists. One ValueError names the key, the value and what is accepted. Returns the
    values as their fields' types (Dm = 32.0 in a TOML file is 32)."""
    mvals = {k: coerce("model", k, v) for k, v in mvals.items()}
    m = {**{f.name: f.default for f in fields(ModelConfig)}, **mvals}
    if m["scheme"] not in flops.SCHEMES:
        raise ValueError(f"scheme={m['scheme']!r} is unknown: expected one of {', '.join(flops.SCHEMES)}")
    moe = m["scheme"] != "dense"
    for name in () if moe else MOE_ONLY:
        default = getattr(ModelConfig, name)
        if mvals.get(name, default) != default:
            raise ValueError(f"{name}={mvals[name]!r} means nothing for scheme='dense' (it is read by MoE layers only): "
                             f"expected it left out, or its default {default!r}")
    for name in ("L", "Dm", "H", "S", "Dh") + (("Dffn",) if m["scheme"] in FFN_SCHEMES else ()) + (MOE_KEYS if moe else ()):
        lo, hi, allowed = RANGES[name]
        if name == "K":
            hi, allowed = m["E"], f"an integer with 1 <= K <= E={m['E']}"
        if name == "Dffn":
            allowed += f" for scheme={m['scheme']!r}"
        _in_range(name, m[name], lo, hi, allowed)
        if name == "Dh" and m["Dh"] == 0 and m["Dm"] % m["H"]:
            raise ValueError(f"H={m['H']} does not divide Dm={m['Dm']}: set Dh explicitly (H·Dh need not equal Dm)")
    if m["scheme"] == "interleave" and m["L"] < 2:
        raise ValueError(f"L={m['L']} is too small for scheme='interleave': expected L >= 2")
    _in_range("vocab_size", m["vocab_size"], *RANGES["vocab_size"])
    for name in ("balance_coef", "init_std", "router_z_coef", "expert_bias_rate"):
        v = m[name]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
                or not RANGES[name][0] <= v <= RANGES[name][1]:
            raise ValueError(f"{name}={v!r} is not allowed: expected {RANGES[name][2]}")
    if not moe:
        return mvals
    if m["norm_topk"] and m["K"] == 1:
        raise ValueError("norm_topk=true needs K > 1: with K = 1 the gate is constantly 1 and the "
                         "router gets no gradient from the loss (docs/method.md, M4)")
    for name in ("Dm", "De"):  # grouped_mm needs 16-byte aligned rows: widths a multiple of 8 serve fp32 and bf16
        _in_range(name, m[name], 0, RANGES[name][1], "a multiple of 8 in an MoE model (grouped GEMM row alignment)",
                  lambda v: v % 8 == 0)
    return mvals


def _in_range(name, v, lo, hi, allowed, ok=lambda v: True):
    """A [model] integer: refused, naming the key, unless it is an int in lo..hi that ok accepts."""
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi or not ok(v):
        shown = f"{v:.4g}" if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1e16 else repr(v)
        raise ValueError(f"{name}={shown} is not allowed: expected {allowed}")


def shape_from_dict(d, where):
    """A flops.Shape from a config table's [model] values, checked by train.py's rules (every key, the shape's
    and the rest) and naming the file (where) and the key on bad input."""
    try:
        unknown = [k for k in d if k not in {f.name for f in fields(ModelConfig)}]
        if unknown:
            raise ValueError(f"unknown config key model.{unknown[0]}")
        return flops.Shape(**{k: v for k, v in check_model(d).items() if k in _SHAPE_KEYS})
    except ValueError as e:
        raise ValueError(f"{where}: {e}" if where else str(e)) from None


def model_config(mvals):
    """The [model] table checked, as a ModelConfig (Dh resolved)."""
    return ModelConfig(**check_model(mvals))


def check_train(t):
    """Every [train] value: type, finite, range, choices, and the rules between keys."""
    for f in fields(TrainConfig):
        coerce("train", f.name, getattr(t, f.name))
        v = getattr(t, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"train.{f.name}={v!r} is not allowed: expected a finite number")
        if isinstance(v, str) and not v.isprintable() or isinstance(v, str) and not rundir.utf8(v):
            raise ValueError(f"train.{f.name}={v!r} is not allowed: expected printable UTF-8 text (a path, a name)")
    for name in TRAIN_RANGED:
        lo, hi, allowed = RANGES[name]
        _check(name, getattr(t, name), lambda v: lo <= v <= hi, allowed)
    for name, choices in CHOICES.items():
        _check(name, getattr(t, name), lambda v: v in choices, ", ".join(choices[:-1]) + " or " + choices[-1])
    _check("device", t.device, lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
           "auto, cpu, cuda or cuda:N")
    _check("data", t.data, lambda v: not safe_io.path_problem(v),
           f"a prepared data folder (it is {safe_io.path_problem(t.data)})")
    _check("wandb_project", t.wandb_project, lambda v: 0 < len(v) <= 128 and not set(v) & set("/\\#?%:"),
           "a W&B project name: 1 to 128 characters, none of / \\ # ? % :")
    for name in ("wandb_run_name", "wandb_group"):
        _check(name, getattr(t, name), lambda v: len(v) <= 128, "at most 128 characters")
    _check("out_dir", t.out_dir, lambda v: not safe_io.path_problem(v), f"a folder (it is {safe_io.path_problem(t.out_dir)})")
    budgets = {k: getattr(t, k) for k in ("iters", "tokens", "compute") if getattr(t, k)}
    if len(budgets) != 1:
        raise ValueError(f"give exactly one budget of train.iters, train.tokens and train.compute (got {budgets or 'none'})")
    if t.micro_batch and t.batch_seqs and t.micro_batch > t.batch_seqs:
        raise ValueError(f"train.micro_batch={t.micro_batch} is more than train.batch_seqs={t.batch_seqs}: expected a "
                         f"micro_batch that divides the batch")
    if t.unique_tokens != int(t.unique_tokens):
        raise ValueError(f"train.unique_tokens={t.unique_tokens} is not allowed: expected a whole number of tokens")
    if t.gpu_mem and t.gpu_mem <= GPU_RESERVE:
        raise ValueError(f"train.gpu_mem={t.gpu_mem} is not allowed: expected more than the {GPU_RESERVE} GiB kept for CUDA and "
                         f"NCCL (or 0: what CUDA reports)")
    if t.lr and t.min_lr > t.lr:
        raise ValueError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}: the cosine would rise to the end; expected "
                         f"min_lr <= lr")


def resolve_dtype(dtype, device_type):
    """train.dtype on a kind of device: "auto" is bfloat16 on CUDA, float32 elsewhere."""
    return dtype if dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")


def changed_keys(saved, mcfg, tcfg, train_keys, then="run", now="now"):
    """How a saved {model: …, train: …} config differs from a run's: every [model] key and the given
    [train] keys, one line per difference."""
    saved_m, saved_t = saved.get("model", {}), saved.get("train", {})
    diff = [f"model.{k}: {then} {saved_m.get(k)!r}, {now} {v!r}" for k, v in asdict(mcfg).items() if saved_m.get(k) != v]
    return diff + [f"train.{k}: {then} {saved_t.get(k)!r}, {now} {getattr(tcfg, k)!r}" for k in train_keys
                   if saved_t.get(k) != getattr(tcfg, k)]


def is_run_config(sections):
    """Whether {model: …, train: …} is what train.py writes as a run's config.toml: every key of both."""
    return (set(sections) == set(SECTIONS) and
            all(set(sections[sec]) == {f.name for f in fields(cls)} for sec, cls in SECTIONS.items()))


def to_toml(sections):
    """A flat two-table TOML document (tomllib reads, it does not write). Strings keep their characters
    (an emoji in a path stays one): JSON's escapes of control characters are TOML's too."""
    def value(v):
        return json.dumps(v, ensure_ascii=False) if isinstance(v, (str, bool)) else repr(v)
    return "".join(f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in table.items()) + "\n"
                   for name, table in sections.items())
