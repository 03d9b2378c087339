"""--help for the config keys: each key's default and meaning, read from its dataclass field's line.

A field's meaning is the comment on its line, and the comment lines right under it that are indented
past the field (a comment line at the field's indentation, like one before a field, is a note for the
reader of the code, not help):

    lr: float = 0.0           # peak learning rate; 0 = StepLaw (M15)
    reuse_at: list = field(default_factory=list)  # target r_a of the strict/loose arms; [] = every r_a;
    #                                               ["best"] = the best r_a once the no-reuse arms have run

The classes are read from their source files, never imported, so `train.py --help` answers before torch
loads. tests/test_help.py checks that every field of every config class has a line here, and that the
names and defaults read equal the dataclasses' own.
"""
import argparse
import ast
import io
import json
import os
import sys
import tokenize
from dataclasses import MISSING, dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project
# where train.py's two tables come from (config.SECTIONS; tests/test_help.py checks they match)
TRAIN_TABLES = {"model": (ROOT / "model.py", "GPTConfig"), "train": (ROOT / "harness/config.py", "TrainConfig")}


@dataclass(frozen=True)
class Key:
    name: str
    default: object  # MISSING: the key is required
    doc: str         # one line; "" when the field has no comment
    kind: str = ""   # the field's annotation as written (int, float, bool, str, list, …)


@dataclass(frozen=True)
class _Comment:
    hash_col: int  # column of the '#'
    text_col: int  # column where its text starts
    text: str
    alone: bool    # nothing but the comment on its line


@cache
def _parse(path):
    source = Path(path).read_text(encoding="utf-8")
    lines = source.splitlines()
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            (row, col), body = tok.start, tok.string[1:]
            comments[row] = _Comment(col, col + 1 + len(body) - len(body.lstrip()), body.strip(),
                                     not lines[row - 1][:col].strip())
    return ast.parse(source), comments


def source_of(module):
    """The source file of a project module: a top-level file (the method) or one of harness/."""
    top = ROOT / f"{module}.py"
    return top if top.exists() else ROOT / "harness" / f"{module}.py"


def keys(path, cls_name):
    """[Key] of a dataclass in a source file, in the dataclass's order: its bases' fields first. A base is
    a class of the same file (Base) or of a module (module.Base) beside it or of the project."""
    tree, comments = _parse(str(path))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name), None)
    if cls is None:
        raise LookupError(f"no class {cls_name} in {path}")
    out = {}
    for base in cls.bases:
        if isinstance(base, ast.Name):
            out.update((k.name, k) for k in keys(path, base.id))
        elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
            beside = Path(path).with_name(base.value.id + ".py")
            out.update((k.name, k) for k in keys(beside if beside.exists() else source_of(base.value.id), base.attr))
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and "ClassVar" not in ast.unparse(node.annotation):
            out[node.target.id] = Key(node.target.id, _default(node.value), _doc(node, comments), ast.unparse(node.annotation))
    return list(out.values())


def _default(node):
    """A field's default from its source: a literal, or field(default=…) / field(default_factory=…)."""
    if node is None:
        return MISSING
    if isinstance(node, ast.Call) and ast.unparse(node.func) in ("field", "dataclasses.field"):
        kw = {k.arg: k.value for k in node.keywords}
        if "default" in kw:
            return ast.literal_eval(kw["default"])
        factory = kw.get("default_factory")
        if isinstance(factory, ast.Lambda):
            return ast.literal_eval(factory.body)
        if isinstance(factory, ast.Name) and factory.id in ("list", "dict", "tuple"):
            return {"list": list, "dict": dict, "tuple": tuple}[factory.id]()
        return MISSING
    return ast.literal_eval(node)


def _doc(node, comments):
    """The comment on the field's line(s), then the comment lines under it indented past the field."""
    parts = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments and not comments[r].alone]
    if not parts:
        return ""
    row = node.end_lineno + 1
    while row in comments and comments[row].alone and (comments[row].hash_col > node.col_offset
                                                         or comments[row].text_col > node.col_offset + 2):
        parts.append(comments[row])
        row += 1
    return " ".join(c.text for c in parts if c.text)


def toml_value(v):
    """A default as a config file would write it."""
    if v is MISSING:
        return "(required)"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    text = f"{v:e}" if isinstance(v, float) and abs(v) >= 1e5 and "e" not in repr(v) else repr(v)
    if "e" in text:  # 2.5e6, 1e-5: as one writes them
        mantissa, exponent = text.split("e")
        text = f"{mantissa.rstrip('0').rstrip('.') if '.' in mantissa else mantissa}e{int(exponent)}"
    return text


def table(title, rows):
    """The title, then one line per Key: `key = default   meaning`, aligned (one line each, to grep)."""
    left = [f"{k.name} = {toml_value(k.default)}" for k in rows]
    width = max(map(len, left), default=0) + 3
    return "\n".join([title] + [f"  {a:<{width}}{k.doc}".rstrip() for a, k in zip(left, rows)])


def show(text):
    """Print help text; a reader that stops early (| head) ends it quietly, not with a traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit must not fail


def train_help(doc):
    """train.py --help: its docstring's first two paragraphs (what it is, the command forms), then every
    [model] and [train] key."""
    return "\n\n".join(doc.strip().split("\n\n")[:2] + [
        "Each key below is a --key=value flag and a key of a config file's [model] or [train] table (the flags\n"
        "go on top of the file). --resume continues the run in out_dir from its own config.toml, the flags on top;\n"
        "--plan [--nproc=N] prints the memory per rank and runs nothing.",
        table("[model]  (model.GPTConfig)", keys(*TRAIN_TABLES["model"])),
        table("[train]  (harness.config.TrainConfig)", keys(*TRAIN_TABLES["train"]))]) + "\n"


class Parser(argparse.ArgumentParser):
    """The command line of every program: an ArgumentParser that refuses a flag given twice (--lr=1 --lr=2:
    which one was meant?), naming the flag and both values. (A positional of several values may repeat one:
    `dev/bench.py versions A A` times a checkout against itself.) Flags meant to repeat (action="append" or "extend", such as data.py --val) stay repeatable. Its
    subcommands are Parsers too (add_subparsers makes them of the parser's class)."""
    REPEATABLE = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction,  # (and extend)
                  argparse._HelpAction)  # -h -h: still the help

    def parse_known_args(self, args=None, namespace=None):
        self._given = {}  # action -> the strings it was given, for this parse
        try:
            return super().parse_known_args(args, namespace)
        finally:
            del self._given

    def _get_values(self, action, arg_strings):  # argparse calls this once for each argument it meets
        name = action.option_strings[0] if action.option_strings else action.dest
        if action.option_strings and not isinstance(action, self.REPEATABLE):
            if action in self._given:
                both = "" if action.nargs == 0 else f" ({self._given[action]!r} and {' '.join(arg_strings)!r})"
                self.error(f"argument {name}: given twice{both}: give it once")
            self._given[action] = " ".join(arg_strings)
        return super()._get_values(action, arg_strings)
