"""ladder_report.py: the t and F distributions against table values, Welch's interval, the slope's t interval
and the lack-of-fit test against hand computations; on synthetic rungs the slope and the vertex of a known curve
come back, a curve without a minimum says on which side it lies, the pre-registered verdict, the CSV, the learning-rate rule and a rung's
dense runs from another folder; the ladder's sweep files plan as docs/ladder.md says; and the committed
runs (docs/ladder-runs.csv, docs/balancing.csv) give the numbers docs/ladder.md, results.md and the README
report. No runs: seconds."""
import csv
import io
import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

import sweep

from dev import ladder_report as lr
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


# ----------------------------------------------------------------------------- the distributions
@pytest.mark.parametrize("q, df, table", [(0.975, 4, 2.776), (0.975, 10, 2.228), (0.975, 2, 4.303), (0.975, 1, 12.706),
                                          (0.995, 1, 63.657), (0.95, 30, 1.697), (0.975, 16, 2.120), (0.9, 5, 1.476)])
def test_t_quantiles_are_the_tables(q, df, table):
    assert lr.t_ppf(q, df) == pytest.approx(table, abs=6e-4)
    assert lr.t_ppf(1 - q, df) == pytest.approx(-table, abs=6e-4)
    assert lr.t_cdf(table, df) == pytest.approx(q, abs=2e-4)


def test_t_distribution_closed_forms():
    # df = 1 is the Cauchy distribution; df = 2 and 4 have closed forms; df = inf the normal
    for t in (-3.0, -0.5, 0.0, 0.7, 2.5, 40.0):
        assert lr.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert lr.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
        u = t / math.sqrt(4 + t * t)
        assert lr.t_cdf(t, 4) == pytest.approx(0.5 + 0.75 * u - 0.25 * u ** 3, abs=1e-12)
    assert lr.t_ppf(0.975, math.inf) == pytest.approx(1.959964, abs=1e-6)


@pytest.mark.parametrize("F, d1, d2, p", [(2.85, 5, 16, 0.05), (4.44, 5, 16, 0.01), (4.96, 1, 10, 0.05),
                                          (4.10, 2, 10, 0.05), (7.56, 2, 10, 0.01), (161.45, 1, 1, 0.05)])
def test_f_p_values_are_the_tables(F, d1, d2, p):
    assert lr.f_sf(F, d1, d2) == pytest.approx(p, rel=0.01)


def test_f_with_one_df_is_t_squared_and_betainc_identities():
    for t, df in ((2.228, 10), (1.3, 3), (0.2, 7.5)):
        assert lr.f_sf(t * t, 1, df) == pytest.approx(2 * lr.t_cdf(-t, df), rel=1e-10)
    assert lr.f_sf(0.0, 3, 4) == 1.0 and lr.f_sf(math.inf, 3, 4) == 0.0
    for x in (0.0, 0.05, 0.3, 0.5, 0.8, 0.999, 1.0):
        assert lr.betainc(1, 1, x) == pytest.approx(x, abs=1e-14)
        assert lr.betainc(3, 1, x) == pytest.approx(x ** 3, abs=1e-14)
        assert lr.betainc(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), abs=1e-12)
        assert lr.betainc(2.5, 7, x) == pytest.approx(1 - lr.betainc(7, 2.5, 1 - x), abs=1e-12)
    with pytest.raises(ValueError):
        lr.betainc(0, 1, 0.5)


# ----------------------------------------------------------------------------- the statistics
def test_welch_interval_is_the_hand_computation():
    # equal n and variance: se = sqrt(1/3 + 1/3), df = 4, the interval -3 ± t(0.975, 4)·se
    w = lr.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    se = math.sqrt(2 / 3)
    assert (w["diff"], w["se"], w["df"]) == (pytest.approx(-3), pytest.approx(se), pytest.approx(4))
    assert (w["lo"], w["hi"]) == (pytest.approx(-3 - 2.776445 * se, abs=1e-5), pytest.approx(-3 + 2.776445 * se, abs=1e-5))
    u = -3 / se / math.sqrt(4 + 9 / se ** 2)  # df = 4: P(T < t) = 1/2 + 3u/4 − u³/4
    assert w["p"] == pytest.approx(2 * (0.5 + 0.75 * u - 0.25 * u ** 3), rel=1e-9)
    # unequal: va = 1/3, vb = (20/3)/4, df = (va + vb)² / (va²/2 + vb²/3) = 216/53
    w = lr.welch([1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0])
    assert (w["diff"], w["se"], w["df"]) == (pytest.approx(-3), pytest.approx(math.sqrt(2)), pytest.approx(216 / 53))
    assert w["hi"] - w["diff"] == pytest.approx(lr.t_ppf(0.975, 216 / 53) * math.sqrt(2))
    assert 2.571 < lr.t_ppf(0.975, 216 / 53) < 2.776  # between the tables' df 5 and df 4
    flat = lr.welch([1.0, 1.0], [1.0, 1.0])
    assert flat["se"] == 0 and flat["p"] == 1.0
    with pytest.raises(ValueError):
        lr.welch([1.0], [1.0, 2.0])


