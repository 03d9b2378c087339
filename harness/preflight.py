"""Every check a run passes before anything is written or deleted, in one place: train.py runs it before
it trains, sweep.py on every run of a plan before the first starts, dev/bench.py before it measures. The
config (config.py), the schedule (schedule.py), the precision on this device, the data (the default
corpus is prepared on first use), the vocabulary, the splits against S and unique_tokens, the packages of
the trackers asked for; with a device, the memory and torch.compile. No torch at import: planning a sweep
loads none.
"""
import functools
from dataclasses import dataclass
from pathlib import Path

import data

from harness import schedule
from harness import trackers
from harness.config import ModelConfig, TrainConfig, model_config, padded_vocab, resolve_dtype


@dataclass
class Setup:
    """A run that passed every check: what train.py will do, decided before anything is written."""
    mcfg: ModelConfig
    tcfg: TrainConfig
    sched: schedule.Schedule
    resume: bool
    meta: dict = None         # the data's meta.json (None: not prepared yet, when planning a sweep)
    dtype: str = "float32"
    attention: str = "sdpa"
    train_tokens: object = None
    val_splits: dict = None   # {name: tokens}


def check_run(mvals, tcfg, given, resume, world=1, device=None, rank=0, prepare=True):
    """Every check train.py makes before it writes or deletes anything, in one place that a sweep runs on
    each of its runs too (sweep_plan.check_runs): the config (config.py), the schedule, the precision on
    this device, the data (the default corpus is prepared first when prepare), the vocabulary, the splits
    against S and unique_tokens, and the memory. device None (planning elsewhere) leaves out what depends on it, and
    a data folder not prepared yet leaves out what depends on the data."""
    shape = ModelConfig(**mvals)  # the vocabulary comes from the data; nothing here needs it
    problem = trackers.missing(tcfg)
    if problem:
        raise ValueError(problem)
    if tcfg.eval_tokens and tcfg.eval_tokens < shape.S + 1:
        raise ValueError(f"train.eval_tokens={tcfg.eval_tokens} is less than one window of S+1 = {shape.S + 1} tokens: "
                         f"expected 0 (all of each split) or at least {shape.S + 1}")
    sched = schedule.for_training(shape, tcfg, world)
    dtype, attention = precision(tcfg, device.type if device else None)
    try:
        if prepare:
            meta = prepare_data(tcfg, rank, world)
        else:
            meta = data.load_meta(tcfg.data) if (Path(tcfg.data) / "meta.json").exists() else None
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"train.data={tcfg.data!r}: {e}") from None
    if meta is None:
        mcfg = ModelConfig(**{**mvals, "vocab_size": planned_vocab(tcfg.data)})
        return Setup(mcfg=mcfg, tcfg=tcfg, sched=sched, resume=resume, dtype=dtype, attention=attention)
    mcfg = resolve_model_config(mvals, given, meta, tcfg.data)
    train_tokens = data.open_split(tcfg.data, "train", meta)
    data.Loader(train_tokens, mcfg.S, tcfg.seed, tcfg.unique_tokens)  # the windows, and unique_tokens, checked
    val_splits = {s: data.open_split(tcfg.data, s, meta) for s in meta["splits"] if s != "train"}
    short = data.too_short(tcfg.data, meta, val_splits, mcfg.S)
    if short:
        raise ValueError(f"{short}: give it more text, or train with a smaller S")
    if device is not None:
        from harness import parallel  # torch: only a run on this machine needs it
        parallel.check_fits(mcfg, tcfg, sched, world, dtype, device, attention)
        if tcfg.compile:
            check_compile(device.type)
    return Setup(mcfg=mcfg, tcfg=tcfg, sched=sched, resume=resume, dtype=dtype, attention=attention, meta=meta,
                 train_tokens=train_tokens, val_splits=val_splits)


@functools.cache
def check_compile(device_type):
    """torch.compile works on this device (a C++ compiler on CPU, Triton on GPU), tried on a one-line function
    before anything is written: a run that replaces another must not fail at its first step for it."""
    import torch
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device=device_type))
    except Exception as e:  # InductorError, BackendCompilerFailed, a missing compiler: torch raises many kinds
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"train.compile=true: torch.compile does not work on {device_type} here ({type(e).__name__}: "
                         f"{first}); train with --compile=false") from None


def resolve_model_config(mvals, given, meta, data_dir):
    """The [model] table with vocab_size from the data unless given (then it must cover it)."""
    if "vocab_size" in given:
        if mvals["vocab_size"] < meta["vocab_size"]:
            raise ValueError(f"model.vocab_size={mvals['vocab_size']} is smaller than the vocabulary of "
                             f"{data_dir} ({meta['vocab_size']}, tokenizer {meta['tokenizer']})")
    else:
        mvals = {**mvals, "vocab_size": padded_vocab(meta["vocab_size"])}
    return model_config(mvals)


def prepare_data(tcfg, rank, world):
    """meta.json of the run's data; the default corpus is prepared on first use (by rank 0), and again
    when an older data.py prepared it."""
    path = Path(tcfg.data)
    default = {data.default_dir(t): t for t in ("byte", "cl100k_base", "gpt2", "o200k_base")}
    if tcfg.data in default and data.meta_format(path) != data.FORMAT:
        if rank == 0:
            data.prepare_default(tcfg.data, default[tcfg.data], overwrite=True)
        if world > 1:
            import torch.distributed as dist
            dist.barrier()
    return data.load_meta(path)


def precision(tcfg, device_type):
    """(dtype name, attention path) on this kind of device (None: not known yet), refused if impossible."""
    dtype = resolve_dtype(tcfg.dtype, device_type)  # an MoE in float16 takes the padded expert path (expert_path)
    attention = tcfg.attention if tcfg.attention != "auto" else ("flex" if device_type == "cuda" else "sdpa")
    if attention == "flex" and device_type not in ("cuda", None):
        raise ValueError(f"train.attention='flex' on {device_type}: FlexAttention has no backward there; use sdpa")
    return dtype, attention


def planned_vocab(data_dir):
    """The vocabulary a run would have: its data's, rounded as train.py rounds it; cl100k_base's (the
    paper's tokenizer) when the data is not prepared here."""
    prepared = (Path(data_dir) / "meta.json").exists()
    return padded_vocab(data.load_meta(data_dir)["vocab_size"] if prepared else 100277)
