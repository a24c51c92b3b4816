"""Tests for adapters.py and lora's state: our adapter format's exact round trip, LoRA state subsets, and PEFT
interoperability both ways (transformers + peft as oracles, skipped when absent)."""
import copy
import json
import os

import pytest
import torch
from test_lora import Tiny, make, randomize_lora

import adapters
import checkpoint
import lora

# ----------------------------------------------------------------------------------------------------
# state, bytes, files


def test_lora_state_roundtrip_and_errors():
    model, wrapped = make()
    randomize_lora(model)
    st = lora.lora_state(model, subspaces=[1])
    assert set(st) == {f"{n}.{w}.1" for n in wrapped for w in ("A", "B")}
    other, _ = make()
    lora.load_lora_state(other, st)
    for n, m in lora.lora_modules(other).items():
        assert torch.equal(m.A[1], wrapped[n].A[1]) and torch.equal(m.B[1], wrapped[n].B[1])
        assert not torch.equal(m.B[0], wrapped[n].B[0])
    st["lm.layers.0.mlp.gate_proj.A.1"] = torch.zeros(3, 8)
    with pytest.raises(ValueError, match=r"lm\.layers\.0\.mlp\.gate_proj\.A\.1"):
        lora.load_lora_state(other, st)
    with pytest.raises(KeyError, match="vision"):
        lora.load_lora_state(other, {"vision.layers.0.mlp.gate_proj.A.0": torch.zeros(2, 8)})
    with pytest.raises(KeyError, match="out of range"):
        lora.load_lora_state(other, {"lm.layers.0.mlp.gate_proj.A.7": torch.zeros(2, 8)})
    # 2 layers x (gate 8->12, up 8->12, down 12->8), r = 2, fp32
    assert lora.subspace_bytes(model, 0) == 2 * 3 * (2 * 8 + 12 * 2) * 4


def test_own_adapter_format_roundtrip(tmp_path):
    model, wrapped = make(K=4, rank=8, alpha=16)
    randomize_lora(model)
    lora.set_moe(model, generator=torch.Generator().manual_seed(5))
    keys = torch.randn(8, 768)
    path = str(tmp_path / "a" / "adapter.safetensors")
    adapters.save_adapter(model, path, extra={"keys": keys, "sizes": torch.arange(8)},
                          metadata={"stage": 3, "clusters": [[0, 1]]})
    assert not [p for p in os.listdir(tmp_path / "a") if p.startswith(".tmp")]
    # into a model without LoRA: wrapped from the stored configuration
    fresh = Tiny()
    extra, meta = adapters.load_adapter(fresh, path)
    assert meta == {"stage": 3, "clusters": [[0, 1]]}
    assert torch.equal(extra["keys"], keys) and torch.equal(extra["sizes"], torch.arange(8))
    a, b = lora.lora_state(model), lora.lora_state(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m2 = lora.lora_modules(fresh)["lm.layers.1.mlp.down_proj"]
    assert (m2.num_subspaces, m2.r, m2.scaling) == (4, 2, 2.0)
    # into a model with a different LoRA: clear error
    other, _ = make(K=2, rank=8)
    with pytest.raises(ValueError, match=r"lm\.layers\.0\.mlp\.gate_proj"):
        adapters.load_adapter(other, path)
    before = lora.lora_state(other)
    # a tensor whose shape does not fit: error names it, nothing is changed
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, "pt") as f:
        hdr, ts = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    ts["lm.layers.1.mlp.up_proj.B.2"] = torch.zeros(12, 3)
    save_file(ts, str(tmp_path / "bad_shape.safetensors"), metadata=hdr)
    target = Tiny()
    with pytest.raises(ValueError, match=r"lm\.layers\.1\.mlp\.up_proj\.B\.2"):
        adapters.load_adapter(target, str(tmp_path / "bad_shape.safetensors"))
    assert not lora.lora_modules(target)
    assert all(torch.equal(before[k], v) for k, v in lora.lora_state(other).items())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="safetensors"):
        adapters.load_adapter(Tiny(), str(bad))


