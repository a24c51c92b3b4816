"""fcit: Federated Continual Instruction Tuning (FCIT, Guo et al. ICCV 2025) and Federated Instruction
Tuning (FedIT, Zhang et al. 2023) for LLaVA-style vision-language models.

The one entry point. Parses the command line, resolves the model and the data (the embedded tiny VLM and
the built-in FCIT-mini / FedIT-mini benchmarks when no paths are given), runs every requested method
through the stages and rounds of the chosen setting, evaluates after each stage, and writes
`results.json`, `results.md` and one accuracy-matrix heatmap per method. State is checkpointed
atomically after every round, so rerunning the same command on the same `--out` resumes.

    python fcit.py --setting task-hom                      # embedded default, a few minutes on a CPU
    python fcit.py --setting task-hom --model /ckpt/llava-1.5-7b-hf --data-root /data/FCIT --device cuda
    torchrun --nproc_per_node 2 fcit.py --setting task-hom  # clients of a round split across ranks
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time

import torch

import adapters
import checkpoint
import config
import data
import federate
import files
import imaging
import methods
import mini
import report
import scoring
from config import Config, UsageError

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL_DIR = os.path.join(HERE, "assets", "tiny-llava")
CACHE_DIR = os.environ.get("FCIT_CACHE", os.path.join(HERE, ".cache"))
MINI = dict(n_train=300, n_test=50)   # FCIT-mini samples per task (FedIT-mini: records per category)
MINI_FEDIT = dict(n_per_category=60)


# ----------------------------------------------------------------------------------------------------
# command line: one flag per Config field, plus how to run (not what)


def build_parser():
    p = argparse.ArgumentParser(
        prog="fcit.py",
        description="Federated continual instruction tuning (FCIT/DISCO) and federated instruction tuning "
        "(FedIT) of LLaVA-style models. Without --model/--data-root the embedded tiny VLM and the built-in "
        "FCIT-mini / FedIT-mini benchmarks are used with a scaled-down protocol; with them, every unset flag takes "
        "the paper's value for the setting (the defaults shown are FCIT's Task-related protocol).")
    config.add_arguments(p)
    p.add_argument("--out", default=None, help="output directory (default: runs/<setting>-b<beta>-s<seed>)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, tasks, clients, steps), write "
                   "OUT/config.json and exit")
    p.add_argument("--eval-only", action="store_true", help="train nothing: evaluate the stage adapter --adapters "
                   "on the setting's tasks seen by its stage and write results.json / results.md")
    p.add_argument("--adapters", default=None, help="with --eval-only: a stage folder fcit wrote (adapters/<method>/"
                   "stage<t>, our format with DISCO's keys and routing), its fcit_adapter.safetensors, or a PEFT "
                   "adapter folder (adapter_config.json; evaluated as one LoRA on the base model, final stage)")
    p.add_argument("--quiet", action="store_true", help="no per-client progress lines")
    p.add_argument("--json-log", default=None, help="append one JSON object per client/round to this file")
    return p


def check_paths(args):
    """The local paths exist and hold what they should (UsageError naming the flag)."""
    for flag in ("model", "vision_tower", "text_encoder", "data_root", "adapters"):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            raise UsageError(f"--{flag.replace('_', '-')} {path!r} does not exist")
    if args.json_log is not None and (os.path.isdir(args.json_log) or not os.path.isdir(
            os.path.dirname(os.path.abspath(args.json_log)))):
        raise UsageError(f"--json-log {args.json_log!r}: expected a file path in an existing folder")
    if args.model is not None:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise UsageError(f"--model {args.model!r} is not a model directory: no config.json in it")
        try:
            checkpoint.check_checkpoint(args.model, args.vision_tower)
        except (ValueError, KeyError, FileNotFoundError, NotImplementedError) as e:
            raise UsageError(f"--model {args.model!r} is not a model this loader reads: {checkpoint.message(e)}") \
                from None
    if args.text_encoder is not None:
        try:
            checkpoint.check_clip(args.text_encoder, image_tower=args.identity not in (None, "text"))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise UsageError(f"--text-encoder {args.text_encoder!r} is not a CLIP folder this loader reads: "
                             f"{checkpoint.message(e)}") from None
    if args.data_root is not None:
        if args.setting == "fedit":      # FedIT reads one dolly file, FCIT a release folder
            if not os.path.isfile(args.data_root):
                raise UsageError(f"--data-root {args.data_root!r}: expected a dolly-15k JSONL file for --setting fedit")
        elif not os.path.isdir(os.path.join(args.data_root, "instructions")):
            raise UsageError(f"--data-root {args.data_root!r} is not an FCIT release: expected an instructions/ "
                             "folder (instructions/<Dataset>/*.json) in it")


def resolve_config(args) -> Config:
    """The Config of the flags given: the paper's protocol with real paths, the embedded one without; absolute
    paths; the image pre-processing the checkpoint resolves to."""
    check_paths(args)
    cli = {f.name for f in dataclasses.fields(Config) if f.metadata.get("cli", True)}
    cfg = config.resolve({k: v for k, v in vars(args).items() if k in cli},
                         embedded=args.model is None and args.data_root is None)
    cfg.model = os.path.abspath(cfg.model) if cfg.model else TINY_MODEL_DIR
    for name in ("vision_tower", "text_encoder", "data_root"):
        if getattr(cfg, name):
            setattr(cfg, name, os.path.abspath(getattr(cfg, name)))
    if cfg.setting != "fedit" and checkpoint.load_config(cfg.model, cfg.vision_tower).vision is not None:   # text-only
        try:
            improc = imaging.ImageProcessor.for_checkpoint(cfg.model, cfg.vision_tower, cfg.image_aspect)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--model {cfg.model!r}: cannot resolve the image pre-processing: {e}") from None
        cfg.image_preprocess = improc.describe()
        cfg.image_aspect = "pad" if improc.pad_to_square else "crop"
    return cfg


# ----------------------------------------------------------------------------------------------------
# results: results.json, results.md, matrix_<method>.png


def write_json(path, obj):
    data.atomic_write_json(path, obj, indent=1)


# ----------------------------------------------------------------------------------------------------
# the benchmark: tasks, client data and test sets of one setting


class Benchmark:
    """The tasks of a setting in stage order, each client's training data, and the test sets. parts[k][c] is
    client c's shard of part k: FCIT's task k (a dataset, or a capability group) from the released or generated
    partitions; FedIT's single part holds Shepherd's category shards, and its tasks are dolly's categories."""

    def __init__(self, cfg: Config, log=print, dry_run=False):
        self.cfg = cfg
        if cfg.setting == "fedit":     # the one place the two benchmarks differ: how they are read
            self._load_fedit(cfg)
        else:
            self._load_fcit(cfg, log, write=not dry_run)   # --dry-run writes no partitions
        self.stages = cfg.stages or self.stages                    # --stages N: the first N stages only

    def _load_fedit(self, cfg: Config):
        folder = os.path.join(CACHE_DIR, f"fedit-mini-s{cfg.seed}-{MINI_FEDIT['n_per_category']}")
        self.source = cfg.data_root or mini.make_fedit_mini(folder, seed=cfg.seed, **MINI_FEDIT)
        self.name = "FedIT-mini" if cfg.data_root is None else "dolly"
        train, test = data.dolly_split(data.load_dolly(self.source, cfg.dolly_extra_categories))
        self.tasks, self.stages = sorted({r["category"] for r in train}), 1
        shards = data.shepherd_partition(len(train), cfg.clients, seed=cfg.shard_seed)
        self.parts = [[[data.dolly_example(train[i], i) for i in idx] for idx in shards]]
        self.stage_parts = [[0]]                                   # the one stage trains the one part
        self.seen_by = self.stage_tasks = [list(range(len(self.tasks)))]
        self.test_datasets = {t: [f"dolly/{t}"] for t in self.tasks}
        self.test = {f"dolly/{t}": [data.dolly_example(r, j) for j, r in enumerate(test) if r["category"] == t]
                     [:cfg.eval_samples] for t in self.tasks}

    def _load_fcit(self, cfg: Config, log, write=True):
        root, self.name = cfg.data_root, "FCIT"
        if root is None:
            root, self.name = os.path.join(CACHE_DIR, f"fcit-mini-s{cfg.seed}-{MINI['n_train']}-{MINI['n_test']}"), \
                "FCIT-mini"
            t0 = time.time()
            mini.make_fcit_mini(root, seed=cfg.seed, **MINI)
            log(f"FCIT-mini ready in {root} ({time.time() - t0:.1f}s)")
        self.source, s = root, cfg.setting
        self.tasks, self.stages = data.task_names(s), data.num_stages(s)
        self.parts = data.load_partitions(root, s, cfg.beta, cfg.clients, seed=cfg.seed, write=write,
                                          cache=os.path.join(CACHE_DIR, "partitions"))   # for a read-only root
        self.stage_parts = self.stage_tasks = [data.tasks_of_stage(s, t) for t in range(self.stages)]
        self.seen_by = [data.seen_tasks(s, t) for t in range(self.stages)]
        self.test_datasets = {t: data.task_datasets(s, k) for k, t in enumerate(self.tasks)}
        needed = sorted({ds for dss in self.test_datasets.values() for ds in dss})
        n = cfg.eval_samples
        self.test = {ds: (v[:n] if n else v) for ds, v in data.load_fcit(root, datasets=needed, split="test").items()}

    def seen(self, stage):
        return self.seen_by[stage]

    def part_of(self, stage, position):
        """The part a client position trains at a stage (the setting's task table; FedIT has one part)."""
        return 0 if self.cfg.setting == "fedit" else data.stage_task_for(self.cfg.setting, stage, position)

    def client_data(self, stage):
        """The callable Federation.run_round asks for a client's examples (position -> task by the setting)."""
        def get(position, client):
            if position is None:   # mtl
                return self.pooled(client)
            return self.parts[self.part_of(stage, position)][client]
        return get

    def pooled(self, client=None):
        """mtl's data: the union of every (run) stage's training data, or client's share of it (methods.MTL)."""
        parts = sorted({k for s in range(self.stages) for k in self.stage_parts[s]})
        every = [ex for k in parts for shard in self.parts[k] for ex in shard]
        return every if client is None else [every[i] for i in self.mtl_shares[client]]

    @functools.cached_property
    def mtl_shares(self):
        return methods.MTL.partition(len(self.pooled()), self.cfg)

    def score_task(self, k, predict):
        """Score of task k in 0..100: the mean over its datasets (a capability group has several)."""
        scores = []
        for ds in self.test_datasets[self.tasks[k]]:
            exs = self.test[ds]
            scores.append(scoring.evaluate_task(ds, predict(exs), exs, caption_metric=self.cfg.caption_metric,
                                                 scorer=self.cfg.scorer))
        return sum(scores) / len(scores)

    def examples_by_task(self, tasks):
        return {self.tasks[k]: [ex for ds in self.test_datasets[self.tasks[k]] for ex in self.test[ds]] for k in tasks}


