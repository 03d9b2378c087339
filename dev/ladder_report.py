"""The tokens-per-parameter ladder's analysis (docs/ladder.md). A rung is one sweep: its folder of
runs, or the report.csv that `sweep.py report` wrote for it. For each rung and validation split: BPC per arm
(mean ± sd over the seeds) and relative to the rung's own dense model at C; the best arm; each arm's
difference to the sparsest with a Welch 95 % interval; the slope of BPC against ln r_a over the four sparsest
arms with a t interval; a lack-of-fit F test of a quadratic in ln r_a over all its arms, and the quadratic's
vertex as a description; the verdict of the read-out fixed in advance in docs/rung-regime.md. For all rungs:
one CSV of every run and one figure. And the learning-rate check's table with its rule. No torch, no scipy: the t and F distributions are computed here (betainc).

    python dev/ladder_report.py report runs/sweep-cpu runs/sweep-ladder-04 runs/sweep-ladder-07 [--out=docs]
        [--dense sweep-ladder-04=runs/sweep-ladder-04-dense0.5]   # a rung's dense runs from another folder
        [--arm sweep-regime-lr0.5=runs/sweep-regime:moe-ra14.0-E76-K4-De24]   # and one arm's
        [--split val --split milton]                              # default: every split all the rungs have
    python dev/ladder_report.py lr-check 0.5=runs/sweep-ladder-04-lr0.5 1=runs/sweep-ladder-04 2=runs/sweep-ladder-04-lr2

The statistics, all on the runs themselves (each seed's BPC a point, x = ln r_a):
- Welch: the difference of two arms' means, its standard error sqrt(s1²/n1 + s2²/n2), the
  Welch–Satterthwaite df, the 95 % interval diff ± t(0.975, df)·se and the two-sided p. Each arm keeps its
  own variance: the seed-to-seed sd differs up to eightfold between arms of one rung.
- The slope: ordinary least squares over every run of the four sparsest arms (12 points with three seeds),
  its standard error from the residuals, and a t interval with n − 2 df. It pools the residual variance
  over those four arms.
- Lack of fit: the quadratic's residual sum of squares split into pure error (the seeds' scatter about
  their arm's mean, n − m df for m arms) and lack of fit (the rest, m − 3 df); F = (SS_lof/df_lof) /
  (SS_pe/df_pe), p from F(df_lof, df_pe). A small p: the arms' means do not lie on a quadratic in ln r_a,
  and its vertex describes nothing of the curve.
- The vertex exp(−c1/(2·c2)) of the least-squares quadratic: a description, with no interval.
"""
import argparse
import csv
import io
import math
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's root, for python dev/ladder_report.py
from harness import helptext
from harness import rundir
from harness import safe_io
from harness import sweep_report

SPARSEST = 4        # the arms the slope is fitted over
LR_MARGIN = 0.02    # BPC: a multiplier other than 1 is taken only when it is better by more than this


# ----------------------------------------------------------------------------- reading a rung
def load_rung(path):
    """The runs of one rung: a sweep folder (through sweep_report.collect, with each run's lr from its
    plan.json) or a report.csv; each a dict with run, arm, seed, kind, reuse, ra, N, D, bpc_<split>, …"""
    path = Path(path)
    if path.is_dir():
        plan = {r["name"]: r for r in sweep_report.read_plan(path / "plan.json")}
        rows = [{**r, "lr": plan.get(r["run"], {}).get("lr", "")} for r in sweep_report.collect(path)]
    else:
        rows = list(csv.DictReader(io.StringIO(safe_io.read_bytes(path).decode("utf-8"))))
        if not rows or "arm" not in rows[0] or "ra" not in rows[0]:
            raise ValueError(f"{path}: expected a sweep folder or the report.csv of `sweep.py report`")
        rows = [{k: _number(v) for k, v in r.items()} for r in rows]
    unfinished = [r["run"] for r in rows if r.get("finished") in (False, "False")]
    if unfinished:
        rundir.warn(f"{path}: left out, unfinished: {', '.join(unfinished)}")
    return [r for r in rows if r["run"] not in unfinished]


