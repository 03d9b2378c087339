"""A sweep's report: one row per arm with mean ± sd over its seeds (report.md), one row per run
(report.csv), and BPC against r_a with error bars and the dense baselines as bands (report.png with
matplotlib, a text plot always); beside it every run's BPC at each evaluation against the tokens and
against the FLOPs spent so far (report-curves.png, from the runs' log.jsonl).

    python sweep.py report runs/sweep-toy [--split=val]
"""
import csv
import io
import json
import re
import statistics
from pathlib import Path

from harness import rundir
from harness import safe_io


def collect(run_dir):
    """One row per run directory holding a summary.json, in the plan's order when plan.json is there."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such folder")
    order = {r["name"]: (i, r) for i, r in enumerate(read_plan(run_dir / "plan.json"))}
    rows = []
    for summary in sorted(run_dir.glob("*/summary.json")):
        s = rundir.read_summary(summary)
        if s is None or not all(rundir.is_number(s.get(k)) for k in ("ra", "N", "C", "D", "unique_tokens", "epochs")) \
                or not all(k in s["config"]["model"] for k in SHAPE):
            rundir.warn(f"{summary}: left out of the report (damaged): sweep.py run resumes that run")
            continue
        m = s["config"]["model"]
        name = summary.parent.name
        if order and name not in order:
            rundir.warn(f"{summary}: left out of the report: {name} is no run of {run_dir / 'plan.json'}")
            continue
        planned_row = order.get(name, (len(order), {}))[1]
        differ = changed_plan(planned_row, s)
        if differ:
            raise ValueError(f"{summary} is a run of another plan than {run_dir / 'plan.json'} ({'; '.join(differ)}): "
                             f"its numbers would be reported under this plan; remove the run, and sweep.py run runs it again")
        moe = m["scheme"] != "dense"
        seed = s["config"]["train"].get("seed", 0)
        arm = planned_row.get("arm") or re.sub(r"-s\d+$", "", name)
        rows.append({"run": name, "arm": arm, "seed": seed, "kind": "moe" if moe else "dense",
                     "reuse": planned_row.get("reuse", "none"),
                     "E": m["E"] if moe else "", "K": m["K"] if moe else "", "De": m["De"] if moe else "",
                     "Dse": m["Dse"] if moe else "", "ra": s["ra"], "N": s["N"], "C": s["C"], "D": s["D"],
                     "unique_tokens": s["unique_tokens"], "epochs": s["epochs"], "finished": rundir.finished(s),
                     "threads": threads_of(s),
                     **{f"bpc_{k.removeprefix('bpc_')}": v for k, v in s["final"].items()}})
    rows.sort(key=lambda r: order.get(r["run"], (len(order),))[0])
    if not rows:
        raise ValueError(f"{run_dir}: no run directory with a summary.json")
    return rows


def threads_of(summary):
    """The CPU thread counts a run trained on, as text: "2", or "2→1" for a run resumed on another count
    (its bits depend on them); "" for a run whose summary does not say."""
    threads = summary.get("threads")
    return "→".join(map(str, threads)) if isinstance(threads, list) and all(map(rundir.is_count, threads)) else ""


def read_plan(path):
    """The runs of a sweep's plan.json ([] when there is none), each with the fields the report reads."""
    if not Path(path).exists():
        return []
    try:
        runs = json.loads(safe_io.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError, RecursionError) as e:
        runs = type(e).__name__
    fields = {"name": str, "arm": str, "reuse": str, "shape": dict, "iters": int, "batch_seqs": int, "D": int,
              "lr": float, "warmup": int}
    if not (isinstance(runs, list) and all(isinstance(r, dict) and all(isinstance(r.get(k), t) for k, t in fields.items())
                                           and r["reuse"] in REUSE and r.get("kind") in ("moe", "dense") for r in runs)):
        raise ValueError(f"{path} is damaged (not a list of runs with {', '.join(fields)}, a kind and a reuse of "
                         f"{', '.join(REUSE)}): sweep.py run rewrites it")
    return runs


REUSE = ("none", "strict", "loose")  # the data-reuse variants of a sweep (sweep.py plans them)
SHAPE = ("scheme", "L", "Dm", "H", "Dh", "Dffn", "E", "K", "De", "Dse", "S")


def changed_plan(planned, summary):
    """Where a run's summary differs from its row of plan.json: the shape, the budget and schedule, the seed."""
    model = summary["config"]["model"]
    diff = [f"model.{k}: run {model.get(k)!r}, plan {v!r}" for k, v in planned.get("shape", {}).items() if model.get(k) != v]
    diff += [f"{k}: run {summary.get(k)!r}, plan {planned[k]!r}" for k in ("iters", "batch_seqs", "D", "lr", "warmup")
             if k in planned and summary.get(k) != planned[k]]
    if planned.get("seed") is not None and summary["config"]["train"].get("seed") != planned["seed"]:
        diff.append(f"seed: run {summary['config']['train'].get('seed')!r}, plan {planned['seed']!r}")
    return diff


