"""Tokenizer and prompts: a thin wrapper over a `tokenizers` tokenizer with its special ids, the conversation templates
(LLaVA-1.5's vicuna_v1, alpaca as Shepherd uses it, Qwen's chatml) and `encode_example`, which renders one
single-turn example and supervises only its answer. checkpoint.load_tokenizer reads a tokenizer from a folder.
"""
from __future__ import annotations

from model import IGNORE_INDEX


class Tokenizer:
    """Thin wrapper over a tokenizers.Tokenizer with its special ids (checkpoint.load_tokenizer reads one from a
    folder). encode() never runs the post-processor: BOS is added explicitly."""

    def __init__(self, tok, bos_id=None, eos_id=None, pad_id=None, add_bos=None):
        self.tok = tok
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        if add_bos is None:   # does the shipped post-processor add BOS? (LLaMA yes, Qwen no)
            add_bos = bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
        self.add_bos = bool(add_bos)
        self.image_token_id = tok.token_to_id("<image>")

    def __len__(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, s: str):
        return self.tok.token_to_id(s)

    def encode(self, text: str, add_bos: bool = False) -> list:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] + ids) if (add_bos and self.bos_id is not None) else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) >= 0], skip_special_tokens=skip_special_tokens)


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
# alpaca-lora's prompt_input header (templates/alpaca.json, as Shepherd uses it): "alpaca" switches to it when the
# instruction carries an input after ALPACA_INPUT (data.dolly_example appends a record's context that way)
ALPACA_INPUT_SYSTEM = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.")
ALPACA_INPUT = "\n\n### Input:\n"
# template -> (prompt format with {instruction}, separator between prompt and answer, end token text)
TEMPLATES = {
    "vicuna_v1": (VICUNA_SYSTEM + " USER: {instruction} ASSISTANT:", " ", "</s>"),        # LLaVA-1.5 conv_vicuna_v1
    "alpaca": (ALPACA_SYSTEM + "\n\n### Instruction:\n{instruction}\n\n### Response:\n", "", "</s>"),   # FedIT
    "chatml": ("<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n", "", "<|im_end|>"),  # Qwen
}


def _encode_offsets(tokenizer: Tokenizer, text: str, image_token_id, image_seq_len: int):
    """ids + char offsets of `text`; each "<image>" becomes image_seq_len copies of image_token_id. If "<image>" is a
    token it is tokenized in place (llava-hf); otherwise the chunks around it are tokenized separately (original)."""
    ids, offs = [], []
    if tokenizer.image_token_id is not None or "<image>" not in text:
        enc = tokenizer.tok.encode(text, add_special_tokens=False)
        for i, o in zip(enc.ids, enc.offsets):
            if i == tokenizer.image_token_id and text[o[0]:o[1]] == "<image>":
                ids += [image_token_id] * image_seq_len
                offs += [o] * image_seq_len
            else:
                ids.append(i)
                offs.append(o)
        return ids, offs
    pos = 0
    for j, chunk in enumerate(text.split("<image>")):
        if j:
            ids += [image_token_id] * image_seq_len
            offs += [(pos - 7, pos)] * image_seq_len
        if chunk:
            enc = tokenizer.tok.encode(chunk, add_special_tokens=False)
            ids += enc.ids
            offs += [(a + pos, b + pos) for a, b in enc.offsets]
        pos += len(chunk) + 7
    return ids, offs


def encode_example(tokenizer: Tokenizer, instruction: str, answer: str | None = None, template: str = "vicuna_v1",
                   image_seq_len: int = 0, image_token_id: int | None = None, max_length: int = 2048):
    """One single-turn example -> (input_ids, labels). Only the answer tokens and the end token are supervised
    (labels -100 elsewhere); answer None gives the generation prompt with all labels -100.
    The conversation is rendered once and tokenized once; a token is supervised iff it starts after the prompt."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)}")
    fmt, sep, end_text = TEMPLATES[template]
    if template == "alpaca" and ALPACA_INPUT in instruction:   # alpaca-lora's prompt_input
        fmt = fmt.replace(ALPACA_SYSTEM, ALPACA_INPUT_SYSTEM, 1)
    if image_seq_len > 0:
        if image_token_id is None:
            image_token_id = tokenizer.image_token_id
        if image_token_id is None:
            raise ValueError("image_seq_len > 0 but no image_token_id (the tokenizer has no <image> token)")
        instruction = "<image>\n" + instruction.replace("<image>", "").lstrip("\n")
    prompt = fmt.format(instruction=instruction)
    text = prompt if answer is None else prompt + sep + answer
    ids, offs = _encode_offsets(tokenizer, text, image_token_id, image_seq_len)
    # Supervise every token that starts after the generation prompt, the separator included: with SentencePiece the
    # separator space merges into the first answer token ("▁No", as LLaVA's preprocess_v1 masks it); where a byte-level
    # BPE keeps it as a token of its own, the model must still learn to emit it, since generation starts right after
    # "ASSISTANT:". A token that straddles the end of the prompt belongs to the prompt.
    start = len(text) if answer is None else len(prompt)
    labels = [i if (o[0] >= start and i != image_token_id) else IGNORE_INDEX for i, o in zip(ids, offs)]
    if answer is not None:
        end_id = tokenizer.token_to_id(end_text)
        end_id = tokenizer.eos_id if end_id is None else end_id
        ids.append(end_id)
        labels.append(end_id)
    if tokenizer.add_bos:
        ids, labels = [tokenizer.bos_id] + ids, [IGNORE_INDEX] + labels
    return ids[:max_length], labels[:max_length]
