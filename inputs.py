"""
inputs.py -- what a run starts from: its settings checked, its tokenizer, data and model.

  settings   the defaults that depend on another flag (RECIPES), impossible combinations refused;
  tokenizer  the --bpe-path or --init-from directory's, else whatever tokenizer.get_tokenizer finds;
  data       a task of tasks/, through its Task alone: letter sorting (tasks/sorting.py) or, for a
             chat model, verifiable instructions (tasks/instructions.py), or one of your own; or
             the user's JSON Lines files (conversations rendered with the tokenizer directory's
             chat template, chat.py);
  judge      the task's, or the function --judge names: a module's or a file's, or a reward model
             (rm:DIR, reward.py), resolved here and handed on as a function;
  model      a fresh preset sized for the tokenizer, or a Hugging Face directory on disk
             (GPT-2, Llama, Mistral, Qwen2, Qwen3: hf.py).
Each function takes the run's configuration (train.Config) and fails with one line that
names the problem, before anything is trained (screens.first_screen tells the user what was found).
"""

import dataclasses
import importlib
import importlib.util
import math
import os
import sys

import chat
import data
import reward
import tasks
from checkpoint import stage_names
from files import file_problem
from hf import check_stages, load_pretrained
from model import GPT, PRESETS, preset
from pairs import as_prompt, rendered
from runtime import DTYPES, check_device
from selm import LOSS_TYPES, check_hparams
from tokenizer import get_tokenizer


def tokenizer_and_data(cfg, rt):
    """The run's tokenizer and data: conversations are rendered with the chat template of the
    tokenizer's directory, and a reward-model judge runs on the training device."""
    tok = tokenizer_for(cfg)
    return tok, load_data(cfg, chat.load_template(tok), rt.device)


def load_data(cfg, template=None, device=None):
    """The --task's data (task_data), or the user's JSONL files (data.load_user_data: `template`
    renders conversations) and judge (load_judge: `device` is where a reward model judges).
    check_config has checked that the files come together, and that a task is not given with them."""
    if not any([cfg.sft, cfg.prefs, cfg.train_prompts, cfg.prompts, cfg.judge]):
        return task_data(cfg, template)
    d = data.load_user_data(cfg.sft, cfg.prefs, cfg.prompts, cfg.iterations + 1, template, cfg.train_prompts)
    return dataclasses.replace(d, judge=load_judge(cfg.judge, device))  # last: once the data is known to be good


def load_task(name):
    """tasks/NAME.py's TASK, a tasks.Task: the one door through which a run meets a task."""
    if name not in tasks.names():
        raise ValueError(f"--task must be one of {', '.join(tasks.names())} (the files of tasks/), got {name!r}")
    try:
        task = getattr(importlib.import_module(f"tasks.{name}"), "TASK", None)
    except Exception as e:  # whatever a task of your own raises on import
        raise ValueError(f"--task {name}: cannot import tasks/{name}.py: {e!r}") from e
    if not isinstance(task, tasks.Task):
        raise ValueError(f"--task {name}: tasks/{name}.py has no TASK that is a tasks.Task")
    return task


def task_data(cfg, template=None):
    """The --task's data as the run's TrainingData, made through its Task alone. A task with a
    prompt template gives offline pairs; a chat model's task (template None) gives prompts, each
    a user turn rendered with the model's chat template (`template`), and the chunks keep them
    plain until pairs.own_pairs has the starting model answer them (awaiting_pairs)."""
    task = load_task(cfg.task)
    made = task.make(cfg)
    chat_task = task.template is None
    if any(isinstance(e, dict) == chat_task for chunk in made.chunks for e in chunk):
        raise ValueError(f"--task {cfg.task}: its chunks must hold " + (
            "prompts (strings): a chat model's task has the starting model make its pairs" if chat_task else
            'offline pairs {"prompt", "chosen", "rejected"}: only a chat model\'s task (template None) gives prompts'))
    if not made.sft and cfg.sft_steps > 0:
        raise ValueError(f"--task {cfg.task} has no SFT data: --sft-steps must be 0")
    if not chat_task:
        return data.TrainingData(list(made.sft), made.chunks, made.eval, task.judge, builtin=True,
                                 prompt_template=task.template, metrics=task.metrics)
    if template is None:
        raise ValueError(f"--task {cfg.task} needs a chat model, and {cfg.init_from} has no chat template "
                         "(chat_template.jinja, or tokenizer_config.json's \"chat_template\")")
    sft = [chat.demonstration({"prompt": p, "completion": r}, template) for p, r in made.sft]
    evals = [chat.evaluation_prompt(e, template) for e in made.eval]
    return data.TrainingData(sft, rendered(made.chunks, template), evals, task.judge, builtin=True, conversational=True,
                             metrics=task.metrics)


