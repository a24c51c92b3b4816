"""LoRA with task subspaces: the layer, injection and modes, state, orthogonalization, then the fast paths.

One layer carries every flavour the project needs: DISCO's K subspaces per layer (train one with `set_active`, mix
all per sample with `set_routing`), plain LoRA (K = 1), O-LoRA's penalty and hard orthogonalization, and CoIN's
MoELoRA gate (`set_moe`). `LoRALinear.forward` reads as the formula of each mode; the fast paths it hands over to
(in-place fused adds, a hand-written backward, cached weights, cheaper dropout masks) are in the last section, each
tested equal to the formula. Imports only torch; adapters.py reads and writes adapter files.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("gate_proj", "up_proj", "down_proj")  # FCIT adapts the MLP only, no attention
DEFAULT_INCLUDE = r"^lm\."
# never wrapped, whatever `include` says: vision tower, text tower, projector, output head
NEVER = (r"(^|\.)(vision|vision_tower|vision_model|text_tower|text_model|clip_text|projector|multi_modal_projector"
         r"|mm_projector|lm_head)(\.|$)")
MODES = ("single", "routed", "moe", "merged", "off")


# ----------------------------------------------------------------------------------------------------
# the layer: each mode's formula (the fast paths it hands over to are in the last section)


def _per_sample(a, x):
    """Channel weights (C,) as they are, or (B, C) viewed as (B, 1, ..., C) to broadcast over the rows of x."""
    if a.dim() == 2:
        if a.shape[0] != x.shape[0] or x.dim() < 2:
            raise ValueError(f"routing weights for {a.shape[0]} samples but input of shape {tuple(x.shape)}")
        a = a.view(a.shape[0], *([1] * (x.dim() - 2)), a.shape[1])
    return a


class LoRALinear(nn.Module):
    """A frozen nn.Linear (weight and bias kept under their names) plus K LoRA subspaces of rank r = rank // K
    (DISCO, Guo et al. 2025); scaling "fcit" alpha / rank or "peft" alpha / r, B = 0 at init, branch in the LoRA dtype.
    `mode` (formulas in `forward`): "single" (subspace `active`), "routed" (a weight per subspace, per sample), "moe"
    (CoIN's per-token softmax gate over the subspaces), "merged" (folded into W) or "off" (y = W x).
    """

    def __init__(self, base, rank, alpha, num_subspaces=1, scaling="fcit", init="fcit", dropout=0.0,
                 dtype=torch.float32, generator=None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        K = int(num_subspaces)
        if K < 1 or rank < 1 or rank % K:
            raise ValueError(f"rank={rank} must be a positive multiple of num_subspaces={K}")
        if scaling not in ("fcit", "peft"):
            raise ValueError(f"scaling must be 'fcit' or 'peft', got {scaling!r}")
        if init not in ("fcit", "peft"):
            raise ValueError(f"init must be 'fcit' or 'peft', got {init!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight                     # (out, in), frozen
        self.weight.requires_grad_(False)
        if base.bias is not None:
            self.bias = base.bias
            self.bias.requires_grad_(False)
        else:
            self.register_parameter("bias", None)
        self.num_subspaces, self.r, self.rank, self.lora_alpha = K, rank // K, int(rank), float(alpha)
        self.scaling_mode, self.init_mode = scaling, init
        self.scaling = float(alpha) / (rank if scaling == "fcit" else rank // K)
        dev = base.weight.device
        self.A = nn.ParameterList([nn.Parameter(torch.empty(self.r, self.in_features, device=dev, dtype=dtype))
                                   for _ in range(K)])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(self.out_features, self.r, device=dev, dtype=dtype))
                                   for _ in range(K)])
        for j in range(K):
            self.reset_subspace(j, generator=generator)
        self.router = None                            # nn.Linear(in, K, bias=False) once set_moe is called
        self.moe_top_k = None
        self.drop = _SharedDropout(dropout)           # replaced by a shared one in apply_lora
        self.mode, self.active = "single", 0
        self.train(base.training)                     # inherit train/eval from the replaced layer
        self.alpha = None                             # routing weights (K,) or (B, K), fp32
        self._merged = None                           # (original weight copy, previous mode) while merged
        self._cache = None                            # _cached_cat: (key, A_cat, s*B_cat), no gradient
        self._rcache = None                           # _routed_weights: (key, (A_sel, s*B_sel, gates)), no gradient
        self._route_id = 0                            # bumped by set_routing
        self.min_weight = 0.0                         # set_routing: skip subspaces with alpha <= this

    @property
    def dropout(self):
        return self.drop.p

    def reset_subspace(self, j, generator=None):
        """Re-initialise subspace j: A_j per init mode, B_j = 0."""
        with torch.no_grad():
            if self.init_mode == "fcit":
                self.A[j].normal_(0.0, 0.01, generator=generator)
            else:
                nn.init.kaiming_uniform_(self.A[j], a=math.sqrt(5), generator=generator)
            self.B[j].zero_()

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, K={self.num_subspaces}, r={self.r}, "
                f"scaling={self.scaling:g} ({self.scaling_mode}), mode={self.mode}")

    # ---- the formula
    def forward(self, x):
        """y = W x + b + Δ, where x' = drop(x) in the LoRA dtype, s = self.scaling and diag(·) repeats each subspace's
        weight over its r channels:
          single   Δ = s B_j A_j x'                     (j = self.active)
          routed   Δ = (s B_cat) diag(α) A_cat x'        (α = self.alpha: (K,), or (B, K) per sample)
          moe      Δ = (s B_cat) diag(g) A_cat x'        (g = softmax(router(x)) per token, top-k renormalised)
          off      Δ = 0;   merged: Δ is folded into W.
        Where a fast path applies (`_fast_forward`, last section) it returns the same numbers instead."""
        y = F.linear(x, self.weight, self.bias)                       # W x + b, frozen
        if self.mode in ("off", "merged"):
            return y
        xd = self.drop(x, self.training).to(self.A[0].dtype)          # x' (inverted dropout: `_SharedDropout`)
        fast = _fast_forward(self, y, xd)
        if fast is not None:
            return fast
        if self.mode == "single":
            j = self.active
            delta = F.linear(F.linear(xd, self.A[j]), self.B[j]) * self.scaling
        elif self.mode == "routed":
            if self.alpha is None:
                raise RuntimeError("routed mode without routing weights: call set_routing(model, alpha)")
            A, sB = self._cat()
            delta = F.linear(F.linear(xd, A) * self._route_gates(xd), sB)
        elif self.mode == "moe":
            A, sB = self._cat()
            delta = F.linear(F.linear(xd, A) * self._moe_gates(x), sB)      # the gate reads x, not x'
        else:
            raise ValueError(f"unknown LoRA mode {self.mode!r}")
        return (y + delta).to(y.dtype)

    def _cat(self):
        """A_cat (K r, in) and s B_cat (out, K r): the subspaces side by side (without gradient: `_cached_cat`)."""
        if not self._needs_grad():
            return _cached_cat(self)
        return torch.cat(list(self.A), 0), torch.cat(list(self.B), 1) * self.scaling

    def _route_gates(self, x):
        """diag(α) of routed mode: α (K,) or (B, K) over the K r channels, broadcastable to x' (..., K r)."""
        a = self.alpha.to(device=x.device, dtype=self.A[0].dtype).repeat_interleave(self.r, dim=-1)
        return _per_sample(a, x)

    def _moe_gates(self, x):
        """diag(g) of moe mode (CoIN's gate): g = softmax(router(x)) per token (..., K), optionally only the top k
        (renormalised), over the K r channels."""
        g = torch.softmax(self.router(x.to(self.router.weight.dtype)).float(), dim=-1)  # (..., K)
        if self.moe_top_k is not None and self.moe_top_k < self.num_subspaces:
            v, i = g.topk(self.moe_top_k, dim=-1)
            g = torch.zeros_like(g).scatter(-1, i, v / v.sum(-1, keepdim=True))
        return g.to(self.A[0].dtype).repeat_interleave(self.r, dim=-1)

    def _needs_grad(self):
        """Whether this forward must be differentiable in some LoRA weight."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self._ab())

    def _ab(self):
        """(A_0..A_{K-1}, B_0..B_{K-1}) read straight from the ParameterLists' dicts (fast; hot path)."""
        return tuple(self.A._parameters.values()) + tuple(self.B._parameters.values())

    # ---- merging
    def delta_weight(self, alpha=None):
        """s * B_cat diag(alpha) A_cat (out, in) in the LoRA dtype; alpha (K,) (default: what the current
        single/routed mode computes)."""
        alpha = self._effective_alpha() if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        if alpha.dim() != 1 or alpha.numel() != self.num_subspaces:
            raise ValueError(f"merge needs alpha of shape ({self.num_subspaces},), got {tuple(alpha.shape)}")
        A = torch.cat(list(self.A), 0)
        B = torch.cat(list(self.B), 1)
        a = alpha.to(device=A.device, dtype=A.dtype).repeat_interleave(self.r)
        return (B * a) @ A * self.scaling

    def _effective_alpha(self):
        if self.mode == "single":
            return F.one_hot(torch.tensor(self.active), self.num_subspaces).float()
        if self.mode == "routed" and self.alpha is not None and self.alpha.dim() == 1:
            return self.alpha.float()
        if self.mode == "off":
            return torch.zeros(self.num_subspaces)
        raise ValueError(f"no fixed alpha in mode {self.mode!r} (per-sample or token-routed): pass alpha explicitly")


# ----------------------------------------------------------------------------------------------------
# injection and modes


def lora_modules(model):
    """{name: LoRALinear} in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require(model):
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA layers (call apply_lora first)")
    return mods


def _get_parent(model, name):
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return model.get_submodule(parent_name), parent_name, child
    return model, "", name


def _freeze_all(model):
    """Freeze every parameter (LoRA ones included; set_active re-enables the chosen subspace)."""
    for p in model.parameters():
        p.requires_grad_(False)


def apply_lora(model, rank, alpha, targets=DEFAULT_TARGETS, num_subspaces=1, scaling="fcit", init="fcit",
               dropout=0.05, include=DEFAULT_INCLUDE, dtype=torch.float32, generator=None):
    """Wrap every nn.Linear whose last name component is in `targets` and whose full name matches the
    regex `include` (re.search; default: the decoder `lm.`) -- never the vision/text tower, projector or
    lm_head. Freezes every parameter of the model, then makes subspace 0 trainable (`set_active(model, 0)`);
    unfreeze e.g. the projector afterwards if wanted. Returns {name: LoRALinear}.

    rank = TOTAL rank (K blocks of rank // K); FCIT task-related: rank=64, alpha=128, K=8."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    inc, never = re.compile(include), re.compile(NEVER)
    names = []
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and name.rsplit(".", 1)[-1] in targets and inc.search(name):
            raise ValueError(f"{name} already has LoRA; apply_lora once per model")
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets \
                and inc.search(name) and not never.search(name):
            names.append(name)
    if not names:
        raise ValueError(f"apply_lora: no nn.Linear named {targets} matches include={include!r}")
    wrapped = {}
    for name in names:
        parent, _, child = _get_parent(model, name)
        layer = LoRALinear(getattr(parent, child), rank, alpha, num_subspaces, scaling, init, dropout,
                           dtype=dtype, generator=generator)
        setattr(parent, child, layer)
        wrapped[name] = layer
    _share_dropout(model, names, dropout)
    _freeze_all(model)
    set_active(model, 0)
    return wrapped


def remove_lora(model, alpha=None):
    """Unwrap every LoRALinear back to an nn.Linear (same weight objects). With `alpha` (K,) the subspaces
    are merged into the weight first; without, the LoRA is dropped (merged layers are unmerged first)."""
    for name, m in list(lora_modules(model).items()):
        if m._merged is not None:
            _unmerge_layer(m)
        if alpha is not None:
            with torch.no_grad():
                m.weight += m.delta_weight(alpha).to(m.weight.dtype)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = m.weight
        if m.bias is not None:
            lin.bias = m.bias
        lin.train(m.training)
        parent, _, child = _get_parent(model, name)
        setattr(parent, child, lin)
    for mod in model.modules():
        for k, h in list(mod._forward_hooks.items()):
            if isinstance(h, _ParentHook):
                del mod._forward_hooks[k]


def set_active(model, j):
    """Training mode of DISCO / sequential LoRA: forward uses subspace j only; A_j, B_j require grad and all
    other LoRA parameters (other subspaces, routers) are frozen. j=None freezes every subspace (mode
    'single' on subspace 0). Non-LoRA parameters are not touched."""
    for m in _require(model).values():
        if j is not None and not 0 <= j < m.num_subspaces:
            raise IndexError(f"subspace {j} out of range (K={m.num_subspaces})")
        _check_not_merged(m)
        m.mode, m.active = "single", (0 if j is None else int(j))
        for i in range(m.num_subspaces):
            m.A[i].requires_grad_(i == j)
            m.B[i].requires_grad_(i == j)
        if m.router is not None:
            m.router.weight.requires_grad_(False)


def set_routing(model, alpha, min_weight=0.0):
    """Inference with a weight per subspace (DISCO's subspace selective activation): alpha (K,) or per sample (B, K),
    in fp32. Without gradient, subspaces that cannot contribute (B_j == 0, or alpha_j == 0 for every sample) are
    skipped exactly; min_weight > 0 (opt-in, approximate) also skips those with alpha_j <= min_weight throughout."""
    alpha = torch.as_tensor(alpha).detach().float()
    for m in _require(model).values():
        _check_not_merged(m)
        if alpha.shape[-1] != m.num_subspaces or alpha.dim() not in (1, 2):
            raise ValueError(f"alpha must be (K,) or (B, K) with K={m.num_subspaces}, got {tuple(alpha.shape)}")
        m.mode, m.alpha = "routed", alpha.to(m.A[0].device)
        m.min_weight = float(min_weight)
        m._route_id += 1


def set_moe(model, top_k=None, generator=None, trainable=True):
    """CoIN MoELoRA mode: a token-level linear gate (in -> K, no bias) per layer, g = softmax(router(x));
    y = W x + s sum_j g_j B_j A_j x (optionally keep the top_k gates, renormalised). Routers are created on
    first use (init N(0, 1/in)); with trainable=True all experts and the routers require grad."""
    for m in _require(model).values():
        _check_not_merged(m)
        if m.router is None:
            m.router = nn.Linear(m.in_features, m.num_subspaces, bias=False, device=m.A[0].device,
                                 dtype=m.A[0].dtype)
            with torch.no_grad():
                m.router.weight.normal_(0.0, m.in_features ** -0.5, generator=generator)
        m.mode, m.moe_top_k = "moe", top_k
        for p in list(m.A) + list(m.B) + [m.router.weight]:
            p.requires_grad_(trainable)


def disable_lora(model):
    """Base model only (e.g. zero-shot evaluation); set_active / set_routing re-enable."""
    for m in _require(model).values():
        _check_not_merged(m)
        m.mode = "off"


def _check_not_merged(m):
    if m._merged is not None:
        raise RuntimeError("LoRA weights are merged; call unmerge(model) first")


def merge(model, alpha=None):
    """Fold s * B_cat diag(alpha) A_cat into the base weight (alpha (K,); default: the current single/routed
    choice). The original weight is kept and restored bit-exactly by `unmerge`."""
    for m in _require(model).values():
        _check_not_merged(m)
        dw = m.delta_weight(alpha)
        with torch.no_grad():
            orig = m.weight.detach().clone()
            m.weight.copy_((m.weight.float() + dw.float()).to(m.weight.dtype) if m.weight.dtype != dw.dtype
                           else m.weight + dw)
        m._merged = (orig, m.mode)
        m.mode = "merged"


def _unmerge_layer(m):
    orig, mode = m._merged
    with torch.no_grad():
        m.weight.copy_(orig)
    m._merged, m.mode = None, mode


def unmerge(model):
    """Restore the exact pre-merge weights and the previous mode."""
    for m in _require(model).values():
        if m._merged is not None:
            _unmerge_layer(m)


# ----------------------------------------------------------------------------------------------------
# parameters and state


def trainable_parameters(model):
    """[(name, parameter)] with requires_grad (for the optimizer and for logging)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def lora_state(model, subspaces=None, router=None):
    """Detached copies of the LoRA tensors, keyed by model parameter name:
    '<module>.A.<j>' (r, in), '<module>.B.<j>' (out, r), '<module>.router.weight' (K, in).
    subspaces: None = all (and routers), an int or an iterable of ints = those subspaces only (routers
    only if router=True)."""
    if subspaces is None:
        js, with_router = None, True if router is None else router
    else:
        js = [subspaces] if isinstance(subspaces, int) else list(subspaces)
        with_router = bool(router)
    out = {}
    for name, m in _require(model).items():
        for j in (range(m.num_subspaces) if js is None else js):
            if not 0 <= j < m.num_subspaces:
                raise IndexError(f"subspace {j} out of range (K={m.num_subspaces}) at {name}")
            out[f"{name}.A.{j}"] = m.A[j].detach().clone()
            out[f"{name}.B.{j}"] = m.B[j].detach().clone()
        if with_router and m.router is not None:
            out[f"{name}.router.weight"] = m.router.weight.detach().clone()
    return out


def _parse_key(key):
    parts = key.rsplit(".", 2)
    if len(parts) == 3 and parts[1] in ("A", "B") and parts[2].isdigit():
        return parts[0], parts[1], int(parts[2])
    if len(parts) == 3 and parts[1] == "router" and parts[2] == "weight":
        return parts[0], "router", None
    raise KeyError(f"not a LoRA state key: {key!r} (expected '<module>.A.<j>', '<module>.B.<j>' or "
                   f"'<module>.router.weight')")


def load_lora_state(model, state):
    """Copy tensors from `lora_state` output (any subset of keys) into the model, in place (dtype cast to the
    parameter's). Unknown modules and wrong shapes raise, naming the key."""
    mods = _require(model)
    with torch.no_grad():
        for key, t in state.items():
            name, kind, j = _parse_key(key)
            m = mods.get(name)
            if m is None:
                raise KeyError(f"{key}: module {name!r} has no LoRA in this model")
            if kind == "router":
                if m.router is None:
                    m.router = nn.Linear(m.in_features, m.num_subspaces, bias=False, device=m.A[0].device,
                                         dtype=m.A[0].dtype)
                    m.router.weight.requires_grad_(False)
                p = m.router.weight
            else:
                if j >= m.num_subspaces:
                    raise KeyError(f"{key}: subspace {j} out of range (K={m.num_subspaces})")
                p = (m.A if kind == "A" else m.B)[j]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{key}: shape {tuple(t.shape)} does not fit the model's {tuple(p.shape)}")
            p.copy_(t)


def subspace_bytes(model, j=0):
    """Bytes of subspace j over all layers (A_j and B_j in their stored dtype): what a client uploads."""
    return sum(m.A[j].numel() * m.A[j].element_size() + m.B[j].numel() * m.B[j].element_size()
               for m in _require(model).values())


# ----------------------------------------------------------------------------------------------------
# orthogonalization (O-LoRA and hard projection)


def _as_list(x):
    return [x] if isinstance(x, int) else list(x)


def olora_penalty(model, new, old, weight=1.0):
    """O-LoRA orthogonality loss: weight * sum_layers sum_{o in old} sum |A_o A_new^T| (absolute entries).
    Old subspaces are detached (only the new one is pushed)."""
    old = _as_list(old)
    total = None
    for m in _require(model).values():
        for o in old:
            t = (m.A[o].detach() @ m.A[new].t()).abs().sum()
            total = t if total is None else total + t
    if total is None:
        return torch.zeros((), device=next(iter(_require(model).values())).A[0].device)
    return total * weight


def _old_basis(m, old):
    """Orthonormal basis (in, k) of the row spaces of the old A's, float64 (QR of A_old^T)."""
    M = torch.cat([m.A[o].detach() for o in old], 0).double()       # (k, in)
    if M.shape[0] >= m.in_features:
        raise ValueError(f"old subspaces span {M.shape[0]} >= in_features={m.in_features} dims: no complement")
    Q, _ = torch.linalg.qr(M.t(), mode="reduced")                   # (in, k)
    return Q


def orthogonalize_subspace(model, j, old, grad_hook=False):
    """Project A_j onto the orthogonal complement of the row spaces of A_o, o in old (QR basis, applied
    twice in float64), so that |A_o A_j^T| is at float precision. With grad_hook=True also registers a hook
    projecting A_j's gradient every backward (exact for SGD; with Adam call this function after each step).
    Returns the hook handles (empty list without grad_hook)."""
    old = [o for o in _as_list(old) if o != j]
    handles = []
    if not old:
        return handles
    for m in _require(model).values():
        Q = _old_basis(m, old)
        with torch.no_grad():
            a = m.A[j].detach().double()
            for _ in range(2):
                a = a - (a @ Q) @ Q.t()
            m.A[j].copy_(a.to(m.A[j].dtype))
        if grad_hook:
            handles.append(m.A[j].register_hook(
                lambda g, Q=Q: (g.double() - (g.double() @ Q) @ Q.t()).to(g.dtype)))
    return handles


def subspace_overlap(model, reduce="mean"):
    """(K, K) overlap ||A_i A_j^T||_F / (||A_i||_F ||A_j||_F), averaged (or max) over layers; 0 where a
    subspace is all zero. Diagonal entries are self-overlaps (1 for a rank-1 A)."""
    vals = []
    for m in _require(model).values():
        A = [a.detach().float() for a in m.A]
        n = torch.stack([a.norm() for a in A])
        G = torch.stack([torch.stack([(A[i] @ A[k].t()).norm() for k in range(len(A))]) for i in range(len(A))])
        den = n[:, None] * n[None, :]
        vals.append(torch.where(den > 0, G / den.clamp_min(1e-30), torch.zeros_like(G)))
    V = torch.stack(vals)
    return V.max(0).values if reduce == "max" else V.mean(0)


# ----------------------------------------------------------------------------------------------------
# fast paths (CPU/GPU speed; each gives the numbers of the formula in LoRALinear.forward and names its test)


def _fast_forward(m, y, x):
    """LoRALinear.forward's y + Δ by a fast path, or None where none applies (the formula then runs); y = W x + b,
    x = x' (dropped out, in the LoRA dtype).
    - single, when `_fusable`: Δ added in place into y, by `_add_lowrank` without gradient (traceable when compiled),
      else by `_LoRAAdd` (a backward in MKL's fast layouts);
    - routed without gradient: only the subspaces that can contribute (`_routed_weights`, cached), added in place
      when `_fusable`.
    Tested equal to the formula by test_fast_paths_match_the_formula (every mode, fp32 and bf16 autocast, with and
    without gradient), test_lora_add_backward_matches_autograd and
    test_routed_fast_path_skips_exactly_and_matches_grad_path."""
    if m.mode == "single" and _fusable(y, x, x.dtype):
        A, B = m.A[m.active], m.B[m.active]
        if not torch.is_grad_enabled():                      # no autograd.Function: traceable when compiled
            return _add_lowrank(y, F.linear(x, A), B, m.scaling)
        return _LoRAAdd.apply(y, x, A, B, m.scaling)
    if m.mode == "routed" and m.alpha is not None and not m._needs_grad():
        sel = _routed_weights(m)
        if sel is None:                                              # no subspace can contribute: Δ = 0 exactly
            return y
        A, sB, a = sel
        h = F.linear(x, A).mul_(_per_sample(a, x))                    # (..., K' r)
        if _fusable(y, x, A.dtype):
            return _add_lowrank(y, h, sB)
        return (y + F.linear(h, sB)).to(y.dtype)
    return None


# ---- in-place fused adds


def _add_lowrank(base, h, B, s=1.0):
    """base (..., out) += s h Bᵀ in place, h (..., r): one addmm_ into the frozen layer's output."""
    base.view(-1, base.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), B.t(), alpha=s)
    return base


class _LoRAAdd(torch.autograd.Function):
    """base + s (x Aᵀ) Bᵀ, accumulated in place into base (..., out), the output of the frozen layer. The backward
    forms the rank-r products as (hᵀ g)ᵀ and (Bᵀ gᵀ)ᵀ rather than autograd's gᵀ h and g B: the same values, which
    MKL's CPU kernels compute 4-7x faster when r is much smaller than the layer width; s scales the r-wide results.
    Tested: test_lora_add_backward_matches_autograd (against autograd of the formula; gradcheck in float64)."""

    @staticmethod
    def forward(ctx, base, x, A, B, s):
        x2 = x.reshape(-1, x.shape[-1])                                  # (N, in)
        h = x2 @ A.t()                                                   # (N, r)
        _add_lowrank(base, h, B, s)
        ctx.mark_dirty(base)
        ctx.save_for_backward(x2, h, A, B)
        ctx.s, ctx.x_shape = s, x.shape
        return base

    @staticmethod
    def backward(ctx, g):
        x2, h, A, B = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])                                  # (N, out)
        dh = (B.t() @ g2.t()).mul_(ctx.s).t()                            # (N, r)
        dA = dh.t() @ x2 if ctx.needs_input_grad[2] else None
        dB = (h.t() @ g2).mul_(ctx.s).t() if ctx.needs_input_grad[3] else None
        dx = (dh @ A).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        return g, dx, dA, dB, None


