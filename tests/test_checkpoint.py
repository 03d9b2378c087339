"""Checkpoints (checkpoint.py): written whole or not at all, closed by the sha256 hashed as they are written,
verified once on rank 0 and mapped on every rank, and a damaged one (a torn or flipped ckpt.pt, a shard, a
manifest) named and never loaded, on every rank. Resuming from them exactly is test_train.py's and, sharded over
ranks, test_parallel.py's."""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

from harness import checkpoint
from harness import rundir
from harness import safe_io
from tests.conftest import refused, snapshot, tiny

ROOT = Path(__file__).resolve().parent.parent


def test_checkpoint_write_is_atomic_and_a_full_disk_is_named(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.write_file(path, {"step": 1, "w": torch.ones(3)})

    def disk_fills(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_fills)
    with pytest.raises(safe_io.RunDirError, match=r"ckpt.pt: the disk is full \(more bytes needed, [\d,]+ free\); the "
                                                  r"previous ckpt.pt is untouched"):  # the estimate fell short
        checkpoint.write_file(path, {"step": 2, "w": torch.zeros(3)})
    assert checkpoint.load_file(path, 0, 1)["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_the_checksum_is_hashed_as_the_file_is_written_and_is_the_sha256_of_the_file(tmp_path, monkeypatch):
    def no_second_pass(*args, **kwargs):
        raise AssertionError("the file was read back to hash it")
    monkeypatch.setattr(safe_io, "sha256_stream", no_second_pass)
    monkeypatch.setattr(safe_io, "open_plain", no_second_pass)
    path = tmp_path / "ckpt.pt"
    checkpoint.write_file(path, {"step": 1, "w": torch.randn(1000, 100), "many": [torch.ones(7)] * 50})
    raw = path.read_bytes()
    archive, end = raw[:-checkpoint.TRAILER], raw[-checkpoint.TRAILER:]
    assert end == checkpoint.SEAL + hashlib.sha256(archive).hexdigest().encode() + b"\n"
    monkeypatch.undo()
    assert torch.equal(checkpoint.load_file(path, 0, 1)["many"][0], torch.ones(7))


def test_the_free_space_estimate_is_never_short_of_the_file(finished):
    state = torch.load(finished / "ckpt.pt", weights_only=True)  # a whole run's: weights, AdamW, RNG, config
    for obj in (state, {"step": 1, "w": torch.ones(3)}, {"many": [torch.ones(1)] * 300}):
        torch.save(obj, finished / "x.pt")
        assert rundir.saved_bytes(obj) >= (finished / "x.pt").stat().st_size


def test_a_write_past_the_file_size_limit_is_named_in_one_line(tiny_data, tmp_path):
    import resource
    limit = 100_000  # bytes: config.toml and the log fit, the tiny run's checkpoint (~0.5 MB) does not
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny(tiny_data, tmp_path / "r")], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"train.py: error: {tmp_path / 'r' / 'ckpt.pt'}: could not be written (File too large, past the file-size "
        f"limit (ulimit -f)); the previous ckpt.pt is untouched") and "Traceback" not in r.stderr, r.stderr
    assert not list((tmp_path / "r").glob(".*.tmp"))


