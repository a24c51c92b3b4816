"""GPU check: fcit (model.py + lora.py) against transformers + peft on a LLaVA-1.5-7B-shaped model, same weights.

Not a test; nothing is downloaded (random weights). One process, one GPU; sized for a few minutes on an H100/H200:

  train step   the paper's shape: LoRA on gate/up/down_proj (ours: rank 64 in K=8 subspaces, one rank-8 subspace
               trained; peft: r=8), projector trained (fp32 master weights), bf16 autocast, gradient checkpointing,
               batch 8 x 1024 tokens (576 image tokens each), clipping 1.0, AdamW; median of alternating steps
  train MFU    model FLOPs per step / step time / the GPU's dense bf16 peak (--peak-tflops, else a table by name)
  peak memory  torch.cuda.max_memory_allocated over one step with a fresh AdamW, minus the other model's own tensors
  generate     batch 16 prompts with one image each, greedy, 64 new tokens (no EOS stop): tokens/s, and whether
               VLM.generate and transformers' generate give identical tokens
  24 GB recipe ours alone, batch 1 x 1536 tokens, gradient checkpointing, one LoRA step: peak memory, and whether
               it fits a 24 GB card (max_memory_reserved <= --card-gib, the usable part of one)

    python bench/gpu.py --json gpu.json            # CUDA, LLaVA-1.5-7B shape, bfloat16
    python bench/gpu.py --peak-tflops 989          # a GPU missing from the table
    python bench/gpu.py --tiny --device cpu        # tiny config, float32: checks this script in seconds

Weights: transformers builds LlavaForConditionalGeneration from LlavaConfig(**checkpoint.hf_config(our config))
directly on the device (llava-1.5-7b-hf's shape: vocab 32064, <image> = 32000); our VLM is built on the meta device
and takes the same tensors through checkpoint.canonical_key (shared, not copied: one 14 GB copy in memory).
Model FLOPs of a train step (N = batch x tokens; gradient-checkpointing recomputation not counted):
  4 (P_dec + P_head) N          forward 2PN + input gradients 2PN through the frozen decoder and lm_head weights
  + 12 L d T N                  attention QK^T and PV, forward and backward, not halved for causality (PaLM)
  + 6 P_lora N + 6 P_proj N_img trained LoRA subspace and projector (forward, input and weight gradients)
  + 2 P_vis N_vis + 4 L_v d_v S_v^2 n_img   frozen vision tower up to the selected layer, forward only
The same count is used for both implementations (ours runs lm_head only at supervised positions: less work).
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import lora  # noqa: E402
import model as M  # noqa: E402

GiB = 2 ** 30
# dense bf16 tensor-core peaks (TFLOPS), first substring match of torch.cuda.get_device_name() wins
PEAK_TFLOPS = (("H200", 989), ("GH200", 989), ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H800", 989),
               ("B200", 2250), ("A100", 312), ("A800", 312), ("L40S", 362), ("L4", 121), ("RTX 4090", 165))
FULL = dict(train_batch=8, train_seq=1024, supervised=128, gen_batch=16, gen_text=32, new_tokens=64, recipe_seq=1536,
            steps=5, warmup=2, gen_repeats=3)
TINY = dict(train_batch=2, train_seq=48, supervised=8, gen_batch=4, gen_text=8, new_tokens=8, recipe_seq=64,
            steps=3, warmup=1, gen_repeats=2)


def model_config(tiny: bool) -> M.VLMConfig:
    """LLaVA-1.5-7B (llava-hf: Vicuna-7B + CLIP ViT-L/14-336, 2-layer GELU projector), or a tiny one of its shape."""
    if not tiny:
        return M.VLMConfig(text=M.DecoderConfig(vocab_size=32064, max_position_embeddings=4096, pad_token_id=0),
                           vision=M.VisionConfig(), image_token_index=32000)
    text = M.DecoderConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=256, pad_token_id=0)
    vision = M.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8)
    return M.VLMConfig(text=text, vision=vision, image_token_index=500)


def peak_tflops(device_name, given=None):
    """--peak-tflops, else the table entry for this GPU's name; None on CPU or for an unknown GPU."""
    if given:
        return float(given)
    return next((float(v) for k, v in PEAK_TFLOPS if k in device_name), None) if device_name != "cpu" else None


