"""Tests for lora.py: hand-computed forward/merge/orthogonalization checks, the fast paths against the formula, every
mode under autocast, compiled decoding with LoRA (adapter files and PEFT: tests/test_adapters.py)."""
import copy
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
import model as vlm

# ----------------------------------------------------------------------------------------------------
# tiny modules with the project's names


class MLP(nn.Module):
    def __init__(self, d, h, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(d, h, bias=bias)
        self.up_proj = nn.Linear(d, h, bias=bias)
        self.down_proj = nn.Linear(h, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.q_proj(x)


class Block(nn.Module):
    def __init__(self, d, h, bias=False):
        super().__init__()
        self.self_attn = Attn(d)
        self.mlp = MLP(d, h, bias)

    def forward(self, x):
        x = x + self.self_attn(x)
        return x + self.mlp(x)


class Decoder(nn.Module):
    def __init__(self, d, h, n, bias=False):
        super().__init__()
        self.layers = nn.ModuleList([Block(d, h, bias) for _ in range(n)])

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


class Tiny(nn.Module):
    def __init__(self, d=8, h=12, n=2, bias=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lm = Decoder(d, h, n, bias)
        self.vision = Decoder(d, h, 1, bias)          # has mlp.gate_proj too: must never be wrapped
        self.lm_head = nn.Linear(d, 5, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return self.lm_head(self.lm(x))


def randomize_lora(model, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            for p in list(m.A) + list(m.B):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def make(K=4, rank=8, alpha=16, scaling="fcit", dropout=0.0, bias=False, **kw):
    model = Tiny(bias=bias)
    wrapped = lora.apply_lora(model, rank, alpha, num_subspaces=K, scaling=scaling, dropout=dropout,
                              generator=torch.Generator().manual_seed(3), **kw)
    return model, wrapped


# ----------------------------------------------------------------------------------------------------
# injection


def test_apply_lora_targets_and_freezing():
    model, wrapped = make()
    assert sorted(wrapped) == sorted(f"lm.layers.{i}.mlp.{p}" for i in range(2)
                                     for p in ("gate_proj", "up_proj", "down_proj"))
    assert isinstance(model.vision.layers[0].mlp.gate_proj, nn.Linear)
    assert isinstance(model.lm.layers[0].self_attn.q_proj, nn.Linear)
    names = {n for n, _ in lora.trainable_parameters(model)}
    assert names == {f"{n}.{w}.0" for n in wrapped for w in ("A", "B")}
    # base names are kept, LoRA names documented
    sd = model.state_dict()
    assert "lm.layers.0.mlp.gate_proj.weight" in sd and "lm.layers.0.mlp.gate_proj.A.3" in sd
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(model, 8, 16, num_subspaces=4)
    with pytest.raises(ValueError, match="multiple"):
        lora.apply_lora(Tiny(), 10, 16, num_subspaces=4)
    # include cannot reach the vision tower
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.apply_lora(Tiny(), 8, 16, include=r"^vision\.")


def test_scaling_and_init():
    m = lora.LoRALinear(nn.Linear(4096, 64), 64, 128, num_subspaces=8, scaling="fcit")
    assert m.r == 8 and m.scaling == 2.0                       # FCIT: scaling = alpha / total rank
    assert abs(torch.cat(list(m.A)).std().item() - 0.01) < 5e-4
    assert all(float(b.detach().abs().max()) == 0 for b in m.B)
    p = lora.LoRALinear(nn.Linear(4096, 64), 64, 128, num_subspaces=8, scaling="peft", init="peft")
    assert p.scaling == 16.0
    bound = 1 / math.sqrt(4096)                                 # kaiming_uniform(a=sqrt(5))
    A = torch.cat(list(p.A)).detach()
    assert float(A.abs().max()) <= bound and float(A.abs().max()) > 0.9 * bound


# ----------------------------------------------------------------------------------------------------
# forward modes


def manual(m, x, alpha):
    """W x + b + s * sum_j alpha_bj B_j A_j x, per sample (alpha (B, K))."""
    y = x @ m.weight.float().t() + (m.bias.float() if m.bias is not None else 0)
    for b in range(x.shape[0]):
        for j in range(m.num_subspaces):
            y[b] = y[b] + m.scaling * alpha[b, j] * (x[b] @ m.A[j].t() @ m.B[j].t())
    return y


def test_routed_forward_per_sample_matches_hand_computation():
    model, wrapped = make(bias=True)
    randomize_lora(model)
    model.eval()
    m = wrapped["lm.layers.0.mlp.gate_proj"]
    x = torch.randn(3, 5, 8)
    alpha = torch.tensor([[1.0, 0, 0, 0], [0.2, 0.3, 0.1, 0.4], [0, 0, 0, 2.0]])
    lora.set_routing(model, alpha)
    with torch.no_grad():
        torch.testing.assert_close(m(x), manual(m, x, alpha), atol=1e-5, rtol=1e-5)
        # (K,) alpha broadcasts over the batch
        lora.set_routing(model, alpha[1])
        torch.testing.assert_close(m(x), manual(m, x, alpha[1].expand(3, 4)), atol=1e-5, rtol=1e-5)
        # cached concatenation follows in-place parameter updates
        m.B[2].add_(1.0)
        torch.testing.assert_close(m(x), manual(m, x, alpha[1].expand(3, 4)), atol=1e-5, rtol=1e-5)
        # a batch mismatch is an error, and the whole model runs per sample
        lora.set_routing(model, alpha)
        with pytest.raises(ValueError, match="samples"):
            m(torch.randn(2, 5, 8))
        full = model(x)
        for b in range(3):
            lora.set_routing(model, alpha[b])
            torch.testing.assert_close(full[b:b + 1], model(x[b:b + 1]), atol=1e-5, rtol=1e-5)


def test_routed_fast_path_skips_exactly_and_matches_grad_path():
    model, wrapped = make()
    randomize_lora(model)
    model.eval()
    m = wrapped["lm.layers.0.mlp.up_proj"]
    with torch.no_grad():
        for mod in wrapped.values():
            mod.B[3].zero_()                          # an empty DISCO slot
    x = torch.randn(3, 5, 8)
    alpha = torch.softmax(torch.randn(3, 4) / 0.05, -1)
    alpha[:, 1] = 0                                   # a subspace nobody in the batch uses
    lora.set_routing(model, alpha)
    with torch.no_grad():
        fast = m(x)
        assert lora._routed_weights(m)[0].shape[0] == 2 * m.r     # subspaces 0 and 2 only
    lora.set_active(model, 0)                         # A_0, B_0 require grad -> differentiable path
    lora.set_routing(model, alpha)
    slow = m(x)
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast, manual(m, x, alpha).detach(), atol=1e-5, rtol=1e-5)
    # opt-in pruning of tiny weights
    a2 = torch.tensor([[0.9999, 1e-5, 1e-4, 0.0]]).expand(3, 4)
    lora.set_routing(model, a2, min_weight=2e-4)
    with torch.no_grad():
        pruned = m(x)
        assert lora._routed_weights(m)[0].shape[0] == m.r
        torch.testing.assert_close(pruned, manual(m, x, torch.tensor([[0.9999, 0, 0, 0]]).expand(3, 4)),
                                   atol=1e-5, rtol=1e-5)
        lora.set_routing(model, torch.zeros(4))
        torch.testing.assert_close(m(x), x @ m.weight.t())


def test_dropout_mask_is_inverted_bernoulli():
    """Multipliers 0 or 1/(1 - p') with p' = round(65536 p) / 65536; the drop rate within 5 sigma of p' on 2**20
    elements; the same global seed gives the same mask; unbiased in expectation; bad p named."""
    x = torch.ones(1024, 1024)
    for p in (0.05, 0.3, 0.5):
        cut = round(p * 65536)
        torch.manual_seed(7)
        m = lora.dropout_mask(x, p)
        assert m.shape == x.shape and m.dtype == x.dtype
        values = m.unique().tolist()
        assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(65536 / (65536 - cut), rel=1e-6)
        drop, q = float((m == 0).double().mean()), cut / 65536
        assert abs(drop - q) < 5 * math.sqrt(q * (1 - q) / x.numel()), (p, drop)
        assert float(m.double().mean()) == pytest.approx(1.0, abs=5e-3)
        torch.manual_seed(7)
        assert torch.equal(lora.dropout_mask(x, p), m)
    assert lora.dropout_mask(torch.ones(3, 5, dtype=torch.bfloat16), 0.05).dtype == torch.bfloat16
    assert lora.dropout_mask(torch.ones(7), 0.0).eq(1).all()
    with pytest.raises(ValueError, match="dropout probability 1.0"):
        lora.dropout_mask(x, 1.0)


def test_dropout_with_gradient_checkpointing_matches():
    """Shared dropout + model.py's non-reentrant per-layer checkpointing: same masks in the recomputation,
    so gradients equal those without checkpointing."""
    cfg = vlm.VLMConfig(text=vlm.DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4), vision=None)
    torch.manual_seed(0)
    net = vlm.VLM(cfg)
    lora.apply_lora(net, 8, 16, num_subspaces=2, dropout=0.3)
    randomize_lora(net, scale=0.1)
    lora.set_active(net, 1)
    net.train()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        net.gradient_checkpointing = ckpt
        net.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        net.loss(ids, ids).backward()
        grads.append({n: p.grad.clone() for n, p in lora.trainable_parameters(net)})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_single_mode_forward_and_gradient_only_on_active():
    model, wrapped = make()
    randomize_lora(model)
    lora.set_active(model, 2)
    x = torch.randn(2, 3, 8)
    m = wrapped["lm.layers.1.mlp.down_proj"]
    xi = torch.randn(2, 3, 12)
    onehot = F.one_hot(torch.tensor([2, 2]), 4).float()
    torch.testing.assert_close(m(xi), manual(m, xi, onehot), atol=1e-5, rtol=1e-5)
    model(x).pow(2).sum().backward()
    for name, mod in wrapped.items():
        for j in range(4):
            for p in (mod.A[j], mod.B[j]):
                assert (p.grad is not None) == (j == 2), (name, j)
        assert mod.weight.grad is None
    assert all(p.grad is None for p in model.vision.parameters())


def test_lora_add_backward_matches_autograd():
    """_LoRAAdd's hand-written backward (rank-r products in MKL's fast layouts) against autograd of the plain formula,
    and gradcheck in float64."""
    torch.manual_seed(0)
    for bias in (False, True):                       # with a bias, F.linear's output is a view: autograd rebases it
        base = nn.Linear(12, 20, bias=bias)
        m = lora.LoRALinear(base, rank=4, alpha=8.0, dropout=0.0)
        with torch.no_grad():
            m.B[0].normal_()
        m.A[0].requires_grad_(True), m.B[0].requires_grad_(True)
        x = torch.randn(2, 5, 12, requires_grad=True)
        g = torch.randn(2, 5, 20)
        y = m(x)
        assert bias or y.grad_fn.name().startswith("_LoRAAdd")
        grads = torch.autograd.grad(y, (x, m.A[0], m.B[0]), g)
        ref = F.linear(x, base.weight, base.bias) + m.scaling * F.linear(F.linear(x, m.A[0]), m.B[0])
        torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
        for got, want in zip(grads, torch.autograd.grad(ref, (x, m.A[0], m.B[0]), g)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    d = {k: t.detach().double().requires_grad_() for k, t in
         dict(b=torch.randn(3, 4, 7), x=torch.randn(3, 4, 6), A=torch.randn(2, 6), B=torch.randn(7, 2)).items()}
    assert torch.autograd.gradcheck(lambda b, x, A, B: lora._LoRAAdd.apply(b * 1.0, x, A, B, 0.7),
                                    (d["b"], d["x"], d["A"], d["B"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_paths_match_the_formula(dtype, monkeypatch):
    """LoRALinear.forward's fast paths (`_fast_forward`: the in-place adds, `_LoRAAdd`'s backward, routed inference over
    the subspaces that can contribute; `_cached_cat`) against the formula alone (both switched off): the same outputs
    and gradients in every mode, with and without gradient, for fp32 weights and for bf16 ones under bf16 autocast
    (fp32 LoRA). The fast paths must run where they apply: single and routed inference, in-place where fusable."""
    model = Tiny().to(dtype)
    wrapped = lora.apply_lora(model, 8, 16, num_subspaces=4, dropout=0.0)
    randomize_lora(model)
    with torch.no_grad():
        for m in wrapped.values():
            m.B[3].zero_()                                             # an empty slot: routed inference skips it
    x = torch.randn(2, 3, 8).to(dtype)
    alpha = torch.tensor([[0.2, 0.3, 0.0, 0.5], [1.0, 0.0, 0.0, 0.0]])
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    fast, real = [], lora._fast_forward

    def spy(m, y, xd):
        out = real(m, y, xd)
        fast.append((m.mode, torch.is_grad_enabled(), out is not None))
        return out
    formula = [("_fast_forward", lambda m, y, xd: None),
               ("_cached_cat", lambda m: (torch.cat(list(m.A), 0), torch.cat(list(m.B), 1) * m.scaling))]

    def run(grad):
        xg = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            y = model(xg).float()
        if not grad:
            return [y]
        params = [xg] + [p for _, p in lora.trainable_parameters(model)]
        return [y] + list(torch.autograd.grad(y.pow(2).sum(), params))

    setters = {"single": lambda: lora.set_active(model, 1),
               "routed": lambda: (lora.set_active(model, 1), lora.set_routing(model, alpha)),     # A_1, B_1 train
               "moe": lambda: lora.set_moe(model, generator=torch.Generator().manual_seed(0))}
    for mode, setter in setters.items():
        for grad in (False, True):
            setter()
            monkeypatch.setattr(lora, "_fast_forward", spy)
            got = run(grad)
            with monkeypatch.context() as mp:
                for name, fn in formula:
                    mp.setattr(lora, name, fn)
                want = run(grad)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, **tol, msg=lambda s: f"{mode}, grad={grad}: {s}")
    took = {(mode, grad) for mode, grad, hit in fast if hit}          # 6 layers: all or none took a fast path
    assert len(fast) == 6 * 6 and sum(hit for *_, hit in fast) == 6 * len(took)
    # fused single-mode adds need fp32 products; routed inference runs in autocast's dtype; moe has none here
    assert took == ({("single", False), ("single", True)} if dtype == torch.float32 else set()) | {("routed", False)}
    for m in wrapped.values():                                         # routed inference: slots 0, 1, 3 -> 0, 1
        assert lora._routed_weights(m)[0].shape[0] == 2 * m.r


def test_caches_built_under_inference_mode_are_plain_tensors():
    """VLM.generate runs under torch.inference_mode: the routed-mode cache it builds must hold plain tensors, so that a
    later forward with gradients (frozen subspaces, an input that requires grad) can save them for backward."""
    model, wrapped = make()
    randomize_lora(model)
    lora.set_routing(model, torch.tensor([0.5, 0.5, 0.0, 0.0]))
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 8)
    with torch.inference_mode():
        ref = model(x).clone()
    assert not wrapped["lm.layers.0.mlp.gate_proj"]._rcache[1][0].is_inference()
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    out.sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(out.detach(), ref)


def _text_vlm(seed=0):
    """A small text-only model.VLM with LoRA K=4 on the MLP: slots 0-2 trained (random), slot 3 empty (B = 0)."""
    t = vlm.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    m = vlm.VLM(vlm.VLMConfig(text=t, vision=None)).eval()
    lora.apply_lora(m, 16, 32.0, num_subspaces=4, generator=torch.Generator().manual_seed(seed))
    randomize_lora(m, seed, scale=0.5)
    with torch.no_grad():
        for layer in lora.lora_modules(m).values():
            layer.B[3].zero_()
    ids = torch.randint(5, 64, (3, 9), generator=torch.Generator().manual_seed(seed))
    am = torch.ones_like(ids)
    am[1, :3] = am[2, :1] = 0                                          # left padding
    return m, ids.masked_fill(am == 0, 0), am


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor writes C++ on CPU")
def test_compiled_decode_with_lora_modes_matches_eager():
    """generate(compile=True) on a LoRA model: the compiled decode step reads the caches the eager prefill built, so
    single, per-sample routed (a new routing each call) and MoE modes give the eager tokens."""
    m, ids, am = _text_vlm()
    gen = lambda c: m.generate(ids, am, max_new_tokens=12, eos_token_id=-1, compile=c)  # noqa: E731
    lora.set_active(m, 1)
    assert gen(True) == gen(False)
    seen = []
    for seed in (0, 1):
        lora.set_routing(m, torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(seed)) * 3, -1))
        seen.append(gen(False))
        assert gen(True) == seen[-1]
    assert seen[0] != seen[1]                                          # the routing reaches the tokens
    lora.set_moe(m, generator=torch.Generator().manual_seed(0), trainable=False)
    assert gen(True) == gen(False)


@pytest.mark.skipif(not hasattr(torch._dynamo.exc, "FailOnRecompileLimitHit")
                    or not hasattr(torch._dynamo.config, "recompile_limit"), reason="torch < 2.7 decodes eagerly")
def test_compiled_decode_falls_back_to_eager_past_the_recompile_limit(monkeypatch):
    """Past dynamo's recompile limit the decode step runs eagerly for the rest of the call: same tokens, one try."""
    m, ids, am = _text_vlm(1)
    lora.set_routing(m, torch.tensor([0.2, 0.5, 0.3, 0.0]))
    want = m.generate(ids, am, max_new_tokens=8, eos_token_id=-1)
    tries = []

    def over_limit(*args):
        tries.append(1)
        raise torch._dynamo.exc.FailOnRecompileLimitHit("limit")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: over_limit)
    assert m.generate(ids, am, max_new_tokens=8, eos_token_id=-1, compile=True) == want
    assert len(tries) == 1


def test_static_cache_is_reused_zeroed_and_dropped(monkeypatch):
    """generate(compile=True) keeps one KV cache per shape across calls (CUDA graphs need fixed addresses), zeroed
    each call: a cache poisoned with NaN between calls gives the same tokens as eager decoding."""
    m, ids, am = _text_vlm(2)
    lora.set_routing(m, torch.tensor([0.1, 0.6, 0.3, 0.0]))
    ids2 = ((ids + 7) % 59 + 5).masked_fill(am == 0, 0)
    want = [m.generate(x, am, max_new_tokens=8, eos_token_id=-1) for x in (ids, ids2)]
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)        # the fixed-shape step, eagerly
    assert m.generate(ids, am, max_new_tokens=8, eos_token_id=-1, compile=True) == want[0]
    caches = m._kv[1]
    with torch.inference_mode():                                       # generate made them under inference mode
        for c in caches:
            c.kt.fill_(float("nan"))
            c.v.fill_(float("nan"))
    assert m.generate(ids2, am, max_new_tokens=8, eos_token_id=-1, compile=True) == want[1]
    assert m._kv[1] is caches
    m.drop_static_cache()
    assert m._kv is None


def test_merge_unmerge_exact():
    model, wrapped = make(bias=True)
    randomize_lora(model)
    model.eval()
    before = {n: m.weight.detach().clone() for n, m in wrapped.items()}
    alpha = torch.tensor([0.5, 0.1, 0.0, 0.4])
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        lora.set_routing(model, alpha)
        routed = model(x)
        lora.merge(model, alpha)
        assert all(m.mode == "merged" for m in wrapped.values())
        torch.testing.assert_close(model(x), routed, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="merged"):
            lora.set_active(model, 0)
        lora.unmerge(model)
        for n, m in wrapped.items():
            assert torch.equal(m.weight, before[n])
            assert m.mode == "routed"
        assert torch.equal(model(x), routed)
        # default alpha in single mode = one-hot of the active subspace
        lora.set_active(model, 1)
        single = model(x)
        lora.merge(model)
        torch.testing.assert_close(model(x), single, atol=1e-5, rtol=1e-5)
        lora.unmerge(model)
        lora.disable_lora(model)
        off = model(x)
        ref = copy.deepcopy(model)
        lora.remove_lora(ref)
        assert isinstance(ref.lm.layers[0].mlp.gate_proj, nn.Linear)
        torch.testing.assert_close(ref(x), off)


def test_dropout_shared_between_gate_and_up():
    """gate_proj and up_proj read the same x: one mask; down_proj draws its own; nothing cached after."""
    d = 6
    mlp = nn.Module()
    mlp.lm = nn.Module()
    mlp.lm.mlp = MLP(d, d)
    lora.apply_lora(mlp, d, d, targets=("gate_proj", "up_proj", "down_proj"), scaling="peft", dropout=0.5)
    layers = lora.lora_modules(mlp)
    with torch.no_grad():
        for m in layers.values():
            m.weight.zero_()
            m.A[0].copy_(torch.eye(d))
            m.B[0].copy_(torch.eye(d))
    seen = {}
    for n, m in layers.items():
        m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.detach().clone()))
    g, u, dn = (layers[f"lm.mlp.{p}"] for p in ("gate_proj", "up_proj", "down_proj"))
    assert g.drop is u.drop and g.drop is dn.drop  # one object per parent, keyed on the input tensor
    mlp.train()
    x = torch.randn(4, 50, d)
    mlp.lm.mlp(x)
    assert torch.equal(seen["lm.mlp.gate_proj"], seen["lm.mlp.up_proj"])
    zeros = seen["lm.mlp.gate_proj"] == 0
    assert 0.3 < zeros.float().mean() < 0.7
    torch.testing.assert_close(seen["lm.mlp.gate_proj"][~zeros], 2 * x[~zeros])
    assert g.drop._x is None                        # cleared by the parent's forward hook
    # two separate calls with the same tensor draw two masks (the cache lives for one parent forward)
    mlp.lm.mlp(x)
    first = seen["lm.mlp.gate_proj"]
    mlp.lm.mlp(x)
    assert not torch.equal(first, seen["lm.mlp.gate_proj"])
    mlp.eval()
    mlp.lm.mlp(x)
    torch.testing.assert_close(seen["lm.mlp.gate_proj"], x)


