"""Every citation resolves inside the repository: nothing outside it (tests/citations.toml names the old
specification file and its tags, which are refused); every (Mn) tag is an equation that docs/method.md defines, every docs/ path exists, every
"docs/method.md §k" is a section of it, every relative Markdown link leads to a file. In the README, docs/ and
configs/ also every file.py (harness/config.py, dev/bench.py) is a file of the repository, and every `module.name`
(`flops.M_exec`, `harness.config.RANGES`, `GPT.compile_regions`) is defined where it says, read from the source
without importing it. No torch."""
import ast
import functools
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHOD = ROOT / "docs" / "method.md"

CITATIONS = tomllib.loads((ROOT / "tests" / "citations.toml").read_text(encoding="utf-8"))
OUTSIDE, OLD = ([(re.compile(c["pattern"]), c["why"]) for c in CITATIONS[k]] for k in ("anywhere", "outside"))
# the log tells how the tags of the old specification became the (Mn) tags: it may name them
HISTORY = {"docs/log.md"}
M_TAG = re.compile(r"\bM(\d+)\b")                              # M6, (M11), M1–M6: not M_train, 80M
DOCS_PATH = re.compile(r"\bdocs/([\w-]+(?:\.[\w-]+)*\.\w+)")    # docs/method.md, docs/sweep-cpu.png
METHOD_SECTION = re.compile(r"method\.md\)?,?\s*(?:§|section\s+)(\d+)(?:\s*[–-]\s*(\d+))?")
MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")            # [text](target): relative targets only checked
PY_PATH = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.py)\b")   # train.py, harness/config.py, dev/bench.py
CODE_NAME = re.compile(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(\))?`")   # `flops.M_exec`, `GPT.compile_regions`
FILE_SUFFIXES = {"py", "toml", "json", "jsonl", "pt", "md", "png", "csv", "txt", "bin", "gz", "zst", "parquet", "whl"}
PACKAGES = ("harness", "dev", "kernels")                       # folders of modules: harness.config, dev.bench
CHECKS_CODE = (".md", ".toml")                                   # the README, docs/ and configs/ cite code by name


@functools.cache
def modules():
    """{dotted module name: its file}: the top-level files and the packages' modules."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for package in PACKAGES:
        found.update({f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"})
    return found


@functools.cache
def definitions(module):
    """({name defined or imported at the top of the module}, {class name: {names defined in its body, and
    the self.<name> its methods assign}})."""
    tree = ast.parse(modules()[module].read_text(encoding="utf-8"))
    names, classes = set(), {}

    def bound(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return {node.name}
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return {(a.asname or a.name).split(".")[0] for a in node.names}
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}

    for node in tree.body:
        names |= bound(node)
        if isinstance(node, ast.ClassDef):
            classes[node.name] = set().union(*(bound(n) for n in node.body)) | {
                t.attr for n in ast.walk(node) if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    return names, classes


def code_name_problem(dotted):
    """Why `dotted` (module.name, package.module.name or Class.member) does not resolve, or None; names
    outside the repository (torch.compile, F.rms_norm) are not checked."""
    parts = dotted.split(".")
    if parts[-1] in FILE_SUFFIXES:                               # config.toml, meta.json: files, not code
        return None
    if parts[0] in PACKAGES:
        module, rest = ".".join(parts[:2]), parts[2:]
        if module not in modules():
            return f"no module {module} ({module.replace('.', '/')}.py)"
    elif parts[0] in modules():
        module, rest = parts[0], parts[1:]
    else:
        moved = [m for m in modules() if m.split(".")[-1] == parts[0]]
        if moved:                                                # `config.RANGES` where config is harness.config
            return f"{parts[0]} is {moved[0]} ({moved[0].replace('.', '/')}.py)"
        owners = [m for m in modules() if parts[0] in definitions(m)[1]]
        if not owners:
            return None                                          # not ours
        if any(parts[1] in definitions(m)[1][parts[0]] for m in owners):
            return None
        return f"class {parts[0]} ({', '.join(owners)}) defines no {parts[1]}"
    if not rest:
        return None
    names, classes = definitions(module)
    if rest[0] not in names:
        return f"{module} defines no {rest[0]}"
    if len(rest) > 1 and rest[0] in classes and rest[1] not in classes[rest[0]]:
        return f"{module}.{rest[0]} defines no {rest[1]}"
    return None


def method_tags():
    """{n: how many times (Mn) is displayed} over the fenced formula blocks of docs/method.md."""
    tags, fenced = {}, False
    for line in METHOD.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            for n in re.findall(r"\(M(\d+)\)", line):
                tags[int(n)] = tags.get(int(n), 0) + 1
    return tags


def method_sections():
    return [int(n) for n in re.findall(r"^## §(\d+) ", METHOD.read_text(encoding="utf-8"), re.M)]


def problems(text, path, tags, sections):
    """One line per citation in text (the contents of `path`) that does not resolve in the repository."""
    out = []
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    for i, line in enumerate(text.splitlines(), 1):
        where = f"{name}:{i}"
        for pattern, why in OUTSIDE + ([] if name in HISTORY else OLD):
            for m in pattern.finditer(line):
                out.append(f"{where}: {m.group(0)!r}: {why}")
        for m in M_TAG.finditer(line):
            if int(m.group(1)) not in tags:
                out.append(f"{where}: {m.group(0)!r}: docs/method.md defines no such equation")
        for m in DOCS_PATH.finditer(line):
            if not (ROOT / "docs" / m.group(1)).is_file():
                out.append(f"{where}: {m.group(0)!r}: no such file")
        for m in METHOD_SECTION.finditer(line):
            for n in filter(None, m.groups()):
                if int(n) not in sections:
                    out.append(f"{where}: {m.group(0)!r}: docs/method.md has no §{n}")
        if path.suffix in CHECKS_CODE and name not in HISTORY:  # the log may name files and functions that are gone
            for m in PY_PATH.finditer(line):
                if not (ROOT / m.group(1)).is_file():
                    out.append(f"{where}: {m.group(1)!r}: no such file in the repository")
            for m in CODE_NAME.finditer(line):
                if why := code_name_problem(m.group(1)):
                    out.append(f"{where}: `{m.group(1)}`: {why}")
        if path.suffix == ".md":
            for m in MD_LINK.finditer(line):
                target = m.group(1)
                if not re.match(r"[a-z]+:", target) and not (path.parent / target).exists():
                    out.append(f"{where}: link {target!r}: no such file")
    return out


def cited_files():
    """Everything that cites."""
    return sorted({*ROOT.glob("*.py"), *(p for d in PACKAGES for p in ROOT.glob(f"{d}/*.py")), *ROOT.glob("tests/*.py"),
                   *ROOT.glob("tests/*.json"), ROOT / "README.md", *ROOT.glob("configs/*.toml"), *ROOT.glob("docs/*.md")})


def test_method_defines_M1_to_M15_once_each():
    assert method_tags() == {n: 1 for n in range(1, 16)}


def test_method_sections_are_numbered_from_1():
    sections = method_sections()
    assert sections == list(range(1, len(sections) + 1)) and len(sections) >= 8


@pytest.mark.parametrize("path", cited_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_citation_resolves_in_the_repository(path):
    found = problems(path.read_text(encoding="utf-8"), path, method_tags(), method_sections())
    assert not found, "\n".join(found)


@pytest.mark.parametrize("bad", CITATIONS["examples"]["bad"])
def test_a_bad_citation_is_caught(bad):
    page = ROOT / "docs" / "example.md"  # not written: only its name and folder matter
    assert problems(bad, page, method_tags(), method_sections())


@pytest.mark.parametrize("good", CITATIONS["examples"]["good"])
def test_a_good_citation_passes(good):
    assert not problems(good, ROOT / "docs" / "example.md", method_tags(), method_sections())
