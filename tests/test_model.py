"""model.py against transformers (test-only oracle) on tiny random checkpoints written on the fly.

Every checkpoint is built here (nothing downloaded). Oracle tests skip when transformers is not importable.
Image processors: transformers 5.x without torchvision falls back to the PIL backends (CLIPImageProcessorPil /
SiglipImageProcessorPil) -- that is the path compared here, and the path LLaVA's reference numbers use.
"""
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

import model as M

torch.set_num_threads(2)
TOL = 1e-4


# ---------------------------------------------------------------------------------------------- fixtures helpers

CORPUS = ["What is in the image ? A cat sitting on a red mat .", "Describe the scene in detail please .",
          "The answer is yes . The answer is no . How many dogs are there ? Two dogs .",
          "A chat between a curious user and an artificial intelligence assistant .",
          "The assistant gives helpful , detailed , and polite answers to the user's questions .",
          "USER : ASSISTANT : Instruction : Response : Below is an instruction that describes a task .",
          "Write a response that appropriately completes the request . user assistant system"]


def make_llama_tokenizer(d, vocab_size=180):
    """A LLaMA-style (legacy SentencePiece-converted) BPE tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    tok = Tokenizer(BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                         initial_alphabet=list("\n▁"), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                            AddedToken("<pad>", special=True, normalized=False)])
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
               "add_bos_token": True}, open(os.path.join(d, "tokenizer_config.json"), "w"))
    return tok.get_vocab_size()


def make_qwen_tokenizer(d, vocab_size=400):
    """A Qwen-style byte-level BPE with ChatML specials and no BOS."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=False, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    json.dump({"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
              open(os.path.join(d, "tokenizer_config.json"), "w"))
    return tok.get_vocab_size()


def tiny_llama_cfg(**kw):
    from transformers import LlamaConfig
    base = dict(vocab_size=192, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_qwen_cfg(**kw):
    from transformers import Qwen2Config
    base = dict(vocab_size=420, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=True,
                rope_theta=1e6, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return Qwen2Config(**base)


def tiny_clip_cfg():
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=8)


def tiny_siglip_cfg():
    from transformers import SiglipVisionConfig
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=30, patch_size=8, vision_use_head=False)   # 30 px: conv floor drops 6 px


def hf_llava(text_cfg, vision_cfg, image_token_index, seed=0, **kw):
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    cfg = LlavaConfig(text_config=text_cfg, vision_config=vision_cfg, image_token_index=image_token_index, **kw)
    m = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():   # non-trivial norm weights / biases so every parameter matters
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n or "class_embedding" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def save(m, d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.save_pretrained(d)
    return str(d)


def prompt_ids(B, T, S, img_id, vocab, seed=0, n_img=1):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        parts = [torch.randint(3, vocab - 2, (3,), generator=g)]
        for _ in range(n_img):
            parts += [torch.full((S,), img_id), torch.randint(3, vocab - 2, (T,), generator=g)]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def hf_logits(hf, ids, px=None, am=None, pos=None):
    with torch.no_grad():
        kw = dict(input_ids=ids, attention_mask=am, position_ids=pos)
        if px is not None:
            kw["pixel_values"] = px
        return hf(**kw).logits


def assert_close_logits(ours, ref, am=None):
    d = (ours - ref).abs()
    if am is not None:
        d = d[am.bool()]
    assert d.max().item() <= TOL, f"max |dlogits| = {d.max().item():.3g}"


def left_pad(rows, pad_id):
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + list(r) for r in rows])
    am = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, am


def hf_generate(hf, ids, am, px, n, eos):
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    if px is not None:
        kw["pixel_values"] = px
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf.generate(**kw)[:, ids.shape[1]:].tolist()
    res = []
    for r in out:
        res.append(r[: r.index(eos)] if eos in r else r)
    return res


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llava_llama(tf, tmp_path_factory):
    d = tmp_path_factory.mktemp("llava_llama")
    hf = hf_llava(tiny_llama_cfg(), tiny_clip_cfg(), 190, vision_feature_layer=-2)
    return hf, save(hf, d)


@pytest.fixture(scope="module")
def llava_qwen(tf, tmp_path_factory):
    d = tmp_path_factory.mktemp("llava_qwen")
    hf = hf_llava(tiny_qwen_cfg(), tiny_siglip_cfg(), 419, vision_feature_layer=-1,
                  vision_feature_select_strategy="full", tie_word_embeddings=True, seed=1)
    return hf, save(hf, d)


