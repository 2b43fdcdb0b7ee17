"""A VLM judge: the probability that a vision-language model answers "yes" to "Is there a {object} in the
image?", read from its next-token logits (RLAIF-V's divide-and-conquer: a response's claims are checked one
object at a time against the image, not the whole response at once).

One forward pass per (image, object), no generate(): the "yes" and "no" tokens' logits after the question,
softmaxed over the two answers. It scores candidate images (selection.scorer: judge) and answers' object
claims (rewards.judge_model). Any LLaVA-family model transformers loads as an image-text-to-text model works.
"""
from __future__ import annotations

from actors.common.objects import EXISTENCE_QUESTION, POPE_SUFFIX
from actors.common.runtime import device_for, setup_torch, torch_dtype

# POPE's wording and LLaVA-1.5's short-answer suffix: what LLaVA-1.5 (and the shapes LLaVA, pretrained on
# exactly these questions) answers with a one-word Yes / No.
JUDGE_QUESTION = EXISTENCE_QUESTION + POPE_SUFFIX
YES_WORDS, NO_WORDS = ("Yes", "yes"), ("No", "no")
BATCH_SIZE = 8        # questions per forward pass (each carries its own copy of the image's tokens)
REFUTED_BELOW = 0.5   # a claim whose p_yes is below this is refuted


def chat_prompt(processor, question: str) -> str:
    """One user turn of an image and the question, as the samplers ask (actors/sampling.py)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def answer_token(tokenizer, prompt: str, word: str) -> int | None:
    """The first token of `word` as the model would write it right after `prompt` (after "ASSISTANT:" a Llama
    tokenizer writes "▁Yes"; after a newline a byte-level one writes "Yes"). None when that token is no part of
    the word: a small BPE may write " yes" as "Ġ" "y" "es", and a bare space says neither yes nor no."""
    text = word if prompt[-1:].isspace() else " " + word
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
    if len(full) > len(base) and full[:len(base)] == base:
        token = full[len(base)]
    else:   # the prompt's last token merged with the answer's first
        token = tokenizer(text, add_special_tokens=False)["input_ids"][0]
    piece = tokenizer.decode([token]).strip()
    return token if piece and word.startswith(piece) else None


class Judge:
    """`p_yes(images, objects_per_image)`: per image, per object, P("yes") of the model's answer."""

    def __init__(self, model: str, device: str = "auto", threads: int = 1, dtype: str = "float32",
                 batch_size: int = BATCH_SIZE):
        self.torch = setup_torch(threads)
        from transformers import AutoModelForImageTextToText, AutoProcessor
        self.device, self.batch_size = device_for(device), max(1, batch_size)
        self.processor = AutoProcessor.from_pretrained(model)
        self.processor.tokenizer.padding_side = "left"   # the last position is every row's next token
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype(dtype))
        self.model = self.model.to(self.device).eval()
        probe = chat_prompt(self.processor, self.question("dog"))
        tok = self.processor.tokenizer
        self.yes, self.no = (sorted({answer_token(tok, probe, w) for w in words} - {None})
                             for words in (YES_WORDS, NO_WORDS))
        if not self.yes or not self.no:
            raise ValueError(f"judge {model}: its tokenizer writes no token that starts 'yes' or 'no' alone")

    @staticmethod
    def question(obj: str) -> str:
        return JUDGE_QUESTION.format(obj)

    def p_yes(self, images, objects_per_image) -> list[list[float]]:
        """For each image, P(yes) for each of its objects, in order. Questions from all images are batched;
        a question's value does not depend on its batch (up to float rounding)."""
        flat = [(i, o) for i, objs in enumerate(objects_per_image) for o in objs]
        probs: list[float] = []
        for k in range(0, len(flat), self.batch_size):
            chunk = flat[k:k + self.batch_size]
            probs += self._forward([images[i] for i, _ in chunk],
                                   [chat_prompt(self.processor, self.question(o)) for _, o in chunk])
        out, k = [], 0
        for objs in objects_per_image:
            out.append(probs[k:k + len(objs)])
            k += len(objs)
        return out

    def _forward(self, images, prompts) -> list[float]:
        torch = self.torch
        inp = self.processor(images=list(images), text=list(prompts), return_tensors="pt",
                             padding=True).to(self.device)
        if "pixel_values" in inp and inp["pixel_values"].is_floating_point():
            inp["pixel_values"] = inp["pixel_values"].to(self.model.dtype)
        # Left padding is masked and rotary positions are relative, so a row reads as it would alone (tested);
        # no position_ids of ours: Qwen2-VL-style models build their own multimodal ones.
        with torch.inference_mode():
            logits = self.model(**inp, logits_to_keep=1).logits[:, -1].float()
        yes = torch.logsumexp(logits[:, self.yes], dim=-1)
        no = torch.logsumexp(logits[:, self.no], dim=-1)
        return torch.sigmoid(yes - no).tolist()   # softmax over the two answers


def refuted(p_yes: list[float]) -> int:
    return sum(p < REFUTED_BELOW for p in p_yes)
