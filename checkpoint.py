"""Checkpoint files for model.py: Hugging Face checkpoints in, llava-hf / causal-LM checkpoints out.

config.json <-> configs, key renaming (llava-hf legacy and 5.x names, original LLaVA with a separate CLIP folder,
text-only LLaMA / Qwen2), sharded safetensors and weights-only .bin reading, what is checked before any weight loads
(check_checkpoint, check_clip), load_vlm / save_vlm / load_clip_text, and tokenizer files (tokenizer.json, or a
SentencePiece tokenizer.model parsed by hand).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import warnings
from dataclasses import asdict

import torch
import torch.nn as nn

import imaging
from files import atomic_write, read_json
from model import (
    VLM,
    CLIPImageTower,
    CLIPTextConfig,
    CLIPTextTower,
    DecoderConfig,
    VisionConfig,
    VLMConfig,
    image_seq_len,
)
from prompts import Tokenizer

# ----------------------------------------------------------------------------------------------------------------
# key renaming

_KEY_RULES = [   # first match wins
    (r"^language_model\.model\.(.*)", r"lm.\1"),
    (r"^model\.language_model\.(.*)", r"lm.\1"),
    (r"^(?:language_model\.)?lm_head\.(.*)", r"lm_head.\1"),
    (r"^(?:model\.)?vision_tower\.(?:vision_tower\.)?(?:vision_model\.)?(.*)", r"vision.\1"),   # incl. v5 prefix drop
    (r"^vision_model\.(.*)", r"vision.\1"),
    (r"^(?:model\.)?multi_modal_projector\.(linear_[12])\.(.*)", r"projector.\1.\2"),
    (r"^model\.mm_projector\.0\.(.*)", r"projector.linear_1.\1"),
    (r"^model\.mm_projector\.2\.(.*)", r"projector.linear_2.\1"),
    (r"^model\.(embed_tokens|layers|norm)(.*)", r"lm.\1\2"),
]
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$|.*position_ids$|^text_model\.|^(visual|text)_projection\.|"
                      r"^logit_(scale|bias)$|^model\.image_newline$|^vision\.head\.")


def canonical_key(key: str) -> str | None:
    """Checkpoint key -> our parameter name; None for keys that are ignored on purpose."""
    if _IGNORED.match(key):
        return None
    for pat, rep in _KEY_RULES:
        if re.match(pat, key):
            name = re.sub(pat, rep, key, count=1)
            return None if _IGNORED.match(name) else name
    return key


def _vision_dir_key(key: str) -> str | None:
    """Keys of a standalone CLIP/SigLIP checkpoint -> vision.*; text tower and heads ignored."""
    k = re.sub(r"^vision_model\.", "", key)
    if re.match(r"^(embeddings|pre_layrnorm|encoder|post_layernorm)\.", k) and not k.endswith("position_ids"):
        return "vision." + k
    return None


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used as it is; the message names the file, the key and what was expected."""


def message(e: Exception) -> str:
    """A loader error as one line (a KeyError's str() would quote it)."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


# ----------------------------------------------------------------------------------------------------------------
# config.json <-> configs (fields missing from a config.json take transformers' documented defaults; those that fix a
# weight's shape are checked against the weight files before any tensor loads: check_weights)

_DECODER_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False, attention_bias=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
                  attention_bias=True),   # Qwen2 q/k/v always carry a bias
}
_VISION_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6),
}
# LlavaConfig builds this CLIP tower when vision_config is absent (CLIP-L/14-336).
_LLAVA_VISION_DEFAULT = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                             num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                             projection_dim=768)


def _pick(d: dict, defaults: dict) -> dict:
    """Config fields present in d, transformers' default otherwise (an explicit null token id stays null)."""
    return {k: d[k] if k in d and (d[k] is not None or k.endswith("token_id")) else v for k, v in defaults.items()}



