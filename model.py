"""LLaVA-style vision-language model in plain PyTorch: the frozen MLLM that FCIT's LoRA adapts.

Configs, the LLaMA / Qwen2 decoder (RoPE, GQA, KV cache), CLIP / SigLIP vision tower, projector, VLM (forward, loss,
generate), the CLIP text tower for DISCO's task identities, then the fast paths (RMSNorm's written-out backward,
generate's decode step, the compiled step's static cache), each tested equal to the plain computation it replaces.
Module names below `lm.` / `vision.` equal transformers'; prompts.py tokenizes and templates, imaging.py pre-processes
images, checkpoint.py reads and writes checkpoint files.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------------
# configs (field defaults = transformers' documented defaults; checkpoint.py reads and writes config.json)

DECODER_TYPES = ("llama", "qwen2")


@dataclass
class DecoderConfig:
    model_type: str = "llama"          # "llama" | "qwen2"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None   # None -> num_attention_heads
    head_dim: int | None = None              # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in DECODER_TYPES:
            raise ValueError(f"unknown decoder model_type {self.model_type!r}; supported: {sorted(DECODER_TYPES)}")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class VisionConfig:
    model_type: str = "clip_vision_model"    # "clip_vision_model" | "siglip_vision_model"
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def is_clip(self) -> bool:
        return self.model_type == "clip_vision_model"


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407


@dataclass
class VLMConfig:
    text: DecoderConfig = field(default_factory=DecoderConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)   # None: text-only causal LM
    image_token_index: int = 32000
    vision_feature_layer: int | list = -2
    vision_feature_select_strategy: str = "default"   # "default" drops CLS / first token, "full" keeps all
    projector_hidden_act: str = "gelu"
    layout: str = "llava-hf"      # where it was loaded from: "llava-hf" | "original" | "causal-lm"
    image_aspect_ratio: str | None = None   # original LLaVA config: "pad" -> pad images to square
    vision_tower: str | None = None         # original layout: local CLIP directory the tower is read from


def image_seq_len(cfg: VLMConfig) -> int:
    """Image tokens per image: patches (+1 CLIP class token), minus one under the "default" strategy."""
    if cfg.vision is None:
        return 0
    n = (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + int(cfg.vision.is_clip)
    return n - int(cfg.vision_feature_select_strategy == "default")


# ----------------------------------------------------------------------------------------------------------------
# building blocks

def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


_ACT = {"gelu": F.gelu, "quick_gelu": _quick_gelu, "gelu_pytorch_tanh": _gelu_tanh, "gelu_new": _gelu_tanh,
        "silu": F.silu, "relu": F.relu}


def _act(name: str):
    if name not in _ACT:
        raise ValueError(f"unknown activation {name!r}; supported: {sorted(_ACT)}")
    return _ACT[name]


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm as transformers computes it: w * x / sqrt(mean(x²) + eps), the statistics in fp32 and the
    normalised x cast back to x's dtype before the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32 == self.weight.dtype:
            return _rms_norm_fp32(x, self.weight, self.eps)       # the same formula, fewer kernels (fast paths)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """position_ids (B, T) -> cos, ±sin (B, 1, T, head_dim) in fp32 like transformers; sin's first half negated, so
    that transformers' rotate_half(x) * sin is exactly roll(x, d/2) * ±sin (one op instead of four)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
                                / head_dim))
    freqs = position_ids[..., None].float() * inv_freq            # (B, T, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)
    return emb.cos().to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """RoPE with the signed sin of rope_cos_sin."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class KVCache:
    """Preallocated per-layer cache: keys stored transposed, kt (B, n_kv, d, T_max), so that a decode step's q @ kᵀ
    reads plain row-major matrices (3x faster on CPU than a slice of (B, n_kv, T_max, d)); v (B, n_kv, T_max, d).
    generate's decode step writes one position at a time with `_cache_append` (fast paths)."""

    def __init__(self, B, n_kv, t_max, d, dtype, device):
        self.kt = torch.zeros(B, n_kv, d, t_max, dtype=dtype, device=device)
        self.v = torch.zeros(B, n_kv, t_max, d, dtype=dtype, device=device)

    def update(self, start: int, k, v):
        """Write k, v (B, n_kv, T, d) at start..; -> every cached k, v up to them (B, n_kv, end, d): for the prefill
        (start 0) k and v themselves, row-major, so that SDPA takes its fused kernel; else views of the cache."""
        end = start + k.shape[2]
        self.kt[..., start:end] = k.transpose(-1, -2)
        self.v[:, :, start:end] = v
        if start == 0:
            return k, v
        return self.kt[..., :end].transpose(-1, -2), self.v[:, :, :end]


