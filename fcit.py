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
import json
import math
import os
import sys
import time

import torch

import data
import federate
import lora
import model as vlm

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL_DIR = os.path.join(HERE, "assets", "tiny-llava")
CACHE_DIR = os.environ.get("FCIT_CACHE", os.path.join(HERE, ".cache"))
MINI = dict(n_train=300, n_test=50)   # FCIT-mini samples per task (FedIT-mini: records per category)
MINI_FEDIT = dict(n_per_category=60)

SETTINGS = ("task-hom", "task-het", "cap-hom", "cap-het", "fedit")
FCIT_METHODS = ("disco", "finetune", "ewc", "olora", "moelora", "zeroshot", "mtl")
FEDIT_METHODS = ("fedit", "local", "mtl")
AGGREGATORS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it has one (None means "chosen by the setting", said in the help)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


class UsageError(Exception):
    """Bad command-line input: reported with exit code 2 before any work starts."""


# ----------------------------------------------------------------------------------------------------
# command line


def build_parser():
    p = argparse.ArgumentParser(
        prog="fcit.py",
        description="Federated continual instruction tuning (FCIT/DISCO) and federated instruction tuning "
        "(FedIT) of LLaVA-style models. Without --model/--data-root the embedded tiny VLM and the built-in "
        "FCIT-mini / FedIT-mini benchmarks are used with a scaled-down protocol.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--setting", default="task-hom", choices=SETTINGS,
                   help="task-hom/task-het: 8 stages, one dataset each, clients of a stage hold the same task "
                   "(hom) or different tasks by the official seq_dyn_list (het); cap-hom/cap-het: 4 capability "
                   "groups of the 12 datasets; fedit: one-stage federated instruction tuning on dolly-style data")
    p.add_argument("--methods", default=None,
                   help="comma list. FCIT: disco, finetune, ewc, olora, moelora, zeroshot, mtl. FedIT: fedit, local, "
                   "mtl. Default: disco,finetune (FCIT) or fedit,local (FedIT)")
    p.add_argument("--aggregator", default="fedavg", choices=AGGREGATORS,
                   help="server aggregation (FedAvg as in FCIT and Shepherd; the others from Li et al. 2020 and "
                   "Reddi et al. 2021)")
    p.add_argument("--beta", type=float, default=1.0, help="Dirichlet concentration of the client quantity skew")
    p.add_argument("--clients", type=int, default=None, help="clients in total (paper: 50; FedIT: 10)")
    p.add_argument("--clients-per-round", type=int, default=None, help="clients sampled per round (paper: 5)")
    p.add_argument("--rounds", type=int, default=None, help="communication rounds per stage (paper: 10)")
    p.add_argument("--local-epochs", type=int, default=None, help="local epochs per round (paper: 1)")
    p.add_argument("--lr", type=float, default=None, help="client AdamW learning rate (paper: 2e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="client batch size (paper: 128 task / 64 cap)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="gradient accumulation steps (paper: 1; FedIT: 2, Shepherd's batch 64 in micro-batches of 32)")
    p.add_argument("--projector-lr", type=float, default=None,
                   help="learning rate of the trained projector (default: --lr, which produced the paper's numbers: "
                   "FCIT's scripts pass mm_projector_lr 2e-5 but its optimizer ignores it)")
    p.add_argument("--lr-schedule", default=None, choices=("cosine", "linear"),
                   help="client LR decay, restarted per client and round (FCIT: cosine; FedIT/Shepherd: linear)")
    p.add_argument("--warmup-ratio", type=float, default=None,
                   help="client LR warmup as a fraction of its steps (FCIT: 0.03; FedIT/Shepherd: 0)")
    p.add_argument("--max-length", type=int, default=None,
                   help="token cutoff of a training sequence (FCIT: 2048; FedIT/Shepherd: 512)")
    p.add_argument("--lora-init", default=None, choices=("fcit", "peft"),
                   help="LoRA A init: fcit = N(0, 0.01^2) (FCIT); peft = kaiming-uniform, PEFT's default (FedIT)")
    p.add_argument("--client-sampling", default=None, choices=("official", "seeded"),
                   help="official: the draw of FCIT's and Shepherd's code, np.random.seed(stage*10 + round) then "
                   "choice (default with --model/--data-root; ignores --seed); seeded: keyed by --seed, stage and round "
                   "(default for the embedded run)")
    p.add_argument("--server-state", default="reset", choices=("reset", "carry"),
                   help="server-optimizer state (fedavgm momentum, fedadam/yogi/adagrad m and v) at a stage boundary")
    p.add_argument("--mtl-epochs", type=float, default=None,
                   help="epochs of the centralised mtl upper bound over the union of every stage's training data "
                   "(default: rounds x local epochs x clients-per-round / clients, the federated methods' budget)")
    p.add_argument("--rank", type=int, default=None, help="total LoRA rank r (paper: 64 task-related, 32 capability)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (paper: 128 task-related, 64 capability)")
    p.add_argument("--subspaces", type=int, default=None, help="number of LoRA subspaces K (paper: 8 task, 4 cap)")
    p.add_argument("--routing", default="softmax", choices=("softmax", "argmax", "concat", "cosine"),
                   help="DISCO subspace selective activation: softmax over cosine/0.05 (paper) or an ablation")
    p.add_argument("--identity", default="text", choices=("text", "image"),
                   help="DISCO task-identity feature source")
    p.add_argument("--orthogonal-subspaces", action="store_true",
                   help="DISCO: keep each newly opened subspace orthogonal to the existing ones")
    p.add_argument("--tau", type=float, default=0.9, help="DISCO identity-matching threshold (cosine)")
    p.add_argument("--assign", default="round0", choices=("round0", "every_round"),
                   help="DISCO: match clients to subspaces in round 0 of a stage and keep the position's subspace "
                   "for the later rounds (official schedule), or re-match every round")
    p.add_argument("--lm-identity", action="store_true", default=None,
                   help="DISCO without --text-encoder: take task identities from the base LM (a fallback that can "
                   "merge distinct tasks; required explicitly with --model, the embedded run sets it)")
    p.add_argument("--identity-layer", default=None, choices=("last", "embedding"),
                   help="DISCO without --text-encoder: mean-pool the base LM's final hidden states (default with "
                   "--model) or its input token embeddings (default for the embedded tiny VLM, whose final states "
                   "do not tell FCIT-mini's tasks apart)")
    p.add_argument("--identity-center", action="store_true", default=None,
                   help="DISCO without --text-encoder: centre the base LM's token states on a fixed reference and "
                   "normalise them before pooling, which sharpens the routing (default for the embedded tiny VLM)")
    p.add_argument("--on-full", default=None, choices=("error", "nearest"),
                   help="DISCO when a new task arrives and all K subspaces are taken: stop with an error (default with "
                   "--model/--data-root), or join the nearest subspace (the official client rule), logged (default for "
                   "the embedded run, whose 5-client stages can split a task in two)")
    p.add_argument("--prox-mu", type=float, default=0.01, help="FedProx proximal weight mu")
    p.add_argument("--server-lr", type=float, default=None,
                   help="server learning rate of fedavgm/fedadam/fedyogi/fedadagrad (default: 1-momentum / 1e-3)")
    p.add_argument("--ewc-lambda", type=float, default=federate.FedConfig.ewc_lambda, help="EWC penalty weight "
                   "(chosen from a sweep on the toy tasks, see README)")
    p.add_argument("--olora-lambda", type=float, default=0.5, help="O-LoRA orthogonality penalty weight")
    p.add_argument("--model", default=None, help="local model directory (llava-hf, original LLaVA or a text-only "
                   "LLaMA/Qwen2 causal LM); default: the embedded tiny VLM")
    p.add_argument("--vision-tower", default=None, help="local CLIP directory for the original LLaVA layout")
    p.add_argument("--text-encoder", default=None, help="local CLIP directory whose text tower gives DISCO's "
                   "identity features (paper: clip-vit-large-patch14-336); required by disco with --model unless "
                   "--lm-identity")
    p.add_argument("--image-aspect", default=None, choices=("pad", "crop"),
                   help="pad images to a square with the mean colour before resize and crop (LLaVA-1.5, FCIT) or "
                   "centre-crop them (default: pad, unless an original LLaVA config.json names another "
                   "image_aspect_ratio)")
    p.add_argument("--data-root", default=None, help="the FCIT release (instructions/, partitioned_data/, images) or "
                   "a dolly-15k JSONL for fedit; default: FCIT-mini / FedIT-mini generated into the cache")
    p.add_argument("--out", default=None, help="output directory (default: runs/<setting>-b<beta>-s<seed>)")
    p.add_argument("--seed", type=int, default=0, help="fixes partitions, client sampling and initialisation")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weights/compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--eval-samples", type=int, default=None, help="test samples per task (default: all)")
    p.add_argument("--caption-metric", default=data.CAPTION_METRICS[0], choices=data.CAPTION_METRICS,
                   help="Flickr30k score: average = mean of BLEU-1..4, ROUGE-L and CIDEr x 100 (FCIT's 'Average' "
                   "without METEOR); CIDEr, Bleu_N, ROUGE_L x 100; CIDEr_x10 = CIDEr-D on a 0..100 scale")
    p.add_argument("--shard-seed", type=int, default=42,
                   help="fedit: seed of Shepherd's category-shard shuffle (Shepherd: 42)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (paper: 128)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute decoder layers in backward")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, tasks, clients, steps) and exit")
    p.add_argument("--quiet", action="store_true", help="no per-client progress lines")
    p.add_argument("--json-log", default=None, help="append one JSON object per client/round to this file")
    return p


