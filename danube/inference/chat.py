"""Multi-turn chat with a checkpoint's chat template, and MT-Bench answers in FastChat's format.

The prompt of every turn is the whole conversation rendered by the same template SFT trained
with (`ChatTemplate.for_tokenizer`: the tokenizer's own, else H2O-Danube's) with the
generation prompt (`<|answer|>`), tokenized the way SFT tokenized it; the answer ends at the
end-of-turn token (EOS), or at a template marker if the model writes one as text.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, List, Optional, Sequence, Tuple

from danube.data.chat import ChatTemplate
from danube.inference.generate import Sampling, generate
from danube.inference.model import InferenceModel

MARKERS = ("<|prompt|>", "<|system|>", "<|answer|>", "<|im_start|>", "<|im_end|>")


def chat_stops(template: ChatTemplate, stop: Sequence[str] = ()) -> tuple:
    """Stop strings of a chat answer: the template's turn markers (a small model may write one
    as text instead of ending with EOS) and the caller's own, each once."""
    return tuple(dict.fromkeys([m for m in MARKERS if m in template.source] + list(stop)))


def chat_prompts(im: InferenceModel, conversations: Sequence[List[dict]], sampling: Sampling
                 ) -> Tuple[List[str], Sampling]:
    """Conversations (lists of messages) rendered with the checkpoint's chat template and the
    generation prompt, and `sampling` whose answers also end at the template's turn markers:
    what `generate` takes to answer them as chat.py would."""
    template = ChatTemplate.for_tokenizer(im.tokenizer)
    prompts = [template.render(list(c), add_generation_prompt=True) for c in conversations]
    return prompts, replace(sampling, stop=chat_stops(template, sampling.stop))


class ChatSession:
    def __init__(self, im: InferenceModel, sampling: Sampling, system: Optional[str] = None):
        self.im = im
        self.template = ChatTemplate.for_tokenizer(im.tokenizer)
        self.sampling = replace(sampling, stop=chat_stops(self.template, sampling.stop))
        self.system = system
        self.messages: List[dict] = []
        self.dropped = 0  # earlier turns left out to fit the context

    def reset(self) -> None:
        self.messages, self.dropped = [], 0

    def prompt_ids(self) -> List[int]:
        """The conversation so far + the generation prompt; the oldest exchanges are dropped
        when it would not leave room for the answer."""
        budget = self.im.config.max_position_embeddings - self.sampling.max_new_tokens
        while True:
            head = [{"role": "system", "content": self.system}] if self.system else []
            text = self.template.render(head + self.messages, add_generation_prompt=True)
            ids = self.im.tokenizer.tokenize(text)
            if len(ids) <= budget or len(self.messages) <= 1:
                return ids[-budget:]
            self.messages = self.messages[2:]
            self.dropped += 2

    def reply(self, text: str, on_text: Optional[Callable[[str], None]] = None) -> str:
        self.messages.append({"role": "user", "content": text})
        answer = generate(self.im, [self.prompt_ids()], self.sampling,
                          on_texts=[on_text])[0].text
        self.messages.append({"role": "assistant", "content": answer})
        return answer
