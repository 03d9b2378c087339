"""sweep.py: plans against the paper, equal resources and refusals, the runner, the report."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import flops
import sweep
from model import GPTConfig
import train

from harness import rundir
from harness import schedule
from harness import sweep_jobs
from harness import sweep_plan
from harness import sweep_report
from harness.config import TrainConfig, load_config
from tests.conftest import MICRO, finished_summary, micro_sweep as micro, refused

ROOT = Path(__file__).resolve().parent.parent
ROWS = json.loads((Path(__file__).parent / "paper_tables.json").read_text())["rows"]


def plan_of(name):
    return sweep_plan.planned(ROOT / "configs" / f"sweep-{name}.toml")[1]


@pytest.mark.parametrize("name,tables,dense_rows", [("2b", (10,), (1, 2)), ("7b", (12,), (5, 6))])
def test_paper_plans_reproduce_the_paper(name, tables, dense_rows):
    runs = plan_of(name)
    moe = {(r.shape["E"], r.shape["K"], r.shape["De"], r.shape["Dse"]): r for r in runs if r.reuse == "none"}
    rows = [r for r in ROWS if r["table"] in tables and r.get("mu", 21.0) in (21.0, 22.5)]
    assert len(rows) >= 8
    for row in rows:  # the same shape, and D, iterations, lr within a few percent of the printed values
        run = moe[(row["E"], row["K"], row["De"], row["Dse"])]
        assert abs(100 * run.ra - row["ra_pct"]) < 0.1
        assert run.D == pytest.approx(row["D"], rel=0.035) and run.iters == pytest.approx(row["iters"], rel=0.07)
        assert run.lr == pytest.approx(row["eta"], rel=0.035)
    dense = [r for r in runs if r.kind == "dense"]
    for run, row_no in zip(dense, dense_rows):  # Table 13: the dense baselines at C and "2C"
        row = next(r for r in ROWS if r["table"] == 13 and r["row"] == row_no)
        assert run.N == pytest.approx(row["N"], rel=0.01) and run.D == pytest.approx(row["D"], rel=0.035)
        assert run.iters == pytest.approx(row["iters"], rel=0.035)


def test_7b_strict_reuse_is_on_68b_unique_tokens():
    strict = [r for r in plan_of("7b") if r.reuse == "strict"]
    assert strict and all(r.unique_tokens == pytest.approx(68e9, rel=0.005) for r in strict)
    best = next(r for r in strict if r.shape["K"] == 6)
    assert best.epochs == pytest.approx(4.65, abs=0.01)  # the 7B strict-reuse row of docs/method.md §7


@pytest.mark.parametrize("name", ["toy", "gpu", "2b", "7b"])
def test_plan_invariants(name):
    s, moe_arm, dense_arm, _ = sweep_plan.load_sweep(ROOT / "configs" / f"sweep-{name}.toml")
    runs = sweep_plan.plan(s, moe_arm, dense_arm)
    ref = runs[0]
    W = round(moe_arm.mu * moe_arm.shape.Dm)
    assert [r.name for r in runs[:2]] == ["dense-C", "dense-2C"] and runs[1].C == pytest.approx(s.dense_2C * ref.C, rel=0.01)
    for r in runs:
        shape = flops.Shape(**r.shape)
        assert r.D == r.iters * r.batch_seqs * shape.S and r.C == pytest.approx(flops.compute(shape, r.D))
        if r.kind == "dense":
            continue
        assert shape.Dse == shape.K * shape.De and shape.Dse + shape.E * shape.De == W  # N fixed (docs/method.md §6)
        assert abs(r.N / ref.N - 1) <= 0.01 and abs(r.C / ref.C - 1) <= 0.01  # docs/method.md §8
        if r.reuse == "strict":
            assert r.unique_tokens == ref.unique_tokens and r.epochs == pytest.approx(r.D / ref.D, rel=1e-3)
        if r.reuse == "loose":
            assert r.epochs == pytest.approx(2.0, rel=1e-3)
    assert sweep_plan.check_equal(runs, 0.01) == []


def write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("kw,message", [
    (dict(ra="[0.10]"), r"ra=0.1000 is out of reach on this backbone \(attention and the dense layers alone "
                        r"are too large a share of N\): reachable 0.3578..1.0000; nearest feasible ra=0.3578"),
    (dict(ra="[0.40]"), r"nearest feasible ra=0.4129 with E=45, K=3, De=8, Dse=24"),
    (dict(compute="1e5"), r"dense-C: sweep.compute=1e\+05 buys 0.\d+ tokens, less than half a step of 1 × S=32"),
    (dict(compute="2e7"), r"C = .* is -12.81 % from the dense C = .* \(too few iterations"),
    (dict(dense_Dm=96), r"no expert width .* with N within 2 % of"),
])
def test_unreachable_plans_are_refused_with_the_numbers(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        sweep_plan.planned(micro(tmp_path, **kw))


def test_two_targets_of_one_shape_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"sweep.ra = \[0.41, 0.413\]: two entries give the same MoE \(moe-ra41.3"):
        sweep_plan.planned(micro(tmp_path, ra="[0.41, 0.413]"))


def test_k_beyond_the_total_width_is_refused(tmp_path):
    text = MICRO.format(data="x", compute="2e9", ra="[0.4]", reuse='["none"]', dense_Dm=48)
    path = write(tmp_path, text.replace("ra = [0.4]", "K = [3, 30]\nDe = 8"))
    with pytest.raises(ValueError, match=r"K=30 is out of reach: K·De = 240 of a total width 384 leaves E=18"):
        sweep_plan.planned(path)


def test_unequal_plans_need_allow_unequal(tmp_path):
    path = micro(tmp_path, compute="2e7")
    with pytest.raises(ValueError, match="breaks equal resources"):
        sweep_plan.planned(path)
    _, runs, _ = sweep_plan.planned(path, allow_unequal=True)
    assert len(runs) == 4


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("mu = 12.0\n", ""), r"\[moe\] needs mu"),
    (lambda t: t.replace("compute = 2e9", "compute = 2e9\nbogus = 1"), r"unknown key sweep.bogus"),
    (lambda t: t.replace("compute = 2e9", 'compute = "lots"'), r"sweep.compute = 'lots': expected float"),
    (lambda t: t.replace('reuse = ["none"]', 'reuse = ["twice"]'), r"sweep.reuse 'twice' is unknown"),
    (lambda t: t.replace("compute = 2e9", "compute = 2e9\nseeds = [1, 1]"), r"sweep.seeds \[1, 1\] repeats a seed"),
    (lambda t: t.replace("compute = 2e9", "compute = 2e9\nseeds = [-1]"), r"sweep.seeds entries are integers in 0..2\^63-1"),
    (lambda t: t.replace("compute = 2e9", "compute = 2e9\nwarmup_frac = 1.5"), r"sweep.warmup_frac = 1.5 is not allowed"),
    (lambda t: t.replace("compute = 2e9", "compute = 2e9\nreuse_at = [0.3]"), r"sweep.reuse_at = \[0.3\] must name entries"),
    (lambda t: t.replace("eval_tokens = 512", "eval_tokens = 512\nseed = 3"), r"train.seed is set by the sweep"),
    (lambda t: t.replace("eval_tokens = 512", "iters = 5"), r"train.iters is set by the sweep"),
    (lambda t: t.replace("eval_tokens = 512", "evals = 5"), r"train.evals is unknown"),
    (lambda t: t.replace("[dense]", "[baseline]"), r"unknown table \[baseline\]"),
    (lambda t: t.replace("ra = [0.413, 0.496]\n", ""), r"needs exactly one of ra .* and K"),
    (lambda t: t.replace("Dh = 16\nDffn = 88", "Dh = 16\nDffn = 88\nE = 4"), r"unknown key moe.E"),
    (lambda t: t.replace("compute = 2e9\n", ""), r"sweep.compute is required"),
    (lambda t: t.replace("ra = [0.413, 0.496]", "ra = [20, 30]"), r"fractions in \(0, 1\], got 20 \(write 0.2 for 20 %\)"),
    (lambda t: t.replace('reuse = ["none"]', 'reuse = ["none", "none"]'), r"sweep.reuse = \['none', 'none'\] repeats"),
    (lambda t: t.replace('reuse = ["none"]', "reuse = []"), r"sweep.reuse = \[\]: expected at least one of"),
    (lambda t: t.replace("eval_tokens = 512", "overwrite = true"), r"train.overwrite: a sweep never replaces a run"),
    (lambda t: t.replace("Dffn = 128\nS = 32", "Dffn = 128\nS = 64"), r"dense.S = 64 and moe.S = 32"),
    (lambda t: t.replace("compute = 2e9", "compute = 2e9\ndense_2C = 0.25"), r"sweep.dense_2C = 0.25 is not allowed"),
])
def test_malformed_sweep_file_names_the_key(tmp_path, edit, message):
    path = write(tmp_path, edit(micro(tmp_path).read_text()), "bad.toml")
    with pytest.raises(ValueError, match=message):
        sweep_plan.load_sweep(path)
    with pytest.raises(ValueError, match="no such file|No such file"):
        sweep_plan.load_sweep(tmp_path / "missing.toml")


@pytest.mark.slow
def test_runner_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, tiny_data, monkeypatch):
    path = micro(tmp_path, data=tiny_data, reuse='["none", "strict"]')
    s, runs, train_over = sweep_plan.planned(path)
    out = tmp_path / "out"
    # an interrupted run: the first MoE run stopped after 3 steps, as a killed job leaves it (with a checkpoint)
    victim = runs[2]
    train.train(sweep_plan.train_args(victim, s, train_over, out / victim.name) + ["--stop_at=3"])
    assert sweep_jobs.status(out / victim.name) == "resumable"
    started = []

    def in_this_process(job, env, to_log):  # the runner's `python train.py …`, run by train.main here (children
        started.append(job.cmd)              # are test_safety.py's, test_nothing_lost.py's and the tests below)
        assert job.cmd[:2] == [sys.executable, str(ROOT / "train.py")] and not to_log
        try:
            train.main(job.cmd[2:])
            code = 0
        except SystemExit as e:
            code = e.code
        return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    monkeypatch.setattr(sweep_jobs, "start_child", in_this_process)
    sweep.run_sweep(path, out)
    assert [c[-1] == "--resume" for c in started] == [r is victim for r in runs]  # each run once, the victim resumed
    assert all(sweep_jobs.status(out / r.name) == "finished" for r in runs)
    log = [json.loads(x) for x in (out / victim.name / "log.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in log if x["kind"] == "train"]  # the stopped part's step 3, then every 10 on resume
    assert steps == [3] + list(range(10, victim.iters, 10)) + [victim.iters]
    stamps = {r.name: os.path.getmtime(out / r.name / "summary.json") for r in runs}
    sweep.run_sweep(path, out)  # everything finished: nothing runs again
    assert stamps == {r.name: os.path.getmtime(out / r.name / "summary.json") for r in runs}
    summary = json.loads((out / runs[3].name / "summary.json").read_text())
    assert runs[3].reuse == "strict" and summary["unique_tokens"] == runs[0].unique_tokens
    assert summary["C"] == pytest.approx(runs[3].C) and summary["iters"] == runs[3].iters

    rows = sweep.report(out)
    assert [r["arm"] for r in rows] == [r.name for r in runs] and all(r["seeds"] == [1337] for r in rows)
    md = (out / "report.md").read_text()
    assert "| dense-C | 100.00 % |" in md and "BPC val" in md and "BPC other" in md
    assert (out / "report.csv").read_text().splitlines()[0].startswith("run,arm,seed,kind,reuse,E,K,De,Dse,ra,N,C,D")
    plot = sweep_report.text_plot(rows, "val")
    assert "-" * 60 in plot and "=" * 60 in plot and "o" in plot and "s" in plot


def test_seeds_warmup_and_reuse_at_shape_the_plan(tmp_path):
    path = micro(tmp_path, reuse='["none", "strict", "loose"]', extra="seeds = [7, 8, 9]\nwarmup_frac = 0.1\n"
                 "reuse_at = [0.413]\n")
    s, runs, train_over = sweep_plan.planned(path)
    arms = [r.arm for r in runs if r.seed == 7]
    assert arms == ["dense-C", "dense-2C", "moe-ra41.3-E45-K3-De8", "moe-ra41.3-E45-K3-De8-strict",
                    "moe-ra41.3-E45-K3-De8-loose", "moe-ra49.6-E42-K6-De8"]  # reuse at 41.3 % only
    assert [r.name for r in runs] == [f"{a}-s{seed}" for seed in (7, 8, 9) for a in arms]  # seed by seed
    for r in runs:
        args = sweep_plan.train_args(r, s, train_over, tmp_path / r.name)
        assert f"--seed={r.seed}" in args and f"--warmup={r.warmup}" in args
        assert r.warmup == max(1, round(0.1 * r.iters))  # the same share for every arm
    same_arm = [r for r in runs if r.arm == "dense-C"]
    assert len({(r.iters, r.batch_seqs, r.lr, r.D, r.unique_tokens) for r in same_arm}) == 1  # only the seed differs
    paper = sweep_plan.planned(micro(tmp_path))[1]
    assert all(r.warmup == flops.warmup_iters(r.iters) and r.seed is None and r.name == r.arm for r in paper)
    assert not any(a.startswith("--seed") for a in sweep_plan.train_args(paper[0], s, train_over, tmp_path))
    s0, zero, over0 = sweep_plan.planned(micro(tmp_path, extra="seeds = [0, 1]\n"))
    assert [a for a in sweep_plan.train_args(zero[0], s0, over0, tmp_path) if a.startswith("--seed")] == ["--seed=0"]


def test_reuse_at_best_runs_the_reuse_arms_where_the_no_reuse_arms_did_best(tmp_path, tiny_data, monkeypatch):
    path = micro(tmp_path, data=tiny_data, reuse='["none", "strict"]', extra='seeds = [1, 2]\nreuse_at = ["best"]\n')
    s, runs, _ = sweep_plan.planned(path, out=tmp_path / "out")
    assert [r.reuse for r in runs] == ["none"] * 8  # not yet known
    bpc = {"moe-ra41.3-E45-K3-De8": [2.0, 2.2], "moe-ra49.6-E42-K6-De8": [2.05, 2.06]}  # means 2.10 and 2.055

    def fake_run(todo, total, sweep_, train_over, out, nproc, slots):
        for _, r in todo:
            (out / r.name).mkdir(parents=True)
            summary = finished_summary(r, sweep_, train_over, out, bpc.get(r.arm, [3.0, 3.0])[r.seed - 1])
            (out / r.name / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(sweep, "run_all", fake_run)
    runs = sweep.run_sweep(path, tmp_path / "out")
    assert [r.name for r in runs if r.reuse == "strict"] == ["moe-ra49.6-E42-K6-De8-strict-s1",
                                                            "moe-ra49.6-E42-K6-De8-strict-s2"]
    assert all((tmp_path / "out" / r.name / "summary.json").exists() for r in runs)


def test_report_gives_mean_and_sd_over_seeds(tmp_path):
    rows = [{"run": f"{arm}-s{seed}", "arm": arm, "seed": seed, "kind": kind, "reuse": "none", "E": "", "K": "",
             "De": "", "Dse": "", "ra": ra, "N": 10, "C": 1.0, "D": 5.0, "unique_tokens": 6, "epochs": 1.0,
             "finished": True, "bpc_val": v}
            for arm, kind, ra, values in (("dense-C", "dense", 1.0, (2.0, 2.2, 2.4)), ("moe-a", "moe", 0.2, (1.9, 1.9, 1.9)))
            for seed, v in zip((1, 2, 3), values)]
    table = sweep_report.arms(rows, ["val"])
    assert table[0]["bpc_val"] == pytest.approx(2.2) and table[0]["sd_val"] == pytest.approx(0.2)
    assert table[1]["sd_val"] == 0 and table[1]["seeds"] == [1, 2, 3]
    md = sweep_report.markdown(table, ["val"])
    assert "| dense-C | 100.00 % |" in md and "2.2000 ± 0.2000" in md and "2.0000, 2.2000, 2.4000" in md
    partial = sweep_report.markdown(sweep_report.arms(rows[:4], ["val"]), ["val"])  # moe-a has 1 of the 3 seeds so far
    assert "| moe-a (1 of 3 seeds) |" in partial
    png = sweep_report.plot(table, "val", tmp_path / "r.png")
    try:
        import matplotlib  # noqa: F401
        assert png and (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert png is None and not (tmp_path / "r.png").exists()


def test_report_draws_every_runs_bpc_against_tokens_and_flops(tmp_path, tiny_data):
    s, runs, over = sweep_plan.planned(micro(tmp_path, tiny_data, extra="seeds = [1, 2]\n"))
    out = tmp_path / "out"
    for i, r in enumerate(runs):
        (out / r.name).mkdir(parents=True)
        (out / r.name / "summary.json").write_text(json.dumps(finished_summary(r, s, over, out, 2.0 + i / 10)))
        evals = [{"kind": "eval", "step": k, "tokens": k * r.batch_tokens, "bpc_val": 3.0 - i / 10 - k / 10} for k in (1, 2, 2)]
        (out / r.name / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in evals))  # 2 twice: resumed there
    curves = sweep_report.read_curves(out, sweep_report.collect(out), "val")
    assert sorted(curves) == sorted(r.name for r in runs)
    for i, r in enumerate(runs):
        assert curves[r.name] == [(k * r.batch_tokens, pytest.approx(k * r.batch_tokens * r.M_train),
                                   pytest.approx(3.0 - i / 10 - k / 10)) for k in (1, 2)]
    sweep_report.report(out)
    pytest.importorskip("matplotlib")
    assert (out / "report-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep_report.report(out)  # written again over its own figure


def test_emit_slurm_writes_an_array_job(tmp_path):
    path = micro(tmp_path)
    script = sweep.emit_slurm(path, tmp_path / "my out", 4, sweep_plan.planned(path)[1])
    text = script.read_text()
    assert "#SBATCH --array=0-3" in text and "#SBATCH --gpus-per-node=4" in text
    assert "--only=$SLURM_ARRAY_TASK_ID" in text and "--nproc=4" in text
    assert f"{sys.executable} {ROOT / 'sweep.py'} run" in text and f"--out='{tmp_path / 'my out'}'" in text


def test_cli_plan_json_and_errors(tmp_path, capsys):
    r = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "plan", str(ROOT / "configs" / "sweep-7b.toml"), "--json"],
                       capture_output=True, text=True, cwd=ROOT)  # as a program
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout)
    keys = {"name", "N", "Na", "ra", "M_train", "D", "C", "unique_tokens", "epochs", "lr", "batch_tokens"}
    assert len(runs) == 18 and all(keys <= set(x) for x in runs)
    assert "out of reach" in refused(sweep.main, ["plan", str(micro(tmp_path, ra="[0.1]"))], capsys)
    assert "no run directory with a summary.json" in refused(sweep.main, ["report", str(tmp_path)], capsys)


def test_plans_for_several_ranks_run_as_planned():
    # the batch is a whole number of micro-batches, which split over the ranks: train.py runs the plan's D
    _, runs, over = sweep_plan.planned(ROOT / "configs" / "sweep-2b.toml", world=8)
    assert over["micro_batch"] == 16 and all(r.batch_seqs % 16 == 0 for r in runs) and sweep_plan.check_equal(runs, 0.01) == []
    for r in runs[:3]:
        shape = GPTConfig(**r.shape, vocab_size=65536)
        tcfg = TrainConfig(iters=r.iters, batch_seqs=r.batch_seqs, micro_batch=16, lr=r.lr, tokens=0.0)
        assert schedule.for_training(shape, tcfg, 8).D == r.D


@pytest.mark.parametrize("nproc,micro", [(1, 0), (2, 0), (2, 4), (1, 3)])
def test_toy_sweep_runs_execute_the_planned_C_to_the_last_token(tmp_path, nproc, micro):
    # every run's arguments, read back by train.py as it reads them, give exactly the planned D and C
    path = tmp_path / "s.toml"
    path.write_text((ROOT / "configs" / "sweep-toy.toml").read_text() + (f"micro_batch = {micro}\n" if micro else ""))
    sw, runs, over = sweep_plan.planned(path, world=nproc)
    for r in runs:
        mvals, tcfg, _, _ = load_config(sweep_plan.train_args(r, sw, over, tmp_path / r.name))
        sched = schedule.for_training(GPTConfig(**mvals, vocab_size=256), tcfg, world=nproc)
        assert (sched.D, sched.C, sched.batch_seqs, sched.iters) == (r.D, r.C, r.batch_seqs, r.iters)
        assert sched.micro_batch == (micro or r.batch_seqs)


def test_micro_batch_that_ranks_cannot_split_is_refused_at_plan_time(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text((ROOT / "configs" / "sweep-toy.toml").read_text() + "micro_batch = 3\n")
    with pytest.raises(ValueError, match="micro_batch=3 cannot be split evenly over 2 ranks"):
        sweep_plan.planned(path, world=2)


def test_planning_a_sweep_loads_no_torch():
    """schedule.py and preflight.py plan and check every run without torch: `sweep.py plan` is instant."""
    code = ("import sys, sweep; from harness import sweep_plan; _, runs, _ = sweep_plan.planned('configs/sweep-cpu.toml'); "
            "assert runs and 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- runs at once (--jobs)
def script_job(tmp_path, i, code):
    """A job whose child is a Python snippet run in its own run folder (i: its place in the plan)."""
    run_dir = tmp_path / f"run{i}"
    return sweep_jobs.Job(f"[{i + 1}/5]", f"run{i}", run_dir, [sys.executable, "-c", code], 1.0, 1)


def test_jobs_start_in_plan_order_n_at_once_and_a_failure_stops_no_other(tmp_path, capsys):
    # each child notes when it ran and what its slot gave it, prints a line to its log, and the third fails
    code = ("import os, sys, time, json; t = time.time(); time.sleep(0.4); print('out of {name}'); "
            "open('{times}', 'a').write(json.dumps([{i}, t, time.time(), os.environ['OMP_NUM_THREADS']]) + chr(10)); "
            "sys.exit({rc})")
    times = tmp_path / "times.jsonl"
    jobs = [script_job(tmp_path, i, code.format(name=f"run{i}", times=times, i=i, rc=3 if i == 2 else 0)) for i in range(5)]
    failed = sweep_jobs.run_jobs(jobs, [{"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "7"}])
    assert [(job.name, rc) for job, rc in failed] == [("run2", 3)]
    spans = sorted(json.loads(x) for x in times.read_text().splitlines())
    assert [s[0] for s in spans] == list(range(5)) and {s[3] for s in spans} == {"1", "7"}
    starts = sorted(spans, key=lambda s: s[1])
    assert [s[0] for s in starts] == list(range(5))  # in plan order
    at_once = max(sum(a[1] <= b[1] < a[2] for a in spans) for b in spans)
    assert at_once == 2  # two at a time, never more
    for i in range(5):  # each run's output in its own folder
        log = (tmp_path / f"run{i}" / sweep_jobs.LOG).read_text()
        assert log.startswith("--- sweep.py started") and log.splitlines()[1:] == [f"out of run{i}"]
    out = capsys.readouterr().out
    assert "run2: failed (exit 3)" in out and "sweep: 4 done, 1 failed, 0 running, 0 to start" in out
    err = str(sweep_jobs.failures(failed, to_log=True))
    assert f"run2 (exit 3, log {tmp_path / 'run2' / 'train.log'})" in err and "repeat the command" in err


def test_each_job_gets_its_share_of_the_cores_or_gpus_of_its_own(monkeypatch):
    monkeypatch.setattr(sweep_jobs, "cores", lambda: 8)
    assert sweep_jobs.cpu_slots(1, 1, {}) == [{}]  # one run alone: torch's default, as python train.py
    assert [s["OMP_NUM_THREADS"] for s in sweep_jobs.cpu_slots(2, 1, {})] == ["4", "4"]
    assert [s["OMP_NUM_THREADS"] for s in sweep_jobs.cpu_slots(2, 2, {})] == ["2", "2"]  # per rank under torchrun
    assert [s["OMP_NUM_THREADS"] for s in sweep_jobs.cpu_slots(16, 1, {})] == ["1"] * 16  # never fewer than one
    assert [s["OMP_NUM_THREADS"] for s in sweep_jobs.cpu_slots(2, 1, {"OMP_NUM_THREADS": "3"})] == ["3", "3"]  # the user's
    assert sweep_jobs.gpu_slots(2, 2, list("0123")) == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert sweep_jobs.slots("cuda", 1, 1) == [{}]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the tests' own 1
    assert sweep_jobs.slots("cuda", 2, 1, ["6", "7"]) == [{"CUDA_VISIBLE_DEVICES": g, "OMP_NUM_THREADS": "4",
                                                          "MKL_NUM_THREADS": "4"} for g in "67"]
    assert sweep_jobs.visible_gpus({"CUDA_VISIBLE_DEVICES": "4,5"}) == ["4", "5"]
    with pytest.raises(ValueError, match=r"--jobs=3 with --nproc=2 needs 6 GPUs; there are 4 \(0,1,2,3\)"):
        sweep_jobs.gpu_slots(3, 2, list("0123"))
    with pytest.raises(ValueError, match="--gpus=0,1: the runs train on cpu"):
        sweep_jobs.slots("cpu", 2, 1, ["0", "1"])


def test_progress_counts_runs_and_estimates_the_time_left_from_planned_flops(tmp_path):
    def job(name, C, iters, step):
        (tmp_path / name).mkdir()
        if step:
            (tmp_path / name / "log.jsonl").write_text(json.dumps({"kind": "train", "step": step}) + "\n")
        return sweep_jobs.Job("[1/3]", name, tmp_path / name, [], C, iters)
    a, b, c = job("a", 2e12, 100, 0), job("b", 4e12, 100, 50), job("c", 2e12, 10, 0)  # b resumes at half way
    p = sweep_jobs.Progress([a, b, c], live=False)
    assert p.total == pytest.approx(2e12 + 2e12 + 2e12)  # b's done half is no work of this sweep's
    p.done.add("a")
    (tmp_path / "b" / "log.jsonl").write_text(json.dumps({"kind": "train", "step": 75}) + "\n")  # 1e12 more
    p.t0 -= 90
    share, text = p.line(["b"])
    assert share == pytest.approx(0.5)
    assert text.startswith("sweep: 1 done, 1 running, 1 to start; 50 % of its FLOPs in 1 min 30 s, about 1 min 30 s left")


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path, tiny_data, capsys):
    out = tmp_path / "out"
    out.mkdir()
    held = rundir.Lock(out, "--out").acquire()
    try:
        err = refused(sweep.main, ["run", str(micro(tmp_path, data=tiny_data)), f"--out={out}"], capsys)
    finally:
        held.release()
    assert f"{out} is in use by process {os.getpid()}" in err and "use another --out" in err
    assert sorted(p.name for p in out.iterdir()) == []  # nothing planned, nothing run, the lock gone with its maker
    # --only processes (a Slurm array's tasks) share the folder, each run under its own lock, but never with a
    # whole sweep: it would start their runs a second time
    one, two = (rundir.Lock(out, "--out", shared=True).acquire() for _ in range(2))
    try:
        err = refused(sweep.main, ["run", str(micro(tmp_path, data=tiny_data)), f"--out={out}"], capsys)
        assert f"{out} is in use by another process" in err
    finally:
        one.release(), two.release()
    held = rundir.Lock(out, "--out").acquire()
    try:
        err = refused(sweep.main, ["run", str(micro(tmp_path, data=tiny_data)), f"--out={out}", "--only=1"], capsys)
    finally:
        held.release()
    assert f"{out} is in use by process {os.getpid()}" in err


@pytest.mark.slow
def test_packed_runs_stop_on_sigterm_resume_and_match_runs_trained_alone(tmp_path, tiny_data):
    # --jobs=2 on one thread each, stopped by SIGTERM once both first runs have a checkpoint, then resumed by
    # the same command; against the same sweep run one at a time on one thread: the same bits
    path, env = micro(tmp_path, data=tiny_data), {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = sweep_plan.planned(path)[1]
    cmd = [sys.executable, str(ROOT / "sweep.py"), "run", str(path), f"--out={tmp_path / 'packed'}", "--jobs=2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(2400):
        if all((tmp_path / "packed" / r.name / "ckpt.pt").exists() for r in runs[:2]) or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines() == [
        "sweep.py: stopped by SIGTERM; the runs that finished are kept, and the same command resumes the rest"], err
    for r in runs[:2]:
        rundir.Lock(tmp_path / "packed" / r.name).acquire().release()  # its train.py has ended
        assert "train.py: stopped by SIGTERM" in (tmp_path / "packed" / r.name / sweep_jobs.LOG).read_text()
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    alone = subprocess.run([*cmd[:4], f"--out={tmp_path / 'alone'}"], env=env, capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr
    for r in runs:
        packed, single = (json.loads((tmp_path / d / r.name / "summary.json").read_text()) for d in ("packed", "alone"))
        assert packed["final"] == single["final"] and packed["threads"] == single["threads"] == [1]
        a, b = (torch.load(tmp_path / d / r.name / "ckpt.pt", weights_only=False)["model"] for d in ("packed", "alone"))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_packed_runs_of_two_ranks_each_get_their_own_rendezvous(tmp_path, tiny_data):
    # two torchrun jobs at once on gloo (--standalone binds a free port each): both train, on two ranks each
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "run", str(micro(tmp_path, data=tiny_data)),
                        f"--out={tmp_path / 'out'}", "--jobs=2", "--nproc=2", "--only=0,1"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("dense-C", "dense-2C"):
        summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
        assert summary["finished"] and summary["world"] == 2 and summary["threads"] == [1]
