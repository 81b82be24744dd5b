"""
tasks/instructions.py -- the built-in task of a chat model: follow instructions that can be checked.

It plays the paper's setup with a real chat model (--init-from):
  - UltraFeedback: prompts in chunks, one per stage, and offline pairs the starting model writes
    itself: k answers per prompt at temperature 1, judged, best chosen and worst rejected
    (pairs.own_pairs, which makes and keeps them);
  - PairRM: `judge(prompt, candidates)` scores an answer by the share of the prompt's constraints
    it meets, read back from the prompt text, so it needs no hidden state;
  - AlpacaEval: held-out prompts whose topics AND constraint combinations training never sees,
    scored with IFEval's headline figures (Zhou et al. 2023): prompt-level strict accuracy
    (every constraint met) and instruction-level accuracy (constraints met / constraints).

A prompt is a request plus 1-3 constraints (constraints.py), one sentence each, as plain text:
    Write a short poem about the ocean. Your entire answer must be in lowercase letters, with
    no capital letters at all. Answer in at most 30 words.
A run renders it with the model's chat template as one user turn (TASK's template is None:
inputs.task_data, through chat.py), as it renders a file of conversations; the judge reads the
plain and the rendered prompt alike. `python -m tasks.instructions` prints a few prompts and the
shape of the default task. Of the rest of the project this file imports only the constraints
(constraints.py) and the Task interface.
"""

import itertools
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from constraints import CONFLICTS, CONSTRAINTS, TITLE, Constraint, stated, words
from tasks import Data, Task

# -----------------------------------------------------------------------------
# 1. The requests: kinds of writing and topics

KINDS = ("a short poem", "a short story", "a letter to a friend", "a blog post", "a diary entry",
         "a product description", "a short speech", "a news report", "a fable", "an advertisement",
         "a short essay", "a song")
# "topic|more words": the topic as the prompt names it, then words that also count as mentioning it
TOPICS = ("the ocean|sea seas waves", "a lighthouse|lighthouses", "coffee|cafe espresso", "the moon|lunar moonlight",
          "a rainy day|rain raining", "an old library|libraries books", "mountains|peaks", "a city at night|cities",
          "the first snow|snowy snowfall snowflakes", "a lost cat|cats kitten", "a garden|gardens flowers",
          "friendship|friend friends", "a train journey|trains railway", "the desert|deserts sand dunes",
          "a thunderstorm|storm thunder lightning", "autumn leaves|leaf fall", "a small bakery|bakeries bread baker",
          "bicycles|bike bikes cycling", "the stars|star starry", "a birthday party|birthdays", "a forest|trees woods",
          "a robot|robots", "honey bees|bee", "the river|rivers", "an old clock|clocks", "volcanoes|volcano lava",
          "a school trip|school", "a kite|kites", "summer holidays|holiday vacation", "a music festival|concert",
          "a chess game|chess", "a mountain village|villages", "the wind|winds windy breeze", "a snowman|snowmen snow",
          "a farmers market|farmer vegetables", "a penguin|penguins", "the sunrise|sun dawn", "a treehouse|treehouses",
          "an island|islands", "a dragon|dragons", "a spaceship|spaceships space rocket",
          "a fishing boat|boats fish fishermen fisherman", "the city park|parks", "a grandmother's kitchen|grandma",
          "a piano|pianos pianist", "green tea|tea", "a firefly|fireflies", "an elephant|elephants",
          "a winter morning|winter", "a bridge|bridges", "the northern lights|aurora", "a camping trip|camp tent",
          "a museum|museums", "a new puppy|puppies dog dogs", "the beach|beaches shore", "a castle|castles",
          "a butterfly|butterflies", "homemade soup|soup", "an old map|maps", "a hot air balloon|balloons")
STOPWORDS = {"a", "an", "the", "of", "on", "at", "in", "to", "and", "old", "new", "small", "first", "lost",
             "homemade", "hot", "air"}


def topic_words(topic):
    """The words that count as mentioning a topic: those of its name but STOPWORDS, and those
    listed after its "|" in TOPICS; for a topic not in TOPICS, those of its name."""
    listed = next((t.split("|")[1].split() for t in TOPICS if t.split("|")[0] == topic and "|" in t), [])
    return [w.lower() for w in words(topic) if w.lower() not in STOPWORDS] + listed