def decoder_config(d: dict, model_type: str | None = None) -> DecoderConfig:
    """A LLaMA / Qwen2 config.json (or a llava text_config) -> DecoderConfig; unsupported variants raise."""
    mt = model_type or d.get("model_type") or "llama"
    if mt not in _DECODER_DEFAULTS:
        raise ValueError(f"unknown text model_type {mt!r} in config.json; supported: {sorted(_DECODER_DEFAULTS)}")
    kw = _pick(d, _DECODER_DEFAULTS[mt])
    if mt == "qwen2":
        kw["attention_bias"] = True
        if d.get("use_sliding_window"):
            raise NotImplementedError("Qwen2 use_sliding_window=true is not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"decoder hidden_act {d['hidden_act']!r} (only silu)")
    if d.get("mlp_bias"):
        raise NotImplementedError("decoder mlp_bias=true is not supported")
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    rtype = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rtype != "default":
        raise NotImplementedError(f"rope type {rtype!r} is not supported (only 'default')")
    kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta") or kw["rope_theta"]))
    return DecoderConfig(model_type=mt, num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
                         **kw)


def vision_config(d: dict | None) -> VisionConfig:
    """A CLIP / SigLIP vision config -> VisionConfig; None gives LlavaConfig's default tower."""
    if d is None:   # LlavaConfig default tower
        d = dict(_LLAVA_VISION_DEFAULT)
    mt = d.get("model_type") or "clip_vision_model"
    mt = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}.get(mt, mt)
    if mt not in _VISION_DEFAULTS:
        raise ValueError(f"unknown vision model_type {mt!r}; supported: {sorted(_VISION_DEFAULTS)}")
    return VisionConfig(model_type=mt, **_pick(d, _VISION_DEFAULTS[mt]))


def clip_text_config(d: dict) -> CLIPTextConfig:
    """A CLIPModel or CLIPTextModel config.json -> CLIPTextConfig."""
    if d.get("model_type") == "clip":   # full CLIPModel config: nested text config (old files: text_config_dict)
        top = d
        d = dict(d.get("text_config") or d.get("text_config_dict") or {})
        d["projection_dim"] = top.get("projection_dim", 512)   # CLIPModel's text_projection uses the top level
    elif d.get("model_type") not in (None, "clip_text_model"):
        raise ValueError(f"unknown CLIP text model_type {d.get('model_type')!r}; expected 'clip' or 'clip_text_model'")
    return CLIPTextConfig(**_pick(d, asdict(CLIPTextConfig())))


def llava_config(d: dict) -> VLMConfig:
    """config.json of a llava-hf checkpoint (model_type "llava") -> VLMConfig."""
    text = dict(d.get("text_config") or {})   # transformers 5 ties if either level says so
    text["tie_word_embeddings"] = bool(text.get("tie_word_embeddings") or d.get("tie_word_embeddings"))
    if d.get("multimodal_projector_bias") is False:
        raise NotImplementedError("multimodal_projector_bias=false is not supported")
    return VLMConfig(text=decoder_config(text, text.get("model_type") or "llama"),
                     vision=vision_config(d.get("vision_config")),
                     image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
                     vision_feature_layer=d.get("vision_feature_layer", -2),
                     vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
                     projector_hidden_act=d.get("projector_hidden_act", "gelu"))


def _decoder_hf(c: DecoderConfig) -> dict:
    d = asdict(c)
    d.update(hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
             architectures=["LlamaForCausalLM" if c.model_type == "llama" else "Qwen2ForCausalLM"])
    if c.model_type == "qwen2":
        d.pop("attention_bias")
    return d


def _vision_hf(c: VisionConfig) -> dict:
    d = asdict(c)
    if c.model_type == "siglip_vision_model":
        d["vision_use_head"] = False
    return d


def hf_config(c: VLMConfig) -> dict:
    """VLMConfig -> a llava-hf config.json dict (LlamaForCausalLM / Qwen2ForCausalLM for a text-only model)."""
    if c.vision is None:
        return _decoder_hf(c.text)
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "text_config": _decoder_hf(c.text), "vision_config": _vision_hf(c.vision),
            "image_token_index": c.image_token_index, "vision_feature_layer": c.vision_feature_layer,
            "vision_feature_select_strategy": c.vision_feature_select_strategy,
            "projector_hidden_act": c.projector_hidden_act, "multimodal_projector_bias": True,
            "tie_word_embeddings": c.text.tie_word_embeddings, "image_seq_length": image_seq_len(c)}