def test_slope_t_interval_is_the_hand_computation():
    # x = 0, 1, 2 (r_a = 1, e, e²), y = 0, 1, 3: slope 3/2, residuals 1/6, −1/3, 1/6, s² = 1/6, Sxx = 2, df = 1
    arms = {f"a{i}": (math.exp(i), [y]) for i, y in enumerate((0.0, 1.0, 3.0))}
    s = lr.slope_test(arms)
    se = math.sqrt(1 / 12)
    assert (s["slope"], s["se"], s["df"]) == (pytest.approx(1.5), pytest.approx(se), 1)
    assert (s["lo"], s["hi"]) == (pytest.approx(1.5 - 12.7062 * se, abs=1e-3), pytest.approx(1.5 + 12.7062 * se, abs=1e-3))
    assert s["p"] == pytest.approx(1 - 2 * math.atan(1.5 / se) / math.pi, rel=1e-9)  # df = 1: Cauchy


def test_slope_of_a_straight_line_in_ln_ra_is_recovered():
    arms = lr.by_arm(lr.curve(rung(lambda ra: 2.0 + 0.07 * math.log(ra))), "val")
    s = lr.slope_test(dict(list(arms.items())[:4]))
    assert s["slope"] == pytest.approx(0.07, abs=1e-9) and s["se"] == pytest.approx(0, abs=1e-9) and s["df"] == 10


def test_lack_of_fit_is_zero_on_a_quadratic_and_the_hand_computation_on_a_cubic():
    # four arms at x = 0..3 with two seeds each, mean ± 0.1: pure error 4·2·0.1² on 4 df
    def arms(mean):
        return {f"a{x}": (math.exp(x), [mean(x) - 0.1, mean(x) + 0.1]) for x in range(4)}
    on = lr.lack_of_fit(arms(lambda x: 2.0 + 0.3 * x - 0.05 * x * x))
    assert on["F"] == pytest.approx(0, abs=1e-9) and on["p"] == pytest.approx(1.0) and on["df"] == (1, 4)
    assert on["ss_pe"] == pytest.approx(0.08)
    # the means x³: the quadratic leaves 0.3·(−1, 3, −3, 1) (the cubic contrast), SS_lof = 2·0.09·20 = 3.6
    off = lr.lack_of_fit(arms(lambda x: float(x ** 3)))
    assert off["ss_lof"] == pytest.approx(3.6) and off["F"] == pytest.approx(3.6 / (0.08 / 4))
    assert off["p"] == pytest.approx(lr.f_sf(180, 1, 4)) and off["p"] < 1e-3
    assert lr.lack_of_fit({f"a{x}": (math.exp(x), [float(x)]) for x in range(5)}) is None  # no pure error


def test_vertex_of_a_known_quadratic_is_recovered_exactly_without_noise():
    arms = lr.by_arm(lr.curve(rung(lambda ra: 2.5 + 0.05 * (math.log(ra) - math.log(0.2)) ** 2)), "val")
    c2, c1, c0 = lr.quadratic(arms)
    assert c2 == pytest.approx(0.05, rel=1e-6) and lr.vertex(arms) == pytest.approx(0.2, rel=1e-6)


