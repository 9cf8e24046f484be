"""Conversations -> token ids and a loss mask, rendered exactly as inference renders them.

Three record formats (NeMo-Aligner's and the HF/OpenAI one), each becomes a list of messages
`{"role": system|user|assistant, "content": str}`:
    {"messages": [{"role", "content"}, ...]}                         HF / OpenAI chat
    {"system", "conversations": [{"from", "value"}, ...], "mask"}     NeMo chat (`mask` is the
                                                                     role Aligner masked: User)
    {"input", "output"}                                              NeMo prompt-response, with
                                                                     `prompt_template`

Chat rendering: the tokenizer's own Jinja chat template (tokenizer_config.json or
chat_template.jinja), else H2O-Danube's `<|system|>..</s><|prompt|>..</s><|answer|>..</s>`.
The whole conversation is rendered to one string and tokenized once, without added special
tokens: the ids `tokenizer.apply_chat_template(messages, tokenize=True)` gives at inference
(rendered in an environment equivalent to transformers': its extensions, globals and `tojson`,
`tools`/`documents` = None, every special token the tokenizer declares). Nothing is added to a
chat conversation: the template decides its BOS and its end-of-turn tokens.

Trained tokens: where the template marks them with `{% generation %}` blocks, exactly those
(TRL's and transformers' assistant mask). Otherwise from rendering prefixes: assistant turn i
covers the characters between render(messages[:i], add_generation_prompt=True) and
render(messages[:i+1]), less the whitespace the template puts after the turn, so the answer
and its end-of-turn token (`</s>`, `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`) are trained
and the newline ChatML or Gemma write after that token is not (generation stops at the
token: the model never has to emit the newline, and transformers' own generation-block
templates for ChatML end the block before it). A token is trained when it starts inside a
trained span.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from danube.data.tokenizer import Tokenizer, declared_token

# anchors.md: <|system|>{sys}</s> (optional) <|prompt|>{user}</s><|answer|>{assistant}</s>;
# the generation prompt ends with <|answer|>.
DANUBE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'user' %}{{ '<|prompt|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|answer|>' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|answer|>' }}{% endif %}"
)
DANUBE_CHAT_MARKERS = ("<|system|>", "<|prompt|>", "<|answer|>")
ROLES = ("system", "user", "assistant")


def nemo_chat_template(tokens) -> str:
    """NeMo 1.x's fixed chat format (`model.data.chat_prompt_tokens`) as a Jinja template:
    {system_turn_start}System{end_of_name}{system}{end_of_turn}, then per turn
    {turn_start}User|Assistant{end_of_name}{text}{end_of_turn}; the generation prompt is
    {turn_start}Assistant{end_of_name}. (NeMo trained the next turn_start as the stop signal;
    here each answer's end_of_turn is trained.)"""
    sts, ts, eon, eot = (json.dumps(getattr(tokens, k)) for k in (
        "system_turn_start", "turn_start", "end_of_name", "end_of_turn"))
    return (
        "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system'"
        " else '' %}"
        f"{{{{ {sts} + 'System' + {eon} + system + {eot} }}}}"
        "{% for message in messages if message['role'] != 'system' %}"
        f"{{{{ {ts} + ('User' if message['role'] == 'user' else 'Assistant') + {eon} + "
        f"message['content'] + {eot} }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {ts} + 'Assistant' + {eon} }}}}{{% endif %}}")
# NeMo chat `from` values (and ShareGPT's) -> roles
NEMO_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
              "system": "system"}


class ChatDataError(ValueError):
    """A record that cannot be trained on, with its file and line."""


@dataclass
class Encoded:
    ids: List[int]
    """Token ids of the whole rendered sample (BOS included when configured)."""
    trained: List[bool]
    """Per id: part of an answer (its loss is trained when it is a label)."""
    truncated: bool = False


def tokenizer_chat_template(directory: Optional[Path]) -> Optional[str]:
    """The chat template a HF tokenizer directory carries (transformers 5 keeps it in
    chat_template.jinja, 4.x in tokenizer_config.json), or None."""
    if directory is None:
        return None
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        template = json.loads(config_path.read_text()).get("chat_template")
        if isinstance(template, list):  # transformers' named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"),
                            None)
        return template
    return None