def _vision_dict_from_dir(d: str) -> dict:
    """The vision config dict of a CLIP / SigLIP folder (a full CLIPModel / SiglipModel or a vision-only model)."""
    cfg = read_json(os.path.join(d, "config.json"), None)
    if cfg is None:
        raise FileNotFoundError(f"vision tower directory {d} has no config.json")
    mt = cfg.get("model_type")
    if mt in ("clip", "siglip"):
        v = dict(cfg.get("vision_config") or cfg.get("vision_config_dict") or {})
        v["model_type"] = mt + "_vision_model"
        return v
    if mt in ("clip_vision_model", "siglip_vision_model"):
        return cfg
    raise ValueError(f"{d}/config.json: unknown vision tower model_type {mt!r}; expected clip, siglip, "
                     f"clip_vision_model or siglip_vision_model")


def _vision_config_from_dir(d: str) -> VisionConfig:
    return vision_config(_vision_dict_from_dir(d))


ORIGINAL_IMAGE_TOKEN = -200   # LLaVA's IMAGE_TOKEN_INDEX sentinel (original layout has no image token in the vocab)
_LLAVA_TYPES = ("llava", "llava_llama", "llava_qwen2", "llava_qwen")


def load_config(path: str, vision_tower: str | None = None) -> VLMConfig:
    """config.json -> VLMConfig for the llava-hf, original LLaVA and text-only causal-LM layouts."""
    cfg_path = os.path.join(path, "config.json")
    cfg = read_json(cfg_path, None)
    if cfg is None:
        raise FileNotFoundError(f"{cfg_path} does not exist")
    mt = cfg.get("model_type")
    if mt in _DECODER_DEFAULTS:
        return VLMConfig(text=decoder_config(cfg), vision=None, layout="causal-lm", image_token_index=-1)
    if mt == "llava" and "text_config" in cfg:
        c = llava_config(cfg)
        c.layout = "llava-hf"
        return c
    if mt in _LLAVA_TYPES:   # original haotian-liu/LLaVA layout: LLaMA fields at the top level, mm_* fields
        vt = vision_tower or cfg.get("mm_vision_tower")
        if not vt or not os.path.isdir(vt):
            raise ValueError(f"{cfg_path}: original LLaVA layout needs the CLIP tower as a local directory: pass "
                             f"vision_tower=<dir> (config names mm_vision_tower={cfg.get('mm_vision_tower')!r})")
        ptype = cfg.get("mm_projector_type", "linear")
        if ptype != "mlp2x_gelu":
            raise NotImplementedError(f"{cfg_path}: mm_projector_type {ptype!r} (only 'mlp2x_gelu')")
        vcfg = _vision_config_from_dir(vt)
        c = VLMConfig(text=decoder_config(cfg, "qwen2" if "qwen" in mt else "llama"), vision=vcfg,
                      image_token_index=ORIGINAL_IMAGE_TOKEN,
                      vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
                      vision_feature_select_strategy=("default" if cfg.get("mm_vision_select_feature", "patch")
                                                      == "patch" else "full"),
                      layout="original", image_aspect_ratio=cfg.get("image_aspect_ratio"),
                      vision_tower=vt)
        mm = cfg.get("mm_hidden_size")
        n = len(c.vision_feature_layer) if isinstance(c.vision_feature_layer, list) else 1
        if mm is not None and mm != vcfg.hidden_size * n:
            raise ValueError(f"{cfg_path}: mm_hidden_size {mm} != vision hidden_size {vcfg.hidden_size} x {n} layers "
                             f"from {vt}/config.json")
        return c
    raise ValueError(f"{cfg_path}: unknown model_type {mt!r}; supported: llava (llava-hf or original layout), "
                     f"llava_llama, llava_qwen2, llama, qwen2")


_SHAPE_KEYS = {"text": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim"),
               "vision": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "num_channels", "image_size", "patch_size")}