def test_summary_of_a_noisy_quadratic():
    true = 0.2
    curve = lambda ra: 2.5 + 0.06 * (math.log(ra) - math.log(true)) ** 2  # noqa: E731
    s = lr.summarise("synthetic", rung(curve, noise=0.01, rng_seed=0))
    assert s["vertex"] == pytest.approx(true, rel=0.25)
    assert s["best"] in ("moe-ra20.9", "moe-ra28.0", "moe-ra13.7") and s["best_interior"]
    assert s["lack_of_fit"]["p"] > 0.01  # it is a quadratic
    x = [math.log(ra) for ra in RAS[:4]]  # the true slope over the four sparsest: the quadratic's least-squares line
    true_slope = np.polyfit(x, [curve(ra) for ra in RAS[:4]], 1)[0]
    sl = s["slope"]
    assert sl["lo"] < true_slope < sl["hi"] and sl["slope"] == pytest.approx(true_slope, abs=0.02)
    assert s["dense_C"] == pytest.approx(3.0, abs=0.03) and s["dense_DN"] == pytest.approx(0.4)
    assert s["arms"]["moe-ra20.9"]["delta"] == pytest.approx(curve(0.209) - s["dense_C"], abs=0.03)
    w = s["arms"]["moe-ra20.9"]["vs_sparsest"]
    assert w["diff"] == pytest.approx(curve(0.209) - curve(0.066), abs=0.03) and w["lo"] < w["diff"] < w["hi"]
    assert s["arms"][s["sparsest"]]["vs_sparsest"] is None and s["sparsest"] == "moe-ra6.6"
    rows = rung(curve, noise=0.01, rng_seed=0)  # each arm against dense at C and 2C: Welch on the runs themselves
    dense = {a: [r["bpc_val"] for r in rows if r["arm"] == a] for a in ("dense-C", "dense-2C")}
    arm = [r["bpc_val"] for r in rows if r["arm"] == "moe-ra20.9"]
    assert s["arms"]["moe-ra20.9"]["vs_dense"] == {a: lr.welch(arm, vs) for a, vs in dense.items()}
    assert s["arms"]["moe-ra20.9"]["vs_dense"]["dense-2C"]["diff"] == pytest.approx(curve(0.209) - 2.85, abs=0.03)


def test_a_curve_without_a_minimum_says_which_side():
    rising = lr.by_arm(lr.curve(rung(lambda ra: 2.0 + 0.1 * math.log(ra) - 0.01 * math.log(ra) ** 2)), "val")
    assert lr.quadratic(rising)[0] < 0 and lr.vertex(rising) == 0.0  # the sparse end is best: below every r_a
    falling = lr.by_arm(lr.curve(rung(lambda ra: 2.0 - 0.1 * math.log(ra) - 0.01 * math.log(ra) ** 2)), "val")
    assert lr.vertex(falling) == math.inf
    s = lr.summarise("monotone", rung(lambda ra: 2.0 + 0.1 * math.log(ra), noise=0.005))
    assert s["slope"]["lo"] > 0 and s["best"] == s["sparsest"] and not s["best_interior"]
    assert "| the sparsest |" in lr.markdown({"val": [s]})


def arms_of(means_sds):
    """{arm: (r_a, five values)} with each arm's exact mean and sample sd: mean + sd·(−2, −1, 0, 1, 2)/√2.5."""
    unit = [k / math.sqrt(2.5) for k in (-2, -1, 0, 1, 2)]
    return {f"moe-ra{100 * ra:.1f}": (ra, [m + sd * u for u in unit]) for ra, (m, sd) in zip(RAS, means_sds)}


@pytest.mark.parametrize("means, text, lead_se", [
    ([2.10, 2.05, 2.09, 2.20], "turns", 0.05 / math.sqrt(2 * 0.01 ** 2 / 5)),               # 7.9 se
    ([2.10, 2.09, 2.09, 2.20], "interior best, not resolved", 0.01 / math.sqrt(2 * 0.01 ** 2 / 5)),  # 1.6 se
    ([2.00, 2.05, 2.09, 2.20], "no turn seen", None),
    ([2.30, 2.25, 2.20, 2.10], "optimum at the densest arm or above, resolved", 0.20 / math.sqrt(2 * 0.01 ** 2 / 5)),
    ([2.10, 2.15, 2.12, 2.095], "optimum at the densest arm or above, not resolved", 0.005 / math.sqrt(2 * 0.01 ** 2 / 5))])
