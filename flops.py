"""The accounting of docs/method.md §4–5, in the paper's notation: N, Na, r_a, M, C, StepLaw.
Tags (M7)–(M15) are the equations of docs/method.md.

Pure Python (no torch), so planners and the command line can use it anywhere:

    python flops.py --L=24 --Dm=2048 --H=16 --Dh=128 --Dffn=5464 --E=78 --K=6 \
        --De=512 --Dse=3072 --S=2048 --scheme=1dense [--include_router=false] [--json]
    python flops.py configs/<name>.toml

N counts non-vocabulary parameters only: no embeddings, no LM head, no norms (docs/method.md §2).
"""
import argparse
import json
import math
from dataclasses import asdict, dataclass, fields


SCHEMES = ("dense", "full", "1dense", "interleave")


@dataclass
class Shape:
    """A GPT's shape in the paper's notation (docs/method.md §2). The MoE fields are ignored when scheme='dense'."""
    # the defaults are the CPU toy: a 1dense+SE MoE, N = 3.5M, r_a = 20.2 %
    scheme: str = "1dense"  # dense | full | 1dense | interleave (docs/method.md §3)
    L: int = 4              # layers
    Dm: int = 128           # model width
    H: int = 4              # attention heads
    Dh: int = 0             # head dim; 0 = Dm // H
    Dffn: int = 352         # hidden width of a dense SwiGLU FFN (α = Dffn/Dm = 2.75)
    E: int = 40             # routed experts
    K: int = 2              # experts chosen per token
    De: int = 64            # hidden width of one routed expert
    Dse: int = 128          # hidden width of the shared expert (0 = none); Dse = K·De (docs/method.md §6)
    S: int = 256            # sequence length

    def __post_init__(self):  # harness/config.py checks the values first (its table of ranges)
        if self.Dh == 0 and self.H:
            self.Dh = self.Dm // self.H


def layer_kinds(s):
    """'dense' or 'moe' for each layer. interleave puts the dense layer first, like 1dense (our choice)."""
    if s.scheme == "dense":
        return ["dense"] * s.L
    if s.scheme == "full":
        return ["moe"] * s.L
    if s.scheme == "1dense":
        return ["dense"] + ["moe"] * (s.L - 1)
    return ["dense" if i % 2 == 0 else "moe" for i in range(s.L)]


@dataclass
class Count:
    """Parameter counts, total and activated per token, with the per-component breakdown."""
    attention: int
    dense_ffn: int
    experts: int          # all routed experts
    experts_active: int   # the K routed experts a token uses
    shared: int
    router: int

    @property
    def N(self):  # M7
        return self.attention + self.dense_ffn + self.experts + self.shared + self.router

    @property
    def Na(self):  # M8
        return self.attention + self.dense_ffn + self.experts_active + self.shared + self.router

    @property
    def ra(self):  # M12: r_a = Na / N
        return self.Na / self.N


def count(s, include_router=True):
    """M7–M8, per component. The router (Dm·E per MoE layer) is a switch: the paper's eqs. 4–6 omit it
    (docs/method.md §4)."""
    kinds = layer_kinds(s)
    Ld, Le = kinds.count("dense"), kinds.count("moe")
    return Count(
        attention=s.L * 4 * s.Dm * s.H * s.Dh,          # Q, K, V, O: Dm × H·Dh each
        dense_ffn=Ld * 3 * s.Dm * s.Dffn,               # SwiGLU: W1, W2, W3
        experts=Le * 3 * s.Dm * s.E * s.De,
        experts_active=Le * 3 * s.Dm * s.K * s.De,
        shared=Le * 3 * s.Dm * s.Dse,
        router=Le * s.Dm * s.E if include_router else 0,
    )


def M_fwd(s, include_router=True):
    """M10: matmul FLOPs per token, forward. Attention scores + values cost 4·(H·Dh)·S per layer,
    counted over the full S×S square as the paper does (4·Dm·S·L when H·Dh = Dm)."""
    return 2 * count(s, include_router).Na + 4 * s.H * s.Dh * s.S * s.L


