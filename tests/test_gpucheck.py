"""gpucheck.py stands alone: it imports nothing of bench.py (bench.py imports it), says in one line that a
machine has no CUDA device (exit 2), and exits 0 or 1 as its checks pass or fail. The checks themselves
run on a CPU in tests/test_bench.py (bench.py gpu-check)."""
import json
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


def test_ci_runs_it():
    assert "python3 dev/gpucheck.py --json=" in (ROOT / ".ci" / "gpu").read_text()
