"""model.py and checkpoint.py against transformers (test-only oracle) on tiny random checkpoints written on the fly.

Every checkpoint is built here (nothing downloaded). Oracle tests skip when transformers is not importable.
Image processors: transformers 5.x without torchvision falls back to the PIL backends (CLIPImageProcessorPil /
SiglipImageProcessorPil) -- that is the path compared here, and the path LLaVA's reference numbers use.
"""
import json
import os
import shutil
import warnings

import pytest
import torch

import checkpoint as C
import model as M

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
    if os.environ.get("FCIT_PRINT_DLOGITS"):
        print(f"max |dlogits| = {d.max().item():.3g}")
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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy sizes: threading only adds overhead (5x slower on a shared 2-core box). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    m = C.load_vlm(d)
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
    m = C.load_vlm(d)
    assert m.config.text.tie_word_embeddings and m.lm_head.weight is m.lm.embed_tokens.weight
    assert m.config.text.attention_bias and m.config.text.rope_theta == 1e6
    assert m.image_seq_len == 9 and not m.config.vision.is_clip   # 30 px / 8 -> 3x3, "full"
    ids = prompt_ids(2, 5, 9, 419, 419, n_img=2)                    # two images per row
    px = torch.randn(4, 3, 30, 30)
    with torch.no_grad():
        assert_close_logits(m(ids, px), hf_logits(hf, ids, px))
    rows = [ids[0].tolist(), ids[1, 2:].tolist()]                  # left-padded greedy generation
    ids2, am = left_pad(rows, 0)
    assert m.generate(ids2, am, px, max_new_tokens=8, eos_token_id=11) == hf_generate(hf, ids2, am, px, 8, 11)
    hf_names = {n for n, _ in hf.named_modules()}
    assert all(m.hf_module_name(n) in hf_names for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear))


def test_vlm_generate_left_padding(llava_llama):
    hf, d = llava_llama
    m = C.load_vlm(d)
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


def test_compiled_decode_step_gives_the_same_tokens(llava_llama, monkeypatch):
    """generate(compile=True): gpt-fast's fixed-shape decode step (a tensor cache slot, the whole cache masked beyond
    it) gives transformers' tokens with left padding, run eagerly and through torch.compile (inductor on CPU)."""
    hf, d = llava_llama
    m = C.load_vlm(d)
    ids0 = prompt_ids(3, 4, 16, 190, 190, seed=5)
    ids, am = left_pad([ids0[0].tolist(), ids0[1, 2:].tolist(), ids0[2, 1:].tolist()], 0)
    px = torch.randn(3, 3, 32, 32)
    want = hf_generate(hf, ids, am, px, 10, 5)
    with monkeypatch.context() as mp:
        mp.setattr(torch, "compile", lambda fn, **kw: fn)             # the fixed-shape step, eagerly
        assert m.generate(ids, am, px, max_new_tokens=10, eos_token_id=5, compile=True) == want
    if shutil.which("c++") or shutil.which("g++"):                   # inductor writes C++ on CPU
        assert m.generate(ids, am, px, max_new_tokens=10, eos_token_id=5, compile=True) == want


def tiny_text_vlm(pads):
    """A small text-only VLM (LLaMA, GQA 4/2) and a batch of 7-token prompts, row b left-padded by pads[b] tokens."""
    t = M.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    m = M.VLM(M.VLMConfig(text=t, vision=None)).eval()
    ids = torch.randint(5, 64, (len(pads), 7), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    for b, n in enumerate(pads):
        am[b, :n] = 0
    return m, ids.masked_fill(am == 0, 0), am


def test_compile_without_the_dynamo_api_decodes_eagerly(monkeypatch):
    """A torch before 2.7 (no dynamo recompile_limit, no FailOnRecompileLimitHit): generate(compile=True) warns once,
    naming the version and what is missing, and gives the eager tokens without calling torch.compile."""
    m, ids, am = tiny_text_vlm((0, 2))
    want = m.generate(ids, am, max_new_tokens=8, eos_token_id=-1)
    monkeypatch.delattr(torch._dynamo.config, "recompile_limit", raising=False)
    monkeypatch.delattr(torch._dynamo.exc, "FailOnRecompileLimitHit", raising=False)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: pytest.fail("torch.compile called"))
    monkeypatch.setattr(M, "_eager_warned", False)
    with pytest.warns(UserWarning, match="decodes eagerly") as rec:
        assert m.generate(ids, am, max_new_tokens=8, eos_token_id=-1, compile=True) == want
    [msg] = [str(w.message) for w in rec if "decodes eagerly" in str(w.message)]
    assert torch.__version__ in msg and "recompile_limit" in msg and "FailOnRecompileLimitHit" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")                               # once per process
        assert m.generate(ids, am, max_new_tokens=8, eos_token_id=-1, compile=True) == want