def M_train(s, include_router=True):
    """M11: forward + backward = 3 × forward."""
    return 3 * M_fwd(s, include_router)


def M_exec(s, vocab_size):
    """Matmul FLOPs per training token that the hardware executes, for MFU only (budgets use M11):
    3 × (2·Na with the router, 2·Dm·V for the LM head, and causal attention: 4·H·Dh per query-key pair
    over the (S+1)/2 keys a query sees on average). The paper's M_train leaves out the LM head and
    counts attention over the whole S×S square, which biases MFU between models of other widths."""
    return 3 * (2 * count(s, True).Na + 2 * s.Dm * vocab_size + 2 * s.H * s.Dh * (s.S + 1) * s.L)


def compute(s, D, include_router=True):
    """M11: C = M_train · D for D training tokens."""
    return M_train(s, include_router) * D


def tokens_for_compute(s, C, include_router=True):
    """M11 inverted: the tokens D a compute budget C buys."""
    return C / M_train(s, include_router)


def kappa_dense(alpha, gamma):
    """M12: κ_dense = 1 + 2γ/(4 + 3α), with α = Dffn/Dm and γ = S/Dm."""
    return 1 + 2 * gamma / (4 + 3 * alpha)


def kappa_moe(beta, gamma):
    """M12: κ_MoE = 1 + 2γ/(4 + 3β) (layout full: every layer MoE), with β = (Dse + K·De)/Dm and γ = S/Dm."""
    return 1 + 2 * gamma / (4 + 3 * beta)


def data_ratio(ra, k_dense, k_moe):
    """M14: D_MoE / D_dense ≈ κ_dense / (r_a · κ_MoE) at equal N and C."""
    return k_dense / (ra * k_moe)


def steplaw_lr(N, D):
    """M15: StepLaw peak learning rate; N = total non-embedding parameters, D = tokens consumed."""
    return 1.79 * N ** -0.713 * D ** 0.307


def steplaw_batch_tokens(D):
    """M15: StepLaw batch size in tokens, D = tokens consumed."""
    return 0.58 * D ** 0.571


def steplaw_tokens_for_iters(iters):
    """M15 solved for a budget in iterations: D = iters·B(D) with B = 0.58·D^0.571 tokens."""
    return (0.58 * iters) ** (1 / (1 - 0.571))


def steplaw_batch_seqs(D, S):
    """M15 in sequences of length S, at least one."""
    return max(1, round(steplaw_batch_tokens(D) / S))


def warmup_iters(iters):
    """docs/method.md §5: warmup = clip(0.01·iters, 200, 2000), never more than the run itself."""
    return min(iters, max(200, min(2000, round(0.01 * iters))))


def dense_shape(N, L, S, Dh=64, alpha=2.77):
    """A dense Shape of about N parameters (M9: N ≈ (4 + 3α)·Dm²·L): Dm from N at the given α, rounded
    to whole heads of Dh, then Dffn (a multiple of 8) chosen so that N is matched as closely as it can be."""
    Dm = max(Dh, Dh * round(math.sqrt(N / ((4 + 3 * alpha) * L)) / Dh))
    H = Dm // Dh
    Dffn = 8 * max(1, round((N - L * 4 * Dm * H * Dh) / (3 * L * Dm) / 8))
    return Shape(scheme="dense", L=L, Dm=Dm, H=H, Dh=Dh, Dffn=Dffn, S=S)