def with_runs_from(rows, folder, flag, pick, planned=None):
    """The rung's runs, those that `pick` selects taken from another sweep folder instead (the same plans at
    another learning rate, as a learning-rate check may choose): each must match a run of the rung in arm,
    seed, N, C and D, and every such run of the rung must be there. The rung's runs are those of its plan
    (`planned`: the rows of its plan.json) when it has one, so that they need not have been trained there."""
    ours = {(r["arm"], r["seed"]): r for r in (planned or rows) if pick(r)}
    theirs = [r for r in load_rung(folder) if pick(r)]
    found = {(r["arm"], r["seed"]) for r in theirs}
    for r in theirs:
        mine = ours.get((r["arm"], r["seed"]))
        if mine is None or any(mine[k] != r[k] for k in ("N", "C", "D")):
            raise ValueError(f"{flag}: {r['run']} is no run of the rung's plan (arm, seed, N, C, D)")
    if not ours or set(ours) - found:
        raise ValueError(f"{flag}: lacks {', '.join(f'{a} seed {s}' for a, s in sorted(set(ours) - found)) or 'every run'}")
    return [r for r in rows if not pick(r)] + theirs


def _number(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return v
    return int(x) if x.is_integer() and "." not in v and "e" not in v.lower() else x


def curve(rows):
    """The MoE runs that make the rung's curve: its no-reuse arms, or, in a rung that has none (a loose-reuse
    rung), the arms of its one reuse variant."""
    moe = [r for r in rows if r["kind"] == "moe"]
    variants = {r["reuse"] for r in moe}
    if not variants:
        return []
    reuse = "none" if "none" in variants else max(sorted(variants), key=lambda v: sum(r["reuse"] == v for r in moe))
    return [r for r in moe if r["reuse"] == reuse]


def by_arm(rows, split):
    """{arm: (r_a, [bpc of each seed])}, in order of r_a."""
    out = {}
    for r in rows:
        if isinstance(r.get(f"bpc_{split}"), (int, float)):
            out.setdefault(r["arm"], (r["ra"], []))[1].append(r[f"bpc_{split}"])
    return dict(sorted(out.items(), key=lambda kv: kv[1][0]))


# ----------------------------------------------------------------------------- the fits
def points(arms):
    """x = ln r_a and y = BPC of every run of the arms ({arm: (r_a, values)})."""
    return ([math.log(ra) for ra, vs in arms.values() for _ in vs], [v for _, vs in arms.values() for v in vs])


def quadratic(arms):
    """(c2, c1, c0) of BPC = c2·x² + c1·x + c0, x = ln r_a, fitted over every run of the arms."""
    return tuple(float(c) for c in np.polyfit(*points(arms), 2))


def vertex(arms):
    """The r_a at the quadratic's minimum; when it has none, 0 (below every r_a) if the fit is lower at the
    sparsest arm than at the densest, else inf (above every r_a)."""
    c2, c1, _ = quadratic(arms)
    if c2 > 0:
        x = -c1 / (2 * c2)
        return math.inf if x > 700 else math.exp(x)  # exp(-800) is 0.0 already
    lo, hi = (math.log(ra) for ra in (min(a[0] for a in arms.values()), max(a[0] for a in arms.values())))
    return 0.0 if (c2 * lo + c1) * lo <= (c2 * hi + c1) * hi else math.inf  # c0 cancels


# ----------------------------------------------------------------------------- distributions (numpy-free math)
def betainc(a, b, x):
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz),
    with the symmetry I_x(a, b) = 1 − I_{1−x}(b, a) where the fraction converges slowly."""
    if not (a > 0 and b > 0) or not 0 <= x <= 1:
        raise ValueError(f"betainc({a}, {b}, {x}): expected a, b > 0 and x in [0, 1]")
    if x in (0, 1):
        return float(x)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def t_cdf(t, df):
    """P(T ≤ t) for Student's t with df degrees of freedom (df > 0, not necessarily whole)."""
    if math.isinf(df):
        return 0.5 * math.erfc(-t / math.sqrt(2))
    x = t * t / (df + t * t)  # P(|T| < |t|) = I_x(1/2, df/2); its complement by the other form near the tails
    tail = 0.5 * (1.0 - betainc(0.5, df / 2, x)) if x < 0.5 else 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q, df):
    """The q-quantile of Student's t: t_ppf(0.975, 4) = 2.776. By bisection on t_cdf."""
    if not 0 < q < 1:
        raise ValueError(f"t_ppf({q}, {df}): expected 0 < q < 1")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2
    while t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return (lo + hi) / 2


