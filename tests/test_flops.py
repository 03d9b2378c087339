"""flops.py against the paper's own tables (tests/paper_tables.json: rows of its appendix tables as printed).
Tags (Mn) are the equations of docs/method.md."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import flops
from tests.conftest import refused

ROOT = Path(__file__).resolve().parent.parent
ROWS = json.loads((Path(__file__).parent / "paper_tables.json").read_text())["rows"]


def shape_of(row):
    """The Shape a paper row was accounted with, honouring its per-table flags."""
    acct, src, scheme = row["accounting"], row, row["scheme"].replace("+SE", "")
    if "accounting_override" in acct:  # Table 5 rows 1-3 print the 1dense accounting of row 1
        o = acct["accounting_override"]
        src = next(r for r in ROWS if r["table"] == row["table"] and r["row"] == o["config_from_row"])
        scheme = o["scheme"]
    kw = dict(scheme=scheme, L=src["L"], Dm=src["Dm"], H=src["H"], Dh=src.get("Dh", src.get("Dh_inferred")),
              Dffn=src["Dffn"], S=acct["S"])
    if scheme != "dense":
        kw.update(E=src["E"], K=src["K"], De=src["De"], Dse=src["Dse"])
    return flops.Shape(**kw)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"table{r['table']}-row{r['row']}")
def test_paper_row_reproduced(row):
    s, acct = shape_of(row), row["accounting"]
    c = flops.count(s, acct["include_router"])
    M = acct["train_factor"] * flops.M_fwd(s, acct["include_router"])
    assert c.N == pytest.approx(row.get("N", row.get("N_caption")), rel=0.015)
    assert M == pytest.approx(row["M"], rel=0.015)
    if "Na" in row:
        assert c.Na == pytest.approx(row["Na"], rel=0.015)
    if "ra_pct" in row:
        assert 100 * c.ra == pytest.approx(row["ra_pct"], rel=0.015)
    if "C" in row:  # C = M_train · D (M11)
        assert flops.compute(s, row["D"], acct["include_router"]) == pytest.approx(row["C"], rel=0.015)


def test_table12_router_is_what_makes_ra_20_07():
    row = next(r for r in ROWS if r["table"] == 12 and r["row"] == 5)
    s = shape_of(row)
    assert round(100 * flops.count(s, include_router=True).ra, 2) == 20.07
    assert round(100 * flops.count(s, include_router=False).ra, 2) != 20.07


def test_data_ratio_matches_table12():
    # the M14 check of docs/method.md §4: r_a = 20.07 % gives 4.68 against the printed 3.16e11 / 6.80e10 = 4.65
    k_dense = flops.kappa_dense(alpha=11008 / 4096, gamma=2048 / 4096)
    k_moe = flops.kappa_moe(beta=(3072 + 6 * 512) / 2048, gamma=2048 / 2048)
    assert flops.data_ratio(0.2007, k_dense, k_moe) == pytest.approx(4.68, abs=0.01)
    assert flops.data_ratio(0.2007, k_dense, k_moe) == pytest.approx(3.16e11 / 6.80e10, rel=0.01)


@pytest.mark.parametrize("row", [r for r in ROWS if r["table"] == 12 or (r["table"] == 13 and r["row"] >= 5)],
                         ids=lambda r: f"table{r['table']}-row{r['row']}")
def test_steplaw_matches_7b_runs(row):
    # docs/method.md §5: the 7B runs follow M15 with η ×1.015-1.022 and B ×0.93-1.05 (B printed in 2048-token sequences)
    N = row.get("N_caption", row.get("N"))
    assert 1.01 <= row["eta"] / flops.steplaw_lr(N, row["D"]) <= 1.03
    assert 0.92 <= row["B"] * 2048 / flops.steplaw_batch_tokens(row["D"]) <= 1.06


def test_tokens_for_compute_inverts_compute():
    s = flops.Shape(scheme="1dense", L=24, Dm=2048, H=16, Dh=128, Dffn=5464, E=78, K=6, De=512, Dse=3072, S=2048)
    assert flops.compute(s, flops.tokens_for_compute(s, 2.86e21)) == pytest.approx(2.86e21)


@pytest.mark.parametrize("scheme,expected", [
    ("dense", ["dense"] * 4), ("full", ["moe"] * 4),
    ("1dense", ["dense", "moe", "moe", "moe"]), ("interleave", ["dense", "moe", "dense", "moe"])])
def test_layer_kinds(scheme, expected):
    assert flops.layer_kinds(flops.Shape(scheme=scheme, L=4)) == expected


def test_dense_scheme_ignores_expert_fields():
    a = flops.count(flops.Shape(scheme="dense", E=64, K=8, De=512))
    b = flops.count(flops.Shape(scheme="dense", E=1, K=1, De=8))
    assert a == b and a.N == a.Na


def test_warmup_is_clipped():
    assert [flops.warmup_iters(n) for n in (50, 1000, 50_000, 10**6)] == [50, 200, 500, 2000]


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "flops.py"), *args], capture_output=True, text=True, cwd=ROOT)


EXAMPLE = ["--L=24", "--Dm=2048", "--H=16", "--Dh=128", "--Dffn=5464", "--E=78", "--K=6", "--De=512",
           "--Dse=3072", "--S=2048", "--scheme=1dense"]


def test_cli_json_is_the_accounting():
    r = run_cli(*EXAMPLE, "--include_router=false", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    s = flops.Shape(scheme="1dense", L=24, Dm=2048, H=16, Dh=128, Dffn=5464, E=78, K=6, De=512, Dse=3072, S=2048)
    c = flops.count(s, include_router=False)
    assert (out["N"], out["Na"]) == (c.N, c.Na)
    assert out["ra"] == pytest.approx(c.ra) and out["M_train"] == 3 * out["M_fwd"] == flops.M_train(s, False)


def in_process(capsys, *args):
    """What flops.py's command line prints, run in this process (as a program: test_cli_json_is_the_accounting)."""
    flops.main(list(args))
    return capsys.readouterr().out


def test_cli_table_and_config_file(tmp_path, capsys):
    cfg = tmp_path / "m.toml"
    cfg.write_text('[model]\nscheme = "1dense"\nL = 24\nDm = 2048\nH = 16\nDh = 128\nDffn = 5464\n'
                   'E = 78\nK = 6\nDe = 512\nDse = 3072\nS = 2048\nvocab_size = 65536\n')
    out = in_process(capsys, str(cfg))
    assert "20.07 %" in out and "6,517,444,608" in out
    assert json.loads(in_process(capsys, str(cfg), "--json"))["N"] == json.loads(in_process(capsys, *EXAMPLE, "--json"))["N"]


def test_cli_budget_gives_steplaw(capsys):
    out = json.loads(in_process(capsys, *EXAMPLE, "--C=2.86e21", "--json"))
    assert out["C"] == pytest.approx(2.86e21) and out["D"] == pytest.approx(2.86e21 / out["M_train"])
    assert math.isclose(out["lr"], flops.steplaw_lr(out["N"], out["D"]))


# a bad value of a flag, or a config file that is not there, is test_every_input.py's
@pytest.mark.parametrize("args,message", [
    (["--bogus=1"], "unrecognized arguments"), (["--K=9", "--E=8"], "K=9"), (["--Dm"], "expected one argument"),
    ([str(ROOT / "configs" / "sweep-toy.toml")], "it is a sweep file, see python sweep.py plan")])
def test_cli_bad_input_is_a_usage_error(args, message, capsys):
    err = refused(flops.main, args, capsys)
    assert message in err and "usage:" in err
