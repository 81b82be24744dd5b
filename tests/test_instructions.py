"""Tests for constraints.py and tasks/instructions.py: the constraint checkers, the
degenerate-answer rules, the judge, the held-out split; and the offline pairs the task's prompts
get, with their cache (pairs.py)."""

import itertools
import json
import os
import random

import pytest

import constraints as C
import pairs as P
from tasks import instructions as I
from data import judge_block
from files import TMP_PREFIX
from tokenizer import Templated
from conftest import extra

# ---------------------------------------------------------------- the constraint checkers

# name -> (args, answers that meet it, answers that do not), edge cases included
CASES = {
    "lowercase": ((), ["the sea is calm.", "ünïcode lower, 42!", "   \n", "élan and ß"],
                  ["The sea", "the sea is Calm", "all lower but Σ", "ÉLAN"]),
    "capitals": ((), ["THE SEA IS CALM!", "ÜBER 42", "<<TITLE>> * A"], ["THE SEA Is CALM", "é", "STRASSE ß"]),
    "at_least_words": ((3,), ["one two three", "don't stop now", "a b c d", "1 2 3"],
                       ["one two", "one, two!!! ...", "well-known", ""]),
    "at_most_words": ((3,), ["one two three", "one two   \n", "*** --- !!!", ""], ["one two three four", "a-b-c-d"]),
    "at_least_sentences": ((2,), ["One. Two.", "Wow! Really?", "Line one\nline two", "A.\n\nB"],
                           ["One sentence only.", "3.5 is a number.", "One.   ", "One. ***"]),
    "at_most_sentences": ((2,), ["One. Two.", "One sentence.", "One. ***\n!!!"], ["One. Two. Three.", "A\nB\nC"]),
    "keywords": (("light", "home"), ["Light comes home.", "the lights of homes", "HOME and LIGHT"],
                 ["lightly home", "light only", "homelight", ""]),
    "forbidden": (("very",), ["It was so calm.", "everyvery", "veryfine"], ["Very calm.", "so VERY", "the verys"]),
    "ends_with": (("That is all.",), ["Calm sea. That is all.", "calm. THAT IS ALL.  \n", "That is all."],
                  ["That is all. Bye.", "That is all", "That is all.\"", ""]),
    "starts_with": (("Today",), ["Today the sea.", "today, calm", "\"Today\" I said", "* **Today** it rained"],
                    ["Todays sea", "Yes. Today", "", "   "]),
    "bullets": ((2,), ["* one\n* two", "- one\n  * two\nend", "Intro:\n*\tone\n- two\n"],
                ["* one", "* one\n* two\n* three", "***\n* one", "**bold**\n* one", "1. one\n2. two", "*one\n*two"]),
    "paragraphs": ((2,), ["One.\n***\nTwo.", "One *** Two", "  a\n\n***\n\nb  \n"],
                   ["One.\n***\nTwo.\n***", "***\nOne.\n***\nTwo.", "One.\n***\n***\nTwo.", "One. Two.",
                    "One\n***\n!!!"]),
    "title": ((), ["<<The Sea>>\nCalm.", "Text <<sea>> text", "<<Ünïcode>>"], ["<< >>", "<<>>", "<<a\nb>>", "<The Sea>"]),
    "no_commas": ((), ["No commas here.", "", "semi; colon"], ["One, two", "full，width"]),
    "quotes": ((), ['"The sea."', '  "x"\n', "“The sea.”", '"a "b" c"'],
               ['"', 'The "sea"', '"The sea.', "“The sea.“", "'The sea.'"]),
    "json": ((), ['{"poem": "the sea"}', "[1, 2]", '```json\n{"a": 1}\n```', "```\n[]\n```", ' {"a": "ü"} \n'],
             ['"just a string"', "42", '{"a": 1', "{'a': 1}", "", "Here: {\"a\": 1}"]),
}


def test_every_constraint_type_is_tested():
    assert set(CASES) == set(C.CONSTRAINTS)
    assert len(C.CONSTRAINTS) >= 10


@pytest.mark.parametrize("name", sorted(CASES))
def test_checker(name):
    args, good, bad = CASES[name]
    c = C.Constraint(name, args)
    for answer in good:
        assert c.met(answer), (name, answer)
    for answer in bad:
        assert not c.met(answer), (name, answer)


def test_words_and_sentences():
    assert C.words("Don't stop: it's 3.5 km, well-known… café!") == ["Don't", "stop", "it's", "3", "5", "km", "well",
                                                                       "known", "café"]
    assert C.words("*** -- !!! <<>>") == [] and C.words("") == []
    assert C.sentences("One. Two!  Three?! four") == ["One.", "Two!", "Three?!", "four"]
    assert C.sentences("<<Title>>\n\n* a\n* b.") == ["<<Title>>", "* a", "* b."]
    assert C.sentences("It cost 3.5 dollars.") == ["It cost 3.5 dollars."]


