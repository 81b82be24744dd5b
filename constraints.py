"""
constraints.py -- checkable constraints on a piece of writing, IFEval's kind (Zhou et al. 2023).

Sixteen kinds: each a sentence that asks for it ("Answer in at most 30 words."), a checker that
says whether an answer meets it, check(answer, *args) -> bool, and the arguments a task may draw
for it. The checkers count as a reader would (`words`, `sentences`: letters of any script, no
markdown), and `stated` reads back the constraints a text asks for in these sentences, so that a
judge needs nothing but the prompt. The instruction task (tasks/instructions.py) is built on
them, and a judge of your own prompts may use them too.

This file imports only the standard library.
"""

import json
import re
from typing import NamedTuple

# -----------------------------------------------------------------------------
# 1. What every checker counts: words and sentences

WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # letters or digits of any script, inner apostrophes


def words(text):
    """The words of a text: maximal runs of letters and digits, with apostrophes inside ("don't"
    is one word); punctuation, markdown and symbols are not words."""
    return WORD.findall(text)


def sentences(text):
    """The pieces of a text between a run of ".", "!" or "?" followed by whitespace, and between
    lines (a bullet or a title is a sentence), if they hold a word ("***" is none). "3.5" ends
    no sentence; "Mr. Smith" does, as a plain rule must."""
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if WORD.search(s)]


def uses(text, word):
    """Whether a text uses a word: as a whole word, any case, or with a plural "s" or "es"."""
    return re.search(rf"(?<![^\W_]){re.escape(word)}(?:e?s)?(?![^\W_])", text, re.IGNORECASE) is not None


# -----------------------------------------------------------------------------
# 2. The constraints: one checker each, check(answer, *args) -> bool

def lowercase(answer):
    """No uppercase letter in any script; digits, punctuation and symbols are free."""
    return not any(c.isupper() for c in answer)


def capitals(answer):
    """No lowercase letter in any script; digits, punctuation and symbols are free."""
    return not any(c.islower() for c in answer)


def at_least_words(answer, n):
    """At least n words, as `words` counts them."""
    return len(words(answer)) >= n


def at_most_words(answer, n):
    """At most n words, as `words` counts them."""
    return len(words(answer)) <= n


def at_least_sentences(answer, n):
    """At least n sentences, as `sentences` counts them."""
    return len(sentences(answer)) >= n


def at_most_sentences(answer, n):
    """At most n sentences, as `sentences` counts them."""
    return len(sentences(answer)) <= n


def keywords(answer, *kws):
    """Every keyword is used (see `uses`: whole word, any case, plural allowed)."""
    return all(uses(answer, k) for k in kws)


def forbidden(answer, word):
    """The word is not used (see `uses`: whole word, any case, plural included)."""
    return not uses(answer, word)


def ends_with(answer, phrase):
    """The answer, trailing whitespace ignored, ends with the phrase, compared in lowercase (so
    that it combines with all capitals, as IFEval compares it)."""
    return answer.rstrip().lower().endswith(phrase.lower())


def starts_with(answer, word):
    """The answer's first word (see `words`: leading quotes, markdown or bullets skipped) is the
    word, in any case."""
    first = WORD.search(answer)
    return first is not None and first.group().lower() == word.lower()


def bullets(answer, n):
    """Exactly n lines are bullet points: "*" or "-", whitespace, then text, after optional
    indentation. "***" (a divider) and "**bold**" are not bullets; numbered lists are not."""
    return len(re.findall(r"^[ \t]*[*-][ \t]+\S", answer, re.MULTILINE)) == n


def paragraphs(answer, n):
    """The answer split at each "***" gives exactly n pieces, every one with a word: a leading,
    trailing or doubled divider makes an empty piece and fails."""
    pieces = answer.strip().split("***")
    return len(pieces) == n and all(WORD.search(p) for p in pieces)


TITLE = re.compile(r"<<([^\n<>]+)>>")


def title(answer):
    """Somewhere a title: "<<", then text on one line holding a word, then ">>"."""
    return any(WORD.search(t) for t in TITLE.findall(answer))


def no_commas(answer):
    """No comma: neither "," nor the full-width "，"."""
    return "," not in answer and "，" not in answer


def quotes(answer):
    """The answer, surrounding whitespace ignored, starts and ends with a double quotation mark:
    straight '"' at both ends, or the curly pair “ ”; a lone '"' is not wrapped."""
    s = answer.strip()
    return len(s) >= 2 and (s[0], s[-1]) in (('"', '"'), ("“", "”"))


def json_answer(answer):
    """The answer, surrounding whitespace and a markdown code fence (```json ... ```) ignored,
    is valid JSON holding an object or an array; a bare string or number is not a structured
    answer (IFEval accepts any JSON value)."""
    s = re.sub(r"^```(?:json|JSON)?\s*|\s*```$", "", answer.strip())
    try:
        return isinstance(json.loads(s), (dict, list))
    except ValueError:
        return False


