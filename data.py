"""
Data for selm: text, tokens, judges and batches. Imports nothing from the model code.
  1. tokenizer: GPT-2 BPE when its files are on disk, otherwise plain bytes;
  2. the built-in task, letter sorting: plays UltraFeedback (prompts, offline pairs),
     PairRM (the judge) and AlpacaEval (held-out prompts with fixed reference answers);
  3. user data: JSON Lines files and "module:function" judges;
  4. batching: right-padded tensors with prompt/response masks.
`python data.py` prints one worked example and statistics of the default task.
"""

import hashlib
import importlib
import importlib.util
import json
import math
import os
import random
import re
import tempfile
import zlib
from dataclasses import dataclass, field
from unittest import mock

import tiktoken
import torch


class DataError(ValueError):
    """Bad user data or a bad spec; the message names the file/line or spec at fault."""


# -----------------------------------------------------------------------------
# 1. Tokenizer

# Where tiktoken's own "gpt2" encoding fetches its two files from, and their sha256.
# tiktoken caches each one under sha1(url) in its cache directory; we look there first
# so that get_encoding("gpt2") is only called when it cannot need the network.
_GPT2_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
_announced = set()  # tokenizer names already printed, so we say it once per process


class Tokenizer:
    """A tiktoken.Encoding plus the ids the rest of selm needs.

    encode(text) -> list[int]: plain text only; a literal "<|endoftext|>" inside user
        text is encoded as ordinary characters, never as the EOS id.
    decode(ids) -> str: undecodable bytes (a token sequence cut inside a UTF-8 character)
        become U+FFFD instead of raising.
    """

    def __init__(self, enc, name, eos_id, pad_id):
        self.enc, self.name, self.eos_id, self.pad_id = enc, name, eos_id, pad_id
        self.vocab_size = enc.n_vocab  # the model may round this up

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids], errors="replace")

    def __repr__(self):
        return (f"Tokenizer({self.name}, vocab={self.vocab_size}, "
                f"eos={self.eos_id}, pad={self.pad_id})")


def _gpt2_in_cache():
    """True when both GPT-2 files sit in tiktoken's cache with the right hashes.
    A present-but-corrupt file would make tiktoken delete it and download again."""
    # the cache directory as tiktoken.load.read_file_cached finds it; "" = no cache
    default = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR", default))
    for url, sha256 in _GPT2_FILES.items():
        path = os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())
        if not cache or not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sha256:
                return False
    return True


def _gpt2_from_dir(bpe_path):
    """GPT-2 BPE from a local directory holding the original release's vocab.bpe +
    encoder.json, or the same two files under Hugging Face's names merges.txt + vocab.json."""
    for merges, vocab in (("vocab.bpe", "encoder.json"), ("merges.txt", "vocab.json")):
        m, v = os.path.join(bpe_path, merges), os.path.join(bpe_path, vocab)
        if os.path.isfile(m) and os.path.isfile(v):
            break
    else:
        raise DataError(f"{bpe_path}: no vocab.bpe+encoder.json (or merges.txt+vocab.json) here")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    # tiktoken would copy even local files into its cache under sha1(path), and later
    # serve that copy if the file changed; an empty cache dir switches the cache off.
    with mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": ""}):
        ranks = data_gym_to_mergeable_bpe_ranks(m, v)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def get_tokenizer(bpe_path=None, verbose=True):
    """GPT-2 BPE if available locally (bpe_path, else tiktoken's cache), else bytes.

    Nothing here ever downloads. An explicit bpe_path that lacks the files is an error
    rather than a silent fallback. GPT-2: eos = pad = 50256 (masks never use `ids != pad`,
    see part 4). Bytes: ids 0..255 are the bytes, 256 = <|endoftext|> (EOS), 257 = <|pad|>.
    """
    if bpe_path is not None:
        tok = Tokenizer(_gpt2_from_dir(bpe_path), "gpt2", 50256, 50256)
    elif _gpt2_in_cache():
        tok = Tokenizer(tiktoken.get_encoding("gpt2"), "gpt2", 50256, 50256)
    else:
        enc = tiktoken.Encoding(  # pat_str: anything covering all text, there are no merges
            name="bytes", pat_str=r"\s+|\S+", mergeable_ranks={bytes([i]): i for i in range(256)},
            special_tokens={"<|endoftext|>": 256, "<|pad|>": 257}, explicit_n_vocab=258)
        tok = Tokenizer(enc, "bytes", 256, 257)
    if verbose and tok.name not in _announced:
        _announced.add(tok.name)
        print(f"tokenizer: {tok}")
    return tok


# -----------------------------------------------------------------------------
# 2. The built-in task: sort the letters of a word
#
# Prompt "sort: dbca\n", perfect response "abcd" (the batching layer appends EOS).
# The truth is a function of the prompt, so the judge needs no hidden state.
#
# Quality is controlled by a *systematic* weak procedure: k passes of bubble sort. Each
# pass floats the largest unsorted letter to its place, so after k passes the last k
# letters are right and the front is still scrambled. SELM.md's calibration probe found
# random noise useless here (greedy decoding averages it away and the SFT model ends up
# better than its teachers); a consistent, partial procedure gives a mediocre SFT model
# that preference learning can improve.
#
# Measured per-k on words of 7-10 random letters (repeats allowed), mean reward / share
# fully correct: k=0 .15/0%, 1 .30/1%, 2 .47/5%, 3 .63/16%, 4 .76/35%, 5 .87/58%.