@dataclasses.dataclass
class RunConfig:
    """Everything that determines the results; stored in OUT/config.json and compared on resume."""
    setting: str
    methods: list
    aggregator: str
    beta: float
    seed: int
    clients: int
    clients_per_round: int
    rounds: int
    local_epochs: int
    lr: float
    batch_size: int
    grad_accum: int
    projector_lr: float
    lr_schedule: str
    warmup_ratio: float
    max_length: int
    lora_init: str
    client_sampling: str
    server_state: str
    mtl_epochs: float
    rank: int
    alpha: float
    subspaces: int
    routing: str
    identity: str
    orthogonal_subspaces: bool
    tau: float
    assign: str
    lm_identity: bool
    identity_layer: str
    identity_center: bool
    on_full: str
    prox_mu: float
    server_lr: float
    ewc_lambda: float
    olora_lambda: float
    model: str
    vision_tower: str
    text_encoder: str
    image_aspect: str
    image_preprocess: dict
    data_root: str
    embedded: bool
    eval_samples: int
    caption_metric: str
    shard_seed: int
    max_new_tokens: int
    dtype: str
    gradient_checkpointing: bool


# The paper's protocol (FCIT's training scripts; Shepherd's README command for FedIT) and the scaled-down
# protocol of the embedded default. Flags left unset take these values.
FCIT_TRAINER = dict(lr_schedule="cosine", warmup_ratio=0.03, max_length=2048, lora_init="fcit")
SHEPHERD_TRAINER = dict(lr_schedule="linear", warmup_ratio=0.0, max_length=512, lora_init="peft")
PAPER = dict(FCIT_TRAINER, clients=50, clients_per_round=5, rounds=10, local_epochs=1, lr=2e-4, max_new_tokens=128,
             identity_layer="last", on_full="error", client_sampling="official")
