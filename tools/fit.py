"""
fit.py -- the records of a JSON Lines file that fit a run's context, written to stdout.

    python -m tools.fit MODEL_DIR BLOCK_SIZE in.jsonl > out.jsonl

A run refuses a record that does not fit (data.check_fits); real data such as UltraFeedback has
some, so this keeps the ones that do, encoded exactly as a run with MODEL_DIR's tokenizer and
chat template encodes them. A malformed record is still an error, never silently dropped.
"""

import argparse
import json
import os
import sys

import chat
from commands import DefaultsHelp, one_line_errors
from data import check_strings, converted, plain_demonstration, plain_prompt, read_jsonl
from tokenizer import get_tokenizer


def fits(rec, tok, template, block_size):
    """Whether a record (preference, SFT or evaluation) fits a context of block_size tokens."""
    conversation = chat.is_conversational(rec)
    if conversation and template is None:
        raise ValueError("a conversation needs the model's chat template, and its tokenizer has none")
    if "chosen" in rec:
        e = (chat.preference_pair(rec, template) if conversation
             else check_strings(rec, ("prompt", "chosen", "rejected")))
        pairs = [(e["prompt"], e[k]) for k in ("chosen", "rejected")]
    elif "messages" in rec or "completion" in rec:
        pairs = [chat.demonstration(rec, template) if conversation else plain_demonstration(rec)]
    else:
        pairs = [((chat.evaluation_prompt(rec, template) if conversation else plain_prompt(rec))["prompt"], None)]
    for prompt, response in pairs:  # the rules of check_fits and encode_pair
        n = len(tok.encode_prompt(prompt))
        if n >= block_size - 1 or response is not None and n + len(tok.encode_response(response)) > block_size:
            return False
    return True


def parser():
    ap = argparse.ArgumentParser(prog="python -m tools.fit", formatter_class=DefaultsHelp, description=(
        "Write the records of a JSON Lines file that fit the context, as a run with this model's tokenizer and chat "
        "template encodes them."))
    ap.add_argument("model_dir", help="the --init-from directory (its tokenizer.json and chat template)")
    ap.add_argument("block_size", type=int, help="the run's --block-size")
    ap.add_argument("path", help="a JSON Lines file: preferences, SFT demonstrations or evaluation prompts")
    return ap


def check_args(args):
    """Every argument checked, in one line naming it, before anything is read."""
    if not os.path.isdir(args.model_dir):
        raise ValueError(f"MODEL_DIR {args.model_dir!r} is not a directory")
    if args.block_size < 2:
        raise ValueError(f"BLOCK_SIZE must be at least 2 (a prompt token and a response token), got {args.block_size}")
    if not os.path.isfile(args.path):
        raise ValueError(f"PATH {args.path!r} is not a file")


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    with one_line_errors(ap.prog):
        check_args(args)
        fit(args)


def fit(args):
    """The records of args.path that fit, printed as they are; how many, on stderr."""
    tok = get_tokenizer(args.model_dir, verbose=False)
    template, kept = chat.load_template(tok), 0
    records = read_jsonl(args.path)
    for where, rec in records:
        if converted(where, rec, lambda r: fits(r, tok, template, args.block_size)):
            print(json.dumps(rec, ensure_ascii=False))
            kept += 1
    print(f"fit: kept {kept} of {len(records)} records of {args.path}", file=sys.stderr)


if __name__ == "__main__":
    main()