def test_peft_format_without_hf_names(tmp_path):
    """Export K subspaces with fixed alpha as one rank-K r LoRA; load back into a fresh model (K=1)."""
    model, wrapped = make(K=4, rank=8, alpha=16, scaling="fcit")
    randomize_lora(model)
    model.eval()
    alpha = torch.tensor([0.7, 0.0, 0.2, 0.1])
    lora.set_routing(model, alpha)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        want = model(x)
    adapters.save_peft_adapter(model, str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"
    import re
    assert re.fullmatch(cfg["target_modules"], "lm.layers.1.mlp.down_proj")
    assert not re.fullmatch(cfg["target_modules"], "vision.layers.0.mlp.down_proj")
    fresh = Tiny()
    loaded = adapters.load_peft_adapter(fresh, str(tmp_path))
    assert sorted(loaded) == sorted(wrapped)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=1e-5)
    # same rank split over K subspaces of an existing LoRA: alpha = 1 everywhere reproduces it
    again, _ = make(K=4, rank=8, alpha=16)
    adapters.load_peft_adapter(again, str(tmp_path))
    lora.set_routing(again, torch.ones(4))
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, atol=1e-5, rtol=1e-5)
    # errors name the key
    wrong, _ = make(K=1, rank=4, alpha=16)
    with pytest.raises(ValueError, match=r"lora_A"):
        adapters.load_peft_adapter(wrong, str(tmp_path))
    narrow, _ = make(K=1, rank=8, targets=("gate_proj",))
    with pytest.raises(ValueError, match=r"up_proj.*not targeted|not targeted"):
        adapters.load_peft_adapter(narrow, str(tmp_path))
    os.replace(tmp_path / "adapter_model.safetensors", tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        adapters.load_peft_adapter(Tiny(), str(tmp_path))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="safetensors"):
        adapters.load_peft_adapter(Tiny(), str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# PEFT interoperability (transformers + peft as oracles)


def tiny_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    return hf


def test_peft_oracle_on_transformers_module(tmp_path):
    """Our LoRA applied to the transformers model itself (names used as is) -> PEFT reproduces logits."""
    peft = pytest.importorskip("peft")
    hf = tiny_llama(tmp_path)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = copy.deepcopy(hf)
    lora.apply_lora(ours, 16, 32, num_subspaces=4, include=r"^model\.layers\.", dropout=0.05)
    randomize_lora(ours, scale=0.1)
    lora.set_routing(ours, torch.tensor([0.1, 0.6, 0.0, 0.3]))
    ours.eval()
    with torch.no_grad():
        want = ours(ids).logits
    adapters.save_peft_adapter(ours, str(tmp_path / "ad"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        got = pm(ids).logits
    assert float((got - want).abs().max()) <= 1e-4
    # and the output differs from the base model (the adapter does something)
    with torch.no_grad():
        assert float((hf(ids).logits - want).abs().max()) > 1e-3


def test_peft_saved_adapter_into_transformers_module(tmp_path):
    peft = pytest.importorskip("peft")
    hf = tiny_llama(tmp_path)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"],
                          lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.eval()
    with torch.no_grad():
        want = pm(ids).logits
    pm.save_pretrained(str(tmp_path / "pe"))
    ours = copy.deepcopy(hf)
    loaded = adapters.load_peft_adapter(ours, str(tmp_path / "pe"))
    assert len(loaded) == 2 * 4
    ours.eval()
    with torch.no_grad():
        got = ours(ids).logits
    assert float((got - want).abs().max()) <= 1e-4


def test_peft_roundtrip_with_our_model(tmp_path):
    """tiny LlamaForCausalLM saved by transformers -> checkpoint.load_vlm -> our LoRA -> save_peft_adapter ->
    PeftModel.from_pretrained(transformers model) gives our logits; and the reverse direction."""
    peft = pytest.importorskip("peft")
    hf = tiny_llama(tmp_path)
    hf.save_pretrained(str(tmp_path / "base"))
    ours = checkpoint.load_vlm(str(tmp_path / "base"), dtype=torch.float32)
    ours.eval()
    wrapped = lora.apply_lora(ours, 16, 32, num_subspaces=2)
    assert all(n.startswith("lm.") for n in wrapped)
    randomize_lora(ours, scale=0.1)
    lora.set_routing(ours, torch.tensor([0.25, 0.75]))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids)
    adapters.save_peft_adapter(ours, str(tmp_path / "ad"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        got = pm(ids).logits
    assert float((got - want).abs().max()) <= 1e-4
    # reverse: peft adapter -> our loader on a fresh load_vlm model
    fresh, pm2 = _peft_adapter_into_ours(hf, ["gate_proj", "up_proj", "down_proj"], tmp_path)
    with torch.no_grad():
        assert float((fresh(ids) - pm2(ids).logits).abs().max()) <= 1e-4


def test_peft_roundtrip_llava(tmp_path):
    """LlavaForConditionalGeneration (CLIP tower): adapter with current and legacy names -> PEFT reproduces
    our logits with an image; peft's adapter -> our loader; LoRA on the CLIP tower is refused by name."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    vc = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=28, patch_size=14, projection_dim=16)
    tc = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  tie_word_embeddings=False)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=63, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(str(tmp_path / "base"))
    ours = checkpoint.load_vlm(str(tmp_path / "base"), dtype=torch.float32).eval()
    n = ours.image_seq_len
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    ids[:, 1:1 + n] = 63
    pix = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    wrapped = lora.apply_lora(ours, 8, 16, num_subspaces=2)
    assert all(k.startswith("lm.layers.") for k in wrapped)
    randomize_lora(ours, scale=0.1)
    lora.set_routing(ours, torch.tensor([0.3, 0.7]))
    with torch.no_grad():
        want = ours(ids, pixel_values=pix)
    for legacy in (False, True):
        out = tmp_path / f"ad{int(legacy)}"
        adapters.save_peft_adapter(ours, str(out), legacy_names=legacy)
        from safetensors import safe_open
        with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
            prefix = "base_model.model.language_model.model.layers." if legacy else \
                "base_model.model.model.language_model.layers."
            assert all(k.startswith(prefix) for k in f.keys())
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval()
        with torch.no_grad():
            assert float((pm(input_ids=ids, pixel_values=pix).logits - want).abs().max()) <= 1e-4
        # our loader accepts both namings
        fresh = checkpoint.load_vlm(str(tmp_path / "base"), dtype=torch.float32).eval()
        adapters.load_peft_adapter(fresh, str(out))
        with torch.no_grad():
            assert float((fresh(ids, pixel_values=pix) - want).abs().max()) <= 1e-5
    # reverse: peft on the language model only
    fresh, pm2 = _peft_adapter_into_ours(hf, r".*language_model.*\.(gate_proj|up_proj|down_proj|q_proj)", tmp_path)
    with torch.no_grad():
        assert float((fresh(ids, pixel_values=pix) - pm2(input_ids=ids, pixel_values=pix).logits).abs().max()) <= 1e-4
    # peft's list form also hits CLIP's q_proj: our loader refuses it, naming the key
    pm3 = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    pm3.save_pretrained(str(tmp_path / "pe3"))
    m3 = checkpoint.load_vlm(str(tmp_path / "base"), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"vision_tower.*lora_A.*outside the language model"):
        adapters.load_peft_adapter(m3, str(tmp_path / "pe3"))
    assert not lora.lora_modules(m3)                # validated before anything was wrapped




def _peft_adapter_into_ours(hf, target_modules, tmp_path):
    """peft.get_peft_model on the transformers model with random nonzero LoRA weights, saved by peft, then read by
    our load_peft_adapter into a fresh load_vlm of tmp_path/base. Returns (ours, peft model)."""
    import peft
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "pe"))
    fresh = checkpoint.load_vlm(str(tmp_path / "base"), dtype=torch.float32).eval()
    adapters.load_peft_adapter(fresh, str(tmp_path / "pe"))
    return fresh, pm
