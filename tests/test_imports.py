"""The house's plan: the README's file map lists every chapter in reading order, and each chapter
imports only chapters above it there -- imports at any depth, and imports by name
(importlib.import_module("x"), __import__("x")) as much as import statements -- so imports
point down and never go round in a circle. No chapter imports a tool, and the tools of
experiments/ form no circle either."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tasks",)  # folders of chapters: each a row of the file map, its modules read at that row
TOOLS = ("experiments", "perf", "tools")
# The one place a chapter imports a module whose name it computes: a user's --judge module
BY_COMPUTED_NAME = {("inputs", "load_judge")}


def imports(path):
    """The modules a file imports, at any depth (function-level imports included), with where:
    {module: [(line, function)]}. An import by name counts as an import statement does: a
    literal name, or an f-string's literal start ("tasks." for every module of tasks/); a name
    computed otherwise counts as "?"."""
    found = {}
    for fn, node in walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and called(node) in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names = [arg.value]
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                names = [arg.values[0].value + "*"]
            else:
                names = ["?"]
        for name in names:
            found.setdefault(name, []).append((node.lineno, fn))
    return found


def walk(tree):
    """(the enclosing top-level function's name or None, node) for every node of a module."""
    for top in tree.body:
        fn = top.name if isinstance(top, (ast.FunctionDef, ast.ClassDef)) else None
        for node in ast.walk(top):
            yield fn, node


def called(call):
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def chapters():
    """{module name: its file}: the top-level files, and the modules of PACKAGES."""
    out = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    for pkg in PACKAGES:
        for f in os.listdir(os.path.join(ROOT, pkg)):
            if f.endswith(".py"):
                out[pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"] = os.path.join(ROOT, pkg, f)
    return out


def file_map():
    """The README's file map: its rows' names in order (`model.py` -> model, `tasks/` -> tasks)."""
    text = open(os.path.join(ROOT, "README.md")).read().split("## Files, in reading order")[1].split("\n## ")[0]
    return [re.sub(r"\.py$|/$", "", m) for m in re.findall(r"^\| `([^`]+)` \|", text, re.MULTILINE)]


def row_of(module, rows):
    """The file map's row of a module: its own, or its package's."""
    return rows.index(module.split(".")[0])


def edges(ch):
    """{chapter: {chapter it imports: [(line, function)]}}, imports by an f-string's literal start
    going to every chapter whose name starts so."""
    out = {}
    for c, path in ch.items():
        out[c] = {}
        for name, where in imports(path).items():
            if name.endswith("*"):
                targets = [d for d in ch if d.startswith(name[:-1])]
            else:  # "a.b.c": the longest chapter name it starts with ("tasks.sorting.judge" -> tasks.sorting)
                parts = name.split(".")
                targets = [next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in ch),
                                None)]
            for d in targets:
                if d is not None and d != c:
                    out[c].setdefault(d, []).extend(where)
    return out


def test_the_file_map_lists_every_chapter_once():
    rows, ch = file_map(), chapters()
    assert len(rows) == len(set(rows)), rows
    assert {c.split(".")[0] for c in ch} <= set(rows), sorted({c.split(".")[0] for c in ch} - set(rows))
    assert [r for r in rows if r not in TOOLS + ("tests", "docs", ".ci")] == \
        [r for r in rows if r in {c.split(".")[0] for c in ch}]


def test_each_chapter_imports_only_chapters_above_it_in_the_file_map():
    """Imports point down the reading order, by statement or by name, at any depth: a reader can
    stop after any chapter and has met everything it uses; no circle is possible."""
    rows, ch = file_map(), chapters()
    up = {c: {d: where for d, where in out.items() if row_of(d, rows) > row_of(c, rows)}
          for c, out in edges(ch).items()}
    assert not {c: u for c, u in up.items() if u}, "imports up the file map: {chapter: {imported: [(line, in)]}}"
    # within one row (a package), no circle either
    down = {c: set(out) for c, out in edges(ch).items()}

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in down[a])
    assert not [c for c in ch if reaches(c, c)], {c: sorted(d) for c, d in down.items()}


def test_no_chapter_imports_a_module_whose_name_it_computes_but_the_judges_door():
    """A chapter imported by a computed name would be invisible to the test above (a user's
    --judge module is the one exception, and no chapter's name is computed there)."""
    computed = {(c, fn) for c, path in chapters().items() for _, fn in imports(path).get("?", [])}
    assert computed == BY_COMPUTED_NAME, computed


def test_the_walker_sees_imports_by_name(tmp_path):
    (tmp_path / "x.py").write_text("import importlib\n\n\ndef f(n):\n    importlib.import_module('reward')\n"
                                   "    __import__('hf.load')\n    importlib.import_module(f'tasks.{n}')\n"
                                   "    return importlib.import_module(n)\n")
    (tmp_path / "y.py").write_text("from tasks import sorting\n")
    got = imports(str(tmp_path / "x.py"))
    assert set(got) == {"importlib", "reward", "hf.load", "tasks.*", "?"} and got["reward"] == [(5, "f")]
    ch = {c: str(tmp_path / "y.py") for c in ("reward", "hf", "tasks", "tasks.a", "tasks.b")}
    out = edges({**ch, "x": str(tmp_path / "x.py"), "y": str(tmp_path / "y.py")})
    assert set(out["x"]) == {"reward", "hf", "tasks.a", "tasks.b"} and set(out["y"]) == {"tasks"}


@pytest.mark.parametrize("folder", TOOLS)
def test_no_chapter_imports_a_tool(folder):
    bad = {c: sorted(n for n in imports(path) if n.split(".")[0] == folder) for c, path in chapters().items()}
    assert not {c: n for c, n in bad.items() if n}


def test_the_experiments_form_no_circle():
    tools = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "experiments")) if f.endswith(".py")}
    graph = {t: {n.split(".")[1] for n in imports(os.path.join(ROOT, "experiments", f"{t}.py"))
                 if n.startswith("experiments.") and n.split(".")[1] in tools} for t in tools}

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in graph[a])
    assert not [t for t in tools if reaches(t, t)], graph
    assert "study" not in graph["sweep"] and "sweep" not in graph["study"]
