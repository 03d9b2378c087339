"""A sweep's plan: the sweep file read and checked, every run of it planned at equal N and C (docs/method.md
§6–8; (Mn) tags are its equations), each through train.py's own checks, and what train.py is told for it.
No torch: planning a sweep loads none.

A sweep fixes the MoE backbone (L, Dm, H, Dh, layout) and the total expert width Dse + E·De = μ·Dm,
so N is fixed; each target r_a picks (E, K, De) with Dse = K·De, and each run trains on
D = C / M_train tokens: sparser models see more. Dense baselines of the same N, with their own shape,
train at C and at "2C". Data-reuse variants: none (fresh tokens), strict (the unique tokens of the dense
baseline at C, epochs = D/D̂) and loose (two epochs over D/2). A plan that breaks equal resources is
refused with the numbers (docs/method.md §8).
"""
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import flops

from harness import config
from harness import preflight
from harness import rundir
from harness import safe_io
from harness import schedule
from harness.sweep_report import REUSE

ROOT = Path(__file__).resolve().parent.parent  # the project
BACKBONE = ("scheme", "L", "Dm", "H", "Dh", "Dffn", "S")
# what the sweep decides for every run; [train] may set anything else train.py knows
SWEEP_OWNED = ("iters", "tokens", "compute", "batch_seqs", "lr", "lr_mult", "unique_tokens", "out_dir",
               "include_router", "stop_at", "warmup", "seed", "wandb_run_name", "wandb_group")


@dataclass
class Sweep:
    compute: float                 # C of every MoE run and of the dense baseline at C (FLOPs)
    ra: list = field(default_factory=list)      # target activation rates r_a, an MoE arm each (give ra or K)
    K: list = field(default_factory=list)       # experts per token, an MoE arm each, of expert width De (give ra or K)
    De: int = 0                    # the expert width for a K list
    reuse: list = field(default_factory=lambda: ["none"])  # data-reuse arms: none (fresh tokens), strict (the
    #                                                        unique tokens of the dense baseline at C), loose (two
    #                                                        epochs over D/2)
    reuse_at: list = field(default_factory=list)  # target r_a of the strict/loose arms; [] = every r_a; ["best"] = the
    #                                               r_a whose no-reuse arm has the lowest mean BPC, once all have run
    seeds: list = field(default_factory=list)     # every arm once per seed (init and data order; same data); [] = one
    warmup_frac: float = 0.0       # warmup as a share of each run's iterations; 0 = the paper's clip(0.01·iters, 200, 2000)
    dense_2C: float = 2.0          # the "2C" baseline's multiple of C (paper: 1.75 at 2B, 1.91 at 7B)
    include_router: bool = True    # count the router in N, Na and C (docs/method.md §4)
    E_pref: int = 64               # among shapes of equal r_a, prefer E nearest this
    De_multiple: int = 8           # expert widths considered
    tolerance: float = 0.01        # |N/N_dense − 1| and |C/C_dense − 1| allowed (docs/method.md §8)


@dataclass
class Arm:
    """The MoE backbone or the dense baseline, with multipliers on its StepLaw lr and batch."""
    shape: flops.Shape    # the table's backbone keys (scheme, L, Dm, H, Dh, Dffn, S)
    mu: float = 0.0       # [moe] only, required: the total expert width (Dse + E·De)/Dm, which fixes N
    lr_mult: float = 1.0  # multiplies the StepLaw learning rate
    batch_mult: float = 1.0  # multiplies the StepLaw batch


@dataclass
class Run:
    name: str        # the arm, then -s<seed> when the sweep has seeds
    kind: str        # moe | dense
    reuse: str
    shape: dict
    N: int
    Na: int
    ra: float
    M_train: float
    iters: int
    batch_seqs: int
    lr: float
    D: int
    C: float
    unique_tokens: int
    epochs: float
    arm: str = ""    # the name without the seed: what report averages over
    seed: int = None  # None: train.py's default (a sweep without seeds)
    warmup: int = 0
    ra_target: float = 0.0

    @property
    def batch_tokens(self):
        return self.batch_seqs * self.shape["S"]