def build_models(cfg: M.VLMConfig, device, dtype, seed=0):
    """transformers' LlavaForConditionalGeneration built on `device` from our config, and our VLM holding the very
    same tensors (mapped by checkpoint.canonical_key). Returns (hf, ours, number of shared tensors)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = LlavaForConditionalGeneration._from_config(LlavaConfig(**checkpoint.hf_config(cfg)), dtype=dtype,
                                                        attn_implementation="sdpa")
    with torch.device("meta"):
        ours = M.VLM(cfg)
    sd = {checkpoint.canonical_key(k): t for k, t in hf.state_dict().items()}
    sd.pop(None, None)                              # keys ignored on purpose (buffers such as position_ids)
    ours.load_state_dict(sd, strict=True, assign=True)   # raises naming any missing, unexpected or misshapen key
    for m in (hf, ours):
        m.eval().requires_grad_(False)
    return hf, ours, len(sd)


def make_batch(cfg: M.VLMConfig, B, T, supervised, device, seed):
    """B rows of T tokens: BOS, 5 text tokens, the image tokens, text; the last `supervised` tokens are labels.
    Returns (input_ids, labels, pixel_values (B, 3, H, W) float32)."""
    g = torch.Generator().manual_seed(seed)
    S, img = M.image_seq_len(cfg), cfg.image_token_index
    if T < S + 6 + supervised:
        raise ValueError(f"{T} tokens cannot hold BOS, 5 text tokens, {S} image tokens and {supervised} supervised")
    text = lambda n: torch.randint(3, min(img, cfg.text.vocab_size), (B, n), generator=g)
    ids = torch.cat([torch.ones(B, 1, dtype=torch.long), text(5), torch.full((B, S), img), text(T - S - 6)], 1)
    labels = ids.clone()
    labels[:, : T - supervised] = M.IGNORE_INDEX
    px = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ids.to(device), labels.to(device), px.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(fns: dict, warmup, repeats, device):
    """Interleaved timing (a, b, a, b, ...) so load and clocks hit every implementation alike: median seconds."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def storage_bytes(model, exclude=None):
    """Bytes of the model's parameters and buffers (unique storages), leaving out storages `exclude` also holds."""
    skip = set() if exclude is None else {t.untyped_storage().data_ptr() for t in _tensors(exclude)}
    seen = {}
    for t in _tensors(model):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _tensors(model):
    return [t for t in list(model.parameters()) + list(model.buffers()) if not t.is_meta]


# ----------------------------------------------------------------------------------------------------------------
# generation


def hf_generate(hf, ids, px, n):
    """transformers' greedy generate, n new tokens, no EOS stop -> list of token lists."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def bench_generate(hf, ours, cfg, a, device, dtype):
    """Tokens/s of greedy generation (alternating runs) and whether both implementations emit the same tokens."""
    T = M.image_seq_len(cfg) + 6 + a.gen_text
    ids, _, px = make_batch(cfg, a.gen_batch, T, 0, device, seed=1)
    px = px.to(dtype)
    hf.generation_config.eos_token_id = None
    out = {}
    fns = {"ours": lambda: out.update(ours=ours.generate(ids, pixel_values=px, max_new_tokens=a.new_tokens,
                                                         eos_token_id=-1)),
           "transformers": lambda: out.update(transformers=hf_generate(hf, ids, px, a.new_tokens))}
    if a.compile:     # the warm-up run compiles
        fns["compiled"] = lambda: out.update(compiled=ours.generate(ids, pixel_values=px, max_new_tokens=a.new_tokens,
                                                                    eos_token_id=-1, compile=True))
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    t = alternate(fns, 1, a.gen_repeats, device)
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips
    with torch.no_grad():
        d = (ours(ids[:2], px[:2]).float() - hf(input_ids=ids[:2], pixel_values=px[:2]).logits.float()).abs().max()
    rows = [o == h for o, h in zip(out["ours"], out["transformers"])]
    first = [next((i for i, (x, y) in enumerate(zip(o, h)) if x != y), min(len(o), len(h)))
             for o, h, same in zip(out["ours"], out["transformers"], rows) if not same]
    n_tok = a.gen_batch * a.new_tokens
    return {"batch": a.gen_batch, "prompt_tokens": T, "new_tokens": a.new_tokens,
            "ours_tok_s": n_tok / t["ours"], "transformers_tok_s": n_tok / t["transformers"],
            "ratio_tok_s": t["transformers"] / t["ours"], "identical": all(rows), "identical_rows": sum(rows),
            "first_difference": min(first) if first else None, "prefill_max_abs_dlogits": float(d),
            "compiled_tok_s": n_tok / t["compiled"] if a.compile else None,
            "ratio_compiled_tok_s": t["transformers"] / t["compiled"] if a.compile else None,
            "compiled_identical": out["compiled"] == out["ours"] if a.compile else None,
            "cudagraph_skips": skips if a.compile and device.type == "cuda" else None}


# ----------------------------------------------------------------------------------------------------------------
# training


def autocast_on(device, dtype):
    """federate.py's rule: bf16 autocast (and an fp32 master projector) on CUDA with bf16 weights."""
    return device.type == "cuda" and dtype != torch.float32


