"""ladder_report.py on synthetic rungs: the slope and the vertex of a known curve come back, the bootstrap
interval covers the true vertex, a curve without a minimum says on which side it lies, the CSV, the
learning-rate rule and a rung's dense runs from another folder; and the ladder's sweep files plan as
docs/ladder.md says. No runs: seconds."""
import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from dev import ladder_report as lr
import sweep
from tests.conftest import finished_summary, micro_sweep

ROOT = Path(__file__).resolve().parent.parent
TRAIN_TOKENS = 4_669_952  # data/shakespeare-byte's training split, in windows of 256 (docs/ladder.md)
RAS = [0.066, 0.09, 0.113, 0.137, 0.209, 0.28, 0.352, 0.52]  # the spacing of sweep-ladder-04


def rung(bpc_of_ra, noise=0.0, seeds=(1, 2, 3), dense=3.0, rng_seed=0):
    """Rows as load_rung returns them: dense at C and 2C, and one MoE arm per r_a, each on every seed."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for s in seeds:
        rows.append(dict(run=f"dense-C-s{s}", arm="dense-C", seed=s, kind="dense", reuse="none", ra=1.0, N=1_000_000,
                         D=400_000, bpc_val=dense + noise * rng.standard_normal()))
        rows.append(dict(run=f"dense-2C-s{s}", arm="dense-2C", seed=s, kind="dense", reuse="none", ra=1.0,
                         N=1_000_000, D=800_000, bpc_val=dense - 0.15 + noise * rng.standard_normal()))
        for ra in RAS:
            rows.append(dict(run=f"moe-ra{100 * ra:.1f}-s{s}", arm=f"moe-ra{100 * ra:.1f}", seed=s, kind="moe",
                             reuse="none", ra=ra, N=1_000_000, D=int(40_000 / ra),
                             bpc_val=bpc_of_ra(ra) + noise * rng.standard_normal()))
    return rows


def test_slope_of_a_straight_line_in_ln_ra_is_recovered():
    arms = lr.by_arm(lr.curve(rung(lambda ra: 2.0 + 0.07 * math.log(ra))), "val")
    assert lr.slope(dict(list(arms.items())[:4])) == pytest.approx(0.07, abs=1e-9)


def test_vertex_of_a_known_quadratic_is_recovered_exactly_without_noise():
    arms = lr.by_arm(lr.curve(rung(lambda ra: 2.5 + 0.05 * (math.log(ra) - math.log(0.2)) ** 2)), "val")
    c2, c1, c0 = lr.quadratic(arms)
    assert c2 == pytest.approx(0.05, rel=1e-6) and lr.vertex(arms) == pytest.approx(0.2, rel=1e-6)


def test_summary_recovers_slope_and_vertex_with_intervals_that_cover_them():
    true = 0.2
    curve = lambda ra: 2.5 + 0.06 * (math.log(ra) - math.log(true)) ** 2  # noqa: E731
    s = lr.summarise("synthetic", rung(curve, noise=0.01, rng_seed=0), n_boot=500)  # one rung; coverage: below
    assert s["vertex"] == pytest.approx(true, rel=0.25)
    lo, hi = s["vertex_ci"]
    assert lo < true < hi and lo > RAS[0] / 2 and hi < 2 * RAS[-1] and s["vertex_inside"] > 0.9
    x = [math.log(ra) for ra in RAS[:4]]  # the true slope over the four sparsest: the quadratic's least-squares line
    true_slope = np.polyfit(x, [curve(ra) for ra in RAS[:4]], 1)[0]
    a, b = s["slope_ci"]
    assert a < true_slope < b and s["slope"] == pytest.approx(true_slope, abs=0.02)
    assert s["dense_C"] == pytest.approx(3.0, abs=0.03) and s["dense_DN"] == pytest.approx(0.4)
    assert s["arms"]["moe-ra20.9"]["delta"] == pytest.approx(curve(0.209) - s["dense_C"], abs=0.03)


def test_the_vertex_interval_covers_the_truth_in_most_noisy_rungs():
    curve = lambda ra: 2.5 + 0.05 * (math.log(ra) - math.log(0.15)) ** 2  # noqa: E731
    hits = 0
    for k in range(20):
        arms = lr.by_arm(lr.curve(rung(curve, noise=0.01, rng_seed=100 + k)), "val")
        lo, hi = lr.interval(lr.bootstrap(arms, lr.vertex, 2, n=200, seed=k))
        hits += lo <= 0.15 <= hi
    assert hits >= 16  # a 95 % interval; ~92 % measured over 200 such rungs


def test_a_curve_without_a_minimum_says_which_side():
    rising = lr.by_arm(lr.curve(rung(lambda ra: 2.0 + 0.1 * math.log(ra) - 0.01 * math.log(ra) ** 2)), "val")
    assert lr.quadratic(rising)[0] < 0 and lr.vertex(rising) == 0.0  # the sparse end is best: below every r_a
    falling = lr.by_arm(lr.curve(rung(lambda ra: 2.0 - 0.1 * math.log(ra) - 0.01 * math.log(ra) ** 2)), "val")
    assert lr.vertex(falling) == math.inf
    s = lr.summarise("monotone", rung(lambda ra: 2.0 + 0.1 * math.log(ra), noise=0.005), n_boot=300)
    assert s["slope_ci"][0] > 0 and s["vertex_inside"] < 0.5
    assert "none below" in lr.markdown([s]) or s["vertex"] < RAS[0]


def test_interval_orders_zero_and_inf():
    assert lr.interval([0.0] * 10 + [0.1] * 80 + [math.inf] * 10) == (0.0, math.inf)
    assert lr.interval(list(range(1000))) == (25, 974)


def test_csv_has_every_run_with_d_per_n_and_the_difference_to_dense_c():
    s = lr.summarise("r", rung(lambda ra: 2.0 + 0.07 * math.log(ra)), n_boot=20)
    rows = list(csv.DictReader(io.StringIO(lr.runs_csv([s]))))
    assert len(rows) == 3 * (2 + len(RAS)) and rows[0]["rung"] == "r" and float(rows[0]["dense_D_per_N"]) == 0.4
    moe = next(r for r in rows if r["run"] == "moe-ra6.6-s2")
    assert float(moe["D_per_N"]) == pytest.approx(40_000 / 0.066 / 1e6, rel=1e-3)
    assert float(moe["val_minus_dense_C"]) == pytest.approx(2.0 + 0.07 * math.log(0.066) - 3.0, abs=1e-4)


def test_a_report_csv_reads_back_as_a_rung(tmp_path):
    path = tmp_path / "sweep-x" / "report.csv"
    path.parent.mkdir()
    rows = rung(lambda ra: 2.0 + 0.07 * math.log(ra))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    back = lr.load_rung(path)
    assert back[2]["seed"] == 1 and back[2]["ra"] == pytest.approx(0.066) and lr.rung_name(path) == "sweep-x"
    assert lr.summarise("x", back, n_boot=10)["slope"] == pytest.approx(0.07)


def write_check(tmp_path, name, bpc):
    """A report.csv of seed-1 runs with the given {arm: BPC}."""
    path = tmp_path / name / "report.csv"
    path.parent.mkdir()
    path.write_text("run,arm,seed,kind,reuse,ra,N,D,bpc_val\n" + "".join(
        f"{a}-s1,{a},1,{'dense' if a.startswith('dense') else 'moe'},none,0.1,1,1,{v}\n" for a, v in bpc.items()))
    return path


def test_lr_rule_takes_a_better_multiplier_only_beyond_the_margin(tmp_path):
    check = lr.lr_check({
        0.5: write_check(tmp_path, "half", {"dense-C": 2.80, "moe-a": 2.60, "moe-b": 2.70, "moe-c": 2.75}),
        1.0: write_check(tmp_path, "one", {"dense-C": 2.81, "moe-a": 2.50, "moe-b": 2.60, "moe-c": 2.70, "moe-d": 2.0}),
        2.0: write_check(tmp_path, "two", {"dense-C": 2.84, "moe-a": 2.40, "moe-b": 2.45, "moe-c": 2.85})})
    assert set(check["bpc"]) == {"dense-C", "moe-a", "moe-b", "moe-c"}  # moe-d: at × 1 only
    assert check["choice"] == {"moe": 2.0, "dense": 1.0}  # MoE better by 0.033 at × 2; dense by 0.01 < 0.02 at × 0.5
    assert check["best"]["moe-c"] == 1.0 and check["best"]["moe-a"] == 2.0
    assert check["order_moves"]  # moe-c is behind dense-C at × 2 only
    assert "MOVES" in lr.lr_markdown(check)


def test_command_line_writes_the_csv_and_refuses_a_foreign_file(tmp_path, capsys):
    rows = rung(lambda ra: 2.0 + 0.07 * math.log(ra))
    path = tmp_path / "sweep-y" / "report.csv"
    path.parent.mkdir()
    path.write_text("run,arm,seed,kind,reuse,ra,N,D,bpc_val\n" + "".join(
        f"{r['run']},{r['arm']},{r['seed']},{r['kind']},{r['reuse']},{r['ra']},{r['N']},{r['D']},{r['bpc_val']}\n"
        for r in rows))
    out = tmp_path / "out"
    out.mkdir()
    lr.main(["report", str(path), f"--out={out}", "--boot=10"])
    assert (out / "ladder-runs.csv").read_text().startswith("rung,dense_D_per_N,")
    (out / "ladder-runs.csv").write_text("not ours\n")
    with pytest.raises(SystemExit) as e:
        lr.main(["report", str(path), f"--out={out}", "--boot=10"])
    assert e.value.code == 2 and "is not a ladder report" in capsys.readouterr().err


def test_lr_rule_counts_a_run_that_did_not_finish_as_worst(tmp_path):
    check = lr.lr_check({
        0.5: write_check(tmp_path, "half", {"dense-C": 2.90, "moe-a": 2.60}),
        1.0: write_check(tmp_path, "one", {"dense-C": 2.81, "moe-a": 2.50}),
        2.0: write_check(tmp_path, "two", {"dense-C": 2.70})})  # moe-a stopped on a NaN at × 2
    assert check["bpc"]["moe-a"][2.0] == math.inf and check["choice"] == {"moe": 1.0, "dense": 2.0}
    assert "did not finish" in lr.lr_markdown(check)


# ----------------------------------------------------------------------------- the ladder's sweep files


def ladder_plan(name):
    from harness import sweep_plan  # plans without torch
    s, moe, dense, _ = sweep_plan.load_sweep(ROOT / "configs" / f"sweep-{name}.toml")
    return s, sweep_plan.plan(s, moe, dense)


@pytest.mark.parametrize("name,dense_dn,reuse", [("ladder-04", 0.40, "none"), ("ladder-07", 0.70, "none"),
                                                 ("ladder-14-loose", 1.39, "loose")])
def test_ladder_rungs_plan_as_docs_ladder_says(name, dense_dn, reuse):
    s, runs = ladder_plan(name)
    assert s.seeds == [1, 2, 3] and s.warmup_frac == 0.05 and s.reuse == [reuse]
    dense_c = runs[0]
    assert dense_c.name == "dense-C-s1" and dense_c.D / dense_c.N == pytest.approx(dense_dn, abs=0.01)
    moe = [r for r in runs if r.kind == "moe"]
    assert len({r.arm for r in moe}) == 8 and min(r.ra for r in moe) < 0.07 and max(r.ra for r in moe) > 0.5
    for r in moe:
        assert r.shape["Dse"] == r.shape["K"] * r.shape["De"] and r.unique_tokens <= TRAIN_TOKENS
        assert r.epochs == pytest.approx(1.0 if reuse == "none" else 2.0, rel=1e-3)


@pytest.mark.parametrize("rung", ["04", "07"])
@pytest.mark.parametrize("mult", [0.5, 2.0])
def test_lr_check_runs_are_the_main_runs_at_another_rate(rung, mult):
    """docs/ladder.md runs --only 0 2 6 9 of the rung and --only 0 2 3 4 of its check files: the same runs
    (dense-C, K = 1, 7, 20, seed 1) but for the learning rate."""
    _, main = ladder_plan(f"ladder-{rung}")
    _, check = ladder_plan(f"ladder-{rung}-lr{mult:g}")
    for i, j in zip((0, 2, 6, 9), (0, 2, 3, 4)):
        a, b = main[i], check[j]
        assert (a.name, a.shape, a.D, a.iters, a.batch_seqs, a.warmup, a.seed) == \
            (b.name, b.shape, b.D, b.iters, b.batch_seqs, b.warmup, b.seed) and b.lr == pytest.approx(mult * a.lr)
    assert [main[i].shape.get("K") for i in (2, 6, 9)] == [1, 7, 20]


def test_loose_rungs_dense_c_is_rung_2s_dense_2c():
    _, rung2 = ladder_plan("ladder-07")
    _, loose = ladder_plan("ladder-14-loose")
    a, b = rung2[1], loose[0]
    assert (a.shape, a.D, a.iters, a.batch_seqs, a.lr, a.warmup) == (b.shape, b.D, b.iters, b.batch_seqs, b.lr, b.warmup)


def write_rung(path, rows):
    path.parent.mkdir()
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_a_rungs_dense_runs_come_from_another_folder_of_the_same_plans(tmp_path, capsys):
    rows = [{**r, "C": 1e12} for r in rung(lambda ra: 2.0 + 0.07 * math.log(ra), dense=3.0)]
    main = write_rung(tmp_path / "sweep-z" / "report.csv", rows)
    half = [{**r, "bpc_val": r["bpc_val"] - 0.2} for r in rows if r["kind"] == "dense"]
    other = write_rung(tmp_path / "sweep-z-dense0.5" / "report.csv", half)
    merged = lr.with_dense_from(lr.load_rung(main), other, "sweep-z")
    assert lr.summarise("z", merged, n_boot=10)["dense_C"] == pytest.approx(2.8)
    assert sorted(r["run"] for r in merged) == sorted(r["run"] for r in rows)
    lr.main(["report", str(main), "--boot=10", f"--dense=sweep-z={other}"])
    assert "2.8" in capsys.readouterr().out
    short = write_rung(tmp_path / "short" / "report.csv", [r for r in half if r["seed"] != 3])
    wrong = write_rung(tmp_path / "wrong" / "report.csv", [{**r, "D": r["D"] + 1} for r in half])
    for folder, says in ((short, "lacks dense-2C seed 3"), (wrong, "is no dense run of sweep-z")):
        with pytest.raises(SystemExit) as e:
            lr.main(["report", str(main), "--boot=10", f"--dense=sweep-z={folder}"])
        assert e.value.code == 2 and says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lr.main(["report", str(main), "--boot=10", f"--dense=sweep-q={other}"])
    assert "the name of one of the rungs" in capsys.readouterr().err


@pytest.mark.parametrize("rung_", ["04", "07"])
def test_dense_half_rate_runs_are_the_rungs_dense_runs_at_half_the_rate(rung_):
    """docs/ladder.md runs --only 0 1 3 4 6 7 of sweep-ladder-NN-dense0.5: the rung's dense runs of every
    seed, but for the learning rate."""
    _, main = ladder_plan(f"ladder-{rung_}")
    _, half = ladder_plan(f"ladder-{rung_}-dense0.5")
    dense = [r for r in main if r.name.startswith("dense")]
    assert [half[i].name for i in (0, 1, 3, 4, 6, 7)] == [r.name for r in dense]
    for a, b in zip(dense, (half[i] for i in (0, 1, 3, 4, 6, 7))):
        assert (a.shape, a.D, a.iters, a.batch_seqs, a.warmup, a.seed) == (b.shape, b.D, b.iters, b.batch_seqs,
                                                                           b.warmup, b.seed)
        assert b.lr == pytest.approx(0.5 * a.lr)


def test_loose_rungs_half_rate_dense_runs():
    """sweep-ladder-14-loose-dense0.5: the loose rung's dense runs at half the rate; its dense-C is
    sweep-ladder-07-dense0.5's dense-2C, the same plan."""
    _, loose = ladder_plan("ladder-14-loose")
    _, half = ladder_plan("ladder-14-loose-dense0.5")
    _, rung2_half = ladder_plan("ladder-07-dense0.5")
    dense = [r for r in loose if r.name.startswith("dense")]
    assert [half[i].name for i in (0, 1, 3, 4, 6, 7)] == [r.name for r in dense]
    for a, b in zip(dense, (half[i] for i in (0, 1, 3, 4, 6, 7))):
        assert (a.shape, a.D, a.iters, a.batch_seqs, a.seed) == (b.shape, b.D, b.iters, b.batch_seqs, b.seed)
        assert b.lr == pytest.approx(0.5 * a.lr)
    a, b = rung2_half[1], half[0]
    assert (a.shape, a.D, a.iters, a.batch_seqs, a.lr, a.warmup) == (b.shape, b.D, b.iters, b.batch_seqs, b.lr, b.warmup)


