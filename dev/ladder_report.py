"""The tokens-per-parameter ladder's analysis (docs/ladder.md). A rung is one sweep: its folder of
runs, or the report.csv that `sweep.py report` wrote for it. For each rung: BPC per arm (mean ± sd over the
seeds) and relative to the rung's own dense model at C; the slope of BPC against ln r_a over the four
sparsest arms; the vertex of a quadratic in ln r_a over all its arms; both with a bootstrap interval. For
all rungs: one CSV of every run and one figure. And the learning-rate check's table with its rule. No torch.

    python dev/ladder_report.py report runs/sweep-cpu runs/sweep-ladder-04 runs/sweep-ladder-07 [--out=docs]
        [--dense sweep-ladder-04=runs/sweep-ladder-04-dense0.5]   # a rung's dense runs from another folder
    python dev/ladder_report.py lr-check 0.5=runs/sweep-ladder-04-lr0.5 1=runs/sweep-ladder-04 2=runs/sweep-ladder-04-lr2

Fits are least squares over every run (each seed's BPC a point), x = ln r_a. Intervals come from a residual
bootstrap: fit, take the residuals of all the fit's runs, centre them and scale them by sqrt(n/(n − p)) for the
p fitted coefficients, then 2,000 times (a fixed seed) add residuals drawn with replacement to the fitted
values and fit again; the interval is the 2.5 and 97.5 percentiles. With three seeds an arm, resampling each
arm's own runs instead covers a true vertex only ~80 % of the time (10 distinct draws an arm, variance × 2/3),
this ~92 % (200 synthetic rungs of eight arms). A quadratic that opens downwards (or is flat) has no minimum:
its vertex counts as below every r_a when the fit is lower at the sparsest arm than at the densest (the sparse
end is better) and above every r_a otherwise, so the percentiles of the vertex stay defined.
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
from harness import rundir
from harness import safe_io
from harness import sweep_report

SPARSEST = 4        # the arms the slope is fitted over
N_BOOT = 2000
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


def with_dense_from(rows, folder, name, planned=None):
    """The rung's MoE runs with the dense runs of another sweep folder (the same plans at another learning
    rate, as the ladder's learning-rate check may choose): each must match a dense run of the rung in arm,
    seed, N, C and D, and every dense run of the rung must be there. The rung's dense runs are those of its
    plan (`planned`: the rows of its plan.json) when it has one, so that they need not have been trained."""
    ours = {(r["arm"], r["seed"]): r for r in (planned or rows) if r["kind"] == "dense"}
    theirs = [r for r in load_rung(folder) if r["kind"] == "dense"]
    found = {(r["arm"], r["seed"]) for r in theirs}
    for r in theirs:
        mine = ours.get((r["arm"], r["seed"]))
        if mine is None or any(mine[k] != r[k] for k in ("N", "C", "D")):
            raise ValueError(f"--dense {name}={folder}: {r['run']} is no dense run of {name} (arm, seed, N, C, D)")
    if set(ours) - found:
        raise ValueError(f"--dense {name}={folder}: lacks {', '.join(f'{a} seed {s}' for a, s in sorted(set(ours) - found))}")
    return [r for r in rows if r["kind"] != "dense"] + theirs


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


def slope(arms):
    """Least-squares slope of BPC against ln r_a over every run of the arms: BPC per e-fold of r_a. Positive:
    BPC rises with r_a, the sparser arm is better."""
    return float(np.polyfit(*points(arms), 1)[0])


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


def bootstrap(arms, stat, degree, n=N_BOOT, seed=0):
    """stat over n residual-bootstrap copies of the arms: the polynomial of `degree` in ln r_a fitted to every
    run, plus residuals drawn with replacement from its own (centred, scaled by sqrt(n/(n − p)))."""
    x, y = points(arms)
    fit = np.polyval(np.polyfit(x, y, degree), x)
    res = (np.asarray(y) - fit) * math.sqrt(len(y) / max(1, len(y) - degree - 1))
    res -= res.mean()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        values = iter(fit + res[rng.integers(0, len(res), len(res))])
        out.append(stat({a: (ra, [float(next(values)) for _ in vs]) for a, (ra, vs) in arms.items()}))
    return out


def interval(samples, level=0.95):
    """The (1 − level)/2 and (1 + level)/2 percentiles (of values that may be 0 or inf: order is all they need)."""
    s = sorted(samples)
    lo, hi = (1 - level) / 2, (1 + level) / 2
    return s[min(len(s) - 1, int(lo * len(s)))], s[min(len(s) - 1, math.ceil(hi * len(s)) - 1)]


# ----------------------------------------------------------------------------- one rung
def summarise(name, rows, split="val", n_boot=N_BOOT):
    """Everything the ladder reports of one rung, as a dict."""
    dense = by_arm([r for r in rows if r["kind"] == "dense"], split)
    arms = by_arm(curve(rows), split)
    if "dense-C" not in dense or len(arms) < 3:
        raise ValueError(f"{name}: needs dense-C and at least three MoE arms with BPC ({split}); has "
                         f"{', '.join(list(dense) + list(arms)) or 'none'}")
    ref = statistics.fmean(dense["dense-C"][1])
    dC = next(r for r in rows if r["arm"] == "dense-C")
    sparse = dict(list(arms.items())[:SPARSEST])
    slopes, vertices = bootstrap(sparse, slope, 1, n_boot), bootstrap(arms, vertex, 2, n_boot)
    lo, hi = min(a[0] for a in arms.values()), max(a[0] for a in arms.values())
    return {"name": name, "rows": rows, "split": split, "dense_C": ref, "dense_DN": dC["D"] / dC["N"],
            "dense": {a: _stats(vs) for a, (_, vs) in dense.items()},
            "arms": {a: {"ra": ra, **_stats(vs), "delta": statistics.fmean(vs) - ref} for a, (ra, vs) in arms.items()},
            "slope": slope(sparse), "slope_ci": interval(slopes), "quadratic": quadratic(arms),
            "vertex": vertex(arms), "vertex_ci": interval(vertices),
            "vertex_inside": sum(lo <= v <= hi for v in vertices) / len(vertices), "n_boot": n_boot}


def _stats(values):
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": list(values)}


def _ra(v):
    return "none below" if v == 0 else "none above" if math.isinf(v) else f"{100 * v:.3g} %"


def markdown(rungs):
    """Per rung, mean ± sd per arm and relative to dense at C; then the slope and vertex of every rung."""
    out = []
    for s in rungs:
        out += [f"### {s['name']}: dense at C D/N = {s['dense_DN']:.3g}, BPC ({s['split']})", "",
                "| arm | r_a | BPC mean ± sd | − dense at C | per seed |", "|---|---|---|---|---|"]
        for a, d in s["dense"].items():
            out.append(f"| {a} | 100 % | {d['mean']:.4f} ± {d['sd']:.4f} | {d['mean'] - s['dense_C']:+.4f} | "
                       + ", ".join(f"{v:.4f}" for v in d["values"]) + " |")
        for a, d in s["arms"].items():
            out.append(f"| {a} | {100 * d['ra']:.2f} % | {d['mean']:.4f} ± {d['sd']:.4f} | {d['delta']:+.4f} | "
                       + ", ".join(f"{v:.4f}" for v in d["values"]) + " |")
        out.append("")
    out += [f"| rung | dense D/N | slope over the {SPARSEST} sparsest (BPC per e-fold of r_a) [95 % CI] | "
            f"quadratic c2 | vertex r_a [95 % CI] | resamples with a minimum inside the range |", "|---|---|---|---|---|---|"]
    for s in rungs:
        (a, b), (lo, hi) = s["slope_ci"], s["vertex_ci"]
        out.append(f"| {s['name']} | {s['dense_DN']:.3g} | {s['slope']:+.4f} [{a:+.4f}, {b:+.4f}] | "
                   f"{s['quadratic'][0]:+.4f} | {_ra(s['vertex'])} [{_ra(lo)}, {_ra(hi)}] | "
                   f"{100 * s['vertex_inside']:.0f} % of {s['n_boot']} |")
    return "\n".join(out)


CSV_FIELDS = ("rung", "dense_D_per_N", "run", "arm", "seed", "kind", "reuse", "E", "K", "De", "Dse", "ra", "N", "C", "D",
              "D_per_N", "unique_tokens", "epochs", "lr", "bpc_val", "bpc_milton", "val_minus_dense_C")


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
    ax.set_title("dashed: each rung's dense at 2C", fontsize=8)
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
        for r in load_rung(path):
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


def rung_name(path):
    """A rung's name: its sweep folder's (the folder of a report.csv), else the file's stem."""
    path = Path(path)
    return path.name if path.is_dir() else path.parent.name if path.name == "report.csv" else path.stem


