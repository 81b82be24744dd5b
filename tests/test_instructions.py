"""Tests for instructions.py: the constraint checkers, the degenerate-answer rules, the judge,
the held-out split, and the offline pairs with their cache."""

import json
import os

import pytest

import instructions as I
from data import TMP_PREFIX
from tokenizer import Templated

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
    assert set(CASES) == set(I.CONSTRAINTS)
    assert len(I.CONSTRAINTS) >= 10


@pytest.mark.parametrize("name", sorted(CASES))
def test_checker(name):
    args, good, bad = CASES[name]
    c = I.Constraint(name, args)
    for answer in good:
        assert c.met(answer), (name, answer)
    for answer in bad:
        assert not c.met(answer), (name, answer)


def test_words_and_sentences():
    assert I.words("Don't stop: it's 3.5 km, well-known… café!") == ["Don't", "stop", "it's", "3", "5", "km", "well",
                                                                       "known", "café"]
    assert I.words("*** -- !!! <<>>") == [] and I.words("") == []
    assert I.sentences("One. Two!  Three?! four") == ["One.", "Two!", "Three?!", "four"]
    assert I.sentences("<<Title>>\n\n* a\n* b.") == ["<<Title>>", "* a", "* b."]
    assert I.sentences("It cost 3.5 dollars.") == ["It cost 3.5 dollars."]


def test_conflicting_types_never_meet_together():
    # each pair of CONFLICTS is refused because no answer could meet both, or none obviously
    assert not any(I.lowercase(a) and I.capitals(a) for a in ["A", "a", "Ab"])
    assert frozenset({"json", "quotes"}) in I.CONFLICTS and frozenset({"lowercase", "capitals"}) in I.CONFLICTS
    for size in (2, 3):
        for combo in I.combinations(size):
            assert not any({a, b} <= set(combo) for pair in I.CONFLICTS for a, b in [tuple(pair)])


def test_argument_lists_do_not_contradict():
    # a forbidden word is never one that another constraint asks for
    asked = set(I.KEYWORDS) | {w.lower() for w in I.OPENERS} | {w.lower() for e in I.ENDINGS for w in I.words(e)}
    assert not asked & set(I.FORBIDDEN)


# ---------------------------------------------------------------- degenerate answers

def req(topic="the ocean", *constraints):
    return I.Request("a short poem", topic, list(constraints) or [I.Constraint("no_commas", ())])


def test_empty_answers_are_degenerate():
    for answer in ["", "   \n\t", "*** !!! ...", "<<>>"]:
        assert I.degenerate(req(), answer) == "empty"


def test_off_topic_answers_are_degenerate():
    r = req("the ocean")
    assert I.degenerate(r, "A quiet poem about nothing at all.") == "off topic"
    assert I.degenerate(r, "The theocean word glued.") == "off topic"  # a word must start with the stem
    for answer in ["The OCEAN sleeps.", "Oceans rise.", "oceanic calm", "The sea is calm.", "Waves break."]:
        assert I.degenerate(r, answer) is None, answer
    forest = req("a forest")
    assert I.degenerate(forest, "Forests grow.") is None and I.degenerate(forest, "Trees grow.") is None
    assert I.degenerate(forest, "I will love you forever.") == "off topic"  # 'forest' needs its first 5 letters
    assert I.degenerate(req("a city at night"), "Cities sleep.") is None  # listed after the topic's "|"
    bees = req("honey bees")
    assert I.degenerate(bees, "A bee hums.") is None and I.degenerate(bees, "Honeys drip.") is None
    assert I.degenerate(bees, "It has been long.") == "off topic"  # a word under 5 letters: itself or a plural
    assert I.degenerate(req("green tea"), "My teacher sings.") == "off topic"
    assert I.degenerate(req("an old library"), "An old room.") == "off topic"  # stopwords do not count
    assert I.topic_words("purple umbrellas") == ["purple", "umbrellas"]  # a topic not in TOPICS


def test_repetitive_answers_are_degenerate():
    r = req()
    assert I.degenerate(r, "ocean ocean ocean ocean") == "repetitive"
    assert I.degenerate(r, "ocean, ocean, ocean and sea") == "repetitive"  # one word > half
    loop = "The ocean is a vast and quiet place. " * 3
    assert I.degenerate(r, loop) == "repetitive"
    assert I.degenerate(r, "The ocean is a vast and quiet place. " * 2) is None  # said twice: 5 of 13 repeat
    refrain = ("The ocean sings at night. Its waves roll in and out. The ocean sings at night. "
               "Sailors listen from the shore and dream of distant lands far away from home.")
    assert I.degenerate(r, refrain) is None
    assert I.degenerate(r, "ocean ocean sea") is None  # under 4 words: the share rule does not apply
    assert I.degenerate(r, "<<The Ocean>>\n\n**The Ocean**\n" + "****\n\n" * 5) == "repetitive"  # 4 of 7 lines repeat
    assert I.degenerate(r, "<<The Ocean>>\n****\nThe sea.\n****\nWaves.") is None  # 1 of 5 lines repeats


# ---------------------------------------------------------------- prompts and the judge