PROMPT_PREFIX = "sort: "
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
EVAL_MODULUS = 10  # a word is held out for evaluation iff crc32(word) % 10 == 0
_PROMPT_RE = re.compile(r"sort: ([a-z]+)\n")


def make_prompt(word):
    return f"{PROMPT_PREFIX}{word}\n"


def parse_prompt(prompt):
    """The word a task prompt asks to sort; DataError if it is not a task prompt."""
    m = _PROMPT_RE.fullmatch(prompt)
    if m is None:
        raise DataError(f"not a sorting prompt: {prompt!r}")
    return m.group(1)


def truth(prompt):
    """The perfect response to a task prompt."""
    return "".join(sorted(parse_prompt(prompt)))


def bubble_passes(word, k):
    """The word after k left-to-right passes of bubble sort (k=0: unchanged)."""
    s = list(word)
    for p in range(k):  # after pass p the last p+1 letters are final
        for i in range(len(s) - 1 - p):
            if s[i] > s[i + 1]:
                s[i], s[i + 1] = s[i + 1], s[i]
    return "".join(s)


def reward(prompt_or_truth, response):
    """Graded score in [0, 1]: #positions i with response[i] == truth[i], divided by
    max(len(truth), len(response)). Dividing by the longer length penalises answers
    that are too long or too short. 1.0 iff response == truth; "" scores 0.

    prompt_or_truth: a task prompt ("sort: ...\\n", the truth is derived) or the truth.
    No whitespace is stripped: "abcd\\n" against "abcd" scores 0.8.
    """
    t = truth(prompt_or_truth) if prompt_or_truth.startswith(PROMPT_PREFIX) else prompt_or_truth
    n = max(len(t), len(response))
    return sum(a == b for a, b in zip(t, response)) / n if n else 1.0


def judge(prompt, candidates):
    """The built-in judge: one score per candidate, higher is better, deterministic.
    User judges follow the same signature: judge(prompt: str, candidates: list[str])
    -> list[float]."""
    t = truth(prompt)
    return [reward(t, c) for c in candidates]


def is_eval_word(word):
    # Held-out split by a fixed hash, not by sampling order: eval and training words are
    # disjoint for every seed and every dataset size, with no bookkeeping.
    return zlib.crc32(word.encode()) % EVAL_MODULUS == 0


def _draw_word(rng, min_len, max_len, distinct, want_eval, seen):
    """A fresh word from the wanted split (eval or train) not in `seen`; adds it there."""
    for _ in range(100_000):
        n = rng.randint(min_len, max_len)
        letters = rng.sample(ALPHABET, n) if distinct else rng.choices(ALPHABET, k=n)
        word = "".join(letters)
        if is_eval_word(word) == want_eval and word not in seen:
            seen.add(word)
            return word
    raise ValueError(f"ran out of distinct words of length {min_len}-{max_len}")


@dataclass
class Task:
    """The built-in dataset.
    sft:    list of (prompt, response): mediocre demonstrations.
    chunks: n_chunks lists of {"prompt", "chosen", "rejected"}: offline pairs, chunk t
            for iteration t, prompts unique across chunks; reward(chosen) > reward(rejected).
    eval:   list of {"prompt", "reference"}: held-out words with fixed reference answers.
    config: the arguments that made it.
    """
    sft: list
    chunks: list
    eval: list
    config: dict = field(default_factory=dict)


