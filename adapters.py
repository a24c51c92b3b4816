"""Adapter files for lora.py's layers: our own exact format and PEFT's LoRA format.

save_adapter / load_adapter: every subspace, routers, extra tensors (identity keys...) and JSON metadata in one
safetensors file. save_peft_adapter / load_peft_adapter: adapter_config.json + adapter_model.safetensors as peft
writes and reads them, with module names mapped through model.hf_module_name or checkpoint's key rules.
"""
import json
import math
import os
import re

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint import canonical_key
from files import atomic_write
from lora import (
    NEVER,
    LoRALinear,
    _freeze_all,
    _get_parent,
    _parse_key,
    _require,
    _share_dropout,
    load_lora_state,
    lora_modules,
    lora_state,
    set_active,
)

# ----------------------------------------------------------------------------------------------------
# files


def _atomic_save_safetensors(tensors, path, metadata):
    atomic_write(path, lambda tmp: save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()},
                                             tmp, metadata=metadata))


def _atomic_write_text(text, path):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def _read_safetensors(path):
    """(tensors, metadata); a clear error for anything that is not a safetensors file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # SafetensorError, header errors
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                         f"only safetensors adapters are supported") from e


# ----------------------------------------------------------------------------------------------------
# our format


FORMAT_KEY = "fcit_lora"


def _layer_config(m):
    return {"rank": m.rank, "num_subspaces": m.num_subspaces, "alpha": m.lora_alpha,
            "scaling": m.scaling_mode, "init": m.init_mode, "dropout": m.dropout,
            "in": m.in_features, "out": m.out_features, "router": m.router is not None,
            "dtype": str(m.A[0].dtype).replace("torch.", "")}


def save_adapter(model, path, extra=None, metadata=None):
    """Our full format, one safetensors file: every subspace (and router) under its lora_state name,
    `extra` tensors under 'extra.<key>' (e.g. identity keys / sizes), the per-layer LoRA configuration and
    the JSON-serialisable `metadata` in the safetensors header. Atomic. Round-trips exactly."""
    mods = _require(model)
    tensors = lora_state(model)
    for k, v in (extra or {}).items():
        tensors[f"extra.{k}"] = torch.as_tensor(v)
    header = {"format": "pt",
              FORMAT_KEY: json.dumps({"version": 1, "layers": {n: _layer_config(m) for n, m in mods.items()}}),
              "metadata": json.dumps(metadata if metadata is not None else {})}
    _atomic_save_safetensors(tensors, path, header)
    return path


def adapter_metadata(path) -> dict:
    """The JSON metadata a `save_adapter` file carries (e.g. the method and stage that wrote it)."""
    _, header = _read_safetensors(path)
    if FORMAT_KEY not in header:
        raise ValueError(f"{path}: not an fcit LoRA adapter (no '{FORMAT_KEY}' header)")
    return json.loads(header.get("metadata") or "{}")


def load_adapter(model, path):
    """Load a `save_adapter` file. Modules without LoRA are wrapped with the stored configuration (then
    everything else is frozen and subspace 0 is active); modules with LoRA must match it. Everything is
    validated before the model is touched. Returns (extra: dict[str, Tensor], metadata)."""
    tensors, header = _read_safetensors(path)
    if FORMAT_KEY not in header:
        raise ValueError(f"{path}: not an fcit LoRA adapter (no '{FORMAT_KEY}' header; for PEFT adapters use "
                         f"load_peft_adapter)")
    layers = json.loads(header[FORMAT_KEY])["layers"]
    to_wrap = []
    for name, c in layers.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: module {name!r} is not in the model") from None
        if isinstance(mod, nn.Linear):
            if (mod.in_features, mod.out_features) != (c["in"], c["out"]):
                raise ValueError(f"{name}: adapter is for ({c['in']} -> {c['out']}), model has "
                                 f"({mod.in_features} -> {mod.out_features})")
            to_wrap.append(name)
        elif isinstance(mod, LoRALinear):
            got = (mod.rank, mod.num_subspaces, mod.lora_alpha, mod.scaling_mode)
            want = (c["rank"], c["num_subspaces"], float(c["alpha"]), c["scaling"])
            if got != want:
                raise ValueError(f"{name}: model LoRA (rank, K, alpha, scaling)={got} != adapter {want}")
        else:
            raise ValueError(f"{name}: is a {type(mod).__name__}, not a linear layer")
    state = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    for k, v in state.items():
        name, kind, j = _parse_key(k)
        if name not in layers:
            raise ValueError(f"{k}: module not described in the adapter header")
        c = layers[name]
        K, r = c["num_subspaces"], c["rank"] // c["num_subspaces"]
        want = {"A": (r, c["in"]), "B": (c["out"], r), "router": (K, c["in"])}[kind]
        if tuple(v.shape) != want or (j is not None and j >= K):
            raise ValueError(f"{k}: shape {tuple(v.shape)} / index does not fit the header ({want}, K={K})")
    for name in to_wrap:
        c = layers[name]
        parent, _, child = _get_parent(model, name)
        setattr(parent, child, LoRALinear(getattr(parent, child), c["rank"], c["alpha"], c["num_subspaces"],
                                          c["scaling"], c["init"], c["dropout"],
                                          dtype=getattr(torch, c.get("dtype", "float32"))))
    if to_wrap:
        _share_dropout(model, to_wrap, max(layers[n]["dropout"] for n in to_wrap))
    load_lora_state(model, state)
    if to_wrap:
        _freeze_all(model)
        set_active(model, 0)
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return extra, json.loads(header.get("metadata", "{}"))


# ----------------------------------------------------------------------------------------------------
# PEFT's format


def _hf_name(model, name, legacy=False):
    fn = getattr(model, "hf_module_name", None)
    return fn(name, legacy) if callable(fn) else name


def _num(x):
    return int(x) if float(x).is_integer() else float(x)


def _target_regex(model, names, legacy):
    """A regex (re.fullmatch, PEFT semantics) matching exactly the hf paths of our module `names` among all
    the model's modules: layer indices generalised to \\d+ when that stays exact, else an explicit
    alternation. legacy=True matches both the legacy and the current paths (old and new transformers)."""
    variants = (False, True) if legacy else (False,)
    all_hf = set()
    for n, _ in model.named_modules():
        for v in variants:
            try:
                all_hf.add(_hf_name(model, n, v)) if n else None
            except ValueError:          # a module outside the mapped parts has no transformers name
                continue
    want = {_hf_name(model, n, v) for n in names for v in variants}
    general = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(h)) for h in want})
    rx = "(" + "|".join(general) + ")"
    if {h for h in all_hf if re.fullmatch(rx, h)} == want:
        return rx
    return "(" + "|".join(re.escape(h) for h in sorted(want)) + ")"


def save_peft_adapter(model, out_dir, alpha=None, legacy_names=False, dtype=torch.float32,
                      base_model_name_or_path=None):
    """Write adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained loads on the
    equivalent transformers model: each layer becomes ONE rank-(K r) LoRA, its subspaces mixed by fixed weights alpha
    (K,) (default: the current single/routed choice). Module names from model.hf_module_name(name, legacy_names)."""
    # lora_A = A_cat, lora_B = B_cat diag(alpha), lora_alpha = s * K r: PEFT's lora_alpha / r reproduces our s exactly
    # (fcit scaling: lora_alpha = alpha; peft scaling: lora_alpha = alpha * K). A model without hf_module_name keeps
    # our names; target_modules is a regex over exactly the wrapped modules.
    mods = _require(model)
    tensors, hf_names, ranks, alphas, drops = {}, [], set(), set(), set()
    for name, m in mods.items():
        if m._merged is not None:
            raise RuntimeError("LoRA weights are merged; call unmerge(model) before saving an adapter")
        a = m._effective_alpha() if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        if a.dim() != 1 or a.numel() != m.num_subspaces:
            raise ValueError(f"{name}: alpha must have shape ({m.num_subspaces},), got {tuple(a.shape)}")
        R = m.num_subspaces * m.r
        lora_alpha = m.scaling * R
        A = torch.cat([p.detach().float() for p in m.A], 0)
        B = torch.cat([p.detach().float() for p in m.B], 1) * a.float().repeat_interleave(m.r).to(A.device)
        hf = _hf_name(model, name, legacy_names)
        hf_names.append(hf)
        tensors[f"base_model.model.{hf}.lora_A.weight"] = A.to(dtype)
        tensors[f"base_model.model.{hf}.lora_B.weight"] = B.to(dtype)
        ranks.add(R)
        alphas.add(lora_alpha)
        drops.add(m.dropout)
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"layers differ in exported rank {sorted(ranks)} or lora_alpha {sorted(alphas)}; "
                         f"one adapter needs one r and lora_alpha")
    R, lora_alpha = ranks.pop(), alphas.pop()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": R, "lora_alpha": _num(lora_alpha), "lora_dropout": max(drops), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "target_modules": _target_regex(model, list(mods), legacy_names),
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    _atomic_save_safetensors(tensors, os.path.join(out_dir, "adapter_model.safetensors"), {"format": "pt"})
    _atomic_write_text(json.dumps(config, indent=2), os.path.join(out_dir, "adapter_config.json"))
    return out_dir


def _pattern_value(patterns, hf, default):
    for k, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({k})$", hf):
            return v
    return default


def _read_peft_dir(adapter_dir):
    """(adapter_config.json as a dict, adapter_model.safetensors tensors) of a PEFT LoRA folder; refuses what we
    cannot load (another peft_type, DoRA, fan_in_fan_out, weights not in safetensors)."""
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing (not a PEFT adapter directory)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA").upper() != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise ValueError(f"{cfg_path}: DoRA adapters are not supported")
    if cfg.get("fan_in_fan_out"):
        raise ValueError(f"{cfg_path}: fan_in_fan_out adapters (Conv1D models) are not supported")
    wpath = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(wpath):
        others = [p for p in os.listdir(adapter_dir) if p.startswith("adapter_model")]
        raise ValueError(f"{adapter_dir}: no adapter_model.safetensors (found {others}); only safetensors "
                         f"adapters are supported")
    tensors, _ = _read_safetensors(wpath)
    return cfg, tensors


def _peft_module_lookup(model):
    """{name: our module name} for every linear (or LoRA) module, under our names and, through
    model.hf_module_name, under its current and legacy transformers names."""
    lookup = {}
    has_hf = callable(getattr(model, "hf_module_name", None))
    for n, mod in model.named_modules():
        if not n or not isinstance(mod, (nn.Linear, LoRALinear)):
            continue
        lookup.setdefault(n, n)
        if has_hf:
            for legacy in (False, True):
                try:
                    lookup.setdefault(model.hf_module_name(n, legacy), n)
                except ValueError:      # a module outside the mapped parts has no transformers name
                    continue
    return lookup


def _our_module(lookup, path, key):
    """Our module name for the adapter's module `path`, found as is or after checkpoint's key rules (transformers'
    names, for a model without hf_module_name); the error names the adapter tensor `key`."""
    if path in lookup:
        return lookup[path]
    cand = canonical_key(path)
    if cand in lookup:
        return lookup[cand]
    raise ValueError(f"{key}: module {path!r} is not in the model")


def _peft_pairs(tensors):
    """{module path: {"A": (key, tensor), "B": (key, tensor)}}, 'base_model.model.' stripped; only Linear
    lora_A / lora_B weights are accepted."""
    pairs = {}
    for key, t in tensors.items():
        k = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        mt = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", k)
        if mt is None:
            raise ValueError(f"{key}: unsupported adapter tensor (only Linear lora_A/lora_B weights; no "
                             f"embedding LoRA, DoRA, lora bias or modules_to_save)")
        pairs.setdefault(mt.group(1), {})[mt.group(2)] = (key, t)
    return pairs


def _plan_peft_load(model, cfg, pairs, lookup, subspace):
    """Check every pair against the config and its module before anything is changed: a list of
    (name, module, A, B, rank, lora_alpha, scaling in the file)."""
    had_lora = bool(lora_modules(model))
    never = re.compile(NEVER)
    plan = []
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            key = next(iter(ab.values()))[0]
            raise ValueError(f"{key}: lora_{'B' if 'A' in ab else 'A'} missing for {path}")
        (ka, A), (_, B) = ab["A"], ab["B"]
        name = _our_module(lookup, path, ka)
        mod = model.get_submodule(name)
        R = A.shape[0]
        r_cfg = _pattern_value(cfg.get("rank_pattern"), path, cfg.get("r", 8))
        a_cfg = _pattern_value(cfg.get("alpha_pattern"), path, cfg.get("lora_alpha", 8))
        if R != r_cfg:
            raise ValueError(f"{ka}: rank {R} != r={r_cfg} in adapter_config.json")
        s_file = a_cfg / (math.sqrt(R) if cfg.get("use_rslora") else R)
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != mod.in_features or tuple(B.shape) != (mod.out_features, R):
            raise ValueError(f"{ka}: shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit {name} "
                             f"(in={mod.in_features}, out={mod.out_features})")
        if isinstance(mod, nn.Linear):
            if had_lora:
                raise ValueError(f"{ka}: module {name} is not targeted by LoRA in this model")
            if never.search(name):
                raise ValueError(f"{ka}: module {name} is outside the language model")
        elif subspace is not None:
            if not 0 <= subspace < mod.num_subspaces or R != mod.r:
                raise ValueError(f"{ka}: rank {R} does not fit subspace {subspace} (K={mod.num_subspaces}, "
                                 f"r={mod.r}) of {name}")
        elif R != mod.num_subspaces * mod.r:
            raise ValueError(f"{ka}: rank {R} fits neither one subspace nor all {mod.num_subspaces} "
                             f"(r={mod.r}) of {name}; pass subspace=")
        plan.append((name, mod, A, B, R, a_cfg, s_file))
    return plan


def _apply_peft_plan(model, cfg, plan, subspace):
    """Write a checked plan: wrap plain linears as K=1 layers, copy A and B (rescaled to our scaling) into
    `subspace` or split over the K subspaces."""
    new = []
    for name, mod, A, B, R, a_cfg, s_file in plan:
        if isinstance(mod, nn.Linear):
            parent, _, child = _get_parent(model, name)
            mod = LoRALinear(mod, R, a_cfg, 1, scaling="peft", init="peft",
                             dropout=float(cfg.get("lora_dropout", 0.0)))
            setattr(parent, child, mod)
            new.append(name)
        with torch.no_grad():
            ratio = s_file / mod.scaling
            Bs = B.float() * ratio if ratio != 1.0 else B
            if subspace is not None:
                mod.A[subspace].copy_(A)
                mod.B[subspace].copy_(Bs)
            else:
                for j in range(mod.num_subspaces):
                    mod.A[j].copy_(A[j * mod.r:(j + 1) * mod.r])
                    mod.B[j].copy_(Bs[:, j * mod.r:(j + 1) * mod.r])
    if new:
        _share_dropout(model, new, float(cfg.get("lora_dropout", 0.0)))
        _freeze_all(model)
        set_active(model, 0)


def load_peft_adapter(model, adapter_dir, subspace=None):
    """Load a PEFT LoRA adapter folder; returns our names of the modules loaded. A module without LoRA is wrapped as
    a K=1 layer; one with LoRA receives it in `subspace`, or in subspace 0 (K=1), or split over its K subspaces when the
    rank is K r (B rescaled). Everything is checked before the model is touched; errors name the key."""
    cfg, tensors = _read_peft_dir(adapter_dir)
    lookup = _peft_module_lookup(model)
    plan = _plan_peft_load(model, cfg, _peft_pairs(tensors), lookup, subspace)
    _apply_peft_plan(model, cfg, plan, subspace)
    return [p[0] for p in plan]