PAPER_TASK = dict(rank=64, alpha=128.0, subspaces=8, batch_size=128)
PAPER_CAP = dict(rank=32, alpha=64.0, subspaces=4, batch_size=64)
PAPER_FEDIT = dict(SHEPHERD_TRAINER, clients=10, clients_per_round=1, rounds=10, local_epochs=2, lr=3e-4, rank=8,
                   alpha=16.0, subspaces=1, batch_size=32, grad_accum=2, max_new_tokens=128, identity_layer="last",
                   client_sampling="official")
EMBEDDED = dict(FCIT_TRAINER, clients=5, clients_per_round=5, rounds=2, local_epochs=2, lr=3e-3, projector_lr=3e-4,
                batch_size=8, max_new_tokens=12, eval_samples=40, lm_identity=True, identity_layer="embedding",
                identity_center=True, on_full="nearest", client_sampling="seeded")
EMBEDDED_TASK = dict(PAPER_TASK, batch_size=8)
EMBEDDED_CAP = dict(PAPER_CAP, batch_size=8)
EMBEDDED_FEDIT = dict(SHEPHERD_TRAINER, clients=10, clients_per_round=5, rounds=4, local_epochs=2, lr=2e-3, rank=8,
                      alpha=16.0, subspaces=1, batch_size=16, max_new_tokens=16, eval_samples=None,
                      identity_layer="last", client_sampling="seeded")


