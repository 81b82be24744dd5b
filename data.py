"""
data.py -- user data and batches: JSON Lines records, judges, padded tensors.

  1. user data: JSON Lines files and "module:function" judges;
  2. batching: right-padded tensors with prompt/response masks.
Tokenizers live in tokenizer.py and the built-in sorting task in task.py; `get_tokenizer` is
re-exported here so that everything about turning text into batches has one front door.

This file imports nothing from the model code.
"""

import importlib
import importlib.util
import json
import math
import os
import random
from dataclasses import dataclass

import torch

from tokenizer import Tokenizer, get_tokenizer  # noqa: F401  (re-exported)


class DataError(ValueError):
    """Bad user data or a bad spec; the message names the file/line or spec at fault."""


# -----------------------------------------------------------------------------
# 1. User data: JSON Lines and judges

def load_jsonl(path, fields=("prompt",)):
    """Read a JSON Lines file: one object per line, each with the string `fields`.

    ("prompt", "completion") for SFT, ("prompt", "chosen", "rejected") for preferences,
    ("prompt",) for prompts. Blank lines are skipped; extra fields are kept. Required
    fields must be non-empty strings: an empty response teaches nothing, and an empty
    prompt leaves the first response token with no position to be predicted from.
    Any problem raises DataError "path:line: ..." before anything is returned.
    """
    rows = []
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    for lineno, raw in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        try:
            # utf-8-sig on the first line: several Windows tools start a file with a byte-order
            # mark, which is not part of the first record
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8: {e}") from e
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: bad JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for name in fields:
            if name not in rec:
                raise DataError(f"{where}: missing field {name!r}")
            if not isinstance(rec[name], str):
                raise DataError(f"{where}: field {name!r} must be a string, "
                                f"got {type(rec[name]).__name__}")
            if rec[name] == "":
                raise DataError(f"{where}: field {name!r} is empty")
        rows.append(rec)
    if not rows:
        raise DataError(f"{path}:1: empty file, no JSON records")
    return rows


def load_judge(spec):
    """A judge from "package.module:function" or "path/to/file.py:function".
    The function must follow judge(prompt, candidates) -> list[float]."""
    target, _, name = spec.rpartition(":")  # the last ":", so C:\dir\f.py:fn works
    if not target or not name:
        raise DataError(f"judge {spec!r}: expected 'module:function' or 'file.py:function'")
    is_file = target.endswith(".py") or os.sep in target or "/" in target
    if is_file and not os.path.isfile(target):
        raise DataError(f"judge {spec!r}: no file {target}")
    try:
        if is_file:
            modname = os.path.splitext(os.path.basename(target))[0]
            modspec = importlib.util.spec_from_file_location(modname, target)
            module = importlib.util.module_from_spec(modspec)
            modspec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except Exception as e:  # ImportError, or whatever the module raised on import
        raise DataError(f"judge {spec!r}: cannot import {target}: {e!r}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise DataError(f"judge {spec!r}: {target} has no callable {name!r}")
    return fn


class JudgeError(DataError):
    """The judge raised, or returned something other than one finite score per candidate."""


def judge_name(judge_fn):
    return f"{getattr(judge_fn, '__module__', '?')}:{getattr(judge_fn, '__qualname__', repr(judge_fn))}"


def call_judge(judge_fn, prompt, candidates):
    """judge_fn(prompt, candidates) checked: one finite float per candidate. Whatever goes
    wrong -- the judge raises, or answers nonsense -- is a JudgeError naming the judge and the
    prompt; the judge's own exception is chained to it (SELM_DEBUG=1 shows its traceback)."""
    where = f"judge {judge_name(judge_fn)} on prompt {prompt[:40]!r}"
    try:
        scores = judge_fn(prompt, list(candidates))
    except Exception as e:  # noqa: BLE001 -- a user's judge may raise anything
        raise JudgeError(f"{where} failed: {type(e).__name__}: {e}") from e
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError) as e:
        raise JudgeError(f"{where} returned non-numeric scores {scores!r}") from e
    if len(scores) != len(candidates) or not all(math.isfinite(s) for s in scores):
        raise JudgeError(f"{where} returned {scores!r} for {len(candidates)} candidates")
    return scores


@dataclass
class TrainingData:
    """Everything a run trains and evaluates on, read and checked before any training.
    sft:     list of (prompt, response) strings: demonstrations
    chunks:  n_chunks lists of {"prompt", "chosen", "rejected"}: chunk 0 for offline DPO,
             chunk t for SELM iteration t
    eval:    list of {"prompt", "reference" (an answer to beat, or None)}
    judge:   judge(prompt, candidates) -> list of scores, higher is better
    builtin: True for the built-in task, whose judge's score 1.0 means "fully correct"
    prompt_template: how the prompts were written, "{prompt}" standing for the user's text
    """
    sft: list
    chunks: list
    eval: list
    judge: object
    builtin: bool = False
    prompt_template: str = "{prompt}"  # how a plain prompt was formatted; sample.py reuses it