def test_a_rung_folder_takes_its_dense_runs_from_its_plan_when_they_never_ran(tiny_data, tmp_path, monkeypatch, capsys):
    """The ladder trains a rung's dense runs only at the rate the check chose, into another folder: the rung's
    own dense runs are those of its plan.json, matched there, and need not have been trained at 1x."""
    def fake(todo, total, s, over, out, nproc):  # the summary train.py writes, BPC falling with r_a
        for _, r in todo:
            (out / r.name).mkdir(parents=True, exist_ok=True)
            bpc = 3.0 if r.kind == "dense" else 2.0 + r.ra + 0.01 * r.seed
            (out / r.name / "summary.json").write_text(json.dumps(finished_summary(r, s, over, out, bpc)))
    monkeypatch.setattr(sweep, "run_all", fake)
    plan = micro_sweep(tmp_path, tiny_data, ra="[0.36, 0.413, 0.496]", extra="seeds = [1, 2]\n")
    main, other = tmp_path / "sweep-m", tmp_path / "sweep-m-dense0.5"
    sweep.run_sweep(plan, main)
    shutil.copytree(main, other)
    for d in main.glob("dense-*"):  # never trained at 1x
        shutil.rmtree(d)
    lr.main(["report", str(main), "--boot=10", f"--dense=sweep-m={other}"])
    assert "| dense-C | 100 % | 3.0000 ± 0.0000" in capsys.readouterr().out
    shutil.rmtree(other / "dense-2C-s2")
    with pytest.raises(SystemExit) as e:
        lr.main(["report", str(main), "--boot=10", f"--dense=sweep-m={other}"])
    assert e.value.code == 2 and "lacks dense-2C seed 2" in capsys.readouterr().err