def arms(rows, splits):
    """One row per arm: its runs over the seeds, with the mean, standard deviation (n − 1) and values of
    each split's BPC. An arm with one seed has sd 0."""
    out = {}
    for r in rows:
        out.setdefault(r["arm"], []).append(r)
    table = []
    for arm, runs in out.items():
        row = {k: runs[0][k] for k in ("arm", "kind", "reuse", "E", "K", "De", "Dse", "ra", "N", "C", "D",
                                       "unique_tokens", "epochs")}
        row.update(seeds=[r["seed"] for r in runs], finished=all(r["finished"] for r in runs),
                   threads=", ".join(dict.fromkeys(r["threads"] for r in runs if r.get("threads"))))
        for s in splits:
            values = [r[f"bpc_{s}"] for r in runs if f"bpc_{s}" in r]
            if values:
                row[f"bpc_{s}"] = statistics.fmean(values)
                row[f"sd_{s}"] = statistics.stdev(values) if len(values) > 1 else 0.0
                row[f"values_{s}"] = values
        table.append(row)
    return table


def markdown(table, splits):
    """The arms, BPC as mean ± sd over the seeds, and each seed's value of the first split."""
    n = max(len(r["seeds"]) for r in table)
    cols = ["arm", "r_a", "E", "K", "De", "Dse", "N", "C", "D", "unique", "epochs", "threads"] + \
        [f"BPC {s}" + (" (mean ± sd)" if n > 1 else "") for s in splits] + ([f"{splits[0]} per seed"] if n > 1 else [])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table:
        partial = f" ({len(r['seeds'])} of {n} seeds)" if len(r["seeds"]) < n else ""
        cells = [r["arm"] + ("" if r["finished"] else " (unfinished)") + partial, f"{100 * r['ra']:.2f} %", r["E"], r["K"],
                 r["De"], r["Dse"], f"{r['N']:,}", f"{r['C']:.3g}", f"{r['D']:.3g}", f"{r['unique_tokens']:.3g}",
                 f"{r['epochs']:.2f}", r["threads"]]
        cells += [(f"{r[f'bpc_{s}']:.4f}" + (f" ± {r[f'sd_{s}']:.4f}" if n > 1 else "")) if f"bpc_{s}" in r else ""
                  for s in splits]
        if n > 1:
            cells.append(", ".join(f"{v:.4f}" for v in r.get(f"values_{splits[0]}", [])))
        out.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(out)


def text_plot(table, split, width=60, height=16):
    """Mean BPC against r_a as characters: o MoE (s strict, l loose), - dense at C, = dense at 2C."""
    moe = [r for r in table if r["kind"] == "moe" and f"bpc_{split}" in r]
    dense = {r["arm"]: r[f"bpc_{split}"] for r in table if r["kind"] == "dense" and f"bpc_{split}" in r}
    ys = [r[f"bpc_{split}"] for r in moe] + list(dense.values())
    if not moe or not ys:
        return "(nothing to plot)"
    x0, x1 = min(r["ra"] for r in moe), max(r["ra"] for r in moe)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or 0.01
    y0, y1 = y0 - pad, y1 + pad
    grid = [[" "] * width for _ in range(height)]

    def row_of(y):
        return min(height - 1, max(0, round((y1 - y) / (y1 - y0) * (height - 1))))
    for name, mark in (("dense-C", "-"), ("dense-2C", "=")):
        if name in dense:
            grid[row_of(dense[name])] = [mark] * width
    for r in moe:
        col = 0 if x1 == x0 else round((r["ra"] - x0) / (x1 - x0) * (width - 1))
        grid[row_of(r[f"bpc_{split}"])][col] = {"none": "o", "strict": "s", "loose": "l"}[r["reuse"]]
    lines = [f"{y1 - (y1 - y0) * i / (height - 1):7.4f} |" + "".join(g) for i, g in enumerate(grid)]
    lines.append(" " * 8 + "+" + "-" * width)
    lines.append(" " * 9 + f"r_a {100 * x0:.1f} %" + " " * (width - 22) + f"{100 * x1:.1f} %")
    lines.append(f"mean BPC ({split}) against r_a: o MoE, s strict reuse, l loose reuse; - dense at C, = dense at 2C")
    return "\n".join(lines)


