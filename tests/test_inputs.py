"""Tokenizers, prompt templates and image pre-processing against transformers (test-only oracle) and sentencepiece's
pinned ids: the inputs a model sees (the model itself: tests/test_model.py)."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from test_model import make_llama_tokenizer, make_qwen_tokenizer

import checkpoint as C
import imaging
import prompts as P


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------- tokenizer, prompts

def test_tokenizer_and_vicuna_labels(tmp_path):
    make_llama_tokenizer(tmp_path)
    tok = C.load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.add_bos and tok.image_token_id is not None
    assert tok.pad_id == tok.token_to_id("<pad>")
    ids, labels = P.encode_example(tok, "What is in the image?", "A cat.", "vicuna_v1", image_seq_len=5)
    assert ids[0] == 1 and labels[0] == -100 and ids.count(tok.image_token_id) == 5
    assert ids[-1] == 2 and labels[-1] == 2
    sup = [i for i, label in zip(ids, labels) if label != -100]
    assert tok.decode(sup) == "A cat."
    # the rendered prompt, tokenized as a whole, equals the supervised-prefix tokens
    full = tok.encode(P.VICUNA_SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.", add_bos=True)
    assert [i for i in ids[:-1] if i != tok.image_token_id] == [i for i in full if i != tok.image_token_id]
    p, pl = P.encode_example(tok, "What is in the image?", None, "vicuna_v1", image_seq_len=5)
    assert all(x == -100 for x in pl) and tok.decode(p).endswith("ASSISTANT:")
    assert ids[: len(p) - 1] == p[:-1]   # BPE may merge the prompt's last piece with the answer
    a, al = P.encode_example(tok, "Describe the scene.", "Two dogs.", "alpaca")
    assert tok.decode([i for i, label in zip(a, al) if label != -100]) == "Two dogs."
    assert "Response:\nTwo dogs." in tok.decode(a)   # ("#" is not in the toy vocabulary)
    t, tl = P.encode_example(tok, "x " * 100, "yes", max_length=20)
    assert len(t) == len(tl) == 20


def test_chatml_qwen_tokenizer(tmp_path):
    make_qwen_tokenizer(tmp_path)
    tok = C.load_tokenizer(tmp_path)
    assert tok.bos_id is None and not tok.add_bos and tok.eos_id == tok.token_to_id("<|im_end|>")
    ids, labels = P.encode_example(tok, "How many dogs are there?", "Two dogs.", "chatml", image_seq_len=3)
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(tok.image_token_id) == 3
    sup = [i for i, label in zip(ids, labels) if label != -100]
    assert sup[-1] == tok.token_to_id("<|im_end|>") and tok.decode(sup[:-1]) == "Two dogs."
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>user\n<image>")


def test_original_layout_image_sentinel(tmp_path):
    """A tokenizer without <image>: chunks around it are tokenized separately and the sentinel is inserted."""
    make_llama_tokenizer(tmp_path)
    tok = C.load_tokenizer(tmp_path)
    tok.image_token_id = None
    ids, labels = P.encode_example(tok, "What?", "Two dogs.", image_seq_len=4, image_token_id=-200)
    assert ids.count(-200) == 4 and all(label == -100 for i, label in zip(ids, labels) if i == -200)
    assert tok.decode([i for i, label in zip(ids, labels) if label != -100]) == "Two dogs."


def test_transformers_tokenizer_agrees(tmp_path, tf):
    from transformers import PreTrainedTokenizerFast
    make_llama_tokenizer(tmp_path)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    tok = C.load_tokenizer(tmp_path)
    s = "USER: <image>\nWhat is in the image?</s>USER: yes"
    assert tok.encode(s, add_bos=True) == ref(s)["input_ids"]


# ---------------------------------------------------------------------------------------------- images

def _images():
    from PIL import Image
    rng = np.random.default_rng(0)
    sizes = [(37, 53), (64, 31), (45, 45), (300, 17), (13, 90)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes] + \
        [Image.fromarray(rng.integers(0, 256, (40, 29), dtype=np.uint8))]   # grayscale


def test_clip_image_processor_matches(tf, tmp_path):
    from transformers import CLIPImageProcessor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    ref.save_pretrained(tmp_path)
    ours = imaging.ImageProcessor.from_dir(tmp_path)
    assert not ours.pad_to_square
    imgs = _images()
    want = torch.as_tensor(np.stack(ref(imgs, return_tensors="np")["pixel_values"]))
    got = ours(imgs)
    assert got.shape == (6, 3, 28, 28) and (got - want).abs().max() <= 1e-5
    # LLaVA-1.5 pad: expand2square with the mean colour, then the same pipeline (reference by the formula)
    from PIL import Image
    padded = ours.__class__.clip(28, pad_to_square=True)
    for im in imgs[:2]:
        w, h = im.size
        s = max(w, h)
        bg = Image.new("RGB", (s, s), (122, 116, 104))
        bg.paste(im.convert("RGB"), ((s - w) // 2, (s - h) // 2))
        want = torch.as_tensor(ref([bg], return_tensors="np")["pixel_values"][0])
        assert (padded([im])[0] - want).abs().max() <= 1e-5


def test_siglip_image_processor_matches(tf, tmp_path):
    from transformers import SiglipImageProcessor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SiglipImageProcessor(size={"height": 30, "width": 30})
    ref.save_pretrained(tmp_path)
    ours = imaging.ImageProcessor.from_dir(tmp_path)
    imgs = _images()
    want = torch.as_tensor(np.stack(ref(imgs, return_tensors="np")["pixel_values"]))
    got = ours(imgs)
    assert got.shape == (6, 3, 30, 30) and (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("cfg", [
    {"image_processor_type": "CLIPImageProcessor", "size": 28, "crop_size": 28},    # old openai CLIP format
    {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 26},
     "crop_size": {"height": 24, "width": 20}, "do_pad": True},
    {"image_processor_type": "SiglipImageProcessor", "size": {"height": 30, "width": 30}},   # defaults elsewhere
])
def test_sparse_preprocessor_configs(cfg, tf, tmp_path):
    from transformers import AutoImageProcessor
    json.dump(cfg, open(tmp_path / "preprocessor_config.json", "w"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoImageProcessor.from_pretrained(tmp_path)
    ours = imaging.ImageProcessor.from_dir(tmp_path)
    imgs = _images()
    if cfg.get("do_pad"):   # LLaVA pad-to-square first; transformers' CLIP processor has no such step
        assert ours.pad_to_square
        ours.pad_to_square = False
    want = torch.as_tensor(np.stack(ref(imgs, return_tensors="np")["pixel_values"]))
    assert (ours(imgs) - want).abs().max() <= 1e-5


# Pinned from sentencepiece 0.2.3 (SentencePieceProcessor.encode) on tests/fixtures/spm_bpe_tiny.model, which was
# trained with SentencePieceTrainer.train(model_type="bpe", vocab_size=400, byte_fallback=True,
# normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, unk/bos/eos = 0/1/2):
# the LLaMA-1/2 tokenizer.model settings. sentencepiece itself is not a dependency.
SPM_EXPECTED = {
    "What is in the image?": [307, 278, 280, 316, 271, 262, 303, 340, 376],
    "A cat sitting on a red mat.": [287, 277, 265, 350, 274, 353, 269, 343, 350, 284, 259, 317, 364, 350, 369, 265,
                                    363],
    "  two  spaces": [350, 350, 263, 366, 358, 350, 308, 365, 354, 361, 260],
    "Ünïcode ✓ 猫 and emoji 🐈": [350, 198, 159, 356, 198, 178, 361, 358, 364, 351, 350, 229, 159, 150, 350, 234, 143,
                                174, 321, 350, 351, 369, 358, 109, 355, 350, 243, 162, 147, 139],
    "numbers 12345 and 3.14": [350, 356, 362, 369, 374, 266, 352, 350, 383, 384, 385, 386, 387, 321, 350, 385, 363,
                               383, 386],
    "line\nbreak\n\nend": [350, 302, 356, 351, 13, 374, 273, 354, 398, 13, 13, 282, 364],
    "USER: hello ASSISTANT:": [350, 334, 331, 370, 350, 261, 360, 360, 358, 287, 333, 332, 367, 330, 367, 370],
    "trailing space ": [263, 357, 354, 355, 302, 343, 308, 365, 354, 336, 350],
    "": [],
    "The assistant's questions": [293, 298, 382, 352, 350, 320, 269, 358, 264],
    "x": [350, 123],
}


def test_sentencepiece_model_only_tokenizer(tmp_path):
    """liuhaotian/llava-v1.5-7b ships only tokenizer.model: parsed by hand, identical ids to sentencepiece."""
    import shutil
    shutil.copy(os.path.join(os.path.dirname(__file__), "fixtures", "spm_bpe_tiny.model"), tmp_path / "tokenizer.model")
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None},
              open(tmp_path / "tokenizer_config.json", "w"))
    tok = C.load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 0, True)   # LLaVA pads with unk
    for s, ids in SPM_EXPECTED.items():
        assert tok.encode(s) == ids, s
        if not s.startswith(" "):
            assert tok.decode(ids) == s, s
    ids, labels = P.encode_example(tok, "What is in the image?", "A cat.", image_seq_len=3, image_token_id=-200)
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(-200) == 3
    assert tok.decode([i for i, label in zip(ids, labels) if label != -100]) == "A cat."


def test_byte_level_separator_is_supervised():
    """With a byte-level BPE that keeps the separator space as its own token (the embedded tiny model's), the
    supervised tokens are exactly what generation must produce after the prompt: prompt + supervised == full."""
    tok = C.load_tokenizer(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                            "assets", "tiny-llava"))
    ids, labels = P.encode_example(tok, "Is Blue the minimum?", "No", image_seq_len=4)
    prompt, _ = P.encode_example(tok, "Is Blue the minimum?", None, image_seq_len=4)
    sup = [i for i, label in zip(ids, labels) if label != -100]
    assert tok.decode(sup[:-1]) == " No" and sup[-1] == tok.eos_id
    assert ids == prompt + sup