# ----------------------------------------------------------------------------- the sweep file
def load_sweep(path):
    """(Sweep, MoE Arm, dense Arm, [train] overrides) from a sweep TOML; errors name the file and key."""
    path = Path(path)
    cfg = safe_io.load_toml(path)
    for table in cfg:
        if table not in ("sweep", "moe", "dense", "train") or not isinstance(cfg[table], dict):
            raise ValueError(f"{path}: unknown table [{table}]: expected [sweep], [moe], [dense] and [train]")
    sweep = _dataclass_from(Sweep, cfg.get("sweep", {}), path, "sweep")
    if bool(sweep.ra) == bool(sweep.K):
        raise ValueError(f"{path}: [sweep] needs exactly one of ra (target activation rates) and K")
    for r in sweep.ra:
        if not _type_ok(r, float) or not 0 < r <= 1:
            raise ValueError(f"{path}: sweep.ra entries are fractions in (0, 1], got {r!r} (write 0.2 for 20 %)")
    for k in sweep.K:
        if not _type_ok(k, int) or not 1 <= k <= config.RANGES["E"][1]:
            raise ValueError(f"{path}: sweep.K entries are integers in 1..{config.RANGES['E'][1]}, got {k!r}")
    if sweep.K and not sweep.De:
        raise ValueError(f"{path}: [sweep] K = {sweep.K} needs De, the expert width")
    for key, ok, allowed in (("compute", lambda v: 0 < v <= 1e30, "FLOPs in (0, 1e30]"),
                             ("dense_2C", lambda v: 1 < v <= 1e3, "a multiple of C in (1, 1000]: the baseline above C"),
                             ("tolerance", lambda v: 0 < v < 1, "a fraction in (0, 1)"),
                             ("E_pref", lambda v: 1 <= v <= config.RANGES["E"][1], f"an integer in 1..{config.RANGES['E'][1]}"),
                             ("De", lambda v: 0 <= v <= config.RANGES["De"][1], f"an integer in 0..{config.RANGES['De'][1]}"),
                             ("De_multiple", lambda v: 1 <= v <= config.RANGES["De"][1], f"an integer in 1..{config.RANGES['De'][1]}")):
        if not ok(getattr(sweep, key)):
            raise ValueError(f"{path}: sweep.{key} = {getattr(sweep, key)!r} is not allowed: expected {allowed}")
    for v in sweep.seeds:
        if not _type_ok(v, int) or not 0 <= v < 2**63:
            raise ValueError(f"{path}: sweep.seeds entries are integers in 0..2^63-1, got {v!r}")
    if len(set(sweep.seeds)) != len(sweep.seeds):
        raise ValueError(f"{path}: sweep.seeds {sweep.seeds} repeats a seed")
    if not 0 <= sweep.warmup_frac < 1:
        raise ValueError(f"{path}: sweep.warmup_frac = {sweep.warmup_frac!r} is not allowed: expected a share of the "
                         f"iterations in [0, 1) (0: the paper's rule)")
    if sweep.reuse_at != ["best"] and any(v not in sweep.ra for v in sweep.reuse_at):
        raise ValueError(f"{path}: sweep.reuse_at = {sweep.reuse_at} must name entries of sweep.ra {sweep.ra}, or be "
                         f'["best"]')
    for r in sweep.reuse:
        if r not in REUSE:
            raise ValueError(f"{path}: sweep.reuse {r!r} is unknown: expected some of {', '.join(REUSE)}")
    for key in ("ra", "K", "reuse", "reuse_at"):
        values = getattr(sweep, key)
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"{path}: sweep.{key} = {values} repeats an entry: each would be a run of the same name")
    if not sweep.reuse:
        raise ValueError(f"{path}: sweep.reuse = []: expected at least one of {', '.join(REUSE)}")
    moe = _arm(cfg, "moe", path, needs_mu=True)
    dense = _arm(cfg, "dense", path, needs_mu=False)
    if dense.shape.S != moe.shape.S:
        raise ValueError(f"{path}: dense.S = {dense.shape.S} and moe.S = {moe.shape.S}: the twins of a sweep see the same "
                         f"context, or C and the tokens per step mean other things")
    train_over = cfg.get("train", {})
    known = {f.name for f in fields(config.TrainConfig)}
    for key in train_over:
        if key == "overwrite":
            raise ValueError(f"{path}: train.overwrite: a sweep never replaces a run (remove a run's folder by hand to "
                             f"run it again)")
        if key not in known or key in SWEEP_OWNED:
            raise ValueError(f"{path}: train.{key} is {'set by the sweep for every run' if key in known else 'unknown'}")
        train_over[key] = config.coerce("train", key, train_over[key], f"{path}: ")
    try:
        config.check_train(config.TrainConfig(**{**train_over, "iters": 1, "tokens": 0.0}))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return sweep, moe, dense, train_over