def resolve_config(args):
    """Fill unset flags with the paper's protocol (real data) or the embedded protocol (FCIT-mini)."""
    if args.setting not in SETTINGS:
        raise UsageError(f"unknown setting {args.setting!r}; expected one of {', '.join(SETTINGS)}")
    known = FEDIT_METHODS if args.setting == "fedit" else FCIT_METHODS
    methods = args.methods.split(",") if args.methods else (
        ["fedit", "local"] if args.setting == "fedit" else ["disco", "finetune"])
    methods = [m.strip() for m in methods if m.strip()]
    for m in methods:
        if m not in known:
            raise UsageError(f"unknown method {m!r} for --setting {args.setting}; expected one of {', '.join(known)}")
    if len(set(methods)) != len(methods):
        raise UsageError(f"--methods lists a method twice: {args.methods}")
    embedded = args.model is None and args.data_root is None
    defaults = dict(identity_layer="last", identity_center=False, on_full="error", projector_lr=None, grad_accum=1,
                    lm_identity=False)
    if args.setting == "fedit":
        defaults.update(EMBEDDED_FEDIT if embedded else PAPER_FEDIT)
    else:
        defaults.update(EMBEDDED if embedded else PAPER)
        cap = args.setting.startswith("cap")
        defaults.update((EMBEDDED_CAP if cap else EMBEDDED_TASK) if embedded else (PAPER_CAP if cap else PAPER_TASK))
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults.get(name)
    for path_flag in ("model", "vision_tower", "text_encoder", "data_root"):
        path = getattr(args, path_flag)
        if path is not None and not os.path.exists(path):
            raise UsageError(f"--{path_flag.replace('_', '-')} {path!r} does not exist")
    if args.model is not None:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise UsageError(f"--model {args.model!r} is not a model directory: no config.json in it")
        try:
            vlm.load_config(args.model, args.vision_tower)
        except Exception as e:   # unknown model_type, unreadable config, missing vision tower ...
            raise UsageError(f"--model {args.model!r} is not a model this loader reads: {e}") from None
    if args.data_root is not None:
        if args.setting == "fedit":
            if not os.path.isfile(args.data_root):
                raise UsageError(f"--data-root {args.data_root!r}: expected a dolly-15k JSONL file for --setting fedit")
        elif not os.path.isdir(os.path.join(args.data_root, "instructions")):
            raise UsageError(f"--data-root {args.data_root!r} is not an FCIT release: expected an instructions/ "
                             "folder (instructions/<Dataset>/*.json) in it")
    model_dir = os.path.abspath(args.model) if args.model else TINY_MODEL_DIR
    vision_tower = os.path.abspath(args.vision_tower) if args.vision_tower else None
    cfg = RunConfig(
        setting=args.setting, methods=methods, aggregator=args.aggregator, beta=float(args.beta), seed=args.seed,
        clients=pick("clients"), clients_per_round=pick("clients_per_round"), rounds=pick("rounds"),
        local_epochs=pick("local_epochs"), lr=pick("lr"), batch_size=pick("batch_size"), grad_accum=pick("grad_accum"),
        projector_lr=pick("projector_lr"), lr_schedule=pick("lr_schedule"), warmup_ratio=pick("warmup_ratio"),
        max_length=pick("max_length"), lora_init=pick("lora_init"), client_sampling=pick("client_sampling"),
        server_state=args.server_state, mtl_epochs=args.mtl_epochs,
        rank=pick("rank"), alpha=pick("alpha"), subspaces=pick("subspaces"), routing=args.routing,
        identity=args.identity, orthogonal_subspaces=args.orthogonal_subspaces, tau=args.tau, assign=args.assign,
        lm_identity=bool(pick("lm_identity")), identity_layer=pick("identity_layer"),
        identity_center=bool(pick("identity_center")), on_full=pick("on_full"),
        prox_mu=args.prox_mu, server_lr=args.server_lr,
        ewc_lambda=args.ewc_lambda, olora_lambda=args.olora_lambda,
        model=model_dir, vision_tower=vision_tower,
        text_encoder=os.path.abspath(args.text_encoder) if args.text_encoder else None,
        image_aspect=args.image_aspect, image_preprocess=None,
        data_root=os.path.abspath(args.data_root) if args.data_root else None, embedded=embedded,
        eval_samples=pick("eval_samples"), caption_metric=args.caption_metric,
        shard_seed=args.shard_seed if args.setting == "fedit" else None,
        max_new_tokens=pick("max_new_tokens"), dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing)
    check_ranges(cfg)
    if cfg.mtl_epochs is None:   # the federated methods' data passes per stage: rounds x E x (sampled share)
        cfg.mtl_epochs = round(cfg.rounds * cfg.local_epochs * cfg.clients_per_round / cfg.clients, 6)
    if cfg.setting != "fedit" and vlm.load_config(model_dir, vision_tower).vision is not None:
        try:
            improc = vlm.ImageProcessor.for_checkpoint(model_dir, vision_tower, cfg.image_aspect)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--model {model_dir!r}: cannot resolve the image pre-processing: {e}") from None
        cfg.image_preprocess = improc.describe()
        cfg.image_aspect = "pad" if improc.pad_to_square else "crop"
    if "disco" in methods and cfg.identity == "text" and cfg.text_encoder is None and not cfg.lm_identity:
        raise UsageError("disco needs a task-identity encoder: pass --text-encoder <local CLIP folder> (the paper "
                         "uses clip-vit-large-patch14-336). Without it, the base LM's pooled states can give every "
                         "task the same identity at --tau 0.9, and DISCO silently becomes Finetune; pass "
                         "--lm-identity to use that fallback anyway")
    if cfg.clients_per_round > cfg.clients:
        raise UsageError(f"--clients-per-round {cfg.clients_per_round} exceeds --clients {cfg.clients}")
    if cfg.setting.endswith("-het") and cfg.clients_per_round != 5:
        raise UsageError(f"--setting {cfg.setting} maps the 5 client positions of a round to tasks (the official "
                         f"seq_dyn_list / cap_dyn_list); --clients-per-round must be 5, not {cfg.clients_per_round}")
    if cfg.rank % cfg.subspaces:
        raise UsageError(f"--rank {cfg.rank} must be divisible by the number of subspaces {cfg.subspaces}")
    return cfg


def check_ranges(cfg: RunConfig):
    """Every count, rate and threshold in its range, named by its flag (exit 2 before any work)."""
    rules = [("clients", cfg.clients >= 1, ">= 1"), ("clients-per-round", cfg.clients_per_round >= 1, ">= 1"),
             ("rounds", cfg.rounds >= 1, ">= 1"), ("local-epochs", cfg.local_epochs >= 1, ">= 1"),
             ("batch-size", cfg.batch_size >= 1, ">= 1"), ("grad-accum", cfg.grad_accum >= 1, ">= 1"),
             ("subspaces", cfg.subspaces >= 1, ">= 1"), ("rank", cfg.rank >= 1, ">= 1"),
             ("lr", cfg.lr > 0, "> 0"), ("projector-lr", cfg.projector_lr is None or cfg.projector_lr > 0, "> 0"),
             ("warmup-ratio", 0 <= cfg.warmup_ratio < 1, "in [0, 1)"), ("max-length", cfg.max_length >= 1, ">= 1"),
             ("mtl-epochs", cfg.mtl_epochs is None or cfg.mtl_epochs > 0, "> 0"), ("tau", -1 <= cfg.tau <= 1, "a cosine in [-1, 1]"),
             ("beta", cfg.beta > 0, "> 0"), ("eval-samples", cfg.eval_samples is None or cfg.eval_samples >= 1, ">= 1"),
             ("max-new-tokens", cfg.max_new_tokens >= 1, ">= 1"), ("ewc-lambda", cfg.ewc_lambda >= 0, ">= 0"),
             ("olora-lambda", cfg.olora_lambda >= 0, ">= 0"), ("prox-mu", cfg.prox_mu >= 0, ">= 0"),
             ("server-lr", cfg.server_lr is None or cfg.server_lr > 0, "> 0")]
    for flag, ok, want in rules:
        if not ok:
            raise UsageError(f"--{flag} must be {want}, not {getattr(cfg, flag.replace('-', '_'))}")