def test_moe_router_token_level():
    model, wrapped = make()
    randomize_lora(model)
    lora.set_moe(model, generator=torch.Generator().manual_seed(0))
    m = wrapped["lm.layers.0.mlp.up_proj"]
    x = torch.randn(2, 3, 8)
    g = torch.softmax(x @ m.router.weight.t(), -1)                       # (2, 3, K)
    want = x @ m.weight.t()
    for j in range(4):
        want = want + m.scaling * g[..., j:j + 1] * (x @ m.A[j].t() @ m.B[j].t())
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    model(x).sum().backward()
    assert m.router.weight.grad is not None and all(m.A[j].grad is not None for j in range(4))
    st = lora.lora_state(model)
    assert "lm.layers.0.mlp.up_proj.router.weight" in st
    lora.set_moe(model, top_k=1)
    with torch.no_grad():
        top = F.one_hot(g.argmax(-1), 4).float()
        want = x @ m.weight.t()
        for j in range(4):
            want = want + m.scaling * top[..., j:j + 1] * (x @ m.A[j].t() @ m.B[j].t())
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# orthogonalization


def test_orthogonalize_and_overlap():
    model, wrapped = make(K=4, rank=8)                # r = 2, in = 8 or 12
    randomize_lora(model)
    ov = lora.subspace_overlap(model)
    assert ov.shape == (4, 4) and float(ov[0, 1]) > 1e-2
    lora.orthogonalize_subspace(model, 1, [0])
    lora.orthogonalize_subspace(model, 2, [0, 1])
    for m in wrapped.values():
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert float((m.A[i] @ m.A[j].t()).detach().abs().max()) < 1e-6
    ov = lora.subspace_overlap(model)
    assert float(ov[0, 1]) < 1e-6 and float(ov[1, 2]) < 1e-6 and float(ov[2, 0]) < 1e-6
    assert float(ov[0, 3]) > 1e-3
    # gradient projection hook keeps SGD steps in the complement
    lora.set_active(model, 3)
    handles = lora.orthogonalize_subspace(model, 3, [0, 1, 2], grad_hook=True)
    model(torch.randn(2, 3, 8)).pow(2).sum().backward()
    for m in wrapped.values():
        for o in range(3):
            g = m.A[3].grad
            assert float((m.A[o] @ g.t()).abs().max()) < 1e-6 * float(g.norm() * m.A[o].norm())
    for h in handles:
        h.remove()


