"""gpucheck.py stands alone: it imports nothing of bench.py (bench.py imports it), says in one line that a
machine has no CUDA device (exit 2), and exits 0 or 1 as its checks pass or fail. The checks themselves
run on a CPU in tests/test_bench.py (bench.py gpu-check)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dev import gpucheck

ROOT = Path(__file__).resolve().parent.parent


def fresh(code):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


@pytest.mark.slow
def test_no_import_cycle():
    assert fresh("import sys; from dev import gpucheck; print('dev.bench' in sys.modules)") == "False"
    # bench.py imports gpucheck, from either side of a fresh interpreter
    assert fresh("import sys; from dev import bench; print('dev.gpucheck' in sys.modules, bench.gpu_check.__module__)") == "True dev.gpucheck"
    assert fresh("from dev import gpucheck, bench; print(bench.gpu_check is gpucheck.gpu_check)") == "True"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_without_cuda_it_says_so_in_one_line():
    r = subprocess.run([sys.executable, str(ROOT / "dev" / "gpucheck.py")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and not r.stdout
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("gpucheck.py: error: --device=cuda: no such CUDA device here") and "--device=cpu" in r.stderr


@pytest.mark.parametrize("failed,code", [(False, 0), (True, 1)])
def test_exit_code_and_json(failed, code, tmp_path, monkeypatch, capsys):
    seen = {}

    def checks(a):
        seen.update(device=a.device, compile=a.compile)
        return {"env": {"device": "cpu"}, "checks": {"one": {"status": "FAIL" if failed else "PASS"}}, "failed": failed}
    monkeypatch.setattr(gpucheck, "gpu_check", checks)
    out = tmp_path / "g.json"
    with pytest.raises(SystemExit) as e:
        gpucheck.main(["--device=cpu", "--compile=false", f"--json={out}"])
    assert e.value.code == code and seen == {"device": "cpu", "compile": False}
    result = json.loads(out.read_text())
    assert result["command"] == f"dev/gpucheck.py --device=cpu --compile=false --json={out}" and result["failed"] is failed
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    with pytest.raises(SystemExit) as e:  # a file that no gpucheck.py or bench.py wrote is not replaced
        gpucheck.main(["--device=cpu", f"--json={other}"])
    assert e.value.code == 2 and "gpucheck.py: error:" in capsys.readouterr().err and other.read_text() == '{"mine": 1}'


def test_ci_gpu_runs_offline_and_names_what_was_not_carried(tmp_path):
    # the GPU box has no internet: a part whose data was not carried is skipped with one line naming it and
    # the command that prepares it, and nothing is downloaded; the script writes at most 7 files
    script = (ROOT / ".ci" / "gpu").read_text()
    assert "python3 dev/gpucheck.py --json=" in script and "pip download" not in script
    assert len(set(re.findall(r'\$OUT/([\w.]+)', script))) <= 7
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DATA": str(tmp_path / "not-carried"), "PARTS": "shakespeare step"}
    r = subprocess.run(["bash", str(ROOT / ".ci" / "gpu")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    skips = [line for line in r.stdout.splitlines() if line.startswith("=== SKIP")]
    assert [s.split(":")[0] for s in skips] == ["=== SKIP gpu-shakespeare", "=== SKIP step"]
    assert all("not-carried is missing: prepare it with python data.py --tokenizer=cl100k_base" in s for s in skips)
    assert os.listdir(tmp_path / "out") == ["log.txt"]


def test_router_precision_check_tells_fp32_from_a_rounded_router(monkeypatch):
    # passes on the fp32 router, fails when the router's matmul loses mantissa bits as TF32 would
    cpu = torch.device("cpu")
    assert gpucheck.check_router_precision(cpu)[0] is True
    import model
    linear = model.F.linear
    monkeypatch.setattr(model.F, "linear", lambda x, w, *a: linear(x.bfloat16(), w.bfloat16(), *a).float())
    assert gpucheck.check_router_precision(cpu)[0] is False
