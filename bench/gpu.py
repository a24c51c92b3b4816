"""GPU check of the whole project on a LLaVA-1.5-7B-shaped model with random weights: fcit.py's real pipeline, then
fcit (model.py + lora.py) against transformers + peft. Not a test; nothing is downloaded. One GPU, one command:

    python bench/gpu.py --json gpu.json            # CUDA, LLaVA-1.5-7B shape, bfloat16; exits 1 if a check FAILs
    python bench/gpu.py --peak-tflops 989          # a GPU missing from the MFU table
    python bench/gpu.py --skip-pipeline            # the measurements only (phase 6)
    python bench/gpu.py --tiny --device cpu        # the same phases on the tiny shape in about half a minute (CI)

Phases, each printed as PASS/FAIL lines with its seconds and peak GPU memory; a failed phase ends phases 1-5. The
budget is for one H100 80GB, COMPUTED from sizes and rates, NOT MEASURED (nobody has run this on a GPU yet):

  1 checkpoint  the 7B VLM built directly on the GPU in bfloat16 (one copy), written by checkpoint.save_vlm as a
                llava-hf folder (config.json, model.safetensors 14.1 GB, the tiny model's tokenizer with <image> = 4
                as image_token_index, preprocessor_config.json for 336 px): init < 5 s, copy to host and write
                14.1 GB 10-40 s (disk-bound)                                                          budget  60 s
  2 data        FCIT-mini in the release layout at 336 px, 16 train + 4 test per dataset (0.7 s on a CPU) budget   5 s
  3 dry-run     fcit.py --dry-run accepts the command below; the paper's preset (client_sampling official)  10 s
  4 pipeline    fcit.py itself, the paper's Task-related preset shortened:
                  --setting task-hom --model DIR --data-root DIR --methods disco,finetune --lm-identity --stages 2
                  --clients 2 --clients-per-round 2 --rounds 1 --batch-size 4 --eval-samples 4 --max-new-tokens 8
                  --dtype bfloat16 --gradient-checkpointing --device cuda --json-log LOG --out OUT
                process and CUDA start 10 s; per method: load 14.1 GB 10 s, 2 stages x (4-5 steps of 4 x ~650
                tokens ~0.5 s each, 4 prompts x 8 tokens per seen task, ~1.3 GB of adapters and state written) 15 s.
                PASS per method: exit 0, each stage's row scores exactly the tasks seen, finite losses of every
                client, both adapter formats of every stage; peak ~17 GB (weights 14.1 GB)             budget 120 s
  5 eval-only   fcit.py --eval-only --adapters OUT/adapters/<method>/stage2, one process per method: start, load,
                2 tasks; PASS if its row equals the run's stage-2 row in results.json (random weights score ~0 on
                every task, so this guards the plumbing: the files load into the same configuration, the same tasks
                are scored, DISCO's keys route)                                                  budget 2 x 45 s
  6 measurements (as before; PASS if they ran) about 90 s:                                             budget 150 s
    train step  the paper's shape: LoRA on gate/up/down_proj (ours: rank 64 in K=8 subspaces, one rank-8 subspace
                trained; peft: r=8), projector trained (fp32 master weights), bf16 autocast, gradient checkpointing,
                batch 8 x 1024 tokens (576 image tokens each), clipping 1.0, AdamW; median of alternating steps
    train MFU   model FLOPs per step / step time / the GPU's dense bf16 peak (--peak-tflops, else a table by name)
    peak memory torch.cuda.max_memory_allocated over one step with a fresh AdamW, minus the other model's own tensors
    generate    batch 16 prompts with one image each, greedy, 64 new tokens (no EOS stop): tokens/s, and whether
                VLM.generate and transformers' generate give identical tokens
    24 GB recipe ours alone, batch 1 x 1536 tokens, gradient checkpointing, one LoRA step: peak memory, and whether
                it fits a 24 GB card (max_memory_reserved <= --card-gib, the usable part of one)
  total budget 435 s (7.3 min) of the 8 minutes allowed; disk ~19 GB (the checkpoint, 2 x 2.1 GB of adapters and
  state), in a temporary folder under --workdir (default $FCIT_CACHE or .cache), removed at the end unless --keep.

fcit.py runs in subprocesses (python bench/gpu.py --child PEAK_JSON ARGS, which calls fcit.main and writes its exit
code and CUDA peaks): each phase's peak memory is its own (torch.cuda.max_memory_allocated of a fresh process, not
this one's 7B copy or allocator cache), fcit.main's global settings (seed, threads) stay out of this process, and
the exact command a user would type is what runs. The pipeline is always in --pipeline-dtype (bfloat16: the paper's
protocol; on a CPU autocast rehearses the GPU's path); --dtype sets the measurements' weights.

Measurement weights: transformers builds LlavaForConditionalGeneration from LlavaConfig(**checkpoint.hf_config(our
config)) directly on the device (llava-1.5-7b-hf's shape: vocab 32064, <image> = 32000); our VLM is built on the
meta device and takes the same tensors through checkpoint.canonical_key (shared, not copied: one 14 GB copy).
Model FLOPs of a train step (N = batch x tokens; gradient-checkpointing recomputation not counted):
  4 (P_dec + P_head) N          forward 2PN + input gradients 2PN through the frozen decoder and lm_head weights
  + 12 L d T N                  attention QK^T and PV, forward and backward, not halved for causality (PaLM)
  + 6 P_lora N + 6 P_proj N_img trained LoRA subspace and projector (forward, input and weight gradients)
  + 2 P_vis N_vis + 4 L_v d_v S_v^2 n_img   frozen vision tower up to the selected layer, forward only
The same count is used for both implementations (ours runs lm_head only at supervised positions: less work).
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import data  # noqa: E402
import files  # noqa: E402
import imaging  # noqa: E402
import lora  # noqa: E402
import mini  # noqa: E402
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
# the pipeline: fcit.py itself on a checkpoint of this shape (phases 1-5, see the module docstring)

TOKENIZER_DIR = os.path.join(ROOT, "assets", "tiny-llava")     # its tokenizer serves both shapes
METHODS = ("disco", "finetune")
PIPELINE = dict(stages=2, clients=2, rounds=1, batch=4, eval_samples=4, new_tokens=8, n_train=16, n_test=4)
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "preprocessor_config.json")
PHASE_TIMEOUT_S = 300     # one fcit.py process


def pipeline_config(tiny: bool, tok) -> M.VLMConfig:
    """model_config's shape with the tokenizer's ids: its <image> as image_token_index (prompts expand it), its
    BOS/EOS/PAD, and a vocabulary that holds them (the tiny shape's 512 grows to the tokenizer's 1027)."""
    cfg = model_config(tiny)
    text = dataclasses.replace(cfg.text, vocab_size=max(cfg.text.vocab_size, len(tok)), bos_token_id=tok.bos_id,
                               eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return dataclasses.replace(cfg, text=text, image_token_index=tok.image_token_id)


def write_preprocessor(folder, size):
    """preprocessor_config.json: CLIP's pre-processing at `size` px, as llava-hf ships it (fcit.py reads it)."""
    p = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
         "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(imaging.OPENAI_CLIP_MEAN),
         "image_std": list(imaging.OPENAI_CLIP_STD), "resample": 3, "do_convert_rgb": True}
    files.atomic_write(os.path.join(folder, "preprocessor_config.json"), lambda tmp: _write_json(tmp, p))


