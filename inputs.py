"""
inputs.py -- what a run starts from: its settings checked, its tokenizer, data and model.

  settings   the per-preset defaults filled in, impossible combinations refused;
  tokenizer  the --bpe-path or --init-from directory's, else whatever tokenizer.get_tokenizer finds;
  data       a built-in task: letter sorting (sorting.py) or, for a chat model, verifiable
             instructions (instructions.py); or the user's JSON Lines files and judge
             (conversations rendered with the tokenizer directory's chat template, chat.py);
  model      a fresh preset sized for the tokenizer, or a Hugging Face directory on disk
             (GPT-2, Llama, Mistral, Qwen2, Qwen3: hf.py).
Each function takes the run's configuration (train.Config) and fails with one line that
names the problem, before anything is trained. `first_screen` tells the user what was found.
"""

import dataclasses
import math
import os
import shlex

import chat
import data
import instructions
import sorting
from checkpoint import stage_names
from hf import check_stages, load_pretrained
from model import DTYPES, GPT, PRESETS, check_device, preset
from selm import LOSS_TYPES, check_hparams
from tokenizer import get_tokenizer


def tokenizer_and_data(cfg, rt):
    """The run's tokenizer and data: conversations are rendered with the chat template of the
    tokenizer's directory, and a reward-model judge runs on the training device."""
    tok = tokenizer_for(cfg)
    return tok, load_data(cfg, chat.load_template(tok), rt.device)


def load_data(cfg, template=None, device=None):
    """The built-in task, or the user's JSONL files and judge (data.load_user_data: `template`
    renders conversations, `device` is where a reward model judges). check_config has checked
    that the files come together. The instruction task's chunks hold its prompts only (plain
    user turns) until train.instruction_pairs has the starting model answer them."""
    if cfg.task == "instructions":
        if template is None:
            raise ValueError(f"--task instructions needs a chat model, and {cfg.init_from} has no chat template "
                             "(chat_template.jinja, or tokenizer_config.json's \"chat_template\")")
        t = instructions.make_task(seed=cfg.task_seed, n_prompts_per_chunk=cfg.chunk_size,
                                   n_chunks=cfg.iterations + 1, n_eval=cfg.n_eval)
        return instructions.training_data(t.chunks, t.eval, template)
    if not any([cfg.sft, cfg.prefs, cfg.prompts, cfg.judge]):
        t = sorting.make_task(seed=cfg.task_seed, n_sft=cfg.n_sft, n_prompts_per_chunk=cfg.chunk_size,
                              n_chunks=cfg.iterations + 1, n_eval=cfg.n_eval, min_len=cfg.min_len, max_len=cfg.max_len,
                              sft_passes=passes(cfg.sft_passes, "sft"), offline_passes=passes(cfg.offline_passes, "offline"))
        return data.TrainingData(t.sft, t.chunks, t.eval, sorting.judge, builtin=True,
                                 prompt_template=sorting.make_prompt("{prompt}"))
    return data.load_user_data(cfg.sft, cfg.prefs, cfg.prompts, cfg.judge, cfg.iterations + 1, template, device)


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


# ---- settings ---------------------------------------------------------------------------------

# Data and step counts that fit each preset's time budget on a 2-core CPU (`tiny`: about a
# minute, the rest: about ten). Flags override them.
SCALE = {"tiny": dict(n_sft=4096, chunk_size=512, n_eval=256, sft_steps=800),
         "default": dict(n_sft=8192, chunk_size=1024, n_eval=512, sft_steps=1500)}
# The losses' settings: tuned on the sorting task (docs/results.md), also the start for your own data
TRAINING = dict(iterations=3, beta=2.0, lr=1e-4, alpha=0.001, batch_size=32, micro_batch_size=32)
# The instruction task's recipe for SmolLM2-135M-Instruct: its whole run in about twenty minutes
# on a 2-core CPU; lr and alpha tuned on a seed of their own (docs/chat-model.md)
INSTRUCTIONS = dict(iterations=2, chunk_size=64, n_eval=64, sft_steps=0, max_new_tokens=48, beta=0.1, lr=3e-5,
                    alpha=0.03, batch_size=4, micro_batch_size=4)