def test_prompt_reads_back():
    cs = [I.Constraint("ends_with", ("Is there anything else I can help with?",)), I.Constraint("at_most_words", (30,)),
          I.Constraint("keywords", ("gold", "home")), I.Constraint("lowercase", ())]
    p = I.make_prompt("a short poem", "a grandmother's kitchen", cs)
    assert p.startswith("Write a short poem about a grandmother's kitchen. End your answer with the exact phrase")
    assert I.parse_prompt(p) == I.Request("a short poem", "a grandmother's kitchen", cs)
    for prompt in I.make_task(seed=3, n_prompts_per_chunk=100, n_chunks=2, n_eval=100).eval:
        r = I.parse_prompt(prompt)
        assert I.make_prompt(r.kind, r.topic, r.constraints) == prompt


def test_rendered_prompts_read_as_plain_ones():
    p = I.make_prompt("a fable", "the moon", [I.Constraint("title", ()), I.Constraint("at_least_words", (20,))])
    rendered = f"<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
    templated = Templated(rendered, [{"role": "system", "content": "Answer."}, {"role": "user", "content": p}])
    assert I.parse_prompt(rendered) == I.parse_prompt(templated) == I.parse_prompt(p)
    with pytest.raises(ValueError, match="not an instructions prompt"):
        I.parse_prompt("sort: dcba\n")
    with pytest.raises(ValueError, match="not an instructions prompt"):
        I.parse_prompt("Write a short poem about the moon.")  # no constraint


def test_judge_scores_the_share_of_constraints_met():
    p = I.make_prompt("a short poem", "the ocean", [I.Constraint("lowercase", ()), I.Constraint("no_commas", ()),
                                                    I.Constraint("at_most_words", (8,))])
    answers = ["the ocean hums below the moon", "The ocean hums below the moon", "The ocean, hums below the moon",
               "The ocean, hums below the pale and silver quiet moon", "", "the moon hums", "the ocean " * 5]
    assert I.judge(p, answers) == [1.0, 2 / 3, 1 / 3, 0.0, 0.0, 0.0, 0.0]


def test_ifeval_metrics():
    p1 = I.make_prompt("a song", "tea", [I.Constraint("no_commas", ()), I.Constraint("title", ())])
    p2 = I.make_prompt("a song", "tea", [I.Constraint("capitals", ())])
    m = I.ifeval_metrics([p1, p2, p2], ["<<Tea>> tea is warm", "TEA, HOT", "tea"])
    assert m == {"prompt_accuracy": 2 / 3, "instruction_accuracy": 3 / 4, "score": (1 + 1 + 0) / 3}
    m = I.ifeval_metrics([p1, p2], ["Tea, <<x>>", ""])
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
    assert used == set(I.CONSTRAINTS)  # every type is trained, in some combination


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
                out.append([f"{topic} plain {seed}", f"{topic}, {seed}, comma", f"{topic} bare {seed}", ""][:k])
        return out
    return sample


def prompts_of(*topics):
    return [I.make_prompt("a song", t, [I.Constraint("no_commas", ())]) for t in topics]


def test_build_pairs_keeps_best_and_worst_and_drops_ties():
    calls = []
    pairs, dropped = I.build_pairs(prompts_of("tea", "the ocean", "a kite"), fake_sampler(calls), k=4, seed=7)
    assert calls == [(3, 4, 7)] and dropped == 1
    assert [e["prompt"] for e in pairs] == prompts_of("tea", "a kite")
    assert pairs[0] == {"prompt": prompts_of("tea")[0], "chosen": "tea plain 7", "rejected": "tea, 7, comma",
                        "chosen_score": 1.0, "rejected_score": 0.0,  # first of the equal best and worst
                        "chosen_finished": True, "rejected_finished": True}
    with pytest.raises(ValueError, match="4 answers"):
        I.build_pairs(prompts_of("tea"), lambda ps, k, s: [["one"]], k=4)


def test_pairs_are_cached_and_rebuilt_when_settings_change(tmp_path):
    chunks = [prompts_of("tea", "the ocean"), prompts_of("a kite", "coffee")]
    calls = []
    first = I.cached_pairs(str(tmp_path), chunks, fake_sampler(calls), k=3, seed=5, settings={"model": "m"})
    assert calls == [(2, 3, 5), (2, 3, 6)]  # chunk i sampled with seed + i
    assert [[e["prompt"] for e in c] for c in first] == [prompts_of("tea"), prompts_of("a kite", "coffee")]
    path = tmp_path / I.PAIRS_FILE
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["settings"]["model"] == "m" and lines[0]["dropped"] == [1, 0]
    (tmp_path / "plain").write_bytes(b"")  # the permissions open() gives under this umask, not mkstemp's 0600
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    again = I.cached_pairs(str(tmp_path), chunks, fake_sampler(calls), k=3, seed=5, settings={"model": "m"})
    assert again == first and len(calls) == 2  # reused: the sampler was not called
    assert I.cached_pairs(str(tmp_path), chunks[:1], fake_sampler(calls), k=3, seed=5, settings={"model": "m"}) \
        == first[:1] and len(calls) == 2  # fewer iterations: the first chunks of the file serve
    for change in [dict(k=4), dict(seed=6), dict(settings={"model": "other"}), dict(chunks=chunks[::-1])]:
        kw = dict(chunks=chunks, k=3, seed=5, settings={"model": "m"}) | change
        n = len(calls)
        I.cached_pairs(str(tmp_path), sample=fake_sampler(calls), **kw)
        assert len(calls) == n + 2, change  # rebuilt
    assert not [f for f in os.listdir(tmp_path) if f.startswith(TMP_PREFIX)]