def write_checkpoint(cfg: M.VLMConfig, tok, folder, device, dtype) -> int:
    """A random-weight llava-hf checkpoint of `cfg`: the VLM built directly on `device` in `dtype` (one copy of the
    weights, VLM's own init), saved with the tokenizer and preprocessor_config.json. Returns its parameter count."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            vlm = M.VLM(cfg)
    finally:
        torch.set_default_dtype(default)
    checkpoint.save_vlm(vlm, folder, tokenizer=tok)
    write_preprocessor(folder, cfg.vision.image_size)
    return sum(p.numel() for p in vlm.parameters())


def phase_checkpoint(a, device, work):
    """Phase 1: write the checkpoint, then read its config and tokenizer back."""
    tok = checkpoint.load_tokenizer(TOKENIZER_DIR)
    cfg, folder = pipeline_config(a.tiny, tok), os.path.join(work, "model")
    n = write_checkpoint(cfg, tok, folder, device, getattr(torch, a.pipeline_dtype))
    problems = [f"{f} missing" for f in CHECKPOINT_FILES if not os.path.isfile(os.path.join(folder, f))]
    if not problems:
        back, tok2 = checkpoint.load_config(folder), checkpoint.load_tokenizer(folder)
        if back.image_token_index != tok2.image_token_id or back.text.vocab_size != cfg.text.vocab_size:
            problems.append(f"read back: image_token_index {back.image_token_index}, tokenizer <image> "
                            f"{tok2.image_token_id}, vocab {back.text.vocab_size} (wrote {cfg.text.vocab_size})")
    size = os.path.getsize(os.path.join(folder, "model.safetensors")) if not problems else 0
    size = f"{size / GiB:.2f} GiB" if size >= GiB else f"{size / 2 ** 20:.1f} MiB"
    return [(f"checkpoint {_count(n)} params, {a.pipeline_dtype}, model.safetensors {size}, "
             f"<image> = {cfg.image_token_index}", problems)], {}


def phase_data(a, work):
    """Phase 2: FCIT-mini in the release layout at the vision tower's image size."""
    size, p = model_config(a.tiny).vision.image_size, PIPELINE
    root = mini.make_fcit_mini(os.path.join(work, "data"), seed=0, n_train=p["n_train"], n_test=p["n_test"],
                               image_size=size)
    problems = [] if os.path.isdir(os.path.join(root, "instructions")) else ["no instructions/ folder"]
    return [(f"data FCIT-mini, {p['n_train']} train + {p['n_test']} test per dataset at {size} px", problems)], {}