def test_conflicting_types_never_meet_together():
    # each pair of CONFLICTS is refused because no answer could meet both, or none obviously
    assert not any(C.lowercase(a) and C.capitals(a) for a in ["A", "a", "Ab"])
    assert frozenset({"json", "quotes"}) in C.CONFLICTS and frozenset({"lowercase", "capitals"}) in C.CONFLICTS
    for size in (2, 3):
        for combo in I.combinations(size):
            assert not any({a, b} <= set(combo) for pair in C.CONFLICTS for a, b in [tuple(pair)])


def test_argument_lists_do_not_contradict():
    # a forbidden word is never one that another constraint asks for
    asked = set(C.KEYWORDS) | {w.lower() for w in C.OPENERS} | {w.lower() for e in C.ENDINGS for w in C.words(e)}
    assert not asked & set(C.FORBIDDEN)


# ---------------------------------------------------------------- degenerate answers

def req(topic="the ocean", *constraints):
    return I.Request("a short poem", topic, list(constraints) or [C.Constraint("no_commas", ())])


def test_empty_answers_are_degenerate():
    for answer in ["", "   \n\t", "*** !!! ...", "<<>>"]:
        assert I.degenerate(req(), answer) == "empty"


def test_off_topic_answers_are_degenerate():
    r = req("the ocean")
    assert I.degenerate(r, "A quiet poem about nothing at all.") == "off topic"
    assert I.off_topic(r, "The theocean word glued.")  # a word must start with the stem
    for answer in ["The OCEAN sleeps.", "Oceans rise.", "oceanic calm", "The sea is calm.", "Waves break."]:
        assert not I.off_topic(r, answer), answer
    forest = req("a forest")
    assert not I.off_topic(forest, "Forests grow.") and not I.off_topic(forest, "Trees grow.")
    assert I.off_topic(forest, "I will love you forever.")  # 'forest' needs its first 5 letters
    assert not I.off_topic(req("a city at night"), "Cities sleep.")  # listed after the topic's "|"
    bees = req("honey bees")
    assert not I.off_topic(bees, "A bee hums.") and not I.off_topic(bees, "Honeys drip.")
    assert I.off_topic(bees, "It has been long.")  # a word under 5 letters: itself or a plural
    assert I.off_topic(req("green tea"), "My teacher sings.")
    assert I.off_topic(req("an old library"), "An old room.")  # stopwords do not count
    assert I.topic_words("purple umbrellas") == ["purple", "umbrellas"]  # a topic not in TOPICS


def test_repetitive_answers_are_degenerate():
    r = req()
    assert I.degenerate(r, "ocean ocean ocean ocean") == "repetitive"
    assert I.repetitive(r, "ocean, ocean, ocean and sea")  # one word > half
    loop = "The ocean is a vast and quiet place. " * 3
    assert I.degenerate(r, loop) == "repetitive"
    assert not I.repetitive(r, "The ocean is a vast and quiet place. " * 2)  # said twice: 5 of 13 repeat
    refrain = ("The ocean sings at night. Its waves roll in and out. The ocean sings at night. "
               "Sailors listen from the shore and dream of distant lands far away from home.")
    assert I.degenerate(r, refrain) is None
    assert not I.repetitive(r, "ocean ocean sea")  # under 4 words: the share rule does not apply
    assert I.degenerate(r, "<<The Ocean>>\n\n**The Ocean**\n" + "****\n\n" * 5) == "repetitive"  # 4 of 7 lines repeat
    assert not I.repetitive(r, "<<The Ocean>>\n****\nThe sea.\n****\nWaves.")  # 1 of 5 lines repeats


# ---------------------------------------------------------------- real answers the new checks must tell apart
# Every answer below is SmolLM2-135M-Instruct's (models/SmolLM2-135M-Instruct), verbatim, to a
# TRAINING prompt of the task: task seed 0, chunk c (64 prompts a chunk, as the recipe draws
# them), prompt i, cut at 48 new tokens (the recipe's --max-new-tokens), sampled through
# runtime.sample_responses: "greedy" at temperature 0, or "sample k" at temperature 1 with
# pairs.answer_seed(c, k-1), the draws pairs.own_pairs makes the offline pairs of.

TITLE_PROMPTS = {  # (chunk, prompt index): prompt
    (0, 34): "Write a blog post about a robot. Give your answer a title wrapped in double angular brackets, such as "
             "<<a title>>. Your entire answer must be in capital letters only.",
    (1, 39): "Write a short essay about the stars. Give your answer a title wrapped in double angular brackets, "
             "such as <<a title>>. Use no more than 2 sentences.",
    (2, 49): "Write a letter to a friend about a castle. Give your answer a title wrapped in double angular brackets, "
             "such as <<a title>>.",
    (0, 52): "Write a news report about a robot. Give your answer a title wrapped in double angular brackets, such as "
             "<<a title>>. Answer in at most 30 words. Your entire answer must be in capital letters only.",
    (2, 21): "Write a song about honey bees. Give your answer a title wrapped in double angular brackets, such as "
             "<<a title>>.",
}