def awaiting_pairs(task_data):
    """Whether the chunks hold prompts still, not pairs: a chat model's task, or --train-prompts,
    before pairs.own_pairs has the starting model answer them."""
    return any(not isinstance(e, dict) for chunk in task_data.chunks for e in chunk)


def task_of(judge):
    """The Task whose judge `judge` is (a --judge spec naming one, tasks.instructions:judge, brings
    its metrics and its "perfect" score), or None."""
    task = getattr(sys.modules.get(getattr(judge, "__module__", None) or ""), "TASK", None)
    return task if isinstance(task, tasks.Task) and task.judge is judge else None


def load_judge(spec, device=None):
    """The judge a --judge spec names: "package.module:function" or "path/to/file.py:function" --
    the function must follow judge(prompt, candidates) -> list[float] -- or "rm:DIR", a reward
    model in a Hugging Face directory (reward.py), run on `device`. A spec is resolved here, where
    a run's inputs are assembled; data.py and the pipeline receive the function."""
    kind, target, name = judge_target(spec)
    if kind == "rm":
        try:
            return reward.load_judge(target, device=device)
        except (ValueError, OSError) as e:
            raise data.DataError(f"judge {spec!r}: {e}") from None
    try:
        if kind == "file":
            modspec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(target))[0], target)
            module = importlib.util.module_from_spec(modspec)
            modspec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except Exception as e:  # ImportError, or whatever the module raised on import
        raise data.DataError(f"judge {spec!r}: cannot import {target}: {e!r}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise data.DataError(f"judge {spec!r}: {target} has no callable {name!r}")
    return fn


def judge_target(spec):
    """What a judge spec names, checked without importing anything: ("rm", DIR, None),
    ("file", path.py, function) or ("module", name, function); a data.DataError naming the spec
    otherwise."""
    if spec.startswith("rm:"):
        if not os.path.isfile(os.path.join(spec[3:], "config.json")):
            raise data.DataError(f"judge {spec!r}: {spec[3:] or 'the empty path'} is not a Hugging Face model "
                                 "directory (no config.json); rm:DIR names a reward model's directory")
        return "rm", spec[3:], None
    target, _, name = spec.rpartition(":")  # the last ":", so C:\dir\f.py:fn works
    if not target or not name:
        raise data.DataError(f"judge {spec!r}: expected 'module:function' or 'file.py:function'")
    if not (target.endswith(".py") or os.sep in target or "/" in target or os.path.isfile(target)):
        return "module", target, name
    if file_problem(target):
        raise data.DataError(f"judge {spec!r}: {target} {file_problem(target)}")
    if not target.endswith(".py"):
        raise data.DataError(f"judge {spec!r}: {target} is not a Python file (.py)")
    return "file", target, name


def tokenizer_for(cfg):
    """The run's tokenizer: that of --bpe-path or of the --init-from directory (its
    tokenizer.json, or GPT-2's vocab/merges files); without either, whatever
    tokenizer.get_tokenizer finds."""
    path = cfg.bpe_path
    if path is None and cfg.init_from and any(os.path.isfile(os.path.join(cfg.init_from, f))
                                              for f in ("tokenizer.json", "vocab.bpe", "merges.txt")):
        path = cfg.init_from
    tok = get_tokenizer(path, verbose=False)  # the first screen names it
    if cfg.init_from and tok.name == "bytes":
        raise ValueError(f"--init-from {cfg.init_from} has no tokenizer files and none is on this machine: "
                         "put its tokenizer.json (or GPT-2's merges.txt and vocab.json) in that directory "
                         "or in --bpe-path")
    return tok


def build_model(cfg, tok, rt):
    """A fresh --model preset sized for the tokenizer, or the --init-from weights."""
    if cfg.init_from:
        model = load_pretrained(cfg.init_from, dropout=cfg.dropout, block_size=cfg.block_size)
    else:
        model = GPT(preset(cfg.model, vocab_size=tok.vocab_size, dropout=cfg.dropout, block_size=cfg.block_size))
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} ids, the model only {model.config.vocab_size}")
    return model.to(rt.device)