# -----------------------------------------------------------------------------
# 2. Prompts, written and read back

class Request(NamedTuple):
    kind: str          # of writing, e.g. "a short poem" (None: a user's prompt that names none)
    topic: str         # e.g. "the ocean" (None: likewise)
    constraints: list  # of Constraint, in the order the prompt states them


def make_prompt(kind, topic, constraints):
    return " ".join([f"Write {kind} about {topic}."] + [c.text for c in constraints])


REQUEST = re.compile(r"Write ([^.\n]+?) about ([^.\n]+)\.")  # a task prompt's kind is one of KINDS; a user's, any


def parse_prompt(prompt):
    """The Request of a prompt, found by searching its text, so that a prompt rendered with a
    chat template reads as the plain one. A user's own prompt is read as far as it goes: the
    constraints it states in CONSTRAINTS' sentences, and its topic when it asks "Write ... about
    TOPIC." (without one, kind and topic are None). ValueError, in one line, if it states no
    constraint that the judge can check."""
    text = prompt.messages[-1]["content"] if getattr(prompt, "messages", None) else prompt
    request, found = REQUEST.search(text), stated(text)
    if not found:
        raise ValueError(f"the prompt {text[:60]!r} states no constraint this judge can check (it reads the "
                         "sentences of constraints.CONSTRAINTS, e.g. \"Answer in at most 30 words.\")")
    kind, topic = request.groups() if request else (None, None)
    return Request(kind, topic, found)


# -----------------------------------------------------------------------------
# 3. The judge

def mentions(word, topic_word):
    """Whether a word (lowercase) mentions a topic word: a word of 5 letters or more is
    mentioned by any word starting with its first max(len - 2, 5) letters ("oceans" and
    "oceanic" mention "ocean", "forests" mentions "forest", "forever" does not); a shorter one
    only by itself with a plural "s" or "es" ("bees" mentions "bee", "been" does not)."""
    if len(topic_word) < 5:
        return word in (topic_word, topic_word + "s", topic_word + "es")
    return word.startswith(topic_word[:max(len(topic_word) - 2, 5)])


def lowered(text):
    return [w.lower() for w in words(text)]


# Each check(request, answer) -> bool says whether an answer is degenerate in one way; each is
# written to stand alone, so that the share of answers it catches can be measured by itself.

def empty(request, answer):
    """No word at all."""
    return not words(answer)


def placeholder_title(request, answer):
    """A title of the answer (as `title` finds them) is an example the prompt shows, such as
    <<a title>>, copied: the same words, in any case."""
    examples = {tuple(lowered(t)) for t in TITLE.findall(make_prompt(*request))}
    return any(tuple(lowered(t)) in examples for t in TITLE.findall(answer))


ECHO = 3  # words: a run this long that the prompt also holds is the prompt's text, not the answer's


def restates(request, answer):
    """More than half of the answer's words lie in a run of ECHO words that the prompt also
    holds, in lowercase, leaving out the prompt's quoted words and phrases (those the answer is
    asked to use, or to avoid): the answer is mostly the request, even with a few words changed
    ("Here is a short poem about the ocean in lowercase letters")."""
    runs = {tuple(piece[i:i + ECHO]) for piece in map(lowered, re.split(r'"[^"]*"', make_prompt(*request)))
            for i in range(len(piece) - ECHO + 1)}
    ws = lowered(answer)
    echoed = set()
    for i in range(len(ws) - ECHO + 1):
        if tuple(ws[i:i + ECHO]) in runs:
            echoed.update(range(i, i + ECHO))
    return len(echoed) > len(ws) / 2


def off_topic(request, answer):
    """None of its words mentions a word of the topic (topic_words, `mentions`), when the
    prompt names one."""
    if request.topic is None:
        return False
    topic = topic_words(request.topic)
    return not any(mentions(w, t) for w in lowered(answer) for t in topic)