def _type_ok(v, want):
    if isinstance(v, bool):
        return want is bool
    return isinstance(v, (int, float)) if want is float else isinstance(v, want)


def _dataclass_from(cls, table, path, name):
    types = {f.name: f.type for f in fields(cls)}
    for key, v in table.items():
        if key not in types:
            raise ValueError(f"{path}: unknown key {name}.{key} (expected one of {', '.join(types)})")
        if not _type_ok(v, types[key]):
            raise ValueError(f"{path}: {name}.{key} = {v!r}: expected {types[key].__name__}")
    for f in fields(cls):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in table:
            raise ValueError(f"{path}: {name}.{f.name} is required")
    return cls(**table)


def _arm(cfg, name, path, needs_mu):
    table = cfg.get(name, {})
    if not table or not isinstance(table, dict):
        raise ValueError(f"{path}: the [{name}] table is missing")
    table = dict(table)
    extra = {k: table.pop(k) for k in ("mu", "lr_mult", "batch_mult") if k in table}
    for k, v in extra.items():
        if not _type_ok(v, float) or not 0 < v <= 1e6:
            raise ValueError(f"{path}: {name}.{k} = {v!r} is not allowed: expected a number in (0, 1e6]")
    if needs_mu and "mu" not in extra:
        raise ValueError(f"{path}: [moe] needs mu, the total expert width (Dse + E·De)/Dm that fixes N")
    for k in table:
        if k not in BACKBONE:
            raise ValueError(f"{path}: unknown key {name}.{k} (expected {', '.join(BACKBONE)}, mu, lr_mult, batch_mult)")
    scheme = table.setdefault("scheme", "dense" if name == "dense" else flops.Shape.scheme)
    if (scheme == "dense") != (name == "dense"):  # each arm is of its own kind
        raise ValueError(f"{path}: {name}.scheme = {scheme!r} is not allowed: expected " + (
            '"dense" (or no scheme)' if name == "dense" else f"an MoE layout, one of {', '.join(flops.SCHEMES[1:])}"))
    try:
        shape = flops.Shape(**config.check_model(table))
    except ValueError as e:
        raise ValueError(f"{path}: [{name}] {e}") from None
    if needs_mu and not 1 <= extra["mu"] * shape.Dm <= config.RANGES["De"][1]:
        raise ValueError(f"{path}: moe.mu = {extra['mu']!r} makes a total expert width μ·Dm = {extra['mu'] * shape.Dm:.4g}: "
                         f"expected 1 to {config.RANGES['De'][1]:,}")
    return Arm(shape, **{k: float(v) for k, v in extra.items()})


