"""Every flag of every command walked through bad values of its type: each is refused in one
line that names the flag, before anything is written. A flag added later without a check
fails here; a value of a bad-looking shape that is in fact fine is allowed below, with the
reason."""
import dataclasses
import math
import os

import pytest

import train

# Values of each type that are wrong for most flags; FINE lists where one is right.
BAD_BY_TYPE = {int: [-1, 0], float: [-1.0, 0.0, math.nan, math.inf], str: ["", "no-such-thing"]}
# Values of a good shape but out of a flag's range
BAD_EXTRA = {"block_size": [1, 10 ** 9], "seed": [2 ** 32], "task_seed": [2 ** 32], "dropout": [1.0],
             "warmup": [1.5], "max_len": [10 ** 6]}
FINE = {
    ("iterations", 0): "0 iterations stop after offline DPO",
    ("sft_steps", 0): "0 steps skip SFT training (a pretrained --init-from model)",
    ("kl_samples", 0): "0 samples skip the KL estimate",
    ("seed", 0): "seeds start at 0",
    ("task_seed", 0): "seeds start at 0",
    ("alpha", 0.0): "alpha 0 is iterative DPO",
    ("dropout", 0.0): "no dropout",
    ("weight_decay", 0.0): "no weight decay",
    ("grad_clip", 0.0): "0 switches clipping off",
    ("missing_eos_penalty", 0.0): "no penalty",
    ("warmup", 0.0): "no warmup",
    ("out_dir", "no-such-thing"): "a directory that is not there yet is made",
    ("export", ""): "the default: nothing exported",
}


def bad_values(fields, extra=BAD_EXTRA, fine=FINE):
    """[(name, value)] for every field of a type in BAD_BY_TYPE, less the FINE ones."""
    return [(f.name, v) for f in fields for v in BAD_BY_TYPE.get(f.type, []) + extra.get(f.name, [])
            if (f.name, v) not in fine]


def test_the_allow_list_names_real_flags():
    names = {f.name for f in dataclasses.fields(train.Config)}
    assert {n for n, _ in FINE} <= names and set(BAD_EXTRA) <= names


def reached_setup(*args, **kw):
    raise AssertionError("a bad value got through check_config: the run reached setup()")


@pytest.mark.parametrize("name,value", bad_values(dataclasses.fields(train.Config)),
                         ids=lambda x: repr(x) if not isinstance(x, str) or x == "" else x)
def test_every_train_flag_refuses_its_bad_values(tmp_path, monkeypatch, name, value):
    monkeypatch.setattr(train, "setup", reached_setup)
    flag = "--" + name.replace("_", "-")
    out = tmp_path / "out"
    argv = ["--model", "tiny", flag, str(value)] + (["--out-dir", str(out)] if name != "out_dir" else [])
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    msg = str(e.value)
    assert msg.startswith("train.py: error: ") and flag in msg and "\n" not in msg, msg
    assert not out.exists()  # nothing written