def real(prompts, where, answer):
    return I.parse_prompt(prompts[where]), answer


def test_a_title_copied_from_the_prompt_s_example_is_degenerate():
    copied = [
        real(TITLE_PROMPTS, (0, 34), "<<a title>>\n\nA robot that defies the boundaries of traditional robotics and "
                                     "artificial intelligence."),  # greedy
        real(TITLE_PROMPTS, (1, 39), "<<a title>>\n\nIn the vast expanse of the night sky, the stars hold a place of "
             "infinite beauty and mystery. These celestial bodies, with their unique blend of light and gravity, have "
             "captivated humanity for centuries. From the majestic"),  # greedy: on topic, long, and still copied
        real(TITLE_PROMPTS, (2, 49), "<<a title>>: A Castle\n\nYour friend is a brave and loyal knight, and I am a "
             "humble servant of the castle. I am here to share a tale of bravery and honor with you.\n\nThe castle "
             "is a"),  # greedy
    ]
    for r, answer in copied:
        assert I.placeholder_title(r, answer) and I.degenerate(r, answer) == "placeholder title", answer
        assert C.title(answer)  # what the title constraint alone would have credited
    own = [
        real(TITLE_PROMPTS, (0, 34), "<<Scientific Lirakshundras – Robot News>>\n\nThe robot is named Zekker and it "
             "is a small robotics device designed to assist in the field of biology, specifically cell division and "
             "cell plasticity, which is essential for"),  # sample 1
        real(TITLE_PROMPTS, (0, 52), "<<A Robot Reports in Hurricane] <<A Title RubricErrorm"),  # sample 2: no title
        real(TITLE_PROMPTS, (2, 21), "<<a virus to love>>"),  # sample 1: its own title, if a stub
    ]
    for r, answer in own:
        assert not I.placeholder_title(r, answer), answer
    assert I.degenerate(*own[0]) is None


def test_an_answer_that_is_mostly_the_request_is_degenerate():
    restated = [  # (chunk, prompt index, how sampled): prompt, answer
        ("Write a news report about honey bees. Answer in at most 20 words.",  # chunk 2, prompt 18, greedy
         "A news report about honey bees:\n\nA news report about honey bees:\n\n#Bees #HoneyBees #HoneyBees "
         "#BeesInTheCity #BeesInTheCity #BeesInTheCity"),
        ("Write an advertisement about a castle. Your entire answer must be in lowercase letters, with no capital "
         "letters at all.",  # chunk 0, prompt 27, sample 4: the constraint, its words barely changed
         "A Caracac Amau Carib\nYour entire answer must be in lowercase letters, with no capital letters."),
    ]
    for prompt, answer in restated:
        r = I.parse_prompt(prompt)
        assert I.restates(r, answer) and I.degenerate(r, answer) == "restates the request", answer
    own = [
        ("Write a song about a dragon. Format your answer as exactly 3 bullet points, each on its own line starting "
         'with "* ".',  # chunk 0, prompt 19, sample 1: a third of its words are the request's
         "To create a song about a dragon with just 3 bullet points, I would like this format:\n\n* ***song Forbidden* "
         "**:\n* ****dragon Engines* **** of embSyn*"),
        ("Write a letter to a friend about a snowman. Write exactly 3 paragraphs, separated from each other by the "
         "markdown divider ***. Answer in at most 20 words. Your entire answer must be in lowercase letters, with no "
         "capital letters at all.",  # chunk 2, prompt 16, greedy
         "<<Snowman Letter to a Friend>>\n\nDear [Your Name],\n\nI hope this letter finds you well. I am writing to a "
         "friend who loves snow. I am writing to a friend who loves snow.\n\nI"),
        ('Write a blog post about homemade soup. End your answer with the exact phrase "See you soon.", with nothing '
         'after it. Begin your answer with the word "Imagine".',  # chunk 2, prompt 22, sample 1: the phrase it was
         "*See you soon.*"),  # asked to use is not the request (off topic instead: no soup in it)
    ]
    for prompt, answer in own:
        assert not I.restates(I.parse_prompt(prompt), answer), answer
    ocean = I.parse_prompt("Write a short poem about the ocean. Your entire answer must be in lowercase letters, with "
                           "no capital letters at all.")  # and one made up: the request with a few words changed
    assert I.restates(ocean, "Here is a short poem about the ocean in lowercase letters")
    assert I.degenerate(I.parse_prompt(own[2][0]), own[2][1]) == "off topic"


