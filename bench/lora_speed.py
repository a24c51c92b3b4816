"""LoRA speed ratios. Not a test: prints timings and ratios.

  (a) train step, one active subspace of K=8 (rank 8 each, total 64)  vs  a plain single LoRA of rank 8
      target <= 1.05
  (b) inference forward with K=8 soft-routed subspaces (per-sample alpha (B, K))  vs  one merged LoRA
      target <= 1.15 on the tiny config
  (c) our LoRA train step  vs  peft's (peft.inject_adapter_in_model on the same model, same rank)
      target <= 1.0
  (d) our LoRA train step  vs  transformers + peft (the same weights, rank, dropout and loss), every token supervised
  (e) the same with only the last --answer tokens supervised (an instruction-tuning batch)     targets <= 0.8

All on a text-only model.VLM (LLaMA decoder) built from a small config, LoRA on the MLP projections
(FCIT's task-related LoRA). Timings are the median of interleaved repeats (A, B, A, B, ...).

    python bench/lora_speed.py                       # tiny config, CPU
    python bench/lora_speed.py --hidden 1024 --layers 8 --device cuda --dtype bfloat16
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import disco  # noqa: E402
import lora  # noqa: E402
import model as vlm  # noqa: E402


def build(args):
    t = vlm.DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          max_position_embeddings=max(2 * args.seq, 64))
    torch.manual_seed(0)
    m = vlm.VLM(vlm.VLMConfig(text=t, vision=None))
    return m.to(device=args.device, dtype=getattr(torch, args.dtype))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCK = time.perf_counter


def timeit(fns, repeats, warmup, device):
    """Interleaved timing of several callables; returns the median seconds of each (CLOCK: wall time, or
    this thread's CPU time with --clock cpu, which is robust to other processes on a shared CPU when torch
    runs single-threaded)."""
    for _ in range(warmup):
        for f in fns:
            f()
    sync(device)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            sync(device)
            t0 = CLOCK()
            f()
            sync(device)
            times[i].append(CLOCK() - t0)
    return [statistics.median(t) for t in times]


def train_step_fn(model, ids, labels, lr=1e-4):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()

    def step():
        loss = model.loss(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def forward_fn(model, ids):
    def f():
        with torch.no_grad():
            model(ids)
    return f


def generate_fn(model, prompt):
    def f():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=16, eos_token_id=-1)
    return f


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=192)   # tools/build_tiny_model.py tiny config
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--r", type=int, default=8, help="rank per subspace")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--answer", type=int, default=16, help="(e): supervised tokens at the end of each row")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default; 1 with --clock cpu)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: thread CPU time with torch single-threaded (for a busy shared machine)")
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        ap.error("--clock cpu needs --device cpu")
    return args


def bench_one_active(base, ids, labels, args):
    """(a) Train step with one active subspace of K vs a plain single LoRA of the same rank; returns both models."""
    mk = copy.deepcopy(base)
    lora.apply_lora(mk, args.K * args.r, 2.0 * args.K * args.r, num_subspaces=args.K, dropout=args.dropout)
    lora.set_active(mk, args.K // 2)
    m1 = copy.deepcopy(base)
    lora.apply_lora(m1, args.r, 2.0 * args.r, num_subspaces=1, dropout=args.dropout)
    ta, t1 = timeit([train_step_fn(mk, ids, labels), train_step_fn(m1, ids, labels)], args.repeats, args.warmup,
                    args.device)
    print(f"(a) train step: K={args.K} one active {ta * 1e3:.2f} ms | single LoRA r={args.r} {t1 * 1e3:.2f} ms | "
          f"ratio {ta / t1:.3f} (target <= 1.05)")
    return mk, m1


def bench_routed(mk, m1, ids, args):
    """(b) Inference forward with K soft-routed subspaces per sample, all or half of them trained, vs one merged
    LoRA; returns the merged model and the routing weights."""
    dev = args.device
    with torch.no_grad():
        for m in lora.lora_modules(mk).values():
            for p in m.B:
                p.normal_(0, 0.01)
    mk.eval()
    alpha = torch.softmax(torch.randn(args.batch, args.K) / 0.05, -1)
    lora.set_routing(mk, alpha)
    mm = copy.deepcopy(m1).eval()
    lora.merge(mm, torch.ones(1))
    tr, tm = timeit([forward_fn(mk, ids), forward_fn(mm, ids)], args.repeats, args.warmup, dev)
    print(f"(b) inference forward: K={args.K} soft-routed (all {args.K} trained) {tr * 1e3:.2f} ms | merged "
          f"{tm * 1e3:.2f} ms | ratio {tr / tm:.3f} (target <= 1.15)")
    # DISCO mid-way: only half the slots trained (empty slots have B = 0 and are skipped exactly)
    mh = copy.deepcopy(mk)
    with torch.no_grad():
        for m in lora.lora_modules(mh).values():
            for p in m.B[args.K // 2:]:
                p.zero_()
    lora.set_routing(mh, alpha)
    th, tm2 = timeit([forward_fn(mh, ids), forward_fn(mm, ids)], args.repeats, args.warmup, dev)
    print(f"    same with {args.K // 2} of {args.K} slots trained (exact skip of B = 0): {th * 1e3:.2f} ms | "
          f"merged {tm2 * 1e3:.2f} ms | ratio {th / tm2:.3f}")
    return mm, alpha


def bench_disco_routing(mk, mm, ids, args):
    """DISCO-like routing: a batch of one task, softmax(cos / 0.05) nearly one-hot; the opt-in pruning of weights
    <= 1e-4 (approximate) keeps only the subspaces that matter for the batch."""
    keys = torch.randn(args.K, 64)
    feats = keys[1] + 0.3 * torch.randn(args.batch, 64)
    a_disco = disco.route(feats, keys, "softmax", 0.05)
    lora.set_routing(mk, a_disco, min_weight=1e-4)
    with torch.no_grad():
        pruned = mk(ids)
        lora.set_routing(mk, a_disco)
        full = mk(ids)
    kept = int((a_disco.amax(0) > 1e-4).sum())
    lora.set_routing(mk, a_disco, min_weight=1e-4)
    tp_, tm3 = timeit([forward_fn(mk, ids), forward_fn(mm, ids)], args.repeats, args.warmup, args.device)
    print(f"    DISCO-like alpha, min_weight=1e-4 ({kept} of {args.K} kept, max |dlogits| "
          f"{float((pruned - full).abs().max()):.1e}): {tp_ * 1e3:.2f} ms | merged {tm3 * 1e3:.2f} ms | "
          f"ratio {tp_ / tm3:.3f}")


def bench_generate(mk, mm, ids, args):
    """Generation of 16 tokens with the KV cache: routed vs merged."""
    prompt = ids[:, : min(16, args.seq)]
    gr, gm = timeit([generate_fn(mk, prompt), generate_fn(mm, prompt)], max(3, args.repeats // 3), 1, args.device)
    print(f"    generate 16 tokens (KV cache): routed {gr * 1e3:.2f} ms | merged {gm * 1e3:.2f} ms | "
          f"ratio {gr / gm:.3f}")


def bench_vs_peft(base, m1, ids, labels, args):
    """(c) Our single-LoRA train step vs peft's (inject_adapter_in_model on the same model, same rank)."""
    try:
        import peft
    except ImportError:
        print("(c) peft not installed: skipped")
        return
    mp = copy.deepcopy(base)
    for p in mp.parameters():
        p.requires_grad_(False)
    cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                          target_modules=r"lm\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)")
    mp = peft.inject_adapter_in_model(cfg, mp)
    for n, p in mp.named_parameters():
        p.requires_grad_("lora_" in n)
    n_ours = sum(p.numel() for p in m1.parameters() if p.requires_grad)
    n_peft = sum(p.numel() for p in mp.parameters() if p.requires_grad)
    assert n_ours == n_peft, (n_ours, n_peft)
    to, tp = timeit([train_step_fn(m1, ids, labels), train_step_fn(mp, ids, labels)], args.repeats, args.warmup,
                    args.device)
    print(f"(c) train step: ours {to * 1e3:.2f} ms | peft {tp * 1e3:.2f} ms | ratio {to / tp:.3f} (target <= 1.0)")