def _sdpa(q, k, v, mask):
    """q (B, nH, Tq, d), k/v (B, nKV, Tk, d); mask None (causal if Tq == Tk > 1) or bool (B, 1, Tq, Tk)."""
    n_rep = q.shape[1] // k.shape[1]
    causal = mask is None and q.shape[2] > 1
    if n_rep > 1 and mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


class Attention(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.nh, self.nkv, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.d, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.d, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.d, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.d, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, start: int = 0, q_from: int = 0):
        """q_from > 0: queries only at positions q_from.. (keys and values at all), the mask given for them."""
        B, T, _ = x.shape
        Tq = T - q_from
        q = self.q_proj(x[:, q_from:]).view(B, Tq, self.nh, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.d).transpose(1, 2)
        q, k = apply_rope(q, cos[:, :, q_from:], sin[:, :, q_from:]), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)
        y = _sdpa(q, k, v, mask)                                    # (B, nH, Tq, d)
        return self.o_proj(y.transpose(1, 2).reshape(B, Tq, self.nh * self.d))


class MLP(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask=None, cache=None, start=0, q_from=0):
        x = x[:, q_from:] + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start, q_from)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """LLaMA / Qwen2 body: embed_tokens, layers, norm (transformers' LlamaModel / Qwen2Model names)."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, x, position_ids, mask=None, caches=None, start=0, last=None):
        """x (B, T, C) input embeddings -> (B, T, C) after the final norm. last=(q_from, mask): the last layer computes
        only positions q_from.. (-> (B, T - q_from, C)), nothing after it reading the rest."""
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        ckpt = self.gradient_checkpointing and caches is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            args = (mask, None if caches is None else caches[i], start)
            if last is not None and i == len(self.layers) - 1:
                args = (last[1], args[1], start, last[0])
            x = checkpoint(layer, x, cos, sin, *args, use_reentrant=False) if ckpt else layer(x, cos, sin, *args)
        return self.norm(x)


def _padding_mask(key_valid, q_len: int, start: int):
    """key_valid (B, Tk) -> bool (B, 1, q_len, Tk): causal AND key not padding; the diagonal is always allowed so a
    padding query never has an empty row (its output is garbage either way, as in transformers)."""
    Tk = key_valid.shape[1]
    kpos = torch.arange(Tk, device=key_valid.device)
    qpos = torch.arange(start, start + q_len, device=key_valid.device)
    causal = kpos[None, :] <= qpos[:, None]
    m = (causal[None] & key_valid[:, None, :].bool()) | (kpos[None, :] == qpos[:, None])[None]
    return m[:, None]


class VisionAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        D = c.hidden_size
        self.nh = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, mask=None):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.nh, D // self.nh).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class VisionMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.act = _act(c.hidden_act)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block shared by CLIP vision/text and SigLIP vision."""

    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = VisionAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = VisionMLP(c)

    def forward(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.is_clip = c.is_clip
        if self.is_clip:
            self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=not c.is_clip)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + int(c.is_clip), c.hidden_size)

    def forward(self, pixel_values):                                  # (B, 3, H, W) -> (B, P(+1), D)
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if self.is_clip:
            x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight[None]


