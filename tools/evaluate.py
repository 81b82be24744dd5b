"""
evaluate.py -- one model evaluated as a run evaluates each of its stages.

    python -m tools.evaluate out/selm_3.pt                          # on its run's held-out prompts
    python -m tools.evaluate models/SmolLM2-135M-Instruct           # on the instruction task's
    python -m tools.evaluate out/selm_3.pt --prompts mine.jsonl --judge tasks.instructions:judge

A stage checkpoint is evaluated on its run's task, rebuilt from the configuration it carries
(the same held-out prompts, judge, seeds and sampling settings), against its run's SFT model
(sft.pt beside it, and the SFT answers the checkpoint keeps): the row is that stage's row of
results.json, number for number. A Hugging Face directory is evaluated on a built-in task's
held-out prompts (--task; the settings are the task's defaults), against itself: win vs SFT
0.5 and KL 0 by definition. --prompts with --judge evaluates on your prompts instead, written
for the model as sample.py writes them (a user turn in its chat template, or the run's prompt
template); `--judge tasks.instructions:judge` adds IFEval's two accuracies.

The row is train.evaluate's, with the same columns as results.json's, and is written as JSON
(atomically) with each prompt and answer: by default beside the model, <model>.eval.json.
"""

import argparse
import dataclasses
import os
import sys
import time

import chat
import data
import train
from checkpoint import stage_path
from commands import DefaultsHelp, one_line_errors
from files import write_json_atomic
from hf import check_model_path, load_model
from inputs import check_config, judge_target, load_data, load_judge, load_task, task_of
from runtime import setup
from screens import summary_line


