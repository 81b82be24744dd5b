"""
tasks/ -- the built-in tasks, behind one door: `--task NAME` runs the task of tasks/NAME.py.

Each file here is a task: a module whose TASK is a Task, the small interface below. inputs.py
builds a run's data through it and through nothing else, so a task of your own is one more
file here (README, "Your own task"):
  sorting.py       sort a word's letters: the task of a fresh model (the default);
  instructions.py  requests with checkable constraints: the task of a chat model (--init-from).
"""

import os
from typing import Callable, NamedTuple


class Data(NamedTuple):
    """A task's data, as Task.make draws it for a run.
    chunks: one list per stage after SFT (iterations + 1): chunk 0 for offline DPO, chunk t for
            SELM iteration t. Each item an offline pair {"prompt", "chosen", "rejected"}; or, for
            a chat model's task, a prompt (a string) whose pair the starting model's own answers
            make (--pair-samples of them, judged: pairs.own_pairs)
    eval:   held-out prompts, {"prompt", "reference"}: an answer to beat, or None
    sft:    (prompt, response) demonstrations, if the task has any"""
    chunks: list
    eval: list
    sft: list = ()


class Task(NamedTuple):
    """What a task gives a run.
    make(cfg) -> Data: its data, drawn from the run's settings (train.Config): cfg.task_seed,
                 cfg.iterations + 1 chunks of cfg.chunk_size prompts, cfg.n_eval held-out prompts...
    judge(prompt, candidates) -> one score per candidate, higher is better, deterministic; 1.0
                 means fully correct (results.json's "perfect")
    template:    how its prompts are written, "{prompt}" standing for the user's text (sample.py
                 writes a prompt so); None for a chat model's task: its prompts are user turns,
                 rendered with the model's chat template, and the run needs --init-from
    about:       what it asks, for the run's first screen (a format string: {cfg} is train.Config)
    metrics(prompts, answers) -> {name: figure}: more columns of results.json from the greedy
                 evaluation answers, or None"""
    make: Callable
    judge: Callable
    template: str = "{prompt}"
    about: str = ""
    metrics: Callable = None


def names():
    """The tasks there are: the files of this folder (the package's __path__), but this one."""
    return sorted({f[:-3] for d in __path__ for f in os.listdir(d) if f.endswith(".py") and not f.startswith("_")})
