"""Batched greedy generation: fcit's VLM.generate vs transformers' generate, same weights, same process.

Not a test. A left-padded batch of prompts, each with an image (FCIT-mini instructions), greedy decoding with a KV
cache; prints tokens/s of both, their ratio (median of interleaved repeats) and whether the outputs are identical.

    python bench/generate_speed.py [--config tiny|wide] [--batch 8 --new-tokens 32 --repeats 5 --threads 1] [--compile]
    python bench/generate_speed.py --config wide --profile     # also: each stack's time in matrix products

tiny: the embedded assets/tiny-llava. wide: a random LLaVA (LLaMA hidden 768, 8 layers, vocab 32000; CLIP 256/4)
saved by transformers. Time: wall clock, or this thread's CPU time with --clock cpu (robust on a shared machine).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import data  # noqa: E402
import imaging  # noqa: E402
import mini  # noqa: E402


def wide_checkpoint(folder):
    """A random llava-hf checkpoint of a wider LLaMA + small CLIP, written by transformers; its tokenizer is the
    tiny model's, with the vocabulary ids mapped into the wider vocabulary (ids < 1024 are valid)."""
    import shutil

    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                       num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=64, patch_size=16)
    LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=4)) \
        .eval().save_pretrained(folder)
    tiny = os.path.join(ROOT, "assets", "tiny-llava")
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(tiny, f), folder)
    return folder


def prompts(folder, model, batch):
    """A left-padded generation batch of FCIT-mini prompts with images, as evaluation builds it."""
    tok = checkpoint.load_tokenizer(folder)
    improc = imaging.ImageProcessor.for_checkpoint(folder)
    exs = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(batch):
            ds = mini.FCIT_DATASETS[i % len(mini.FCIT_DATASETS)]
            im, ins, ans, _ = mini.mini_sample(ds, 0, "test", i)
            path = os.path.join(d, f"{i}.png")
            im.save(path)
            exs.append(data.Example(ds, ins, ans, path, i, {}))
        col = data.Collator(tok, improc, "vicuna_v1", image_seq_len=model.image_seq_len,
                            image_token_id=tok.image_token_id, max_length=None, train=False)
        return col(exs)


def timeit(fns, repeats, clock):
    """Interleaved runs of several callables: the median seconds of each."""
    times = [[] for _ in fns]
    for f in fns:
        f()                                                   # warm-up
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = clock()
            f()
            times[i].append(clock() - t0)
    return [statistics.median(t) for t in times]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=("tiny", "wide"), default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    ap.add_argument("--compile", action="store_true", help="ours with the decode step through torch.compile")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one call of each: time in matrix products (aten::mm/addmm) and the ratio "
                         "that zero time outside them would give ours")
    return ap.parse_args()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlavaForConditionalGeneration
    with tempfile.TemporaryDirectory() as d:
        folder = wide_checkpoint(d) if args.config == "wide" else os.path.join(ROOT, "assets", "tiny-llava")
        ours = checkpoint.load_vlm(folder).eval()
        hf = LlavaForConditionalGeneration.from_pretrained(folder).eval()
        batch = prompts(folder, ours, args.batch)
    ids, am, px, n = batch["input_ids"], batch["attention_mask"], batch["pixel_values"], args.new_tokens
    never = -1                                                # no early stop: every row makes n tokens
    out = {}

    @torch.no_grad()
    def run_ours():
        out["ours"] = ours.generate(ids, am, px, max_new_tokens=n, eos_token_id=never, compile=args.compile)

    @torch.no_grad()
    def run_hf():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = hf.generate(input_ids=ids, attention_mask=am, pixel_values=px, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=3, eos_token_id=None)
        out["hf"] = g[:, ids.shape[1]:].tolist()

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    t_ours, t_hf = timeit([run_ours, run_hf], args.repeats, clock)
    tokens = sum(len(r) for r in out["ours"])
    print(f"config {args.config}, batch {args.batch} x {n} new tokens, prompt {ids.shape[1]} tokens, "
          f"threads {torch.get_num_threads()}, clock {args.clock}, decode step compiled: {args.compile}")
    print(f"ours          {tokens / t_ours:8.1f} tokens/s  ({t_ours * 1e3:.1f} ms)")
    print(f"transformers  {tokens / t_hf:8.1f} tokens/s  ({t_hf * 1e3:.1f} ms)")
    print(f"ratio (ours / transformers tokens/s): {t_hf / t_ours:.2f}x; identical outputs: {out['ours'] == out['hf']}")
    if args.profile:
        (tot_o, mm_o), (tot_h, mm_h) = matmul_time(run_ours), matmul_time(run_hf)
        print(f"profiled call: ours {tot_o * 1e3:.0f} ms, of which matrix products {mm_o * 1e3:.0f} ms; transformers "
              f"{tot_h * 1e3:.0f} ms, of which {mm_h * 1e3:.0f} ms; ceiling with these products "
              f"(transformers' total / ours' products): {tot_h / mm_o:.2f}x")


def matmul_time(fn):
    """One profiled call: (total self CPU seconds, seconds in aten::mm and aten::addmm)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ev = prof.key_averages()
    mm = sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm"))
    return sum(e.self_cpu_time_total for e in ev) / 1e6, mm / 1e6


if __name__ == "__main__":
    main()