def test_a_stub_where_a_piece_of_writing_was_asked_is_degenerate():
    stubs = [
        ("Write a product description about a lost cat. Answer in at most 40 words.",  # chunk 0, prompt 12, greedy
         "The Lost Cat: A Memory of Hope"),
        ("Write a fable about honey bees. Your entire answer must be in lowercase letters, with no capital letters "
         "at all.", "The Honey Bee: A Fable of Honey Bees"),  # chunk 1, prompt 52, greedy
        ('Write a news report about a dragon. Do not use the word "just" anywhere in your answer. Do not use any '
         "commas in your answer. Answer in at most 20 words.", "A dragon, no less."),  # chunk 1, prompt 47, greedy
        ("Write a news report about the stars. Your entire answer must be in capital letters only. Answer in at "
         "most 40 words. Do not use any commas in your answer.",  # chunk 1, prompt 22, greedy
         "The stars are a celestial phenomenon that has captivated humanity for centuries."),
        ('Write a product description about the ocean. End your answer with the exact phrase "The end.", with '
         "nothing after it.", "enslave to the ocean. The end."),  # chunk 0, prompt 6, sample 2
        (TITLE_PROMPTS[0, 52], "<<Transforming Robots: A Robotics Innovator Guide>>"),  # chunk 0, prompt 52, sample 1
    ]
    for prompt, answer in stubs:
        r = I.parse_prompt(prompt)
        assert I.stub(r, answer) and I.degenerate(r, answer) == "stub", answer
        assert not I.off_topic(r, answer) and not I.repetitive(r, answer)  # the old judge credited them
    pieces = [
        ("Write a news report about a castle. Answer in at most 20 words.",  # chunk 0, prompt 54, greedy: 13
         "A brave knight sets sail for a castle, ready to protect the realm."),  # words, over half the cap of 20
        ("Write a short speech about the northern lights. Do not use any commas in your answer. Use no more than 2 "
         "sentences.",  # chunk 0, prompt 9, sample 1: 20 words, the fewest a speech needs
         "The Northern Lights are a breathtaking sight spectacularly visible in the night sky, a spectacular "
         "highlight of the Northern Hemisphere."),
        ('Write a short poem about summer holidays. Your entire answer must be in lowercase letters, with no '
         'capital letters at all. Do not use the word "really" anywhere in your answer.',  # chunk 0, prompt 62, greedy
         "Summer holidays are a time of joy and celebration, filled with endless possibilities.\n\nIn the heart of "
         "the year,\nA summer holiday, a moment to cherish.\nThe warmth of the sun, the laughter,\nThe love,"),
    ]
    for prompt, answer in pieces:
        r = I.parse_prompt(prompt)
        assert not I.stub(r, answer) and I.degenerate(r, answer) is None, answer


# ---------------------------------------------------------------- prompts and the judge

def test_prompt_reads_back():
    cs = [C.Constraint("ends_with", ("Is there anything else I can help with?",)), C.Constraint("at_most_words", (30,)),
          C.Constraint("keywords", ("gold", "home")), C.Constraint("lowercase", ())]
    p = I.make_prompt("a short poem", "a grandmother's kitchen", cs)
    assert p.startswith("Write a short poem about a grandmother's kitchen. End your answer with the exact phrase")
    assert I.parse_prompt(p) == I.Request("a short poem", "a grandmother's kitchen", cs)
    for prompt in I.make_task(seed=3, n_prompts_per_chunk=100, n_chunks=2, n_eval=100).eval:
        r = I.parse_prompt(prompt)
        assert I.make_prompt(r.kind, r.topic, r.constraints) == prompt


def test_rendered_prompts_read_as_plain_ones():
    p = I.make_prompt("a fable", "the moon", [C.Constraint("title", ()), C.Constraint("at_least_words", (20,))])
    rendered = f"<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
    templated = Templated(rendered, [{"role": "system", "content": "Answer."}, {"role": "user", "content": p}])
    assert I.parse_prompt(rendered) == I.parse_prompt(templated) == I.parse_prompt(p)
    with pytest.raises(ValueError, match="states no constraint this judge can check"):
        I.parse_prompt("sort: dcba\n")
    with pytest.raises(ValueError, match="states no constraint this judge can check"):
        I.parse_prompt("Write a short poem about the moon.")  # no constraint


def test_a_users_own_prompt_is_judged_on_the_constraints_it_states():
    """README's haiku prompt: not one of the task's kinds of writing, one constraint the judge
    reads; a prompt without "Write ... about ..." has no topic to be off."""
    haiku = "Write a haiku about tea. Your entire answer must be in lowercase letters, with no capital letters at all."
    assert I.parse_prompt(haiku) == I.Request("a haiku", "tea", [C.Constraint("lowercase", ())])
    assert I.judge(haiku, ["steam above the tea", "Steam above the tea", "steam above the cup"]) == [1.0, 0.0, 0.0]
    joke = "Tell me a joke. Answer in at most 30 words. Do not use any commas in your answer."
    assert I.parse_prompt(joke).topic is None
    assert I.judge(joke, ["a pun about nothing at all", "well, a pun"]) == [1.0, 0.5]
    assert I.ifeval_metrics([joke], ["well, a pun"])["instruction_accuracy"] == 0.5
    with pytest.raises(ValueError) as e:
        I.judge("Tell me a joke.", ["ha"])
    assert "\n" not in str(e.value) and "'Tell me a joke.' states no constraint" in str(e.value)


