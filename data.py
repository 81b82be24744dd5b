"""
data.py -- user data and batches: JSON Lines records, judges' scores, padded tensors.

  1. user data: JSON Lines files (plain strings, or conversations that chat.py renders), read and
     checked, and a judge's scores checked (the judge itself, a function, comes from inputs.py);
  2. batching: right-padded tensors with prompt/response masks.
Tokenizers live in tokenizer.py, the built-in tasks in tasks/; `python -m tools.fit` keeps the
records of a file that fit a context.

This file imports nothing from the model code.
"""

import json
import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch

import chat


class DataError(ValueError):
    """Bad user data or a bad spec; the message names the file/line or spec at fault."""


# -----------------------------------------------------------------------------
# 1. User data: JSON Lines and judges

def read_jsonl(path):
    """[(where, record)] of a JSON Lines file, where = "path:line": one JSON object per line,
    blank lines skipped. A file that cannot be read or parsed raises DataError "path:line: ..."."""
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
        except RecursionError:
            raise DataError(f"{where}: bad JSON: nested too deeply") from None
        except ValueError as e:  # a number of more digits than Python converts
            raise DataError(f"{where}: bad JSON: {str(e).split(';')[0]}") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        rows.append((where, rec))
    if not rows:
        raise DataError(f"{path}:1: empty file, no JSON records")
    return rows


def check_strings(rec, fields):
    """rec, once each of `fields` is a non-empty string: an empty response teaches nothing, and
    an empty prompt leaves the first response token with no position to be predicted from."""
    for name in fields:
        if name not in rec:
            raise ValueError(f"missing field {name!r}")
        if not isinstance(rec[name], str):
            raise ValueError(f"field {name!r} must be a string, got {type(rec[name]).__name__}")
        if rec[name] == "":
            raise ValueError(f"field {name!r} is empty")
    return rec


