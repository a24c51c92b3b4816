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

import config
from checkpoint import canonical_key
from files import atomic_write, read_json
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


def _read_safetensors(path, tensors=True):
    """(tensors, or only their shapes when tensors=False; metadata); a clear error for anything that is not a
    safetensors file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            get = f.get_tensor if tensors else lambda k: tuple(f.get_slice(k).get_shape())
            return {k: get(k) for k in f.keys()}, meta
    except Exception as e:  # SafetensorError, header errors
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                         f"only safetensors adapters are supported") from None


# ----------------------------------------------------------------------------------------------------
# our format


FORMAT_KEY = "fcit_lora"
_LAYER_KEYS = {"rank": int, "num_subspaces": int, "alpha": (int, float), "scaling": str, "init": str,   # header
               "dropout": (int, float), "in": int, "out": int, "router": bool}


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


def _our_header(path, header) -> tuple[dict, dict]:
    """(per-layer LoRA configuration, metadata) of a `save_adapter` file's header; errors name the file."""
    if FORMAT_KEY not in header:
        raise ValueError(f"{path}: not an fcit LoRA adapter (no '{FORMAT_KEY}' header; for PEFT adapters use "
                         f"load_peft_adapter)")
    try:
        layers, meta = json.loads(header[FORMAT_KEY])["layers"], json.loads(header.get("metadata") or "{}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: damaged adapter header ({type(e).__name__}: {e})") from None
    if not isinstance(layers, dict) or not isinstance(meta, dict):
        raise ValueError(f"{path}: damaged adapter header (expected JSON objects for its layers and metadata)")
    for name, c in layers.items():
        bad = [k for k, t in _LAYER_KEYS.items() if not isinstance(c, dict) or not isinstance(c.get(k), t)]
        if bad:
            raise ValueError(f"{path}: damaged adapter header: layer {name!r} lacks a valid {', '.join(bad)}")
    return layers, meta


def load_adapter(model, path):
    """Load a `save_adapter` file. Modules without LoRA are wrapped with the stored configuration (then
    everything else is frozen and subspace 0 is active); modules with LoRA must match it, and the file must cover
    every one of them. Everything is validated before the model is touched. Returns (extra: dict[str, Tensor],
    metadata)."""
    tensors, header = _read_safetensors(path)
    layers, meta = _our_header(path, header)
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
    missing = sorted(set(lora_modules(model)) - set(layers))
    if missing:
        raise ValueError(f"{path}: holds no LoRA for the model's {missing[0]} ({len(missing)} LoRA module(s) missing)")
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
    return extra, meta


def _identity_problems(cls, method, layers, shapes):
    """How the tensors disagree with the method named in the metadata: DISCO's identity keys (K, D) and sizes (K,)
    present exactly for DISCO, MoELoRA's routers exactly for MoELoRA."""
    K = {c["num_subspaces"] for c in layers.values()}
    want = {"extra.identity_keys": 2, "extra.identity_sizes": 1}
    held, problems = [k for k in want if k in shapes], []
    if cls.releases_identity and len(held) < len(want):
        problems.append(f"no {' or '.join(repr(k) for k in want if k not in held)} tensor: method {method!r} "
                        f"routes with its identity keys")
    elif not cls.releases_identity and held:
        problems.append(f"holds DISCO's {' and '.join(map(repr, held))} but its metadata says method {method!r}")
    for key in held if cls.releases_identity else ():
        if len(shapes[key]) != want[key] or {shapes[key][0]} != K:
            problems.append(f"'{key}' has shape {list(shapes[key])}, expected {'(K, D)' if want[key] == 2 else '(K,)'}"
                            f" with K={sorted(K)}")
    routers = {bool(c["router"]) for c in layers.values()}
    if routers != {bool(cls.router)}:
        problems.append(f"method {method!r} {'needs' if cls.router else 'has no'} token routers, but the layers "
                        f"have router={sorted(routers)}")
    return problems