def test_the_pre_registered_verdict_is_the_rule_of_docs_rung_regime(means, text, lead_se):
    """docs/rung-regime.md's read-out: the best arm's lead over the sparsest against 2 Welch standard errors
    sqrt(s_best²/5 + s_sparsest²/5), the best interior, the sparsest or the densest."""
    arms = arms_of([(m, 0.01) for m in means])
    best = min(arms, key=lambda a: statistics.fmean(arms[a][1]))
    v = lr.verdict(arms, best)
    assert v["text"] == text
    if lead_se is None:
        assert v["lead"] == 0 and v["se"] is None
    else:
        assert v["lead"] / v["se"] == pytest.approx(lead_se) and v["resolved"] == (lead_se >= 2)


def test_the_verdict_weighs_each_arms_own_scatter():
    """The same lead, 0.03 BPC, is resolved when both arms scatter by 0.01 and not when the sparsest scatters by
    0.05 (se = sqrt(0.01²/5 + 0.05²/5) = 0.0228, 1.3 se): Welch, not a pooled sd."""
    tight = lr.verdict(arms_of([(2.10, 0.01), (2.07, 0.01), (2.09, 0.01), (2.2, 0.01)]), "moe-ra9.0")
    loose = lr.verdict(arms_of([(2.10, 0.05), (2.07, 0.01), (2.09, 0.01), (2.2, 0.01)]), "moe-ra9.0")
    assert tight["text"] == "turns" and loose["text"] == "interior best, not resolved"
    assert loose["se"] == pytest.approx(math.sqrt((0.01 ** 2 + 0.05 ** 2) / 5)) and loose["lead"] == pytest.approx(0.03)
    s = lr.summarise("r", rung(lambda ra: 2.0 + 0.1 * (math.log(ra) - math.log(0.113)) ** 2, noise=0.001))
    assert s["verdict"]["text"] == "turns" and f"| turns ({s['verdict']['lead']:.3f} = " in lr.markdown({"val": [s]})


def test_csv_has_every_run_with_d_per_n_and_the_difference_to_dense_c():
    s = lr.summarise("r", rung(lambda ra: 2.0 + 0.07 * math.log(ra)))
    rows = list(csv.DictReader(io.StringIO(lr.runs_csv([s]))))
    assert len(rows) == 3 * (2 + len(RAS)) and rows[0]["rung"] == "r" and float(rows[0]["dense_D_per_N"]) == 0.4
    moe = next(r for r in rows if r["run"] == "moe-ra6.6-s2")
    assert float(moe["D_per_N"]) == pytest.approx(40_000 / 0.066 / 1e6, rel=1e-3)
    assert float(moe["val_minus_dense_C"]) == pytest.approx(2.0 + 0.07 * math.log(0.066) - 3.0, abs=1e-4)
    assert moe["bpc_shakespeare"] == ""  # a rung without that split leaves it empty
    s = lr.summarise("r", [{**r, "bpc_shakespeare": r["bpc_val"] + 1} for r in rung(lambda ra: 2.0)])
    moe = next(r for r in csv.DictReader(io.StringIO(lr.runs_csv([s]))) if r["run"] == "moe-ra6.6-s2")
    assert float(moe["bpc_shakespeare"]) == pytest.approx(float(moe["bpc_val"]) + 1)


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
    assert lr.summarise("x", back)["slope"]["slope"] == pytest.approx(0.07)


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
    lr.main(["report", str(path), f"--out={out}"])
    assert (out / "ladder-runs.csv").read_text().startswith("rung,dense_D_per_N,")
    (out / "ladder-runs.csv").write_text("not ours\n")
    with pytest.raises(SystemExit) as e:
        lr.main(["report", str(path), f"--out={out}"])
    assert e.value.code == 2 and "is not a ladder report" in capsys.readouterr().err


