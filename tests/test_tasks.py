"""Tasks behind one door: a run meets a task only through its TASK (tasks/__init__.py), so the
README's own task, one more file of tasks/, runs as the built-in ones do; and a task file that
gives something else is refused in one line before anything is written."""
import json
import os
import sys

import pytest

import inputs
import tasks
import train
from checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--model", "tiny", "--n-sft", "64", "--chunk-size", "16", "--n-eval", "8", "--sft-steps", "5",
        "--iterations", "1", "--batch-size", "8", "--micro-batch-size", "8", "--gen-batch-size", "8"]


@pytest.fixture
def own_tasks(tmp_path, monkeypatch):
    """A folder of tasks of one's own, seen as files of tasks/: write(name, code) puts one there."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    monkeypatch.setattr(tasks, "__path__", [*tasks.__path__, str(folder)])
    written = []

    def write(name, code):
        (folder / f"{name}.py").write_text(code)
        written.append(f"tasks.{name}")
    yield write
    for name in written:
        sys.modules.pop(name, None)


def test_the_built_in_tasks_are_the_files_of_tasks():
    assert tasks.names() == ["instructions", "sorting"]
    assert all(isinstance(inputs.load_task(n), tasks.Task) for n in tasks.names())


def test_the_readmes_own_task_runs(own_tasks, tmp_path, capsys):
    readme = open(os.path.join(ROOT, "README.md")).read()
    own_tasks("addition", readme.split("## Your own task")[1].split("```python\n")[1].split("```")[0])
    assert "addition" in tasks.names()
    out = tmp_path / "out"
    train.main(FAST + ["--task", "addition", "--out-dir", str(out)])
    rows = json.load(open(out / "results.json"))
    assert [r["stage"] for r in rows] == ["sft", "dpo", "selm_1"]
    assert all(0 <= r["perfect"] <= r["reward"] + 1e-9 <= 1 + 1e-9 for r in rows)  # its judge: 1.0 or 0.0 per answer
    assert "--task addition: adding two numbers below 99 (tasks/addition.py)" in capsys.readouterr().out
    assert load_checkpoint(str(out / "selm_1.pt"))["prompt_template"] == "add: {prompt}\n"


@pytest.mark.parametrize("code,msg", [
    ("X = 1\n", "--task bad: tasks/bad.py has no TASK that is a tasks.Task"),
    ("import no_such_module_xyz\n", "--task bad: cannot import tasks/bad.py: ModuleNotFoundError"),
    ("from tasks import Data, Task\nTASK = Task(lambda cfg: Data([['a prompt']] * (cfg.iterations + 1), []), "
     "lambda p, c: [0.0] * len(c))\n", "--task bad: its chunks must hold offline pairs"),
])
def test_a_bad_task_is_one_line(own_tasks, tmp_path, code, msg):
    own_tasks("bad", code)
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--task", "bad", "--out-dir", str(tmp_path / "out")])
    assert str(e.value).startswith(f"train.py: error: {msg}") and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()