# The arguments the constraints draw from
KEYWORDS = ("light", "quiet", "morning", "gold", "home", "journey", "silver", "dream", "warm", "together",
            "memory", "green", "simple", "window", "music", "hope")
FORBIDDEN = ("and", "very", "beautiful", "really", "just", "my", "we")  # none in KEYWORDS, OPENERS, ENDINGS
OPENERS = ("Today", "Once", "Imagine", "Listen", "Yes", "Dear", "Sometimes", "Every")
ENDINGS = ("Is there anything else I can help with?", "That is all.", "Thank you for reading.", "The end.",
           "See you soon.")



class Rule(NamedTuple):
    """A type of constraint: the sentence that asks for it ({0}, {1}: its arguments, each a
    word, a number or a quoted phrase), its checker, and draw(rng) -> its arguments."""
    sentence: str
    check: object
    draw: object = lambda rng: ()  # no arguments


def pick(*options):
    return lambda rng: (rng.choice(options),)


# The numbers are sized for answers of about 64 new tokens (some 50 words, often cut there):
# SmolLM2-135M-Instruct meets some of each, not all.
CONSTRAINTS = {
    "lowercase": Rule("Your entire answer must be in lowercase letters, with no capital letters at all.", lowercase),
    "capitals": Rule("Your entire answer must be in capital letters only.", capitals),
    "at_least_words": Rule("Answer in at least {0} words.", at_least_words, pick(20, 30, 40)),
    "at_most_words": Rule("Answer in at most {0} words.", at_most_words, pick(20, 30, 40)),
    "at_least_sentences": Rule("Write at least {0} sentences.", at_least_sentences, pick(2, 3)),
    "at_most_sentences": Rule("Use no more than {0} sentences.", at_most_sentences, pick(2, 3)),
    "keywords": Rule('Include the words "{0}" and "{1}" in your answer.', keywords,
                     lambda rng: tuple(rng.sample(KEYWORDS, 2))),
    "forbidden": Rule('Do not use the word "{0}" anywhere in your answer.', forbidden, pick(*FORBIDDEN)),
    "ends_with": Rule('End your answer with the exact phrase "{0}", with nothing after it.', ends_with,
                      pick(*ENDINGS)),
    "starts_with": Rule('Begin your answer with the word "{0}".', starts_with, pick(*OPENERS)),
    "bullets": Rule('Format your answer as exactly {0} bullet points, each on its own line starting with "* ".',
                    bullets, pick(2, 3)),
    "paragraphs": Rule("Write exactly {0} paragraphs, separated from each other by the markdown divider ***.",
                       paragraphs, pick(2, 3)),
    "title": Rule("Give your answer a title wrapped in double angular brackets, such as <<a title>>.", title),
    "no_commas": Rule("Do not use any commas in your answer.", no_commas),
    "quotes": Rule("Wrap your entire answer in double quotation marks.", quotes),
    "json": Rule("Format your entire answer as valid JSON.", json_answer),
}
# Pairs that contradict each other, or make each other ambiguous; a prompt holds neither pair.
CONFLICTS = {frozenset(p.split()) for p in (
    "lowercase capitals", "at_least_words at_most_words", "at_least_sentences at_most_sentences",
    "at_most_words at_least_sentences", "bullets paragraphs", "bullets at_most_sentences",
    "paragraphs at_most_sentences", "quotes title", "quotes ends_with", "quotes bullets", "quotes paragraphs",
    "title starts_with", "json bullets", "json paragraphs", "json title", "json quotes", "json ends_with",
    "json starts_with", "json no_commas", "json at_least_sentences", "json at_most_sentences")}


class Constraint(NamedTuple):
    name: str    # a key of CONSTRAINTS
    args: tuple  # its arguments: ints and strings

    @property
    def text(self):
        return CONSTRAINTS[self.name].sentence.format(*self.args)

    def met(self, answer):
        return bool(CONSTRAINTS[self.name].check(answer, *self.args))


# -----------------------------------------------------------------------------
# 3. Read back: the constraints a text states

def _pattern(sentence):
    # the sentence with its {i} slots as groups: a number, or anything up to the literal that follows
    parts = re.split(r"\{\d\}", sentence)
    return re.compile(r"(\d+|[^\n\"]+?)".join(re.escape(p) for p in parts))


PATTERNS = {name: _pattern(t.sentence) for name, t in CONSTRAINTS.items()}


def stated(text):
    """The constraints a text asks for in CONSTRAINTS' sentences, in the order it states them."""
    found = sorted((m.start(), name, tuple(int(a) if a.isdigit() else a for a in m.groups()))
                   for name, pattern in PATTERNS.items() for m in pattern.finditer(text))
    return [Constraint(name, args) for _, name, args in found]