# ----------------------------------------------------------------------------- the plan
def make_run(name, kind, reuse, shape, arm, C, sweep, world=1, micro_batch=0, budget=None):
    """A run of this shape at compute C, planned by train.py's own planner (schedule.make_schedule) with the
    arm's multipliers on StepLaw's lr and batch (M15). The batch is a whole number of micro-batches
    (train.micro_batch, over all ranks), or of `world` ranks when the whole batch is one micro-batch, so
    train.py runs exactly the D and C planned here, or refuses. Fresh data: one epoch of D unique tokens."""
    try:
        s = schedule.make_schedule(shape, compute=C, batch_mult=arm.batch_mult, batch_unit=micro_batch or world,
                                   micro_batch=micro_batch, world=world, lr_mult=arm.lr_mult,
                                   warmup_frac=sweep.warmup_frac, include_router=sweep.include_router,
                                   budget=budget or f"sweep.compute={C:.4g}")
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return Run(name=name, arm=name, kind=kind, reuse=reuse, shape=asdict(shape), N=s.N, Na=s.Na, ra=s.Na / s.N,
               M_train=s.M_train, iters=s.iters, batch_seqs=s.batch_seqs, lr=s.lr, warmup=s.warmup, D=s.D, C=s.C,
               unique_tokens=s.D, epochs=1.0)


def moe_shapes(sweep, moe, N_dense):
    """The MoE shapes of the sweep, each of total expert width W = μ·Dm; one that cannot be built names moe.mu."""
    W = round(moe.mu * moe.shape.Dm)
    try:
        return _moe_shapes(sweep, moe, N_dense, W)
    except ValueError as e:
        raise ValueError(f"moe.mu = {moe.mu!r} (a total expert width μ·Dm = {W}): {e}") from None


def _moe_shapes(sweep, moe, N_dense, W):
    if sweep.ra:
        return [flops.solve_moe(moe.shape, W, ra, sweep.include_router, sweep.De_multiple, sweep.E_pref,
                                sweep.tolerance, N_ref=N_dense) for ra in sweep.ra]
    if W % sweep.De:
        raise ValueError(f"De={sweep.De} does not divide the total expert width μ·Dm = {W}")
    shapes = []
    for K in sweep.K:
        E = W // sweep.De - K
        if not 1 <= K <= E:
            raise ValueError(f"K={K} is out of reach: K·De = {K * sweep.De} of a total width {W} leaves E={E} "
                             f"routed experts (K <= E needs K <= {W // sweep.De // 2})")
        shapes.append(flops.Shape(**{k: getattr(moe.shape, k) for k in BACKBONE}, E=E, K=K, De=sweep.De,
                                  Dse=K * sweep.De))
    return shapes


