"""Tokenizers: load a HF `tokenizer.json` or a SentencePiece `.model`, or train a byte-level
BPE; one wrapper class.

`Tokenizer` exposes what megatron-core's GPTDataset reads (`vocab_size`, `eod`, `pad`) plus
encode/decode, so the data, training and (later) conversion stages share one object.

Two ids that a chat model keeps apart: `eod`, the document separator of pretraining data
(found by name), and `eos`, the model's own end of sequence / end of turn, as the model's
files declare it (tokenizer_config.json's `eos_token`, else the ids an import recorded), which
generation stops at and a prompt-response answer ends with. They differ for most instruct
models: `<|im_end|>` vs `<|endoftext|>` (Qwen, SmolLM2), `<|eot_id|>` vs `<|end_of_text|>`
(Llama 3.1+).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterable, List, Optional

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

# Llama/Danube ids for the first three (anchors.md: bos=1 eos=2 pad=0); the chat markers
# of the H2O-Danube template are reserved so SFT data never splits them.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|prompt|>", "<|answer|>"]
# Files of a Hugging Face tokenizer directory that travel with it: transformers 5 keeps the
# chat template in chat_template.jinja; an import also records the source model's
# generation_config.json and special-token ids (MODEL_TOKEN_IDS_FILE) there, so that every
# checkpoint, and so every export, knows what the model was.
MODEL_TOKEN_IDS_FILE = "model_token_ids.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json",
                   MODEL_TOKEN_IDS_FILE)
BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def declared_token(config: dict, key: str) -> Optional[str]:
    """tokenizer_config.json's `bos_token` etc.: a string, or an AddedToken dict."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A HF `tokenizers.Tokenizer` with the attributes megatron-core's datasets use."""

    def __init__(self, hf_tokenizer: HFTokenizer, path: Optional[Path] = None):
        self.hf = hf_tokenizer
        self.path = path
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod = self._special_id([EOS, "<|endoftext|>", "<|end_of_text|>", "<eos>"])
        self.bos = self._special_id([BOS, "<|begin_of_text|>", "<bos>"], required=False)
        self.eos = self._declared_id("eos_token", "eos_token_id") if path is not None else None
        if self.eos is None:
            self.eos = self.eod
        pad = self._special_id([PAD, "<unk>"], required=False)
        # GPTDataset masks labels equal to `pad`; -1 matches nothing when there is no pad.
        self.pad = -1 if pad is None else pad
        # GPTDataset keys its index cache on this: a different tokenizer, a different cache.
        digest = hashlib.sha256(hf_tokenizer.to_str().encode()).hexdigest()[:16]
        self.unique_identifiers = {"class": "danube.Tokenizer", "sha256": digest}

    def _declared_id(self, token_key: str, id_key: str) -> Optional[int]:
        """The id the model's files declare: tokenizer_config.json's token (what chat templates
        render as `eos_token`), else the first id an import recorded (MODEL_TOKEN_IDS_FILE)."""
        import json

        directory = self.path.parent
        config = directory / "tokenizer_config.json"
        if config.is_file():
            name = declared_token(json.loads(config.read_text()), token_key)
            if isinstance(name, str) and self.hf.token_to_id(name) is not None:
                return self.hf.token_to_id(name)
        recorded = directory / MODEL_TOKEN_IDS_FILE
        if recorded.is_file():
            value = json.loads(recorded.read_text()).get(id_key)
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int):
                return value
        return None

    def stop_ids(self) -> List[int]:
        """Every id generation stops at: the model's EOS, and each end-of-sequence id its
        generation_config.json lists (Llama 3.x: <|end_of_text|>, <|eom_id|>, <|eot_id|>)."""
        import json

        ids = [self.eos]
        if self.path is not None:
            for name in ("generation_config.json", MODEL_TOKEN_IDS_FILE):
                path = self.path.parent / name
                if path.is_file():
                    value = json.loads(path.read_text()).get("eos_token_id")
                    for i in value if isinstance(value, list) else [value]:
                        if isinstance(i, int) and i not in ids:
                            ids.append(i)
        return ids

    def _special_id(self, names: List[str], required: bool = True) -> Optional[int]:
        """The first of `names` that is one of the tokenizer's special tokens, else the first
        in its vocabulary at all: "</s>" is ordinary text in Qwen's vocabulary (a BPE piece),
        whose separator is the special <|endoftext|>."""
        special = {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}
        for name in names:
            if name in special:
                return self.hf.token_to_id(name)
        for name in names:
            token_id = self.hf.token_to_id(name)
            if token_id is not None:
                return token_id
        if required:
            raise ValueError(f"tokenizer {self.path} has none of the tokens {names}: it needs an "
                             "end-of-document token")
        return None

    def tokenize(self, text: str) -> List[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: os.PathLike) -> None:
        self.hf.save(str(path))

    def save_pretrained(self, directory: os.PathLike) -> None:
        """The tokenizer's own directory files (a HF tokenizer keeps its tokenizer_config and
        special-token map), or just tokenizer.json for one trained here."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.path is not None:
            for name in TOKENIZER_FILES:
                if (self.path.parent / name).is_file():
                    shutil.copy2(self.path.parent / name, directory / name)
        if not (directory / "tokenizer.json").is_file():
            self.save(directory / "tokenizer.json")


def tokenizer_json_path(path: os.PathLike) -> Path:
    """A tokenizer.json path, or a directory holding one."""
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


def load_tokenizer(path: os.PathLike) -> Tokenizer:
    """A tokenizer.json (or its directory), or a SentencePiece .model (converted)."""
    if Path(path).suffix == ".model" and Path(path).is_file():
        return Tokenizer(sentencepiece_to_hf(path), Path(path))
    json_path = tokenizer_json_path(path)
    if not json_path.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {json_path}")
    return Tokenizer(HFTokenizer.from_file(str(json_path)), json_path)


def sentencepiece_to_hf(path: os.PathLike) -> HFTokenizer:
    """A SentencePiece BPE model (Llama 2 / Mistral: identity normalization, dummy prefix, byte
    fallback) as an equivalent HF tokenizer. BPE merges are recovered from the piece order:
    SentencePiece merges the pair whose result has the best score, and its scores fall with the
    piece id, so a merge's rank is its result's id (as transformers' LlamaConverter does)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    norm = proto.normalizer_spec
    if proto.trainer_spec.model_type != 2 or norm.name not in ("identity", "") \
            or norm.remove_extra_whitespaces:
        raise ValueError(
            f"{path}: only SentencePiece BPE models with identity normalization and no "
            "whitespace folding convert exactly (as Llama 2 and Mistral's); this one has "
            f"model_type={proto.trainer_spec.model_type} normalization={norm.name!r} "
            f"remove_extra_whitespaces={norm.remove_extra_whitespaces}. Convert it to a "
            "tokenizer.json with its own tools and give that path instead")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    merges = []
    for piece, piece_id in vocab.items():  # [(result id, left id, right id, left, right)]
        merges += [(piece_id, vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
                   for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    merges.sort()
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges],
                                unk_token=unk, fuse_unk=True,
                                byte_fallback=proto.trainer_spec.byte_fallback))
    steps = [normalizers.Prepend("\u2581")] if norm.add_dummy_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    hf.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    # unknown (2) and control (3) pieces are special; user-defined (4) are plain added tokens
    hf.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                           for p in proto.pieces if p.type in (2, 3)])
    hf.add_tokens([AddedToken(p.piece, normalized=False) for p in proto.pieces if p.type == 4])
    return hf


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: all 256 bytes are in the base alphabet, so any text encodes (the byte
    fallback); digits are split one by one (as Llama and Mistral do)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)