# ---------------------------------------------------------------------------------------------- VLM parity

def test_llava_llama_clip_logits(llava_llama):
    hf, d = llava_llama
    m = M.load_vlm(d)
    assert m.config.text.model_type == "llama" and m.config.vision.is_clip and m.image_seq_len == 16
    ids = prompt_ids(2, 6, 16, 190, 190)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_logits(m(ids, px), hf_logits(hf, ids, px))
        am = torch.ones_like(ids)
        am[1, -3:] = 0                                              # right padding
        assert_close_logits(m(ids, px, am), hf_logits(hf, ids, px, am), am)


def test_llava_qwen_siglip_logits_tied(llava_qwen):
    hf, d = llava_qwen
    m = M.load_vlm(d)
    assert m.config.text.tie_word_embeddings and m.lm_head.weight is m.lm.embed_tokens.weight
    assert m.config.text.attention_bias and m.config.text.rope_theta == 1e6
    assert m.image_seq_len == 9 and not m.config.vision.is_clip   # 30 px / 8 -> 3x3, "full"
    ids = prompt_ids(2, 5, 9, 419, 419, n_img=2)                    # two images per row
    px = torch.randn(4, 3, 30, 30)
    with torch.no_grad():
        assert_close_logits(m(ids, px), hf_logits(hf, ids, px))


def test_vlm_generate_left_padding(llava_llama):
    hf, d = llava_llama
    m = M.load_vlm(d)
    ids0 = prompt_ids(3, 4, 16, 190, 190, seed=3)
    rows = [ids0[0].tolist(), ids0[1, 2:].tolist(), ids0[2, 1:].tolist()]
    ids, am = left_pad(rows, 0)
    px = torch.randn(3, 3, 32, 32)
    ours = m.generate(ids, am, px, max_new_tokens=10, eos_token_id=5)
    assert ours == hf_generate(hf, ids, am, px, 10, 5)
    # left-padded forward == transformers with cumsum position ids, at valid positions
    pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)
    with torch.no_grad():
        assert_close_logits(m(ids, px, am), hf_logits(hf, ids, px, am, pos), am)


def test_loss_matches_transformers_and_checkpointing(llava_llama):
    hf, d = llava_llama
    m = M.load_vlm(d).train()
    ids = prompt_ids(2, 6, 16, 190, 190, seed=4)
    labels = ids.clone()
    labels[:, :19] = -100
    labels[1, -2:] = -100
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, labels=labels).loss
    loss = m.loss(ids, labels, px)
    assert abs(loss.item() - ref.item()) < 1e-5
    loss.backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m.gradient_checkpointing = True
    m.loss(ids, labels, px).backward()
    for n, p in m.named_parameters():
        if n in g:
            assert torch.allclose(p.grad, g[n], atol=1e-6), n


def test_save_vlm_roundtrip_transformers(llava_qwen, tmp_path, tf):
    from transformers import LlavaForConditionalGeneration
    hf, d = llava_qwen
    m = M.load_vlm(d)
    M.save_vlm(m, tmp_path / "ours")
    hf2 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    ids = prompt_ids(1, 4, 9, 419, 419)
    px = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        assert_close_logits(m(ids, px), hf_logits(hf2, ids, px))
    m2 = M.load_vlm(tmp_path / "ours")
    assert torch.equal(m2(ids, px), m(ids, px))


def test_hf_module_names(llava_llama):
    hf, d = llava_llama
    m = M.load_vlm(d)
    hf_names = {n for n, _ in hf.named_modules()}
    for name, _ in m.named_modules():
        if name.endswith(("_proj", "fc1", "fc2", "linear_1", "linear_2")) or name == "lm_head":
            assert m.hf_module_name(name) in hf_names, name
    assert m.hf_module_name("lm.layers.0.mlp.gate_proj") == "model.language_model.layers.0.mlp.gate_proj"
    assert m.hf_module_name("lm.layers.0.mlp.gate_proj", legacy=True) == "language_model.model.layers.0.mlp.gate_proj"


# ---------------------------------------------------------------------------------------------- text-only