def test_lr_check_refuses_a_csv_of_several_rungs(capsys):
    # docs/ladder-runs.csv holds every rung: its dense-C runs of seed 1 would be taken for one rung's
    with pytest.raises(SystemExit) as e:
        lr.main(["lr-check", "0.5=" + str(ROOT / "docs" / "ladder-runs.csv"), "1=" + str(ROOT / "docs" / "ladder-runs.csv")])
    assert e.value.code == 2 and "holds 6 rungs" in capsys.readouterr().err


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
    merged = lr.with_runs_from(lr.load_rung(main), other, "--dense", lambda r: r["kind"] == "dense")
    assert lr.summarise("z", merged)["dense_C"] == pytest.approx(2.8)
    assert sorted(r["run"] for r in merged) == sorted(r["run"] for r in rows)
    lr.main(["report", str(main), f"--dense=sweep-z={other}"])
    assert "2.8" in capsys.readouterr().out
    short = write_rung(tmp_path / "short" / "report.csv", [r for r in half if r["seed"] != 3])
    wrong = write_rung(tmp_path / "wrong" / "report.csv", [{**r, "D": r["D"] + 1} for r in half])
    for folder, says in ((short, "lacks dense-2C seed 3"), (wrong, "is no run of the rung's plan")):
        with pytest.raises(SystemExit) as e:
            lr.main(["report", str(main), f"--dense=sweep-z={folder}"])
        assert e.value.code == 2 and says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lr.main(["report", str(main), f"--dense=sweep-q={other}"])
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
    def fake(todo, total, s, over, out, nproc, slots):  # the summary train.py writes, BPC falling with r_a
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
    lr.main(["report", str(main), f"--dense=sweep-m={other}"])
    assert "| dense-C | 100 % | 3.0000 ± 0.0000" in capsys.readouterr().out
    # one arm from another folder, as a learning-rate block may choose: its numbers, and only its, change
    arm = "moe-ra41.3-E45-K3-De8"
    for d in other.glob(f"{arm}-s*"):
        summary = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps({**summary, "final": {"bpc_val": 1.5}}))
    lr.main(["report", str(main), f"--dense=sweep-m={other}", f"--arm=sweep-m={other}:{arm}"])
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| moe-")}
    assert "1.5000** ± 0.0000" in rows[arm] and "1.5000" not in rows["moe-ra49.6-E42-K6-De8"]
    with pytest.raises(SystemExit) as e:
        lr.main(["report", str(main), f"--dense=sweep-m={other}", f"--arm=sweep-m={other}:moe-none"])
    assert e.value.code == 2 and "lacks every run" in capsys.readouterr().err
    shutil.rmtree(other / "dense-2C-s2")
    with pytest.raises(SystemExit) as e:
        lr.main(["report", str(main), f"--dense=sweep-m={other}"])
    assert e.value.code == 2 and "lacks dense-2C seed 2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the committed runs
RUNGS = ("sweep-cpu", "sweep-ladder-04", "sweep-ladder-07", "sweep-ladder-14-loose")
REGIME = ("sweep-regime-control", "sweep-regime-lr0.5")  # joined after the ladder: five seeds an arm, three for dense


def committed(split):
    """summarise() of every rung of docs/ladder-runs.csv on a split, through the command line's reader."""
    rungs = lr.load_rungs(ROOT / "docs" / "ladder-runs.csv")
    assert [n for n, _ in rungs] == list(RUNGS + REGIME)
    for name, rows in rungs:
        seeds = sorted({r["seed"] for r in rows})
        assert (len(rows), seeds) == ((31, [1, 2, 3, 4, 5]) if name in REGIME else (30, [1, 2, 3]))
    return {name: lr.summarise(name, rows, split) for name, rows in rungs}


def test_docs_ladder_holds_the_report_of_the_committed_runs(capsys):
    """`python dev/ladder_report.py report docs/ladder-runs.csv` prints the tables of docs/ladder.md's
    Results, every line of them."""
    lr.main(["report", str(ROOT / "docs" / "ladder-runs.csv")])
    printed = capsys.readouterr().out
    doc = (ROOT / "docs" / "ladder.md").read_text().splitlines()
    tables = [ln for ln in printed.splitlines() if ln.startswith(("|", "####"))]
    assert len(tables) >= 2 + 8 + 4 * 13 and [ln for ln in tables if ln not in doc] == []
    assert "| sweep-ladder-04 | 0.402 | milton | 9.0 % (3.0652) |" in printed  # a row, as an anchor


@pytest.mark.parametrize("rung_, split, slope, vertex", [
    ("sweep-cpu", "val", 0.092, 0.020), ("sweep-ladder-04", "val", 0.041, 0.045),
    ("sweep-ladder-07", "val", 0.037, 0.049), ("sweep-ladder-14-loose", "val", 0.019, 0.056),
    ("sweep-cpu", "milton", 0.151, 0.0), ("sweep-ladder-04", "milton", 0.047, 0.023),
    ("sweep-ladder-07", "milton", 0.042, 0.031), ("sweep-ladder-14-loose", "milton", -0.0005, 0.065)])