def f_sf(F, d1, d2):
    """P(X > F) for X ~ F(d1, d2): the p-value of an F test."""
    if F <= 0:
        return 1.0
    if math.isinf(F):
        return 0.0
    return betainc(d2 / 2, d1 / 2, d2 / (d2 + d1 * F))


# ----------------------------------------------------------------------------- the statistics
LEVEL = 0.95


def welch(a, b, level=LEVEL):
    """mean(a) − mean(b) with Welch's standard error, df, `level` interval and two-sided p."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        raise ValueError(f"welch: needs two values or more in each group (got {na} and {nb})")
    diff = statistics.fmean(a) - statistics.fmean(b)
    va, vb = statistics.variance(a) / na, statistics.variance(b) / nb
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "se": 0.0, "df": math.inf, "lo": diff, "hi": diff, "p": 0.0 if diff else 1.0}
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    h = t_ppf(0.5 + level / 2, df) * se
    return {"diff": diff, "se": se, "df": df, "lo": diff - h, "hi": diff + h, "p": 2 * t_cdf(-abs(diff) / se, df)}


def slope_test(arms, level=LEVEL):
    """The least-squares slope of BPC on ln r_a over every run of the arms (BPC per e-fold of r_a; positive:
    the sparser arm is better), its standard error, n − 2 df, the t interval and the two-sided p of slope = 0."""
    x, y = (np.asarray(v, dtype=float) for v in points(arms))
    n = len(x)
    if n < 3 or np.ptp(x) == 0:
        raise ValueError("slope: needs three runs or more over two r_a or more")
    b, a0 = np.polyfit(x, y, 1)
    sxx = float(((x - x.mean()) ** 2).sum())
    s2 = float(((y - (b * x + a0)) ** 2).sum()) / (n - 2)
    se = math.sqrt(s2 / sxx)
    h = t_ppf(0.5 + level / 2, n - 2) * se
    p = 2 * t_cdf(-abs(b) / se, n - 2) if se > 0 else float(b == 0)
    return {"slope": float(b), "se": se, "df": n - 2, "lo": float(b) - h, "hi": float(b) + h, "p": p}


def lack_of_fit(arms, degree=2):
    """The lack-of-fit F test of a polynomial of `degree` in ln r_a fitted to every run of the arms: pure error
    from each arm's seeds about their mean (n − m df), lack of fit the rest of the fit's residual sum of
    squares (m − degree − 1 df). None when either df is 0."""
    x, y = (np.asarray(v, dtype=float) for v in points(arms))
    m, n = len(arms), len(y)
    df_lof, df_pe = m - degree - 1, n - m
    if df_lof < 1 or df_pe < 1:
        return None
    sse = float(((y - np.polyval(np.polyfit(x, y, degree), x)) ** 2).sum())
    sspe = sum(float(((np.asarray(vs) - np.mean(vs)) ** 2).sum()) for _, vs in arms.values())
    sslof = max(0.0, sse - sspe)
    F = math.inf if sspe == 0 and sslof > 0 else 0.0 if sslof == 0 else (sslof / df_lof) / (sspe / df_pe)
    return {"F": F, "df": (df_lof, df_pe), "p": f_sf(F, df_lof, df_pe), "ss_lof": sslof, "ss_pe": sspe}


# ----------------------------------------------------------------------------- one rung
def summarise(name, rows, split="val"):
    """Everything the ladder reports of one rung on one split, as a dict."""
    dense = by_arm([r for r in rows if r["kind"] == "dense"], split)
    arms = by_arm(curve(rows), split)
    if "dense-C" not in dense or len(arms) < 3:
        raise ValueError(f"{name}: needs dense-C and at least three MoE arms with BPC ({split}); has "
                         f"{', '.join(list(dense) + list(arms)) or 'none'}")
    ref = statistics.fmean(dense["dense-C"][1])
    dC = next(r for r in rows if r["arm"] == "dense-C")
    sparsest = next(iter(arms))
    means = {a: statistics.fmean(vs) for a, (_, vs) in arms.items()}
    best = min(means, key=means.get)
    two = all(len(vs) > 1 for _, vs in arms.values())
    return {"name": name, "rows": rows, "split": split, "dense_C": ref, "dense_DN": dC["D"] / dC["N"],
            "dense": {a: _stats(vs) for a, (_, vs) in dense.items()},
            "arms": {a: {"ra": ra, **_stats(vs), "delta": statistics.fmean(vs) - ref,
                         "vs_sparsest": welch(vs, arms[sparsest][1]) if two and a != sparsest else None,
                         "vs_dense": {d: welch(vs, dvs) for d, (_, dvs) in dense.items() if min(len(vs), len(dvs)) > 1}}
                     for a, (ra, vs) in arms.items()},
            "sparsest": sparsest, "best": best, "best_interior": best not in (sparsest, list(arms)[-1]),
            "slope": slope_test(dict(list(arms.items())[:SPARSEST])), "lack_of_fit": lack_of_fit(arms),
            "quadratic": quadratic(arms), "vertex": vertex(arms), "verdict": verdict(arms, best)}


def verdict(arms, best):
    """The read-out fixed in advance in docs/rung-regime.md: the best arm's lead over the sparsest,
    mean(sparsest) − mean(best), against its Welch standard error sqrt(s_best²/n_best + s_sparsest²/n_sparsest);
    a lead of 2 se or more is resolved. One of: "turns" (an interior best, resolved), "interior best, not
    resolved", "no turn seen" (the sparsest is best), "optimum at the densest arm or above" (resolved or not)."""
    sparsest, densest = next(iter(arms)), list(arms)[-1]
    if best == sparsest:
        return {"lead": 0.0, "se": None, "resolved": False, "text": "no turn seen"}
    b, s = arms[best][1], arms[sparsest][1]
    lead = statistics.fmean(s) - statistics.fmean(b)
    se = math.sqrt(statistics.variance(b) / len(b) + statistics.variance(s) / len(s)) if min(len(b), len(s)) > 1 else None
    resolved = se is not None and lead >= 2 * se
    if best == densest:
        text = f"optimum at the densest arm or above, {'resolved' if resolved else 'not resolved'}"
    else:
        text = "turns" if resolved else "interior best, not resolved"
    return {"lead": lead, "se": se, "resolved": resolved, "text": text}