def defaulted_shape_keys(path: str, config: VLMConfig) -> dict:
    """{"text"|"vision": ["text_config.hidden_size (default 4096)", ...]}: the keys that fix weight shapes but that
    config.json leaves to transformers' defaults, with the value the default gave them (llava-1.5-7b-hf's text_config
    has none of its sizes: they are LlamaConfig's)."""
    cfg = read_json(os.path.join(path, "config.json"))
    if config.layout == "llava-hf":
        parts = [("text", "text_config.", cfg.get("text_config") or {}, config.text)]
        if cfg.get("vision_config") is None:
            return {"text": _absent(*parts[0]), "vision": ["vision_config (LlavaConfig's CLIP-L/14-336 tower)"]}
        parts.append(("vision", "vision_config.", cfg["vision_config"], config.vision))
    else:
        parts = [("text", "", cfg, config.text)]
        if config.layout == "original":
            parts.append(("vision", f"{config.vision_tower}/config.json:vision_config.",
                          _vision_dict_from_dir(config.vision_tower), config.vision))
    return {part: _absent(part, prefix, d, c) for part, prefix, d, c in parts}


def _absent(part, prefix, d, c):
    return [f"{prefix}{k} (default {getattr(c, k)})" for k in _SHAPE_KEYS[part] if d.get(k) is None]


# ----------------------------------------------------------------------------------------------------------------
# weights and models

def checkpoint_files(d: str) -> list:
    """Weight files of a checkpoint dir: sharded (index json) or single; safetensors preferred over .bin."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        ip = os.path.join(d, index)
        if os.path.exists(ip):
            wm = read_json(ip).get("weight_map")
            if not isinstance(wm, dict):
                raise ValueError(f"{ip}: no 'weight_map' object")
            files = []
            for key, shard in wm.items():
                p = os.path.join(d, shard)
                if not os.path.exists(p):
                    raise FileNotFoundError(f"{ip} maps {key!r} to shard {shard!r}, but {p} does not exist")
                if p not in files:
                    files.append(p)
            return files
        if os.path.exists(os.path.join(d, single)):
            return [os.path.join(d, single)]
    raise FileNotFoundError(f"no weights in {d}: expected model.safetensors(.index.json) or "
                            f"pytorch_model.bin(.index.json)")


def iter_tensors(path: str):
    """Yield (key, tensor) one at a time from a .safetensors or .bin file (never unpickles arbitrary objects)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            f = safe_open(path, framework="pt")
        except Exception as e:
            raise ValueError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e
        with f:
            for k in list(f.keys()):
                try:
                    t = f.get_tensor(k)
                except Exception as e:
                    raise ValueError(f"{path}: cannot read tensor {k!r} (truncated or corrupt?): {e}") from e
                yield k, t
        return
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:   # legacy (non-zip) pickles cannot be mmapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refusing to load: the file contains pickled objects other than tensors "
                         f"(torch.load(weights_only=True) said: {str(e).splitlines()[0]})") from e
    except Exception as e:
        raise ValueError(f"{path}: cannot read torch checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    yield from sd.items()


def _mismatch(path, key, name, have, want) -> str:
    return (f"{path}: shape mismatch for {key!r} (-> {name}): checkpoint has {tuple(have)}, config.json implies "
            f"{tuple(want)}")


def tensor_shapes(path: str) -> dict:
    """{key: shape} of a weight file without reading its tensors: the safetensors header (a file cut short raises
    CheckpointError), or a .bin memory-mapped."""
    if not path.endswith(".safetensors"):
        return {k: tuple(t.shape) for k, t in iter_tensors(path)}
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}; expected a "
                              f"complete safetensors file") from None


