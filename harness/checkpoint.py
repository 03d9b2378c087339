"""A run's checkpoint, whole or sharded, and the one place where a resume is checked.

    ckpt.pt            one process or DDP: rank 0 writes everything (write_file: torch.save's archive, then
                       its sha256, hashed as the archive was written)
    ckpt/step-<n>/     FSDP: torch.distributed.checkpoint (DCP) writes each rank's shards, rank 0 extra.pt
                       (loader, RNG, step, schedule, config; written as ckpt.pt is)
    ckpt/latest.json   names the last whole step-<n>/ with the sha256 of each of its files. It is written
                       last and atomically, so a save killed halfway leaves the previous step loadable.

Weights and AdamW state go through torch.distributed.checkpoint.state_dict, keyed by parameter name,
so either form loads into a plain, DDP or FSDP model on any number of ranks: DCP reshards the shards
to whatever the new ranks hold. Whether the trajectory may continue is decided by check() alone.

A resume reads a checkpoint file's bytes once: rank 0 hashes it and tells every rank the verdict, then every
rank maps the file (torch.load mmap=True), so the ranks of one machine share its pages in the page cache.
"""
import json
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

import data

from harness import config
from harness import rundir
from harness import safe_io

SHARDED = "ckpt"


def found(out, rank, world):
    """The newest checkpoint in out: ('pt', path, None, its state when it was loaded to tell) or ('dcp', folder,
    manifest, None), or None."""
    out = Path(out)
    whole = out / "ckpt.pt"
    safe_io.refuse_link(whole)
    safe_io.refuse_link(out / SHARDED)
    manifest = read_manifest(out / SHARDED)
    if manifest and whole.exists():  # a kill between writing one form and deleting the other: the newer
        state = load_file(whole, rank, world)
        if not rundir.is_count(state.get("step")):
            raise safe_io.RunDirError(f"{whole} was not loaded: it has no valid step (not a checkpoint of this train.py)")
        if state["step"] > manifest["step"]:
            return "pt", whole, None, state
    if manifest:
        return "dcp", out / SHARDED / manifest["dir"], manifest, None
    return ("pt", whole, None, None) if whole.exists() else None


def read_manifest(folder):
    """ckpt/latest.json: the step, its folder step-<n> and the sha256 of each of its files (plain names)."""
    path = Path(folder) / "latest.json"
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        manifest = json.loads(safe_io.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError, RecursionError):
        manifest = None
    if (isinstance(manifest, dict) and rundir.is_count(manifest.get("step"))
            and manifest.get("dir") == f"step-{manifest['step']:08d}" and isinstance(manifest.get("files"), dict)
            and all(re.fullmatch(r"[\w.]+", k) and k.strip(".") and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
                    for k, v in manifest["files"].items())):
        safe_io.refuse_link(Path(folder) / manifest["dir"])
        return manifest
    raise safe_io.RunDirError(f"{path} is damaged and was not loaded: it does not name a checkpoint")


# ----------------------------------------------------------------------------- the check
def check(state, path, mcfg, tcfg, meta, sched):
    """The one place a resume is checked: the checkpoint must continue the identical trajectory, with the
    same model, trajectory keys, data (by content) and schedule, on any number of ranks (the schedule does not
    depend on it). Anything else is refused, every difference named. Returns a note when the data is the
    run's by content under another path, else None."""
    saved = state["schedule"]
    keys = [k for k in config.TRAJECTORY if k not in config.BY_CONTENT]
    diff = config.changed_keys(state["config"], mcfg, tcfg, keys, then="checkpoint")
    diff += data.changed_data(state["data"], meta, tcfg.data)
    diff += [f"schedule {k}: checkpoint {saved.get(k)!r}, now {v!r} (the checkpoint ran on {state['world']} "
             f"rank(s))" for k, v in sched.trajectory().items() if saved.get(k) != v]
    if diff:
        raise ValueError(f"{path} is from another config:\n  " + "\n  ".join(diff))
    return data.moved_note(state["config"]["train"].get("data"), tcfg.data)


def looks_like_ours(path):
    """Whether ckpt.pt is a checkpoint of train.py: closed by a sha256 (not checked here), or holding one as a
    field (an earlier train.py's), and with its fields (read without loading the tensors)."""
    try:
        with safe_io.open_plain(path) as f:
            sealed = seal_of(f) is not None
        state = mapped(path)
    except (OSError, safe_io.RunDirError):  # unreadable, or not a torch file: not ours
        return False
    return (sealed or "sha256" in state) and state_problem(state, whole=True) is None