def _stats(values):
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": list(values)}


def _ra(v):
    return ("none below the arms" if v == 0 else "none above the arms" if math.isinf(v) else
            "< 0.1 %" if v < 0.001 else f"{100 * v:.1f} %")


def _ci(w, digits=3):
    """+0.012 [−0.030, +0.054] (3.1): a difference, its interval and its Welch df."""
    if w is None:
        return ""
    df = "∞" if math.isinf(w["df"]) else f"{w['df']:.1f}"
    return f"{w['diff']:+.{digits}f} [{w['lo']:+.{digits}f}, {w['hi']:+.{digits}f}] ({df})"


def _verdict(v):
    """interior best, not resolved (0.012 = 0.81 se): the verdict, the lead and the lead in se."""
    if v["se"] is None:
        return v["text"] if v["lead"] == 0 else f"{v['text']} ({v['lead']:.3f}, one seed)"
    return f"{v['text']} ({v['lead']:.3f} = {v['lead'] / v['se']:.2f} se)" if v["se"] > 0 else f"{v['text']} ({v['lead']:.3f})"


def _p(p):
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def markdown(by_split):
    """by_split: {split: [one summarise() per rung]}. First one row per rung and split: the best arm, its
    difference to the sparsest, the slope, the lack of fit, the vertex; then per rung every arm on every split."""
    splits = list(by_split)
    out = [f"| rung | dense D/N | split | best arm (lowest mean) | best − sparsest, BPC [95 % CI] (Welch df) | "
           f"slope over the {SPARSEST} sparsest, BPC per e-fold of r_a [95 % CI] (t, df) | quadratic's lack of fit: "
           f"F (df), p | quadratic's vertex (a description) | verdict by docs/rung-regime.md's rule: best's lead over "
           f"the sparsest in Welch se |", "|---|---|---|---|---|---|---|---|---|"]
    for i in range(len(by_split[splits[0]])):
        for split in splits:
            s = by_split[split][i]
            best, sl, lof = s["arms"][s["best"]], s["slope"], s["lack_of_fit"]
            lof_text = "" if lof is None else (f"{lof['F']:.2f} ({lof['df'][0]}, {lof['df'][1]}), {_p(lof['p'])}")
            out.append(f"| {s['name']} | {s['dense_DN']:.3g} | {split} | {100 * best['ra']:.1f} % "
                       f"({best['mean']:.4f}) | {_ci(best['vs_sparsest']) or 'the sparsest'} | "
                       f"{sl['slope']:+.4f} [{sl['lo']:+.4f}, {sl['hi']:+.4f}] ({sl['df']}) | {lof_text} | "
                       f"{_ra(s['vertex'])} | {_verdict(s['verdict'])} |")
    for i in range(len(by_split[splits[0]])):
        first = by_split[splits[0]][i]
        has_2C = all("dense-2C" in by_split[sp][i]["dense"] for sp in splits)
        cols = ["mean ± sd", "− dense at C [95 % CI] (df)"] + ["− dense at 2C [95 % CI] (df)"] * has_2C + \
               ["− sparsest [95 % CI] (df)"]
        out += ["", f"#### {first['name']}: dense at C D/N = {first['dense_DN']:.3g}", "",
                "| arm | r_a | " + " | ".join(f"{sp}: {' | '.join(cols)}" for sp in splits) + " |",
                "|---|---|" + "---|" * len(cols) * len(splits)]
        for a in first["dense"]:
            cells = []
            for sp in splits:
                s = by_split[sp][i]
                d = s["dense"].get(a)
                cells += [""] * len(cols) if d is None else \
                    [f"{d['mean']:.4f} ± {d['sd']:.4f}", f"{d['mean'] - s['dense_C']:+.4f}"] + [""] * (len(cols) - 2)
            out.append(" | ".join([f"| {a}", "100 %", *cells]) + " |")
        for a, d0 in first["arms"].items():
            cells = []
            for sp in splits:
                s = by_split[sp][i]
                d = s["arms"][a]
                mean = f"**{d['mean']:.4f}**" if a == s["best"] else f"{d['mean']:.4f}"
                to_dense = [_ci(d["vs_dense"].get(k)) or f"{d['mean'] - s['dense'][k]['mean']:+.4f}"
                            for k in ("dense-C", "dense-2C")[:1 + has_2C]]
                cells += [f"{mean} ± {d['sd']:.4f}", *to_dense, _ci(d["vs_sparsest"])]
            out.append(" | ".join([f"| {a}", f"{100 * d0['ra']:.2f} %", *cells]) + " |")
    return "\n".join(out)


