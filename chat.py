"""
chat.py -- conversations: TRL's conversational records, rendered with a model's chat template.

A conversation is a list of {"role", "content"} messages, as TRL and
HuggingFaceH4/ultrafeedback_binarized write them. A preference record holds one in two ways:
  explicit prompt: "prompt" is the conversation so far; "chosen" and "rejected" hold the
                   assistant's turn;
  implicit prompt: "chosen" and "rejected" hold the whole conversation, and the prompt is their
                   common prefix (ultrafeedback_binarized's "prompt" string is then ignored, as
                   are "prompt_id", "messages", "score_chosen", ...).
SFT records are "messages" (the last turn the assistant's) or "prompt" + "completion"; an
evaluation record is a "prompt" conversation and optionally a "reference" answer, or a
preference record, whose chosen answer is then the reference.

The pipeline trains on strings (data.py), so a conversation becomes the strings the model's
chat template writes, marked Templated so that the tokenizer encodes their special tokens:
  the prompt:   the conversation rendered with add_generation_prompt (the messages ride along);
  a response:   the assistant's turn as the template writes it after that prompt, up to its
                end-of-turn token, the tokenizer's EOS, which encode_response appends.
In a run with conversations a plain-string prompt is one user turn and a plain-string
response the assistant's answer.

Rendering is transformers' apply_chat_template: a jinja2 sandbox with the same options,
filters and globals, the special tokens' text passed as bos_token, eos_token, ... jinja2 is
imported here only, and only when a template is rendered. This file imports only files.py and tokenizer.py.
"""

import json
import os
from datetime import datetime

from files import Fields
from tokenizer import Templated, special_token

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplate:
    """A directory's chat template. render() is apply_chat_template(tokenize=False); prompt()
    and response() give the strings training and sampling use (see the top of the file)."""

    def __init__(self, text, source, specials, end_of_turn):
        self.text, self.source = text, source
        self.specials = specials  # {"bos_token": "<|begin_of_text|>", ...}: the template's variables
        self.end_of_turn = end_of_turn  # the text of the tokenizer's EOS, e.g. "<|im_end|>"
        self._compiled = None

    def render(self, messages, add_generation_prompt=False):
        if self._compiled is None:
            self._compiled = compile_template(self.text, self.source)
        # as transformers: keys whose value is None are dropped (a template handles a missing key)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._compiled.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.specials)
        except Exception as e:  # noqa: BLE001 -- a template's raise_exception, or any error in its code
            raise ValueError(f"the chat template of {self.source} failed to render: {type(e).__name__}: {e}") from None

    def prompt(self, messages):
        """The prompt the model answers: the conversation and the assistant's header."""
        return Templated(self.render(messages, add_generation_prompt=True), messages)

    def response(self, prompt, content):
        """The assistant's turn `content` after `prompt` (from prompt()), as the template writes
        it, without its end-of-turn token: what the model is trained to write before EOS."""
        full = self.render(prompt.messages + [{"role": "assistant", "content": content}])
        if not full.startswith(prompt):
            raise ValueError(f"the chat template of {self.source} writes the prompt differently when an answer "
                             "follows it, so the answer cannot be cut from the prompt")
        turn = full[len(prompt):]
        end = turn.rfind(self.end_of_turn)
        if end < 0:
            raise ValueError(f"the chat template of {self.source} does not end the assistant's turn with the "
                             f"tokenizer's end-of-sequence token {self.end_of_turn!r} (tokenizer_config.json's "
                             "eos_token should be the template's end-of-turn token)")
        return Templated(turn[:end])


class Conversation:
    """A chat in progress (sample.py --chat): its turns, rendered whole with the chat template at
    every turn. When the prompt outgrows the model's context (fits(prompt) is False), its oldest
    exchanges are forgotten, and counted in `forgotten`."""

    def __init__(self, template, fits):
        self.template, self.fits, self.messages, self.forgotten = template, fits, [], 0

    def ask(self, text):
        """The prompt that has the model answer `text` after the turns so far; None, and the
        conversation starts again, when that turn alone does not fit."""
        self.messages.append({"role": "user", "content": text})
        while not self.fits(prompt := self.template.prompt(self.messages)) and len(self.messages) > 1:
            self.messages, self.forgotten = self.messages[2:], self.forgotten + 1
        if not self.fits(prompt):
            self.messages = []
            return None
        return prompt

    def answered(self, text):
        self.messages.append({"role": "assistant", "content": text})