def setup_lora(hf, ours, master_dtype):
    """The paper's adapters on both models: ours rank 64 in K=8 subspaces (subspace 0 trained), peft r=8 on the
    same modules; each model trains its own copy of the projector (in master_dtype); gradient checkpointing.
    Returns (peft's model, ours)."""
    import peft
    lora.apply_lora(ours, 64, 128, num_subspaces=8, dropout=0.05, generator=torch.Generator().manual_seed(0))
    lora.set_active(ours, 0)
    ours.gradient_checkpointing = True
    enable = getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable  # 5.x / 4.x
    enable({"use_reentrant": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                     target_modules=list(lora.DEFAULT_TARGETS)))
    for proj in (ours.projector, hf.model.multi_modal_projector):
        for p in proj.parameters():
            p.data = p.detach().to(master_dtype, copy=True)
            p.requires_grad_(True)
    return pm.train(), ours.train()


def train_step(loss_fn, params, device, dtype):
    """One optimizer step as federate.train_epochs runs it (autocast on CUDA, clipping 1.0, fresh AdamW)."""
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    amp = autocast_on(device, dtype)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = loss_fn()
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_peak(step, device, other_bytes=0):
    """(max_memory_allocated - other_bytes, max_memory_reserved) over one call of step(); (None, None) on CPU."""
    if device.type != "cuda":
        step()
        return None, None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - other_bytes, torch.cuda.max_memory_reserved()