def test_judge_scores_the_share_of_constraints_met():
    p = I.make_prompt("a short poem", "the ocean", [C.Constraint("lowercase", ()), C.Constraint("no_commas", ()),
                                                    C.Constraint("at_most_words", (8,))])
    answers = ["the ocean hums below the moon", "The ocean hums below the moon", "The ocean, hums below the moon",
               "The ocean, hums below the pale and silver quiet moon", "", "the moon hums", "the ocean " * 5]
    assert I.judge(p, answers) == [1.0, 2 / 3, 1 / 3, 0.0, 0.0, 0.0, 0.0]


# Fifteen words without a comma or a capital letter, to make an answer long enough to be a song
# (instructions.MIN_WORDS) where a test is about something else
VERSE = " steam rises from the cup while rain taps softly on the kitchen window at dusk"


def test_ifeval_metrics():
    p1 = I.make_prompt("a song", "tea", [C.Constraint("no_commas", ()), C.Constraint("title", ())])
    p2 = I.make_prompt("a song", "tea", [C.Constraint("capitals", ())])
    m = I.ifeval_metrics([p1, p2, p2], ["<<Tea>> tea is warm" + VERSE, "TEA, HOT" + VERSE.upper(), "tea"])
    assert m == {"prompt_accuracy": 2 / 3, "instruction_accuracy": 3 / 4, "score": (1 + 1 + 0) / 3}
    m = I.ifeval_metrics([p1, p2], ["Tea, <<x>>" + VERSE, ""])
    assert m == {"prompt_accuracy": 0.0, "instruction_accuracy": 1 / 3, "score": 0.25}


# ---------------------------------------------------------------- the task and its held-out split

@pytest.fixture(scope="module")
def task():
    return I.make_task(seed=0, n_prompts_per_chunk=300, n_chunks=3, n_eval=300)


def test_held_out_topics_and_combinations_never_train(task):
    train = [I.parse_prompt(p) for c in task.chunks for p in c]
    held = [I.parse_prompt(p) for p in task.eval]
    key = lambda r: I.combination_key(c.name for c in r.constraints)  # noqa: E731
    assert not {r.topic for r in train} & {r.topic for r in held}
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert all(I.is_eval(r.topic) and I.is_eval(key(r)) for r in held)
    assert {len(r.constraints) for r in held} == {1, 2, 3} == {len(r.constraints) for r in train}
    flat = [p for c in task.chunks for p in c]
    assert len(set(flat)) == len(flat) and len(set(task.eval)) == len(task.eval)
    assert len(task.chunks) == 3 and all(len(c) == 300 for c in task.chunks) and len(task.eval) == 300
    used = {c.name for r in train for c in r.constraints}
    assert used == set(C.CONSTRAINTS)  # every type is trained, in some combination


def test_task_is_deterministic(task):
    again = I.make_task(seed=0, n_prompts_per_chunk=300, n_chunks=3, n_eval=300)
    assert (again.chunks, again.eval) == (task.chunks, task.eval)
    other = I.make_task(seed=1, n_prompts_per_chunk=300, n_chunks=3, n_eval=300)
    assert other.chunks[0] != task.chunks[0] and other.eval != task.eval
    fewer = I.make_task(seed=0, n_prompts_per_chunk=300, n_chunks=3, n_eval=10)
    assert fewer.chunks == task.chunks and fewer.eval == task.eval[:10]
    with pytest.raises(ValueError, match="max_constraints"):
        I.make_task(max_constraints=4)


def test_task_from_some_constraint_types():
    types = ["title", "no_commas", "keywords", "forbidden", "at_least_words"]
    t = I.make_task(seed=2, n_prompts_per_chunk=50, n_chunks=2, n_eval=50, types=types)
    used = {c.name for p in t.eval + t.chunks[0] + t.chunks[1] for c in I.parse_prompt(p).constraints}
    assert used == set(types)
    with pytest.raises(ValueError, match="types"):
        I.make_task(types=["title", "bold"])
    with pytest.raises(ValueError, match="fewer than 2000 distinct training prompts"):
        I.make_task(n_prompts_per_chunk=2000, n_chunks=1, max_constraints=1, types=["title", "no_commas"])
    with pytest.raises(ValueError, match="no held-out combination"):
        I.make_task(max_constraints=1, types=["title", "no_commas"])


# ---------------------------------------------------------------- offline pairs and their cache

def fake_sampler(calls):
    """Answers of known scores: for a prompt whose topic is 'the ocean' every answer ties."""
    def sample(prompts, k, seed):
        calls.append((len(prompts), k, seed))
        out = []
        for p in prompts:
            topic = I.parse_prompt(p).topic
            if topic == "the ocean":
                out.append([f"no {i}" for i in range(k)])  # all off topic: all 0, a tie
            else:
                out.append([f"{topic} plain {seed}{VERSE}", f"{topic}, {seed}, comma{VERSE}",
                            f"{topic} bare {seed}{VERSE}", ""][:k])
        return out
    return sample