class VisionTower(nn.Module):
    """CLIP / SigLIP `vision_model`. Returns hidden_states[0..n_layers] like output_hidden_states."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.embeddings = VisionEmbeddings(c)
        if c.is_clip:
            self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)   # sic
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)     # loaded, unused by LLaVA

    def forward(self, pixel_values, n_layers: int | None = None) -> list:
        x = self.embeddings(pixel_values)
        if self.config.is_clip:
            x = self.pre_layrnorm(x)
        hs = [x]
        for layer in self.encoder.layers[:n_layers]:
            x = layer(x)
            hs.append(x)
        return hs


class CLIPImageTower(nn.Module):
    """CLIPVisionModelWithProjection: image_embeds = visual_projection(post_layernorm(last layer's CLS)) (DISCO's image
    identity)."""

    def __init__(self, c: VisionConfig, projection_dim: int):
        super().__init__()
        self.vision_model = VisionTower(c)
        self.visual_projection = nn.Linear(c.hidden_size, projection_dim, bias=False)

    def forward(self, pixel_values):
        v = self.vision_model
        return self.visual_projection(v.post_layernorm(v(pixel_values)[-1][:, 0]))


class Projector(nn.Module):
    def __init__(self, in_dim, out_dim, act):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = _act(act)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def _init_weights(m):   # transformers-like init (std 0.02) for models built from scratch
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
    elif isinstance(m, VisionEmbeddings) and m.is_clip:
        nn.init.normal_(m.class_embedding, std=0.02)


# ----------------------------------------------------------------------------------------------------------------
# the model

class VLM(nn.Module):
    """LLaVA: vision tower -> projector -> image rows spliced into the decoder's input embeddings.
    With config.vision None it is a plain LLaMA/Qwen2 causal LM (the FedIT setting)."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        t = config.text
        self.lm = Decoder(t)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.vision = self.projector = None
        if config.vision is not None:
            self.vision = VisionTower(config.vision)
            n = len(config.vision_feature_layer) if isinstance(config.vision_feature_layer, list) else 1
            self.projector = Projector(config.vision.hidden_size * n, t.hidden_size, config.projector_hidden_act)
        self.apply(_init_weights)
        self.tie_weights()
        self._kv = None                      # the compiled decode step's static KV cache: (shape key, [KVCache])

    def tie_weights(self):
        if self.config.text.tie_word_embeddings:
            self.lm_head.weight = self.lm.embed_tokens.weight

    @property
    def image_seq_len(self) -> int:
        return image_seq_len(self.config)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.lm.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool):
        self.lm.gradient_checkpointing = bool(on)

    def hf_module_name(self, name: str, legacy: bool = False) -> str:
        """Our module path -> transformers' in-memory path (5.x; legacy=True: < 4.52 / on-disk names), for PEFT
        and save_vlm."""
        if self.vision is None:
            rules = [(r"^lm\.", "model."), (r"^lm_head", "lm_head")]
        elif legacy:
            rules = [(r"^lm\.", "language_model.model."), (r"^lm_head", "language_model.lm_head"),
                     (r"^vision\.", "vision_tower.vision_model."), (r"^projector\.", "multi_modal_projector.")]
        else:
            rules = [(r"^lm\.", "model.language_model."), (r"^lm_head", "lm_head"),
                     (r"^vision\.", "model.vision_tower."), (r"^projector\.", "model.multi_modal_projector.")]
        for pat, rep in rules:
            if re.match(pat, name):
                return re.sub(pat, rep, name, count=1)
        raise ValueError(f"hf_module_name: {name!r} is not a module path of this model")

    # -- inputs -------------------------------------------------------------------------------------------------
    def vision_states(self, pixel_values):
        """(N, 3, H, W) -> (N, image_seq_len, D_v): the vision tower's selected layer(s), before the projector. A frozen
        tower gives the same states every time, so a caller may compute them once per image and pass image_states."""
        c = self.config
        layers = c.vision_feature_layer if isinstance(c.vision_feature_layer, list) else [c.vision_feature_layer]
        L = c.vision.num_hidden_layers
        idx = [i if i >= 0 else L + 1 + i for i in layers]
        need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(need_grad):   # frozen tower: keep no activations
            hs = self.vision(pixel_values, max(idx))
        f = torch.cat([hs[i] for i in idx], dim=-1)
        return (f[:, 1:] if c.vision_feature_select_strategy == "default" else f).contiguous()  # as a cache holds them

    def image_features(self, pixel_values=None, image_states=None):
        """(N, 3, H, W) pixels or their (N, image_seq_len, D_v) vision_states -> (N, image_seq_len, C): LLaVA's
        feature selection + projector."""
        f = self.vision_states(pixel_values) if image_states is None else image_states
        return self.projector(f.to(self.projector.linear_1.weight.dtype))

    def embed(self, input_ids, pixel_values=None, image_states=None):
        """input_ids (B, T) with image tokens already expanded -> (B, T, C) embeddings with image rows spliced in
        (from pixel_values, or from their precomputed vision_states)."""
        img = input_ids == self.config.image_token_index
        ids = input_ids if 0 <= self.config.image_token_index < self.config.text.vocab_size \
            else input_ids.masked_fill(img, 0)
        x = self.lm.embed_tokens(ids)
        if pixel_values is not None or image_states is not None:
            if self.vision is None:
                raise ValueError("images given to a text-only model")
            f = self.image_features(pixel_values, image_states).to(x.dtype)
            n = int(img.sum())
            if n != f.shape[0] * f.shape[1]:
                raise ValueError(f"image tokens ({n}) do not match image features ({f.shape[0]} images x "
                                 f"{f.shape[1]} tokens); expand <image> to model.image_seq_len={f.shape[1]}")
            x = x.masked_scatter(img[..., None].expand_as(x), f)
        return x

    def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None, q_from: int = 0,
                      image_states=None):
        """(B, T, C) after the final norm. With attention_mask, positions are cumsum(mask)-1 (left or right padding).
        q_from > 0: only positions q_from.. are returned, and the last layer computes only those (B, T - q_from, C)."""
        x = self.embed(input_ids, pixel_values, image_states)
        B, T = input_ids.shape
        mask = None
        if attention_mask is not None:
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            if not bool(attention_mask.all()):
                mask = _padding_mask(attention_mask, T, 0)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, -1)
        last = None
        if q_from > 0:
            valid = attention_mask if attention_mask is not None else input_ids.new_ones(B, T)
            last = (q_from, _padding_mask(valid, T - q_from, q_from))
        return self.lm(x, position_ids, mask, last=last)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None):
        """-> logits (B, T, V)."""
        return self.lm_head(self.hidden_states(input_ids, pixel_values, attention_mask, position_ids))

    def loss(self, input_ids, labels, pixel_values=None, attention_mask=None, label_smoothing: float = 0.0,
             image_states=None):
        """Mean next-token CE over labels != -100 (labels shifted by one inside). lm_head runs only at supervised
        positions, so no full (B, T, V) logits are materialised, and the last layer only from the first position
        supervised in any row (its other outputs feed nothing): exact, and a prompt-heavy batch skips most of it."""
        tgt = labels[:, 1:].to(input_ids.device)
        sel = tgt != IGNORE_INDEX
        if not bool(sel.any()):
            return self.hidden_states(input_ids, pixel_values, attention_mask, image_states=image_states).sum() * 0.0
        q_from = int(sel.any(0).nonzero()[0])        # no position before it is supervised in any row: the last
        h = self.hidden_states(input_ids, pixel_values, attention_mask, q_from=q_from,       # layer skips them
                               image_states=image_states)[:, :-1]
        tgt, sel = tgt[:, q_from:], sel[:, q_from:]
        logits = self.lm_head(h[sel]).float()                       # (N_supervised, V)
        return F.cross_entropy(logits, tgt[sel], label_smoothing=label_smoothing)

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, max_new_tokens=128, eos_token_id=None,
                 image_states=None, compile: bool = False):
        """Batched greedy decoding with a KV cache; rows are LEFT-padded (attention_mask 0 on the left). Returns the
        new tokens of each row, stopping before the first EOS (EOS itself not included). compile=True: the decode
        step goes through torch.compile (the cache rounded up to 64 slots, so that few shapes occur; CUDA graphs on
        a GPU), gpt-fast's approach. The decode step (`_decode_step`) and the static cache are in the fast paths."""
        B, T = input_ids.shape
        dev = input_ids.device
        am = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev).long()
        eos = self.config.text.eos_token_id if eos_token_id is None else eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple, set)) else ([] if eos is None else [eos]))
        t = self.config.text
        t_max = -(-(T + max_new_tokens) // 64) * 64 if compile else T + max_new_tokens
        x = self.embed(input_ids, pixel_values, image_states)
        caches = _static_cache(self, B, t_max, x.dtype, dev) if compile else self._new_cache(B, t_max, x.dtype, dev)
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)
        padded = not bool(am.all())
        last = (T - 1, _padding_mask(am, 1, T - 1))             # the last layer: only the last position's output
        logits = self.lm_head(self.lm(x, pos, _padding_mask(am, T, 0) if padded else None, caches, 0, last)[:, -1])
        bias, cos, sin = _decode_tables(t, am, t_max, x.dtype)          # (B, T_max): padding -inf; (T_max, d)
        bias = bias if padded or compile else None
        step_fn = _compiled(_decode_step, dev) if compile else _decode_step
        out, done, nxt = [[] for _ in range(B)], [False] * B, pos[:, -1] + 1
        for step in range(max_new_tokens):
            tok = logits.argmax(-1)
            for b, v in enumerate(tok.tolist()):
                if not done[b]:
                    if v in eos:
                        done[b] = True
                    else:
                        out[b].append(v)
            if all(done) or step == max_new_tokens - 1:
                break
            slot = torch.tensor(T + step, device=dev) if compile else T + step
            logits = step_fn(self, tok, nxt, slot, bias, caches, cos, sin)
            nxt = nxt + 1
        return out

    def _new_cache(self, B, t_max, dtype, dev):
        """One KVCache per decoder layer."""
        t = self.config.text
        return [KVCache(B, t.num_key_value_heads, t_max, t.head_dim, dtype, dev) for _ in range(t.num_hidden_layers)]

    def drop_static_cache(self):
        """Free the compiled step's KV cache (`_static_cache`; evaluation over, training needs the memory)."""
        self._kv = None


