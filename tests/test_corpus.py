"""dev/corpus.py on small inline samples: GCIDE's markup stripped to plain text (pronunciations, source
tags, braces, diacritic codes, the next entry's headword), quotations kept but Shakespeare's and Milton's
dropped; the Bible's listing parsed into books and chapters; a dictd index read; the sources interleaved
in proportion; whole books and letters held out. No downloads, no Debian tools: milliseconds."""
import gzip
import math

import pytest

from dev import corpus

ENTRY = r"""Abandon \A*ban"don\ ([.a]*b[a^]n"d[u^]n), v. t. [imp. & p. p.
   {Abandoned} (-d[u^]nd); p. pr. & vb. n. {Abandoning}.] [OF.
   abandoner, F. abandonner.] (Mar. Law)
   1. To cast or drive out; to banish; to expel; to reject.
      [Obs.]
      [1913 Webster]

            That he might . . . abandon them from him. --Udall.
      [1913 Webster]

            Being all this time abandoned from your bed. --Shak.
      [1913 Webster]

            Thou shalt love the Lord thy God with all thy heart,
            and with all thy soul.                --Matt. xxii.
                                                  37.
      [1913 Webster]

   2. To give up absolutely; pre["e]minent in [ae]on; as, "The
      gentle lark." --Milton. Also "a foolish thing." --Dryden.
      Ma*li"cious*ly, adv. See {Howler[2]}.
      [1913 Webster +PJC]

   Syn: To give up; yield; forego.
   [1913 Webster] Abandoned
"""


def test_a_gcide_entry_becomes_plain_text():
    out = corpus.strip_gcide(ENTRY)
    lines = out.splitlines()
    assert lines[0] == ("Abandon, v. t. [imp. & p. p. Abandoned; p. pr. & vb. n. Abandoning.] [OF. abandoner, "
                        "F. abandonner.] (Mar. Law) 1. To cast or drive out; to banish; to expel; to reject. [Obs.]")
    # quotations keep their lines (the attribution's spacing collapsed); Shakespeare's and Milton's go
    assert "That he might . . . abandon them from him. --Udall." in lines
    assert "Thou shalt love the Lord thy God with all thy heart," in lines
    assert "and with all thy soul. --Matt. xxii." in lines
    assert "abandoned from your bed" not in out and "gentle lark" not in out
    assert '"a foolish thing." --Dryden.' in out and "--Milton." in out  # the attribution stays, the words go
    assert "preeminent in aeon" in out and "Maliciously, adv. See Howler." in out
    assert lines[-1] == "Syn: To give up; yield; forego."  # the next entry's headword after the last tag is gone
    for markup in ("\\", "{", "}", "[1913", "Webster]", "PJC", "[a^]", "[.a]", '"d', "Abandoned\n"):
        assert markup not in out, markup


@pytest.mark.parametrize("inside, pronunciation", [
    ('[.a]*b[a^]n"d[u^]n', True), ("sp[^u]rt", True), ("? or ?", True), ("l[u^]v", True), ("-d[u^]nd", True),
    ("Bot.", False), ("Mar. Law", False), ("pl. Abas", False), ("Rhamnus Purshiana", False),
    ('"quoted words"', False)])
def test_which_parentheses_are_respellings(inside, pronunciation):
    assert corpus.respelling(inside) is pronunciation


def test_diacritic_codes_become_letters_and_labels_stay():
    assert corpus.letters('pre["e]minent [ae]on sm[oo^]th fa[,c]ade [^o]re [=a]ble') == \
        "preeminent aeon smooth facade ore able"
    assert corpus.letters("[frac12] inch, 30[deg], [sect] 4") == "1/2 inch, 30\u00b0, \u00a7 4"
    assert corpus.letters("[Obs.] [R.] [It.] [He] said [AS] [2]") == "[Obs.] [R.] [It.] [He] said [AS] [2]"


def test_an_entry_of_only_markup_is_dropped_and_source_tags_go_anywhere():
    assert corpus.strip_gcide("   [1913 Webster]\n") == ""
    assert corpus.strip_gcide("Ab \\Ab\\, n. A month. [1913 Webster] Also\n   a name. [PJC]\n") == \
        "Ab, n. A month. Also a name.\n"  # text after a tag inside the entry stays


KJV = """Ge1:1 In the beginning God created the heaven and the earth.
Ge1:2 And the earth was without form, and void;   and darkness was upon the face of the deep.
Ge2:1 Thus the heavens and the earth were finished, and all the host of them.
Exo1:1 Now these are the names of the children of Israel, which came into Egypt.
Lev1:1 And the LORD called unto Moses.""".splitlines()