def score(prompts, answers):  # the instruction task's judge over a block, as pairs.own_pairs has it judge
    return judge_block(I.judge, list(zip(prompts, answers)))


def cached_pairs(*args, **kw):  # the pairs of each chunk
    return P.cached_pairs(*args, score=score, **kw).chunks


def build_pairs(*args, **kw):
    return P.build_pairs(*args, score=score, **kw)


def prompts_of(*topics):
    return [I.make_prompt("a song", t, [C.Constraint("no_commas", ())]) for t in topics]


def test_build_pairs_keeps_best_and_worst_and_drops_ties():
    calls = []
    pairs, dropped = build_pairs(prompts_of("tea", "the ocean", "a kite"), fake_sampler(calls), k=4, seed=7)
    assert calls == [(3, 4, 7)] and dropped == 1
    assert [e["prompt"] for e in pairs] == prompts_of("tea", "a kite")
    assert pairs[0] == {"prompt": prompts_of("tea")[0], "chosen": "tea plain 7" + VERSE,
                        "rejected": "tea, 7, comma" + VERSE,
                        "chosen_score": 1.0, "rejected_score": 0.0,  # first of the equal best and worst
                        "chosen_finished": True, "rejected_finished": True}
    with pytest.raises(ValueError, match="4 answers"):
        build_pairs(prompts_of("tea"), lambda ps, k, s: [["one"]], k=4)


def test_a_cut_off_answer_loses_its_place_to_the_missing_eos_penalty():
    """The best-scored answer was cut off (an Unfinished): with a penalty of 1 the best finished
    answer becomes chosen, the cut-off one rejected; the scores kept are the judge's own."""
    def sample(prompts, k, seed):
        return [[P.Unfinished(f"{I.parse_prompt(p).topic} plain{VERSE}"), f"{I.parse_prompt(p).topic}, a comma{VERSE}",
                 f"{I.parse_prompt(p).topic} bare{VERSE}"] for p in prompts]
    plain, _ = build_pairs(prompts_of("tea"), sample, k=3)
    assert plain[0]["chosen"] == "tea plain" + VERSE and not plain[0]["chosen_finished"]
    fair, _ = build_pairs(prompts_of("tea"), sample, k=3, penalty=1.0)
    assert fair[0]["chosen"] == "tea bare" + VERSE and fair[0]["chosen_finished"]
    assert fair[0]["rejected"] == "tea plain" + VERSE and not fair[0]["rejected_finished"]
    assert (fair[0]["chosen_score"], fair[0]["rejected_score"]) == (1.0, 1.0)


def test_pairs_are_cached_and_rebuilt_when_settings_change(tmp_path):
    chunks = [prompts_of("tea", "the ocean"), prompts_of("a kite", "coffee")]
    calls = []
    first = cached_pairs(str(tmp_path), chunks, fake_sampler(calls), k=3, seed=5, settings={"model": "m"})
    assert calls == [(2, 3, 5), (2, 3, 6)]  # chunk i sampled with seed + i
    assert [[e["prompt"] for e in c] for c in first] == [prompts_of("tea"), prompts_of("a kite", "coffee")]
    path = tmp_path / P.PAIRS_FILE
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["settings"]["model"] == "m" and lines[0]["dropped"] == [1, 0]
    (tmp_path / "plain").write_bytes(b"")  # the permissions open() gives under this umask, not mkstemp's 0600
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    again = P.cached_pairs(str(tmp_path), chunks, fake_sampler(calls), k=3, seed=5, settings={"model": "m"},
                           score=score)
    assert again == (first, [1, 0]) and len(calls) == 2  # reused, prompts dropped for a tie too: no sampling
    assert cached_pairs(str(tmp_path), chunks[:1], fake_sampler(calls), k=3, seed=5, settings={"model": "m"}) \
        == first[:1] and len(calls) == 2  # fewer iterations: the first chunks of the file serve
    for change in [dict(k=4), dict(seed=6), dict(settings={"model": "other"}), dict(chunks=chunks[::-1]),
                   dict(penalty=1.0)]:
        kw = dict(chunks=chunks, k=3, seed=5, settings={"model": "m"}) | change
        n = len(calls)
        cached_pairs(str(tmp_path), sample=fake_sampler(calls), **kw)
        assert len(calls) == n + 2, change  # rebuilt
    assert not [f for f in os.listdir(tmp_path) if f.startswith(TMP_PREFIX)]