# ----------------------------------------------------------------------------------------------------------------
# CLIP text tower (DISCO task-identity features)

class CLIPTextTower(nn.Module):
    """CLIPTextModel(WithProjection): causal + padding mask, final_layer_norm, EOS pooling as transformers does it."""

    def __init__(self, c: CLIPTextConfig, projection: bool = True):
        super().__init__()
        self.config = c
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embeddings.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.text_projection = nn.Linear(c.hidden_size, c.projection_dim, bias=False) if projection else None
        self.image_tower: CLIPImageTower | None = None   # the same CLIPModel's, for image identities (load_clip_text)

    def forward(self, input_ids, attention_mask=None, project: bool = True):
        """(B, S) -> (B, D): EOS-pooled states, then text_projection when present and project=True."""
        B, S = input_ids.shape
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding.weight[:S][None]
        am = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        mask = _padding_mask(am, S, 0)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)
        if self.config.eos_token_id == 2:   # old OpenAI configs: EOT is the largest id
            idx = input_ids.to(torch.int).argmax(-1)
        else:                               # first EOS (pad may equal EOS)
            idx = (input_ids == self.config.eos_token_id).int().argmax(-1)
        pooled = x[torch.arange(B, device=x.device), idx]
        return self.text_projection(pooled) if (project and self.text_projection is not None) else pooled

    @torch.no_grad()
    def encode_texts(self, tokenizer, texts: list, max_length: int | None = None):
        """Tokenize with a prompts.Tokenizer (BOS text EOS, truncated to max_position_embeddings), right-pad, and
        embed -> (B, D)."""
        max_length = max_length or self.config.max_position_embeddings
        rows = []
        for s in texts:
            ids = tokenizer.tok.encode(s, add_special_tokens=False).ids[: max_length - 2]
            rows.append([tokenizer.bos_id] + ids + [tokenizer.eos_id])
        S = max(map(len, rows))
        dev = self.embeddings.token_embedding.weight.device
        ids = torch.tensor([r + [tokenizer.pad_id] * (S - len(r)) for r in rows], device=dev)
        am = torch.tensor([[1] * len(r) + [0] * (S - len(r)) for r in rows], device=dev)
        return self(ids, am)