def moe_candidates(backbone, W, include_router=True, De_multiple=8):
    """Every MoE on a fixed backbone with total expert width Dse + E·De = W and Dse = K·De (docs/method.md §6):
    De a multiple of De_multiple dividing W, then any K with K <= E = W/De − K. N is fixed up to the router.
    Returns (Count, Shape) pairs."""
    out = []
    for De in range(De_multiple, W // 2 + 1, De_multiple):
        if W % De:
            continue
        n = W // De  # slots of width De: K shared (as Dse = K·De) plus E routed
        for K in range(1, n // 2 + 1):
            s = Shape(**{**_backbone_fields(backbone), "E": n - K, "K": K, "De": De, "Dse": K * De})
            out.append((count(s, include_router), s))
    return out


def _backbone_fields(b):
    return {k: getattr(b, k) for k in ("scheme", "L", "Dm", "H", "Dh", "Dffn", "S")}


def solve_moe(backbone, W, ra, include_router=True, De_multiple=8, E_pref=64, tol=0.01, N_ref=None):
    """The MoE on the backbone with r_a within tol (relative) of the target and E nearest E_pref: the
    paper keeps E ≈ 80–90 and moves K and De, which also keeps the router's Dm·E, and so N, steady.
    With N_ref, only shapes whose N is within tol of it count. A target out of reach is refused with
    the reachable range and the nearest feasible shape."""
    counted = moe_candidates(backbone, W, include_router, De_multiple)
    cands = [(c.ra, s) for c, s in counted if not N_ref or abs(c.N / N_ref - 1) <= tol]
    if not cands:
        raise ValueError(f"no expert width De that is a multiple of {De_multiple} divides the total width W={W}"
                         + (f" with N within {100 * tol:g} % of {N_ref:,}" if N_ref else ""))
    near = [(r, s) for r, s in cands if abs(r / ra - 1) <= tol]
    if not near:
        lo, hi = min(c[0] for c in cands), max(c[0] for c in cands)
        r, s = min(cands, key=lambda c: abs(c[0] - ra))
        why = ("attention and the dense layers alone are too large a share of N" if ra < lo
               else "K·De would exceed the total expert width" if ra > hi else "no shape lands close enough")
        raise ValueError(f"ra={ra:.4f} is out of reach on this backbone ({why}): reachable {lo:.4f}..{hi:.4f}; "
                         f"nearest feasible ra={r:.4f} with E={s.E}, K={s.K}, De={s.De}, Dse={s.Dse}")
    return min(near, key=lambda c: (abs(math.log(c[1].E / E_pref)), abs(c[0] - ra)))[1]


def summary(s, include_router=True, D=None, C=None):
    """Everything above for one shape, as a dict of plain numbers (the CLI's --json)."""
    c = count(s, include_router)
    out = {"N": c.N, "Na": c.Na, "ra": c.ra, "M_fwd": M_fwd(s, include_router),
           "M_train": M_train(s, include_router), "include_router": include_router,
           "params": {k: getattr(c, k) for k in ("attention", "dense_ffn", "experts", "shared", "router")},
           "active": {"attention": c.attention, "dense_ffn": c.dense_ffn, "experts": c.experts_active,
                      "shared": c.shared, "router": c.router},
           "shape": asdict(s)}
    if C is not None:
        D = C / out["M_train"]
    if D is not None:
        out.update(D=D, C=out["M_train"] * D, lr=steplaw_lr(c.N, D),
                   batch_tokens=steplaw_batch_tokens(D), batch_seqs=steplaw_batch_seqs(D, s.S))
    return out


def format_summary(r):
    s = r["shape"]
    keys = ["scheme", "L", "Dm", "H", "Dh", "Dffn"] + ([] if s["scheme"] == "dense" else ["E", "K", "De", "Dse"]) + ["S"]
    lines = ["  ".join(f"{k}={s[k]}" for k in keys),
             f"{'':16}{'total N':>16}{'active Na':>16}"]
    for k, label in [("attention", "attention"), ("dense_ffn", "dense FFN"), ("experts", "routed experts"),
                     ("shared", "shared expert"), ("router", "router")]:
        if r["params"][k]:
            lines.append(f"{label:16}{r['params'][k]:>16,}{r['active'][k]:>16,}")
    lines.append(f"{'sum':16}{r['N']:>16,}{r['Na']:>16,}")
    lines.append(f"r_a = Na/N      {100 * r['ra']:.2f} %   (router {'in' if r['include_router'] else 'not in'} N and Na)")
    lines.append(f"M_fwd           {r['M_fwd']:.4g} FLOPs/token   (M10, S={s['S']})")
    lines.append(f"M_train         {r['M_train']:.4g} FLOPs/token   (M11 = 3·M_fwd)")
    if "D" in r:
        lines.append(f"D, C            {r['D']:.4g} tokens, {r['C']:.4g} FLOPs   (C = M_train·D)")
        lines.append(f"StepLaw (M15)   lr {r['lr']:.4g}, batch {r['batch_tokens']:.4g} tokens = {r['batch_seqs']} × {s['S']}")
    return "\n".join(lines)


def parser():
    """The command line (tests/test_every_input.py fuzzes each of its flags)."""
    from harness import config, helptext, rundir
    p = helptext.Parser(prog="flops.py", allow_abbrev=False,
                        description="N, Na, r_a, M and StepLaw hyper-parameters for a dense or MoE GPT (docs/method.md §4-5).")
    p.add_argument("config", nargs="?", help="a TOML config whose [model] table holds the shape")
    for k in helptext.keys(__file__, "Shape"):  # each field's comment, as train.py --help shows it
        p.add_argument(f"--{k.name}", type=str if k.name == "scheme" else as_number(k.name, config), default=None,
                       help=f"{k.doc} (default {helptext.toml_value(k.default)})".replace("%", "%%"))
    p.add_argument("--include_router", type=rundir.true_or_false, default=True, help="count the router's Dm·E per MoE layer (default true)")
    p.add_argument("--D", type=float, help="training tokens: also print C and the StepLaw lr and batch")
    p.add_argument("--C", type=float, help="training compute in FLOPs: also print D and the StepLaw lr and batch")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def as_number(key, config):
    """--key=value read as train.py reads it (--Dm=32.0 is 32)."""
    typ = {f.name: f.type for f in fields(Shape)}[key]

    def read(raw):
        try:
            return config.parse_value(key, raw, typ)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return read


def main(argv=None):
    from harness import config, safe_io
    p = parser()
    a = p.parse_args(argv)
    source = {"D": "--D", "C": "--C"}
    if a.D is not None and a.C is not None:
        p.error("--D and --C both given: give one (C = M_train·D fixes the other)")
    given = {f.name: getattr(a, f.name) for f in fields(Shape) if getattr(a, f.name) is not None}
    try:
        if a.config is not None:
            cfg = safe_io.load_toml(a.config)
            if not isinstance(cfg.get("model"), dict):
                raise ValueError(f"{a.config} has no [model] table" + (
                    ": it is a sweep file, see python sweep.py plan " + a.config if "sweep" in cfg else ""))
            shape = config.shape_from_dict({**cfg["model"], **given}, a.config)
            budget = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
            if a.D is None and a.C is None:  # a run config's budget, unless --D or --C says otherwise
                a.C, a.D = budget.get("compute") or None, budget.get("tokens") or None
                source = {"D": f"{a.config}: train.tokens", "C": f"{a.config}: train.compute"}
        else:
            shape = config.shape_from_dict(given, None)
    except ValueError as e:
        p.error(f"{e}" if a.config is None or a.config in str(e) else f"{a.config}: {e}")
    for key, hi in (("D", config.RANGES["tokens"][1]), ("C", config.RANGES["compute"][1])):  # train.tokens, train.compute
        v = getattr(a, key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= hi):
            p.error(f"{source[key]}={v}: expected a finite number in (0, {hi:.3g}]")
    r = summary(shape, a.include_router, D=a.D, C=a.C)
    if "D" in r and r["D"] < 1:
        key = "C" if a.C is not None else "D"
        p.error(f"{source[key]}={getattr(a, key)}: {r['D']:.3g} tokens: expected at least one")
    print(json.dumps(r) if a.json else format_summary(r))


if __name__ == "__main__":
    main()