PER_TASK = sorted({*SCALE["default"], *TRAINING, *INSTRUCTIONS, "max_new_tokens"})  # default None: filled here


def resolve(cfg):
    """Fill the per-task and per-preset defaults (fields left at None)."""
    defaults = {**SCALE.get(cfg.model, SCALE["default"]), **TRAINING,
                **(INSTRUCTIONS if cfg.task == "instructions" else {})}
    for k, v in defaults.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
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
    "task": ("sorting or instructions", lambda v: v in ("sorting", "instructions")),
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
    "online_samples": ("at least 1", _at_least(1)),
    "optimism_samples": ("at least 1", _at_least(1)),
    "tie_order": ("offline-first or authors", lambda v: v in ("offline-first", "authors")),
    "max_new_tokens": ("at least 1", _at_least(1)),
    "gen_batch_size": ("at least 1", _at_least(1)),
    "kl_samples": (">= 0 (0 skips the KL estimate)", _at_least(0)),
    "seed": (SEEDS, lambda v: 0 <= v < 2 ** 32),
    "dtype": (", ".join(DTYPES), lambda v: v in DTYPES),
    "log_every": ("at least 1 (a metrics line every this many steps)", _at_least(1)),
}
DIRECTORIES = ("init_from", "bpe_path")  # given, each must be a directory
FILES = ("sft", "prefs", "prompts", "start_from")  # given, each must be a file


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
        if getattr(cfg, name) is not None and not os.path.isfile(getattr(cfg, name)):
            raise ValueError(f"{flag(name)} {getattr(cfg, name)}: " + (
                "is a directory, not a file" if os.path.isdir(getattr(cfg, name)) else "no such file"))
    if cfg.judge is not None:
        try:
            data.judge_target(cfg.judge)
        except ValueError as e:
            raise ValueError(f"--judge: {e}") from None
    if not cfg.out_dir or os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"--out-dir {cfg.out_dir!r} is not a directory")
    check_device(cfg.device)
    context = cfg.block_size or (None if cfg.init_from else PRESETS[cfg.model].get("block_size", 1024))
    own_data = any(x is not None for x in (cfg.sft, cfg.prefs, cfg.prompts, cfg.judge))
    problems = {f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size {cfg.micro_batch_size}":
                    cfg.batch_size % cfg.micro_batch_size,
                f"--max-len {cfg.max_len} is below --min-len {cfg.min_len}": cfg.max_len < cfg.min_len,
                f"--max-len {cfg.max_len}: a word that long leaves no room in the context of {context} tokens":
                    not own_data and context is not None and cfg.max_len >= context,
                "--start-from and --resume exclude each other": cfg.start_from and cfg.resume,
                "--optimism-samples above 1 needs --y-ref sampled (greedy decoding gives one answer)":
                    cfg.optimism_samples > 1 and cfg.y_ref == "greedy",
                "--fsdp shards over the processes of torchrun: start it with torchrun --nproc_per_node N":
                    cfg.fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2,
                "--compile is not supported with --fsdp": cfg.fsdp and cfg.compile,
                "your own data needs --prefs, --prompts and --judge together (the built-in judge only scores "
                "the sorting task); --sft is optional": own_data and not (cfg.prefs and cfg.prompts and cfg.judge),
                "--prefs without --sft: give --sft demonstrations, or --init-from a pretrained model with "
                "--sft-steps 0": own_data and cfg.sft is None and cfg.init_from is None and cfg.sft_steps > 0,
                "--task instructions is for a chat model: give its directory with --init-from":
                    cfg.task == "instructions" and cfg.init_from is None,
                "--task instructions brings its own prompts, pairs and judge: leave out --sft, --prefs, "
                "--prompts and --judge": cfg.task == "instructions" and own_data,
                "--task instructions has no SFT data: --sft-steps must be 0":
                    cfg.task == "instructions" and cfg.sft_steps > 0}
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


def passes(spec, which):
    """--sft-passes / --offline-passes "lo,hi" -> (lo, hi), 0 <= lo <= hi."""
    try:
        lo, hi = (int(x) for x in spec.split(","))
        assert 0 <= lo <= hi
    except (ValueError, AssertionError):
        raise ValueError(f"--{which}-passes must be lo,hi with 0 <= lo <= hi, got {spec!r}") from None
    return lo, hi