def state_problem(state, whole):
    """What makes a checksummed checkpoint unusable here, or None (a file of another program, say)."""
    want = {"step": int, "world": int, "schedule": dict, "config": dict, "data": dict, "loader": dict, "rng": dict,
            "scaler": dict} | ({"model": dict, "optimizer": dict} if whole else {})
    bad = [k for k, t in want.items() if not isinstance(state.get(k), t)]
    if not bad and not all(isinstance(state["config"].get(k), dict) for k in ("model", "train")):
        bad = ["config"]
    return f"it has no valid {', '.join(bad)}" if bad else None


# ----------------------------------------------------------------------------- saving
def model_and_optimizer(model, optimizer, full):
    """Weights and AdamW state keyed by parameter name: whole tensors (full) or this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=full, cpu_offload=full))


def save(out, sharded, model, optimizer, extra, rank, world):
    """Write step extra['step'] in the run's form (sharded under FSDP), then delete the other form.
    Returns the path written."""
    out = Path(out)
    if not sharded:
        weights, adam = model_and_optimizer(model, optimizer, full=True)
        if rank == 0:
            write_file(out / "ckpt.pt", {"model": weights, "optimizer": adam, **extra})
            remove_sharded(out / SHARDED)
        return out / "ckpt.pt"
    import torch.distributed.checkpoint as dcp
    name = f"step-{extra['step']:08d}"
    folder = out / SHARDED / name
    if rank == 0:  # a folder of this step from a save that was killed: written again from nothing
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    dist.barrier()
    weights, adam = model_and_optimizer(model, optimizer, full=False)
    try:
        dcp.save({"model": weights, "optimizer": adam}, checkpoint_id=folder)
    except dcp.api.CheckpointException as e:  # a full disk on some rank, say (a BaseException: named here)
        raise safe_io.RunDirError(f"{folder}: the sharded checkpoint could not be written ({str(e)[:300]}); the "
                                 f"previous one, named in {out / SHARDED / 'latest.json'}, is untouched") from None
    if rank == 0:
        write_file(folder / "extra.pt", extra)
    dist.barrier()  # every rank's files are written and synced (DCP fsyncs them)
    mine = {p.name: safe_io.sha256_file(p) for p in sorted(folder.iterdir()) if p.name.startswith(f"__{rank}_")}
    if rank == 0:
        mine.update({p.name: safe_io.sha256_file(p) for p in (folder / ".metadata", folder / "extra.pt")})
    hashes = [None] * world
    dist.all_gather_object(hashes, mine)
    if rank == 0:
        files = {k: v for h in hashes for k, v in h.items()}
        safe_io.write_text(out / SHARDED / "latest.json", json.dumps({"step": extra["step"], "dir": name,
                                                                     "world": world, "files": files}, indent=1))
        for old in (out / SHARDED).glob("step-*"):  # the previous step, and any half-written one
            if old.name != name and rundir.CKPT_ENTRY.fullmatch(old.name):
                shutil.rmtree(old, ignore_errors=True)
        (out / "ckpt.pt").unlink(missing_ok=True)
    dist.barrier()
    return folder


SEAL = b"\nmoe-equal sha256 "  # closes a checkpoint file: after torch.save's archive, SEAL, its sha256 in hex, "\n"
TRAILER = len(SEAL) + 64 + 1  # bytes after the archive (torch.load finds the archive by its end record: it reads past them)


def write_file(path, state):
    """torch.save(state) to path atomically (refused before writing if the disk cannot hold it), closed by the
    sha256 of the archive's bytes, hashed as torch.save writes them: one pass over the data."""
    def write(f):
        hashed = safe_io.HashingWriter(f)
        torch.save(state, hashed)
        f.write(SEAL + hashed.sha256.hexdigest().encode() + b"\n")
    safe_io.atomic_write(path, write, needed=rundir.saved_bytes(state) + TRAILER)


def seal_of(f):
    """The sha256 (hex) that closes the open checkpoint file f, or None when it has none."""
    size = os.fstat(f.fileno()).st_size
    if size < TRAILER:
        return None
    f.seek(size - TRAILER)
    end = f.read(TRAILER)
    digest = end[len(SEAL):-1]
    if end.startswith(SEAL) and end.endswith(b"\n") and re.fullmatch(rb"[0-9a-f]{64}", digest):
        return digest.decode()
    return None


def torn_seal(f):
    """Whether the end of the open file f holds the seal's words without a whole seal (a cut or damaged end)."""
    size = os.fstat(f.fileno()).st_size
    f.seek(max(0, size - 2 * TRAILER))
    return SEAL.strip() in f.read()