CSV_FIELDS = ("rung", "dense_D_per_N", "run", "arm", "seed", "kind", "reuse", "E", "K", "De", "Dse", "ra", "N", "C", "D",
              "D_per_N", "unique_tokens", "epochs", "lr", "bpc_val", "bpc_milton", "val_minus_dense_C",
              "bpc_shakespeare")  # the held-out plays where they are not the rung's val (the regime rung's corpus)


def runs_csv(rungs):
    """One row per run of every rung, with D/N and BPC (val) minus the rung's mean dense-C BPC (val)."""
    f = io.StringIO()
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    def val(r):
        return r.get("bpc_val") if isinstance(r.get("bpc_val"), (int, float)) else None
    for s in rungs:
        dense_c = [val(r) for r in s["rows"] if r["arm"] == "dense-C" and val(r) is not None]
        ref = statistics.fmean(dense_c) if dense_c else None
        for r in s["rows"]:
            w.writerow({**r, "rung": s["name"], "dense_D_per_N": f"{s['dense_DN']:.4g}", "D_per_N": f"{r['D'] / r['N']:.4g}",
                        "val_minus_dense_C": f"{val(r) - ref:+.5f}" if val(r) is not None and ref is not None else ""})
    return f.getvalue()


def plot(rungs, path):
    """BPC minus each rung's own dense-C mean against r_a (log axis), error bars ± sd over the seeds; each
    rung's dense at 2C dashed in its colour. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.axhline(0, color="black", lw=1, label="dense at C (each rung's own)")
    for s in rungs:
        pts = list(s["arms"].values())
        line = ax.errorbar([100 * p["ra"] for p in pts], [p["delta"] for p in pts], yerr=[p["sd"] for p in pts],
                           fmt="o-", capsize=3, label=f"{s['name']} (dense D/N {s['dense_DN']:.2g})")
        if "dense-2C" in s["dense"]:
            ax.axhline(s["dense"]["dense-2C"]["mean"] - s["dense_C"], color=line[0].get_color(), ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xticks([5, 10, 20, 30, 50], ["5", "10", "20", "30", "50"])
    ax.minorticks_off()
    ax.set_xlabel("activation rate r_a (%), log scale")
    ax.set_ylabel(f"BPC ({rungs[0]['split']}) − dense at C, mean ± sd")
    ax.legend(fontsize=7)
    ax.set_title("dashed: each rung's dense at 2C; val: the held-out text of each rung's own corpus", fontsize=8)
    fig.tight_layout()
    safe_io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the learning-rate check
def lr_check(folders, split="val", seed=1, margin=LR_MARGIN):
    """folders: {multiplier: rung folder or report.csv}, 1 among them. The arms checked are those of the
    seed that finished at 1 and at one other multiplier at least; a run that did not finish (stopped on a NaN,
    or missing) counts as inf, worse than any. Returns each arm's BPC per multiplier and best multiplier, the
    order of the arms at each multiplier, and the rule: each family (the MoE arms, the dense model) takes the
    multiplier with the lowest mean BPC over its checked arms, unless that beats the mean at 1 (StepLaw) by
    no more than `margin` BPC, in which case it keeps 1."""
    if 1.0 not in folders or len(folders) < 2:
        raise ValueError(f"lr-check needs the multiplier 1 and another (got {', '.join(f'{m:g}' for m in folders)})")
    bpc = {}
    for m, path in folders.items():
        rows = load_rung(path)
        rungs = sorted({str(r["rung"]) for r in rows if "rung" in r})
        if len(rungs) > 1:
            raise ValueError(f"{path} holds {len(rungs)} rungs ({', '.join(rungs)}): lr-check takes one rung's folder "
                             f"or report.csv per multiplier")
        for r in rows:
            if r.get("seed") == seed and r["reuse"] == "none" and isinstance(r.get(f"bpc_{split}"), (int, float)):
                bpc.setdefault(r["arm"], {})[m] = r[f"bpc_{split}"]
    arms = [a for a, v in bpc.items() if 1.0 in v and len(v) > 1 and a != "dense-2C"]
    if not arms:
        raise ValueError(f"lr-check: no arm of seed {seed} finished at 1 and at another multiplier")
    mults = sorted(folders)
    bpc = {a: {m: bpc[a].get(m, math.inf) for m in mults} for a in arms}
    order = {m: sorted(arms, key=lambda a: bpc[a][m]) for m in mults}
    choice = {}
    for family in ("moe", "dense"):
        members = [a for a in arms if a.startswith(family)]
        if members:
            mean = {m: statistics.fmean(bpc[a][m] for a in members) for m in mults}
            best = min(mults, key=mean.get)
            choice[family] = best if mean[1.0] - mean[best] > margin else 1.0
    return {"bpc": bpc, "mults": mults, "order": order, "order_moves": len({tuple(o) for o in order.values()}) > 1,
            "best": {a: min(mults, key=bpc[a].get) for a in arms}, "choice": choice, "margin": margin, "split": split}


def lr_markdown(c):
    out = [f"| arm ({c['split']}, seed 1) | " + " | ".join(f"× {m:g}" for m in c["mults"]) + " | best |",
           "|---" * (len(c["mults"]) + 2) + "|"]
    for a, v in c["bpc"].items():
        out.append(f"| {a} | " + " | ".join("did not finish" if math.isinf(v[m]) else f"{v[m]:.4f}" for m in c["mults"])
                   + f" | × {c['best'][a]:g} |")
    out.append("")
    for m, o in c["order"].items():
        out.append(f"- order at × {m:g} (best first): {', '.join(o)}")
    out.append(f"- the order of the arms {'MOVES' if c['order_moves'] else 'does not move'} with the rate")
    out.append("- the rule (each family's lowest mean, kept at × 1 unless better by more than "
               f"{c['margin']} BPC): " + ", ".join(f"{f} × {m:g}" for f, m in c["choice"].items()))
    return "\n".join(out)


# ----------------------------------------------------------------------------- command line
OUTPUTS = {"ladder-runs.csv": lambda b: b.startswith(b"rung,dense_D_per_N,"),
           "ladder.png": lambda b: b.startswith(b"\x89PNG\r\n\x1a\n")}


def load_rungs(path):
    """[(name, rows)] of one argument: a rung (load_rung, named by rung_name), or every rung of a ladder-runs.csv
    (a CSV with a rung column), in its order."""
    rows = load_rung(path)
    if rows and "rung" in rows[0]:
        return [(str(n), [r for r in rows if r["rung"] == n]) for n in dict.fromkeys(r["rung"] for r in rows)]
    return [(rung_name(path), rows)]


def common_splits(rungs):
    """The validation splits (bpc_<split> with numbers) that every rung's runs have, val first."""
    have = [{k[4:] for r in rows for k, v in r.items() if k.startswith("bpc_") and isinstance(v, (int, float))}
            for rows in rungs]
    common = set.intersection(*have) if have else set()
    return sorted(common, key=lambda s: (s != "val", s))