def _environment():
    """The Jinja environment transformers renders chat templates in (its
    `_compile_jinja_template`): sandboxed, trimmed blocks, the `loopcontrols` extension
    (`{% break %}`), the `{% generation %}` tag, transformers' `tojson` (no HTML escaping,
    indent/separators/sort_keys), `raise_exception`, `strftime_now`."""
    def raise_exception(message):
        raise ChatDataError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body and, while a render collects
    them, records the body's character span in the output (the output rendered so far is the
    chunks `Template.generate` has yielded)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_block"), [], [], body) \
            .set_lineno(lineno)

    def _block(self, caller):
        text = caller()
        tracking = self.environment.generation_tracking
        if tracking is not None:
            chunks, spans = tracking
            start = sum(len(c) for c in chunks)
            spans.append((start, start + len(text)))
        return text


def special_tokens(config: dict) -> dict:
    """What transformers hands a template besides the messages: every `*_token` the
    tokenizer declares and `additional_special_tokens` (tokenizer_config.json)."""
    tokens = {}
    for key, value in config.items():
        if key.endswith("_token") and declared_token(config, key) is not None:
            tokens[key] = declared_token(config, key)
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens")
    if isinstance(extra, list):
        tokens["additional_special_tokens"] = [
            t.get("content") if isinstance(t, dict) else t for t in extra]
    return tokens


class ChatTemplate:
    """A Jinja chat template rendered as transformers renders it (`_environment`), with the
    special tokens the tokenizer declares."""

    def __init__(self, source: str, tokenizer: Tokenizer):
        env = _environment()
        env.generation_tracking = None
        self.env = env
        try:
            self.template = env.from_string(source)
        except Exception as error:  # jinja2.TemplateSyntaxError and kin
            raise ChatDataError(f"chat template does not parse: {error}") from None
        self.source = source
        self.has_generation_blocks = "generation" in _block_tags(source)
        directory = tokenizer.path.parent if tokenizer.path is not None else None
        config_path = directory / "tokenizer_config.json" if directory else None
        config = json.loads(config_path.read_text()) if config_path and config_path.is_file() \
            else {}
        self.tokens = special_tokens(config)
        self.bos_token = self.tokens.get("bos_token") or (
            tokenizer.hf.id_to_token(tokenizer.bos) if tokenizer.bos is not None else "")
        self.eos_token = self.tokens.get("eos_token") or tokenizer.hf.id_to_token(tokenizer.eos)
        self.tokens.update(bos_token=self.bos_token, eos_token=self.eos_token)

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, prompt_tokens=None) -> "ChatTemplate":
        """NeMo's template from `prompt_tokens` when given, else the tokenizer's own, else
        H2O-Danube's."""
        if prompt_tokens is not None:
            return cls(nemo_chat_template(prompt_tokens), tokenizer)
        directory = tokenizer.path.parent if tokenizer.path is not None else None
        own = tokenizer_chat_template(directory)
        if own is None:
            missing = [t for t in DANUBE_CHAT_MARKERS if tokenizer.hf.token_to_id(t) is None]
            if missing:
                raise ChatDataError(
                    f"tokenizer {tokenizer.path} has no chat template and lacks H2O-Danube's "
                    f"markers {missing} (they would be split into pieces): use a tokenizer "
                    "with a chat template (tokenizer_config.json or chat_template.jinja), or "
                    "set model.data.chat_prompt_tokens")
        return cls(own or DANUBE_CHAT_TEMPLATE, tokenizer)

    def _variables(self, messages, add_generation_prompt: bool) -> dict:
        return {**self.tokens, "messages": list(messages), "tools": None, "documents": None,
                "add_generation_prompt": add_generation_prompt}

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(**self._variables(messages, add_generation_prompt))
        except ChatDataError:
            raise
        except Exception as error:  # a template's own failure (jinja2.TemplateError...)
            raise ChatDataError(f"chat template failed: {type(error).__name__}: {error}") \
                from None

    def render_with_generation_spans(self, messages: Sequence[dict]):
        """(the rendered conversation, the character spans of its `{% generation %}`
        blocks)."""
        chunks, spans = [], []
        self.env.generation_tracking = (chunks, spans)
        try:
            for chunk in self.template.generate(**self._variables(messages, False)):
                chunks.append(chunk)
        except ChatDataError:
            raise
        except Exception as error:
            raise ChatDataError(f"chat template failed: {type(error).__name__}: {error}") \
                from None
        finally:
            self.env.generation_tracking = None
        return "".join(chunks), spans


def _block_tags(source: str) -> set:
    import re

    return set(re.findall(r"\{%-?\s*(\w+)", source))