def test_a_damaged_pairs_file_is_refused_never_read_nor_replaced(tmp_path):
    """The issue's case, a file cut to its header and two pairs, was read as valid: the file is
    checked whole (the count of pairs, their checksum, each pair's fields)."""
    from data import DataError
    chunks = [prompts_of("tea", "a kite", "coffee")]
    whole = cached_pairs(str(tmp_path), chunks, fake_sampler([]), k=2)
    path = tmp_path / P.PAIRS_FILE
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    edited = json.loads(lines[2]) | {"chosen": "changed"}
    bad_field = json.loads(lines[1]) | {"chosen_finished": "yes"}
    header = json.loads(lines[0])
    relabelled = json.dumps(header | {"sha256": P.checksum([bad_field] + [json.loads(x) for x in lines[2:]])})
    for text, damage in [("".join(lines[:3]), "its header counts 3 pairs, it holds 2"),
                         (lines[0] + lines[1] + json.dumps(edited) + "\n" + lines[3],
                          "its pairs do not match its checksum"),
                         (relabelled + "\n" + json.dumps(bad_field) + "\n" + "".join(lines[2:]),
                          "a pair lacks a field")]:
        path.write_text(text)
        with pytest.raises(DataError) as e:
            cached_pairs(str(tmp_path), chunks, fake_sampler([]), k=2)
        assert str(e.value) == f"{path}: damaged ({damage}); remove it to build the pairs again"
        assert path.read_text() == text  # neither read nor replaced
    path.write_text('{"not": "a cache of selm\'s"}\n')
    with pytest.raises(DataError, match="not a pairs file of selm's"):
        cached_pairs(str(tmp_path), chunks, fake_sampler([]), k=2)
    path.write_text("".join(lines))
    assert cached_pairs(str(tmp_path), chunks, fake_sampler([]), k=2) == whole


def test_answers_cut_off_stay_unfinished(tmp_path):
    """An answer the sampler cut off at its token limit is recorded so, kept in the cache, and
    rendered as an unfinished turn that encode_response ends with no EOS (as a y_ref)."""
    extra("jinja2", "chat templates need jinja2")
    import chat
    from chat_dirs import QWEN25_TEMPLATE

    def sample(prompts, k, seed):  # the best answer (no comma) was cut off
        topics = [I.parse_prompt(p).topic for p in prompts]
        return [[P.Unfinished(f"{t} plain" + VERSE), f"{t}, comma" + VERSE] for t in topics]
    chunks = [prompts_of("tea")]
    pairs = cached_pairs(str(tmp_path), chunks, sample, k=2)
    assert [(e["chosen_finished"], e["rejected_finished"]) for e in pairs[0]] == [(False, True)]
    assert cached_pairs(str(tmp_path), chunks, None, k=2) == pairs  # from the cache, as it was
    template = chat.ChatTemplate(QWEN25_TEMPLATE, "test", {"eos_token": "<|im_end|>"}, "<|im_end|>")
    e = P.rendered(pairs, template)[0][0]
    assert (e["chosen"], e["chosen"].finished, e["rejected"].finished) == ("tea plain" + VERSE, False, True)

    class Tok:  # encode_response as tokenizer.Tokenizer has it, on characters
        eos_id = 0
        encode = staticmethod(lambda text, allow_special=False: [ord(c) for c in text])
    from tokenizer import Tokenizer
    assert Tokenizer.encode_response(Tok, e["chosen"]) == [ord(c) for c in "tea plain" + VERSE]
    assert Tokenizer.encode_response(Tok, e["rejected"])[-1] == 0


def test_the_pairs_cache_keys_on_the_judges_rules_wherever_they_live():
    """A change to the checkers changes the judge: the cache's "rules" digest reads constraints.py
    as well as the task's own file (pairs.pair_settings)."""
    files = P.code_files(vars(I))
    assert {os.path.abspath(C.__file__), os.path.abspath(I.__file__)} <= set(files)
    assert not [f for f in files if "torch" in f or f.endswith("inputs.py")]