@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_text_only_causal_lm(kind, tf, tmp_path):
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM
    torch.manual_seed(2)
    hf = (LlamaForCausalLM(tiny_llama_cfg()) if kind == "llama" else Qwen2ForCausalLM(tiny_qwen_cfg())).eval()
    d = save(hf, tmp_path / kind)
    m = M.load_vlm(d)
    assert m.vision is None and m.image_seq_len == 0 and m.config.text.model_type == kind
    V = hf.config.vocab_size
    ids = torch.randint(3, V, (2, 12))
    with torch.no_grad():
        assert_close_logits(m(ids), hf_logits(hf, ids))
    rows = [ids[0].tolist(), ids[1, 5:].tolist()]
    ids2, am = left_pad(rows, 0)
    assert m.generate(ids2, am, max_new_tokens=8, eos_token_id=7) == hf_generate(hf, ids2, am, None, 8, 7)
    assert m.hf_module_name("lm.layers.1.self_attn.q_proj") == "model.layers.1.self_attn.q_proj"
    M.save_vlm(m, tmp_path / "ours")
    hf2 = type(hf).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close_logits(m(ids), hf_logits(hf2, ids))


# ---------------------------------------------------------------------------------------------- tokenizer, prompts

def test_tokenizer_and_vicuna_labels(tmp_path):
    make_llama_tokenizer(tmp_path)
    tok = M.Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.add_bos and tok.image_token_id is not None
    assert tok.pad_id == tok.token_to_id("<pad>")
    ids, labels = M.encode_example(tok, "What is in the image?", "A cat.", "vicuna_v1", image_seq_len=5)
    assert ids[0] == 1 and labels[0] == -100 and ids.count(tok.image_token_id) == 5
    assert ids[-1] == 2 and labels[-1] == 2
    sup = [i for i, l in zip(ids, labels) if l != -100]
    assert tok.decode(sup) == "A cat."
    # the rendered prompt, tokenized as a whole, equals the supervised-prefix tokens
    full = tok.encode(M.VICUNA_SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.", add_bos=True)
    assert [i for i in ids[:-1] if i != tok.image_token_id] == [i for i in full if i != tok.image_token_id]
    p, pl = M.encode_example(tok, "What is in the image?", None, "vicuna_v1", image_seq_len=5)
    assert all(x == -100 for x in pl) and tok.decode(p).endswith("ASSISTANT:")
    assert ids[: len(p) - 1] == p[:-1]   # BPE may merge the prompt's last piece with the answer
    a, al = M.encode_example(tok, "Describe the scene.", "Two dogs.", "alpaca")
    assert tok.decode([i for i, l in zip(a, al) if l != -100]) == "Two dogs."
    assert "Response:\nTwo dogs." in tok.decode(a)   # ("#" is not in the toy vocabulary)
    t, tl = M.encode_example(tok, "x " * 100, "yes", max_length=20)
    assert len(t) == len(tl) == 20


def test_chatml_qwen_tokenizer(tmp_path):
    make_qwen_tokenizer(tmp_path)
    tok = M.Tokenizer.from_dir(tmp_path)
    assert tok.bos_id is None and not tok.add_bos and tok.eos_id == tok.token_to_id("<|im_end|>")
    ids, labels = M.encode_example(tok, "How many dogs are there?", "Two dogs.", "chatml", image_seq_len=3)
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(tok.image_token_id) == 3
    sup = [i for i, l in zip(ids, labels) if l != -100]
    assert sup[-1] == tok.token_to_id("<|im_end|>") and tok.decode(sup[:-1]) == "Two dogs."
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>user\n<image>")


def test_original_layout_image_sentinel(tmp_path):
    """A tokenizer without <image>: chunks around it are tokenized separately and the sentinel is inserted."""
    make_llama_tokenizer(tmp_path)
    tok = M.Tokenizer.from_dir(tmp_path)
    tok.image_token_id = None
    ids, labels = M.encode_example(tok, "What?", "Two dogs.", image_seq_len=4, image_token_id=-200)
    assert ids.count(-200) == 4 and all(l == -100 for i, l in zip(ids, labels) if i == -200)
    assert tok.decode([i for i, l in zip(ids, labels) if l != -100]) == "Two dogs."


def test_transformers_tokenizer_agrees(tmp_path, tf):
    from transformers import PreTrainedTokenizerFast
    make_llama_tokenizer(tmp_path)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    tok = M.Tokenizer.from_dir(tmp_path)
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
    ours = M.ImageProcessor.from_dir(tmp_path)
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
    ours = M.ImageProcessor.from_dir(tmp_path)
    imgs = _images()
    want = torch.as_tensor(np.stack(ref(imgs, return_tensors="np")["pixel_values"]))
    got = ours(imgs)
    assert got.shape == (6, 3, 30, 30) and (got - want).abs().max() <= 1e-5