def check_inputs(cfg, tok, task_data, block_size):
    """The data against the model's context of block_size tokens, before anything is written:
    every record fits (data.check_fits); returns the SFT demonstrations encoded. A chat task's
    chunks, or --train-prompts', hold prompts until the starting model answers them
    (pairs.own_pairs): then every prompt must leave room for an answer of --max-new-tokens and
    the end-of-turn token, or sampling them would be wasted on pairs that do not fit."""
    if awaiting_pairs(task_data):
        template = chat.load_template(tok) if task_data.conversational else None
        prompts = [p for chunk in task_data.chunks for p in chunk]
        sizes = [len(tok.encode_prompt(as_prompt(p, template))) for p in prompts]
        longest = max(sizes)
        if longest + cfg.max_new_tokens + 1 > block_size:
            where = (task_data.lines or {}).get("train_prompts")
            raise ValueError(f"--max-new-tokens {cfg.max_new_tokens}: an answer that long and its end-of-turn token "
                             f"do not fit after the longest training prompt ({longest} tokens"
                             + (f", {where[sizes.index(longest)]}" if where else "") + ") in the context of "
                             f"{block_size} (--block-size); give --max-new-tokens at most "
                             f"{max(0, block_size - longest - 1)}, or a larger --block-size")
        task_data = dataclasses.replace(task_data, chunks=[[]])  # the evaluation prompts' turn
    pairs = cfg.prefs or (f"pairs made from {cfg.train_prompts}" if cfg.train_prompts else "built-in pairs")
    return data.check_fits(task_data, tok, block_size, cfg.sft or "built-in SFT data", pairs)


# ---- settings ---------------------------------------------------------------------------------

# The one table of the defaults that depend on another flag (train.Config holds the rest: the
# default run's, the sorting task on --model small), applied by commands.parse_config to the
# flags a run does not give; a later row wins. A task of your own may add its row.
RECIPES = (
    # less data and fewer steps: the tiny model's run in about a minute on a 2-core CPU
    (("model", "tiny"), dict(n_sft=4096, chunk_size=512, n_eval=256, sft_steps=800)),
    # SmolLM2-135M-Instruct's whole run in about 22 minutes on a 2-core CPU, its sizes chosen
    # from a measured table (python -m experiments.recipe_sizes; docs/chat-model.md); lr and
    # alpha tuned on a seed of their own at these sizes; the sampler takes 64 prompts (256
    # answers) a call: a block of 256 prompts peaked at 9.7 GB, against 3.5, and ran slower
    (("task", "instructions"), dict(iterations=2, chunk_size=256, n_eval=256, sft_steps=0, max_new_tokens=128,
                                    beta=0.1, lr=3e-5, alpha=0.03, batch_size=8, micro_batch_size=8,
                                    gen_batch_size=64)),
)


def resolve(cfg):
    """--max-new-tokens left at None: the rule its help states."""
    if cfg.max_new_tokens is None:  # a sorted word is as long as the word; other data: 64
        cfg.max_new_tokens = 64 if cfg.prefs else cfg.max_len + 4
    return cfg


MAX_BLOCK_SIZE = 1 << 20  # a fresh model's context: beyond a million positions its tables alone are gigabytes
SEEDS = "an integer in [0, 2**32)"


def _at_least(lo):
    return lambda v: v >= lo


def _positive(v):
    return 0 < v < math.inf  # NaN fails every comparison; infinity is no setting


def _non_negative(v):
    return 0 <= v < math.inf