def file_problem(path):
    """Why the file at path is not a checkpoint of this train.py as it was written (one line naming it), or
    None: its archive is hashed in one streamed pass and compared with the sha256 that closes it. Nothing in
    it is loaded."""
    try:
        with safe_io.open_plain(path) as f:
            saved = seal_of(f)
            if saved is None and torn_seal(f):  # torn_seal seeks to what it reads
                return f"{path} is damaged and was not loaded: its closing checksum is cut or damaged"
            f.seek(0)
            if saved is None and zipfile.is_zipfile(f):
                return earlier_format_problem(path)
            if saved is None:
                return f"{path} is damaged and was not loaded: it cannot be read as a checkpoint (not a whole torch file)"
            f.seek(0)
            if safe_io.sha256_stream(f, os.fstat(f.fileno()).st_size - TRAILER) != saved:
                return f"{path} is damaged and was not loaded: its contents do not match the checksum saved with them"
    except safe_io.RunDirError as e:  # a link, a directory, a FIFO
        return str(e)
    except OSError as e:
        return f"{path} was not loaded: it could not be read ({e.strerror or e})"
    return None


def earlier_format_problem(path):
    """Why a torch file without a closing sha256 is not a checkpoint of train.py, or None. An earlier train.py
    kept the checksum as a field, over the contents (rundir.checksum): checked over the mapped file, each
    tensor read once, so that its run still resumes."""
    state = mapped(path)
    if "sha256" not in state:
        return f"{path} has no checksum: it is not a checkpoint of this train.py (or an older one's)"
    saved = state.pop("sha256")
    if rundir.checksum(state).hexdigest() != saved:
        return f"{path} is damaged and was not loaded: its contents do not match the checksum saved with them"
    return None