def test_the_committed_runs_give_the_slopes_and_vertices_docs_ladder_reports(rung_, split, slope, vertex):
    s = committed(split)[rung_]
    assert s["slope"]["slope"] == pytest.approx(slope, abs=5e-4) and s["vertex"] == pytest.approx(vertex, abs=5e-4)


def test_what_docs_ladder_concludes_from_the_committed_runs():
    """The Results' claims: above rung 0 the best mean is an interior arm (9-12 %) in 5 of 6 rung x split
    cells, and no best arm is resolved from the sparsest (every Welch interval holds 0); only rung 0's slope
    interval is clear of 0; the quadratic fails its lack-of-fit test on Milton at rungs 1, 2 and the loose
    rung and on val at the loose rung, and passes at rung 0."""
    by = {split: committed(split) for split in ("val", "milton")}
    cells = [(split, r) for r in RUNGS[1:] for split in by]
    interior = [(split, r) for split, r in cells if by[split][r]["best_interior"]]
    assert len(interior) == 5 and ("val", "sweep-ladder-07") not in interior
    for split, r in interior:
        s = by[split][r]
        assert 0.0895 <= s["arms"][s["best"]]["ra"] <= 0.117  # 8.96-11.63 %
        w = s["arms"][s["best"]]["vs_sparsest"]
        assert w["lo"] < 0 < w["hi"] and w["p"] > 0.05
    for split in by:
        assert by[split]["sweep-cpu"]["best"] == by[split]["sweep-cpu"]["sparsest"]
        assert by[split]["sweep-cpu"]["slope"]["lo"] > 0
        assert all(by[split][r]["slope"]["lo"] < 0 < by[split][r]["slope"]["hi"] for r in RUNGS[1:])
        assert by[split]["sweep-cpu"]["lack_of_fit"]["p"] > 0.5
    lof = {(split, r): by[split][r]["lack_of_fit"] for split in by for r in RUNGS}
    assert [k for k, v in lof.items() if v["p"] < 0.05] == [("val", "sweep-ladder-14-loose"), ("milton", "sweep-ladder-04"),
                                                          ("milton", "sweep-ladder-07"), ("milton", "sweep-ladder-14-loose")]
    assert lof["milton", "sweep-ladder-04"]["F"] == pytest.approx(6.11, abs=0.005)
    assert lof["milton", "sweep-ladder-04"]["df"] == (5, 16)


def test_the_z_loss_costs_val_not_milton():
    """docs/balancing.csv: the three variants with the z-loss against the three without, nine runs each
    (Welch): +0.016 BPC on val, resolved; +0.005 on Milton, not (results.md, the README's Status)."""
    rows = list(csv.DictReader((ROOT / "docs" / "balancing.csv").read_text().splitlines()))
    assert len(rows) == 18
    def bpc(split, z):
        return [float(r[f"bpc_{split}"]) for r in rows if r["variant"].endswith("+z") == z]
    val, milton = lr.welch(bpc("val", True), bpc("val", False)), lr.welch(bpc("milton", True), bpc("milton", False))
    assert val["diff"] == pytest.approx(0.0164, abs=5e-5) and 0.008 < val["lo"] and val["p"] < 0.001
    assert milton["diff"] == pytest.approx(0.0052, abs=5e-5) and milton["lo"] < 0 < milton["hi"] and milton["p"] > 0.2


# ----------------------------------------------------------------------------- the pre-registered rung's files
CORPUS_TRAIN_TOKENS = 31_296_563  # data/kjv-gcide-byte's training split (docs/data.md)


def same_run(a, b, lr_ratio=1.0):
    return ((a.name, a.shape, a.N, a.D, a.C, a.iters, a.batch_seqs, a.warmup, a.seed) ==
            (b.name, b.shape, b.N, b.D, b.C, b.iters, b.batch_seqs, b.warmup, b.seed)
            and b.lr == pytest.approx(lr_ratio * a.lr))