# Every flag of train.py that takes a value, and the values it may take: (what they are, test).
# A flag added to train.Config needs its line here or in check_config below: tests/test_flags.py
# walks every flag's bad values and fails on one that gets through.
RULES = {
    "model": (f"one of {', '.join(PRESETS)}", lambda v: v in PRESETS),
    "dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "block_size": (f"between 2 and {MAX_BLOCK_SIZE}", lambda v: v is None or 2 <= v <= MAX_BLOCK_SIZE),
    "task_seed": (SEEDS, lambda v: 0 <= v < 2 ** 32),
    "min_len": ("at least 1", _at_least(1)),
    "max_len": ("at least 1", _at_least(1)),  # and at least --min-len, below the context: check_config
    "n_sft": ("at least 1", _at_least(1)),
    "chunk_size": ("at least 1", _at_least(1)),
    "n_eval": ("at least 1", _at_least(1)),
    "sft_steps": (">= 0 (0 skips SFT training)", _at_least(0)),
    "sft_lr": ("positive", _positive),
    "sft_batch_size": ("at least 1", _at_least(1)),
    "iterations": (">= 0 (0 stops after offline DPO)", _at_least(0)),
    "loss_type": (f"one of {', '.join(LOSS_TYPES)}", lambda v: v in LOSS_TYPES),
    "lr": ("positive", _positive),
    "lr_decay": ("positive (1 keeps the rate)", _positive),
    "batch_size": ("at least 1", _at_least(1)),
    "micro_batch_size": ("at least 1", _at_least(1)),
    "warmup": ("a fraction of the steps, in [0, 1]", lambda v: 0 <= v <= 1),
    "weight_decay": (">= 0 (0 = none)", _non_negative),
    "grad_clip": (">= 0 (0 = off; a negative norm would reverse every gradient)", _non_negative),
    "y_ref": ("greedy or sampled", lambda v: v in ("greedy", "sampled")),
    "temperature": ("positive", _positive),
    "pair_samples": ("at least 2 (the judge keeps the best and the worst)", _at_least(2)),
    "online_samples": (">= 0 (0: the offline pairs alone, with --alpha 0)", _at_least(0)),
    "optimism_samples": ("at least 1", _at_least(1)),
    "tie_order": ("offline-first or authors", lambda v: v in ("offline-first", "authors")),
    "missing_eos_penalty": (">= 0 (0 = none)", _non_negative),
    "max_new_tokens": ("at least 1", _at_least(1)),
    "gen_batch_size": ("at least 1", _at_least(1)),
    "kl_samples": (">= 0 (0 skips the KL estimate)", _at_least(0)),
    "seed": (SEEDS, lambda v: 0 <= v < 2 ** 32),
    "dtype": (", ".join(DTYPES), lambda v: v in DTYPES),
    "log_every": ("at least 1 (a metrics line every this many steps)", _at_least(1)),
}
DIRECTORIES = ("init_from", "bpe_path")  # given, each must be a directory
FILES = ("sft", "prefs", "train_prompts", "prompts", "start_from")  # given, each must be a file


