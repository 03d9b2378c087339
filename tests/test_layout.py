"""The project's shape: the top level is the method, and its dependencies point one way (harness/ and dev/
use the method; the method's model and accounting use neither)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHOD = ["model.py", "flops.py", "data.py", "train.py", "sweep.py", "sample.py", "evaluate.py"]


def loaded_after(code):
    """The project modules (harness/, dev/, kernels/ and the top-level files) loaded by `code` in a fresh process."""
    probe = (f"import sys; {code}; print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
             f"('harness', 'dev', 'kernels', {', '.join(repr(f[:-3]) for f in METHOD)}))))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


def test_the_top_level_is_the_seven_files_of_the_method():
    assert sorted(p.name for p in ROOT.glob("*.py")) == sorted(METHOD)


def test_the_model_and_the_accounting_load_nothing_of_the_harness():
    assert loaded_after("import flops") == {"flops"}  # and no torch: planners and the command line use it anywhere
    assert "torch" not in subprocess.run([sys.executable, "-c", "import sys, flops; print(*sys.modules)"],
                                         capture_output=True, text=True, cwd=ROOT).stdout.split()
    model_needs = loaded_after("import model")
    assert not {m for m in model_needs if m.split(".")[0] in ("harness", "dev")}, model_needs
    assert model_needs <= {"model", "flops", "kernels", "kernels.custom_ops"}


def test_the_readme_gives_each_top_level_files_line_count():
    rows = dict(re.findall(r"^\| `(\w+\.py)` \| ([\d,]+) \|", (ROOT / "README.md").read_text(), flags=re.M))
    counts = {f: len((ROOT / f).read_text().splitlines()) for f in METHOD}
    assert {f: int(rows[f].replace(",", "")) for f in METHOD if f in rows} == counts
    total = re.search(r"^\| together \| ([\d,]+) \|", (ROOT / "README.md").read_text(), flags=re.M)
    assert total and int(total.group(1).replace(",", "")) == sum(counts.values())