def plan(sweep, moe, dense, world=1, micro_batch=0, best_ra=None):
    """Dense baselines at C and 2C, then every MoE shape under every reuse variant (the strict and loose
    ones at reuse_at only; at the best r_a once best_ra is known), for `world` ranks sharing micro-batches
    of `micro_batch` sequences (0: the whole batch); all of it once per seed, seed by seed."""
    if micro_batch % world:
        raise ValueError(f"train.micro_batch={micro_batch} cannot be split evenly over {world} ranks: give a "
                         f"multiple of {world} (it counts sequences per forward over all ranks)")
    C, r = sweep.compute, sweep.include_router

    def run(name, kind, reuse, shape, arm, C_run, budget=None):
        return make_run(name, kind, reuse, shape, arm, C_run, sweep, world, micro_batch, budget)
    dense_C = run("dense-C", "dense", "none", dense.shape, dense, C)
    arms = [dense_C, run("dense-2C", "dense", "none", dense.shape, dense, sweep.dense_2C * C,
                         f"sweep.compute={C:.4g} × sweep.dense_2C={sweep.dense_2C:g}")]
    targets = sweep.ra or [None] * len(sweep.K)
    for target, s in zip(targets, moe_shapes(sweep, moe, dense_C.N)):
        ra = flops.count(s, r).ra
        for reuse in sweep.reuse:
            if reuse != "none" and not reused_here(sweep, target, best_ra):
                continue
            name = f"moe-ra{100 * ra:.1f}-E{s.E}-K{s.K}-De{s.De}" + ("" if reuse == "none" else f"-{reuse}")
            moe_run = run(name, "moe", reuse, s, moe, C)
            moe_run.ra_target = target or 0.0
            if reuse == "strict":    # the unique tokens of the dense baseline at C
                moe_run.unique_tokens = dense_C.unique_tokens
            elif reuse == "loose":   # two epochs over half the tokens
                moe_run.unique_tokens = moe_run.D // 2
            moe_run.epochs = moe_run.D / moe_run.unique_tokens
            arms.append(moe_run)
    names = [a.name for a in arms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        key = "ra" if sweep.ra else "K"
        raise ValueError(f"sweep.{key} = {getattr(sweep, key)}: two entries give the same MoE ({', '.join(twice)}): "
                         f"drop one")
    if not sweep.seeds:
        return arms
    return [replace(a, name=f"{a.name}-s{seed}", seed=seed) for seed in sweep.seeds for a in arms]


def reused_here(sweep, target, best_ra):
    if sweep.reuse_at == ["best"]:
        return best_ra is not None and target == best_ra
    return not sweep.reuse_at or target in sweep.reuse_at


def best_ra(sweep, runs, out):
    """For reuse_at = ["best"]: the target r_a whose no-reuse MoE arm has the lowest mean BPC on the first
    validation split over every seed, once all of them have finished in out; else None."""
    if sweep.reuse_at != ["best"] or out is None:
        return None
    means = {}
    for target in {r.ra_target for r in runs if r.kind == "moe" and r.reuse == "none"}:
        bpcs = []
        for r in runs:
            if r.kind == "moe" and r.reuse == "none" and r.ra_target == target:
                s = rundir.read_summary(Path(out) / r.name / "summary.json")
                if not rundir.finished(s):
                    return None
                bpcs.append(s["final"].get("bpc_val", next(iter(s["final"].values()))))
        means[target] = sum(bpcs) / len(bpcs)
    return min(means, key=means.get) if means else None


def check_equal(runs, tolerance):
    """docs/method.md §8: every MoE's N and C within tolerance of the dense baseline at C; strict reuse on the
    dense baseline's unique tokens. Returns the violations, one line each, with the numbers."""
    ref = runs[0]
    bad = []
    for run in runs:
        if run.kind != "moe":
            continue
        if abs(run.N / ref.N - 1) > tolerance:
            bad.append(f"{run.name}: N = {run.N:,} is {100 * (run.N / ref.N - 1):+.2f} % from the dense N = {ref.N:,}")
        if abs(run.C / ref.C - 1) > tolerance:
            bad.append(f"{run.name}: C = {run.C:.4g} is {100 * (run.C / ref.C - 1):+.2f} % from the dense C = "
                       f"{ref.C:.4g} (too few iterations to round to; raise C)")
        if run.reuse == "strict" and run.unique_tokens != ref.unique_tokens:
            bad.append(f"{run.name}: {run.unique_tokens:,} unique tokens, the dense baseline {ref.unique_tokens:,}")
    return bad


def format_plan(runs):
    head = (f"{'run':34}{'E':>4}{'K':>4}{'De':>6}{'Dse':>6}{'N':>15}{'Na':>15}{'r_a':>8}{'M_train':>10}"
            f"{'D':>10}{'C':>10}{'unique':>10}{'epochs':>7}{'lr':>10}{'B':>6}{'iters':>8}{'warmup':>7}")
    lines = [head, "-" * len(head)]
    for r in runs:
        if r.seed is not None and r.seed != runs[0].seed:  # the same arms again for the next seeds: one line says so
            lines.append(f"... and the same {sum(x.seed == runs[0].seed for x in runs)} arms for each of the seeds "
                         f"{sorted({x.seed for x in runs})}")
            break
        s = r.shape
        moe = r.kind == "moe"
        lines.append(f"{r.name:34}{s['E'] if moe else '':>4}{s['K'] if moe else '':>4}{s['De'] if moe else '':>6}"
                     f"{s['Dse'] if moe else '':>6}{r.N:>15,}{r.Na:>15,}{100 * r.ra:>7.2f}%{r.M_train:>10.3g}"
                     f"{r.D:>10.3g}{r.C:>10.3g}{r.unique_tokens:>10.3g}{r.epochs:>7.2f}{r.lr:>10.3g}"
                     f"{r.batch_seqs:>6}{r.iters:>8}{r.warmup:>7}")
    return "\n".join(lines)


def memory_plan(runs, train_over, world, gpu_mem):
    """Per run, the GiB per rank of one micro-batch under DDP and FSDP (parallel.py's plan, with the sweep's
    dtype and activation checkpointing), what train.py would choose, and a warning for each run that
    fits neither way on GPUs of gpu_mem GiB. Loads torch: only sweep.py plan --gpu_mem asks for it."""
    from harness import parallel
    from model import GPTConfig
    dtype = train_over.get("dtype", "auto")
    dtype = "bfloat16" if dtype == "auto" else dtype
    checkpointing = bool(train_over.get("activation_checkpointing", False))
    capacity = int(gpu_mem * parallel.GiB) - parallel.RESERVE
    vocab = train_over.get("vocab_size") or preflight.planned_vocab(train_over.get("data", "data/shakespeare-byte"))
    lines, warnings = [f"{'run':34}{'micro/rank':>11}{'DDP GiB':>9}{'FSDP GiB':>10}  parallel on {world} × "
                       f"{gpu_mem:g} GiB ({dtype}, activation checkpointing {'on' if checkpointing else 'off'})"], []
    for r in runs:
        mcfg = GPTConfig(**{**r.shape, "vocab_size": vocab})
        seqs = (train_over.get("micro_batch") or r.batch_seqs) // world
        shapes = parallel.param_shapes(mcfg)
        ddp, fsdp = (parallel.memory(mcfg, seqs, strategy, world, dtype, checkpointing, 0, shapes).total
                     for strategy in ("ddp", "fsdp"))
        asked = train_over.get("parallel", "auto")
        strategy = ("single" if world == 1 else asked if asked != "auto" else "ddp" if ddp <= capacity else "fsdp")
        need = fsdp if strategy == "fsdp" else ddp
        if need > capacity:
            warnings.append(f"{r.name}: needs {need / parallel.GiB:.1f} GiB per rank under {strategy}, more than "
                            f"{capacity / parallel.GiB:.1f} GiB usable of {gpu_mem:g}: give activation_checkpointing = "
                            f"true, a smaller micro_batch or more ranks")
        lines.append(f"{r.name:34}{seqs:>11}{ddp / parallel.GiB:>9.1f}{fsdp / parallel.GiB:>10.1f}  {strategy}"
                     + ("" if need <= capacity else "  DOES NOT FIT"))
    return "\n".join(lines), warnings


def plan_json(runs):
    return [{**asdict(r), "batch_tokens": r.batch_tokens} for r in runs]


def planned(path, allow_unequal=False, world=1, out=None):
    """The sweep's runs, each through train.py's own checks (check_runs); with out (the sweep's folder),
    reuse_at = ["best"] is resolved from its results."""
    sweep, moe, dense, train_over = load_sweep(path)
    runs = plan(sweep, moe, dense, world, train_over.get("micro_batch", 0))
    best = best_ra(sweep, runs, out)
    if best is not None:
        runs = plan(sweep, moe, dense, world, train_over.get("micro_batch", 0), best)
    bad = check_equal(runs, sweep.tolerance)
    if bad and not allow_unequal:
        raise ValueError(f"{path}: the plan breaks equal resources (docs/method.md §8; --allow-unequal to explore):\n  "
                         + "\n  ".join(bad))
    check_runs(runs, sweep, train_over, world, out or Path("runs") / Path(path).stem)
    return sweep, runs, train_over


def run_setup(run, sweep, train_over, out, world=1, device=None, prepare=False):
    """What train.py makes of a run's command line, through its own checks (preflight.check_run): the same
    function, so a plan that train.py would refuse is refused here, before any run starts."""
    try:
        mvals, tcfg, given, _ = config.load_config(train_args(run, sweep, train_over, Path(out) / run.name))
        return preflight.check_run(mvals, tcfg, given, False, world, device, prepare=prepare)
    except ValueError as e:
        budget = f"sweep.compute = {sweep.compute:.4g}" + (f" × sweep.dense_2C = {sweep.dense_2C:g}"
                                                           if run.arm == "dense-2C" else "")
        raise ValueError(f"run {run.name} (C = {budget}: D = {run.D:.4g} tokens, lr {run.lr:.4g}, batch "
                         f"{run.batch_seqs}): train.py refuses it: {e}") from None


def check_runs(runs, sweep, train_over, world, out, device=None, prepare=False):
    """Every run through train.py's checks; each must also come out as planned, to the token."""
    setups = {}
    for run in runs:
        setup = setups[run.name] = run_setup(run, sweep, train_over, out, world, device, prepare)
        got = setup.sched
        if (got.D, got.iters, got.batch_seqs, got.lr, got.warmup) != (run.D, run.iters, run.batch_seqs, run.lr, run.warmup):
            raise ValueError(f"run {run.name}: train.py would run D={got.D:,} in {got.iters} iters × {got.batch_seqs}, "
                             f"lr {got.lr:.4g}, warmup {got.warmup}; the sweep planned D={run.D:,} in {run.iters} × "
                             f"{run.batch_seqs}, lr {run.lr:.4g}, warmup {run.warmup}")
    return setups


def check_existing(runs, setups, out):
    """Refuse, before any run starts, a run folder of out that holds a run of another plan (another C, lr,
    shape, data, …): a run is its whole plan, and one that differs is never reused or continued."""
    bad = []
    for run in runs:
        folder = Path(out) / run.name
        saved = saved_config(folder)
        if saved is None:
            continue
        setup = setups[run.name]
        summary = rundir.read_summary(folder / "summary.json")
        by_content = bool(summary and setup.meta)  # the data compared by its fingerprint, not by its path
        keys = [k for k in config.RESULT_KEYS if not (by_content and k in config.BY_CONTENT)]
        diff = config.changed_keys(saved, setup.mcfg, setup.tcfg, keys, now="plan")
        if by_content:
            import data
            diff += data.changed_data(summary.get("data"), setup.meta, setup.tcfg.data)
            moved = not diff and data.moved_note(saved.get("train", {}).get("data"), setup.tcfg.data)
            if moved:
                print(f"{folder}: {moved}")
        if diff:
            bad.append(f"{folder}: " + "; ".join(diff))
    if bad:
        raise ValueError(f"{out} holds runs of another plan, which are never reused or continued (remove them, or "
                         f"give another --out):\n  " + "\n  ".join(bad))


def saved_config(folder):
    """{model: …, train: …} of a run folder (its config.toml, else its summary's), or None when it has none."""
    path = Path(folder) / "config.toml"
    if path.exists() or path.is_symlink():
        safe_io.refuse_link(path)
        return config.read_toml(path)
    summary = rundir.read_summary(Path(folder) / "summary.json")
    return summary["config"] if summary else None


# ----------------------------------------------------------------------------- what train.py is told
def train_args(run, sweep, train_over, out_dir):
    """train.py's command line for a run in out_dir (<sweep folder>/<run name>): its shape, its plan, and for
    TensorBoard and W&B its name (the arm and seed) and its group (the sweep folder's name)."""
    args = [f"--{k}={v}" for k, v in run.shape.items()]
    args += [f"--iters={run.iters}", f"--batch_seqs={run.batch_seqs}", f"--lr={run.lr!r}",
             f"--unique_tokens={run.unique_tokens}", f"--include_router={str(sweep.include_router).lower()}",
             f"--warmup={run.warmup}", f"--out_dir={out_dir}", f"--wandb_run_name={run.name}",
             f"--wandb_group={Path(out_dir).absolute().parent.name[:128]}"] + ([f"--seed={run.seed}"] if run.seed is not None else [])
    return args + [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in train_over.items()]


def train_args_config(run, sweep, train_over, out):
    """The run's TrainConfig as train.py reads its command line."""
    return config.load_config(train_args(run, sweep, train_over, Path(out) / run.name))[1]