@pytest.mark.parametrize("compile", [False, True])
def test_decode_step_matches_the_forward(compile, monkeypatch):
    """generate's decode path (`_decode_step`, `_layer_step`, `_attention_step`, `_cache_append`; with compile=True the
    fixed-shape step over the static cache, run eagerly here) against the plain forward: with left padding and GQA,
    each step's logits equal the full forward's at the last position of the sequence so far."""
    m, ids, am = tiny_text_vlm((0, 2, 4))
    steps, real = [], M._decode_step
    monkeypatch.setattr(M, "_decode_step", lambda *a: steps.append(real(*a)) or steps[-1])
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    out = m.generate(ids, am, max_new_tokens=6, eos_token_id=-1, compile=compile)
    assert len(steps) == 5 and all(len(o) == 6 for o in out)
    for i, logits in enumerate(steps):                              # step i reads the i-th new token
        ids = torch.cat([ids, torch.tensor([[o[i]] for o in out])], 1)
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        with torch.no_grad():
            torch.testing.assert_close(logits, m(ids, attention_mask=am)[:, -1], atol=1e-5, rtol=1e-5)


def test_rms_norm_fast_paths_match_the_formula():
    """RMSNorm's float32 fast paths (`_rms_norm_fp32`: `_RMSNormFn`'s written-out backward with gradient, F.rms_norm
    without) against autograd of the formula w * x * rsqrt(mean(x²) + eps): output and both gradients; gradcheck of
    the backward in float64."""
    torch.manual_seed(0)
    norm = M.RMSNorm(16, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 5, 16, requires_grad=True)
    want = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    y = norm(x)
    assert y.grad_fn.name().startswith("_RMSNormFn")
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(y)
    for got, ref in zip(torch.autograd.grad(y, (x, norm.weight), g), torch.autograd.grad(want, (x, norm.weight), g)):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), want, atol=1e-6, rtol=1e-6)
    d = [torch.randn(3, 7, dtype=torch.float64, requires_grad=True), torch.randn(7, dtype=torch.float64,
                                                                                 requires_grad=True)]
    assert torch.autograd.gradcheck(lambda x, w: M._RMSNormFn.apply(x, w, 1e-6), d)


def test_loss_matches_transformers_and_checkpointing(llava_llama):
    hf, d = llava_llama
    m = C.load_vlm(d).train()
    ids = prompt_ids(2, 6, 16, 190, 190, seed=4)
    labels = ids.clone()
    labels[:, :19] = -100
    labels[1, -2:] = -100
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, labels=labels).loss
    loss = m.loss(ids, labels, px)
    assert abs(loss.item() - ref.item()) < 1e-5
    am = torch.ones_like(ids)
    am[1, -2:] = 0                                                  # right padding (labels there are -100)
    with torch.no_grad():
        ref_am = hf(input_ids=ids, pixel_values=px, labels=labels, attention_mask=am).loss
        assert abs(m.loss(ids, labels, px, am).item() - ref_am.item()) < 1e-5
    loss.backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    hf.zero_grad()                                   # the gradients against transformers' autograd of its own graph
    hf(input_ids=ids, pixel_values=px, labels=labels).loss.backward()
    hf_p = dict(hf.named_parameters())
    compared = [n for n in g if m.hf_module_name(n) in hf_p]
    assert {"lm.layers.0.input_layernorm.weight", "lm.norm.weight", "lm.layers.1.self_attn.q_proj.weight",
            "projector.linear_1.weight"} <= set(compared)
    for n in compared:
        torch.testing.assert_close(g[n], hf_p[m.hf_module_name(n)].grad, atol=1e-5, rtol=1e-4, msg=n)
    hf.zero_grad(set_to_none=True)
    logits = m(ids, px)[:, :-1]                      # every position through every layer: the unpruned reference
    sel = labels[:, 1:] != -100
    torch.nn.functional.cross_entropy(logits[sel], labels[:, 1:][sel]).backward()
    for n, p in m.named_parameters():
        if n in g:
            assert torch.allclose(p.grad, g[n], atol=1e-6), n
    m.zero_grad()
    m.gradient_checkpointing = True
    m.loss(ids, labels, px).backward()
    for n, p in m.named_parameters():
        if n in g:
            assert torch.allclose(p.grad, g[n], atol=1e-6), n