# ----------------------------------------------------------------------------------------------------------------
# fast paths (CPU/GPU speed; each gives the numbers of the plain computation above and names its test)

class _RMSNormFn(torch.autograd.Function):
    """w * x * rsqrt(mean(x²) + eps) for float32 x, with the backward written out: dx = r (gw - x̂ mean(gw x̂)),
    gw = g w, x̂ = x r. Autograd's graph of the same formula takes about twice as long on a CPU. Tested:
    test_rms_norm_fast_paths_match_the_formula, test_loss_matches_transformers_and_checkpointing."""

    @staticmethod
    def forward(ctx, x, w, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)             # (..., 1)
        xn = x * r
        ctx.save_for_backward(xn, r, w)
        return w * xn

    @staticmethod
    def backward(ctx, g):
        xn, r, w = ctx.saved_tensors
        gw = g * w
        dx = (gw - xn * (gw * xn).mean(-1, keepdim=True)).mul_(r) if ctx.needs_input_grad[0] else None
        dw = (g * xn).sum(tuple(range(g.dim() - 1))) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def _rms_norm_fp32(x, w, eps):
    """RMSNorm.forward for float32 x and weight, in fewer kernels: `_RMSNormFn` with gradient, F.rms_norm (one kernel)
    without. Tested: test_rms_norm_fast_paths_match_the_formula."""
    if torch.is_grad_enabled():
        return _RMSNormFn.apply(x, w, eps)
    return F.rms_norm(x, w.shape, w, eps)


