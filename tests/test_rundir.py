"""rundir.py: one writer per run folder (the lock, its holder named, taken over from a dead one), no link
written through, and an --overwrite killed halfway finished or undone by the next start; run_guard.py: the
folder held for a run and given back however it ends."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train

from harness import rundir
from harness import safe_io
from tests.conftest import refused, snapshot, tiny

ROOT = Path(__file__).resolve().parent.parent


def test_a_second_writer_is_refused_with_the_holders_pid(tiny_data, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time, sys; from harness import rundir; rundir.Lock(sys.argv[1]).acquire(); "
                               "print('held', flush=True); time.sleep(60)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert f"is in use by process {holder.pid}" in refused(train.main, tiny(tiny_data, out), capsys)
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: the lock is taken over, and that is said
    train.train(tiny(tiny_data, out))
    assert f"the last writer (process {holder.pid}" in capsys.readouterr().err


def test_a_lock_that_is_a_link_is_refused_and_its_target_untouched(tiny_data, tmp_path, capsys):
    victim = tmp_path / "precious.txt"
    victim.write_text("do not truncate me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(victim)
    err = refused(train.main, tiny(tiny_data, tmp_path / "run"), capsys)
    assert ".lock is a symbolic link" in err and victim.read_text() == "do not truncate me"


def test_atomic_writes_never_write_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    path = tmp_path / "file.json"
    (tmp_path / f".file.json.{os.getpid()}.tmp").symlink_to(victim)  # a leftover temporary name, now a link
    safe_io.write_text(path, "new")
    assert path.read_text() == "new" and victim.read_text() == "keep" and not path.is_symlink()
    path.unlink()
    path.symlink_to(victim)
    with pytest.raises(safe_io.RunDirError, match="is a symbolic link"):
        safe_io.write_text(path, "through the link")
    assert victim.read_text() == "keep"


def test_a_killed_overwrite_is_finished_or_undone_by_the_next_start(finished, tiny_data, capsys):
    before = snapshot(finished)
    # killed after the old run was moved aside, before the new one wrote its config: the old run comes back
    aside = rundir.Aside(finished)
    aside.move(rundir.check_new_run(finished, overwrite=True))
    assert not (finished / "config.toml").exists()
    err = refused(train.main, tiny(tiny_data, finished), capsys)
    assert "the old run is put back" in err and "holds a run" in err and snapshot(finished) == before
    # killed after the new run wrote its config: the old run was due for deletion, and goes
    aside.move(rundir.check_new_run(finished, overwrite=True))
    (finished / "config.toml").write_text((finished / ".replaced" / "config.toml").read_text())
    summary = train.train(tiny(tiny_data, finished, "--overwrite=true", "--seed=3"))
    assert summary["finished"] and not (finished / ".replaced").exists()


def test_the_run_directory_is_held_for_the_run_and_given_back_however_it_ends(finished, tiny_data):
    from harness import run_guard
    before = snapshot(finished)
    # --overwrite: the old run is moved aside while the new one runs; the new run fails before its config: put back
    with pytest.raises(RuntimeError, match="the new run failed"):
        with run_guard.protect(finished, resume=False, overwrite=True) as aside:
            assert aside.path.is_dir() and not (finished / "config.toml").exists()
            with pytest.raises(safe_io.RunDirError, match="is in use by process"):
                rundir.Lock(finished).acquire()  # held
            raise RuntimeError("the new run failed")
    assert snapshot(finished) == before and not (finished / ".lock").exists()  # put back, the lock released and gone
    # a rank other than 0 refuses what rank 0 would, and takes no hold
    with pytest.raises(safe_io.RunDirError, match="holds a run"):
        with run_guard.protect(finished, resume=False, overwrite=False, rank=1):
            pass
    with run_guard.protect(finished, resume=True, overwrite=False, rank=1) as aside:
        assert aside is None and not (finished / ".lock").exists()