def compile_template(text, source="?"):
    """The template compiled as transformers compiles it (utils/chat_template_utils.py)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("chat templates need jinja2: pip install jinja2") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):  # {% generation %}...{% endgeneration %}: just its body here
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template of {source} does not parse: {e} (its line {e.lineno})") from None


def load_template(tok):
    """The chat template of the tokenizer's directory (None when it has none): the file
    chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or named
    templates of which "default" is used), as transformers picks it."""
    if tok.source is None:
        return None
    file = os.path.join(tok.source, "tokenizer_config.json")
    config = Fields.of(file)
    text = config.get("chat_template", None, lambda v: type(v) is str or type(v) is list and all(
        type(t) is dict and type(t.get("name")) is str and type(t.get("template")) is str for t in v),
        'a string, or a list of {"name": ..., "template": ...}')
    jinja = os.path.join(tok.source, "chat_template.jinja")
    if os.path.isfile(jinja):
        try:
            with open(jinja, encoding="utf-8") as f:
                text = f.read()
        except (OSError, ValueError) as e:
            raise ValueError(f"{jinja}: unreadable ({e.strerror if isinstance(e, OSError) else e})") from None
    if isinstance(text, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        text = {t["name"]: t["template"] for t in text}.get("default")
    if not text:
        return None
    specials = {name: special_token(config, name, file) for name in SPECIAL_NAMES}
    specials = {name: token for name, token in specials.items() if token is not None}
    return ChatTemplate(text, tok.source, specials, tok.decode([tok.eos_id]))


# ---- records ------------------------------------------------------------------------------

def is_conversational(rec):
    """True when a record holds a conversation (a list of messages) in any field that can."""
    return any(isinstance(rec.get(k), list) for k in ("prompt", "chosen", "rejected", "completion", "messages"))


def check_messages(msgs, name):
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"field {name!r} must be a non-empty list of messages or a string")
    for i, m in enumerate(msgs, 1):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"field {name!r}, message {i}: expected {{'role': str, 'content': str}}, got "
                             f"{json.dumps(m)[:60]}")
    return msgs


def user_turn(x, name):
    """A prompt field: a conversation, or a plain string that is one user turn."""
    if x == "":
        raise ValueError(f"field {name!r} is empty")
    return [{"role": "user", "content": x}] if isinstance(x, str) else check_messages(x, name)


def ends_with_answer(conv, name):
    """The conversation `conv` split as (what precedes the last turn, the last turn's content);
    the last turn must be the assistant's."""
    if not any(m["role"] == "assistant" for m in conv):
        raise ValueError(f"{name} has no assistant turn")
    if conv[-1]["role"] != "assistant":
        raise ValueError(f"the last turn of {name} is {conv[-1]['role']!r}'s, not the assistant's")
    return conv[:-1], conv[-1]["content"]


def check_answerable(prompt):
    """A prompt conversation, once it is one the assistant answers: its last turn is not the
    assistant's own."""
    if prompt[-1]["role"] == "assistant":
        raise ValueError("the prompt's last turn is the assistant's: there is nothing to answer")
    return prompt


def preference_pair(rec, template):
    """{"prompt", "chosen", "rejected"} as Templated strings, from a record in either of TRL's
    conversational forms (see the top of the file)."""
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise ValueError(f"missing field {missing[0]!r}")
    prompt, convs = rec.get("prompt"), {}
    for k in ("chosen", "rejected"):
        if isinstance(rec[k], str):  # a plain answer after a prompt conversation
            convs[k] = user_turn(prompt, "prompt") + [{"role": "assistant", "content": rec[k]}]
        elif isinstance(prompt, list):  # explicit prompt
            convs[k] = check_messages(prompt, "prompt") + check_messages(rec[k], k)
        else:  # implicit prompt: the whole conversation, the prompt its common prefix
            convs[k] = check_messages(rec[k], k)
    (before_c, chosen), (before_r, rejected) = (ends_with_answer(convs[k], k) for k in ("chosen", "rejected"))
    if before_c != before_r:
        k = next((i for i, (a, b) in enumerate(zip(before_c, before_r)) if a != b), min(len(before_c), len(before_r)))
        if k == 0:
            raise ValueError("chosen and rejected share no prompt prefix: they differ from their first turn")
        raise ValueError(f"chosen and rejected differ at turn {k + 1}, before their last turn (only the "
                         "assistant's last turn may differ)")
    if not before_c:
        raise ValueError("chosen and rejected share no prompt prefix: nothing precedes the assistant's turn")
    check_answerable(before_c)
    p = template.prompt(before_c)
    return {"prompt": p, "chosen": template.response(p, chosen), "rejected": template.response(p, rejected)}


def demonstration(rec, template):
    """(prompt, response) Templated strings of an SFT record: "messages" ending with the
    assistant's turn, or "prompt" + "completion" (each a conversation or a string)."""
    if "messages" in rec:
        before, answer = ends_with_answer(check_messages(rec["messages"], "messages"), "messages")
        if not before:
            raise ValueError("field 'messages': nothing precedes the assistant's turn")
    else:
        for k in ("prompt", "completion"):
            if k not in rec:
                raise ValueError(f"missing field {k!r} (or give 'messages')")
        before, answer = user_turn(rec["prompt"], "prompt"), rec["completion"]
        if not isinstance(answer, str):
            extra, answer = ends_with_answer(check_messages(answer, "completion"), "completion")
            before = before + extra
    p = template.prompt(check_answerable(before))
    return p, template.response(p, answer)


def evaluation_prompt(rec, template):
    """{"prompt", "reference"} of an evaluation record: the prompt conversation (or string)
    rendered, its last turn not the assistant's; the reference answer, if any, as a response.
    A preference record without a "reference" (ultrafeedback_binarized's test_prefs) gives
    its prompt, and its chosen answer as the reference."""
    if "chosen" in rec and "reference" not in rec:
        p = preference_pair(rec, template)
        return {"prompt": p["prompt"], "reference": p["chosen"]}
    if "prompt" not in rec:
        raise ValueError("missing field 'prompt'")
    msgs = check_answerable(user_turn(rec["prompt"], "prompt"))
    p, ref = template.prompt(msgs), rec.get("reference")
    if isinstance(ref, list):  # the reference as a conversation: its last (assistant) turn
        ref = ends_with_answer(check_messages(ref, "reference"), "reference")[1]
    if ref is not None and not isinstance(ref, str):
        raise ValueError(f"field 'reference' must be a string, got {type(ref).__name__}")
    return {"prompt": p, "reference": None if ref is None else template.response(p, ref)}