OTHER = os.path.join(os.path.dirname(__file__), "conftest.py")  # a file that is not this one
COMBINATIONS = [
    (["--batch-size", "10", "--micro-batch-size", "4"], "not a multiple of --micro-batch-size"),
    (["--min-len", "9", "--max-len", "8"], "--max-len 8 is below --min-len 9"),
    (["--max-len", "64"], "leaves no room in the context of 64 tokens"),
    (["--resume", "--start-from", __file__], "--start-from and --resume exclude each other"),
    (["--optimism-samples", "2"], "needs --y-ref sampled"),
    (["--fsdp"], "start it with torchrun"),
    (["--prefs", __file__], "needs --prompts and --judge, with --prefs (offline pairs) or --train-prompts"),
    (["--train-prompts", __file__, "--judge", __file__ + ":judge"], "needs --prompts and --judge, with --prefs"),
    (["--prefs", __file__, "--train-prompts", __file__, "--prompts", OTHER, "--judge", __file__ + ":judge"],
     "--prefs and --train-prompts exclude each other"),
    (["--train-prompts", __file__, "--prompts", OTHER, "--judge", __file__ + ":judge"],
     "--train-prompts: the offline pairs are the answers of the --init-from model; give its directory"),
    (["--init-from", os.path.dirname(__file__), "--train-prompts", __file__, "--prompts", OTHER, "--sft", OTHER,
      "--judge", __file__ + ":judge"], "--train-prompts with --sft: the offline pairs are the --init-from model's"),
    (["--init-from", os.path.dirname(__file__), "--train-prompts", __file__, "--prompts", __file__,
      "--judge", __file__ + ":judge"], "--train-prompts and --prompts are the same file"),
    (["--task", "instructions", "--init-from", os.path.dirname(__file__), "--train-prompts", __file__],
     "leave out --sft, --prefs, --train-prompts, --prompts and --judge"),
    (["--offline-passes", "2,2"], "lo and hi must differ"),
    (["--sft", os.path.dirname(__file__)], "is a directory, not a file"),
    (["--judge", __file__.replace(".py", ".pyc") + ":judge"], "test_flags.pyc does not exist"),
    (["--judge", "rm:" + os.path.dirname(__file__)], "no config.json"),
    (["--judge", "x"], "expected 'module:function'"),
]


@pytest.mark.parametrize("flags,msg", COMBINATIONS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_impossible_combinations_are_one_line(tmp_path, monkeypatch, flags, msg):
    monkeypatch.setattr(train, "setup", reached_setup)
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "tiny", "--out-dir", str(tmp_path / "out")] + flags)
    assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_judge_file_that_is_no_python_is_one_line(tmp_path, monkeypatch):
    import data
    import inputs
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "a"}\n')
    monkeypatch.chdir(tmp_path)
    for spec in (f"{tmp_path}/prefs.jsonl:judge", "prefs.jsonl:judge"):
        with pytest.raises(data.DataError) as e:
            inputs.load_judge(spec)
        assert f"judge {spec!r}: " in str(e.value) and "prefs.jsonl is not a Python file (.py)" in str(e.value)


# ---- the other commands: sample.py and the tools ---------------------------------------------

def option_bad_values(ap, fine):
    """[(option or positional name, value)] for every argument of the parser `ap` that takes a
    value: one not among its choices, or the bad values of its type; less the `fine` ones."""
    out = []
    for a in ap._actions:
        if a.nargs == 0:  # --help and the switches
            continue
        name = a.option_strings[0] if a.option_strings else a.dest
        values = ["no-such-thing"] if a.choices else BAD_BY_TYPE[a.type or str]
        out += [(name, v) for v in values if (name, v) not in fine]
    return out


def refused(capsys, run):
    """The one-line error a command died with: its sys.exit message, or argparse's last line."""
    with pytest.raises(SystemExit) as e:
        run()
    if isinstance(e.value.code, str):
        return e.value.code
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err, "exited without an error"
    return err[-1]


def with_value(argv, ap, name, value):
    """argv with argument `name` (an option, or a positional's dest) set to `value`."""
    positionals = [a.dest for a in ap._actions if not a.option_strings]
    if name in positionals:
        argv = list(argv)
        argv[positionals.index(name)] = str(value)
        return argv
    return argv + [name, str(value)]


class Reached(Exception):
    """A command got past its checks with a bad value."""


def reached(*args, **kw):
    raise Reached


def tiny_checkpoint(path):
    from dataclasses import asdict

    from checkpoint import atomic_save
    from model import GPT, preset
    m = GPT(preset("tiny", vocab_size=258))
    atomic_save({"model": m.state_dict(), "model_config": asdict(m.config), "tokenizer": {"name": "bytes"}}, str(path))
    return str(path)


def sample_cli(tmp_path, monkeypatch):
    import sample
    monkeypatch.setattr(sample, "load_model", reached)
    return sample.main, ["--ckpt", tiny_checkpoint(tmp_path / "m.pt"), "--prompt", "x"]


def evaluate_cli(tmp_path, monkeypatch):
    from tools import evaluate
    monkeypatch.setattr(evaluate, "evaluation", reached)
    return evaluate.main, [tiny_checkpoint(tmp_path / "m.pt")]