# ---- what the user is told -----------------------------------------------------------------

def first_screen(cfg, tok, task_data, model, rt):
    """The opening lines of a run: the model, the data, the stages to come, and only the
    settings that differ from their defaults."""
    t, where = cfg.iterations, f"{cfg.init_from}'s weights" if cfg.init_from else "fresh weights"
    dtype = f"{str(rt.dtype).removeprefix('torch.')} autocast" if rt.dtype else "float32"
    dtype += f": {rt.why_dtype}" if rt.why_dtype else ""  # which, and why (--dtype auto looks at the hardware)
    if cfg.task == "instructions":
        source = ("the built-in task, instructions with 1-3 checkable constraints (instructions.py), offline pairs "
                  f"from {cfg.pair_samples} answers of the starting model per prompt, in its chat template")
    elif task_data.builtin:
        source = f"the built-in task, sorting the letters of words of {cfg.min_len}-{cfg.max_len} letters (sorting.py)"
    else:
        source = ", ".join(f"--{k} {v}" for k, v in (("sft", cfg.sft), ("prefs", cfg.prefs), ("prompts", cfg.prompts)) if v)
        source += f", judged by {data.judge_name(task_data.judge)}" + (
            ", conversations in the model's chat template" if task_data.conversational else "")
    stages = [f"sft ({cfg.sft_steps} steps of {cfg.sft_batch_size})" if task_data.sft else "sft (the weights as loaded)",
              "dpo (chunk 0's pairs)"] + ([f"selm_1..selm_{t} (chunks 1..{t}, alpha {cfg.alpha}" +
                                           ("" if cfg.alpha else ": iterative online DPO") + ")"] if t else [])
    changed = changed_settings(cfg, leave_out=("model", "init_from", "sft", "prefs", "prompts", "judge", "out_dir"))
    return "\n".join([
        f"model      {cfg.init_from or cfg.model}: {model.num_params() / 1e6:.2f}M parameters, {where}, "
        f"on {rt.device} ({dtype})" + (f", {rt.ranks.world} processes" if rt.ranks.world > 1 else ""),
        f"tokenizer  {tok.name}, {tok.vocab_size} ids" + (f" ({tok.source})" if tok.source else ""),
        f"data       {source}",
        f"           {len(task_data.sft)} SFT demonstrations, {len(task_data.chunks)} chunks of "
        f"{len(task_data.chunks[0])} preference pairs, {len(task_data.eval)} evaluation prompts",
        f"stages     {' -> '.join(stages)}",
        f"           each evaluated and saved in {cfg.out_dir}",
        f"settings   {changed + ', the rest' if changed else 'the rest'} at their defaults (python train.py --help)"])


def changed_settings(cfg, leave_out=()):
    """The settings that differ from their defaults, as flags; a per-preset default (SCALE,
    --max-new-tokens) counts as a default. cfg: resolved (check_config)."""
    per_preset = PER_TASK
    defaults = resolve(dataclasses.replace(cfg, **dict.fromkeys(per_preset)))
    flags = []
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name) if f.name in per_preset else f.default
        if value != default and f.name not in leave_out:
            flag = "--" + f.name.replace("_", "-")
            flags.append(flag if value is True else f"{flag} {shlex.quote(str(value))}")
    return " ".join(flags)


def example_prompt(task_data):
    """A prompt to try a trained stage on, as sample.py's --prompt takes it (the user's text,
    which the stored template wraps): the first evaluation prompt when it is short and plain."""
    before, _, after = task_data.prompt_template.partition("{prompt}")
    text = task_data.eval[0]["prompt"] if task_data.eval else ""
    turns = getattr(text, "messages", None)
    if task_data.conversational and turns and len(turns) == 1 and len(turns[0]["content"]) <= 300:
        return shlex.quote(turns[0]["content"])  # a one-turn conversation: its user's text
    if task_data.conversational or not (text.startswith(before) and text.endswith(after)):
        return "'your prompt'"
    text = text[len(before):len(text) - len(after)]
    return shlex.quote(text) if 0 < len(text) <= 60 and "\n" not in text else "'your prompt'"
