"""No code execution from data: the package never unpickles, never evaluates strings and never
asks for `trust_remote_code`.

The scan reads every module's syntax tree (not its text), so a comment or a string that
mentions pickle does not count, and an aliased import (`import pickle as p`, `from torch import
load`) does. The scanner is itself tested on small sources holding each forbidden pattern.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bitnet158"

# Modules whose loading functions run code stored in the data they read.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}  # fmt: skip
CODE_BUILTINS = {"eval", "exec"}


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` of a Name/Attribute chain, or None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def find_code_execution(source: str, filename: str = "<source>") -> list[str]:
    """Every place in `source` that can run code taken from data, as "file:line: what"."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> the dotted name it stands for
    found: list[str] = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):  # imports first: aliases apply wherever the name is used
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in UNSAFE_MODULES:
                    report(node, f"imports {a.name}")
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES:
                report(node, f"imports from {node.module}")
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def resolve(func: ast.AST) -> str | None:
        name = _dotted(func)
        if name is None:
            return None
        head, _, rest = name.partition(".")
        full = aliases.get(head, head)
        return f"{full}.{rest}" if rest else full

    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            if not _is_const(node.value, False):
                report(node.value, "passes trust_remote_code")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                named = isinstance(key, ast.Constant) and key.value == "trust_remote_code"
                if named and not _is_const(value, False):
                    report(key, "sets trust_remote_code")
        if not isinstance(node, ast.Call):
            continue
        name = resolve(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        if isinstance(node.func, ast.Name) and node.func.id in CODE_BUILTINS | {"__import__"}:
            if node.func.id != "__import__":
                report(node, f"calls {node.func.id}()")
            elif node.args and isinstance(node.args[0], ast.Constant):
                if str(node.args[0].value).split(".")[0] in UNSAFE_MODULES:
                    report(node, f"imports {node.args[0].value} dynamically")
        elif name in ("builtins.eval", "builtins.exec"):
            report(node, f"calls {name}()")
        elif name == "importlib.import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in UNSAFE_MODULES:
                report(node, f"imports {arg.value} dynamically")
        elif name == "torch.load" and not _is_const(kwargs.get("weights_only"), True):
            report(node, "calls torch.load without weights_only=True")
        elif name == "numpy.load" and "allow_pickle" in kwargs:
            if not _is_const(kwargs["allow_pickle"], False):
                report(node, "calls numpy.load with allow_pickle")
    return found


def package_sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_runs_no_code_from_data():
    files = package_sources()
    assert len(files) > 40, f"only {len(files)} modules under {PACKAGE}: wrong directory?"
    found = []
    for path in files:
        found += find_code_execution(
            path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE))
        )
    assert found == []


@pytest.mark.parametrize(
    "source, what",
    [
        ("import pickle\n", "imports pickle"),
        ("import cPickle as p\n", "imports cPickle"),
        ("from dill import loads\n", "imports from dill"),
        ("import joblib.numpy_pickle\n", "imports joblib.numpy_pickle"),
        ("from marshal import loads as l\n", "imports from marshal"),
        ("m = __import__('pickle')\n", "imports pickle dynamically"),
        ("import importlib\nm = importlib.import_module('shelve')\n", "imports shelve dynamically"),
        ("import torch\nsd = torch.load(path)\n", "torch.load without weights_only=True"),
        ("import torch as T\nsd = T.load(path, weights_only=False)\n", "torch.load without"),
        ("from torch import load\nsd = load(path, map_location='cpu')\n", "torch.load without"),
        (
            "import numpy as np\na = np.load(path, allow_pickle=True)\n",
            "numpy.load with allow_pickle",
        ),
        (
            "from numpy import load\na = load(path, allow_pickle=flag)\n",
            "numpy.load with allow_pickle",
        ),
        ("x = eval(text)\n", "calls eval()"),
        ("exec(code, {})\n", "calls exec()"),
        ("import builtins\nbuiltins.eval(s)\n", "calls builtins.eval()"),
        (
            "m = AutoModel.from_pretrained(name, trust_remote_code=True)\n",
            "passes trust_remote_code",
        ),
        ("kw = {'trust_remote_code': True}\n", "sets trust_remote_code"),
    ],
)
def test_the_scanner_catches(source, what):
    found = find_code_execution(source, "bad.py")
    assert len(found) == 1, found
    assert what in found[0] and found[0].startswith("bad.py:")


def test_the_scanner_ignores_safe_look_alikes():
    source = '''
# import pickle; torch.load(path)
"""eval(text) and pickle.loads(data) in a docstring"""
import numpy as np
import torch
message = "never torch.load(f) or exec(s)"
model.eval()
llm.eval([1, 2])
sd = torch.load(path, weights_only=True)
a = np.load(path)
b = np.load(path, allow_pickle=False)
m = AutoModel.from_pretrained(name, trust_remote_code=False)
suffixes = (".pkl", ".pickle")
'''
    assert find_code_execution(source) == []