def plot(table, split, path):
    """Fig. 1b of the paper: mean BPC against r_a with error bars of one standard deviation over the
    seeds, and the dense baselines as bands (mean ± sd). Needs matplotlib; None without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    n = max(len(r["seeds"]) for r in table)
    ras = [100 * r["ra"] for r in table if r["kind"] == "moe"]
    nudge = 0.012 * (max(ras) - min(ras)) if ras else 0.0  # reuse arms drawn just beside their r_a, not on it
    for reuse, style, dx in (("none", "o-", 0), ("strict", "s", -nudge), ("loose", "^", nudge)):
        pts = sorted((r["ra"], r[f"bpc_{split}"], r[f"sd_{split}"]) for r in table
                     if r["kind"] == "moe" and r["reuse"] == reuse and f"bpc_{split}" in r)
        if pts:
            ax.errorbar([100 * x + dx for x, _, _ in pts], [y for _, y, _ in pts], yerr=[e for _, _, e in pts],
                        fmt=style, capsize=3, label=f"MoE ({reuse} reuse)" if reuse != "none" else "MoE")
    for name, color in (("dense-C", "tab:red"), ("dense-2C", "tab:green")):
        for r in table:
            if r["arm"] == name and f"bpc_{split}" in r:
                y, e = r[f"bpc_{split}"], r[f"sd_{split}"]
                ax.axhline(y, color=color, ls="--", lw=1, label=name.replace("-", " at "))
                ax.axhspan(y - e, y + e, color=color, alpha=0.15, lw=0)
    ax.set_xlabel("activation rate r_a (%)")
    ax.set_ylabel(f"BPC ({split})" + (f", mean ± sd over {n} seeds" if n > 1 else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    safe_io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


def read_curves(run_dir, rows, split):
    """{run: [(tokens, FLOPs, BPC)]}: each run's evaluations of split from its log.jsonl, FLOPs = C/D per token
    (M_train, M11). A run whose log cannot be read is left out with a warning."""
    curves = {}
    for r in rows:
        try:
            records = rundir.read_log(Path(run_dir) / r["run"] / "log.jsonl")
        except (OSError, ValueError) as e:
            rundir.warn(f"{r['run']}: left out of the curves ({e})")
            continue
        points = {x["step"]: x for x in records if x["kind"] == "eval" and f"bpc_{split}" in x
                  and rundir.is_number(x.get("tokens"))}  # by step: a resumed run's evaluation counts once
        curves[r["run"]] = [(x["tokens"], x["tokens"] * r["C"] / r["D"], x[f"bpc_{split}"])
                            for _, x in sorted(points.items())]
    return curves


def plot_curves(rows, curves, split, path):
    """Two panels, BPC against the tokens D and against the FLOPs C spent so far, a line per run: MoE arms
    coloured by r_a, the dense baselines dashed in report.png's colours, one legend entry per arm. None
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    ras = [r["ra"] for r in rows if r["kind"] == "moe"] or [0.0]
    labelled = set()
    for r in rows:
        points = curves.get(r["run"])
        if not points:
            continue
        share = (r["ra"] - min(ras)) / ((max(ras) - min(ras)) or 1)
        dense = {"dense-C": "tab:red", "dense-2C": "tab:green"}.get(r["arm"], "black")
        style = dict(color=dense, ls="--") if r["kind"] == "dense" else dict(color=plt.cm.viridis(0.9 * share), ls="-")
        label = None if r["arm"] in labelled else r["arm"]
        labelled.add(r["arm"])
        for ax, x in zip(axes, (0, 1)):
            ax.plot([p[x] for p in points], [p[2] for p in points], marker=".", lw=1, label=label, **style)
    for ax, name in zip(axes, ("tokens D", "training FLOPs C = M_train·D")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: no labels on top of each other
        ax.set_xlabel(name)
    axes[0].set_ylabel(f"BPC ({split}) at each evaluation")
    axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    safe_io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


MARK = "<!-- sweep.py report: written again by each report -->\n"
PNG = b"\x89PNG\r\n\x1a\n"
REPORT_FILES = {"report.md": lambda b: b.startswith(MARK.encode()), "report.csv": lambda b: b.startswith(b"run,arm,"),
                "report.png": lambda b: b.startswith(PNG), "report-curves.png": lambda b: b.startswith(PNG)}


def report(run_dir, split=None):
    """report.md (one row per arm: mean ± sd over seeds), report.csv (one row per run), report.png."""
    rows = collect(run_dir)
    splits = sorted({k.removeprefix("bpc_") for r in rows for k in r if k.startswith("bpc_")},
                    key=lambda s: (s != "val", s))
    split = split or (splits[0] if splits else None)
    if split not in splits:
        raise ValueError(f"--split={split!r}: no BPC for that split in {run_dir} (have {', '.join(splits) or 'none'})")
    table = arms(rows, splits)
    md = markdown(table, splits)
    run_dir = Path(run_dir)
    for name, ours in REPORT_FILES.items():  # written again by every report, and never over anything else
        safe_io.check_replaceable(run_dir / name, ours, "a sweep report")
    safe_io.write_text(run_dir / "report.md", MARK + md + "\n")
    per_run = io.StringIO()
    w = csv.DictWriter(per_run, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    safe_io.write_text(run_dir / "report.csv", per_run.getvalue())
    print(md)
    print()
    print(text_plot(table, split))
    png = plot(table, split, run_dir / "report.png")
    curves = plot_curves(rows, read_curves(run_dir, rows, split), split, run_dir / "report-curves.png")
    print(f"\nwrote {run_dir / 'report.md'}, {run_dir / 'report.csv'}"
          + (f", {png}, {curves}" if png else " (pip install matplotlib for report.png and report-curves.png)"))
    return table
