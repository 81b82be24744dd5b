"""
sample.py -- answer prompts with a trained stage or a Hugging Face model directory:

    python sample.py --ckpt out/selm_3.pt --prompt dcbagfe --num-samples 4

one --prompt, a --prompts file (batched, JSON Lines back), a --chat, or two models' answers
--compare'd. A prompt is written as the model saw its prompts in training (hf.load_model: its
chat template, or the run's prompt template). The sampler itself is sampler.py; this file is
its command line, below the runtime, whose device checks it shares with train.py.
"""

import argparse
import itertools
import json
import os
import sys

import torch
from tqdm import tqdm

from chat import Conversation
from commands import DefaultsHelp, one_line_errors
from data import converted, read_prompts
from files import write_jsonl_atomic
from hf import check_model_path, load_model
from runtime import DTYPES, check_device, compute_dtype
from sampler import check_sampling, generate


def parser():
    ap = argparse.ArgumentParser(prog="sample.py", formatter_class=DefaultsHelp, description=(
        "Answer prompts with a stage checkpoint or a Hugging Face model directory, loaded once: one --prompt, "
        "a --prompts file, or a --chat. Answers print as plain text; a file's as JSON Lines."))
    ap.add_argument("--ckpt", required=True, help="a checkpoint train.py wrote, or a Hugging Face model directory")
    ap.add_argument("--prompt", help="one prompt, written as the model saw its prompts (chat or prompt template)")
    ap.add_argument("--prompts", help="a file: JSON Lines with a 'prompt' (text or conversation), or a prompt a line")
    ap.add_argument("--chat", action="store_true", help="a conversation, a turn a line of stdin, until an empty line "
                                                        "or /exit")
    ap.add_argument("--compare", help="a second checkpoint or directory: its answers follow the first's, labelled")
    ap.add_argument("--out", help="with --prompts: write the JSON Lines here (atomically), not to stdout")
    ap.add_argument("--num-samples", type=int, default=1, help="answers per prompt")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    ap.add_argument("--top-p", type=float, default=None, help="keep the likeliest tokens up to this mass "
                                                              "(default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap")
    ap.add_argument("--batch-size", type=int, default=16, help="answers per call of the sampler (--prompts)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    ap.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="the dtype to sample in (auto: bf16 on GPUs and CPUs that have it, else fp32)")
    return ap


def check_args(args):
    """Every flag checked, in one line naming it, before a model is read."""
    for name in ("ckpt", "compare", "prompt", "prompts", "out"):
        if getattr(args, name) == "":
            raise ValueError(f"--{name} is empty")
        try:
            name in ("ckpt", "compare") and getattr(args, name) is not None and check_model_path(getattr(args, name))
        except FileNotFoundError as e:
            raise ValueError(f"--{name}: {e}") from None
    problems = {f"--prompts {args.prompts}: no such file": args.prompts and not os.path.isfile(args.prompts),
                         f"--out {args.out}: is a directory, or in none": args.out and (
                             os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(args.out) or ".")),
                         "give one of --prompt, --prompts or --chat":
                             [args.prompt is not None, args.prompts is not None, args.chat].count(True) != 1,
                         "--out writes the answers to --prompts; give --prompts": args.out and not args.prompts,
                         "--compare answers --prompt or --prompts, not --chat": args.compare and args.chat,
                         f"--num-samples must be at least 1, got {args.num_samples}": args.num_samples < 1,
                         "--chat gives one answer a turn: leave out --num-samples": args.chat and args.num_samples > 1,
                         f"--batch-size must be at least 1, got {args.batch_size}": args.batch_size < 1,
                         f"--seed must be an integer in [0, 2**32), got {args.seed}": not 0 <= args.seed < 2**32}
    for problem, bad in problems.items():
        if bad:
            raise ValueError(problem)
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise ValueError(f"--{str(e).replace('_', '-')}") from None
    check_device(args.device)


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    with one_line_errors(ap.prog):
        check_args(args)
        models = [(path, load_model(path, args.device)) for path in filter(None, (args.ckpt, args.compare))]
        if args.chat:
            return converse(models[0][1], args, sys.stdin)
        records = read_prompts(args.prompts) if args.prompts else [("--prompt", {"prompt": args.prompt})]
        def encoded(m):  # each prompt as this model saw its prompts; one line naming a bad one
            return [converted(where, rec, lambda r: m.encode(r["prompt"])) for where, rec in records]
        answers = [(path, answer(m, encoded(m), args, args.seed, show_bar=args.prompts is not None))
                   for path, m in models]
        if args.prompts:  # per prompt, each model's answers
            out = [{**rec, "model": path, "answer": text, "finished": done} for i, (_, rec) in enumerate(records)
                   for path, per_prompt in answers for text, done in per_prompt[i]]
            if args.out:
                return write_jsonl_atomic(args.out, out)
            return print("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), end="")
    for path, (per_prompt,) in answers:
        for k, (text, done) in enumerate(per_prompt):
            if len(models) * args.num_samples > 1:  # more than one answer: each labelled
                print(f"[{path}" + (f", sample {k + 1}]" if args.num_samples > 1 else "]"))
            show(text, done, args)


def show(text, done, args):
    """An answer as plain text on stdout; a note on stderr when --max-new-tokens cut it."""
    print(text, flush=True)
    if not done:
        print(f"[no EOS: cut at --max-new-tokens {args.max_new_tokens}]", file=sys.stderr, flush=True)


def answer(m, prompts, args, seed, show_bar=False):
    """A loaded model's (hf.load_model) answers to prompts in token ids, in batches of
    --batch-size: per prompt, --num-samples (text, whether it ended with EOS)."""
    rows, n, out = [p for p in prompts for _ in range(args.num_samples)], args.num_samples, []
    dtype, _ = compute_dtype(torch.device(args.device), args.dtype, m.model.config.n_embd)
    with tqdm(total=len(rows), desc="answers", leave=False, delay=2, disable=not show_bar) as bar:
        for start in range(0, len(rows), args.batch_size):
            responses, finished = generate(m.model, rows[start:start + args.batch_size], args.max_new_tokens,
                                           args.temperature, args.top_k, args.top_p, eos_id=m.tok.eos_ids,
                                           seed=seed + start, pad_id=m.tok.pad_id, dtype=dtype)
            out += [(m.tok.decode([t for t in r if t not in m.tok.eos_ids]), f) for r, f in zip(responses, finished)]
            bar.update(len(responses))
    return [out[i:i + n] for i in range(0, len(out), n)]


def converse(m, args, stdin):
    """--chat: a conversation with a loaded model (chat.Conversation), a turn per line of stdin.
    A model without a chat template answers each line as a prompt of its own."""
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731 -- stdout holds the answers only
    fits = lambda p: len(m.tok.encode_prompt(p)) < m.model.config.block_size  # noqa: E731
    chat = m.conversational and Conversation(m.template, fits)
    if not chat:
        say(f"({args.ckpt} has no chat template: each line is a prompt of its own)")
    for turn in itertools.count():
        print("> " if stdin.isatty() else "", end="", file=sys.stderr, flush=True)
        line, forgotten = stdin.readline().rstrip("\n"), chat and chat.forgotten
        if not line.strip() or line.strip() == "/exit":
            return
        prompt = chat.ask(line) if chat else m.prompt(line)
        if chat and chat.forgotten > forgotten:
            say("(the conversation outgrew the model's context: its oldest exchanges are forgotten)")
        if prompt is None or not fits(prompt):
            say(f"sample.py: that turn does not fit the model's context of {m.model.config.block_size} tokens")
            continue
        ((reply, done),), = answer(m, [m.tok.encode_prompt(prompt)], args, args.seed + turn)
        show(reply, done, args)
        chat and chat.answered(reply)


if __name__ == "__main__":
    main()