def parser():
    ap = argparse.ArgumentParser(prog="python -m tools.evaluate", formatter_class=DefaultsHelp, description=(
        "Evaluate a stage checkpoint or a Hugging Face model directory as train.py evaluates a stage: "
        "greedy answers to held-out prompts, judged; the row of results.json, and each answer, as JSON."))
    ap.add_argument("model", help="a stage checkpoint (out/selm_3.pt) or a Hugging Face model directory")
    ap.add_argument("--task", help="a directory's task, a file of tasks/ (default: instructions); "
                                   "a checkpoint is evaluated on its run's")
    ap.add_argument("--prompts", help="your prompts instead: JSONL with 'prompt' (a string or a conversation) and "
                                      "maybe 'reference' (an answer to beat); needs --judge")
    ap.add_argument("--judge", help="the judge of --prompts: module:function, file.py:function or rm:DIR "
                                    "(tasks.instructions:judge, the instruction task's: with IFEval's accuracies)")
    ap.add_argument("--max-new-tokens", type=int, help="answer length cap (default: the run's, or the task's; "
                                                       "64 for --prompts on a directory)")
    ap.add_argument("--out", help="the JSON file to write (default: <model>.eval.json, beside the model)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    return ap


def check_args(args):
    """Every argument checked, in one line naming it, before anything is read."""
    from runtime import check_device
    for name in ("model", "task", "prompts", "judge", "out"):
        if getattr(args, name) == "":
            raise ValueError(f"{'MODEL' if name == 'model' else '--' + name} is empty")
    try:
        check_model_path(args.model)
    except FileNotFoundError as e:
        raise ValueError(f"MODEL: {e}") from None
    if args.judge is not None:
        try:
            judge_target(args.judge)
        except ValueError as e:
            raise ValueError(f"--judge: {e}") from None
    out, task, prompts, n = output_path(args), args.task, args.prompts, args.max_new_tokens
    if task is not None:
        load_task(task)  # one of tasks/, with a TASK
    problems = {"--task is for a directory: a checkpoint is evaluated on its run's task":
                    task and os.path.isfile(args.model),
                "--task and --prompts exclude each other": task and prompts,
                f"--prompts {prompts}: no such file": prompts and not os.path.isfile(prompts),
                "--prompts and --judge go together": (prompts is None) != (args.judge is None),
                f"--max-new-tokens must be at least 1, got {n}": n is not None and n < 1,
                f"--out {out}: is a directory, or in none":
                    os.path.isdir(out) or not os.path.isdir(os.path.dirname(out) or ".")}
    for problem, bad in problems.items():
        if bad:
            raise ValueError(problem)
    check_device(args.device)


def output_path(args):
    return args.out or os.path.normpath(args.model).removesuffix(".pt") + ".eval.json"


def evaluation(args):
    """(the run's configuration, the loaded model, the task's data, the stage's name, the SFT
    model or None, its answers to the task's prompts if known) for the model of `args`."""
    m = load_model(args.model, args.device)
    if m.ckpt is not None:  # a stage checkpoint: its run's configuration
        known = {f.name for f in dataclasses.fields(train.Config)}
        cfg = train.Config(**{k: v for k, v in m.ckpt["config"].items() if k in known})
        stage = m.ckpt["stage"]
    else:  # a directory: a run that would start from it, at the task's defaults
        cfg = train.parse_args(["--init-from", args.model, "--task", args.task or "instructions"]  # the task's defaults
                               + (["--max-new-tokens", "64"] if args.prompts else []))
        check_config(cfg)
        stage = os.path.basename(os.path.normpath(args.model))
    cfg.device, cfg.compile, cfg.max_new_tokens = args.device, False, args.max_new_tokens or cfg.max_new_tokens
    task = user_prompts(m, args) if args.prompts else load_data(cfg, m.template, args.device)
    data.check_fits(dataclasses.replace(task, sft=[], chunks=[]), m.tok, m.model.config.block_size, "", "")
    # the KL reference: a run's SFT model, unless this is it; a directory has none but itself
    sft_path = stage_path(os.path.dirname(args.model), "sft")
    if m.ckpt is None or stage == "sft" or not os.path.isfile(sft_path):
        cfg.kl_samples = 0  # KL to itself: 0 by definition
        return cfg, m, task, stage, None, None
    sft = load_model(sft_path, args.device).model
    sft_answers = None if args.prompts else m.ckpt.get("sft_answers")  # the run's own: kept in the checkpoint
    return cfg, m, task, stage, sft, sft_answers


def user_prompts(m, args):
    """--prompts and --judge as the run's data would hold them: the prompts written for the
    model as sample.py writes them, a reference answer rendered as the model's turn."""
    def read(rec):
        if m.conversational or isinstance(rec.get("prompt"), list):
            if m.template is None:
                raise ValueError("a conversation needs a chat template, and this model has none")
            return chat.evaluation_prompt(rec, m.template)
        e = data.plain_prompt(rec)
        return {"prompt": m.prompt(e["prompt"]), "reference": e["reference"]}
    evals = [data.converted(where, rec, read) for where, rec in data.read_jsonl(args.prompts)]
    judge = load_judge(args.judge, args.device)  # a reward model (rm:DIR) runs where the model does
    task = task_of(judge)  # a task's judge (tasks.instructions:judge): its metrics, and 1.0 is "perfect"
    return data.TrainingData([], [[]], evals, judge, builtin=task is not None, conversational=m.conversational,
                             metrics=task and task.metrics)


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    with one_line_errors(ap.prog):
        check_args(args)
        evaluate(args)


def evaluate(args):
    """The evaluation of args.model, written to output_path(args), its row printed."""
    cfg, m, task, stage, sft, sft_answers = evaluation(args)
    rt = setup(args.device, cfg.dtype, os.path.dirname(output_path(args)) or ".")
    rt.log.enabled = False  # an evaluation writes no metrics line into anyone's run
    rt.fit_dtype(cfg.dtype, m.model)  # the dtype the run computed in, settled as train.run settles it
    t0 = time.time()
    if sft is not None and sft_answers is None:  # the SFT model's answers to your prompts
        ids = [m.tok.encode_prompt(e["prompt"]) for e in task.eval]
        sft_answers = [m.tok.decode([t for t in r if t not in m.tok.eos_ids])
                       for r in train.sample_responses(rt, cfg, m.tok, sft, ids, progress="sft answers")]
    elif m.ckpt is not None and stage != "sft" and sft is None:
        print(f"evaluate: no sft.pt beside {args.model}: win vs SFT and KL are against itself", file=sys.stderr)
    row, answers = train.evaluate(rt, cfg, m.tok, stage, m.model, sft, task, sft_answers)
    write_json_atomic({**row, "model": args.model, "prompts": args.prompts or f"the {cfg.task} task's held-out",
                       "answers": [{"prompt": str(e["prompt"]), "answer": a} for e, a in zip(task.eval, answers)]},
                      output_path(args))
    print(summary_line(stage, time.time() - t0, row, {}))
    print(f"wrote {output_path(args)}")


if __name__ == "__main__":
    main()