def test_the_pre_registered_rung_plans_as_docs_rung_regime_says():
    """Rung 2's backbone at C = 1e13: dense D/N = 4.35, the sparsest arm 649 tokens per active parameter,
    arms K = 1, 2, 3, 4, 7 (r_a 6.9-21.1 %), five seeds, one epoch each within the corpus."""
    s, runs = ladder_plan("regime")
    assert s.seeds == [1, 2, 3, 4, 5] and s.compute == 1e13 and s.warmup_frac == 0.05 and s.reuse == ["none"]
    assert len(runs) == 35 and [r.name for r in runs[:2]] == ["dense-C-s1", "dense-2C-s1"]
    assert runs[0].D / runs[0].N == pytest.approx(4.354, abs=1e-3) and runs[1].D / runs[1].N == pytest.approx(8.705, abs=1e-3)
    moe = [r for r in runs if r.kind == "moe"]
    assert [r.shape["K"] for r in moe[:5]] == [1, 2, 3, 4, 7]
    assert [round(100 * r.ra, 1) for r in moe[:5]] == [6.9, 9.3, 11.6, 14.0, 21.1]
    assert moe[0].D / moe[0].Na == pytest.approx(649.4, abs=0.1) and moe[4].D / moe[4].Na == pytest.approx(92.9, abs=0.1)
    assert all(r.epochs == pytest.approx(1.0) and r.D <= CORPUS_TRAIN_TOKENS for r in runs)
    _, rung2 = ladder_plan("ladder-07")  # the same backbone and arms as the ladder's rung 2
    by_k = {r.shape["K"]: r for r in rung2 if r.kind == "moe" and r.seed == 1}
    assert all((r.shape, r.N, r.Na) == (by_k[r.shape["K"]].shape, by_k[r.shape["K"]].N, by_k[r.shape["K"]].Na)
               for r in moe)
    assert (runs[0].shape, runs[0].N) == (rung2[0].shape, rung2[0].N)


def test_the_half_rate_file_is_the_pre_registered_rung_at_half_the_rate():
    _, one = ladder_plan("regime")
    _, half = ladder_plan("regime-lr0.5")
    assert len(one) == len(half) and all(same_run(a, b, 0.5) for a, b in zip(one, half))


def test_the_control_is_rung_2_on_the_new_corpus():
    """sweep-regime-control: rung 2's plans to the token and the rate (its MoE arms at 1x, its dense runs at
    0.5x) for K = 1, 2, 3, 4, 7, on data/kjv-gcide-byte instead of data/shakespeare-byte."""
    _, control = ladder_plan("regime-control")
    _, rung2 = ladder_plan("ladder-07")
    _, rung2_dense = ladder_plan("ladder-07-dense0.5")
    theirs = {r.name: r for r in rung2 if r.kind == "moe"} | {r.name: r for r in rung2_dense if r.kind == "dense"}
    assert len(control) == 35
    for r in control:
        if r.seed <= 3:
            assert same_run(theirs[r.name], r)
    from harness import sweep_plan
    data = {name: sweep_plan.load_sweep(ROOT / "configs" / f"sweep-{name}.toml")[3]["data"]
            for name in ("regime", "regime-lr0.5", "regime-control", "ladder-07")}
    assert data == {"regime": "data/kjv-gcide-byte", "regime-lr0.5": "data/kjv-gcide-byte",
                    "regime-control": "data/kjv-gcide-byte", "ladder-07": "data/shakespeare-byte"}


def test_sweep_cpus_dense_runs_at_half_the_rate():
    """sweep-cpu-dense0.5, runs 0, 1, 3, 4, 6, 7: sweep-cpu's dense runs of seeds 1-3 at half the rate."""
    _, cpu = ladder_plan("cpu")
    _, half = ladder_plan("cpu-dense0.5")
    dense = [r for r in cpu if r.kind == "dense"]
    assert [half[i].name for i in (0, 1, 3, 4, 6, 7)] == [r.name for r in dense] and len(dense) == 6
    assert all(same_run(a, half[i], 0.5) for a, i in zip(dense, (0, 1, 3, 4, 6, 7)))