# ----------------------------------------------------------------------------------------------------
# results: results.json, results.md, matrix_<method>.png


def atomic_write(path, write):
    """Write through a temp file in the same directory, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    atomic_write(path, write)


def results_markdown(results):
    """A paper-style table: one row per method, per-task final scores, then Last and Avg."""
    tasks = results["tasks"]
    head = ["Method"] + tasks + ["Last", "Avg", "BWT"]
    lines = [f"**{results['setting']}**, beta={results['beta']}, seed={results['seed']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"
    for name, r in results["methods"].items():
        cells = [fmt(r["per_task_last"].get(t)) for t in tasks] + [fmt(r["last"]), fmt(r["avg"]), fmt(r["bwt"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_matrix(matrix, tasks, title, path):
    """Accuracy-matrix heatmap with Pillow: rows are tasks, columns are stages, values in the cells."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    cell_w, cell_h, left, top = 56, 24, 8 + 7 * max(len(t) for t in tasks), 40
    n_stages = len(matrix)
    img = Image.new("RGB", (left + cell_w * n_stages + 10, top + cell_h * len(tasks) + 10), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill="black", font=font)
    for t in range(n_stages):
        d.text((left + t * cell_w + 14, top - 16), f"T{t + 1}", fill="black", font=font)
    for i, task in enumerate(tasks):
        y = top + i * cell_h
        d.text((6, y + 6), task, fill="black", font=font)
        for t in range(n_stages):
            x, v = left + t * cell_w, matrix[t][i]
            if v is None:
                colour = (235, 235, 235)
            else:  # white (0) -> blue (100)
                s = max(0.0, min(1.0, v / 100.0))
                colour = (int(255 - 200 * s), int(255 - 150 * s), 255)
            d.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=colour)
            if v is not None:
                d.text((x + 10, y + 6), f"{v:.1f}", fill="black" if v < 60 else "white", font=font)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


# ----------------------------------------------------------------------------------------------------
# the benchmark: tasks, client data and test sets of one setting


class Benchmark:
    """The tasks of a setting in stage order, each client's training data per task, and the test sets.

    FCIT: task k is a dataset (Task-related) or a capability group (Capability-related); parts[k][c] is client
    c's shard of task k (the released partitions, or generated with data.make_partitions). FedIT: one stage,
    the tasks are dolly's categories, clients hold Shepherd's category shards (data.shepherd_partition)."""

    def __init__(self, cfg: RunConfig, log=print):
        self.cfg = cfg
        n = cfg.eval_samples
        if cfg.setting == "fedit":
            mini = os.path.join(CACHE_DIR, f"fedit-mini-s{cfg.seed}-{MINI_FEDIT['n_per_category']}")
            path = cfg.data_root or data.make_fedit_mini(mini, seed=cfg.seed, **MINI_FEDIT)
            train, test = data.dolly_split(data.load_dolly(path))
            cats = [r["category"] for r in train]
            shards = data.shepherd_partition(cats, cfg.clients, seed=cfg.shard_seed)
            self.tasks = sorted(set(cats))
            self.stages = 1
            self.parts = [[[data.dolly_example(train[i], i) for i in idx] for idx in shards]]
            self.test_datasets = {t: [f"dolly/{t}"] for t in self.tasks}
            self.test = {f"dolly/{t}": [data.dolly_example(r, j) for j, r in enumerate(test) if r["category"] == t][:n]
                         for t in self.tasks}
            self.source = path
            return
        if cfg.data_root is None:
            root = os.path.join(CACHE_DIR, f"fcit-mini-s{cfg.seed}-{MINI['n_train']}-{MINI['n_test']}")
            t0 = time.time()
            data.make_fcit_mini(root, seed=cfg.seed, **MINI)
            log(f"FCIT-mini ready in {root} ({time.time() - t0:.1f}s)")
        else:
            root = cfg.data_root
        self.source = root
        self.tasks = data.task_names(cfg.setting)
        self.stages = data.num_stages(cfg.setting)
        self.parts = data.load_partitions(root, cfg.setting, cfg.beta, cfg.clients, seed=cfg.seed)
        needed = sorted({ds for k in range(len(self.tasks)) for ds in data.task_datasets(cfg.setting, k)})
        test = data.load_fcit(root, datasets=needed, split="test")
        self.test_datasets = {t: data.task_datasets(cfg.setting, k) for k, t in enumerate(self.tasks)}
        self.test = {ds: (v[:n] if n else v) for ds, v in test.items()}

    def seen(self, stage):
        return list(range(len(self.tasks))) if self.cfg.setting == "fedit" else data.seen_tasks(self.cfg.setting, stage)

    def client_data(self, stage):
        """The callable Federation.run_round asks for a client's examples (position -> task by the setting)."""
        def get(position, client):
            if position is None:   # mtl: the union of every stage's training data, every client's shard
                return [ex for shards in self.parts for shard in shards for ex in shard]
            k = 0 if self.cfg.setting == "fedit" else data.stage_task_for(self.cfg.setting, stage, position)
            return self.parts[k][client]
        return get

    def score_task(self, k, predict):
        """Score of task k in 0..100: the mean over its datasets (a capability group has several)."""
        scores = []
        for ds in self.test_datasets[self.tasks[k]]:
            exs = self.test[ds]
            scores.append(data.evaluate_task(ds, predict(exs), exs, caption_metric=self.cfg.caption_metric))
        return sum(scores) / len(scores)

    def examples_by_task(self, tasks):
        return {self.tasks[k]: [ex for ds in self.test_datasets[self.tasks[k]] for ex in self.test[ds]] for k in tasks}