def rung_name(path):
    """A rung's name: its sweep folder's (the folder of a report.csv), else the file's stem."""
    path = Path(path)
    return path.name if path.is_dir() else path.parent.name if path.name == "report.csv" else path.stem


def parser():
    p = helptext.Parser(prog="ladder_report.py", allow_abbrev=False, description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", allow_abbrev=False, help="tables, the fits, a CSV of every run, the figure")
    r.add_argument("rungs", nargs="+", help="sweep folders or report.csv files, one per rung, lowest D/N first; "
                                            "or a ladder-runs.csv, every rung of it")
    r.add_argument("--out", help="write ladder-runs.csv and ladder.png in this folder")
    r.add_argument("--split", action="append", default=[], help="a validation split of the statistics (repeatable; "
                                                                "default: every split all the rungs have, val first)")
    r.add_argument("--dense", action="append", default=[], metavar="RUNG=FOLDER",
                   help="take the dense runs of RUNG (its folder's name) from FOLDER, e.g. "
                        "sweep-ladder-04=runs/sweep-ladder-04-dense0.5")
    r.add_argument("--arm", action="append", default=[], metavar="RUNG=FOLDER:ARM",
                   help="take the runs of one arm of RUNG from FOLDER, e.g. "
                        "sweep-regime-lr0.5=runs/sweep-regime:moe-ra14.0-E76-K4-De24")
    c = sub.add_parser("lr-check", allow_abbrev=False, help="the learning-rate check of one rung, and the rule")
    c.add_argument("folders", nargs="+", metavar="MULT=FOLDER", help="e.g. 0.5=runs/sweep-ladder-04-lr0.5 1=runs/sweep-ladder-04")
    c.add_argument("--split", default="val")
    c.add_argument("--margin", type=float, default=LR_MARGIN, help=f"BPC a multiplier must win by (default {LR_MARGIN})")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    try:
        if a.cmd == "lr-check":
            if not (0 <= a.margin < 1):
                raise ValueError(f"--margin={a.margin}: expected BPC in [0, 1)")
            folders = {}
            for item in a.folders:
                m, sep, folder = item.partition("=")
                try:
                    mult = float(m)
                except ValueError:
                    mult = math.nan
                if not sep or not folder or not 0 < mult < math.inf:
                    raise ValueError(f"{item!r}: expected MULT=FOLDER with a multiplier above 0, e.g. "
                                     f"0.5=runs/sweep-ladder-04-lr0.5")
                folders[mult] = folder
            print(lr_markdown(lr_check(folders, a.split, margin=a.margin)))
            return
        loaded = [(name, rows, p) for p in a.rungs for name, rows in load_rungs(p)]
        names = [name for name, _, _ in loaded]
        if len(set(names)) < len(names):
            raise ValueError(f"two rungs of one name ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
        taken = []  # (rung, folder, which runs, the flag as given)
        for flag, items in (("--dense", a.dense), ("--arm", a.arm)):
            for item in items:
                name, sep, folder = item.partition("=")
                folder, colon, arm = folder.rpartition(":") if flag == "--arm" else (folder, ":", None)
                if not sep or not folder or not colon or arm == "" or name not in names:
                    raise ValueError(f"{flag} {item!r}: expected RUNG=FOLDER{':ARM' if arm is not None else ''}, RUNG the "
                                     f"name of one of the rungs given")
                pick = (lambda r: r["kind"] == "dense") if arm is None else (lambda r, arm=arm: r["arm"] == arm)
                taken.append((name, folder, pick, f"{flag} {item}"))
        merged = []
        for name, rows, p in loaded:
            planned = sweep_report.read_plan(Path(p) / "plan.json") if Path(p).is_dir() else None
            for _, folder, pick, flag in (t for t in taken if t[0] == name):
                rows = with_runs_from(rows, folder, flag, pick, planned)
            merged.append((name, rows))
        splits = a.split or common_splits([rows for _, rows in merged])
        if not splits:
            raise ValueError("no validation split (a bpc_<split> column) that every rung has")
        by_split = {sp: [summarise(name, rows, sp) for name, rows in merged] for sp in dict.fromkeys(splits)}
        rungs = by_split[splits[0]]
        print(markdown(by_split))
        if a.out:
            out = Path(a.out)
            for name, ours in OUTPUTS.items():  # written again by every report, and never over anything else
                safe_io.check_replaceable(out / name, ours, "a ladder report")
            safe_io.write_text(out / "ladder-runs.csv", runs_csv(rungs))
            png = plot(rungs, out / "ladder.png")
            print(f"\nwrote {out / 'ladder-runs.csv'}" + (f", {png}" if png else " (pip install matplotlib for the figure)"))
    except (ValueError, OSError) as e:
        print(f"ladder_report.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