def test_the_committed_regime_runs_give_the_verdict_docs_rung_regime_reports():
    """docs/regime-runs: the rung's 31 runs, each arm from the folder of its rate, turn on val and on the
    plays (best 9.3 %, 11.1 and 5.3 se ahead of the sparsest) and not on Milton (docs/rung-regime.md)."""
    runs = ROOT / "docs" / "regime-runs"
    out = {}
    for split in ("val", "shakespeare", "milton"):
        rows = lr.with_runs_from(lr.load_rung(runs / "sweep-regime-lr0.5"), runs / "sweep-regime", "--arm",
                                 lambda r: r["arm"] == "moe-ra14.0-E76-K4-De24",
                                 lr.sweep_report.read_plan(runs / "sweep-regime-lr0.5" / "plan.json"))
        assert len(rows) == 31 and sorted(r["seed"] for r in rows if r["arm"] == "moe-ra14.0-E76-K4-De24") == [1, 2, 3, 4, 5]
        out[split] = lr.summarise("sweep-regime-lr0.5", rows, split)
    v = {split: s["verdict"] for split, s in out.items()}
    assert [v[sp]["text"] for sp in out] == ["turns", "turns", "no turn seen"]
    assert out["val"]["best"] == out["shakespeare"]["best"] == "moe-ra9.3-E78-K2-De24"
    assert v["val"]["lead"] == pytest.approx(0.0546, abs=5e-4) and v["val"]["lead"] / v["val"]["se"] == pytest.approx(11.1, abs=0.05)
    assert v["shakespeare"]["lead"] / v["shakespeare"]["se"] == pytest.approx(5.3, abs=0.05)
    sl = out["val"]["slope"]
    assert sl["slope"] == pytest.approx(-0.0379, abs=5e-5) and sl["hi"] < 0
    assert out["milton"]["lack_of_fit"]["p"] < 0.01 < out["val"]["lack_of_fit"]["p"]


def test_the_committed_control_resolves_no_turn():
    """docs/regime-runs/sweep-regime-control: verdict 2 on every split (best 9.3 %, 1.1-1.5 se), and a
    sparse-end slope above 0 where the rung's is below (docs/rung-regime.md)."""
    rows = lr.load_rung(ROOT / "docs" / "regime-runs" / "sweep-regime-control")
    assert len(rows) == 31
    for split, se in (("val", 1.5), ("shakespeare", 1.3), ("milton", 1.1)):
        s = lr.summarise("control", rows, split)
        v = s["verdict"]
        assert v["text"] == "interior best, not resolved" and s["best"] == "moe-ra9.3-E78-K2-De24"
        assert v["lead"] / v["se"] == pytest.approx(se, abs=0.05)
    assert lr.summarise("control", rows, "val")["slope"]["lo"] > 0


def test_sweep_cpus_margins_against_dense_at_its_better_rate():
    """The README's and results.md's sweep-cpu margins: rung 0's dense runs in docs/ladder-runs.csv are the
    0.5x ones (better by 0.073 on val); against them MoE is ahead, interval clear of 0, up to 28 % on val and
    20 % on Milton, level at 36 %, behind at 52 % on val; ahead of dense at 2C up to 10 % on val, 14 % on Milton."""
    s = {split: committed(split)["sweep-cpu"] for split in ("val", "milton")}
    dense_c = [r for r in s["val"]["rows"] if r["arm"] == "dense-C"]
    assert all(r["lr"] == pytest.approx(0.5 * 0.0014539217269351366) for r in dense_c)
    assert s["val"]["dense"]["dense-C"]["mean"] == pytest.approx(2.7389, abs=5e-5)
    def clear(split, vs):  # the arms whose interval against `vs` lies below 0, by r_a in %
        return [round(100 * d["ra"]) for d in s[split]["arms"].values() if d["vs_dense"][vs]["hi"] < 0]
    assert clear("val", "dense-C") == [6, 8, 10, 14, 20, 28] and clear("milton", "dense-C") == [6, 8, 10, 14, 20]
    assert clear("val", "dense-2C") == [6, 8, 10] and clear("milton", "dense-2C") == [6, 8, 10, 14]
    arm36, arm52 = (s["val"]["arms"][a]["vs_dense"]["dense-C"] for a in ("moe-ra35.9-E80-K16-De40", "moe-ra51.9-E72-K24-De40"))
    assert arm36["lo"] < 0 < arm36["hi"] and arm52["lo"] > 0 and arm52["diff"] == pytest.approx(0.054, abs=5e-4)