def check_config(cfg):
    """Every setting checked -- its range, and its combinations with the others -- in one line
    that names the flag, before anything is written: the one place train.py's flags are checked."""
    resolve(cfg)
    for name, (want, ok) in RULES.items():
        if not ok(getattr(cfg, name)):
            raise ValueError(f"{flag(name)} must be {want}, got {getattr(cfg, name)!r}")
    for name in DIRECTORIES + FILES + ("judge",):
        if getattr(cfg, name) == "":
            raise ValueError(f"{flag(name)} is empty: give a path, or leave the flag out")
    for name in DIRECTORIES:
        if getattr(cfg, name) is not None and not os.path.isdir(getattr(cfg, name)):
            raise ValueError(f"{flag(name)} {getattr(cfg, name)} is not a directory")
    for name in FILES:
        if getattr(cfg, name) is not None and file_problem(getattr(cfg, name)):
            raise ValueError(f"{flag(name)} {getattr(cfg, name)}: {file_problem(getattr(cfg, name))}")
    if cfg.judge is not None:
        try:
            judge_target(cfg.judge)
        except ValueError as e:
            raise ValueError(f"--judge: {e}") from None
    if not cfg.out_dir or os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"--out-dir {cfg.out_dir!r} is not a directory")
    check_device(cfg.device)
    task = load_task(cfg.task)  # one of tasks/, with a TASK
    context = cfg.block_size or (None if cfg.init_from else PRESETS[cfg.model].get("block_size", 1024))
    own_data = any(x is not None for x in (cfg.sft, cfg.prefs, cfg.train_prompts, cfg.prompts, cfg.judge))
    problems = {f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size {cfg.micro_batch_size}":
                    cfg.batch_size % cfg.micro_batch_size,
                f"--max-len {cfg.max_len} is below --min-len {cfg.min_len}": cfg.max_len < cfg.min_len,
                f"--max-len {cfg.max_len}: a word that long leaves no room in the context of {context} tokens":
                    not own_data and context is not None and cfg.max_len >= context,
                "--start-from and --resume exclude each other": cfg.start_from and cfg.resume,
                "--online-samples 0 samples no y_ref for the optimism term: give --alpha 0 as well (offline DPO "
                "with the moving reference)": cfg.online_samples == 0 and cfg.alpha,
                "--optimism-samples above 1 needs --y-ref sampled (greedy decoding gives one answer)":
                    cfg.optimism_samples > 1 and cfg.y_ref == "greedy",
                "--fsdp shards over the processes of torchrun: start it with torchrun --nproc_per_node N":
                    cfg.fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2,
                "--compile is not supported with --fsdp": cfg.fsdp and cfg.compile,
                f"--task {cfg.task} brings its own prompts, pairs and judge: leave out --sft, --prefs, "
                "--train-prompts, --prompts and --judge": own_data and cfg.task != default(cfg, "task"),
                "your own data needs --prompts and --judge, with --prefs (offline pairs) or --train-prompts "
                "(prompts the starting model's answers make pairs of); --sft is optional": own_data and not (
                    cfg.prompts and cfg.judge and (cfg.prefs or cfg.train_prompts)),
                "--prefs and --train-prompts exclude each other: the offline pairs are given, or made of the "
                "starting model's answers": cfg.prefs and cfg.train_prompts,
                "--train-prompts: the offline pairs are the answers of the --init-from model; give its directory":
                    cfg.train_prompts and cfg.init_from is None,
                "--train-prompts with --sft: the offline pairs are the --init-from model's answers, made before any "
                "SFT; fine-tune it in a run of its own (--iterations 0 --export last), then --init-from the result":
                    cfg.train_prompts and cfg.sft,
                "--train-prompts and --prompts are the same file: the evaluation prompts must be held out from "
                "training": cfg.train_prompts and cfg.prompts and os.path.samefile(cfg.train_prompts, cfg.prompts),
                "--prefs without --sft: give --sft demonstrations, or --init-from a pretrained model with "
                "--sft-steps 0": own_data and cfg.sft is None and cfg.init_from is None and cfg.sft_steps > 0,
                f"--task {cfg.task} is for a chat model: give its directory with --init-from":
                    task.template is None and cfg.init_from is None}
    for message, bad in problems.items():
        if bad:
            raise ValueError(message)
    try:
        check_hparams(cfg.beta, cfg.alpha, cfg.loss_type)  # the losses' own rules
    except ValueError as e:
        raise ValueError(f"--{str(e).replace('_', '-')}") from None
    check_stages(cfg.export, stage_names(cfg.iterations))
    passes(cfg.sft_passes, "sft")
    if len(set(passes(cfg.offline_passes, "offline"))) < 2:
        raise ValueError(f"--offline-passes {cfg.offline_passes}: lo and hi must differ, or the two responses of "
                         "every pair are equal and no pair has a preference")


def flag(name):
    return "--" + name.replace("_", "-")


def default(cfg, name):
    """The default of one of cfg's settings (train.Config's field)."""
    return next(f.default for f in dataclasses.fields(cfg) if f.name == name)


def passes(spec, which):
    """--sft-passes / --offline-passes "lo,hi" -> (lo, hi), 0 <= lo <= hi."""
    try:
        lo, hi = (int(x) for x in spec.split(","))
        assert 0 <= lo <= hi
    except (ValueError, AssertionError):
        raise ValueError(f"--{which}-passes must be lo,hi with 0 <= lo <= hi, got {spec!r}") from None
    return lo, hi