def train_flops(ours, B, T):
    """Model FLOPs of one train step; the formula is in the module docstring."""
    c, v = ours.config.text, ours.config.vision
    named = list(ours.named_parameters())
    w = lambda pre: sum(p.numel() for n, p in named if n.startswith(pre) and n.endswith("weight") and p.dim() >= 2)
    n_img, N = B, B * T
    S_img, S_vis = M.image_seq_len(ours.config), (v.image_size // v.patch_size) ** 2 + 1
    fl = ours.config.vision_feature_layer
    used = max(i if i >= 0 else v.num_hidden_layers + 1 + i for i in (fl if isinstance(fl, list) else [fl]))
    p_lora = sum(p.numel() for n, p in named if p.requires_grad and not n.startswith("projector."))
    p_vis = w("vision.encoder.layers.0.") * used + w("vision.embeddings.patch_embedding")
    return (4 * (w("lm.layers.") + w("lm_head")) * N + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim
            * T * N + 6 * p_lora * N + 6 * w("projector.") * S_img * n_img
            + 2 * p_vis * S_vis * n_img + 4 * used * v.hidden_size * S_vis ** 2 * n_img)


def bench_train(hf, ours, cfg, a, device, dtype, peak):
    """Step time (alternating), MFU and peak memory of ours vs transformers + peft on the paper's training shape."""
    pm, ours = setup_lora(hf, ours, torch.float32 if autocast_on(device, dtype) else dtype)
    ids, labels, px = make_batch(cfg, a.train_batch, a.train_seq, a.supervised, device, seed=2)
    px = px.to(dtype)
    loss = {"ours": lambda: ours.loss(ids, labels, px),
            "transformers": lambda: pm(input_ids=ids, pixel_values=px, labels=labels, use_cache=False).loss}
    params = {"ours": [p for p in ours.parameters() if p.requires_grad],
              "transformers": [p for p in pm.parameters() if p.requires_grad]}
    n_train = {k: sum(p.numel() for p in v) for k, v in params.items()}
    if n_train["ours"] != n_train["transformers"]:
        raise RuntimeError(f"trainable parameters differ: {n_train}")
    t = alternate({k: train_step(loss[k], params[k], device, dtype) for k in loss}, a.warmup, a.steps, device)
    others = {"ours": (pm, ours), "transformers": (ours, pm)}
    mem = {k: step_peak(train_step(loss[k], params[k], device, dtype), device, storage_bytes(*others[k]))[0]
           for k in loss}
    flops = train_flops(ours, a.train_batch, a.train_seq)
    mfu = {k: flops / t[k] / (peak * 1e12) if peak else None for k in t}
    return {"batch": a.train_batch, "tokens": a.train_seq, "trainable_params": n_train["ours"], "flops": flops,
            "step_s": t, "mfu": mfu, "peak_bytes": mem, "ratio_step": t["ours"] / t["transformers"],
            "ratio_mfu": t["transformers"] / t["ours"],
            "ratio_peak": mem["ours"] / mem["transformers"] if mem["ours"] else None}


def bench_recipe(ours, cfg, a, device, dtype):
    """The README's 24 GB recipe with ours alone: batch 1, gradient checkpointing, one LoRA step."""
    ids, labels, px = make_batch(cfg, 1, a.recipe_seq, a.supervised, device, seed=3)
    px = px.to(dtype)
    params = [p for p in ours.parameters() if p.requires_grad]
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated() if device.type == "cuda" else None
    alloc, reserved = step_peak(train_step(lambda: ours.loss(ids, labels, px), params, device, dtype), device)
    fits = None if reserved is None else reserved <= a.card_gib * GiB
    return {"tokens": a.recipe_seq, "model_bytes": storage_bytes(ours), "resident_bytes": resident,
            "peak_bytes": alloc, "peak_reserved_bytes": reserved, "card_gib": a.card_gib, "fits_24gb": fits}


# ----------------------------------------------------------------------------------------------------------------
# report


def _gib(b):
    return "n/a (CPU)" if b is None else f"{b / GiB:.2f} GiB"


def _pct(x):
    return "n/a (no --peak-tflops)" if x is None else f"{x:.1%}"


def report(res):
    """One line per measurement, ours | transformers | ratio ours/theirs."""
    tr, gen, rec = res["train"], res["generate"], res["recipe_24gb"]
    mem = tr["peak_bytes"]
    ratio_mem = "n/a" if tr["ratio_peak"] is None else f"{tr['ratio_peak']:.2f}"
    fits = "yes" if rec["fits_24gb"] else "no"
    same = "yes" if gen["identical"] else f"no (first difference at new token {gen['first_difference']})"
    lines = [
        f"train step ({tr['batch']} x {tr['tokens']} tok, LoRA rank 8 + projector, grad ckpt, AdamW): ours "
        f"{tr['step_s']['ours'] * 1e3:.1f} ms | transformers+peft {tr['step_s']['transformers'] * 1e3:.1f} ms | "
        f"ratio {tr['ratio_step']:.2f}",
        f"train MFU ({tr['flops'] / 1e12:.4g} TFLOP/step, peak {res['peak_tflops'] or 'n/a'} TFLOPS): ours "
        f"{_pct(tr['mfu']['ours'])} | transformers+peft {_pct(tr['mfu']['transformers'])} | "
        f"ratio {'n/a' if tr['mfu']['ours'] is None else format(tr['ratio_mfu'], '.2f')}",
        f"train peak memory: ours {_gib(mem['ours'])} | transformers+peft {_gib(mem['transformers'])} | "
        f"ratio {ratio_mem}",
        f"generate ({gen['batch']} x {gen['prompt_tokens']} tok + {gen['new_tokens']} new, greedy): ours "
        f"{gen['ours_tok_s']:.1f} tok/s | transformers {gen['transformers_tok_s']:.1f} tok/s | "
        f"ratio {gen['ratio_tok_s']:.2f}",
        f"greedy outputs identical: {same}; {gen['identical_rows']}/{gen['batch']} rows; prefill max |dlogits| "
        f"{gen['prefill_max_abs_dlogits']:.2e}",
        "generate, decode step compiled (--compile): " + ("not run" if gen["compiled_tok_s"] is None else
                                                          f"{gen['compiled_tok_s']:.1f} tok/s | ratio to transformers "
                                                          f"{gen['ratio_compiled_tok_s']:.2f} | same tokens as eager: "
                                                          f"{'yes' if gen['compiled_identical'] else 'no'} | "
                                                          f"CUDA graphs skipped: {_na(gen['cudagraph_skips'])}"),
        f"24 GB recipe (1 x {rec['tokens']} tok, grad ckpt, one LoRA step, ours): " + (
            "peak memory n/a (CPU) | fits 24 GB: n/a (CPU)" if rec["peak_bytes"] is None else
            f"peak {_gib(rec['peak_bytes'])} allocated ({_gib(rec['resident_bytes'])} before the step, the model "
            f"{_gib(rec['model_bytes'])}), {_gib(rec['peak_reserved_bytes'])} reserved | fits 24 GB: {fits}"),
    ]
    print("\n".join(lines), flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config of the same shape (runs on CPU in seconds)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="weights (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    ap.add_argument("--card-gib", type=float, default=22.0,
                    help="usable memory of a 24 GB card after the CUDA context (an A10G or L4 shows 22.5 GiB)")
    ap.add_argument("--json", default=None, help="write the numbers to this JSON file")
    ap.add_argument("--compile", action="store_true",
                    help="also time generation with the decode step through torch.compile (CUDA graphs on a GPU)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: 1 with --tiny on CPU, else torch's default)")
    for k, v in FULL.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                        help=f"default {v} ({TINY[k]} with --tiny)")
    a = ap.parse_args(argv)
    for k in FULL:
        if getattr(a, k) is None:
            setattr(a, k, (TINY if a.tiny else FULL)[k])
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: CUDA is not available here; run --tiny --device cpu")
    if not a.device.startswith("cuda") and not a.tiny:
        ap.error("the LLaVA-1.5-7B shape needs a CUDA GPU (40 GB or more); on CPU run --tiny --device cpu")
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    return a


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def _na(v):
    return "n/a" if v is None else v


