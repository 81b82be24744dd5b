"""
tasks/sorting.py -- the built-in task of a fresh model: sort the letters of a word.

It plays three parts of the paper's setup, small enough for a laptop:
  - UltraFeedback: prompts, SFT demonstrations and offline (chosen, rejected) pairs;
  - PairRM, the judge: `judge(prompt, candidates)` scores candidates against the truth;
  - AlpacaEval: held-out prompts with fixed reference answers to beat.

Prompt "sort: dbca\n", perfect response "abcd" (the batching layer appends EOS). The truth
is a function of the prompt, so the judge needs no hidden state.

Quality is controlled by a *systematic* weak procedure: k passes of bubble sort. Each pass
floats the largest unsorted letter to its place, so after k passes the last k letters are
right and the front is still scrambled. Random noise would be useless here: greedy decoding
averages it away, and the SFT model ends up better than its teachers. A consistent, partial
procedure gives a mediocre SFT model that preference learning can improve.

Measured per k on words of 7-10 random letters (repeats allowed), mean reward / share fully
correct: k=0 .15/0%, 1 .30/1%, 2 .47/5%, 3 .63/16%, 4 .76/35%, 5 .87/58%.

`python -m tasks.sorting` prints one worked example and statistics of the default task.
Of the rest of the project this file imports only the Task interface (tasks/__init__.py).
"""

import random
import re
import zlib
from dataclasses import dataclass, field

from tasks import Data, Task

PROMPT_PREFIX = "sort: "
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
EVAL_MODULUS = 10  # a word is held out for evaluation iff crc32(word) % 10 == 0
_PROMPT_RE = re.compile(r"sort: ([a-z]+)\n")


def make_prompt(word):
    return f"{PROMPT_PREFIX}{word}\n"


def parse_prompt(prompt):
    """The word a task prompt asks to sort; ValueError if it is not a task prompt."""
    m = _PROMPT_RE.fullmatch(prompt)
    if m is None:
        raise ValueError(f"not a sorting prompt: {prompt!r}")
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
class Dataset:
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
    without repeats). Defaults: SFT demos after 1-3 passes, offline
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
    return Dataset(sft=sft, chunks=chunks, eval=evals, config=config)


def make(cfg):
    """The task as a run's settings (train.Config) ask for it: --task-seed, --n-sft, --chunk-size,
    --iterations + 1 chunks, --n-eval, --min-len, --max-len, --sft-passes and --offline-passes
    (each "lo,hi"; inputs.check_config has checked them all)."""
    def passes(spec):
        return tuple(int(x) for x in spec.split(","))
    t = make_task(seed=cfg.task_seed, n_sft=cfg.n_sft, n_prompts_per_chunk=cfg.chunk_size, n_chunks=cfg.iterations + 1,
                  n_eval=cfg.n_eval, min_len=cfg.min_len, max_len=cfg.max_len, sft_passes=passes(cfg.sft_passes),
                  offline_passes=passes(cfg.offline_passes))
    return Data(t.chunks, t.eval, t.sft)


TASK = Task(make, judge, template=make_prompt("{prompt}"),
            about="sorting the letters of words of {cfg.min_len}-{cfg.max_len} letters")


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


if __name__ == "__main__":
    for ex in examples():
        print(f"{ex['prompt']!r} k={ex['passes']} {ex['response']!r} reward {ex['reward']:.3f}")
    task = make_task()
    print(f"default task: {len(task.sft)} SFT, {len(task.chunks)}x{len(task.chunks[0])} pairs, "
          f"{len(task.eval)} eval, words {task.config['min_len']}-{task.config['max_len']}")
    for part, (mean, perfect) in task_stats(task).items():
        print(f"{part:>10}: mean reward {mean:.3f}, fully correct {perfect:.1%}")