def read_prompts(path):
    """[(where, record)] of a file of prompts: JSON Lines whose records hold a "prompt" (a string
    or a conversation) when its first line is a JSON object; otherwise plain text, each line
    that is not blank one prompt (sample.py --prompts)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise DataError(f"{path}: no prompts in it")
    if not first.lstrip().startswith("{"):
        return [(f"{path}:{i}", {"prompt": line}) for i, line in enumerate(lines, 1) if line.strip()]
    def checked(rec):
        if "prompt" not in rec:
            raise ValueError("missing field 'prompt'")
        return chat.user_turn(rec["prompt"], "prompt") and rec
    return [(where, converted(where, rec, checked)) for where, rec in read_jsonl(path)]


def load_jsonl(path, fields=("prompt",), convert=None):
    """The records of a JSON Lines file, each with the string `fields` (check_strings):
    ("prompt", "completion") for SFT, ("prompt", "chosen", "rejected") for preferences,
    ("prompt",) for prompts; extra fields are kept. convert(record), if given, replaces that
    check: it returns what to keep of a record, or raises ValueError saying what is wrong
    (chat.py's readers of conversations). Any problem raises DataError "path:line: ..."
    before anything is returned."""
    convert = convert or (lambda rec: check_strings(rec, fields))
    return [converted(where, rec, convert) for where, rec in read_jsonl(path)]


def converted(where, rec, convert):
    try:
        return convert(rec)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


class JudgeError(DataError):
    """The judge raised, or returned something other than one finite score per candidate."""


def judge_name(judge_fn):
    if isinstance(getattr(judge_fn, "name", None), str):  # e.g. a reward model's "rm:DIR"
        return judge_fn.name
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
    return checked_scores(where, scores, candidates)


def checked_scores(where, scores, candidates):
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: an integer too large for a float
        raise JudgeError(f"{where} returned non-numeric scores {shown(scores)}") from e
    if len(scores) != len(candidates) or not all(math.isfinite(s) for s in scores):
        raise JudgeError(f"{where} returned {shown(scores)} for {len(candidates)} candidates")
    return scores


def shown(value, width=100):
    """repr(value), cut to `width` characters for a one-line message."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to write out
        text = f"<{type(value).__name__}>"
    return text if len(text) <= width else text[:width - 3] + "..."


def judge_block(judge_fn, items):
    """The scores of every (prompt, candidates) of `items`, each list checked as call_judge
    checks it. A judge with a `batch` method -- a reward model (reward.py) -- scores the whole
    block in one call, batch(prompts, candidate lists) -> a list of scores per prompt."""
    if not hasattr(judge_fn, "batch"):
        return [call_judge(judge_fn, p, c) for p, c in items]
    where = f"judge {judge_name(judge_fn)} on prompts {items[0][0][:40]!r}, ..."
    try:
        out = list(judge_fn.batch([p for p, _ in items], [list(c) for _, c in items]))
    except Exception as e:  # noqa: BLE001
        raise JudgeError(f"{where} failed: {type(e).__name__}: {e}") from e
    if len(out) != len(items):
        raise JudgeError(f"{where} returned {len(out)} score lists for {len(items)} prompts")
    return [checked_scores(f"judge {judge_name(judge_fn)} on prompt {p[:40]!r}", s, c) for (p, c), s in zip(items, out)]


@dataclass
class TrainingData:
    """Everything a run trains and evaluates on, read and checked before any training.
    sft:     list of (prompt, response) strings: demonstrations
    chunks:  n_chunks lists of {"prompt", "chosen", "rejected"}: chunk 0 for offline DPO,
             chunk t for SELM iteration t; or of prompts (a chat task's, --train-prompts'), until
             pairs.own_pairs makes their pairs from the starting model's answers
    eval:    list of {"prompt", "reference" (an answer to beat, or None)}
    judge:   judge(prompt, candidates) -> list of scores, higher is better
    builtin: True for the built-in task, whose judge's score 1.0 means "fully correct"
    prompt_template: how the prompts were written, "{prompt}" standing for the user's text
    conversational: True when the records were conversations, rendered with the chat template
    lines:   where each record of the user's files came from, for check_fits' messages
    metrics: more figures of the greedy evaluation answers, metrics(prompts, answers) -> dict
             (the instruction task: IFEval's prompt-level and instruction-level accuracy)
    """
    sft: list
    chunks: list
    eval: list
    judge: object
    builtin: bool = False
    prompt_template: str = "{prompt}"  # how a plain prompt was formatted; sample.py reuses it
    conversational: bool = False  # sample.py then renders its prompt as a user turn, as training did
    lines: dict = None  # {"sft" | "prefs" | "prompts" | "train_prompts": ["path:line" of each record]}
    metrics: object = None


def load_user_data(sft_path, prefs_path, prompts_path, n_chunks, template=None, train_prompts_path=None):
    """The user's JSON Lines files as TrainingData, its judge None (inputs.load_data loads the
    one --judge names, once the data is known to be good). A malformed record stops the
    run with its file, line and field, before anything is trained on partial data. The pairs,
    or the training prompts whose pairs the starting model's answers make (train_prompts_path:
    each chunk a list of prompts as given, strings or conversations), are cut into n_chunks
    equal chunks (a remainder is left out).

    Records are plain strings, or conversations (chat.py). One conversation in any of the
    files makes the run conversational: every record is then rendered with `template`, the
    model's chat template (chat.ChatTemplate), which must exist."""
    files = {"sft": sft_path, "prefs": prefs_path, "prompts": prompts_path, "train_prompts": train_prompts_path}
    raw = {k: read_jsonl(path) for k, path in files.items() if path}
    first = next((where for recs in raw.values() for where, rec in recs if chat.is_conversational(rec)), None)
    if first and template is None:
        raise DataError(f"{first}: a conversation needs the model's chat template, and its tokenizer has none "
                        "(chat_template.jinja or tokenizer_config.json's \"chat_template\" in the --init-from "
                        "directory)")
    if first:
        readers = {"sft": lambda r: chat.demonstration(r, template),
                   "prefs": lambda r: chat.preference_pair(r, template),
                   "prompts": lambda r: chat.evaluation_prompt(r, template), "train_prompts": training_prompt}
    else:
        readers = {"sft": plain_demonstration, "prefs": lambda r: check_strings(r, ("prompt", "chosen", "rejected")),
                   "prompts": plain_prompt, "train_prompts": training_prompt}
    sft, prefs, evals, prompts = ([converted(where, rec, readers[k]) for where, rec in raw.get(k, [])] for k in files)
    lines = {k: [where for where, _ in recs] for k, recs in raw.items()}
    items, what = (prompts, "prompts") if train_prompts_path else (prefs, "pairs")
    n = len(items) // n_chunks
    if n == 0:
        raise DataError(f"{train_prompts_path or prefs_path}: {len(items)} {what} cannot fill {n_chunks} chunks "
                        f"(offline DPO + {n_chunks - 1} iterations)")
    chunks = [items[i * n:(i + 1) * n] for i in range(n_chunks)]
    return TrainingData(sft, chunks, evals, None, lines=lines, conversational=bool(first))


def training_prompt(rec):
    """A training prompt record's prompt, as given: a string, or a conversation whose next turn is
    the assistant's (the starting model answers it, pairs.own_pairs)."""
    if "prompt" not in rec:
        raise ValueError("missing field 'prompt'")
    return chat.check_answerable(chat.user_turn(rec["prompt"], "prompt")) and rec["prompt"]


def plain_demonstration(rec):
    check_strings(rec, ("prompt", "completion"))
    return rec["prompt"], rec["completion"]


def plain_prompt(rec):
    """An evaluation record of strings: a prompt and maybe a reference answer; a preference
    record's chosen answer is its reference, as for conversations (chat.evaluation_prompt)."""
    check_strings(rec, ("prompt",))
    name = "reference" if "reference" in rec or "chosen" not in rec else "chosen"
    if rec.get(name) is not None:
        check_strings(rec, (name,))
    return {"prompt": rec["prompt"], "reference": rec.get(name)}


def check_fits(d, tok, block_size, sft_where, prefs_where):
    """Encode every text of `d` and refuse what does not fit the context: a prompt or pair
    that is too long stops the run (encode_pair), it is never silently truncated; the error
    names the record's file and line (d.lines), or its number in sft_where / prefs_where.
    Returns the SFT demonstrations encoded, as (prompt_ids, response_ids) pairs."""
    def where(kind, i, default):
        lines = (d.lines or {}).get(kind)
        return lines[i] if lines else f"{default}, record {i + 1}"

    def encode(kind, i, default, prompt, response, what=""):
        try:
            return encode_pair(tok, prompt, response, block_size)
        except DataError as e:
            raise DataError(f"{where(kind, i, default)}: {what}{e}") from None
    sft = [encode("sft", i, sft_where, p, r) for i, (p, r) in enumerate(d.sft)]
    for i, e in enumerate(e for c in d.chunks for e in c):
        for k in ("chosen", "rejected"):
            encode("prefs", i, prefs_where, e["prompt"], e[k], f"{k}: ")
    for kind, records, default in (("prompts", d.eval, "evaluation prompts"),
                                   ("prefs", [e for c in d.chunks for e in c], prefs_where)):
        for i, e in enumerate(records):
            n = len(tok.encode_prompt(e["prompt"]))
            if n == 0:
                raise DataError(f"{where(kind, i, default)}: prompt {e['prompt'][:40]!r} encodes to no tokens (the "
                                "tokenizer's vocabulary lacks its characters)")
            if n >= block_size - 1:
                raise DataError(f"{where(kind, i, default)}: prompt {e['prompt'][:40]!r}... leaves no room for a "
                                f"response in the context of {block_size} tokens")
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


class Example(NamedTuple):
    """One preference example in token ids: the prompt, the chosen and the rejected response,
    and pi_ref's own answers y_refs that SELM's optimism term averages over (none for DPO)."""
    prompt: list
    chosen: list
    rejected: list
    y_refs: tuple = ()

    def responses(self):
        return (self.chosen, self.rejected, *self.y_refs)


def preference_rows(examples):
    """The (prompt, response) rows of B Examples, part after part: rows 0..B-1 are
    (prompt_i, chosen_i), rows B..2B-1 (prompt_i, rejected_i), then each y_ref in turn. The
    log-probs of the rows come back apart with selm.split_logps(logps, 2 + len(y_refs))."""
    parts = zip(*(ex.responses() for ex in examples), strict=True)  # every example has as many y_refs
    return [(ex.prompt, r) for part in parts for ex, r in zip(examples, part)]


def collate_shared(examples, pad_id, length=None):
    """One batch for one forward pass over every response of B Examples, each prompt computed
    once: row i holds prompt_i, then each of its responses in turn, right-padded to one T.
    A response attends to the prompt and to itself, never to its siblings, and its positions
    start where the prompt ends, so each response's log-probs are those of (prompt, response)
    alone; the prompt, often most of a row, is not run n_parts times. Returns [B, T] tensors
      input_ids, position_ids;
      response_mask  True on response tokens (EOS included);
      predecessor    the position whose logits predict each token: t - 1 inside a response,
                     the prompt's last position for a response's first token;
      part           which response a token belongs to (0 chosen, 1 rejected, 2.. y_refs; -1 none);
    and attention_mask [B, 1, T, T] bool, True where a query may attend to a key. length: pad
    to this T (one shape for a whole stage, as a compiled forward wants), not the longest row."""
    if not examples:
        raise ValueError("collate_shared: no examples")
    B, T = len(examples), max(len(ex.prompt) + sum(map(len, ex.responses())) for ex in examples)
    T = max(T, length or 0)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # 0 the prompt, 1 + k response k, -1 padding
    predecessor = torch.zeros((B, T), dtype=torch.long)
    for i, ex in enumerate(examples):
        if not ex.prompt or not all(ex.responses()):
            raise ValueError(f"collate_shared: example {i} has an empty prompt or response")
        P, start = len(ex.prompt), len(ex.prompt)
        input_ids[i, :P], position_ids[i, :P], segment[i, :P] = torch.tensor(ex.prompt), torch.arange(P), 0
        for k, r in enumerate(ex.responses()):
            end = start + len(r)
            input_ids[i, start:end] = torch.tensor(r)
            position_ids[i, start:end] = torch.arange(P, P + len(r))
            segment[i, start:end] = 1 + k
            predecessor[i, start:end] = torch.arange(start - 1, end - 1)
            predecessor[i, start] = P - 1  # a response's first token follows the prompt, not its sibling
            start = end
    q, kv = segment[:, :, None], segment[:, None, :]  # [B, T, 1] queries, [B, 1, T] keys
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal & (kv >= 0) & ((kv == 0) | (kv == q))
    allowed |= torch.eye(T, dtype=torch.bool)  # a padding query sees itself: no fully masked row (NaN)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": allowed[:, None],
            "response_mask": segment > 0, "predecessor": predecessor, "part": (segment - 1).clamp(min=-1)}


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