def _count(n):
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def run(a):
    """Build both models, then generation, training and the 24 GB recipe; returns the numbers."""
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    cfg, t0 = model_config(a.tiny), time.perf_counter()
    hf, ours, shared = build_models(cfg, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res = {"device": name, "dtype": a.dtype, "tiny": a.tiny, "params": sum(p.numel() for p in ours.parameters()),
           "shared_tensors": shared, "peak_tflops": peak_tflops(name, a.peak_tflops)}
    print(f"config: {'tiny' if a.tiny else 'LLaVA-1.5-7B'} shape, {_count(res['params'])} params, {a.dtype}, {name};"
          f" {shared} tensors shared with transformers (built in {time.perf_counter() - t0:.0f} s)", flush=True)
    res["generate"] = bench_generate(hf, ours, cfg, a, device, dtype)
    res["train"] = bench_train(hf, ours, cfg, a, device, dtype, res["peak_tflops"])
    del hf   # the frozen weights stay alive through ours; transformers' adapters and projector go
    res["recipe_24gb"] = bench_recipe(ours, cfg, a, device, dtype)
    res["wall_s"] = time.perf_counter() - t0
    return res


def main(argv=None):
    a = parse_args(argv)
    threads = torch.get_num_threads()
    if a.threads or (a.tiny and a.device == "cpu"):   # toy sizes: more threads only add overhead
        torch.set_num_threads(a.threads or 1)
    try:
        res = run(a)
    finally:
        torch.set_num_threads(threads)
    report(res)
    print(f"total {res['wall_s']:.0f} s", flush=True)
    if a.json:
        M.atomic_write(a.json, lambda tmp: _write_json(tmp, res))
    return res


if __name__ == "__main__":
    main()