def fcit_args(a, work):
    """The paper's Task-related preset (real --model and --data-root), shortened to minutes; identities from the LM
    (no CLIP text encoder needed)."""
    p, threads = PIPELINE, a.threads or (1 if a.tiny and a.device == "cpu" else 0)
    return ["--setting", "task-hom", "--model", os.path.join(work, "model"), "--data-root", os.path.join(work, "data"),
            "--methods", ",".join(METHODS), "--lm-identity", "--stages", str(p["stages"]),
            "--clients", str(p["clients"]), "--clients-per-round", str(p["clients"]), "--rounds", str(p["rounds"]),
            "--batch-size", str(p["batch"]), "--eval-samples", str(p["eval_samples"]),
            "--max-new-tokens", str(p["new_tokens"]), "--dtype", a.pipeline_dtype, "--gradient-checkpointing",
            "--device", a.device, "--threads", str(threads)]


def child(peak_json, argv):
    """The body of run_fcit's subprocess (python bench/gpu.py --child PEAK_JSON FCIT_ARGS): fcit.main(argv), then its
    exit code and this process's CUDA peaks into PEAK_JSON."""
    import fcit
    rc = fcit.main(argv)
    cuda = torch.cuda.is_initialized()
    device = torch.device(argv[argv.index("--device") + 1]) if cuda and "--device" in argv else None
    rec = {"rc": rc, "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
           "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None}
    files.atomic_write(peak_json, lambda tmp: _write_json(tmp, rec))
    return rc


def run_fcit(args, work, name):
    """fcit.py in a process of its own, its output in WORK/NAME.log: (problems, the child's CUDA peaks)."""
    peak_json, log_path = os.path.join(work, f"{name}.peak.json"), os.path.join(work, f"{name}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", peak_json, *args]
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=PHASE_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            rc = f"killed after {PHASE_TIMEOUT_S} s"
    peaks = _read_json(peak_json) or {}
    peaks.pop("rc", None)
    if rc == 0:
        return [], peaks
    with open(log_path) as f:
        tail = f.read().splitlines()[-25:]
    print(f"--- fcit.py exited {rc}; the end of {log_path}:\n" + "\n".join(tail) + "\n---", flush=True)
    return [f"fcit.py exited {rc} (log {log_path})"], peaks


def phase_dry_run(a, work):
    """Phase 3: fcit.py --dry-run accepts the command, and the configuration it records is the shortened paper's."""
    out = os.path.join(work, "run")
    problems, peaks = run_fcit(fcit_args(a, work) + ["--out", out, "--dry-run"], work, "dry-run")
    cfg = _read_json(os.path.join(out, "config.json")) or {}
    want = {"stages": PIPELINE["stages"], "clients": PIPELINE["clients"], "rounds": PIPELINE["rounds"],
            "methods": list(METHODS), "dtype": a.pipeline_dtype, "client_sampling": "official", "embedded": False,
            "gradient_checkpointing": True, "lm_identity": True}
    problems += [f"config.json {k}={cfg.get(k)!r}, expected {v!r}" for k, v in want.items() if cfg.get(k) != v]
    return [("dry-run fcit.py accepts the command (the paper's preset, shortened)", problems)], peaks


def check_run(results, records, out, method):
    """A finished run of `method`: one row per stage scoring exactly the tasks seen by then, every client of every
    round with a finite loss after at least one step, both adapter formats of every stage. Returns the problems."""
    r = results.get("methods", {}).get(method)
    if r is None:
        return [f"no {method} in results.json"]
    n_tasks, stages = len(results["tasks"]), PIPELINE["stages"]
    want = [[k in data.seen_tasks("task-hom", s) for k in range(n_tasks)] for s in range(stages)]
    problems = [] if [[v is not None for v in row] for row in r["matrix"]] == want else [
        f"accuracy matrix {r['matrix']}: expected {stages} rows scoring the tasks seen by each stage"]
    mine = [x for x in records if x.get("method") == method]
    if len(mine) != stages * PIPELINE["rounds"] * PIPELINE["clients"]:
        problems.append(f"{len(mine)} client records in the --json-log, expected "
                        f"{stages * PIPELINE['rounds'] * PIPELINE['clients']}")
    bad = [x for x in mine if not (x.get("steps") and x.get("loss") is not None and math.isfinite(x["loss"]))]
    problems += [f"stage {x['stage'] + 1} client {x['client']}: loss {x.get('loss')}, {x.get('steps')} steps"
                 for x in bad]
    for s in range(1, stages + 1):
        d = os.path.join(out, "adapters", method, f"stage{s}")
        problems += [f"{os.path.relpath(os.path.join(d, f), out)} missing" for f in
                     ("fcit_adapter.safetensors", "peft/adapter_config.json", "peft/adapter_model.safetensors")
                     if not os.path.isfile(os.path.join(d, f))]
    return problems


def phase_pipeline(a, work):
    """Phase 4: the run, every method in one fcit.py process; one check per method."""
    out, log = os.path.join(work, "run"), os.path.join(work, "run.jsonl")
    problems, peaks = run_fcit(fcit_args(a, work) + ["--out", out, "--json-log", log], work, "pipeline")
    results = _read_json(os.path.join(out, "results.json")) or {}
    records = []
    if os.path.isfile(log):
        with open(log) as f:
            records = [json.loads(line) for line in f if line.strip()]
    return [(f"pipeline {m} train+eval+adapters ({PIPELINE['stages']} stages)",
             problems + check_run(results, records, out, m)) for m in METHODS], peaks


def check_eval(run, ev, method):
    """--eval-only's row of `method` equals the run's last row (both as results.json rounds them)."""
    row = run.get("methods", {}).get(method, {}).get("matrix", [None])[-1]
    got = ev.get("methods", {}).get(method, {}).get("matrix")
    return [] if row is not None and got == [row] else [f"eval-only row {got} != the run's last row {row}"]


def phase_eval(a, work, method):
    """Phase 5: fcit.py --eval-only on the last stage `method` saved reproduces the run's row."""
    stage, out = PIPELINE["stages"], os.path.join(work, f"eval-{method}")
    adapter = os.path.join(work, "run", "adapters", method, f"stage{stage}")
    problems, peaks = run_fcit(fcit_args(a, work) + ["--eval-only", "--adapters", adapter, "--out", out], work,
                               f"eval-{method}")
    run, ev = _read_json(os.path.join(work, "run", "results.json")) or {}, _read_json(os.path.join(out, "results.json"))
    problems += check_eval(run, ev or {}, method)
    scores = ", ".join(f"{t} {v}" for t, v in (ev or {}).get("methods", {}).get(method, {})
                       .get("per_task_last", {}).items())
    return [(f"eval-only {method} reproduces stage {stage} ({scores or 'no scores'})", problems)], peaks


def run_phase(res, name, fn, device):
    """One phase: fn() -> ([(check, problems)], the child's CUDA peaks or {}); its seconds and peak GPU memory (this
    process's, or its child's), one PASS/FAIL line per check. An exception fails the phase, naming it."""
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        checks, peaks = fn()
    except Exception as e:       # reported as this phase's FAIL; the next phases still get their turn or a FAIL
        traceback.print_exc()
        checks, peaks = [(name, [f"{type(e).__name__}: {e}"])], {}
    stats = {"wall_s": time.perf_counter() - t0,
             "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
             "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None, **peaks}
    res["phases"][name] = stats
    for check, problems in checks:
        record_check(res, check, problems, name, stats)
    return all(not p for _, p in checks)


def record_check(res, check, problems, phase, stats=None):
    """Print and keep one check: PASS, or FAIL with its problems; the phase's seconds and GPU peak."""
    ok = not problems
    where = "" if stats is None else f"  [{phase}: {stats['wall_s']:.0f} s" + (
        "]" if stats["peak_allocated_bytes"] is None else f", GPU peak {_gib(stats['peak_allocated_bytes'])} "
        f"allocated, {_gib(stats['peak_reserved_bytes'])} reserved]")
    print(f"{'PASS' if ok else 'FAIL'} {check}{'' if ok else ': ' + '; '.join(problems)}{where}", flush=True)
    res["checks"].append({"check": check, "phase": phase, "pass": ok, "problems": problems})


def bench_pipeline(a, device, res):
    """Phases 1-5 in a fresh folder under --workdir (removed unless --keep); a failed phase ends them, the rest
    are FAILs "not run"."""
    os.makedirs(a.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu-bench-", dir=a.workdir)
    res["pipeline"] = {"workdir": work, "kept": a.keep, "methods": list(METHODS), **PIPELINE,
                       "command": ["python", "fcit.py", *fcit_args(a, work), "--out", os.path.join(work, "run")]}
    print("pipeline: " + " ".join(res["pipeline"]["command"]), flush=True)
    phases = [("checkpoint", lambda: phase_checkpoint(a, device, work)), ("data", lambda: phase_data(a, work)),
              ("dry-run", lambda: phase_dry_run(a, work)), ("pipeline", lambda: phase_pipeline(a, work))]
    phases += [(f"eval-only {m}", lambda m=m: phase_eval(a, work, m)) for m in METHODS]
    try:
        for i, (name, fn) in enumerate(phases):
            if not run_phase(res, name, fn, device):
                for later, _ in phases[i + 1:]:
                    record_check(res, f"{later} not run", ["an earlier phase failed"], later)
                break
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


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
                    help="torch CPU threads, here and in fcit.py (0: 1 with --tiny on CPU, else torch's default)")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the measurements (phase 6)")
    ap.add_argument("--pipeline-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="the checkpoint's and fcit.py's --dtype (default: bfloat16, the paper's, on CPU too)")
    ap.add_argument("--workdir", default=os.environ.get("FCIT_CACHE", os.path.join(ROOT, ".cache")),
                    help="where the pipeline's temporary folder goes (needs ~19 GB for the 7B shape; default: "
                    "$FCIT_CACHE or .cache)")
    ap.add_argument("--keep", action="store_true", help="keep the pipeline's folder (checkpoint, data, run, logs)")
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


def _read_json(path):
    """The file's JSON, or None if it is missing."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _na(v):
    return "n/a" if v is None else v


def _count(n):
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def measure(a, device, dtype, res):
    """Phase 6: build both models, then generation, training and the 24 GB recipe, reported; returns its check."""
    cfg, t0 = model_config(a.tiny), time.perf_counter()
    hf, ours, shared = build_models(cfg, device, dtype)
    res.update(params=sum(p.numel() for p in ours.parameters()), shared_tensors=shared)
    print(f"config: {'tiny' if a.tiny else 'LLaVA-1.5-7B'} shape, {_count(res['params'])} params, {a.dtype}, "
          f"{res['device']}; {shared} tensors shared with transformers (built in {time.perf_counter() - t0:.0f} s)",
          flush=True)
    res["generate"] = bench_generate(hf, ours, cfg, a, device, dtype)
    res["train"] = bench_train(hf, ours, cfg, a, device, dtype, res["peak_tflops"])
    del hf   # the frozen weights stay alive through ours; transformers' adapters and projector go
    res["recipe_24gb"] = bench_recipe(ours, cfg, a, device, dtype)
    report(res)
    return [("measurements ran: train step, MFU, peak memory, generation, 24 GB recipe", [])], {}


def run(a):
    """The pipeline (phases 1-5, unless --skip-pipeline), then the measurements; returns the numbers and checks."""
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res = {"device": name, "dtype": a.dtype, "tiny": a.tiny, "peak_tflops": peak_tflops(name, a.peak_tflops),
           "checks": [], "phases": {}}
    t0 = time.perf_counter()
    if not a.skip_pipeline:
        bench_pipeline(a, device, res)
    run_phase(res, "measurements", lambda: measure(a, device, dtype, res), device)
    res["wall_s"] = time.perf_counter() - t0
    res["pass"] = all(c["pass"] for c in res["checks"])
    return res


def main(argv=None):
    """Every phase, a PASS/FAIL summary, --json; returns the results (res["pass"]: no check failed)."""
    a = parse_args(argv)
    threads = torch.get_num_threads()
    if a.threads or (a.tiny and a.device == "cpu"):   # toy sizes: more threads only add overhead
        torch.set_num_threads(a.threads or 1)
    try:
        res = run(a)
    finally:
        torch.set_num_threads(threads)
    failed = [c["check"] for c in res["checks"] if not c["pass"]]
    print(f"{'PASS' if not failed else 'FAIL'}: {len(res['checks']) - len(failed)}/{len(res['checks'])} checks "
          f"passed" + ("" if not failed else "; failed: " + ", ".join(failed)), flush=True)
    print(f"total {res['wall_s']:.0f} s", flush=True)
    if a.json:
        files.atomic_write(a.json, lambda tmp: _write_json(tmp, res))
    return res


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:       # run_fcit's subprocess: fcit.py, then its peak memory
        sys.exit(child(sys.argv[2], sys.argv[3:]))
    sys.exit(0 if main()["pass"] else 1)