# ----------------------------------------------------------------------------------------------------
# one method through all stages, with a checkpoint after every round


def fed_config(cfg: RunConfig, method: str, device: str, dtype: str) -> federate.FedConfig:
    """The engine's configuration for one method; mtl is one centralised client, one round of mtl_epochs."""
    fedit = cfg.setting == "fedit"
    mtl = method == "mtl"
    return federate.FedConfig(
        method=method, aggregator=cfg.aggregator, n_clients=cfg.clients, clients_per_round=cfg.clients_per_round,
        rounds=1 if mtl else cfg.rounds, local_epochs=cfg.mtl_epochs if mtl else cfg.local_epochs, lr=cfg.lr,
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, projector_lr=cfg.projector_lr,
        lr_schedule=cfg.lr_schedule, warmup_ratio=cfg.warmup_ratio, max_length=cfg.max_length,
        lora_init=cfg.lora_init, client_sampling=cfg.client_sampling, server_state=cfg.server_state,
        rank=cfg.rank, alpha=cfg.alpha, num_subspaces=cfg.subspaces,
        routing=cfg.routing, identity=cfg.identity, orthogonal_subspaces=cfg.orthogonal_subspaces, tau=cfg.tau,
        assign=cfg.assign, identity_layer=cfg.identity_layer, identity_center=cfg.identity_center,
        on_full=cfg.on_full, prox_mu=cfg.prox_mu,
        server_lr=cfg.server_lr, ewc_lambda=cfg.ewc_lambda, olora_lambda=cfg.olora_lambda, seed=cfg.seed,
        device=device, dtype=dtype, max_new_tokens=cfg.max_new_tokens, gradient_checkpointing=cfg.gradient_checkpointing,
        template="alpaca" if fedit else "vicuna_v1", train_on_inputs=fedit,
        # FedIT (Shepherd) adapts the attention projections of a text-only LM; FCIT the MLP.
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj") if fedit else ("gate_proj", "up_proj", "down_proj"))


def load_model(cfg: RunConfig, device, dtype):
    """The base model (frozen weights in `dtype`), its tokenizer, image processor and the optional CLIP text tower."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = vlm.load_vlm(cfg.model, vision_tower=cfg.vision_tower, dtype=dtype, device=device)
    tokenizer = vlm.Tokenizer.from_dir(cfg.model)
    improc = None
    if model.vision is not None and cfg.setting != "fedit":
        improc = vlm.ImageProcessor.for_checkpoint(cfg.model, cfg.vision_tower, cfg.image_aspect)
    text_encoder = vlm.load_clip_text(cfg.text_encoder, device=device) if cfg.text_encoder else None
    return model, tokenizer, improc, text_encoder


def save_state(path, fed, progress):
    """Federation state + experiment progress, atomically (safetensors + JSON; the JSON names the tensors file)."""
    from safetensors.torch import save_file
    tensors, meta = fed.state_dict()
    atomic_write(path + ".safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(path + ".json", {"federation": meta, "progress": progress})


def load_state(path):
    from safetensors.torch import load_file
    if not os.path.exists(path + ".json"):
        return None, None
    with open(path + ".json") as f:
        st = json.load(f)
    tensors = load_file(path + ".safetensors") if os.path.exists(path + ".safetensors") else {}
    return tensors, st


def evaluate(fed, bench, method, tasks):
    """One row of the accuracy matrix: the scores of `tasks` (None for the others)."""
    row = [None] * len(bench.tasks)
    for k in tasks:
        if method == "local":   # FedIT's local baseline: each client's own model, averaged over clients
            clients = fed.local_clients()
            row[k] = sum(bench.score_task(k, lambda exs, c=c: fed.predict(exs, client=c, distributed=True))
                         for c in clients) / len(clients)
        else:
            row[k] = bench.score_task(k, lambda exs: fed.predict(exs, distributed=True))
    return row


def run_method(cfg: RunConfig, method, bench, out, device, dtype, log, is_main):
    """Train and evaluate one method through every stage; resumable after any round."""
    state_path = os.path.join(out, "state", method)
    model, tokenizer, improc, text_encoder = load_model(cfg, device, dtype)
    fed = federate.Federation(model, tokenizer, improc, fed_config(cfg, method, device, dtype), text_encoder)
    progress = {"stage": 0, "round": 0, "matrix": [], "comm_bytes": 0, "wall_s": 0.0, "done": False, "rounds": []}
    tensors, st = load_state(state_path)
    if st is not None:
        fed.load_state_dict(tensors, st["federation"])
        progress = st["progress"]
        if not progress["done"]:
            log(f"[{method}] resuming at stage {progress['stage'] + 1}, round {progress['round'] + 1}")
    rounds = 1 if method in ("zeroshot", "mtl") else cfg.rounds
    stages = 1 if method == "mtl" else bench.stages      # mtl: one joint training on every stage's data
    t_start = time.time() - progress["wall_s"]
    total_rounds = stages * rounds
    while not progress["done"]:
        stage, rnd = progress["stage"], progress["round"]
        t0 = time.time()
        rec = fed.run_round(stage, rnd, bench.client_data(stage), log=lambda s: log(f"[{method}] {s}"))
        for c in rec.get("per_client", []):
            sps = c["steps"] / c["time_s"] if c.get("time_s") else 0.0
            done = stage * rounds + rnd + 1
            eta = (time.time() - t_start) / done * (total_rounds - done)
            loss = f"{c['loss']:.3f}" if c.get("loss") is not None else "-"
            log(f"[{method}] stage {stage + 1}/{stages} round {rnd + 1}/{rounds} client {c['client']:>3} "
                f"n={c['n']:<4} loss {loss}  {sps:.2f} steps/s  ETA {eta / 60:.1f} min", progress_line=True,
                record={"method": method, "stage": stage, "round": rnd, **c})
        progress["comm_bytes"] += int(rec.get("bytes_up", 0) + rec.get("bytes_down", 0))
        progress["rounds"].append({k: rec.get(k) for k in ("stage", "round", "clients", "loss", "samples", "bytes_up",
                                                            "bytes_down", "time_s", "assignments", "opened", "dropped")})
        if rnd + 1 < rounds:
            progress["round"] = rnd + 1
        else:
            fed.end_stage(stage)
            tasks = bench.seen(bench.stages - 1 if method == "mtl" else stage)
            row = evaluate(fed, bench, method, tasks)
            progress["matrix"].append(row)
            seen = [f"{bench.tasks[k]} {row[k]:.1f}" for k in tasks]
            log(f"[{method}] after stage {stage + 1}/{stages} ({time.time() - t0:.0f}s): " + ", ".join(seen))
            progress["stage"], progress["round"] = stage + 1, 0
            progress["done"] = stage + 1 == stages
            save_adapters(fed, model, out, method, stage, is_main)
            if progress["done"]:
                progress["routing_accuracy"] = fed.routing_accuracy(bench.examples_by_task(tasks))
        progress["wall_s"] = time.time() - t_start
        if is_main:
            save_state(state_path, fed, progress)
    return summarize(progress, bench, continual=method != "mtl")


def save_adapters(fed, model, out, method, stage, is_main):
    """The adapters after a stage: our full format (all subspaces + identity keys) and PEFT's format (DISCO: the
    subspaces concatenated with uniform weights over the used ones, since PEFT has no routing)."""
    if not is_main or not fed.has_lora or method == "local":
        return
    d = os.path.join(out, "adapters", method, f"stage{stage + 1}")
    os.makedirs(d, exist_ok=True)
    extra = {}
    if getattr(fed, "keys", None) is not None:
        extra = {"identity_keys": fed.keys, "identity_sizes": fed.sizes.float()}
    lora.save_adapter(model, os.path.join(d, "fcit_adapter.safetensors"), extra=extra,
                      metadata={"method": method, "stage": stage})
    alpha = None
    if getattr(fed, "K", 1) > 1:
        used = (fed.sizes > 0).float() if method == "disco" else torch.ones(fed.K)
        alpha = used / used.sum().clamp(min=1)
    lora.save_peft_adapter(model, os.path.join(d, "peft"), alpha=alpha)


def summarize(progress, bench, continual=True):
    """results.json's entry of one method; a single joint training (mtl) has Last only, no Avg or BWT."""
    m = data.continual_metrics(progress["matrix"])
    if not continual:
        m["avg"] = m["bwt"] = None
    clean = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)
    last_row = progress["matrix"][-1]
    return {"matrix": [[clean(v) for v in row] for row in progress["matrix"]],
            "last": clean(m["last"]), "avg": clean(m["avg"]), "bwt": clean(m["bwt"]),
            "per_task_last": {t: clean(v) for t, v in zip(bench.tasks, last_row) if v is not None},
            "routing_accuracy": clean(progress.get("routing_accuracy")),
            "comm_bytes": int(progress["comm_bytes"]), "wall_s": round(progress["wall_s"], 2)}


