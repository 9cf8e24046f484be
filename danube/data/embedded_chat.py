"""The embedded SFT set: instructions generated from the standard library, no download.

For every public top-level function with a docstring, a NeMo chat conversation:
    System: a fixed assistant persona (on some conversations)
    User: What does `module.function` do?        Assistant: <first sentence of its docstring>
    User: Which module is it in?                 Assistant: It is in `module`.   (some)
Written as NeMo chat JSONL (`{"system", "conversations": [{"from", "value"}], "mask"}`),
split into train and validation by a hash of the function's name (held-out functions), into
the embedded cache. `embedded:chat` and `embedded:chat_validation` name the two files.

Preference pairs for DPO from the same functions, in NeMo-Aligner's message form:
    {"prompt": [system?, user: What does `module.function` do?],
     "chosen_response": {assistant: its first docstring sentence},
     "rejected_response": {assistant: where it lives, e.g. "It is in `module`."}}
The rejected answer is fluent and true but answers another question (the follow-up one), the
plausible mistake a small chat model makes; it is never a chosen answer elsewhere (another
function's sentence would be: pushed down in one pair and up in another, the preference is
then only learnable through the function's name). Named `embedded:preference` and
`embedded:preference_validation`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator, List, Tuple

from danube.config.derived import EMBEDDED_CHAT
from danube.data.embedded import default_cache_dir, stdlib_files

SYSTEM = "You are a concise assistant that explains the Python standard library."
_VERSION = 3


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return (match.group(1) if match else text)[:200]


def _functions(path: Path, root: Path) -> Iterator[Tuple[str, str]]:
    """(module.function, first docstring sentence) of a module's public functions."""
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
    if any(part.startswith("_") for part in module.split(".")):
        return
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            sentence = _first_sentence(doc) if doc else ""
            if len(sentence) >= 20:
                yield f"{module}.{node.name}", sentence


def conversations() -> Iterator[Tuple[str, dict]]:
    """(split, NeMo chat record) for every documented public stdlib function."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        for name, sentence in _functions(path, root):
            digest = int(hashlib.sha256(name.encode()).hexdigest(), 16)
            module = name.rsplit(".", 1)[0]
            turns = [{"from": "User", "value": f"What does `{name}` do?"},
                     {"from": "Assistant", "value": sentence}]
            if digest % 3 == 0:  # a follow-up turn: multi-turn data
                turns += [{"from": "User", "value": "Which module is it in?"},
                          {"from": "Assistant", "value": f"It is in `{module}`."}]
            record = {"system": SYSTEM if digest % 2 == 0 else "", "mask": "User",
                      "conversations": turns}
            yield ("validation" if digest % 20 == 0 else "train"), record


EVASIONS = ("It is in `{module}`.", "You can find it in the `{module}` module.",
            "`{name}` is part of `{module}`.")


def preference_pairs(records: List[dict]) -> Iterator[dict]:
    """A pair per conversation: the question of its first turn, its answer (chosen), and where
    the function lives (rejected), in one of a few phrasings picked by the name's hash."""
    for record in records:
        question, answer = (turn["value"] for turn in record["conversations"][:2])
        name = re.search(r"`([^`]+)`", question).group(1)
        module = name.rsplit(".", 1)[0]
        digest = int(hashlib.sha256(name.encode()).hexdigest(), 16)
        evasion = EVASIONS[digest % len(EVASIONS)].format(name=name, module=module)
        prompt = ([{"role": "system", "content": record["system"]}] if record["system"]
                  else []) + [{"role": "user", "content": question}]
        yield {"prompt": prompt, "chosen_response": {"role": "assistant", "content": answer},
               "rejected_response": {"role": "assistant", "content": evasion}}


def ensure_embedded_chat(cache_dir: Path | None = None) -> Path:
    """The cached train/validation JSONL directory, written on first use (atomically)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / f"embedded-chat-v{_VERSION}"
    if all((final / name).is_file() for name in EMBEDDED_CHAT.values()):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-chat-", dir=root))
    records: dict = {"train": [], "validation": []}
    for split, record in conversations():
        records[split].append(record)
    for split, items in records.items():
        (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
        (tmp / f"preference_{split}.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in preference_pairs(items)))
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "train.jsonl").is_file():
            raise
    return final


def held_out_questions(cache_dir: Path | None = None) -> List[Tuple[str, str]]:
    """(question, its reference answer): the first exchange of every validation conversation
    (functions held out of the SFT set), in the file's order."""
    path = ensure_embedded_chat(cache_dir) / EMBEDDED_CHAT["embedded:chat_validation"]
    turns = [json.loads(line)["conversations"] for line in path.read_text().splitlines()]
    return [(t[0]["value"], t[1]["value"]) for t in turns]


def resolve_chat_files(file_path, cache_dir: Path | None) -> List[str]:
    """`embedded:chat*` names -> their cached files; other paths as given."""
    paths = [file_path] if isinstance(file_path, str) else list(file_path)
    if not any(p in EMBEDDED_CHAT for p in paths):
        return paths
    directory = ensure_embedded_chat(cache_dir)
    return [str(directory / EMBEDDED_CHAT[p]) if p in EMBEDDED_CHAT else p for p in paths]