# ---- generate's decode step: one new position per row as (B, C) rows, one padding bias shared by the layers, plain
# attention over the cache (at one query the fused SDPA kernel's fixed cost dominates). Tested against the forward by
# test_decode_step_matches_the_forward, against transformers' generate by test_vlm_generate_left_padding.

def _decode_tables(t: DecoderConfig, am, t_max: int, dtype):
    """What every step of a generate call shares: the padding bias (B, T_max), -inf at the left padding of am (B, T)
    and 0 elsewhere, and the RoPE tables cos, ±sin (T_max, d) that a step indexes by position."""
    B, T = am.shape
    bias = torch.zeros(B, t_max, dtype=dtype, device=am.device)
    bias[:, :T].masked_fill_(am == 0, float("-inf"))
    cos, sin = (c[0, 0] for c in rope_cos_sin(torch.arange(t_max, device=am.device)[None], t.head_dim, t.rope_theta,
                                              dtype))
    return bias, cos, sin


def _decode_step(vlm: VLM, tok, pos, slot, bias, caches, cos, sin):
    """VLM.forward for one new token per row, against the KV cache: tokens (B,) at positions pos (B,) written to cache
    slot `slot` -> logits (B, V). bias (B, T_max): 0 for a valid slot, -inf for padding (or None: all valid). An int
    slot attends to the slots up to it; a 0-d tensor slot keeps every shape fixed for torch.compile: the whole cache,
    -inf beyond the slot."""
    if torch.is_tensor(slot):
        bias = bias.masked_fill(torch.arange(bias.shape[1], device=tok.device) > slot, float("-inf"))[:, None, None]
    elif bias is not None:
        bias = bias[:, None, None, :slot + 1]                                      # (B, 1, 1, S)
    x, cos, sin = vlm.lm.embed_tokens(tok), cos[pos][:, None], sin[pos][:, None]   # (B, C), (B, 1, d)
    for layer, cache in zip(vlm.lm.layers, caches):
        x = _layer_step(layer, x, cos, sin, bias, cache, slot)
    return vlm.lm_head(vlm.lm.norm(x))


def _layer_step(layer: DecoderLayer, x, cos, sin, bias, cache: KVCache, slot):
    """DecoderLayer.forward for one new position per row, x (B, C)."""
    x = x + _attention_step(layer.self_attn, layer.input_layernorm(x), cos, sin, bias, cache, slot)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _attention_step(attn: Attention, x, cos, sin, bias, cache: KVCache, slot):
    """Attention.forward for one new position per row: x (B, C); bias (B, 1, 1, S): 0 or -inf per cached slot, or None
    -> (B, C). Plain attention; GQA views q as (n_kv, n_rep): no copy of the cache."""
    B = x.shape[0]
    q = apply_rope(attn.q_proj(x).view(B, attn.nh, attn.d), cos, sin)
    k = apply_rope(attn.k_proj(x).view(B, attn.nkv, attn.d), cos, sin)
    kt, v = _cache_append(cache, slot, k, attn.v_proj(x).view(B, attn.nkv, attn.d))
    att = (q.view(B, attn.nkv, -1, attn.d) @ kt).mul_(attn.d ** -0.5)          # (B, n_kv, n_rep, S)
    if bias is not None:
        att.add_(bias)
    y = torch.softmax(att, dim=-1) @ v                                          # (B, n_kv, n_rep, d)
    return attn.o_proj(y.view(B, attn.nh * attn.d))


