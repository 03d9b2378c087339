"""trackers.py: TensorBoard and W&B get log.jsonl's numbers with the step, the tokens and the FLOPs; a resumed run
appends to the same TensorBoard folder and W&B run; a tracker changes nothing of the trajectory, and one that
fails warns once while training goes on; a missing package is refused before any work; sweep.py names and
groups its runs."""
import json
import os
import re
from pathlib import Path

import pytest

import train

from harness import rundir
from harness import sweep_plan
from harness import trackers
from harness.config import TrainConfig
from tests.conftest import refused, tiny

TIMING = ("tokens_per_s", "data_share", "mfu", "peak_mem_gib")  # what two runs of one trajectory may differ in


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def trajectory(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records(out)]


def tensorboard_scalars(folder):
    """{tag: [(step, value)]} as TensorBoard itself reads the folder (stale events of a killed run purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_holds_the_log_and_a_resumed_run_appends_to_it(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter
    out, plain = tmp_path / "tb-run", tmp_path / "plain"
    train.main(tiny(tiny_data, out, "--tensorboard=true", "--stop_at=3"))
    with SummaryWriter(str(out / "tb")) as w:  # what a run killed after its checkpoint at 3 would have logged
        w.add_scalar("train/loss", 99.0, 4)
    train.main(["--out_dir=" + str(out), "--resume"])
    train.main(tiny(tiny_data, plain))
    assert trajectory(out) == trajectory(plain)  # the trackers are no part of the trajectory
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 3  # one folder, a file per process
    got = tensorboard_scalars(out / "tb")
    M_train = json.loads((out / "summary.json").read_text())["M_train"]
    train_recs = [r for r in records(out) if r["kind"] == "train"]
    for key in ("loss", "ce", "balance", "grad_norm", "lr", "epoch"):
        assert got[f"train/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in train_recs], key
    assert got["train/load_max_over_mean/layer0"] == [(r["step"], pytest.approx(r["load_max_over_mean"][0], rel=1e-6))
                                                      for r in train_recs]
    assert [s for s, _ in got["train/tokens_per_s"]] == [1, 2, 3, 4, 5, 6]  # 99 at step 4 was purged
    evals = [r for r in records(out) if r["kind"] == "eval"]
    assert got["eval/bpc_val"] == [(r["step"], pytest.approx(r["bpc_val"], rel=1e-6)) for r in evals]
    assert [s for s, _ in got["eval/bpc_val"]] == [3, 6] and "eval/loss" not in got  # logged once, as train/loss
    tokens = dict(got["tokens"])
    assert tokens == {r["step"]: r["tokens"] for r in train_recs}
    assert dict(got["flops"]) == {s: pytest.approx(t * M_train, rel=1e-6) for s, t in tokens.items()}


@pytest.mark.slow
def test_wandb_offline_keeps_its_run_in_the_run_directory_and_a_resume_continues_it(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing of W&B outside tmp_path
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    out = tmp_path / "run"
    train.main(tiny(tiny_data, out, "--wandb=true", "--stop_at=3"))
    run_id = json.loads((out / "wandb.json").read_text())["id"]
    train.main(["--out_dir=" + str(out), "--resume"])
    assert json.loads((out / "wandb.json").read_text())["id"] == run_id
    # offline-run-<time>-<id>; a second sitting in the same second gets W&B's "-1" after the id
    name = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?")
    parts = sorted(p for p in (out / "wandb").iterdir() if name.fullmatch(p.name))
    assert len(parts) == 2 and all((p / f"run-{run_id}.wandb").stat().st_size for p in parts)  # one run, in two sittings
    assert sorted(p.name for p in (out / "wandb").iterdir() if p.name.startswith(("run-", "offline-run-"))) == \
        [p.name for p in parts]
    # --overwrite: a new run, a new W&B run; the old one's files go with the old run
    train.main(tiny(tiny_data, out, "--wandb=true", "--overwrite=true"))
    new_id = json.loads((out / "wandb.json").read_text())["id"]
    assert new_id != run_id and [p.name.rsplit("-", 1)[1] for p in (out / "wandb").glob("offline-run-*")] == [new_id]


class FakeRun:
    def __init__(self, calls, **kw):
        self.calls = calls
        calls.append(("init", kw))

    def define_metric(self, name, **kw):
        self.calls.append(("define_metric", name, kw))

    def log(self, values):
        self.calls.append(("log", values))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_gets_the_config_the_names_and_every_record(tiny_data, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun(calls, **kw))
    out = tmp_path / "my-run"
    train.main(tiny(tiny_data, out, "--wandb=true", "--wandb_project=proj", "--wandb_group=grp"))
    init = calls[0][1]
    assert (init["project"], init["name"], init["group"], init["resume"], init["dir"]) == \
        ("proj", "my-run", "grp", "allow", str(out))
    assert init["id"] == json.loads((out / "wandb.json").read_text())["id"]
    assert init["config"]["train"]["wandb_project"] == "proj" and init["config"]["N"] > 0
    assert ("define_metric", "*", {"step_metric": "step"}) in calls and calls[-1] == ("finish",)
    logged = [c[1] for c in calls if c[0] == "log"]
    assert [v["step"] for v in logged] == [r["step"] for r in records(out)]
    assert [v.get("train/loss", v.get("eval/bpc_val")) for v in logged] == \
        [r["loss"] if r["kind"] == "train" else r["bpc_val"] for r in records(out)]


def test_a_tracker_that_fails_warns_once_and_training_goes_on(tiny_data, tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")

    def not_logged_in(**kw):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")
    monkeypatch.setattr(wandb, "init", not_logged_in)
    out = tmp_path / "a"
    train.main(tiny(tiny_data, out, "--wandb=true"))
    err = capsys.readouterr().err
    assert err.count("warning: W&B could not start (UsageError: No API key configured.") == 1, err
    assert rundir.finished(rundir.read_summary(out / "summary.json")) and not (out / "wandb").exists()

    class Broken:
        name = "TensorBoard"

        def log(self, step, values):
            raise OSError("disk gone")
    book = trackers.Trackers([Broken()], 10.0)
    for step in (1, 2):
        book.log({"kind": "train", "step": step, "tokens": 8, "loss": 1.0})
    assert capsys.readouterr().err.count("warning: TensorBoard failed (OSError: disk gone): it logs no more") == 1
    assert not book


def test_scalars_are_the_records_numbers_with_tokens_and_flops():
    record = {"kind": "train", "step": 5, "tokens": 640, "loss": 2.5, "mfu": None, "load_max_over_mean": [1.5, 2.0],
              "epoch": 0.25}
    assert trackers.scalars(record, 100.0) == {"tokens": 640, "flops": 64000.0, "train/loss": 2.5, "train/epoch": 0.25,
                                               "train/load_max_over_mean/layer0": 1.5,
                                               "train/load_max_over_mean/layer1": 2.0}
    evaluation = {"kind": "eval", "step": 5, "tokens": 640, "loss": 2.5, "eval_tokens": 1024, "bpc_val": 3.0}
    assert trackers.scalars(evaluation, 100.0) == {"tokens": 640, "flops": 64000.0, "eval/bpc_val": 3.0}


@pytest.mark.parametrize("key", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_refused_before_any_work(key, tiny_data, tmp_path, monkeypatch, capsys):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name, *a: None if name == key else real(name, *a))
    err = refused(train.main, tiny(tiny_data, tmp_path / "r", f"--{key}=true"), capsys)
    assert f"train.{key}=true needs the {key} package: pip install {key}" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value,message", [
    ("--wandb_project=a/b", "none of / \\ # ? % :"),  # an empty name is test_every_input.py's
    ("--wandb_group=" + "g" * 129, "at most 128 characters"), ("--wandb_run_name=" + "n" * 129, "at most 128 characters")])
def test_wandb_names_are_checked(value, message, tiny_data, tmp_path, capsys):
    err = refused(train.main, tiny(tiny_data, tmp_path / "r", value), capsys)
    assert f"train.{value[2:].split('=')[0]}=" in err and message in err


def test_overwrite_keeps_what_no_tracker_wrote(tiny_data, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "r"
    train.main(tiny(tiny_data, out, "--tensorboard=true"))
    (out / "tb" / "my-notes.txt").write_text("mine")
    err = refused(train.main, tiny(tiny_data, out, "--overwrite=true"), capsys)
    assert "tb holds what no tracker wrote (my-notes.txt)" in err and (out / "tb" / "my-notes.txt").exists()
    (out / "tb" / "my-notes.txt").unlink()
    train.main(tiny(tiny_data, out, "--overwrite=true"))  # the old run's tb/ went with it; this run logs to none
    assert not (out / "tb").exists() and rundir.finished(rundir.read_summary(out / "summary.json"))


def test_sweep_runs_are_named_by_arm_and_seed_and_grouped_by_the_sweep(tmp_path):
    path = tmp_path / "s.toml"
    from tests.conftest import MICRO
    path.write_text(MICRO.format(data=tmp_path / "d", compute="2e9", ra="[0.413]", reuse='["none"]', dense_Dm=48)
                    .replace("[sweep]\n", "[sweep]\nseeds = [1, 2]\n"))
    s, runs, over = sweep_plan.planned(path)
    for r in runs:
        args = sweep_plan.train_args(r, s, over, tmp_path / "runs" / "my-sweep" / r.name)
        assert f"--wandb_run_name={r.name}" in args and "--wandb_group=my-sweep" in args and r.name.endswith(f"-s{r.seed}")
    path.write_text(path.read_text().replace("[train]\n", "[train]\nwandb_group = \"mine\"\n"))
    with pytest.raises(ValueError, match="train.wandb_group is set by the sweep for every run"):
        sweep_plan.planned(path)


def test_a_tensorboard_folder_that_cannot_be_written_is_one_warning(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path).name == "tb" else real(path, mode))
    tcfg = TrainConfig(tensorboard=True, out_dir=str(tmp_path))
    sinks = trackers.start(tcfg, tmp_path, 0, 1.0, {})
    err = capsys.readouterr().err
    assert not sinks and err.strip().splitlines() == [
        f"warning: TensorBoard could not start (PermissionError: {tmp_path / 'tb'} cannot be written); training goes "
        f"on, log.jsonl holds every record"]