def test_save_vlm_roundtrip_transformers(llava_qwen, tmp_path, tf):
    from transformers import LlavaForConditionalGeneration
    hf, d = llava_qwen
    m = C.load_vlm(d)
    C.save_vlm(m, tmp_path / "ours")
    hf2 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    ids = prompt_ids(1, 4, 9, 419, 419)
    px = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        assert_close_logits(m(ids, px), hf_logits(hf2, ids, px))
    m2 = C.load_vlm(tmp_path / "ours")
    assert torch.equal(m2(ids, px), m(ids, px))


def test_hf_module_names(llava_llama):
    hf, d = llava_llama
    m = C.load_vlm(d)
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
    m = C.load_vlm(d)
    assert m.vision is None and m.image_seq_len == 0 and m.config.text.model_type == kind
    V = hf.config.vocab_size
    ids = torch.randint(3, V, (2, 12))
    with torch.no_grad():
        assert_close_logits(m(ids), hf_logits(hf, ids))
    rows = [ids[0].tolist(), ids[1, 5:].tolist()]
    ids2, am = left_pad(rows, 0)
    assert m.generate(ids2, am, max_new_tokens=8, eos_token_id=7) == hf_generate(hf, ids2, am, None, 8, 7)
    assert m.hf_module_name("lm.layers.1.self_attn.q_proj") == "model.layers.1.self_attn.q_proj"
    C.save_vlm(m, tmp_path / "ours")
    hf2 = type(hf).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close_logits(m(ids), hf_logits(hf2, ids))


# ---------------------------------------------------------------------------------------------- other layouts