# ----------------------------------------------------------------------------------------------------
# one method through all stages, with a checkpoint after every round


def load_model(cfg: Config, device, dtype):
    """The base model (frozen weights in `dtype`), its tokenizer, image processor and the optional CLIP text tower."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        model = checkpoint.load_vlm(cfg.model, vision_tower=cfg.vision_tower, dtype=dtype, device=device)
    except checkpoint.CheckpointError as e:
        raise UsageError(f"--model {cfg.model!r}: {e}") from None
    tokenizer = checkpoint.load_tokenizer(cfg.model)
    improc = None
    if model.vision is not None and cfg.image_preprocess is not None:      # FedIT is text-only
        improc = imaging.ImageProcessor.for_checkpoint(cfg.model, cfg.vision_tower, cfg.image_aspect)
    text_encoder = checkpoint.load_clip_text(cfg.text_encoder, device=device, image_tower=cfg.identity != "text",
                                             pad_to_square=cfg.image_aspect == "pad") if cfg.text_encoder else None
    return model, tokenizer, improc, text_encoder


def save_state(path, fed, progress):
    """Federation state + experiment progress with one commit point: the tensors go to a new file, then the JSON that
    names them atomically replaces the old one (the commit), then the previous tensors file is removed. A kill at any
    point leaves a JSON naming a complete tensors file of the same round: a resume sees the old round or the new one."""
    from safetensors.torch import save_file
    tensors, meta = fed.state_dict()
    folder, stem = os.path.split(path)
    name = f"{stem}.{os.urandom(6).hex()}.safetensors"
    files.atomic_write(os.path.join(folder, name), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    before = files.read_json(path + ".json", default={}, error=UsageError).get("tensors")
    write_json(path + ".json", {"federation": meta, "progress": progress, "tensors": name})
    if before and before != name and os.path.exists(os.path.join(folder, before)):
        os.remove(os.path.join(folder, before))


def save_progress(path, fed, progress, t_start, is_main):
    """After a round: the wall time so far into `progress`, then (on rank 0) the state file."""
    progress["wall_s"] = time.time() - t_start
    if is_main:
        save_state(path, fed, progress)


def load_state(path):
    """(tensors, the saved JSON) of the last state save_state committed; None when there is none. Tensors files that
    no JSON names (a kill before the commit, or before the old file's removal) are removed."""
    from safetensors.torch import load_file
    st = files.read_json(path + ".json", default=None, error=UsageError)
    if st is None:
        return None
    folder, stem = os.path.split(path)
    if not (isinstance(st, dict) and isinstance(st.get("tensors"), str) and {"federation", "progress"} <= set(st)):
        raise UsageError(f"{path}.json: expected the saved state (federation, progress, tensors); delete {folder} "
                         "to start the run over")
    for f in os.listdir(folder):
        if f.startswith(stem + ".") and f.endswith(".safetensors") and f != st["tensors"]:
            os.remove(os.path.join(folder, f))
    try:
        return load_file(os.path.join(folder, st["tensors"])), st
    except Exception as e:      # safetensors' own errors: a truncated or damaged file
        raise UsageError(f"{os.path.join(folder, st['tensors'])}: cannot read the saved state ({e}); delete {folder} "
                         "to start the run over") from None


def client_score(fed, bench, k, client, cache=None):
    """Task k's score under the model the method evaluates for `client` (a collective under torchrun); `cache`
    holds the scores already computed, keyed by (client, task)."""
    if cache is not None and (client, k) in cache:
        return cache[(client, k)]
    score = bench.score_task(k, lambda exs: fed.predict(exs, client=client, distributed=True))
    if cache is not None:
        cache[(client, k)] = score
    return score


def evaluate(fed, bench, tasks, cache=None):
    """One row of the accuracy matrix: the scores of `tasks` (None for the others), each averaged over the models
    the method scores it with (fed.eval_clients: one; local: every client's own; FedSA: those of the clients holding
    the task, None when none does)."""
    row = [None] * len(bench.tasks)
    for k in tasks:
        clients = fed.eval_clients(bench.test_datasets[bench.tasks[k]])
        row[k] = sum(client_score(fed, bench, k, c, cache) for c in clients) / len(clients) if clients else None
    return row


def evaluate_personalized(fed, bench, tasks, cache=None):
    """Personalized methods (FedSA-LoRA, Guo et al. ICLR 2025; local): each client's own model scored on the tasks
    among `tasks` it trained on (in Het-FCIT a subset of each stage's), their mean per client and the mean over
    clients; None for a method with one global model."""
    clients = {}
    for c, dss in sorted(fed.method.personal.items()):
        own = [k for k in tasks if set(bench.test_datasets[bench.tasks[k]]) & set(dss)]
        if own:
            scores = {bench.tasks[k]: client_score(fed, bench, k, c, cache) for k in own}
            clients[str(c)] = {"tasks": scores, "mean": sum(scores.values()) / len(scores)}
    if not clients:
        return None
    return {"clients": clients, "mean": sum(v["mean"] for v in clients.values()) / len(clients)}


def log_round(rec, fed, progress, t_start, t_round, log):
    """Progress lines (and --json-log records) of one round that began at t_round; its totals into `progress`."""
    spent = progress["spent"]
    spent["train"] += time.time() - t_round
    spent["local"] += sum(c.get("time_s") or 0.0 for c in rec.get("per_client", []))
    name, stages, rounds = fed.cfg.method, progress["stages"], fed.method.schedule.rounds
    stage, rnd = rec["stage"], rec["round"]
    for c in rec.get("per_client", []):
        sps = c["steps"] / c["time_s"] if c.get("time_s") else 0.0
        done = stage * rounds + rnd + 1
        eta = (time.time() - t_start) / done * (stages * rounds - done)
        loss = f"{c['loss']:.3f}" if c.get("loss") is not None else "-"
        log(f"[{name}] stage {stage + 1}/{stages} round {rnd + 1}/{rounds} client {c['client']:>3} "
            f"n={c['n']:<4} loss {loss}  {sps:.2f} steps/s  ETA {eta / 60:.1f} min", progress_line=True,
            record={"method": name, "stage": stage, "round": rnd, **c})
    progress["comm_bytes"] += int(rec.get("bytes_up", 0) + rec.get("bytes_down", 0))
    if "epsilon" in rec:
        progress["privacy"] = federate.privacy_spent(fed)
    progress["rounds"].append({k: rec.get(k) for k in ("stage", "round", "clients", "loss", "samples", "bytes_up",
                                                        "bytes_down", "time_s", "assignments", "opened", "dropped",
                                                        "epsilon")})


def close_stage(fed, bench, stage, progress, out, log, is_main, t0):
    """End of a stage: consolidate, evaluate every task seen so far (a row of the matrix), save the stage's adapters;
    after the last stage also the routing accuracy and the personalized scores."""
    stages = progress["stages"]
    fed.end_stage(stage)
    tasks = bench.seen(bench.stages - stages + stage)      # a single joint stage (mtl) sees every task
    cache, t_eval = {}, time.time()
    row = evaluate(fed, bench, tasks, cache)
    progress["matrix"].append(row)
    log(f"[{fed.cfg.method}] after stage {stage + 1}/{stages} ({time.time() - t0:.0f}s): "
        + ", ".join(f"{bench.tasks[k]} {row[k]:.1f}" for k in tasks if row[k] is not None))
    progress["stage"], progress["round"] = stage + 1, 0
    progress["done"] = stage + 1 == stages
    t_save = time.time()
    save_adapters(fed, fed.model, out, stage, is_main)
    t_done = time.time()
    if progress["done"]:
        progress["routing_accuracy"] = fed.routing_accuracy(bench.examples_by_task(tasks))
        progress["personalized"] = evaluate_personalized(fed, bench, tasks, cache)
    fed.model.drop_static_cache()                          # --compile's decode cache: training needs the memory
    spent = progress["spent"]
    spent["eval"] += (t_save - t_eval) + (time.time() - t_done)
    spent["save"] += t_done - t_save


def start_progress(fed, bench, state_path, log):
    """The record saved after every round (where the loop goes on, the matrix so far, the totals): the saved one,
    with the Federation's state loaded, when the state file exists; else the start of the first stage."""
    saved = load_state(state_path)
    if saved is None:
        return {"stage": 0, "round": 0, "stages": fed.method.schedule.stages(bench.stages), "matrix": [],
                "comm_bytes": 0, "wall_s": 0.0, "done": False, "rounds": [],
                "spent": {"train": 0.0, "eval": 0.0, "save": 0.0, "local": 0.0}}
    tensors, st = saved
    fed.load_state_dict(tensors, st["federation"])
    progress = st["progress"]
    if not progress["done"]:
        log(f"[{fed.cfg.method}] resuming at stage {progress['stage'] + 1}, round {progress['round'] + 1}")
    return progress


def run_method(cfg: Config, method, bench, out, device, dtype, log, is_main):
    """Train and evaluate one method: every stage's rounds, then its evaluation and adapters. The state is saved after
    every round; a rerun on the same --out starts the loop where the saved state left off."""
    state_path = os.path.join(out, "state", method)
    model, tokenizer, improc, text_encoder = load_model(cfg, device, dtype)
    fed = federate.Federation(model, tokenizer, improc,
                              dataclasses.replace(cfg, method=method, device=device, dtype=dtype), text_encoder)
    progress = start_progress(fed, bench, state_path, log)
    first_stage, first_round = progress["stage"], progress["round"]
    stages, rounds = progress["stages"], fed.method.schedule.rounds
    t_start = time.time() - progress["wall_s"]
    for stage in range(first_stage, stages):
        for rnd in range(first_round if stage == first_stage else 0, rounds):
            t_round = time.time()
            rec = fed.run_round(stage, rnd, bench.client_data(stage), log=lambda s: log(f"[{method}] {s}"))
            log_round(rec, fed, progress, t_start, t_round, log)
            if rnd + 1 < rounds:
                progress["round"] = rnd + 1
                save_progress(state_path, fed, progress, t_start, is_main)
        close_stage(fed, bench, stage, progress, out, log, is_main, t_round)   # evaluate, save the adapters
        save_progress(state_path, fed, progress, t_start, is_main)
    spent = progress["spent"]
    log(f"[{method}] {progress['wall_s']:.0f}s: train {spent['train']:.0f}s (clients' local training "
        f"{spent['local']:.1f}s, identity features and aggregation {spent['train'] - spent['local']:.1f}s), eval "
        f"{spent['eval']:.0f}s, save {spent['save']:.0f}s (adapters; the rest: state files)")
    return summarize(progress, bench, continual=not fed.method.schedule.joint)


def exit_with_parent():
    """A worker whose parent has died (killed, so it could not stop its workers) exits on its own within a second;
    the last committed round stays resumable."""
    import threading
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def method_process(cfg: Config, method, bench, out, device, dtype, threads, quiet, json_log):
    """One method in a worker process of its own (--workers): the entry point's threads and seed, then run_method."""
    exit_with_parent()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    log = Logger(quiet, json_log, True)
    log(f"== {method} ==")
    return run_method(cfg, method, bench, out, device, dtype, log, True)


def parallelism(cfg: Config, world: int = 1):
    """(methods at a time, torch threads in each): --workers capped by the methods (1 under torchrun), --threads or
    torch's default shared out among them."""
    workers = 1 if world > 1 else min(cfg.workers, len(cfg.methods))
    return workers, cfg.threads or max(1, torch.get_num_threads() // workers)


def run_methods(cfg: Config, args, bench, out, device, dtype, log, world, results):
    """Every method of --methods, results.json rewritten after each: one after another, or --workers at a time in
    spawned processes. A method draws only from generators of its own seeds, so the results are the same."""
    workers, threads = parallelism(cfg, world)
    if world > 1 and cfg.workers > 1:
        log(f"under torchrun the methods run one after another (--workers {cfg.workers} not used)")
    if workers == 1:
        for method in cfg.methods:
            log(f"== {method} ==")
            results["methods"][method] = run_method(cfg, method, bench, out, device, dtype, log, log.is_main)
            if log.is_main:
                write_json(os.path.join(out, "results.json"), results)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    start = sorted(cfg.methods, key=lambda m: not federate.METHODS[m].trains)    # the long ones first
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        jobs = {m: pool.submit(method_process, cfg, m, bench, out, f"cuda:{i % gpus}" if gpus > 1 else device, dtype,
                               threads, args.quiet, args.json_log) for i, m in enumerate(start)}
        for method in cfg.methods:                          # results.json in the order of --methods
            results["methods"][method] = jobs[method].result()
            write_json(os.path.join(out, "results.json"), results)
    except BaseException:                                   # SIGINT, SIGTERM (see main) or a failed method: stop them
        for p in multiprocessing.active_children():
            p.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _adapter_error(load, *args):
    try:
        return load(*args)
    except (ValueError, FileNotFoundError) as e:      # the message names the file, key or field
        raise UsageError(f"--adapters {e}") from None


def check_saved_adapter(cfg: Config, path, bench):
    """--eval-only's checks that need no model, run before --out is claimed: (our stage file, PEFT folder, its checked
    metadata); our file's metadata and layer header against the run, or a PEFT folder's config and weights file."""
    ours = path if os.path.isfile(path) else os.path.join(path, "fcit_adapter.safetensors")
    peft_dir = next((d for d in (path, os.path.join(path, "peft"))
                     if os.path.isfile(os.path.join(d, "adapter_config.json"))), None)
    if not os.path.isfile(ours) and peft_dir is None:
        raise UsageError(f"--adapters {path}: expected a stage folder with fcit_adapter.safetensors, that file, or a "
                         "PEFT adapter folder with adapter_config.json")
    if os.path.isfile(ours):
        return ours, peft_dir, _adapter_error(adapters.check_stage_adapter, ours, cfg, bench.stages, federate.METHODS)
    _adapter_error(adapters.read_peft_dir, peft_dir, False)      # the header only: loaded later
    return ours, peft_dir, None


def load_saved_adapter(cfg: Config, path, bench, device, dtype):
    """A Federation holding a saved stage adapter (ours: the method that wrote it, its keys and projector; PEFT: one
    LoRA on the base model), and the stage it evaluates. What the file says is checked against the run first
    (adapters.check_stage_adapter; PEFT's fields); errors name the file and what was expected."""
    ours, peft_dir, meta = check_saved_adapter(cfg, path, bench)
    model, tokenizer, improc, text_encoder = load_model(cfg, device, dtype)
    if meta is None:
        _adapter_error(adapters.load_peft_adapter, model, peft_dir)
    method = meta["method"] if meta else "zeroshot"
    fed = federate.Federation(model, tokenizer, improc, dataclasses.replace(cfg, method=method, device=device,
                                                                            dtype=dtype), text_encoder)
    if meta is None:
        return fed, bench.stages - 1, "peft"
    if meta["stage"] >= fed.method.schedule.stages(bench.stages):     # mtl: one joint stage
        raise UsageError(f"--adapters {ours}: stage index {meta['stage']}, but {method} trains one joint stage")
    federate.adopt_adapter(fed, _adapter_error(adapters.load_adapter, model, ours)[0], meta)
    return fed, meta["stage"], method


def evaluate_saved(cfg: Config, path, bench, device, dtype, log):
    """--eval-only: one row of scores for the tasks the adapter's stage has seen; Last only."""
    t0 = time.time()
    fed, stage, label = load_saved_adapter(cfg, path, bench, device, dtype)
    tasks = bench.seen(bench.stages - fed.method.schedule.stages(bench.stages) + stage)
    row = evaluate(fed, bench, tasks)
    log(f"[{label}] {path}: " + ", ".join(f"{bench.tasks[k]} {row[k]:.1f}" for k in tasks if row[k] is not None))
    progress = {"matrix": [row], "comm_bytes": 0, "wall_s": time.time() - t0,
                "routing_accuracy": fed.routing_accuracy(bench.examples_by_task(tasks))}
    return label, summarize(progress, bench, continual=False)


def save_adapters(fed, model, out, stage, is_main):
    """A stage's adapters: our format (all subspaces, DISCO's identity keys) and PEFT's (K subspaces as one LoRA,
    weighted by the method's α, since PEFT cannot route)."""
    exported = fed.method.export() if fed.has_lora else None
    if not is_main or exported is None:
        return
    extra, alpha = exported
    extra = {**extra, **{f"param/{n}": fed.global_state[n] for n in fed.proj_names}}   # the trained projector
    d = os.path.join(out, "adapters", fed.cfg.method, f"stage{stage + 1}")
    os.makedirs(d, exist_ok=True)
    adapters.save_adapter(model, os.path.join(d, "fcit_adapter.safetensors"), extra=extra,
                          metadata={"method": fed.cfg.method, "setting": fed.cfg.setting, "stage": stage})
    adapters.save_peft_adapter(model, os.path.join(d, "peft"), alpha=alpha)


def summarize(progress, bench, continual=True):
    """results.json's entry of one method; a single joint training (mtl) has Last only, no Avg or BWT."""
    m = scoring.continual_metrics(progress["matrix"])
    if not continual:
        m["avg"] = m["bwt"] = None
    clean = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)
    last_row = progress["matrix"][-1]
    return {"matrix": [[clean(v) for v in row] for row in progress["matrix"]],
            "last": clean(m["last"]), "avg": clean(m["avg"]), "bwt": clean(m["bwt"]),
            "per_task_last": {t: clean(v) for t, v in zip(bench.tasks, last_row) if v is not None},
            "routing_accuracy": clean(progress.get("routing_accuracy")),
            "comm_bytes": int(progress["comm_bytes"]), "wall_s": round(progress["wall_s"], 2),
            **({"privacy": progress["privacy"]} if progress.get("privacy") else {}),
            **({"personalized": clean_personalized(progress["personalized"], clean)}
               if progress.get("personalized") else {})}


def clean_personalized(p, clean):
    """results.json's personalized entry, rounded as the matrix is."""
    return {"clients": {c: {"tasks": {t: clean(v) for t, v in d["tasks"].items()}, "mean": clean(d["mean"])}
                        for c, d in p["clients"].items()}, "mean": clean(p["mean"])}


# ----------------------------------------------------------------------------------------------------
# main


def plan(cfg: Config, bench):
    """--dry-run: what would run, and roughly how long (steps from the client shard sizes)."""
    lines = [f"setting {cfg.setting}: {bench.stages} stage(s), tasks: {', '.join(bench.tasks)}",
             f"data: {bench.source}", f"model: {cfg.model}",
             f"methods: {', '.join(cfg.methods)}; aggregator {cfg.aggregator}; {cfg.clients} clients, "
             f"{cfg.clients_per_round} per round, {cfg.rounds} rounds per stage, {cfg.local_epochs} local epoch(s), "
             f"batch {cfg.batch_size}x{cfg.grad_accum}, lr {cfg.lr}, LoRA r={cfg.rank} alpha={cfg.alpha} "
             f"K={cfg.subspaces}", "{} method(s) at a time, {} torch thread(s) each".format(*parallelism(cfg))]
    total = 0
    for s in range(bench.stages):
        trained = bench.stage_parts[s]
        sizes = [len(shard) for k in trained for shard in bench.parts[k]]   # the shards this stage's clients hold
        mean = sum(sizes) / max(1, len(sizes))
        steps = cfg.rounds * cfg.clients_per_round * math.ceil(mean * cfg.local_epochs / cfg.batch_size)
        total += steps
        tasks = [bench.tasks[k] for k in bench.stage_tasks[s]]
        lines.append(f"  stage {s + 1}: trains {', '.join(tasks)}; evaluates {len(bench.seen(s))} task(s); "
                     f"~{steps} optimizer steps per method")
    lines.append(f"~{total} optimizer steps per method in all")
    if "mtl" in cfg.methods:
        n = len(bench.pooled())
        lines.append(f"mtl: one stage of {cfg.rounds} rounds, its {cfg.clients} clients sharing {n} pooled samples")
    if cfg.image_preprocess:
        lines.append(f"images: {cfg.image_preprocess}")
    return "\n".join(lines)


def check_out_dir(out, cfg: Config):
    """A changed configuration on an existing --out is refused, showing the difference."""
    path = os.path.join(out, "config.json")
    mine = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items()
            if k not in ("method", "device", "workers")}
    problem = files.folder_problem(out)
    if problem:
        raise UsageError(f"--out {out!r} {problem}")
    if os.path.exists(path):
        old = files.read_json(path, error=UsageError)
        diff = [f"  {k}: {old.get(k)!r} (in {out}) != {mine.get(k)!r} (now)" for k in sorted(set(old) | set(mine))
                if old.get(k) != mine.get(k)]
        if diff:
            raise UsageError(f"{out} holds a run with a different configuration; use another --out or the same "
                             "flags:\n" + "\n".join(diff))
    return path, mine