def check_stage_adapter(path, cfg, stages, classes) -> dict:
    """--eval-only's checks of a `save_adapter` stage file against the run `cfg` of `stages` stages, before any
    model is loaded: the metadata's method (one of the setting's, one that trains, agreeing with the tensors:
    `classes` maps names to method classes), setting and stage (an index < stages); the layers' targets, rank,
    alpha and subspaces against the flags. One ValueError naming the file and every mismatch; returns the metadata."""
    shapes, header = _read_safetensors(path, tensors=False)
    layers, meta = _our_header(path, header)
    method, stage = meta.get("method"), meta.get("stage")
    known = config.FEDIT_METHODS if cfg.setting == "fedit" else config.FCIT_METHODS
    cls = classes.get(method) if isinstance(method, str) else None
    problems = []
    if method not in known:
        problems.append(f"method {method!r} is not one of --setting {cfg.setting}'s ({', '.join(known)})")
    if cls is not None and not cls.trains:
        problems.append(f"method {method!r} trains no adapter")
        cls = None
    if meta.get("setting") != cfg.setting:
        problems.append(f"setting {meta.get('setting')!r} (this run: --setting {cfg.setting})")
    if type(stage) is not int or not 0 <= stage < stages:
        problems.append(f"stage index {stage!r}, outside this run's {stages} stage(s) 0..{stages - 1} "
                        f"(--setting, --stages)")
    K = cfg.subspaces if cls is not None and cls.subspaces else 1
    seen = lambda key: sorted({c[key] for c in layers.values()})
    targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
    for flag, got, want in (("--lora-targets", targets, sorted(cfg.lora_targets)), ("--rank", seen("rank"), [cfg.rank]),
                            ("--alpha", seen("alpha"), [cfg.alpha]), ("--subspaces", seen("num_subspaces"), [K])):
        if got != want:
            problems.append(f"{flag[2:]} {','.join(map(str, got))} (this run: {flag} {','.join(map(str, want))})")
    if cls is not None:
        problems += _identity_problems(cls, method, layers, shapes)
    if problems:
        raise ValueError(f"{path} does not fit this run: " + "; ".join(problems))
    return meta


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


# adapter_config.json's fields (peft 0.21's LoraConfig). Honoured: the scaling (r, lora_alpha, use_rslora, rank_pattern,
# alpha_pattern) and the modules adapted (target_modules, exclude_modules, layers_to_transform, layers_pattern: the
# file's tensors must be exactly these); checked: peft_type LORA, bias "none", init_lora_weights one of PEFT_INITS;
# lora_dropout and these act in training only or describe the file:
PEFT_NO_EFFECT = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
                  "megatron_core", "qalora_group_size", "runtime_config", "eva_config", "ensure_weight_tying"}
PEFT_CHECKED = {"peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout", "bias",
                "init_lora_weights"}
# Refused when set: each changes the model beyond lora_B lora_A x, or needs the base weights an initialisation changed
PEFT_REFUSED = {"use_dora": "DoRA's magnitude vectors", "fan_in_fan_out": "Conv1D (transposed) weights",
                "lora_bias": "a bias on lora_B", "modules_to_save": "fully trained copies of whole modules",
                "layer_replication": "duplicated decoder layers", "trainable_token_indices": "trained token embeddings",
                "target_parameters": "LoRA on parameters, not modules", "megatron_config": "Megatron parallel layers",
                "use_qalora": "quantization-aware LoRA", "use_bdlora": "block-diagonal LoRA",
                "alora_invocation_tokens": "activated LoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
                "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
                "loftq_config": "LoftQ's quantized base weights", "corda_config": "CorDA's changed base weights",
                "lora_ga_config": "LoRA-GA's initialisation"}
PEFT_INITS = (True, False, "gaussian", "eva", "orthogonal")     # init_lora_weights that leave the base weights alone


def _peft_config_problems(cfg) -> list[str]:
    """The fields of an adapter_config.json that this loader cannot honour, each named with its value."""
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        return [f"peft_type={cfg['peft_type']!r} (only LORA adapters)"]
    unset = lambda v: v is None or v is False or v == {} or v == [] or v == ""
    problems = [f"{k}={v!r} ({PEFT_REFUSED.get(k, 'a field this loader does not know')})" for k, v in cfg.items()
                if not unset(v) and k not in PEFT_CHECKED | PEFT_NO_EFFECT]
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r} (trained biases of the base model; only 'none')")
    if cfg.get("init_lora_weights", True) not in PEFT_INITS:
        problems.append(f"init_lora_weights={cfg['init_lora_weights']!r} (changes the base weights; peft's "
                        f"path_initial_model_for_weight_conversion saves a plain LoRA)")
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    pats = [cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}]
    if type(r) is not int or isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or \
            not all(isinstance(p, dict) for p in pats):
        problems.append(f"r={r!r}, lora_alpha={alpha!r}, rank_pattern/alpha_pattern: expected numbers and objects")
    return problems