def decided_on_rank0(problem_of, rank, world):
    """problem_of() computed on rank 0 alone and handed to every rank: one read of the file, one verdict, and
    no rank left waiting when rank 0 fails."""
    try:
        verdict = [problem_of() if rank == 0 else None]
    except Exception as e:
        verdict = [f"the checkpoint was not verified: {type(e).__name__}: {e}"]
    if world > 1:
        dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def mapped(path):
    """The checkpoint file at path, loaded with weights_only and mmap=True: its tensors are the file's pages
    (copy on write), read when used and shared through the page cache by every process that maps it. Where
    the file cannot be mapped (some network file systems), it is read into memory instead."""
    try:
        with safe_io.open_plain(path) as f:  # torch.load maps a path: on Linux, the very file opened here
            fd = f"/proc/self/fd/{f.fileno()}"
            try:
                state = torch.load(fd if os.path.exists(fd) else path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # not mappable, or not a torch archive: the plain load tells which
                f.seek(0)
                state = torch.load(f, map_location="cpu", weights_only=True)
    except safe_io.RunDirError:
        raise
    except Exception as e:  # not a torch archive: torch raises many kinds
        raise safe_io.RunDirError(f"{path} is damaged and was not loaded: it cannot be read as a checkpoint "
                                  f"({type(e).__name__}: {str(e).strip()[:120]})") from None
    if not isinstance(state, dict):
        raise safe_io.RunDirError(f"{path} was not loaded: it holds no dict (not a checkpoint of this train.py)")
    return state


def load_file(path, rank, world):
    """A checkpoint file, verified once (file_problem on rank 0, the verdict on every rank, so that a damaged
    file stops every rank with the same line) and then mapped on every rank; a rank that cannot read it
    (a node that does not see the file) stops every rank, naming it, rather than leaving them waiting."""
    problem = decided_on_rank0(lambda: file_problem(path), rank, world)
    if problem:
        raise safe_io.RunDirError(problem)
    state = None
    try:
        state = mapped(path)
    except safe_io.RunDirError as e:
        problem = f"rank {rank}: {e}" if world > 1 else str(e)
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise safe_io.RunDirError(problem)
    return state


def remove_sharded(folder):
    """Delete the sharded checkpoints in folder (step-<n>/, latest.json), then folder if nothing else is there:
    what checkpoint.save did not write is left alone (rundir.check_run_files refuses such a folder first)."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for p in folder.iterdir():
        if rundir.CKPT_ENTRY.fullmatch(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


# ----------------------------------------------------------------------------- loading
def verify(folder, manifest, rank, world):
    """Every rank hashes a share of the files against the manifest; any mismatch is named, on every rank."""
    names = sorted(manifest["files"])
    held = sorted(p.name for p in folder.iterdir() if not rundir.TEMPORARY.fullmatch(p.name)) if folder.is_dir() else []
    bad = []
    if rank == 0:  # a manifest that leaves files out would hand DCP half a checkpoint
        bad += [f"{folder.parent / 'latest.json'} does not list {n}" for n in (".metadata", "extra.pt") if n not in names]
        bad += [f"{folder / n} is not listed in {folder.parent / 'latest.json'}" for n in held if n not in names]
    for name in names[rank::world]:
        path = folder / name
        if not path.exists():
            bad.append(f"{path} is missing")
        elif safe_io.sha256_file(path) != manifest["files"][name]:
            bad.append(f"{path} is damaged: its contents do not match the sha256 in {folder.parent / 'latest.json'}")
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, bad)
        bad = [b for rank_bad in every for b in rank_bad]
    if bad:
        raise safe_io.RunDirError("the checkpoint was not loaded:\n  " + "\n  ".join(bad))


def read(out, rank, world):
    """(form, path, state without weights) of the newest checkpoint in out, verified; None when there is none."""
    got = found(out, rank, world)
    if got is None:
        return None
    form, path, manifest, state = got
    if form == "dcp":
        verify(path, manifest, rank, world)
    file = path if form == "pt" else path / "extra.pt"
    if state is None:
        state = load_file(file, rank, world)
    problem = state_problem(state, whole=form == "pt")
    if problem:
        raise safe_io.RunDirError(f"{file} was not loaded: {problem} (not a checkpoint of this train.py)")
    return form, path, state


def saved_config(out):
    """(the {model, train} config the newest checkpoint in out holds, where it is), verified as a resume
    verifies it; (None, None) when there is no checkpoint."""
    got = read(out, 0, 1)
    if got is None:
        return None, None
    _, path, state = got
    return state["config"], f"{path} (step {state['step']})"


def restore(form, path, state, model, optimizer, scaler, loader, device):
    """Load the weights and AdamW state into the model as it is now (plain, DDP or FSDP), then the rest."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    if form == "pt":
        weights, adam, full = state["model"], state["optimizer"], True
    else:
        import torch.distributed.checkpoint as dcp
        weights, adam = model_and_optimizer(model, optimizer, full=False)
        both = {"model": weights, "optimizer": adam}
        with warnings.catch_warnings():  # one process reading a sharded checkpoint: what is meant here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(both, checkpoint_id=path)
        weights, adam, full = both["model"], both["optimizer"], False
    # the checkpoint brings AdamW's state, not the kernel that steps it: a group's saved fused/foreach would
    # override this code's choice (and a fused=False group under a GradScaler made for fused=True fails)
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=adam,
                   options=StateDictOptions(full_state_dict=full))
    if form == "pt":
        own_memory(optimizer)
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)
    scaler.load_state_dict(state["scaler"])
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng"]["cpu"])
    if device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return state["step"]


def own_memory(optimizer):
    """AdamW's state copied into memory of its own, one tensor at a time. set_state_dict keeps the tensors it is
    given, which map ckpt.pt: the mapping would last the whole run and hold the file's disk space after the next
    save replaces it. The weights are copied into the model's parameters already."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":  # on a GPU: copied there already
                state[key] = value.clone()


def autocast_of(state, device):
    """The autocast a checkpoint's run trained under on this kind of device: sampling and evaluation use the
    run's precision (on CUDA, fp32 would send the MoE to torch's slow grouped-GEMM fallback)."""
    from harness import parallel
    return parallel.autocast_for(device, config.resolve_dtype(state["config"]["train"].get("dtype", "auto"), device.type))


def load_model(run_dir, device="cpu"):
    """(GPT in eval mode, the checkpoint's state without weights) from a run directory's newest checkpoint,
    whole or sharded, on one process: for sampling and evaluation, not for resuming."""
    from model import GPT, GPTConfig
    if not str(run_dir).strip():
        raise FileNotFoundError("run_dir '': expected a run directory written by train.py")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    got = read(run_dir, 0, 1)
    if got is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint in it (ckpt.pt or ckpt/latest.json)")
    form, path, state = got
    model = GPT(GPTConfig(**state["config"]["model"]))
    if form == "pt":
        weights = state.pop("model")
    else:
        import torch.distributed.checkpoint as dcp
        weights = {"model": model.state_dict()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(weights, checkpoint_id=path)
        weights = weights["model"]
    model.load_state_dict(weights)
    state.pop("optimizer", None)
    return model.to(device).eval(), state