class Logger:
    def __init__(self, quiet, json_log, is_main):
        self.quiet, self.json_log, self.is_main = quiet, json_log, is_main

    def __call__(self, msg, progress_line=False, record=None):
        if not self.is_main:
            return
        if not (self.quiet and progress_line):
            print(msg, flush=True)
        if self.json_log and record is not None:
            with open(self.json_log, "a") as f:
                f.write(json.dumps(record) + "\n")


def setup(args, cfg: Config, log):
    """Before any training: the out folder's config (refused if it differs), the tiny VLM if missing, the data.
    Returns (out, config path, config JSON, benchmark)."""
    out = args.out or os.path.join("runs", f"{cfg.setting}-b{cfg.beta}-s{cfg.seed}")
    if args.eval_only and args.out is None:      # never over a training run's results
        out = os.path.join(args.adapters if os.path.isdir(args.adapters) else os.path.dirname(args.adapters), "eval")
    cfg_path, cfg_json = check_out_dir(out, cfg)
    if not args.dry_run and cfg.embedded and not os.path.exists(os.path.join(TINY_MODEL_DIR, "model.safetensors")):
        log(f"building the embedded tiny VLM into {TINY_MODEL_DIR} (one time)")
        sys.path.insert(0, os.path.join(HERE, "tools"))
        import build_tiny_model
        build_tiny_model.main(["--out", TINY_MODEL_DIR])
    try:
        bench = Benchmark(cfg, log, dry_run=args.dry_run)
    except (data.FCITDataError, FileNotFoundError, ValueError) as e:
        raise UsageError(f"cannot read the data: {e}") from None
    if args.eval_only:
        check_saved_adapter(cfg, args.adapters, bench)
    return out, cfg_path, cfg_json, bench