def check_messages(messages: List[dict], where: str) -> None:
    """Every message has a known role and text content (`where`: file:line[: field])."""
    for message in messages:
        if message.get("role") not in ROLES:
            raise ChatDataError(f"{where}: unknown role {message.get('role')!r}; use "
                                f"{', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ChatDataError(f"{where}: message content must be a string")


def _check_nemo_fields(record: dict, turns: list, where: str) -> None:
    """NeMo chat's other record fields: `mask` names the speaker whose turns are not trained
    (User: what we do; anything else is refused), `type` and per-turn `label` are SteerLM's
    attribute conditioning (refused unless absent/null: VALUE_TO_TEXT without labels is plain
    chat)."""
    mask = record.get("mask")
    if mask is not None and str(mask).lower() not in ("user", "human"):
        raise ChatDataError(f"{where}: mask={mask!r}: only the user's turns can be masked "
                            "(mask: User, NeMo's default); the assistant's are what is trained")
    kind = record.get("type")
    labelled = [t for t in turns if t.get("label") not in (None, "")]
    if kind not in (None, "", "VALUE_TO_TEXT") or labelled:
        raise ChatDataError(f"{where}: SteerLM attribute labels (type={kind!r}, "
                            f"{len(labelled)} labelled turn(s)) are not supported; drop "
                            "'type' and the turns' 'label' fields to train on the text alone")


def messages_of(record: dict, where: str) -> List[dict]:
    """A chat record in either chat format -> messages (roles checked)."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ChatDataError(f"{where}: 'messages' must be a list of {{role, content}}")
        messages = [dict(m) for m in messages if isinstance(m, dict)] \
            if all(isinstance(m, dict) for m in messages) else None
        if messages is None:
            raise ChatDataError(f"{where}: every message must be an object {{role, content}}")
    elif "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ChatDataError(f"{where}: 'conversations' must be a list of {{from, value}}")
        _check_nemo_fields(record, turns, where)
        messages = [{"role": "system", "content": record["system"]}] \
            if record.get("system") else []
        for turn in turns:
            name = str(turn.get("from", "")).lower()
            if name not in NEMO_ROLES:
                raise ChatDataError(f"{where}: unknown speaker {turn.get('from')!r}; use User "
                                    "or Assistant (NeMo chat), or the messages format")
            messages.append({"role": NEMO_ROLES[name], "content": turn.get("value")})
    else:
        raise ChatDataError(f"{where}: a chat record needs 'messages' or 'conversations'; "
                            f"found keys {sorted(record)}")
    check_messages(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatDataError(f"{where}: the conversation has no assistant turn to train on")
    return messages


def _spans_to_mask(offsets: List[Tuple[int, int]], spans: List[Tuple[int, int]]) -> List[bool]:
    return [any(start <= begin < end for start, end in spans) for begin, _ in offsets]


def assistant_spans(messages: List[dict], template: ChatTemplate, where: str,
                    tokenizer: Optional[Tokenizer] = None):
    """(the rendered conversation, the character spans trained: see the module docstring)."""
    if template.has_generation_blocks:
        full, spans = template.render_with_generation_spans(messages)
        if not spans:
            raise ChatDataError(f"{where}: the chat template's {{% generation %}} blocks marked "
                                "nothing in this conversation")
        return full, spans
    full = template.render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:index], add_generation_prompt=True)
        through = template.render(messages[:index + 1])
        # what the conversation so far and the whole one share: a template may close the
        # conversation with a token of its own (Phi-3's final <|endoftext|>), which belongs to
        # the last answer only
        shared = len(os.path.commonprefix([through, full]))
        if not (full.startswith(before) and through.startswith(before)
                and shared > len(before)):
            raise ChatDataError(
                f"{where}: the chat template does not render conversations prefix by prefix "
                "(turn i's text changes when turn i+1 follows), so answers cannot be located")
        if shared < len(through) and tokenizer is not None:  # whole tokens only ("<|" of a
            # closing "<|endoftext|>" is also the start of the next turn's "<|user|>")
            offsets = tokenizer.hf.encode(through, add_special_tokens=False).offsets
            shared = max([e for _, e in offsets if e <= shared], default=len(before))
        end = len(through[:shared].rstrip())  # not the whitespace after the end of turn
        spans.append((len(before), max(end, len(before))))
    return full, spans


def encode_chat(messages: List[dict], template: ChatTemplate, tokenizer: Tokenizer,
                answer_only: bool, where: str) -> Encoded:
    """Ids of the rendered conversation and which of them belong to assistant turns."""
    full, spans = assistant_spans(messages, template, where, tokenizer)
    encoding = tokenizer.hf.encode(full, add_special_tokens=False)
    trained = _spans_to_mask(encoding.offsets, spans) if answer_only else [True] * len(
        encoding.ids)
    return Encoded(list(encoding.ids), trained)


def encode_prompt_response(record: dict, prompt_template: str, label_key: str,
                           tokenizer: Tokenizer, answer_only: bool, where: str,
                           budget: Optional[int] = None, truncation_field: str = "input",
                           truncation_method: str = "right") -> Encoded:
    """NeMo prompt-response: `prompt_template` with {input}-style fields; the `label_key`
    field is the answer (rendered last, as NeMo requires). Over `budget` tokens, the
    `truncation_field` is shortened first (NeMo's truncation_field: `right` keeps its start,
    `left` its end), so the answer stays whole; only what is still too long is cut by
    `finish`."""
    encoded = _encode_prompt_response(record, prompt_template, label_key, tokenizer,
                                      answer_only, where)
    value = record.get(truncation_field)
    if budget is None or len(encoded.ids) <= budget or not isinstance(value, str):
        return encoded
    for _ in range(4):  # re-tokenizing the joint text can shift a token or two
        field_ids = tokenizer.hf.encode(value, add_special_tokens=False).ids
        keep = max(len(field_ids) - (len(encoded.ids) - budget), 0)
        field_ids = field_ids[:keep] if truncation_method == "right" \
            else field_ids[len(field_ids) - keep:]
        value = tokenizer.hf.decode(field_ids, skip_special_tokens=False)
        encoded = _encode_prompt_response({**record, truncation_field: value}, prompt_template,
                                          label_key, tokenizer, answer_only, where)
        if len(encoded.ids) <= budget or keep == 0:
            break
    return Encoded(encoded.ids, encoded.trained, truncated=True)


def _encode_prompt_response(record: dict, prompt_template: str, label_key: str,
                            tokenizer: Tokenizer, answer_only: bool, where: str) -> Encoded:
    marker = "{" + label_key + "}"
    if not prompt_template.rstrip().endswith(marker):
        raise ChatDataError(f"prompt_template {prompt_template!r} must end with {marker}")
    fields = {key: value for key, value in record.items() if isinstance(value, str)}
    try:
        prompt = prompt_template[:prompt_template.rindex(marker)].format(**fields)
    except KeyError as error:
        raise ChatDataError(f"{where}: field {error} of prompt_template missing") from None
    if not isinstance(record.get(label_key), str):
        raise ChatDataError(f"{where}: the answer field {label_key!r} is missing or not text")
    full = prompt + record[label_key]
    encoding = tokenizer.hf.encode(full, add_special_tokens=False)
    # A token is the answer's when it reaches into the answer: with "{input} {output}" the
    # first answer token carries the separating space (' J'), starts in the prompt, and is
    # what the model must produce after the prompt (NeMo trains it too: it tokenizes the
    # answer apart).
    start = len(prompt)
    trained = [end > start for _, end in encoding.offsets] if answer_only \
        else [True] * len(encoding.ids)
    return Encoded(list(encoding.ids), trained)


def finish(encoded: Encoded, tokenizer: Tokenizer, add_bos: bool, add_eos: bool,
           max_tokens: int, truncation_method: str) -> Encoded:
    """BOS/EOS around the sample (the EOS, the model's own `tokenizer.eos`, is part of the
    answer; a BOS already there is not doubled), then truncation to `max_tokens` ids: `right`
    keeps the start, `left` keeps the end."""
    ids, trained = list(encoded.ids), list(encoded.trained)
    if add_eos and (not ids or ids[-1] != tokenizer.eos):
        ids.append(tokenizer.eos)
        trained.append(True)
    if add_bos and tokenizer.bos is not None and (not ids or ids[0] != tokenizer.bos):
        ids.insert(0, tokenizer.bos)
        trained.insert(0, False)
    truncated = encoded.truncated or len(ids) > max_tokens
    if len(ids) > max_tokens:
        keep = slice(0, max_tokens) if truncation_method == "right" else slice(-max_tokens, None)
        ids, trained = ids[keep], trained[keep]
    return Encoded(ids, trained, truncated)


def read_jsonl(path: Path, on_error: str, errors: List[str]) -> List[Tuple[dict, str]]:
    """(record, "file:line") for each line; malformed lines raise (or, with on_error=skip, are
    listed in `errors`)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("a line must hold a JSON object")
            except ValueError as error:
                if on_error == "skip":
                    errors.append(f"{where}: {error}")
                    continue
                raise ChatDataError(f"{where}: not a JSON object ({error})") from None
            records.append((record, where))
    return records

