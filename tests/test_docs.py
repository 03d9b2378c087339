"""Every citation resolves inside the repository: nothing outside it (tests/citations.toml names the old
specification file and its tags, which are refused); every (Mn) tag is an equation that docs/method.md defines, every docs/ path exists, every
"docs/method.md §k" is a section of it, every relative Markdown link leads to a file. No torch."""
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
        if path.suffix == ".md":
            for m in MD_LINK.finditer(line):
                target = m.group(1)
                if not re.match(r"[a-z]+:", target) and not (path.parent / target).exists():
                    out.append(f"{where}: link {target!r}: no such file")
    return out


def cited_files():
    """Everything that cites."""
    return sorted({*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("tests/*.json"), ROOT / "README.md",
                   *ROOT.glob("configs/*.toml"), *ROOT.glob("docs/*.md")})


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