def plots_cli(tmp_path, monkeypatch):
    from experiments import plots
    monkeypatch.setattr(plots, "run_curves", reached)
    (tmp_path / "metrics.jsonl").write_text('{"stage": "sft", "step": 0, "loss": 1.0}\n')
    return plots.main, [str(tmp_path)]


def fit_cli(tmp_path, monkeypatch):
    from tools import fit
    monkeypatch.setattr(fit, "get_tokenizer", reached)
    (tmp_path / "d.jsonl").write_text('{"prompt": "a"}\n')
    return fit.main, [str(tmp_path), "64", str(tmp_path / "d.jsonl")]


def bench_cli(tmp_path, monkeypatch):
    from perf import bench
    monkeypatch.setattr(bench, "machine", reached)
    return bench.main, ["--device", "cpu"]


def memory_cli(tmp_path, monkeypatch):
    from perf import memory
    monkeypatch.setattr(memory, "measure", reached)
    return memory.main, ["--measure", "Qwen2.5-0.5B", "--device", "cpu"]


def sweep_cli(tmp_path, monkeypatch):
    from experiments import sweep
    monkeypatch.setattr(sweep, "make_grid", reached)
    return sweep.main, ["--quick", "--out", str(tmp_path / "out")]


def study_cli(tmp_path, monkeypatch):
    from experiments import study
    monkeypatch.setattr(study, "run_study", reached)
    return study.main, ["--quick", "--out", str(tmp_path / "out")]


def chat_model_cli(tmp_path, monkeypatch):
    from experiments import chat_model
    monkeypatch.setattr(chat_model, "run_comparison", reached)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return chat_model.main, ["--init-from", str(model), "--out", str(tmp_path / "out")]


def recipe_sizes_cli(tmp_path, monkeypatch):
    from experiments import recipe_sizes
    monkeypatch.setattr(recipe_sizes, "measure", reached)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return recipe_sizes.main, ["--init-from", str(model), "--out", str(tmp_path / "out")]


def analyse_cli(tmp_path, monkeypatch):
    from experiments import analyse
    monkeypatch.setattr(analyse, "analyse", reached)
    return analyse.main, [str(tmp_path)]


def gguf_cli(tmp_path, monkeypatch):
    from tools import gguf_to_hf
    monkeypatch.setattr(gguf_to_hf, "convert", reached)
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(20))
    return gguf_to_hf.main, [str(tmp_path / "m.gguf"), str(tmp_path / "hf")]


def parsers():
    import sample
    from experiments import analyse, chat_model, plots, recipe_sizes, study, sweep
    from perf import bench, memory
    from tools import evaluate, fit, gguf_to_hf
    return {"sample.py": sample.parser(), "tools.fit": fit.parser(), "perf.bench": bench.parser(),
            "perf.memory": memory.parser(), "experiments.sweep": sweep.parser(), "experiments.study": study.parser(),
            "experiments.analyse": analyse.parser(), "tools.gguf_to_hf": gguf_to_hf.parser(),
            "experiments.chat_model": chat_model.parser(), "tools.evaluate": evaluate.parser(),
            "experiments.plots": plots.parser(), "experiments.recipe_sizes": recipe_sizes.parser()}


# (each command's parser, its runner: main with what comes after the checks stubbed out, and good arguments)
COMMANDS = {"sample.py": sample_cli, "tools.fit": fit_cli, "perf.bench": bench_cli, "perf.memory": memory_cli,
            "experiments.sweep": sweep_cli, "experiments.study": study_cli, "experiments.analyse": analyse_cli,
            "tools.gguf_to_hf": gguf_cli, "experiments.chat_model": chat_model_cli, "tools.evaluate": evaluate_cli,
            "experiments.plots": plots_cli, "experiments.recipe_sizes": recipe_sizes_cli}