def test_original_llava_layout_bin_shards_and_clip_dir(llava_llama, tmp_path):
    """liuhaotian-style checkpoint: model.* / model.mm_projector.{0,2} in .bin shards + index, CLIP in its own dir."""
    hf, _ = llava_llama
    sd = hf.state_dict()
    lm, vis = {}, {}
    for k, v in sd.items():
        v = v.clone()
        if k.startswith("model.language_model."):
            lm["model." + k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            lm[k] = v
        elif k.startswith("model.multi_modal_projector.linear_"):
            i = {"1": "0", "2": "2"}[k.split("linear_")[1][0]]
            lm[f"model.mm_projector.{i}." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.vision_tower."):
            vis["vision_model." + k[len("model.vision_tower."):]] = v
    lm["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)         # old transformers buffer: dropped
    d, cd = tmp_path / "llava-v1.5", tmp_path / "clip"
    d.mkdir(), cd.mkdir()
    keys = sorted(lm)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, ks in shards.items():
        torch.save({k: lm[k] for k in ks}, d / name)
    json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}},
              open(d / "pytorch_model.bin.index.json", "w"))
    t = hf.config.text_config
    json.dump({"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"], "hidden_size": 32,
               "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "rms_norm_eps": t.rms_norm_eps, "vocab_size": 192, "max_position_embeddings": 256,
               "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 32,
               "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
               "image_aspect_ratio": "pad", "tie_word_embeddings": False}, open(d / "config.json", "w"))
    vis["vision_model.embeddings.position_ids"] = torch.arange(17)[None]        # old CLIP buffer: ignored
    vis["text_model.final_layer_norm.weight"] = torch.ones(8)                    # CLIPModel text half: ignored
    vis["logit_scale"] = torch.tensor(1.0)
    torch.save(vis, cd / "pytorch_model.bin")
    json.dump({"model_type": "clip", "vision_config": hf.config.vision_config.to_dict()}, open(cd / "config.json", "w"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                           # nothing unexpected
        m = C.load_vlm(d, vision_tower=cd)
    assert m.config.layout == "original" and m.config.image_token_index == -200
    assert m.config.image_aspect_ratio == "pad"
    ids = prompt_ids(2, 5, 16, 190, 190)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_logits(m(ids.masked_fill(ids == 190, -200), px), hf_logits(hf, ids, px))
    with pytest.raises(ValueError, match="vision_tower="):
        C.load_vlm(d)


def test_sharded_safetensors_new_names(llava_llama, tmp_path):
    """Sharded safetensors + index with the >= 4.52 in-memory names (model.language_model.*, lm_head.*,
    model.vision_tower.* without vision_model., model.multi_modal_projector.*), loaded in bf16."""
    from safetensors.torch import save_file
    hf, _ = llava_llama
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    keys = sorted(sd)
    shards = {"model-00001-of-00003.safetensors": keys[:20], "model-00002-of-00003.safetensors": keys[20:50],
              "model-00003-of-00003.safetensors": keys[50:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}},
              open(tmp_path / "model.safetensors.index.json", "w"))
    cfg = hf.config.to_dict()
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    m = C.load_vlm(tmp_path)
    ids = prompt_ids(1, 5, 16, 190, 190)
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close_logits(m(ids, px), hf_logits(hf, ids, px))
    mb = C.load_vlm(tmp_path, dtype=torch.bfloat16)
    assert mb.lm.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert (mb(ids, px).float() - hf_logits(hf, ids, px)).abs().max() < 0.1


def test_legacy_vision_model_prefix_on_disk(llava_qwen, tmp_path):
    """Hub llava-hf files keep vision_tower.vision_model.* and language_model.model.*: both accepted."""
    from safetensors.torch import save_file
    hf, d = llava_qwen
    m = C.load_vlm(d)
    sd = C._hf_state_dict(m)   # legacy names, as save_vlm writes them
    assert any(k.startswith("vision_tower.vision_model.") for k in sd)
    assert any(k.startswith("language_model.model.") for k in sd) and "language_model.lm_head.weight" not in sd
    sd["language_model.lm_head.weight"] = sd["language_model.model.embed_tokens.weight"].clone()  # tied: ignored
    save_file(sd, str(tmp_path / "model.safetensors"))
    json.dump(C.hf_config(m.config), open(tmp_path / "config.json", "w"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m2 = C.load_vlm(tmp_path)
    ids = prompt_ids(1, 4, 9, 419, 419)
    px = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        assert_close_logits(m2(ids, px), hf_logits(hf, ids, px))


def test_sparse_configs_match_transformers_defaults(tf, tmp_path):
    """A llava-1.5-7b-hf style config without LLaMA dims / CLIP act+eps, a sparse qwen2 and a sparse llama:
    every field we fill must equal what transformers fills."""
    from transformers import AutoConfig
    cfgs = {
        "llava": {"architectures": ["LlavaForConditionalGeneration"], "image_token_index": 32000, "model_type": "llava",
                  "pad_token_id": 32001, "projector_hidden_act": "gelu",
                  "text_config": {"max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                                  "vocab_size": 32064},
                  "tie_word_embeddings": False,
                  "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                                    "model_type": "clip_vision_model", "num_attention_heads": 16,
                                    "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
                  "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064},
        "qwen2": {"model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2},
        "llama": {"model_type": "llama"},
        "llava_siglip": {"model_type": "llava", "text_config": {"model_type": "qwen2"},
                         "vision_config": {"model_type": "siglip_vision_model"}},
    }
    for name, c in cfgs.items():
        (tmp_path / name).mkdir()
        json.dump(c, open(tmp_path / name / "config.json", "w"))
        ours = C.load_config(str(tmp_path / name))
        ref = AutoConfig.from_pretrained(tmp_path / name)
        rt = ref.text_config if ours.vision is not None else ref
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id"):
            assert getattr(ours.text, f) == getattr(rt, f), (name, f)
        assert ours.text.head_dim == (getattr(rt, "head_dim", None) or rt.hidden_size // rt.num_attention_heads)
        assert ours.text.rope_theta == rt.rope_parameters["rope_theta"], name
        if ours.vision is not None:
            for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                      "patch_size", "hidden_act", "layer_norm_eps"):
                assert getattr(ours.vision, f) == getattr(ref.vision_config, f), (name, f)
            assert ours.image_token_index == ref.image_token_id
    assert C.load_config(str(tmp_path / "llava")).text.hidden_size == 4096


# ---------------------------------------------------------------------------------------------- CLIP text tower

@pytest.mark.parametrize("eos", [2, 7])
def test_clip_text_tower_pooling(eos, tf, tmp_path):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(3)
    tc = dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=24, projection_dim=16, bos_token_id=1, eos_token_id=eos, pad_token_id=0)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
              patch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = CLIPModel(CLIPConfig(text_config={**tc, "projection_dim": 512}, vision_config=vc,
                                  projection_dim=16)).eval()   # the top-level projection_dim is the one used
    d = save(hf, tmp_path / "clip")
    make_llama_tokenizer(d)
    tower, tok = C.load_clip_text(d)
    assert tower.text_projection is not None
    ids = torch.tensor([[1, 50, 60, 70, eos, 0, 0], [1, 80, eos, 0, 0, 0, 0], [1, 9, 10, 11, 12, 13, eos]])
    if eos == 2:
        ids[ids == 2] = 199   # argmax pooling: EOT must be the largest id
    am = (torch.arange(7)[None] <= (ids == (199 if eos == 2 else eos)).int().argmax(-1)[:, None]).long()
    with torch.no_grad():
        ref = hf.text_model(input_ids=ids, attention_mask=am)
        assert (tower(ids, am, project=False) - ref.pooler_output).abs().max() <= 1e-5
        assert (tower(ids, am) - hf.text_projection(ref.pooler_output)).abs().max() <= 1e-5
    assert tower.encode_texts(tok, ["a cat", "two dogs on a mat"]).shape == (2, 16)
    from transformers import CLIPTextModel  # bare CLIPTextModel: no projection
    torch.manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_t = CLIPTextModel(hf.config.text_config).eval()
    d2 = save(hf_t, tmp_path / "clip_text")
    make_llama_tokenizer(d2)
    tower2, _ = C.load_clip_text(d2)
    assert tower2.text_projection is None
    with torch.no_grad():
        assert (tower2(ids, am) - hf_t(input_ids=ids, attention_mask=am).pooler_output).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------- broken inputs

class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_broken_checkpoints_give_clear_errors(llava_llama, tmp_path):
    import shutil
    _, d = llava_llama

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(d, dst)
        return dst

    bad = copy("trunc")                                                     # truncated safetensors
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
        C.load_vlm(bad)

    bad = copy("shape")                                                     # config disagrees with weights
    c = json.load(open(bad / "config.json"))
    c["text_config"]["intermediate_size"] = 48
    json.dump(c, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match=r"shape mismatch for '.*mlp\.(gate|up|down)_proj\.weight'.*\(64, 32\)|"
                                         r"shape mismatch .*\(32, 64\).*\(32, 48\)"):
        C.load_vlm(bad)

    bad = copy("shard")                                                     # index names a missing shard
    json.dump({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}},
              open(bad / "model.safetensors.index.json", "w"))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        C.load_vlm(bad)

    bad = copy("mtype")                                                     # unknown model_type
    c = json.load(open(bad / "config.json"))
    c["model_type"] = "mamba"
    json.dump(c, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="unknown model_type 'mamba'"):
        C.load_vlm(bad)
    c["model_type"], c["text_config"]["model_type"] = "llava", "gpt2"
    json.dump(c, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="unknown text model_type 'gpt2'"):
        C.load_vlm(bad)

    bad = copy("pickle")                                                    # .bin with a pickled object
    (bad / "model.safetensors").unlink()
    torch.save({"lm_head.weight": torch.zeros(2), "x": _Evil()}, bad / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: refusing to load"):
        C.load_vlm(bad)

    from safetensors.torch import load_file, save_file  # missing / unexpected keys by name
    bad = copy("keys")
    sd = load_file(bad / "model.safetensors")
    del sd["language_model.model.layers.1.mlp.up_proj.weight"]
    sd["language_model.model.layers.7.mlp.up_proj.weight"] = torch.zeros(1)
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(KeyError, match=r"lm\.layers\.1\.mlp\.up_proj\.weight"):
        C.load_vlm(bad)
    sd["language_model.model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 32)
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.warns(UserWarning, match=r"language_model\.model\.layers\.7\.mlp\.up_proj\.weight"):
        m = C.load_vlm(bad)
    assert m.load_info["unexpected"] == ["language_model.model.layers.7.mlp.up_proj.weight"]

    with pytest.raises(FileNotFoundError, match="no weights"):
        (tmp_path / "empty").mkdir()
        json.dump(json.load(open(os.path.join(d, "config.json"))), open(tmp_path / "empty" / "config.json", "w"))
        C.load_vlm(tmp_path / "empty")


def test_meta_device_build_holds_one_copy(llava_llama):
    """load_vlm builds on the meta device: the loaded parameters are the only storage (nothing left on meta)."""
    _, d = llava_llama
    m = C.load_vlm(d)
    assert not any(p.is_meta for p in m.parameters())
    ptrs = {p.data_ptr() for p in m.parameters()}
    assert len(ptrs) == len(list(m.parameters()))


def test_bf16_autocast_and_from_scratch(llava_llama):
    """bf16 autocast training step runs and stays close to fp32; a VLM built from a config saves and reloads."""
    hf, d = llava_llama
    m = C.load_vlm(d).train()
    ids = prompt_ids(2, 6, 16, 190, 190, seed=5)
    labels = ids.masked_fill(ids == 190, -100)
    px = torch.randn(2, 3, 32, 32)
    ref = m.loss(ids, labels, px).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.loss(ids, labels, px)
    loss.backward()
    assert abs(loss.item() - ref) < 0.05 and m.lm.layers[0].mlp.up_proj.weight.grad is not None
    cfg = M.VLMConfig(text=M.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64),
                      vision=M.VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=16, patch_size=8),
                      image_token_index=63)
    torch.manual_seed(0)
    m = M.VLM(cfg).eval()
    import tempfile
    with tempfile.TemporaryDirectory() as t:
        C.save_vlm(m, t)
        m2 = C.load_vlm(t)
    ids = torch.tensor([[1, 5] + [63] * m.image_seq_len + [7, 8]])
    px = torch.randn(1, 3, 16, 16)
    assert torch.equal(m(ids, px), m2(ids, px))


def test_load_memory_is_one_copy(tmp_path):
    """Loading a ~100 MB checkpoint raises the process's peak RSS by about the checkpoint size, not twice it."""
    import subprocess
    import sys
    cfg = M.VLMConfig(text=M.DecoderConfig(vocab_size=32000, hidden_size=384, intermediate_size=1024,
                                           num_hidden_layers=2, num_attention_heads=6), vision=None)
    with torch.device("meta"):
        m = M.VLM(cfg)
    for n, p in list(m.named_parameters()):
        C._assign(m, n, torch.full(p.shape, 0.01))
    m.tie_weights()
    C.save_vlm(m, tmp_path)
    size = os.path.getsize(tmp_path / "model.safetensors")
    assert size > 90e6
    code = ("import sys, torch, checkpoint as C\n"
            "kb = lambda k: int([l for l in open('/proc/self/status') if l.startswith(k)][0].split()[1]) * 1024\n"
            "C.load_vlm(sys.argv[2])\n"                                 # warm-up (one-time torch overheads)
            "open('/proc/self/clear_refs', 'w').write('5')\n"          # reset the peak-RSS counter
            "b = kb('VmRSS')\nm = C.load_vlm(sys.argv[1])\n"
            "s = sum(float(p.sum()) for p in m.parameters())\n"        # touch every page
            "print(kb('VmHWM') - b)\n")
    small = tmp_path / "small"
    C.save_vlm(M.VLM(M.VLMConfig(text=M.DecoderConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                      num_hidden_layers=1, num_attention_heads=2), vision=None)), small)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(small)], capture_output=True, text=True,
                         cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout.split()[-1])
    assert grew < 1.3 * size, f"peak RSS grew {grew / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"