def load_user_data(sft_path, prefs_path, prompts_path, judge_spec, n_chunks):
    """The user's JSON Lines files and judge as TrainingData. A malformed record stops the
    run with its file, line and field, before anything is trained on partial data. The pairs
    are cut into n_chunks equal chunks (a remainder is left out)."""
    judge = load_judge(judge_spec)
    sft = [(r["prompt"], r["completion"]) for r in load_jsonl(sft_path, ("prompt", "completion"))] if sft_path else []
    prefs = load_jsonl(prefs_path, ("prompt", "chosen", "rejected"))
    n = len(prefs) // n_chunks
    if n == 0:
        raise DataError(f"{prefs_path}: {len(prefs)} pairs cannot fill {n_chunks} chunks "
                        f"(offline DPO + {n_chunks - 1} iterations)")
    chunks = [prefs[i * n:(i + 1) * n] for i in range(n_chunks)]
    evals = [{"prompt": r["prompt"], "reference": r.get("reference")} for r in load_jsonl(prompts_path, ("prompt",))]
    return TrainingData(sft, chunks, evals, judge)


def check_fits(d, tok, block_size, sft_where, prefs_where):
    """Encode every text of `d` and refuse what does not fit the context: a prompt or pair
    that is too long stops the run (encode_pair), it is never silently truncated. Returns
    the SFT demonstrations encoded, as (prompt_ids, response_ids) pairs."""
    def encode_all(pairs, where):
        out = []
        for i, (p, r) in enumerate(pairs):
            try:
                out.append(encode_pair(tok, p, r, block_size))
            except DataError as e:
                raise DataError(f"{where}, record {i + 1}: {e}") from None
        return out
    sft = encode_all(d.sft, sft_where)
    encode_all([(e["prompt"], e[k]) for c in d.chunks for e in c for k in ("chosen", "rejected")], prefs_where)
    for e in d.eval + [e for c in d.chunks for e in c]:
        if len(tok.encode_prompt(e["prompt"])) >= block_size - 1:
            raise DataError(f"prompt {e['prompt'][:40]!r}... leaves no room for a response in the "
                            f"context of {block_size} tokens")
    return sft


# -----------------------------------------------------------------------------
# 2. Batching
#
# Convention: right padding, so positions are simply 0..T-1 for every row (left padding
# without position ids shifts learned positions). Per batch:
#   input_ids      [B, T] long: prompt tokens, response tokens, EOS, then pad_id
#   attention_mask [B, T] bool: True on real tokens (prompt + response + EOS)
#   response_mask  [B, T] bool: True on response tokens including the EOS
# The loss at position t scores input_ids[:, t] from logits at t-1, so use
# response_mask[:, 1:] against logits[:, :-1]. Masks come from lengths, never from
# `ids != pad_id`: with GPT-2 pad == EOS and that test would drop the real EOS.
# Masks are bool so that indexing x[mask] selects (a long mask would gather rows 0/1).

def encode_pair(tok, prompt, response, max_len, eos=True):
    """(prompt_ids, response_ids) with response_ids ending in EOS (unless eos=False).

    Policy: nothing is truncated. If len(prompt_ids) + len(response_ids) > max_len (the
    model's context) this raises DataError; a silently cut response would lose its EOS
    and maybe the very part that made it chosen. Filter or shorten data beforehand (the
    sampler keeps its own outputs within the context). An empty prompt is an error too.
    """
    p = tok.encode_prompt(prompt)
    r = tok.encode_response(response) if eos else tok.encode(response)
    if not p:
        raise DataError("empty prompt: the first response token needs a prompt token before it")
    if len(p) >= max_len:
        raise DataError(f"prompt is {len(p)} tokens, context is {max_len}: {prompt[:60]!r}...")
    if len(p) + len(r) > max_len:
        raise DataError(f"prompt+response is {len(p) + len(r)} tokens, context is {max_len}; "
                        f"prompt {prompt[:60]!r}")
    return p, r


def collate(sequences, pad_id):
    """sequences: list of (prompt_ids, response_ids) -> dict of [B, T] tensors (see above),
    T = the longest prompt+response in the list."""
    if not sequences:
        raise ValueError("collate: no sequences")
    B = len(sequences)
    T = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.bool)
    response_mask = torch.zeros((B, T), dtype=torch.bool)
    for i, (p, r) in enumerate(sequences):
        if len(p) == 0 or len(r) == 0:
            raise ValueError(f"collate: row {i} has an empty prompt or response")
        n_p, n = len(p), len(p) + len(r)
        input_ids[i, :n] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention_mask[i, :n] = True
        response_mask[i, n_p:n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "response_mask": response_mask}


def collate_preferences(prompt_ids_list, *response_groups, pad_id):
    """One batch for one forward pass over every response of B preference examples.

    response_groups: lists aligned with the prompts, e.g. chosen, rejected, then SELM's
    reference answers y_ref (one list per answer when there are several). Row order: group
    after group, so rows 0..B-1 are (prompt_i, chosen_i), rows B..2B-1 (prompt_i,
    rejected_i), and so on; per-row results split with `.view(len(groups), B)`. All padded
    to one T.
    """
    B = len(prompt_ids_list)
    if any(len(g) != B for g in response_groups):
        raise ValueError(f"collate_preferences: lists of lengths {[B] + [len(g) for g in response_groups]}")
    return collate([(p, r) for g in response_groups for p, r in zip(prompt_ids_list, g)], pad_id)


def batches(n, batch_size, seed=0, shuffle=True, drop_last=False):
    """Yield lists of indices into a dataset of n items; the order depends only on seed."""
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        yield idx