# ----------------------------------------------------------------------------------------------------
# main


def plan(cfg: RunConfig, bench):
    """--dry-run: what would run, and roughly how long (steps from the client shard sizes)."""
    lines = [f"setting {cfg.setting}: {bench.stages} stage(s), tasks: {', '.join(bench.tasks)}",
             f"data: {bench.source}", f"model: {cfg.model}",
             f"methods: {', '.join(cfg.methods)}; aggregator {cfg.aggregator}; {cfg.clients} clients, "
             f"{cfg.clients_per_round} per round, {cfg.rounds} rounds per stage, {cfg.local_epochs} local epoch(s), "
             f"batch {cfg.batch_size}x{cfg.grad_accum}, lr {cfg.lr}, LoRA r={cfg.rank} alpha={cfg.alpha} K={cfg.subspaces}"]
    total = 0
    for s in range(bench.stages):
        trained = [0] if cfg.setting == "fedit" else data.tasks_of_stage(cfg.setting, s)
        sizes = [len(shard) for k in trained for shard in bench.parts[k]]   # the shards this stage's clients hold
        mean = sum(sizes) / max(1, len(sizes))
        steps = cfg.rounds * cfg.clients_per_round * math.ceil(mean * cfg.local_epochs / cfg.batch_size)
        total += steps
        tasks = bench.tasks if cfg.setting == "fedit" else [bench.tasks[k] for k in trained]
        lines.append(f"  stage {s + 1}: trains {', '.join(tasks)}; evaluates {len(bench.seen(s))} task(s); "
                     f"~{steps} optimizer steps per method")
    lines.append(f"~{total} optimizer steps per method in all")
    if "mtl" in cfg.methods:
        n = sum(len(shard) for shards in bench.parts for shard in shards)
        lines.append(f"mtl: one joint training, {cfg.mtl_epochs:g} epoch(s) over {n} pooled samples, "
                     f"~{math.ceil(math.ceil(n * cfg.mtl_epochs / cfg.batch_size) / cfg.grad_accum)} optimizer steps")
    if cfg.image_preprocess:
        lines.append(f"images: {cfg.image_preprocess}")
    return "\n".join(lines)