def test_olora_penalty_direct():
    model, wrapped = make()
    randomize_lora(model)
    lora.set_active(model, 2)
    pen = lora.olora_penalty(model, 2, [0, 1], weight=0.5)
    want = 0.5 * sum((m.A[o] @ m.A[2].t()).abs().sum() for m in wrapped.values() for o in (0, 1))
    torch.testing.assert_close(pen, want)
    pen.backward()
    m = wrapped["lm.layers.0.mlp.gate_proj"]
    assert m.A[2].grad is not None and m.A[0].grad is None


def test_bf16_base_fp32_adapter():
    """A bf16 base with fp32 LoRA (PEFT's autocast_adapter_dtype): output bf16, LoRA branch in fp32,
    merge/unmerge restore the bf16 weight bit-exactly."""
    model = Tiny().to(torch.bfloat16)
    wrapped = lora.apply_lora(model, 8, 16, num_subspaces=4)
    randomize_lora(model)
    model.eval()
    m = wrapped["lm.layers.0.mlp.gate_proj"]
    assert m.weight.dtype == torch.bfloat16 and m.A[0].dtype == torch.float32
    x = torch.randn(2, 3, 8).to(torch.bfloat16)
    alpha = torch.tensor([[0.2, 0.3, 0.1, 0.4], [1.0, 0, 0, 0]])
    for setter in (lambda: lora.set_active(model, 1), lambda: lora.set_routing(model, alpha)):
        setter()
        a = alpha if m.mode == "routed" else F.one_hot(torch.tensor([1, 1]), 4).float()
        with torch.no_grad():
            y = m(x)
            base = F.linear(x, m.weight)
            lo = manual(m, x.float(), a) - x.float() @ m.weight.float().t()
            want = (base + lo).to(torch.bfloat16)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, want, atol=2e-2, rtol=2e-2)
    w0 = m.weight.detach().clone()
    lora.merge(model, torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert not torch.equal(m.weight, w0)
    lora.unmerge(model)
    assert torch.equal(m.weight, w0)
    with torch.no_grad():
        model(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_mode_under_cpu_autocast(dtype):
    """The GPU recipe's numerics on a CPU: frozen weights in bf16/fp16, fp32 LoRA, the forward under autocast. Single,
    routed (per-sample; inference takes the fused in-place add, training the autograd path) and MoE modes give the fp32
    formula within the dtype's rounding, in the base's dtype, with fp32 gradients for the LoRA weights."""
    model = Tiny().to(dtype)
    wrapped = lora.apply_lora(model, 8, 16, num_subspaces=4, dropout=0.0)
    randomize_lora(model)
    model.eval()
    m = wrapped["lm.layers.0.mlp.gate_proj"]
    x = torch.randn(2, 3, 8).to(dtype)
    alpha = torch.tensor([[0.2, 0.3, 0.1, 0.4], [1.0, 0, 0, 0]])
    lo = lambda a: manual(m, x.float(), a) - x.float() @ m.weight.float().t()   # the fp32 LoRA term  # noqa: E731
    for mode in ("single", "routed", "moe"):
        if mode == "single":
            lora.set_active(model, 1)
            want = F.linear(x.float(), m.weight.float()) + lo(F.one_hot(torch.tensor([1, 1]), 4).float())
        elif mode == "routed":
            lora.set_routing(model, alpha)
            want = F.linear(x.float(), m.weight.float()) + lo(alpha)
        else:
            lora.set_moe(model, generator=torch.Generator().manual_seed(0), trainable=False)
            g = torch.softmax(m.router(x.float()), -1)                               # (B, T, K) per token
            A, B = torch.stack(list(m.A)), torch.stack(list(m.B))                     # (K, r, in), (K, out, r)
            h = torch.einsum("bti,kri->btkr", x.float(), A) * g[..., None]
            want = F.linear(x.float(), m.weight.float()) + m.scaling * torch.einsum("btkr,kor->bto", h, B)
        for grad in (False, True):
            for p in list(m.A) + list(m.B):
                p.requires_grad_(grad)
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=dtype):
                y = m(x)
            assert y.dtype == dtype, (mode, grad)
            torch.testing.assert_close(y.float(), want, atol=3e-2, rtol=3e-2)
            if grad:
                y.float().sum().backward()
                assert all(p.grad is None or p.grad.dtype == torch.float32 for p in list(m.A) + list(m.B))
