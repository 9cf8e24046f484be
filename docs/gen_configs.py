"""Write docs/configs.md: every key of the three training schemas (pretraining, SFT, DPO), with
its type, default and the one-line docstring under its field in danube/config/schema.py, so
the reference cannot drift from the code (tests/test_docs.py checks the file is current).

    python docs/gen_configs.py            # rewrite docs/configs.md
    python docs/gen_configs.py --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import ast
import dataclasses
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configs.md"
SCHEMA = ROOT / "danube" / "config" / "schema.py"


def field_docs() -> dict:
    """{(class name, field name): docstring} from the string literal under each field."""
    docs = {}
    for node in ast.parse(SCHEMA.read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        body = node.body
        for item, after in zip(body, body[1:] + [None]):
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and \
                    isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and \
                    isinstance(after.value.value, str):
                docs[(node.name, item.target.id)] = " ".join(after.value.value.split())
    return docs


def _type_name(tp) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return text or str(tp).replace("typing.", "")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "(required)"
    return "null" if value is None else f"`{value!r}`".replace("|", "\\|")


def rows(cls, prefix: str, docs: dict, hints_of=typing.get_type_hints):
    hints = hints_of(cls)
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type)
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        nested = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        doc = next((docs[(c.__name__, f.name)] for c in cls.__mro__
                    if (c.__name__, f.name) in docs), "")
        if nested is not None and not typing.get_origin(tp) in (list, typing.List):
            yield f"| `{prefix}{f.name}` | section | | {doc} |"
            yield from rows(nested, f"{prefix}{f.name}.", docs)
        else:
            yield (f"| `{prefix}{f.name}` | {_type_name(tp)} | {_default(f)} | "
                   f"{doc.replace('|', chr(92) + '|')} |")


def render() -> str:
    sys.path.insert(0, str(ROOT))
    from danube.config.schema import DPOConfig, PretrainConfig, SFTConfig

    docs = field_docs()
    parts = ["# Config keys", "",
             "Generated from `danube/config/schema.py` by `python docs/gen_configs.py` (a test "
             "checks it is current). Every launcher composes YAML from `configs/` onto one of "
             "these schemas; any key can be overridden on the command line (`key=value`). "
             "Defaults written `${...}` follow another key (Hydra interpolation).", ""]
    for title, schema, where in (
            ("Pretraining", PretrainConfig, "launchers/pretrain.py, configs/*.yaml"),
            ("SFT", SFTConfig, "launchers/sft.py, configs/sft/*.yaml"),
            ("DPO", DPOConfig, "launchers/dpo.py, configs/dpo/*.yaml")):
        parts += [f"## {title} ({where})", "", "| key | type | default | meaning |",
                  "|---|---|---|---|", *rows(schema, "", docs), ""]
    return "\n".join(parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        current = OUT.read_text() if OUT.is_file() else ""
        if current != text:
            print(f"{OUT} is out of date: run python docs/gen_configs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