def test_the_bibles_listing_becomes_books_of_chapters():
    books = corpus.kjv_books(KJV, whole=False)
    assert [b for b, _ in books] == ["Genesis", "Exodus", "Leviticus"]
    assert [c for c, _ in books[0][1]] == [1, 2] and len(books[0][1][0][1]) == 2
    assert corpus.kjv_chapter("Genesis", *books[0][1][0]) == (
        "Genesis 1\nIn the beginning God created the heaven and the earth.\n"
        "And the earth was without form, and void; and darkness was upon the face of the deep.\n")
    with pytest.raises(ValueError, match="66"):
        corpus.kjv_books(KJV)  # not the whole Bible
    with pytest.raises(ValueError, match="no verse"):
        corpus.kjv_books(["Genesis 1", *KJV], whole=False)


def b64(n):
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[n % 64] + out
        n //= 64
        if not n:
            return out


def dictd(entries):
    """A dictd database of (headword, text): its data and its index (sorted by headword, as dictd's are)."""
    data, index = b"", []
    for word, text in entries:
        raw = text.encode("utf-8")
        index.append(f"{word}\t{b64(len(data))}\t{b64(len(raw))}")
        data += raw
    return data, "\n".join(["00-database-info\tA\tB"] + sorted(index)) + "\n"


def test_a_dictd_database_is_read_in_data_order_each_entry_once():
    data, index = dictd([("Zeal", "Zeal \\Zeal\\, n. Passion.\n"), ("Apple", 'Apple \\Ap"ple\\, n. A fruit.\n')])
    index += "Apples\t" + index.splitlines()[1].split("\t", 1)[1] + "\n"  # a second headword of one entry
    got = list(corpus.dictd_entries(data, index))
    assert [w for w, _ in got] == ["Zeal", "Apple"] and got[1][1].startswith("Apple")
    assert corpus.b64_number("Bpu") == 1 * 64 * 64 + 41 * 64 + 46


def test_interleave_keeps_each_sources_order_and_every_prefix_in_proportion():
    big = [f"b{i:03d}" * 3 for i in range(300)]   # 12 characters a unit, 3,600 in all
    small = [f"s{i:02d}" for i in range(100)]     # 3 characters a unit, 300 in all
    out = corpus.interleave([big, small])
    assert [u for u in out if u[0] == "b"] == big and [u for u in out if u[0] == "s"] == small
    done = {"b": 0, "s": 0}
    for u in out:
        done[u[0]] += len(u)
        assert abs(done["b"] / 3600 - done["s"] / 300) <= 12 / 3600 + 3 / 300


def test_whole_books_and_letters_are_held_out(tmp_path, monkeypatch):
    book = lambda name, text: (name, [(1, [text])])  # noqa: E731
    monkeypatch.setattr(corpus, "read_kjv", lambda root: [book("Genesis", "In the beginning."),
                                                         book("Judges", "Now after the death of Joshua."),
                                                         book("Mark", "The beginning of the gospel.")])
    data, index = dictd([("Jab", "Jab \\Jab\\, v. t. To thrust.\n"), ("Abb", "Abb \\Abb\\, n. Yarn.\n"),
                         ("Zeal", "Zeal \\Zeal\\, n. Passion.\n"), ("Kale", "Kale \\Kale\\, n. Cabbage.\n")])
    base = tmp_path / "usr" / "share" / "dictd"
    base.mkdir(parents=True)
    (base / "gcide.dict.dz").write_bytes(gzip.compress(data))
    (base / "gcide.index").write_text(index)
    texts, sizes = corpus.build(tmp_path)
    assert "Judges 1" in texts["val"] and "Mark 1" in texts["val"] and "Genesis 1" in texts["train"]
    assert "Jab, v. t." in texts["val"] and "Kale" in texts["val"] and "Zeal" in texts["val"]
    assert "Abb, n. Yarn." in texts["train"] and "Jab" not in texts["train"] and "Mark" not in texts["train"]
    assert sizes["train"]["gcide"] == len("Abb, n. Yarn.\n") and sizes["val"]["kjv"] > 0


def test_shared_counts_the_held_out_sequences_found_in_training():
    held = "one two three four five six seven eight nine ten"
    assert corpus.shared(held, "x " + held.upper() + " y", n=8) == 1.0
    assert corpus.shared(held, "one two three four five six seven", n=8) == 0.0
    assert math.isclose(corpus.shared(held, "two three four five six seven eight nine", n=8), 1 / 3)