def check_out_dir(out, cfg: RunConfig):
    """A changed configuration on an existing --out is refused, showing the difference."""
    path = os.path.join(out, "config.json")
    mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
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


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
    except UsageError as e:
        print(f"fcit.py: error: {e}", file=sys.stderr)
        return 2
    rank, world = federate.init_distributed()
    is_main = rank == 0
    log = Logger(args.quiet, args.json_log, is_main)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{rank % torch.cuda.device_count()}"
    dtype_name = cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    out = args.out or os.path.join("runs", f"{cfg.setting}-b{cfg.beta}-s{cfg.seed}")
    try:
        cfg_path, cfg_json = check_out_dir(out, cfg)
    except UsageError as e:
        print(f"fcit.py: error: {e}", file=sys.stderr)
        return 2
    if not args.dry_run and cfg.embedded and not os.path.exists(os.path.join(TINY_MODEL_DIR, "model.safetensors")):
        log(f"building the embedded tiny VLM into {TINY_MODEL_DIR} (one time)")
        sys.path.insert(0, os.path.join(HERE, "tools"))
        import build_tiny_model
        build_tiny_model.main(["--out", TINY_MODEL_DIR])
    try:
        bench = Benchmark(cfg, log)
    except (data.FCITDataError, FileNotFoundError, ValueError) as e:
        print(f"fcit.py: error: cannot read the data: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        log(plan(cfg, bench))
        if is_main:
            os.makedirs(out, exist_ok=True)
            write_json(cfg_path, cfg_json)
            log(f"wrote {cfg_path}")
        return 0
    torch.manual_seed(cfg.seed)   # the entry point owns the global RNG; library code never reseeds it
    if is_main:
        os.makedirs(os.path.join(out, "state"), exist_ok=True)
        write_json(cfg_path, cfg_json)
    if cfg.embedded:
        log(f"embedded default: tiny VLM {cfg.model}, {'FedIT-mini' if cfg.setting == 'fedit' else 'FCIT-mini'}; "
            f"scaled-down protocol: {cfg.clients} clients, {cfg.clients_per_round} per round, {cfg.rounds} rounds per "
            f"stage, batch {cfg.batch_size}, lr {cfg.lr}, LoRA r={cfg.rank} alpha={cfg.alpha} K={cfg.subspaces}, "
            f"{cfg.eval_samples or 'all'} test samples per task")
    results = {"setting": cfg.setting, "beta": cfg.beta, "seed": cfg.seed, "tasks": bench.tasks, "methods": {}}
    for method in cfg.methods:
        log(f"== {method} ==")
        results["methods"][method] = run_method(cfg, method, bench, out, device, dtype_name, log, is_main)
        if is_main:
            write_json(os.path.join(out, "results.json"), results)
    if is_main:
        md = results_markdown(results)
        atomic_write(os.path.join(out, "results.md"), lambda tmp: open(tmp, "w").write(md))
        for name, r in results["methods"].items():
            draw_matrix(r["matrix"], bench.tasks, f"{name} - {cfg.setting}", os.path.join(out, f"matrix_{name}.png"))
        print("\n" + md)
        print(f"wrote {out}/results.json, results.md, matrix_<method>.png")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