FINE_OPTIONS = {
    "sample.py": {("--seed", 0): "seeds start at 0", ("--temperature", 0.0): "temperature 0 is greedy",
                  ("--prompt", "no-such-thing"): "any text is a prompt"},
    "experiments.sweep": {("--out", "no-such-thing"): "a directory that is not there yet is made",
                          ("--report", "no-such-thing"): "a report file that is not there yet is written"},
    "experiments.study": {("--out", "no-such-thing"): "a directory that is not there yet is made"},
    "tools.gguf_to_hf": {("out_dir", "no-such-thing"): "a directory that is not there yet is made"},
    "experiments.chat_model": {("--out", "no-such-thing"): "a directory that is not there yet is made"},
    "experiments.recipe_sizes": {("--out", "no-such-thing"): "a directory that is not there yet is made"},
    "tools.evaluate": {("--out", "no-such-thing"): "a file that is not there yet is written"},
}


def test_the_commands_allow_lists_name_real_options():
    for command, ap in parsers().items():
        names = {a.option_strings[0] if a.option_strings else a.dest for a in ap._actions}
        assert {n for n, _ in FINE_OPTIONS.get(command, {})} <= names, command
    assert set(parsers()) == set(COMMANDS)


@pytest.mark.parametrize("command,name,value", [(c, n, v) for c, ap in parsers().items()
                                                for n, v in option_bad_values(ap, FINE_OPTIONS.get(c, {}))],
                         ids=lambda x: repr(x) if not isinstance(x, str) or x == "" else x)
def test_every_flag_of_every_command_refuses_its_bad_values(tmp_path, monkeypatch, capsys, command, name, value):
    main, good = COMMANDS[command](tmp_path, monkeypatch)
    argv = with_value(good, parsers()[command], name, value)
    try:
        msg = refused(capsys, lambda: main(argv))
    except Reached:
        pytest.fail(f"{command} {name} {value!r} got through its checks")
    named = name in msg if name.startswith("-") else name.upper() in msg.upper()
    assert "error: " in msg and named, msg
    assert not (tmp_path / "out").exists()


def test_every_command_is_walked():
    """A command added later -- any module with a main(), or that builds an argument parser --
    must be walked by the test above (COMMANDS: its runner, with what follows its checks stubbed
    out)."""
    import ast
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = set()
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        if rel != "." and (rel.split(os.sep)[0] in ("tests", "out") or rel.startswith(".")):
            continue
        for f in (f for f in files if f.endswith(".py")):
            text = open(os.path.join(folder, f)).read()
            if "ArgumentParser(" in text or any(getattr(n, "name", None) == "main" for n in ast.parse(text).body):
                found.add(f if rel == "." else f"{rel.replace(os.sep, '.')}.{f[:-3]}")
    # train.py's flags are walked by test_every_train_flag_...; commands.py builds its parser from
    # train.Config, experiments/runner.py the flags every experiment shares (walked through each)
    assert found == set(COMMANDS) | {"train.py", "commands.py", "experiments.runner"}


def test_every_error_a_user_can_cause_is_one_line(monkeypatch):
    """commands.one_line_errors, around every command's checks and run: one line naming the
    command; Ctrl-C says what to do next; SELM_DEBUG=1 shows the traceback; a bug is not hidden."""
    from commands import one_line_errors
    from files import WriteError

    def ended(error, **kw):
        with pytest.raises(SystemExit) as e:
            with one_line_errors("cmd", **kw):
                raise error
        return str(e.value)
    assert ended(ValueError("bad value")) == "cmd: error: bad value"
    assert ended(WriteError(28, "no space left on device writing f")) == "cmd: error: no space left on device writing f"
    assert ended(FloatingPointError("nan loss")) == "cmd: error: nan loss"
    assert ended(KeyboardInterrupt(), interrupted=lambda: "run it again") == "cmd: interrupted; run it again"
    with pytest.raises(RuntimeError):
        with one_line_errors("cmd"):
            raise RuntimeError("a bug")
    monkeypatch.setenv("SELM_DEBUG", "1")
    with pytest.raises(ValueError):
        with one_line_errors("cmd"):
            raise ValueError("bad value")