def check_weights(model: VLM, path: str, files: list, vision_tower: str | None = None):
    """Before any tensor loads: every weight file readable, and each weight's shape the one config.json implies. When
    config.json left shape keys to transformers' defaults, any disagreement (shape, missing or extra layers) names
    them (CheckpointError); otherwise a shape mismatch raises CheckpointError and missing weights KeyError."""
    have = {canonical_key(k): (f, k, s) for f in files for k, s in tensor_shapes(f).items()}
    if model.vision is not None and vision_tower and not any(str(n).startswith("vision.") for n in have):
        have |= {_vision_dir_key(k): (f, k, s) for f in checkpoint_files(vision_tower)
                 for k, s in tensor_shapes(f).items()}
    have.pop(None, None)
    if model.config.text.tie_word_embeddings:
        have.pop("lm_head.weight", None)
    want = {n: tuple(t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    bad = [(n, _mismatch(f, k, n, s, want[n])) for n, (f, k, s) in have.items() if n in want and s != want[n]]
    missing = [n for n in want if n not in have and not n.startswith("vision.post_layernorm.")]
    extra = [(n, f"{k!r} in {f} belongs to a layer that config.json does not have") for n, (f, k, _) in have.items()
             if n not in want and re.search(r"\.layers\.\d+\.", n)]
    problems = bad + [(n, f"no weight for {n} in {path}") for n in missing] + extra
    if not problems:
        return
    name, first = problems[0]
    absent = defaulted_shape_keys(path, model.config)
    absent = absent.get("vision", []) if name.startswith("vision.") else absent["text"] + (
        absent.get("vision", []) if name.startswith("projector.") else [])
    more = lambda xs: f" (and {len(xs) - 1} more)" if len(xs) > 1 else ""
    if absent:
        raise CheckpointError(f"{path}/config.json lacks {', '.join(absent)}, and transformers' default does not "
                              f"fit the weights: {first}{more(problems)}; expected the key in config.json")
    if bad:
        raise CheckpointError(bad[0][1] + more(bad))
    if missing:
        raise KeyError(f"load_vlm({path}): {len(missing)} missing weights after key mapping: {missing[:20]}"
                       + (" ..." if len(missing) > 20 else ""))


def _assign(model: nn.Module, name: str, t: torch.Tensor):
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        setattr(mod, attr, nn.Parameter(t, requires_grad=t.is_floating_point()))
    else:
        mod._buffers[attr] = t


def load_weights(model: nn.Module, files: list, rename=canonical_key, dtype=None, device=None,
                 loaded: set | None = None, unexpected: list | None = None):
    """Assign tensors file by file into a (meta-device) model; shape-checked, one tensor in flight at a time."""
    loaded = set() if loaded is None else loaded
    unexpected = [] if unexpected is None else unexpected
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    tied = getattr(getattr(model, "config", None), "text", None)
    tied = bool(tied and tied.tie_word_embeddings)
    for path in files:
        for key, t in iter_tensors(path):
            name = rename(key)
            if name is None or (tied and name == "lm_head.weight"):
                continue
            if name not in targets:
                unexpected.append(key)
                continue
            want = targets[name]
            if tuple(t.shape) != tuple(want.shape):
                raise CheckpointError(_mismatch(path, key, name, t.shape, want.shape))
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            _assign(model, name, t.to(device) if device is not None else t)
            loaded.add(name)
    return loaded, unexpected


def _finish_load(model: nn.Module, loaded: set, unexpected: list, where: str, optional=r"^vision\.post_layernorm\.",
                 dtype=None, device=None):
    """Raise on missing keys (by name), warn on unexpected ones; materialise optional unused params."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, _ in list(model.named_parameters()) + list(model.named_buffers()) if n not in loaded]
    hard = [n for n in missing if not re.match(optional, n)]
    if hard:
        raise KeyError(f"{where}: {len(hard)} missing weights after key mapping: {hard[:20]}"
                       + (" ..." if len(hard) > 20 else ""))
    for n in missing:   # e.g. vision.post_layernorm: never used by LLaVA, some checkpoints drop it
        p = dict(model.named_parameters())[n]
        init = torch.ones if n.endswith("weight") else torch.zeros
        _assign(model, n, init(p.shape, dtype=dtype or torch.float32, device=device))
    if unexpected:
        warnings.warn(f"{where}: ignoring {len(unexpected)} unexpected keys: {unexpected[:20]}"
                      + (" ..." if len(unexpected) > 20 else ""))
    return {"missing": missing, "unexpected": unexpected}


def load_vlm(path: str, vision_tower: str | None = None, dtype=None, device=None) -> VLM:
    """Load a local checkpoint directory (llava-hf / v5 names / original LLaVA + CLIP dir / text-only LLaMA, Qwen2).
    The model is built on the meta device and tensors are assigned shard by shard, so weights are never held twice.
    dtype None keeps the on-disk dtype. Missing weights raise (by name); unexpected ones warn (by name)."""
    path = str(path)
    config = load_config(path, vision_tower)
    with torch.device("meta"):
        model = VLM(config)
    files, vt = checkpoint_files(path), vision_tower or config.vision_tower
    check_weights(model, path, files, vt)
    loaded, unexpected = load_weights(model, files, dtype=dtype, device=device)
    if model.vision is not None and vt and not any(n.startswith("vision.") for n in loaded):
        load_weights(model, checkpoint_files(str(vt)), rename=_vision_dir_key, dtype=dtype, device=device,
                     loaded=loaded, unexpected=[])   # a CLIPModel file: text tower etc. are not ours
    model.load_info = _finish_load(model, loaded, unexpected, f"load_vlm({path})", dtype=dtype, device=device)
    model.tie_weights()
    return model.eval()


def check_tokenizer(tokenizer: Tokenizer, config: VLMConfig, path: str):
    """Every token id below the model's vocab_size, and (llava-hf) image_token_index the tokenizer's <image> id."""
    key = "text_config." if config.layout == "llava-hf" else ""
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    top = max(vocab, key=vocab.get)
    if vocab[top] >= config.text.vocab_size:
        tf = "tokenizer.json" if os.path.exists(os.path.join(path, "tokenizer.json")) else "tokenizer.model"
        raise CheckpointError(f"{path}/{tf}: token {top!r} has id {vocab[top]}, outside the model's vocabulary "
                              f"(config.json {key}vocab_size {config.text.vocab_size}); expected every token id "
                              f"below vocab_size")
    img, idx = tokenizer.image_token_id, config.image_token_index
    if config.layout == "llava-hf" and (img not in (None, idx) or not 0 <= idx < config.text.vocab_size):
        cfg = read_json(os.path.join(path, "config.json"))
        given = "image_token_index" in cfg or "image_token_id" in cfg
        what = f"image_token_index {idx}" if given else f"no image_token_index (LlavaConfig's default {idx} was used)"
        raise CheckpointError(f"{path}/config.json has {what}; expected " + (
            f"the tokenizer's <image> id {img}" if img is not None else f"an id below {key}vocab_size "
                                                                       f"{config.text.vocab_size}"))


def check_checkpoint(path: str, vision_tower: str | None = None) -> VLMConfig:
    """What can be checked before any weight loads: config.json, the weight files against it (check_weights), the
    tokenizer against its vocabulary (check_tokenizer). Returns the config."""
    path = str(path)
    config = load_config(path, vision_tower)
    with torch.device("meta"):
        model = VLM(config)
    check_weights(model, path, checkpoint_files(path), vision_tower or config.vision_tower)
    check_tokenizer(load_tokenizer(path), config, path)
    return config


def _hf_state_dict(model: VLM) -> dict:
    """Our state dict under transformers' on-disk names (tied lm_head left out)."""
    return {model.hf_module_name(name, legacy=True): t.detach().contiguous() for name, t in model.state_dict().items()
            if not (name == "lm_head.weight" and model.config.text.tie_word_embeddings)}


def save_vlm(model: VLM, out_dir: str, tokenizer: "Tokenizer | None" = None):
    """Write config.json + model.safetensors in the llava-hf layout (legacy on-disk names, readable by transformers
    4.x and 5.x), or the LlamaForCausalLM / Qwen2ForCausalLM layout for a text-only model."""
    from safetensors.torch import save_file
    if model.vision is not None and not 0 <= model.config.image_token_index < model.config.text.vocab_size:
        raise ValueError(f"save_vlm: image_token_index {model.config.image_token_index} is not a vocabulary id; "
                         f"the llava-hf layout needs <image> in the vocabulary")
    os.makedirs(out_dir, exist_ok=True)
    cfg = hf_config(model.config)
    cfg["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    _write_json(os.path.join(out_dir, "config.json"), cfg)
    atomic_write(os.path.join(out_dir, "model.safetensors"),
                 lambda tmp: save_file(_hf_state_dict(model), tmp, metadata={"format": "pt"}))
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)


def load_clip_text(path: str, dtype=None, device=None, image_tower: bool = False, pad_to_square: bool = False):
    """A CLIPModel / CLIPTextModel(WithProjection) directory -> (CLIPTextTower, Tokenizer). image_tower=True (a full
    CLIPModel): also its vision tower and visual_projection as tower.image_tower, with the folder's image
    pre-processing (padded to a square first with pad_to_square, as LLaVA-1.5) as tower.image_tower.processor."""
    path = str(path)
    cfg = _clip_config(path, image_tower)
    c = clip_text_config(cfg)
    files = checkpoint_files(path)
    vision = r"^(visual_projection\.weight$|vision_model\.(embeddings|pre_layrnorm|encoder|post_layernorm)\.)"

    def rename(k):   # CLIPModel: text_model.* (vision_model.* for image_tower); CLIPTextModel: with or without prefix
        if k == "text_projection.weight":
            return k
        if image_tower and re.match(vision, k) and not k.endswith("position_ids"):
            return "image_tower." + k
        k = re.sub(r"^text_model\.", "", k)
        ok = re.match(r"^(embeddings|encoder|final_layer_norm)\.", k) and not k.endswith("position_ids")
        return k if ok else None

    with torch.device("meta"):
        tower = CLIPTextTower(c)
        if image_tower:
            vc = vision_config(_vision_dict_from_dir(path))
            tower.image_tower = CLIPImageTower(vc, cfg.get("projection_dim", 512))
    loaded, unexpected = load_weights(tower, files, rename=rename, dtype=dtype, device=device)
    if "text_projection.weight" not in loaded:   # a CLIPTextModel without projection
        tower.text_projection = None
    tower.load_info = _finish_load(tower, loaded, unexpected, f"load_clip_text({path})", optional=r"^$")
    if image_tower:
        tower.image_tower.processor = (
            imaging.ImageProcessor.from_dir(path, pad_to_square=pad_to_square)
            if os.path.exists(os.path.join(path, "preprocessor_config.json"))
            else imaging.ImageProcessor.clip(vc.image_size, pad_to_square=pad_to_square))
    return tower.eval(), load_tokenizer(path)


def _clip_config(path: str, image_tower: bool) -> dict:
    cfg = read_json(os.path.join(path, "config.json"), None)
    if cfg is None:
        raise FileNotFoundError(f"{path}/config.json does not exist")
    if image_tower and cfg.get("model_type") != "clip":
        raise CheckpointError(f"{path}/config.json: model_type {cfg.get('model_type')!r}; image identities need a "
                              f"full CLIPModel (model_type 'clip': a vision tower and visual_projection)")
    return cfg


def check_clip(path: str, image_tower: bool = False):
    """load_clip_text's inputs before any weight loads: config.json, the weight files whole, the tokenizer."""
    path = str(path)
    clip_text_config(_clip_config(path, image_tower))
    for f in checkpoint_files(path):
        tensor_shapes(f)
    load_tokenizer(path)


# ----------------------------------------------------------------------------------------------------------------
# tokenizer files

def _proto_fields(b: bytes):
    """Yield (field, value) of a protobuf message: varint, fixed64, length-delimited (bytes), fixed32 (float)."""
    def varint(i):
        r = shift = 0
        while True:
            c = b[i]
            i += 1
            r |= (c & 0x7F) << shift
            shift += 7
            if c < 0x80:
                return r, i
    i = 0
    while i < len(b):
        key, i = varint(i)
        wt = key & 7
        if wt == 0:
            v, i = varint(i)
        elif wt == 2:
            n, i = varint(i)
            v, i = b[i:i + n], i + n
        elif wt == 5:
            v, i = struct.unpack("<f", b[i:i + 4])[0], i + 4
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield key >> 3, v


def sentencepiece_tokenizer(path: str):
    """A LLaMA-style SentencePiece BPE `tokenizer.model` -> tokenizers.Tokenizer, built the way transformers'
    LlamaConverter (legacy) builds the shipped tokenizer.json. The protobuf is parsed by hand."""
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as _Tok
    from tokenizers.models import BPE
    pieces, trainer, norm = [], {}, {}
    with open(path, "rb") as f:
        for fid, v in _proto_fields(f.read()):
            # SentencePiece {piece = 1, score = 2, type = 3 (1 normal, 2 unk, 3 control, 4 user, 6 byte)}
            if fid == 1:
                p = dict(_proto_fields(v))
                pieces.append((p.get(1, b"").decode("utf-8"), p.get(2, 0.0), p.get(3, 1)))
            elif fid == 2:   # TrainerSpec {model_type = 3, unk_id = 40, bos_id = 41}
                trainer = dict(_proto_fields(v))
            elif fid == 3:   # NormalizerSpec {add_dummy_prefix = 3}
                norm = dict(_proto_fields(v))
    if trainer.get(3, 1) != 2:
        raise ValueError(f"{path}: SentencePiece model_type {trainer.get(3, 1)} is not BPE (2); only BPE is supported")
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    scores = [(p, 0.0 if i < 3 else s) for i, (p, s, _) in enumerate(pieces)]   # LlamaConverter zeroes 0..2
    merges = []   # transformers' generate_merges(vocab, vocab_scores)
    for piece, score in scores:
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]]))
    merges = sorted(merges, key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
    merges = [(left, right) for left, right, _ in merges]
    tok = _Tok(BPE(vocab, merges, unk_token=pieces[trainer.get(40, 0)][0], fuse_unk=True, byte_fallback=True))
    tok.add_tokens([AddedToken(p, normalized=False, special=t != 4) for p, _, t in pieces if t in (2, 3, 4)])
    prefix = bool(norm.get(3, 1))
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                          + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    bos = trainer.get(41, 1)
    if 0 <= bos < len(pieces):
        tok.post_processor = processors.TemplateProcessing(single=f"{pieces[bos][0]} $A",
                                                           pair=f"{pieces[bos][0]} $A {pieces[bos][0]} $B",
                                                           special_tokens=[(pieces[bos][0], bos)])
    return tok


def _token_str(v):
    return v.get("content") if isinstance(v, dict) else v


def load_tokenizer(path: str) -> Tokenizer:
    """A checkpoint folder's tokenizer: tokenizer.json (or tokenizer.model), special tokens from
    tokenizer_config.json / special_tokens_map.json / config.json."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as _Tok
    path = str(path)
    tj, sp = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
    if os.path.exists(tj):
        tok = _Tok.from_file(tj)
    elif os.path.exists(sp):   # e.g. liuhaotian/llava-v1.5-7b ships only the SentencePiece model
        tok = sentencepiece_tokenizer(sp)
    else:
        raise FileNotFoundError(f"{path}: neither tokenizer.json nor tokenizer.model exists")
    tc = read_json(os.path.join(path, "tokenizer_config.json"), {})
    sm = read_json(os.path.join(path, "special_tokens_map.json"), {})
    mc = read_json(os.path.join(path, "config.json"), {})
    for sid, info in sorted((tc.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        if tok.token_to_id(info["content"]) is None:   # declared only in tokenizer_config
            tok.add_special_tokens([AddedToken(info["content"], special=info.get("special", True),
                                               normalized=info.get("normalized", False),
                                               lstrip=info.get("lstrip", False), rstrip=info.get("rstrip", False),
                                               single_word=info.get("single_word", False))])
            if tok.token_to_id(info["content"]) != int(sid):
                warnings.warn(f"{path}: added token {info['content']!r} got id {tok.token_to_id(info['content'])},"
                              f" tokenizer_config.json says {sid}")
    text_cfg = mc.get("text_config") or mc

    def special(name):
        s = _token_str(tc.get(name)) or _token_str(sm.get(name))
        if s is not None and tok.token_to_id(s) is not None:
            return tok.token_to_id(s)
        v = text_cfg.get(name + "_id", mc.get(name + "_id"))
        return v[0] if isinstance(v, list) else v

    bos, eos, pad = special("bos_token"), special("eos_token"), special("pad_token")
    if pad is None:   # original LLaVA pads with unk (id 0)
        unk = _token_str(tc.get("unk_token")) or _token_str(sm.get("unk_token"))
        pad = tok.token_to_id(unk) if unk is not None else None
    pad = eos if pad is None else pad
    return Tokenizer(tok, bos, eos, pad, tc.get("add_bos_token"))


def save_tokenizer(tokenizer: Tokenizer, out_dir: str):
    """Write tokenizer.json and a tokenizer_config.json naming the special tokens."""
    atomic_write(os.path.join(out_dir, "tokenizer.json"), tokenizer.tok.save)
    name = lambda i: None if i is None else tokenizer.tok.id_to_token(i)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"),
                {"bos_token": name(tokenizer.bos_id), "eos_token": name(tokenizer.eos_id),
                 "pad_token": name(tokenizer.pad_id), "add_bos_token": tokenizer.add_bos})


def _write_json(path, obj):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)