def read_peft_dir(adapter_dir, tensors=True):
    """(adapter_config.json as a dict, adapter_model.safetensors tensors, or only their shapes when tensors=False) of
    a PEFT LoRA folder; refuses, naming the file and each field, what we cannot honour, and weights not in
    safetensors (never unpickled)."""
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing (not a PEFT adapter directory)")
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    problems = _peft_config_problems(cfg)
    if problems:
        raise ValueError(f"{cfg_path}: cannot load " + "; ".join(problems))
    wpath = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(wpath):
        others = [p for p in os.listdir(adapter_dir) if p.startswith("adapter_model")]
        raise ValueError(f"{adapter_dir}: no adapter_model.safetensors (found {others}); only safetensors "
                         f"adapters are supported (a .bin is a pickle, never loaded)")
    weights, _ = _read_safetensors(wpath, tensors)
    return cfg, weights


def _peft_selects(cfg, key) -> bool:
    """Whether the LoraConfig `cfg` adapts the module named `key`, as peft decides it
    (peft.tuners.tuners_utils.check_target_module_exists): exclude_modules, target_modules (a regex fullmatch, or
    names matching exactly or as a suffix), then layers_to_transform / layers_pattern."""
    ex, tm = cfg.get("exclude_modules"), cfg.get("target_modules")
    if ex and (re.fullmatch(ex, key) if isinstance(ex, str) else key in ex or any(key.endswith(f".{e}") for e in ex)):
        return False
    if tm is None or isinstance(tm, str):
        return tm is not None and re.fullmatch(tm, key) is not None
    if key in tm:
        return True
    if not any(key.endswith(f".{t}") for t in tm):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    m, pats = None, cfg.get("layers_pattern") or [""]
    for p in [pats] if isinstance(pats, str) else pats:
        m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." if p else r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        if m:
            break
    return m is not None and (int(m["idx"]) == layers if isinstance(layers, int) else int(m["idx"]) in layers)


def _check_peft_targets(model, adapter_dir, cfg, pairs, namings, lookup):
    """The file's tensors are exactly the modules its config selects in this model, under the naming of the file's
    keys: none outside the selection, none of the selection missing (peft would leave those at their initialisation)."""
    names = dict(next((d for d in namings if all(p in d for p in pairs)), lookup))
    loaded = set()
    for path, ab in pairs.items():
        key = next(iter(ab.values()))[0]
        if not _peft_selects(cfg, path):
            raise ValueError(f"{key}: module {path!r} is not selected by adapter_config.json's target_modules / "
                             f"exclude_modules / layers_to_transform")
        names[path] = _our_module(lookup, path, key)
        loaded.add(names[path])
    inner = tuple(f"{n}." for n in lora_modules(model))          # a LoRA layer's own router is no target
    selected = {ours for n, ours in names.items() if _peft_selects(cfg, n) and not ours.startswith(inner)}
    missing = sorted(selected - loaded)
    if missing or not selected:
        raise ValueError(f"{adapter_dir}/adapter_config.json: target_modules {cfg.get('target_modules')!r} selects "
                         + (f"{missing[0]} ({len(missing)} module(s)), which adapter_model.safetensors holds no "
                            f"lora_A/lora_B for" if missing else "no module of this model"))


def _peft_namings(model) -> list[dict]:
    """[{name: our module name}] of every linear (or LoRA) module under our names and, through model.hf_module_name,
    under its current and its legacy transformers names."""
    mods = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, LoRALinear))]
    namings = [{n: n for n in mods}]
    for legacy in (False, True) if callable(getattr(model, "hf_module_name", None)) else ():
        namings.append({})
        for n in mods:
            try:
                namings[-1][model.hf_module_name(n, legacy)] = n
            except ValueError:      # a module outside the mapped parts has no transformers name
                continue
    return namings


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
    cfg, tensors = read_peft_dir(adapter_dir)
    namings = _peft_namings(model)
    lookup = {k: v for d in reversed(namings) for k, v in d.items()}      # a name in several namings: the first's
    try:
        pairs = _peft_pairs(tensors)
        _check_peft_targets(model, adapter_dir, cfg, pairs, namings, lookup)
        plan = _plan_peft_load(model, cfg, pairs, lookup, subspace)
    except ValueError as e:                                                 # named by its tensor: name the file too
        where = "" if str(e).startswith(str(adapter_dir)) else f"{adapter_dir}/adapter_model.safetensors: "
        raise ValueError(f"{where}{e}") from None
    _apply_peft_plan(model, cfg, plan, subspace)
    return [p[0] for p in plan]
