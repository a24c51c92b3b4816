"""Forward+backward step time and memory: fcit's model.py vs transformers on the identical config (same process).

Not a test. Frozen weights, LoRA-free; the embedding output is made to require grad (what transformers'
`enable_input_require_grads` does), so backward runs through every layer exactly as it does when training adapters.
Also measures this machine's fp32 GEMM rate and prints the fraction of it our step achieves.

    python bench/model_speed.py [--hidden 256 --layers 4 --seq 256 --batch 2 --steps 7 --device cpu]

Time: median wall-clock step, plus process CPU time (robust when other jobs share the machine; on CPU only).
Memory: on CUDA the allocator peak; on CPU the bytes saved for backward (autograd saved-tensor hooks, de-duplicated
by storage, parameters excluded) -- the activation memory, which is what differs between implementations.
"""
import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402


def gemm_rate(device, n=2048, reps=10):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(reps):
        a @ b
    sync(device)
    f = 2 * n ** 3 * reps
    return f / (time.perf_counter() - t), f / (time.process_time() - c)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class SavedBytes:
    """Bytes saved for backward during the forward (unique storages, parameters excluded)."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.params and s.data_ptr() not in self.seen:
            self.seen.add(s.data_ptr())
            self.bytes += s.nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *a):
        self.ctx.__exit__(*a)


def step_fn(kind, model, ids, labels):
    if kind == "hf":
        return lambda: model(input_ids=ids, labels=labels).loss
    if kind == "ours":               # loss(): lm_head only at supervised positions
        return lambda: model.loss(ids, labels)
    def full():                     # like-for-like: full (B, T, V) logits then CE, as transformers does it
        logits = model(ids).float()     # (labels padded and shifted, so the logits are never sliced or copied)
        tgt = F.pad(labels, (0, 1), value=-100)[:, 1:]
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.reshape(-1))
    return full


def measure(fns, params, device, steps):
    """Interleaved timing (hf, ours, ours, ...) so machine load hits every implementation alike; median step."""
    for fn in fns.values():
        for _ in range(2):
            fn().backward()
    times, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            fn().backward()
            sync(device)
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    res = {}
    for k, fn in fns.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with SavedBytes(params[k]) as sb:
            loss = fn()
        loss.backward()
        peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else None
        ts, cs = sorted(times[k]), sorted(cpu[k])
        res[k] = (ts[len(ts) // 2], sb.bytes, peak, times[k], cs[len(cs) // 2])
    return res


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args()


def build_models(a, device):
    """A random transformers LlamaForCausalLM and ours loaded from its saved checkpoint, both frozen, with the
    embedding output requiring grad."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=a.seq, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).to(device).train()
    import tempfile
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(d)
        ours = checkpoint.load_vlm(d, device=device).train()
    for m, emb in ((hf, hf.model.embed_tokens), (ours, ours.lm.embed_tokens)):
        m.requires_grad_(False)
        emb.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    return hf, ours


def step_flops(a, ours):
    """Forward + backward flops of one step for each implementation (frozen weights: input gradients only)."""
    P = sum(p.numel() for n, p in ours.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    tok = a.batch * a.seq
    attn = 4 * a.batch * a.seq ** 2 * a.hidden * a.layers            # QK^T + PV, forward, no causal discount
    body = 2 * tok * P + attn                                        # forward flops without the head
    head_full, head_sup = 2 * tok * a.hidden * a.vocab, 2 * (tok // 2) * a.hidden * a.vocab
    # backward with frozen weights: input grads only (~1x forward for matmuls, ~2x for attention)
    return {"ours": 2 * (body + head_sup) + attn, "ours_full": 2 * (body + head_full) + attn,
            "hf": 2 * (body + head_full) + attn}


def report(res, flops, rate, cpu_rate):
    """The table of step times, memory and GEMM fractions, then the ratios ours / transformers."""
    paired = sorted(o / h for o, h in zip(res["ours"][3], res["hf"][3]))
    print(f"fp32 GEMM rate (2048^3): {rate / 1e9:.1f} GFLOP/s wall, {cpu_rate / 1e9:.1f} GFLOP/s per CPU-second")
    print(f"{'impl':<34}{'step ms':>9}{'cpu ms':>8}{'saved MB':>10}{'peak MB':>9}{'GFLOP/s':>9}{'of GEMM':>8}"
          f"{'(cpu)':>7}")
    names = {"hf": "transformers LlamaForCausalLM", "ours": "fcit model.loss (supervised head)",
             "ours_full": "fcit full logits + CE"}
    for k, (t, saved, peak, _, c) in res.items():
        pk = f"{peak / 2**20:9.1f}" if peak is not None else f"{'n/a':>9}"
        print(f"{names[k]:<34}{t * 1e3:9.1f}{c * 1e3:8.1f}{saved / 2**20:10.1f}{pk}{flops[k] / t / 1e9:9.1f}"
              f"{flops[k] / t / rate:8.0%}{flops[k] / c / cpu_rate:7.0%}")
    print(f"ratio time ours/transformers: wall {res['ours'][0] / res['hf'][0]:.2f} (loss; median of paired ratios "
          f"{paired[len(paired) // 2]:.2f}), {res['ours_full'][0] / res['hf'][0]:.2f} (full logits); "
          f"cpu {res['ours'][4] / res['hf'][4]:.2f} (loss), {res['ours_full'][4] / res['hf'][4]:.2f} (full logits)")
    print(f"ratio saved-activation bytes ours/transformers: {res['ours'][1] / res['hf'][1]:.2f} (loss), "
          f"{res['ours_full'][1] / res['hf'][1]:.2f} (full logits)")


def main():
    a = parse_args()
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf, ours = build_models(a, device)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : a.seq // 2] = -100          # supervise the second half (answer-like)
    with torch.no_grad():
        d = (ours(ids) - hf(input_ids=ids).logits).abs().max().item()
    print(f"config: hidden {a.hidden}, layers {a.layers}, heads {a.heads}/{a.kv_heads}, inter {a.intermediate}, "
          f"vocab {a.vocab}, batch {a.batch} x seq {a.seq}, fp32, device {device}, threads {torch.get_num_threads()}")
    print(f"max |dlogits| ours vs transformers: {d:.2e}")

    rate, cpu_rate = gemm_rate(device)
    flops = step_flops(a, ours)
    models = {"hf": hf, "ours": ours, "ours_full": ours}
    res = measure({k: step_fn(k, m, ids, labels) for k, m in models.items()},
                  {k: list(m.parameters()) for k, m in models.items()}, device, a.steps)
    report(res, flops, rate, cpu_rate)


if __name__ == "__main__":
    main()