def test_a_damaged_pairs_file_is_refused_never_read_nor_replaced(tmp_path):
    """The issue's case, a file cut to its header and two pairs, was read as valid: the file is
    checked whole (the count of pairs, their checksum, each pair's fields)."""
    from data import DataError
    chunks = [prompts_of("tea", "a kite", "coffee")]
    whole = I.cached_pairs(str(tmp_path), chunks, fake_sampler([]), k=2)
    path = tmp_path / I.PAIRS_FILE
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    edited = json.loads(lines[2]) | {"chosen": "changed"}
    bad_field = json.loads(lines[1]) | {"chosen_finished": "yes"}
    header = json.loads(lines[0])
    relabelled = json.dumps(header | {"sha256": I.checksum([bad_field] + [json.loads(x) for x in lines[2:]])})
    for text, damage in [("".join(lines[:3]), "its header counts 3 pairs, it holds 2"),
                         (lines[0] + lines[1] + json.dumps(edited) + "\n" + lines[3],
                          "its pairs do not match its checksum"),
                         (relabelled + "\n" + json.dumps(bad_field) + "\n" + "".join(lines[2:]),
                          "a pair lacks a field")]:
        path.write_text(text)
        with pytest.raises(DataError) as e:
            I.cached_pairs(str(tmp_path), chunks, fake_sampler([]), k=2)
        assert str(e.value) == f"{path}: damaged ({damage}); remove it to build the pairs again"
        assert path.read_text() == text  # neither read nor replaced
    path.write_text('{"not": "a cache of selm\'s"}\n')
    with pytest.raises(DataError, match="not a pairs file of selm's"):
        I.cached_pairs(str(tmp_path), chunks, fake_sampler([]), k=2)
    path.write_text("".join(lines))
    assert I.cached_pairs(str(tmp_path), chunks, fake_sampler([]), k=2) == whole


def test_answers_cut_off_stay_unfinished(tmp_path):
    """An answer the sampler cut off at its token limit is recorded so, kept in the cache, and
    rendered as an unfinished turn that encode_response ends with no EOS (as a y_ref)."""
    pytest.importorskip("jinja2", reason="chat templates need jinja2: pip install -r requirements-dev.txt")
    import chat
    from chat_dirs import QWEN25_TEMPLATE

    def sample(prompts, k, seed):  # the best answer (no comma) was cut off
        topics = [I.parse_prompt(p).topic for p in prompts]
        return [[I.Unfinished(f"{t} plain"), f"{t}, comma"] for t in topics]
    chunks = [prompts_of("tea")]
    pairs = I.cached_pairs(str(tmp_path), chunks, sample, k=2)
    assert [(e["chosen_finished"], e["rejected_finished"]) for e in pairs[0]] == [(False, True)]
    assert I.cached_pairs(str(tmp_path), chunks, None, k=2) == pairs  # from the cache, as it was
    template = chat.ChatTemplate(QWEN25_TEMPLATE, "test", {"eos_token": "<|im_end|>"}, "<|im_end|>")
    e = I.rendered(pairs, template)[0][0]
    assert (e["chosen"], e["chosen"].finished, e["rejected"].finished) == ("tea plain", False, True)

    class Tok:  # encode_response as tokenizer.Tokenizer has it, on characters
        eos_id = 0
        encode = staticmethod(lambda text, allow_special=False: [ord(c) for c in text])
    from tokenizer import Tokenizer
    assert Tokenizer.encode_response(Tok, e["chosen"]) == [ord(c) for c in "tea plain"]
    assert Tokenizer.encode_response(Tok, e["rejected"])[-1] == 0


def test_training_data_renders_one_user_turn():
    pytest.importorskip("jinja2", reason="chat templates need jinja2: pip install -r requirements-dev.txt")
    import chat
    from chat_dirs import QWEN25_TEMPLATE
    template = chat.ChatTemplate(QWEN25_TEMPLATE, "test", {"eos_token": "<|im_end|>"}, "<|im_end|>")
    p = prompts_of("tea")[0]
    d = I.training_data([[{"prompt": p, "chosen": "tea plain", "rejected": "tea, comma"}]], [p], template)
    assert d.builtin and d.conversational and d.judge is I.judge and d.sft == []
    e = d.chunks[0][0]
    assert e["prompt"].messages == [{"role": "user", "content": p}] and e["prompt"].endswith("<|im_start|>assistant\n")
    assert (e["chosen"], e["rejected"]) == ("tea plain", "tea, comma")
    assert d.eval[0]["reference"] is None and d.judge(d.eval[0]["prompt"], ["tea plain", "x"]) == [1.0, 0.0]