def make_task(seed=0, n_sft=8192, n_prompts_per_chunk=1024, n_chunks=4, n_eval=512,
              min_len=7, max_len=10, sft_passes=(1, 3), offline_passes=(0, 4),
              ref_passes=(3, 3), distinct=False):
    """Build the task deterministically from `seed`.

    Difficulty knobs: min_len/max_len (longer words need more passes, so the same k is
    worse), the pass ranges (inclusive (lo, hi), k ~ uniform) and distinct (letters
    without repeats). Defaults follow SELM.md's probe: SFT demos after 1-3 passes, offline
    responses after 0-4. Eval references use exactly 3 passes: better than any SFT demo
    (mean ~0.63, ~16% perfect at 7-10 letters), so an SFT model mostly loses to them and a
    better model can win, with room left above them.

    Each part (sft, offline chunks, eval) draws from its own stream seeded from `seed`,
    so changing n_eval (or n_sft) leaves the other parts unchanged. n_chunks=4 default:
    one chunk for offline DPO (iteration 0), three for online iterations.
    """
    config = dict(locals())
    if not 1 <= min_len <= max_len or (distinct and max_len > len(ALPHABET)):
        raise ValueError(f"bad word lengths {min_len}-{max_len}")
    master = random.Random(seed)
    rng_sft, rng_off, rng_eval = (random.Random(master.getrandbits(64)) for _ in range(3))
    def word(rng, want_eval, seen):
        return _draw_word(rng, min_len, max_len, distinct, want_eval, seen)

    seen, sft = set(), []  # SFT prompts unique among themselves (they may recur in chunks)
    for _ in range(n_sft):
        w = word(rng_sft, False, seen)
        sft.append((make_prompt(w), bubble_passes(w, rng_sft.randint(*sft_passes))))

    seen, pairs, skipped = set(), [], 0
    while len(pairs) < n_chunks * n_prompts_per_chunk:
        if skipped > 1000:
            raise ValueError(f"offline_passes={offline_passes} almost never gives a strict pair")
        w = word(rng_off, False, seen)
        t = "".join(sorted(w))
        for _ in range(16):  # two independent weak generators; retry exact ties
            a = bubble_passes(w, rng_off.randint(*offline_passes))
            b = bubble_passes(w, rng_off.randint(*offline_passes))
            ra, rb = reward(t, a), reward(t, b)
            if ra != rb:
                chosen, rejected = (a, b) if ra > rb else (b, a)
                pairs.append({"prompt": make_prompt(w), "chosen": chosen, "rejected": rejected})
                break
        else:  # a word whose candidates always tie (e.g. already sorted) is skipped
            skipped += 1
    n = n_prompts_per_chunk
    chunks = [pairs[i * n:(i + 1) * n] for i in range(n_chunks)]

    seen, evals = set(), []
    for _ in range(n_eval):
        w = word(rng_eval, True, seen)
        evals.append({"prompt": make_prompt(w),
                      "reference": bubble_passes(w, rng_eval.randint(*ref_passes))})
    return Task(sft=sft, chunks=chunks, eval=evals, config=config)


def examples(word="language"):
    """One prompt with responses of rising quality, for the README:
    list of {"prompt", "passes", "response", "reward"} for k = 0 .. len(word)-1."""
    p = make_prompt(word)
    return [{"prompt": p, "passes": k, "response": bubble_passes(word, k),
             "reward": reward(p, bubble_passes(word, k))} for k in range(len(word))]


def task_stats(task):
    """{part: (mean reward, fraction perfect)} for sft, chosen, rejected, reference."""
    def stat(rows):
        rs = [reward(p, r) for p, r in rows]
        return sum(rs) / len(rs), sum(r == 1.0 for r in rs) / len(rs)
    pairs = [ex for c in task.chunks for ex in c]
    return {"sft": stat(task.sft),
            "chosen": stat([(e["prompt"], e["chosen"]) for e in pairs]),
            "rejected": stat([(e["prompt"], e["rejected"]) for e in pairs]),
            "reference": stat([(e["prompt"], e["reference"]) for e in task.eval])}


# -----------------------------------------------------------------------------
# 3. User data: JSON Lines and judges

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
            line = raw.decode("utf-8")
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


def call_judge(judge_fn, prompt, candidates):
    """judge_fn(prompt, candidates) checked: one finite float per candidate."""
    scores = judge_fn(prompt, list(candidates))
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError) as e:
        raise DataError(f"judge returned non-numeric scores {scores!r}") from e
    if len(scores) != len(candidates) or not all(math.isfinite(s) for s in scores):
        raise DataError(f"judge returned {scores!r} for {len(candidates)} candidates")
    return scores


# -----------------------------------------------------------------------------
# 4. Batching
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
    p = tok.encode(prompt)
    r = tok.encode(response) + ([tok.eos_id] if eos else [])
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


def collate_preferences(prompt_ids_list, chosen_ids_list, rejected_ids_list,
                        ref_ids_list=None, *, pad_id):
    """One batch for one forward pass over every response of B preference examples.

    Row order: rows 0..B-1 are (prompt_i, chosen_i), rows B..2B-1 (prompt_i, rejected_i),
    and with ref_ids_list rows 2B..3B-1 (prompt_i, y_ref_i). So B_total = 2B or 3B, and
    per-row results split with `.chunk(2 or 3, dim=0)`. All padded to one T.
    """
    groups = [chosen_ids_list, rejected_ids_list]
    groups += [ref_ids_list] if ref_ids_list is not None else []
    B = len(prompt_ids_list)
    if any(len(g) != B for g in groups):
        raise ValueError(f"collate_preferences: lists of lengths {[B] + [len(g) for g in groups]}")
    return collate([(p, r) for g in groups for p, r in zip(prompt_ids_list, g)], pad_id)


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


if __name__ == "__main__":
    for ex in examples():
        print(f"{ex['prompt']!r} k={ex['passes']} {ex['response']!r} reward {ex['reward']:.3f}")
    task = make_task()
    print(f"default task: {len(task.sft)} SFT, {len(task.chunks)}x{len(task.chunks[0])} pairs, "
          f"{len(task.eval)} eval, words {task.config['min_len']}-{task.config['max_len']}")
    for part, (mean, perfect) in task_stats(task).items():
        print(f"{part:>10}: mean reward {mean:.3f}, fully correct {perfect:.1%}")