def test_the_task_renders_one_user_turn():
    """Through the Task door (inputs.task_data): the task's prompts stay plain in their chunks
    until the starting model answers them, its held-out prompts and the pairs made later are one
    user turn in the chat template, judged by the task's judge, with IFEval's figures."""
    extra("jinja2", "chat templates need jinja2")
    import types

    import chat
    import inputs
    from chat_dirs import QWEN25_TEMPLATE
    template = chat.ChatTemplate(QWEN25_TEMPLATE, "test", {"eos_token": "<|im_end|>"}, "<|im_end|>")
    cfg = types.SimpleNamespace(task="instructions", task_seed=3, chunk_size=2, iterations=1, n_eval=2, sft_steps=0)
    d = inputs.task_data(cfg, template)
    assert d.builtin and d.conversational and d.judge is I.judge and d.sft == [] and d.metrics is I.accuracies
    task = I.make_task(seed=3, n_prompts_per_chunk=2, n_chunks=2, n_eval=2)
    assert d.chunks == task.chunks and inputs.awaiting_pairs(d)
    e = d.eval[0]
    assert e["prompt"].messages == [{"role": "user", "content": task.eval[0]}] and e["reference"] is None
    assert e["prompt"].endswith("<|im_start|>assistant\n")
    p = prompts_of("tea")[0]
    r = P.rendered([[{"prompt": p, "chosen": "tea plain", "rejected": "tea, comma"}]], template)[0][0]
    assert r["prompt"].messages == [{"role": "user", "content": p}] and r["prompt"].endswith("<|im_start|>assistant\n")
    assert (r["chosen"], r["rejected"]) == ("tea plain", "tea, comma")
    assert d.judge(r["prompt"], ["tea plain" + VERSE, "x"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="--task instructions has no SFT data: --sft-steps must be 0"):
        inputs.task_data(types.SimpleNamespace(**{**vars(cfg), "sft_steps": 5}), template)


# ---------------------------------------------------------------- every generated prompt can be met

# Distinct words that are none of FORBIDDEN, KEYWORDS or a topic's, hold no comma, and never
# make a run of three words that a prompt holds
FILLER = ("quiet tides carry pale stones past gulls circling above harbour lanterns glowing over wet quays "
          "while sailors mend nets beneath amber skies near crooked piers as distant bells ring softly through "
          "salt air toward hills where shepherds gather sheep before dusk settles across fields").split()


def satisfying(r):
    """An answer that meets every constraint of request r and that the judge does not call
    degenerate, built from r alone: the fewest words of FILLER that reach the answer's
    minimum (at least N words, or min_words), in as many sentences as asked, grouped into the
    bullets or paragraphs asked, then titled, quoted, put in JSON, and cased."""
    args = {c.name: c.args for c in r.constraints}
    units = args.get("bullets", args.get("paragraphs", (1,)))[0]
    n_sentences = max(units, *args.get("at_least_sentences", (1,)))

    def answer(n):  # with the first n words of FILLER; each adds one word to the answer
        body = [*args.get("starts_with", ()), I.topic_words(r.topic)[0], *args.get("keywords", ()), *FILLER[:n]]
        said = [" ".join(body[i * len(body) // n_sentences:(i + 1) * len(body) // n_sentences])
                for i in range(n_sentences)]
        if "ends_with" in args:  # the last sentence runs into the phrase, which then adds no sentence of its own
            said[-1] += " " + args["ends_with"][0]
        said = [s if s.endswith((".", "?")) else s + "." for s in said]
        pieces = [" ".join(said[u * n_sentences // units:(u + 1) * n_sentences // units]) for u in range(units)]
        text = "\n".join(f"* {p}" for p in pieces) if "bullets" in args else "\n***\n".join(pieces)
        if "title" in args:
            text = f"<<{I.topic_words(r.topic)[0]} at dusk>>\n{text}"
        if "quotes" in args:
            text = f'"{text}"'
        if "json" in args:
            text = json.dumps({"text": text})
        return text.lower() if "lowercase" in args else text.upper() if "capitals" in args else text
    low = max(I.min_words(r), *args.get("at_least_words", (0,)))
    base = n_sentences  # FILLER words enough for every sentence to hold one
    return answer(max(base, base + low - len(C.words(answer(base)))))


def every_request():
    """Every combination of 1-3 constraint types the task can draw (training and held out),
    for every kind of writing, with every value of each numeric argument and every ending,
    the other arguments and the topic cycled."""
    values = {"at_least_words": (20, 30, 40), "at_most_words": (20, 30, 40), "at_least_sentences": (2, 3),
              "at_most_sentences": (2, 3), "bullets": (2, 3), "paragraphs": (2, 3), "ends_with": C.ENDINGS}
    drawn = {name: {rule.draw(random.Random(seed)) for seed in range(200)} for name, rule in C.CONSTRAINTS.items()}
    for name, choices in values.items():  # the generator's ranges are these: a new value must be added here
        assert drawn[name] == {(v,) for v in choices}, name
    topics = itertools.cycle(t.split("|")[0] for t in I.TOPICS)
    others = {name: itertools.cycle(sorted(drawn[name])) for name in C.CONSTRAINTS}
    for size in (1, 2, 3):
        for combo in I.combinations(size):
            for kind in I.KINDS:
                for picked in itertools.product(*[[(v,) for v in values[n]] if n in values else [next(others[n])]
                                                  for n in combo]):
                    yield I.Request(kind, next(topics), [C.Constraint(n, a) for n, a in zip(combo, picked)])


def test_every_generated_prompt_can_be_met_by_an_answer_the_judge_accepts():
    """The degenerate checks ask for no more than the constraints allow: for every request the
    task can generate there is an answer that meets all of its constraints and that no check
    calls degenerate (a stub's minimum under "at most 20 words", a title under a cap ...)."""
    n = 0
    for r in every_request():
        answer = satisfying(r)
        assert I.degenerate(r, answer) is None and all(c.met(answer) for c in r.constraints), (r, answer)
        n += 1
    assert n > 20_000


def test_the_fewest_words_each_kind_needs_fit_under_every_word_cap():
    r = I.Request("a short story", "a kite", [C.Constraint("at_most_words", (20,))])
    assert I.min_words(r) == 10 and I.min_words(r._replace(constraints=[])) == I.MIN_WORDS["a short story"]
    assert set(I.MIN_WORDS) == set(I.KINDS)