def resolve_device(flag, rank: int, world: int) -> str:
    """--device (default: cuda if available), checked before any work: cpu, cuda or cuda:<index> of a present GPU;
    under torchrun each rank takes GPU rank mod count."""
    device = flag or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: expected cpu, cuda or cuda:<index>") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: expected cpu, cuda or cuda:<index>")
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise UsageError(f"--device {device!r}: no such CUDA device ({torch.cuda.device_count()} available)")
    if dev.type == "cuda" and world > 1:
        device = f"cuda:{rank % torch.cuda.device_count()}"
    return device


def interrupted(signum, frame):
    """SIGTERM stops a run as Ctrl-C does: the workers are stopped, the lock released, the last committed round kept."""
    raise KeyboardInterrupt(f"signal {signum}")


def claim_out(args, out, cfg_path, cfg_json):
    """Rank 0 takes --out: the folder, its lock (not for --dry-run), state/ and config.json. (lock path, None), or
    (None, why not)."""
    lock = None
    try:
        os.makedirs(out, exist_ok=True)
        lock = None if args.dry_run else files.lock_out(out)
        os.makedirs(out if args.dry_run else os.path.join(out, "state"), exist_ok=True)
        write_json(cfg_path, cfg_json)
        return lock, None
    except (files.LockError, OSError) as e:
        if lock is not None:
            os.remove(lock)
        return None, str(e) if isinstance(e, files.LockError) else f"--out {out!r}: cannot write it ({e})"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eval_only != (args.adapters is not None):
        parser.error("--eval-only and --adapters go together")
    rank, world = federate.init_distributed()
    is_main = rank == 0
    log = Logger(args.quiet, args.json_log, is_main)
    try:
        device = resolve_device(args.device, rank, world)
        cfg = resolve_config(args)
        out, cfg_path, cfg_json, bench = setup(args, cfg, log)
    except UsageError as e:
        print(f"fcit.py: error: {e}", file=sys.stderr)
        return 2
    lock, refused = claim_out(args, out, cfg_path, cfg_json) if is_main else (None, None)
    if world > 1:                                   # every rank stops when rank 0 could not claim --out
        refused = federate.all_gather(refused)[0]
    if refused:
        print(f"fcit.py: error: {refused}", file=sys.stderr)
        return 2
    if args.dry_run:
        log(plan(cfg, bench) + f"\nwrote {cfg_path}")
        return 0
    dtype = cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    torch.manual_seed(cfg.seed)   # the entry point owns the global RNG; library code never reseeds it
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    term = signal.signal(signal.SIGTERM, interrupted) if threading.current_thread() is threading.main_thread() else None
    try:
        return run(args, cfg, out, bench, device, dtype, log, world)
    except (UsageError, data.FCITDataError) as e:     # found during the run (a worker's too): a file, record or flag
        print(f"fcit.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
        if term is not None:
            signal.signal(signal.SIGTERM, term)
        if lock is not None:
            os.remove(lock)


def run(args, cfg: Config, out, bench, device, dtype, log, world):
    """main after the set-up: the runs or the evaluation, then results.json, results.md and the heatmaps."""
    is_main = log.is_main
    if cfg.embedded:
        log(f"embedded default: tiny VLM {cfg.model}, {bench.name}; scaled-down protocol: {cfg.clients} clients, "
            f"{cfg.clients_per_round} per round, {cfg.rounds} rounds per stage, batch {cfg.batch_size}, lr {cfg.lr}, "
            f"LoRA r={cfg.rank} alpha={cfg.alpha} K={cfg.subspaces}, {cfg.eval_samples or 'all'} test samples per "
            "task; {} method(s) at a time, {} thread(s) each".format(*parallelism(cfg, world)))
    results = {"setting": cfg.setting, "beta": cfg.beta, "seed": cfg.seed, "tasks": bench.tasks, "methods": {}}
    if args.eval_only:
        label, results["methods"][label] = evaluate_saved(cfg, args.adapters, bench, device, dtype, log)
        results["adapters"] = os.path.abspath(args.adapters)
    if not args.eval_only:
        run_methods(cfg, args, bench, out, device, dtype, log, world, results)
    if is_main:
        report.write_results(results, out)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
