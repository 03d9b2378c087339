"""Checkpoints (checkpoint.py, and rundir.py's checksummed ckpt.pt): written whole or not at all, and a damaged
one (a torn or flipped ckpt.pt, a shard, a manifest) named and never loaded. Resuming from them exactly is
test_train.py's and, sharded over ranks, test_parallel.py's."""
import errno
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
    rundir.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def disk_fills(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_fills)
    with pytest.raises(safe_io.RunDirError, match=r"ckpt.pt: the disk is full \(more bytes needed, [\d,]+ free\); the "
                                                  r"previous ckpt.pt is untouched"):  # the estimate fell short
        rundir.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert rundir.read_checkpoint(path)["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


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
    elif kind == "flipped":  # one byte inside the tensor data: torch.load alone would not notice
        state = rundir.read_checkpoint(path)
        raw = bytearray(path.read_bytes())
        needle = state["model"]["wte.weight"][0, :4].numpy().tobytes()
        at = bytes(raw).index(needle)
        raw[at + 1] ^= 0x40
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind,message", [
    ("truncated", "is damaged and was not loaded: it cannot be read"), ("empty", "is damaged and was not loaded"),
    ("text", "is damaged and was not loaded"), ("directory", "is a folder where a run keeps a file"),
    ("flipped", "is damaged and was not loaded: its contents do not match the checksum")])
def test_a_damaged_checkpoint_is_named_and_never_loaded(stopped, tiny_data, tmp_path, capsys, kind, message):
    shutil.copytree(stopped, tmp_path / "r")
    ckpt = tmp_path / "r" / "ckpt.pt"
    damage(kind, ckpt)
    before = snapshot(tmp_path / "r")
    err = refused(train.main, tiny(tiny_data, tmp_path / "r") + ["--resume"], capsys)
    assert f"{ckpt} {message}" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path / "r") == before


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
