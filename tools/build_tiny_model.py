"""Build the embedded tiny VLM that `fcit.py` uses when no --model is given.

    python tools/build_tiny_model.py [--out assets/tiny-llava] [--steps 1500] [--seed 0]

A toy LLaVA-1.5-shaped model with its own byte-level BPE tokenizer, pretrained from scratch on tools/corpus.py (generic
captions, visual questions and text-only instructions, never in an FCIT-mini or FedIT-mini task format) so that it can
see and follow instructions, and written in the llava-hf layout so that the embedded run exercises the same loader as a
real checkpoint. The tokenizer spends one token on each template's fixed system prompt (LLaVA-1.5's vicuna_v1 and
alpaca's two headers): the prompts stay exactly as the real templates write them, and a 2-core CPU spends its time on
the image and the instruction rather than on 30 tokens of boilerplate per sample.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import corpus  # noqa: E402

import checkpoint  # noqa: E402
import imaging  # noqa: E402
import model as vlm  # noqa: E402
import prompts  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
SYSTEM_PROMPTS = [prompts.VICUNA_SYSTEM, prompts.ALPACA_INPUT_SYSTEM, prompts.ALPACA_SYSTEM]
IMAGE_SIZE, PATCH = 64, 16
LABEL_SMOOTHING = 0.1


def train_tokenizer(texts, vocab_size, path):
    """Byte-level BPE (as GPT-2/Qwen2 use) trained on everything the embedded benchmarks can say."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False) for t in SYSTEM_PROMPTS])
    tok.save(path)
    return tok


def tiny_config(vocab_size, image_token_index):
    text = dict(model_type="llama", vocab_size=vocab_size, hidden_size=160, intermediate_size=432,
                num_hidden_layers=4, num_attention_heads=5, num_key_value_heads=5, rms_norm_eps=1e-5,
                rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=3, hidden_act="silu")
    vision = dict(model_type="clip_vision_model", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, image_size=IMAGE_SIZE, patch_size=PATCH, num_channels=3,
                  layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=128)
    return dict(model_type="llava", architectures=["LlavaForConditionalGeneration"],
                image_token_index=image_token_index, vision_feature_layer=-2,
                vision_feature_select_strategy="default", projector_hidden_act="gelu",
                image_seq_length=(IMAGE_SIZE // PATCH) ** 2, text_config=text, vision_config=vision)


def encode_corpus(samples, tokenizer, processor, image_seq_len, seed):
    """Pretraining samples -> (ids, labels, pixels or None): visual ones in LLaVA-1.5's vicuna_v1 template, text-only
    ones in it or in alpaca's (FedIT's), a context as the template's input, answers supervised."""
    rng, out = random.Random(f"templates:{seed}"), []
    for img, ins, ans, ctx in samples:
        template = "vicuna_v1" if img is not None or rng.random() < .5 else "alpaca"
        if ctx:
            ins = f"{ins}{prompts.ALPACA_INPUT}{ctx}" if template == "alpaca" else f"{ctx}\n{ins}"
        ids, labels = prompts.encode_example(tokenizer, ins, ans, template=template,
                                         image_seq_len=image_seq_len if img is not None else 0,
                                         image_token_id=tokenizer.image_token_id)
        out.append((ids, labels, processor([img])[0] if img is not None else None))
    return out


def batches(encoded, batch_size, rng, pad_id):
    """Endless shuffled batches of one kind (all with images or all text-only), as (ids, labels, mask, pixels)."""
    groups = [[e for e in encoded if e[2] is not None], [e for e in encoded if e[2] is None]]
    weights = [len(g) for g in groups]
    orders, pos = [list(range(len(g))) for g in groups], [len(g) for g in groups]
    while True:
        k = rng.choices([0, 1], weights)[0]
        if pos[k] + batch_size > len(orders[k]):
            rng.shuffle(orders[k])
            pos[k] = 0
        batch = [groups[k][j] for j in orders[k][pos[k]:pos[k] + batch_size]]
        pos[k] += batch_size
        T = max(len(b[0]) for b in batch)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        lab = torch.full((len(batch), T), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for r, (row_ids, row_labels, _) in enumerate(batch):
            ids[r, :len(row_ids)], lab[r, :len(row_labels)] = torch.tensor(row_ids), torch.tensor(row_labels)
            mask[r, :len(row_ids)] = 1
        yield ids, lab, mask, (torch.stack([b[2] for b in batch]) if k == 0 else None)


def pretrain(model, tokenizer, processor, steps, batch_size, lr, seed, n_samples, log_every=50, save=None,
             save_every=250):
    """Full-parameter pretraining on the generic corpus (answer tokens supervised, label smoothing against the
    overconfidence a narrow corpus breeds), AdamW with a cosine schedule."""
    t0 = time.time()
    samples = corpus.pretraining_corpus(n_samples, seed=seed, image_size=IMAGE_SIZE)
    encoded = encode_corpus(samples, tokenizer, processor, model.image_seq_len, seed)
    print(f"pretraining corpus: {len(encoded)} samples in {time.time() - t0:.1f}s", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    stream, t0, running = batches(encoded, batch_size, random.Random(seed), tokenizer.pad_id), time.time(), None
    for step in range(steps):
        ids, lab, mask, pix = next(stream)
        loss = model.loss(ids, lab, pixel_values=pix, attention_mask=mask, label_smoothing=LABEL_SMOOTHING)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}/{steps}  loss {running:.3f}  {(step + 1) / (time.time() - t0):.2f} steps/s",
                  flush=True)
        if save is not None and (step + 1) % save_every == 0 and step + 1 < steps:
            save(step + 1)
    model.eval()
    return running


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "assets", "tiny-llava"))
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--samples", type=int, default=80000, help="pretraining corpus size")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)   # a script, not library code: seeding the global RNG here is fine
    os.makedirs(args.out, exist_ok=True)
    # The prompt templates are in every sample, so they are weighted like it: their words merge into few tokens.
    templates = [t[0] for t in prompts.TEMPLATES.values()] + corpus.CAPTION_PROMPTS
    texts = corpus.vocab_corpus(seed=args.seed) + templates * 500
    train_tokenizer(texts, args.vocab_size, os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "add_bos_token": True}, f, indent=2)
    tokenizer = checkpoint.load_tokenizer(args.out)
    cfg = tiny_config(len(tokenizer), tokenizer.image_token_id)
    assert tokenizer.bos_id == 1 and tokenizer.eos_id == 2 and tokenizer.pad_id == 3, "special token ids moved"
    model = vlm.VLM(checkpoint.llava_config(cfg))
    processor = imaging.ImageProcessor.clip(IMAGE_SIZE)
    with open(os.path.join(args.out, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                   "size": {"shortest_edge": IMAGE_SIZE}, "do_center_crop": True,
                   "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_rescale": True,
                   "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(imaging.OPENAI_CLIP_MEAN),
                   "image_std": list(imaging.OPENAI_CLIP_STD), "resample": 3, "do_convert_rgb": True}, f, indent=2)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny VLM: {n_params / 1e6:.2f}M parameters, {model.image_seq_len} image tokens, vocab {len(tokenizer)}")
    final = pretrain(model, tokenizer, processor, args.steps, args.batch_size, args.lr, args.seed, args.samples,
                     save=lambda step: checkpoint.save_vlm(model, args.out))  # intermediate saves: usable while it runs
    checkpoint.save_vlm(model, args.out)
    with open(os.path.join(args.out, "pretraining.json"), "w") as f:
        json.dump({"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                   "samples": args.samples, "label_smoothing": LABEL_SMOOTHING,
                   "final_loss": final, "corpus": "tools/corpus.py"}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