def product_dtype(t, weight_dtype):
    """The dtype a matrix product of t with weights of `weight_dtype` yields: autocast's when it is on for t's device
    (mixed precision: fp32 LoRA weights, bf16/fp16 compute), else the weights' dtype."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight_dtype


def _fusable(base, x, weight_dtype):
    """Whether the rank-r product can be added in place into `base`: the frozen output, the product and the LoRA
    weights share one dtype (an in-place addmm_ is not autocast), and base is contiguous. Tested:
    test_every_mode_under_cpu_autocast, test_fast_paths_match_the_formula (bf16 autocast)."""
    return base.dtype == weight_dtype == product_dtype(x, weight_dtype) and base.is_contiguous()


# ---- cached weights (no gradient)


def _cached_cat(m):
    """LoRALinear._cat without gradient: A_cat and s B_cat built once per parameter version, as plain tensors even when
    built under inference mode (inside generate); compiled code (the decode step of generate(compile=True)) reads what
    its eager prefill built. Tested: test_fast_paths_match_the_formula (moe),
    test_compiled_decode_with_lora_modes_matches_eager."""
    if torch.compiler.is_compiling():                            # built by the eager prefill, as in _routed_weights
        return m._cache[1], m._cache[2]
    key = tuple([(p.data_ptr(), p._version) for p in m._ab()])
    if m._cache is None or m._cache[0] != key:
        with torch.inference_mode(False), torch.no_grad():   # plain tensors, even when built inside generate
            m._cache = (key, torch.cat(list(m.A), 0), torch.cat(list(m.B), 1) * m.scaling)
    return m._cache[1], m._cache[2]


def _routed_weights(m):
    """Routed mode without gradient: (A_sel, s B_sel, gates) restricted to the subspaces that can contribute (B_j not
    all zero -- e.g. DISCO's empty slots -- and some α_j above m.min_weight, 0 unless set_routing says otherwise), in
    the dtype the products run in (autocast's); None if none can. Exact: the skipped terms are exact zeros. Cached on
    parameter versions and the routing call; compiled code (the decode step of generate(compile=True)) reads the
    cache its eager prefill built. Tested: test_routed_fast_path_skips_exactly_and_matches_grad_path,
    test_caches_built_under_inference_mode_are_plain_tensors, test_fast_paths_match_the_formula."""
    if torch.compiler.is_compiling():
        return m._rcache[1]
    dtype = product_dtype(m.A[0], m.A[0].dtype)          # built in the dtype the products run in (autocast's)
    key = (tuple([(p.data_ptr(), p._version) for p in m._ab()]), m._route_id, dtype)
    if m._rcache is None or m._rcache[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            a = m.alpha
            used = (a.abs().amax(0) if a.dim() == 2 else a.abs()) > m.min_weight
            sel = [j for j in range(m.num_subspaces) if bool(used[j]) and bool(m.B[j].any())]
            if not sel:
                val = None
            else:
                A = torch.cat([m.A[j] for j in sel], 0).to(dtype)
                Bs = (torch.cat([m.B[j] for j in sel], 1) * m.scaling).to(dtype)
                g = a[..., sel].to(device=A.device, dtype=dtype).repeat_interleave(m.r, dim=-1)
                val = (A, Bs, g.contiguous())
        m._rcache = (key, val)
    return m._rcache[1]


# ---- dropout: 16-bit masks, one per input shared by the layers that read it


def dropout_mask(x, p):
    """Inverted-dropout multipliers shaped like x: 0 with probability p' = round(65536 p) / 65536, else 1 / (1 - p').
    Each element compares a 16-bit uniform draw; four come from one 64-bit draw of torch's generator, which on a
    CPU costs a fifth of bernoulli_'s one draw per element (the LoRA step's largest non-matmul cost). Tested:
    test_dropout_mask_is_inverted_bernoulli."""
    cut = round(p * 65536)
    if not 0 <= cut < 65536:
        raise ValueError(f"dropout probability {p} must be in [0, 1)")
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
    u = bits.view(torch.int16)[:n].view(x.shape).float()                  # uniform over -32768..32767, exact
    keep = torch.ge(u, cut - 32768, out=torch.empty_like(u))              # 1.0 / 0.0
    return keep.mul_(65536 / (65536 - cut)).to(x.dtype)


class _SharedDropout:
    """Input dropout shared by the LoRA layers of one parent module, one mask per distinct input (gate_proj and up_proj
    read the same `x`; down_proj draws its own). A plain attribute; a forward hook on the parent clears it after each
    call. Non-reentrant checkpointing recomputes with the preserved RNG state, so the masks repeat. Tested:
    test_dropout_shared_between_gate_and_up, test_dropout_with_gradient_checkpointing_matches."""

    def __init__(self, p):
        self.p = float(p)
        self._x = None        # the input tensor object seen last (strong ref, only during the parent forward)
        self._version = None
        self._out = None

    def __call__(self, x, training):
        if self.p <= 0.0 or not training:
            return x
        if self._x is x and self._version == x._version:
            return self._out
        out = x * dropout_mask(x, self.p)
        self._x, self._version, self._out = x, x._version, out
        return out

    def clear(self, *args):  # also the parent's forward hook: (module, inputs, output)
        self._x = self._version = self._out = None

    def __getstate__(self):
        return {"p": self.p, "_x": None, "_version": None, "_out": None}

    def __deepcopy__(self, memo):
        new = _SharedDropout(self.p)
        memo[id(self)] = new
        return new


class _ParentHook:
    """Forward hook object clearing a _SharedDropout cache (deep-copies with it)."""

    def __init__(self, drop):
        self.drop = drop

    def __call__(self, module, inputs, output):
        self.drop.clear()


def _share_dropout(model, names, p):
    """One _SharedDropout per parent module for the wrapped layers `names`."""
    groups = {}
    for n in names:
        groups.setdefault(_get_parent(model, n)[1], []).append(n)
    for parent_name, children in groups.items():
        parent = model.get_submodule(parent_name) if parent_name else model
        drop = None
        for c in children:
            layer = model.get_submodule(c)
            if drop is None:
                drop = layer.drop if layer.drop.p == p else _SharedDropout(p)
            layer.drop = drop
        if not any(isinstance(h, _ParentHook) and h.drop is drop for h in parent._forward_hooks.values()):
            parent.register_forward_hook(_ParentHook(drop))
