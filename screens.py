"""
screens.py -- what a run tells its user: the first screen (the model, the data, the stages to come,
the settings changed), a line per stage as it ends, and the last screen (where everything went,
and the commands that draw the curves and try the last stage). tools.evaluate prints a stage's
line too. Everything here formats what it is given; nothing is computed anew.
"""

import dataclasses
import os
import shlex

import data
from checkpoint import disk_usage, human_size, stage_path
from commands import defaults_for
from inputs import RECIPES, flag, load_task, resolve
from pairs import offline_record


def first_screen(cfg, tok, task_data, model, rt):
    """The opening lines of a run: the model, the data, the stages to come, and only the
    settings that differ from their defaults."""
    t, where = cfg.iterations, f"{cfg.init_from}'s weights" if cfg.init_from else "fresh weights"
    dtype = f"{str(rt.dtype).removeprefix('torch.')} autocast" if rt.dtype else "float32"
    dtype += f": {rt.why_dtype}" if rt.why_dtype else ""  # which, and why (--dtype auto looks at the hardware)
    if task_data.builtin:
        task = load_task(cfg.task)
        source = f"--task {cfg.task}: {task.about.format(cfg=cfg)} (tasks/{cfg.task}.py)" + (
            f", offline pairs from {cfg.pair_samples} answers of the starting model per prompt, in its chat template"
            if task.template is None else "")
    else:
        source = ", ".join(f"{flag(k)} {getattr(cfg, k)}" for k in ("sft", "prefs", "train_prompts", "prompts")
                           if getattr(cfg, k))
        source += f", judged by {data.judge_name(task_data.judge)}" + (
            f", offline pairs from {cfg.pair_samples} answers of the starting model per training prompt"
            if cfg.train_prompts else "") + (
            ", conversations in the model's chat template" if task_data.conversational else "")
    stages = [f"sft ({cfg.sft_steps} steps of {cfg.sft_batch_size})" if task_data.sft
              else "sft (the weights as loaded)",
              "dpo (chunk 0's pairs)"] + ([f"selm_1..selm_{t} (chunks 1..{t}, alpha {cfg.alpha}" +
                                           ("" if cfg.alpha else ": iterative online DPO" if cfg.online_samples
                                            else ": the offline pairs alone, the reference moving") + ")"]
                                         if t else [])
    changed = changed_settings(cfg, leave_out=("model", "init_from", "sft", "prefs", "train_prompts", "prompts",
                                               "judge", "out_dir"))
    offline = offline_record(task_data)
    cut = offline["unfinished_chosen"] + offline["unfinished_rejected"]
    unfinished = f"\n           {cut} offline answers cut off at --max-new-tokens {cfg.max_new_tokens}, trained " \
                 "unfinished (no end-of-turn token)" if cut else ""
    return "\n".join([
        f"model      {cfg.init_from or cfg.model}: {model.num_params() / 1e6:.2f}M parameters, {where}, "
        f"on {rt.device} ({dtype})" + (f", {rt.ranks.world} processes" if rt.ranks.world > 1 else ""),
        f"tokenizer  {tok.name}, {tok.vocab_size} ids" + (f" ({tok.source})" if tok.source else ""),
        f"data       {source}",
        f"           {len(task_data.sft)} SFT demonstrations, {len(task_data.chunks)} chunks of "
        f"{chunk_sizes(task_data.chunks)} preference pairs, {len(task_data.eval)} evaluation prompts" + unfinished,
        f"stages     {' -> '.join(stages)}",
        f"           each evaluated and saved in {cfg.out_dir}",
        f"settings   {changed + ', the rest' if changed else 'the rest'} at their defaults (python train.py --help)"])


def chunk_sizes(chunks):
    """How many pairs the chunks hold: "64", or their range and each one's, "38-46 (39, 38, 46)"."""
    sizes = [len(c) for c in chunks]
    lo, hi = min(sizes), max(sizes)
    return f"{lo}" if lo == hi else f"{lo}-{hi} ({', '.join(map(str, sizes))})"


def changed_settings(cfg, leave_out=()):
    """The settings that differ from their defaults, as flags; a default a recipe sets (RECIPES), or
    the rule of --max-new-tokens, counts as a default. cfg: checked (check_config)."""
    base = defaults_for(type(cfg), RECIPES, dataclasses.asdict(cfg))
    base["max_new_tokens"] = resolve(dataclasses.replace(cfg, max_new_tokens=base["max_new_tokens"])).max_new_tokens
    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value != base[f.name] and f.name not in leave_out:
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


def summary_line(stage, seconds, row, info):
    """One line per stage for the terminal: its evaluation, and for a SELM iteration how its
    y_ref compared with the offline chosen response (shares of the chunk's prompts)."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    line = (f"[{stage:>7}] {seconds:6.1f}s  reward {row['reward']:.3f}  "
            f"win vs ref {fmt(row['win_rate_vs_reference'], '.3f')}  win vs sft {row['win_rate_vs_sft']:.3f}  "
            f"perfect {fmt(row['perfect'], '.1%')}  length {row['length']:.1f}  kl {row['kl']:.2f}")
    if "prompt_accuracy" in row:  # the instruction task: IFEval's two figures
        line += f"  prompt acc {row['prompt_accuracy']:.1%}  instruction acc {row['instruction_accuracy']:.1%}"
    n = info.get("pairs", 0) + info.get("dropped_ties", 0)
    if n and "y_ref_better" in info:  # an iteration that sampled (not --online-samples 0)
        line += (f"  (y_ref vs offline chosen: better {info['y_ref_better'] / n:.0%}, "
                 f"tied {info['y_ref_tied'] / n:.0%}, identical {info['y_ref_identical'] / n:.0%})")
    return line


def last_screen(out_dir, stages, exported, prompt):
    """The closing lines of a run: where everything went and how much disk it takes, the command
    that draws its curves, and the sample.py command that tries the last stage on `prompt`
    (shell-quoted)."""
    q, curves = shlex.quote, os.path.join(out_dir, "curves.png")
    return "\n".join([f"results     {os.path.join(out_dir, 'results.json')} (each stage's evaluation), "
                      f"{os.path.join(out_dir, 'metrics.jsonl')} (every logged step)",
                      f"checkpoints {', '.join(os.path.basename(stage_path(out_dir, s)) for s in stages)} in {out_dir}",
                      *([f"exported    {', '.join(exported)} (Hugging Face directories)"] if exported else []),
                      f"disk        {human_size(disk_usage(out_dir))} in {out_dir}",
                      f"curves      python -m experiments.plots {q(out_dir)}  (draws {q(curves)})",
                      f"try it      python sample.py --ckpt {q(stage_path(out_dir, stages[-1]))} "
                      f"--prompt {prompt} --temperature 0"])