def repetitive(request, answer):
    """One word is more than half of its words (4 words or more), or more than half of its
    4-word sequences repeat an earlier one (a loop such as a sentence said three times), both
    in lowercase; or more than half of its non-blank lines repeat an earlier line (surrounding
    whitespace ignored), e.g. a divider looping."""
    ws = lowered(answer)
    grams = list(zip(ws, ws[1:], ws[2:], ws[3:]))
    top = Counter(ws).most_common(1)[0][1] if ws else 0
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    return ((len(ws) >= 4 and top > len(ws) / 2) or len(grams) - len(set(grams)) > len(grams) / 2
            or len(lines) - len(set(lines)) > len(lines) / 2)


# The fewest words a piece of each kind needs to be one, whatever else the prompt asks: a poem
# of two short lines, an advertisement of two sentences, a story with a beginning and an end.
MIN_WORDS = {"a short poem": 10, "a song": 15, "a product description": 15, "an advertisement": 15,
             **dict.fromkeys(("a short story", "a fable", "a short speech", "a short essay", "a letter to a friend",
                              "a blog post", "a diary entry", "a news report"), 20)}


def min_words(request):
    """MIN_WORDS of the request's kind (none for a kind a user's prompt names that the task
    does not), lowered to half of the prompt's own word cap if it has one, so that every
    prompt can be met: "at most 20 words" asks for 10 to 20."""
    caps = [c.args[0] // 2 for c in request.constraints if c.name == "at_most_words"]
    return min([MIN_WORDS.get(request.kind, 0)] + caps)


def stub(request, answer):
    """Fewer words than the piece of writing asked for needs (`min_words`): a one-line
    "speech", a title alone."""
    return len(words(answer)) < min_words(request)


# In this order: an answer is counted under the first that applies
DEGENERATE = {"empty": empty, "placeholder title": placeholder_title, "restates the request": restates,
              "off topic": off_topic, "repetitive": repetitive, "stub": stub}


def degenerate(request, answer):
    """Why an answer scores 0 whatever it meets (the first check of DEGENERATE that applies:
    empty, a copied placeholder title, the request restated, off topic, repetitive, a stub),
    or None."""
    return next((why for why, check in DEGENERATE.items() if check(request, answer)), None)


def verdicts(request, answer):
    """Whether the answer meets each constraint of the request; all False when degenerate."""
    if degenerate(request, answer):
        return [False] * len(request.constraints)
    return [c.met(answer) for c in request.constraints]


def judge(prompt, candidates):
    """The built-in judge: one score per candidate, the share of the prompt's constraints it
    meets (0 for a degenerate answer), in [0, 1]; 1.0 iff every one is met. Deterministic."""
    request = parse_prompt(prompt)
    return [sum(v) / len(v) for v in (verdicts(request, a) for a in candidates)]


def ifeval_metrics(prompts, answers):
    """IFEval's two headline figures, and the judge's mean score, over one answer per prompt:
      prompt_accuracy:      share of prompts whose every constraint is met (strict);
      instruction_accuracy: constraints met / constraints, over all prompts;
      score:                the judge's mean score."""
    vs = [verdicts(parse_prompt(p), a) for p, a in zip(prompts, answers, strict=True)]
    return {"prompt_accuracy": sum(all(v) for v in vs) / len(vs),
            "instruction_accuracy": sum(map(sum, vs)) / sum(map(len, vs)),
            "score": sum(sum(v) / len(v) for v in vs) / len(vs)}


# -----------------------------------------------------------------------------
# 4. The task: training chunks and held-out prompts

EVAL_MODULUS = 5  # a topic, or a combination of constraint types, is held out iff crc32 % 5 == 0


def is_eval(key):
    # a fixed hash, not the sampling order: the splits are disjoint for every seed and size
    return zlib.crc32(key.encode()) % EVAL_MODULUS == 0


def combination_key(names):
    return "+".join(sorted(names))


def combinations(size):
    """Every combination of `size` constraint types without a conflicting pair, sorted."""
    return [c for c in itertools.combinations(sorted(CONSTRAINTS), size)
            if not any(frozenset(p) in CONFLICTS for p in itertools.combinations(c, 2))]


@dataclass
class Prompts:
    """The built-in prompts, plain user turns, unique.
    chunks: n_chunks lists of prompts: chunk 0 for offline DPO, chunk t for SELM iteration t
    eval:   held-out prompts: no chunk holds their topics or their combinations of constraint types
    config: the arguments that made it."""
    chunks: list
    eval: list
    config: dict = field(default_factory=dict)


def make_task(seed=0, n_prompts_per_chunk=256, n_chunks=4, n_eval=128, max_constraints=3, types=None):
    """Build the prompts deterministically from `seed`: each has 1..max_constraints constraints
    (uniform over the sizes its split has), a combination drawn uniformly among those of that
    size in its split, a topic and a kind of writing uniformly, and the constraints' arguments.
    types: the constraint types to draw from (default: all of CONSTRAINTS). Chunks and eval
    draw from their own streams, so n_eval leaves the chunks unchanged."""
    config = dict(locals())
    types = set(CONSTRAINTS if types is None else types)
    if not 1 <= max_constraints <= 3 or not types or types - set(CONSTRAINTS):
        raise ValueError(f"max_constraints must be 1, 2 or 3 and types some of {sorted(CONSTRAINTS)}, "
                         f"got {max_constraints} and {sorted(types)}")
    master = random.Random(seed)
    rng_train, rng_eval = (random.Random(master.getrandbits(64)) for _ in range(2))

    def draw(rng, want_eval, seen, n):
        split = "held-out" if want_eval else "training"
        topics = [t.split("|")[0] for t in TOPICS if is_eval(t.split("|")[0]) == want_eval]
        by_size = [[c for c in combinations(k) if set(c) <= types and is_eval(combination_key(c)) == want_eval]
                   for k in range(1, max_constraints + 1)]
        by_size = [combos for combos in by_size if combos]
        if not by_size:
            raise ValueError(f"types {sorted(types)} make no {split} combination of constraints")
        out, misses = [], 0
        while len(out) < n:
            names = rng.choice(by_size[rng.randrange(len(by_size))])
            cs = [Constraint(name, CONSTRAINTS[name].draw(rng)) for name in names]
            p = make_prompt(rng.choice(KINDS), rng.choice(topics), rng.sample(cs, len(cs)))
            if p not in seen:
                seen.add(p)
                out.append(p)
            elif (misses := misses + 1) > 10_000:
                raise ValueError(f"types {sorted(types)} give fewer than {n} distinct {split} prompts")
        return out
    seen = set()
    chunks = [draw(rng_train, False, seen, n_prompts_per_chunk) for _ in range(n_chunks)]
    return Prompts(chunks=chunks, eval=draw(rng_eval, True, set(), n_eval), config=config)


def accuracies(prompts, answers):
    """IFEval's two headline figures of the answers (the judge's mean score is the run's reward)."""
    m = ifeval_metrics(prompts, answers)
    return {"prompt_accuracy": m["prompt_accuracy"], "instruction_accuracy": m["instruction_accuracy"]}


def make(cfg):
    """The prompts a run's settings (train.Config) ask for: --task-seed, --iterations + 1 chunks of
    --chunk-size, --n-eval held out. The chunks hold prompts: their pairs are the starting model's
    own answers, judged (pairs.own_pairs)."""
    t = make_task(seed=cfg.task_seed, n_prompts_per_chunk=cfg.chunk_size, n_chunks=cfg.iterations + 1,
                  n_eval=cfg.n_eval)
    return Data(t.chunks, [{"prompt": p, "reference": None} for p in t.eval])


# No prompt template: a user turn in the model's chat template. The judge's score 1.0 is the
# prompt-level strict accuracy (every constraint met), and IFEval's two figures join results.json.
TASK = Task(make, judge, template=None, about="instructions with 1-3 checkable constraints", metrics=accuracies)


if __name__ == "__main__":
    task = make_task()
    for p in task.eval[:5]:
        print(p, "\n")
    n = [len(combinations(k)) for k in (1, 2, 3)]
    print(f"{len(CONSTRAINTS)} constraint types, {n} combinations of 1/2/3; default task: "
          f"{len(task.chunks)}x{len(task.chunks[0])} training prompts, {len(task.eval)} held out")