@pytest.fixture(scope="module")
def stopped(tiny_data, tmp_path_factory):
    """A run stopped with its checkpoint after step 4 of 6 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("stopped") / "r"
    train.train(tiny(tiny_data, out, "--stop_at=4"))
    return out


def damage(kind, path):
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "directory":
        path.unlink()
        path.mkdir()
    elif kind == "seal":  # the closing checksum cut short: the archive itself is whole
        path.write_bytes(path.read_bytes()[:-1])
    elif kind == "flipped":  # one byte inside the tensor data: torch.load alone would not notice
        state = checkpoint.load_file(path, 0, 1)
        raw = bytearray(path.read_bytes())
        needle = state["model"]["wte.weight"][0, :4].numpy().tobytes()
        at = bytes(raw).index(needle)
        raw[at + 1] ^= 0x40
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind,message", [
    ("truncated", "is damaged and was not loaded: it cannot be read"), ("empty", "is damaged and was not loaded"),
    ("text", "is damaged and was not loaded"), ("directory", "is a folder where a run keeps a file"),
    ("seal", "is damaged and was not loaded: its closing checksum is cut or damaged"),
    ("flipped", "is damaged and was not loaded: its contents do not match the checksum")])
def test_a_damaged_checkpoint_is_named_and_never_loaded(stopped, tiny_data, tmp_path, capsys, kind, message):
    shutil.copytree(stopped, tmp_path / "r")
    ckpt = tmp_path / "r" / "ckpt.pt"
    damage(kind, ckpt)
    before = snapshot(tmp_path / "r")
    err = refused(train.main, tiny(tiny_data, tmp_path / "r") + ["--resume"], capsys)
    assert f"{ckpt} {message}" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path / "r") == before


def test_a_checkpoint_of_an_earlier_train_py_still_resumes(stopped, finished_once, tiny_data, tmp_path, capsys):
    # an earlier train.py kept the checksum as a field over the contents: its run resumes to the same end as
    # today's, and such a file with a flipped byte is refused
    shutil.copytree(stopped, tmp_path / "r")
    ckpt = tmp_path / "r" / "ckpt.pt"
    state = {k: v for k, v in torch.load(ckpt, weights_only=True).items()}
    torch.save({**state, "sha256": rundir.checksum(state).hexdigest()}, ckpt)
    shutil.copytree(tmp_path / "r", tmp_path / "flipped")
    damage("flipped", tmp_path / "flipped" / "ckpt.pt")
    err = refused(train.main, tiny(tiny_data, tmp_path / "flipped") + ["--resume"], capsys)
    assert "ckpt.pt is damaged and was not loaded: its contents do not match the checksum" in err
    resumed = train.train(tiny(tiny_data, tmp_path / "r") + ["--resume"])
    assert resumed["final"] == json.loads((finished_once / "summary.json").read_text())["final"]


def test_a_checkpoint_that_cannot_be_mapped_is_read_instead(stopped, monkeypatch):
    # some file systems refuse mmap: the verified file is then read into memory, not called damaged
    load = torch.load
    def no_mmap(f, *a, mmap=False, **kw):
        if mmap:
            raise RuntimeError("mmap: operation not supported")
        return load(f, *a, **kw)
    monkeypatch.setattr(torch, "load", no_mmap)
    assert checkpoint.load_file(stopped / "ckpt.pt", 0, 1)["step"] == 4


def on_two_ranks(fn, tmp_path, *args):
    """fn(rank, store, *args) on two gloo ranks (spawned processes); each returns a JSON value, given back as
    [rank 0's, rank 1's]. A rank that hangs fails the test within a minute."""
    import torch.multiprocessing as mp
    context = mp.spawn(fn, args=(tmp_path, *args), nprocs=2, join=False)
    for _ in range(120):
        if context.join(timeout=0.5):
            break
    else:
        for proc in context.processes:
            proc.kill()
        raise AssertionError("a rank hung")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def resume_on_rank(rank, tmp_path, out):
    """One rank reading the checkpoint in out as a resume does, counting the bytes it hashed and the files it
    loaded; it writes (those counts, a digest of the weights and AdamW state, or the error) to rank<r>.json."""
    import torch.distributed as dist
    from datetime import timedelta
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=rank, world_size=2,
                           timeout=timedelta(seconds=30))
    hashed, loads = [], []
    stream, mapped = safe_io.sha256_stream, checkpoint.mapped
    safe_io.sha256_stream = lambda f, size=None: hashed.append(size) or stream(f, size)
    checkpoint.mapped = lambda path: loads.append(str(path)) or mapped(path)
    try:
        _, _, state = checkpoint.read(out, rank, 2)
        got = {"digest": digest({"model": state["model"], "optimizer": state["optimizer"]})}
    except safe_io.RunDirError as e:
        got = {"error": str(e)}
    (tmp_path / f"rank{rank}.json").write_text(json.dumps({**got, "hashed": hashed, "loads": loads}))
    dist.destroy_process_group()


def digest(obj):
    """A sha256 over nested dicts and lists of tensors and plain values."""
    h = hashlib.sha256()
    for key, value in sorted(torch.utils._pytree.tree_flatten_with_path(obj)[0], key=lambda kv: str(kv[0])):
        h.update(str(key).encode())
        h.update(value.numpy().tobytes() if isinstance(value, torch.Tensor) else repr(value).encode())
    return h.hexdigest()


@pytest.mark.slow  # two spawned gloo ranks, as every multi-rank test
def test_two_ranks_resume_from_one_verification_and_get_identical_state(stopped, tmp_path):
    ckpt = stopped / "ckpt.pt"
    ranks = on_two_ranks(resume_on_rank, tmp_path, stopped)
    assert ranks[0]["hashed"] == [ckpt.stat().st_size - checkpoint.TRAILER] and ranks[1]["hashed"] == []
    assert ranks[0]["loads"] == ranks[1]["loads"] == [str(ckpt)]
    state = checkpoint.load_file(ckpt, 0, 1)
    assert ranks[0]["digest"] == ranks[1]["digest"] == digest({"model": state["model"], "optimizer": state["optimizer"]})


@pytest.mark.slow
def test_a_damaged_checkpoint_stops_both_ranks_with_the_same_line(stopped, tmp_path):
    shutil.copytree(stopped, tmp_path / "r")
    ckpt = tmp_path / "r" / "ckpt.pt"
    damage("flipped", ckpt)
    ranks = on_two_ranks(resume_on_rank, tmp_path, tmp_path / "r")
    line = f"{ckpt} is damaged and was not loaded: its contents do not match the checksum saved with them"
    assert ranks[0]["error"] == ranks[1]["error"] == line
    assert ranks[0]["loads"] == ranks[1]["loads"] == [] and len(ranks[0]["hashed"]) == 1 and ranks[1]["hashed"] == []


def test_a_restored_adamw_owns_its_state_and_maps_no_checkpoint(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    weights, adam = checkpoint.model_and_optimizer(model, optimizer, full=True)
    checkpoint.write_file(tmp_path / "ckpt.pt", {"model": weights, "optimizer": adam})
    state = checkpoint.load_file(tmp_path / "ckpt.pt", 0, 1)  # mapped: its tensors are the file's pages
    model.zero_grad(set_to_none=True)  # as train.py leaves a step
    fresh = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    class Loader:
        def load_state_dict(self, state):
            pass
    state |= {"scaler": scaler.state_dict(), "loader": {}, "rng": {"cpu": torch.get_rng_state()}, "step": 1}
    checkpoint.restore("pt", tmp_path, state, model, fresh, scaler, Loader(), torch.device("cpu"))
    file_pages = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(state["optimizer"])
                  if isinstance(t, torch.Tensor)}
    held = [t for s in fresh.state.values() for t in s.values()]
    assert len(held) == 6 and not file_pages & {t.untyped_storage().data_ptr() for t in held}
    assert digest(checkpoint.model_and_optimizer(model, fresh, full=True)[1]) == digest(adam)


def test_a_manifest_must_list_every_file_of_its_checkpoint(tiny_data, tmp_path):
    folder = tmp_path / "ckpt" / "step-00000006"
    folder.mkdir(parents=True)
    for name in ("extra.pt", ".metadata", "__0_0.distcp"):
        (folder / name).write_bytes(name.encode())
    files = {"extra.pt": safe_io.sha256_file(folder / "extra.pt")}
    with pytest.raises(safe_io.RunDirError, match=r"does not list \.metadata(.|\n)*__0_0.distcp is not listed"):
        checkpoint.verify(folder, {"step": 6, "dir": folder.name, "files": files}, 0, 1)


def test_a_manifest_that_points_outside_its_folder_is_refused(finished, tiny_data):
    (finished / "ckpt").mkdir()
    (finished / "ckpt" / "latest.json").write_text(json.dumps({"step": 3, "dir": "../../elsewhere", "files": {}}))
    with pytest.raises(safe_io.RunDirError, match="latest.json is damaged and was not loaded"):
        train.train(tiny(tiny_data, finished) + ["--resume"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the shards read back on one process
def test_a_damaged_shard_is_named_and_not_loaded(fsdp_half, tmp_path, capsys):
    shutil.copytree(fsdp_half, tmp_path / "a")  # 2 FSDP ranks stopped at step 6
    shard = tmp_path / "a" / "ckpt" / "step-00000006" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert "__1_0.distcp is damaged" in refused(train.main, [f"--out_dir={tmp_path / 'a'}", "--resume"], capsys)
    (tmp_path / "a" / "ckpt" / "latest.json").write_text("{not json")
    with pytest.raises(safe_io.RunDirError, match="latest.json is damaged"):
        train.train([f"--out_dir={tmp_path / 'a'}", "--resume"])


def test_a_resumed_adamw_keeps_this_codes_kernel_not_the_checkpoints(tmp_path):
    # a checkpoint saved by an unfused AdamW (before AdamW was fused on CPU) would make the group unfused again,
    # and a GradScaler built for the fused optimizer then fails its first step
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(scheme="dense", L=1, Dm=16, H=2, Dh=8, Dffn=32, S=8, vocab_size=16))
    old = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=False)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    old.step()
    weights, adam = checkpoint.model_and_optimizer(model, old, full=True)
    old.zero_grad(set_to_none=True)  # as train.py leaves a step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=True)

    class Loader:
        def load_state_dict(self, state):
            pass
    state = {"model": weights, "optimizer": adam, "scaler": scaler.state_dict(), "loader": {},
             "rng": {"cpu": torch.get_rng_state()}, "step": 1}
    assert checkpoint.restore("pt", tmp_path, state, model, optimizer, scaler, Loader(), torch.device("cpu")) == 1
    assert all(g["fused"] for g in optimizer.param_groups)
    scaler.scale(model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1]).backward()
    scaler.step(optimizer)  # AssertionError in torch's unfused AdamW without the fix
    scaler.update()


class FailingFile:
    """A file whose writes fail with one OSError, as a full disk, a file-size limit or a bad disk makes them."""

    def __init__(self, f, code):
        self.f, self.code = f, code

    def write(self, data):
        raise OSError(self.code, os.strerror(self.code))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a file descriptor's path in /proc")
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EIO], ids=["full", "ulimit", "io-error"])
@pytest.mark.parametrize("target", ["config.toml", "log.jsonl", "ckpt.pt", "summary.json"])
def test_every_file_of_a_run_that_fails_to_be_written_is_named_in_one_line(tiny_data, tmp_path, monkeypatch, capsys,
                                                                           target, code):
    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name  # the file itself, or its atomic write's temporary
        return FailingFile(f, code) if name == target or name.startswith(f".{target}.") else f
    monkeypatch.setattr(os, "fdopen", fdopen)
    err = refused(train.main, tiny(tiny_data, tmp_path / "r"), capsys)
    says = {errno.ENOSPC: "the disk is full", errno.EFBIG: "past the file-size limit (ulimit -f)",
            errno.EIO: "could not be written (Input/output error)"}[code]
    assert err.strip().splitlines()[-1].startswith(f"train.py: error: {tmp_path / 'r' / target}: ") and says in err, err