def hf_peft_step(base, ids, labels, args):
    """transformers' LlamaForCausalLM with base's weights (checkpoint.save_vlm), peft's LoRA on the MLP (same rank and
    dropout), the loss transformers computes from labels (shifted, over every position), an AdamW step."""
    import tempfile

    import peft
    from transformers import LlamaForCausalLM
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save_vlm(base, d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=getattr(torch, args.dtype)).to(args.device)
    cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                          target_modules=["gate_proj", "up_proj", "down_proj"])
    hf = peft.get_peft_model(hf, cfg)
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)
    hf.train()

    def step():
        hf(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_vs_transformers_peft(base, m1, ids, labels, args):
    """(d) Our single-LoRA train step vs the general-purpose stack: transformers + peft, same weights and loss."""
    try:
        step = hf_peft_step(base, ids, labels, args)
    except ImportError:
        print("(d) transformers/peft not installed: skipped")
        return
    to, th = timeit([train_step_fn(m1, ids, labels), step], args.repeats, args.warmup, args.device)
    print(f"(d) train step: ours {to * 1e3:.2f} ms | transformers+peft {th * 1e3:.2f} ms | ratio {to / th:.3f} "
          f"(target <= 0.8)")
    answer = labels.clone()
    answer[:, :-args.answer] = -100                                 # an instruction-tuning batch: answers supervised
    step = hf_peft_step(base, ids, answer, args)
    to, th = timeit([train_step_fn(m1, ids, answer), step], args.repeats, args.warmup, args.device)
    print(f"(e) same, last {args.answer} of {args.seq} tokens supervised: ours {to * 1e3:.2f} ms | transformers+peft "
          f"{th * 1e3:.2f} ms | ratio {to / th:.3f} (target <= 0.8)")


def main():
    global CLOCK
    args = parse_args()
    if args.clock == "cpu":
        CLOCK, args.threads = time.thread_time, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    base = build(args)
    torch.manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    labels = ids.clone()
    print(f"config: hidden={args.hidden} inter={args.inter} layers={args.layers} vocab={args.vocab} "
          f"batch={args.batch} seq={args.seq} K={args.K} r={args.r} dtype={args.dtype} device={args.device} "
          f"threads={torch.get_num_threads()} clock={args.clock}")
    mk, m1 = bench_one_active(base, ids, labels, args)
    mm, alpha = bench_routed(mk, m1, ids, args)
    bench_disco_routing(mk, mm, ids, args)
    lora.set_routing(mk, alpha)
    if hasattr(mk, "generate"):
        bench_generate(mk, mm, ids, args)
    if not args.skip_peft:
        bench_vs_peft(base, m1, ids, labels, args)
        bench_vs_transformers_peft(base, m1, ids, labels, args)


if __name__ == "__main__":
    main()