def parser():
    p = argparse.ArgumentParser(prog="ladder_report.py", allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", allow_abbrev=False, help="tables, the fits, a CSV of every run, the figure")
    r.add_argument("rungs", nargs="+", help="sweep folders or report.csv files, one per rung, lowest D/N first")
    r.add_argument("--out", help="write ladder-runs.csv and ladder.png in this folder")
    r.add_argument("--split", default="val", help="the validation split of the fits (default val)")
    r.add_argument("--boot", type=int, default=N_BOOT, help=f"bootstrap resamples (default {N_BOOT})")
    r.add_argument("--dense", action="append", default=[], metavar="RUNG=FOLDER",
                   help="take the dense runs of RUNG (its folder's name) from FOLDER, e.g. "
                        "sweep-ladder-04=runs/sweep-ladder-04-dense0.5")
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
        if not 1 <= a.boot <= 100_000:
            raise ValueError(f"--boot={a.boot}: expected 1 to 100,000 resamples")
        dense_from = {}
        for item in a.dense:
            name, sep, folder = item.partition("=")
            if not sep or not folder or name not in {rung_name(p) for p in a.rungs}:
                raise ValueError(f"--dense {item!r}: expected RUNG=FOLDER, RUNG the name of one of the rungs given")
            dense_from[name] = folder
        rungs = []
        for p in a.rungs:
            rows = load_rung(p)
            if rung_name(p) in dense_from:
                planned = sweep_report.read_plan(Path(p) / "plan.json") if Path(p).is_dir() else None
                rows = with_dense_from(rows, dense_from[rung_name(p)], rung_name(p), planned)
            rungs.append(summarise(rung_name(p), rows, a.split, a.boot))
        md = markdown(rungs)
        print(md)
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