def _cache_append(cache: KVCache, slot, k, v):
    """KVCache.update for one position: k, v (B, n_kv, d) written at `slot` -> kᵀ (B, n_kv, d, S), v (B, n_kv, S, d):
    S = slot + 1, or the whole buffer for a 0-d tensor slot (fixed shapes for torch.compile; a bias masks the rest)."""
    if torch.is_tensor(slot):
        cache.kt.index_copy_(3, slot.view(1), k[..., None])
        cache.v.index_copy_(2, slot.view(1), v[:, :, None])
        return cache.kt, cache.v
    cache.kt[..., slot] = k
    cache.v[:, :, slot] = v
    return cache.kt[..., :slot + 1], cache.v[:, :, :slot + 1]


# ---- generate(compile=True), gpt-fast's approach: the decode step through torch.compile over a static cache. Tested:
# test_compiled_decode_step_gives_the_same_tokens, test_compile_without_the_dynamo_api_decodes_eagerly,
# test_decode_step_matches_the_forward; in test_lora.py test_compiled_decode_with_lora_modes_matches_eager,
# test_compiled_decode_falls_back_to_eager_past_the_recompile_limit, test_static_cache_is_reused_zeroed_and_dropped.

def _static_cache(vlm: VLM, B, t_max, dtype, dev):
    """The KV cache of the compiled step: the same buffers, zeroed, while the shape holds (freed by
    VLM.drop_static_cache). The step writes into them, and CUDA graphs replay a written input only if its address
    never changes."""
    key = (B, t_max, dtype, dev)
    if vlm._kv is not None and vlm._kv[0] == key:
        for c in vlm._kv[1]:
            c.kt.zero_()
            c.v.zero_()
        return vlm._kv[1]
    vlm._kv = None
    caches = vlm._new_cache(B, t_max, dtype, dev)
    for c in caches:
        torch._dynamo.mark_static_address(c.kt)
        torch._dynamo.mark_static_address(c.v)
    vlm._kv = (key, caches)
    return caches


def _compiled(fn, dev):
    """fn through torch.compile as one graph (CUDA graphs on a GPU); a shape met again is compiled as dynamic. Up to
    64 graphs per process (LoRA modes, shapes); past that, or on a torch before 2.7, fn runs eagerly."""
    if _missing_dynamo_api():
        return fn
    c = torch.compile(fn, fullgraph=True, mode="reduce-overhead" if dev.type == "cuda" else None)

    def step(*args):
        nonlocal c
        try:
            with torch._dynamo.config.patch(recompile_limit=64):
                return c(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            c = fn
            return fn(*args)
    return step


_eager_warned = False       # _missing_dynamo_api has warned


def _missing_dynamo_api():
    """What _compiled needs from torch._dynamo (there from torch 2.7 on) and this torch lacks; the first time, one
    warning says so, naming the version, and that decoding runs eagerly."""
    global _eager_warned
    d = torch._dynamo
    missing = [n for n, ok in [("torch._dynamo.config.recompile_limit", hasattr(d.config, "recompile_limit")),
                               ("torch._dynamo.exc.FailOnRecompileLimitHit", hasattr(d.exc, "FailOnRecompileLimitHit"))]
               if not ok]
    if missing and not _eager_warned:
        _eager_warned = True
        warnings.warn(f"torch {torch.__version__} lacks {' and '.join(missing)} (both there from torch 2.7 on): "
                      "compile=True (--compile) decodes eagerly", stacklevel=3)
    return missing