@pytest.mark.parametrize("rung_, split, slope, vertex", [
    ("sweep-cpu", "val", 0.092, 0.020), ("sweep-ladder-04", "val", 0.041, 0.045),
    ("sweep-ladder-07", "val", 0.037, 0.049), ("sweep-ladder-14-loose", "val", 0.019, 0.056),
    ("sweep-cpu", "milton", 0.151, 0.0), ("sweep-ladder-04", "milton", 0.047, 0.023),
    ("sweep-ladder-07", "milton", 0.042, 0.031), ("sweep-ladder-14-loose", "milton", -0.0005, 0.065)])
def test_the_committed_runs_give_the_fits_docs_ladder_reports(rung_, split, slope, vertex):
    """docs/ladder-runs.csv (every run of the ladder) against the slopes and vertices in docs/ladder.md's
    table: three seeds of dense-C, dense-2C and eight MoE arms per rung."""
    text = (ROOT / "docs" / "ladder-runs.csv").read_text()
    rows = [{k: lr._number(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(text)) if r["rung"] == rung_]
    assert len(rows) == 30 and sorted({r["seed"] for r in rows}) == [1, 2, 3]
    s = lr.summarise(rung_, rows, split, n_boot=10)
    assert s["slope"] == pytest.approx(slope, abs=5e-4) and s["vertex"] == pytest.approx(vertex, abs=5e-4)
