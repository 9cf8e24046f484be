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
tokens: the ids `tokenizer.apply_chat_template(messages, tokenize=True)` gives at inference.
The trained spans come from rendering prefixes: assistant turn i covers the characters between
render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]), so its
end-of-turn token (`</s>`, `<|im_end|>`) is trained and the one after a prompt is not. A token
is trained when it starts inside a trained span.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from danube.data.tokenizer import Tokenizer

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


def declared_token(config: dict, key: str) -> Optional[str]:
    """tokenizer_config.json's `bos_token` etc.: a string, or an AddedToken dict."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


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


class ChatTemplate:
    """A Jinja chat template rendered the way transformers renders it (sandboxed, trimmed
    blocks), with the tokenizer's bos/eos token strings."""

    def __init__(self, source: str, tokenizer: Tokenizer):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ChatDataError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.source = source
        directory = tokenizer.path.parent if tokenizer.path is not None else None
        config_path = directory / "tokenizer_config.json" if directory else None
        config = json.loads(config_path.read_text()) if config_path and config_path.is_file() \
            else {}
        self.bos_token = declared_token(config, "bos_token") or (
            tokenizer.hf.id_to_token(tokenizer.bos) if tokenizer.bos is not None else "")
        self.eos_token = declared_token(config, "eos_token") or tokenizer.hf.id_to_token(
            tokenizer.eod)

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

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(messages=list(messages), bos_token=self.bos_token,
                                    eos_token=self.eos_token,
                                    add_generation_prompt=add_generation_prompt)


def check_messages(messages: List[dict], where: str) -> None:
    """Every message has a known role and text content (`where`: file:line[: field])."""
    for message in messages:
        if message.get("role") not in ROLES:
            raise ChatDataError(f"{where}: unknown role {message.get('role')!r}; use "
                                f"{', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ChatDataError(f"{where}: message content must be a string")


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


def encode_chat(messages: List[dict], template: ChatTemplate, tokenizer: Tokenizer,
                answer_only: bool, where: str) -> Encoded:
    """Ids of the rendered conversation and which of them belong to assistant turns."""
    full = template.render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:index], add_generation_prompt=True)
        through = template.render(messages[:index + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatDataError(
                f"{where}: the chat template does not render conversations prefix by prefix "
                "(turn i's text changes when turn i+1 follows), so answers cannot be located")
        spans.append((len(before), len(through)))
    encoding = tokenizer.hf.encode(full, add_special_tokens=False)
    trained = _spans_to_mask(encoding.offsets, spans) if answer_only else [True] * len(
        encoding.ids)
    return Encoded(list(encoding.ids), trained)


def encode_prompt_response(record: dict, prompt_template: str, label_key: str,
                           tokenizer: Tokenizer, answer_only: bool, where: str) -> Encoded:
    """NeMo prompt-response: `prompt_template` with {input}-style fields; the `label_key`
    field is the answer (rendered last, as NeMo requires)."""
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
    trained = _spans_to_mask(encoding.offsets, [(len(prompt), len(full))]) if answer_only \
        else [True] * len(encoding.ids)
    return Encoded(list(encoding.ids), trained)


def finish(encoded: Encoded, tokenizer: Tokenizer, add_bos: bool, add_eos: bool,
           max_tokens: int, truncation_method: str) -> Encoded:
    """BOS/EOS around the sample (the EOS is part of the answer), then truncation to
    `max_tokens` ids: `right` keeps the start, `left` keeps the end."""
    ids, trained = list(encoded.ids), list(encoded.trained)
    if add_eos and (not ids or ids[-1] != tokenizer.eod):
        ids.append(tokenizer.eod)
        trained.append(True)
    if add_bos and tokenizer.bos is not None:
        ids.insert(0, tokenizer.bos)
        trained.insert(0, False)
    truncated = len(ids) > max_tokens
    if truncated:
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

