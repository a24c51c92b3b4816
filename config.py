"""The one configuration of an experiment: a dataclass whose fields carry their defaults and help text, the
presets of the paper's protocols and of the embedded default, and the rules every value must obey. fcit.py
builds its command line from `Config`; federate.py reads the same object."""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from scoring import CAPTION_METRICS, SCORERS, official_caption_unavailable

SETTINGS = ("task-hom", "task-het", "cap-hom", "cap-het", "fedit")
STAGES = {"task-hom": 8, "task-het": 8, "cap-hom": 4, "cap-het": 4, "fedit": 1}   # stages of each setting
FCIT_METHODS = ("disco", "finetune", "ewc", "olora", "moelora", "fedsa", "zeroshot", "mtl")
FEDIT_METHODS = ("fedit", "local", "fedsa", "mtl")
AGGREGATORS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


class UsageError(ValueError):
    """A bad setting: reported with exit code 2 before any work starts."""


def opt(default, help, choices=None, cli=True):
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


@dataclass
class Config:
    """Everything that determines the results; the defaults are FCIT's Task-related protocol (Guo et al. 2025,
    the official training scripts), presets adjust them per setting (PRESETS)."""
    # experiment
    setting: str = opt("task-hom", "task-hom/task-het: 8 stages, one dataset each, the clients of a stage hold the "
                       "same task (hom) or different tasks by the official seq_dyn_list (het); cap-hom/cap-het: 4 "
                       "capability groups of the 12 datasets; fedit: one-stage federated instruction tuning", SETTINGS)
    methods: tuple = opt(("disco", "finetune"), "comma list. FCIT: " + ", ".join(FCIT_METHODS) + "; FedIT: "
                         + ", ".join(FEDIT_METHODS) + " (fedit default: fedit,local; the embedded FCIT default: "
                         "zeroshot,disco,finetune)")
    method: str = opt("disco", "the method one federation runs (set per method by fcit.py)", cli=False)
    seed: int = opt(0, "fixes partitions, client sampling (seeded) and initialisation")
    beta: float = opt(1.0, "Dirichlet concentration of the client quantity skew")
    # federation
    aggregator: str = opt("fedavg", "server aggregation (FedAvg as in FCIT and Shepherd; the others from Li et al. "
                          "2020, Hsu et al. 2019 and Reddi et al. 2021)", AGGREGATORS)
    clients: int = opt(50, "clients in total (paper: 50; FedIT: 10)")
    clients_per_round: int = opt(5, "clients sampled per round (paper: 5; FedIT: 1)")
    client_sampling: str = opt("seeded", "official: the draw of FCIT's and Shepherd's code, np.random.seed(stage*10 "
                               "+ round) then choice, positions in the order of set(choice), ignoring --seed (the "
                               "paper protocols); seeded: keyed by --seed, "
                               "stage and round (the embedded run)", ("official", "seeded"))
    rounds: int = opt(10, "communication rounds per stage")
    stages: int = opt(None, "run only the first N stages of the setting (a quick check of a real configuration); "
                      "mtl pools those stages' data (default: all)")
    client_dropout: float = opt(0.0, "probability that a sampled client fails before its upload (seeded per stage, "
                                "round and client)")
    min_clients: int = opt(1, "a round with fewer uploads leaves the global model unchanged, and says so")
    dp_clip: float = opt(None, "client-level DP (DP-FedAvg): clip each client's update to this L2 norm C; the server "
                         "adds N(0, (noise C)^2) to the sum and divides by --clients-per-round")
    dp_noise: float = opt(1.0, "with --dp-clip: the noise multiplier sigma of the updates")
    dp_identity_noise: float = opt(None, "with --dp-clip: the noise multiplier of DISCO's identity tokens, clipped to "
                                   "unit norm (default: --dp-noise)")
    dp_delta: float = opt(1e-5, "with --dp-clip: the delta at which epsilon is reported")
    server_lr: float = opt(None, "server learning rate of fedavgm/fedadam/fedyogi/fedadagrad (default: 1 - momentum "
                           "for fedavgm, 1e-3 for the adaptive ones)")
    server_momentum: float = opt(0.9, "FedAvgM momentum")
    beta1: float = opt(0.9, "FedAdam/FedYogi/FedAdagrad beta1 (Reddi et al. 2021)")
    beta2: float = opt(0.99, "FedAdam/FedYogi beta2")
    tau_adaptive: float = opt(1e-3, "adaptivity tau of FedAdam/FedYogi/FedAdagrad (v starts at tau^2)")
    server_state: str = opt("reset", "server-optimizer state (momentum, m and v) at a stage boundary",
                            ("reset", "carry"))
    prox_mu: float = opt(0.01, "FedProx proximal weight mu")
    lora_avg: str = opt("factors", "average LoRA A and B separately (FCIT, Shepherd) or their product, "
                        "re-factorised by SVD (fedavg/fedprox only)", ("factors", "product"))
    # client training
    local_epochs: float = opt(1, "local epochs per round (FedIT: 2)")
    lr: float = opt(2e-4, "client AdamW learning rate (FedIT: 3e-4)")
    projector_lr: float = opt(None, "learning rate of the trained projector (default: --lr, which produced the "
                              "paper's numbers: FCIT's scripts pass mm_projector_lr 2e-5 but its optimizer ignores it)")
    lr_schedule: str = opt("cosine", "client LR decay, restarted per client and round (FedIT/Shepherd: linear)",
                           ("cosine", "linear"))
    warmup_ratio: float = opt(0.03, "client LR warmup as a fraction of its steps (FedIT/Shepherd: 0)")
    batch_size: int = opt(128, "client batch size (paper: 128 task / 64 cap; FedIT: 32)")
    grad_accum: int = opt(1, "gradient accumulation steps (FedIT: 2, Shepherd's batch 64 in micro-batches of 32)")
    max_grad_norm: float = opt(1.0, "gradient-norm clip of a client step (0: none)")
    max_length: int = opt(2048, "token cutoff of a training sequence; prompts are never cut (FedIT/Shepherd: 512)")
    template: str = opt("vicuna_v1", "prompt template (FedIT: alpaca)")
    train_on_inputs: bool = opt(False, "supervise the prompt too (Shepherd's default for FedIT)")
    train_projector: bool = opt(True, "train and average the projector (FCIT trains mm_projector)")
    gradient_checkpointing: bool = opt(False, "recompute decoder layers in backward")
    # LoRA
    rank: int = opt(64, "total LoRA rank r (paper: 64 task-related, 32 capability; FedIT: 8)")
    alpha: float = opt(128.0, "LoRA alpha (paper: 128 task-related, 64 capability; FedIT: 16)")
    subspaces: int = opt(8, "number of LoRA subspaces K (paper: 8 task, 4 cap)")
    dropout: float = opt(0.05, "LoRA dropout on the layer input")
    lora_targets: tuple = opt(("gate_proj", "up_proj", "down_proj"),
                              "comma list of adapted projections (FCIT: the MLP; FedIT: q,k,v,o_proj)")
    lora_init: str = opt("fcit", "LoRA A init: fcit = N(0, 0.01^2); peft = kaiming-uniform, PEFT's default (FedIT)",
                         ("fcit", "peft"))
    # DISCO and the continual baselines
    tau: float = opt(0.9, "DISCO identity-matching threshold (cosine)")
    temperature: float = opt(0.05, "DISCO SSA softmax temperature")
    small_client: float = opt(1e-3, "DISCO: an unmatched client below this share of the round's samples joins the "
                              "nearest subspace instead of opening one (official code)")
    routing: str = opt("softmax", "DISCO subspace selective activation: softmax over cosine/temperature (paper) or an "
                       "ablation", ("softmax", "argmax", "concat", "cosine"))
    assign: str = opt("round0", "DISCO: match clients to subspaces in round 0 of a stage and keep the position's "
                      "subspace for the later rounds (official schedule), or re-match every round",
                      ("round0", "every_round"))
    on_full: str = opt("error", "DISCO when a new task arrives and all K subspaces are taken: stop with an error, or "
                       "join the nearest subspace (the official client rule), logged", ("error", "nearest"))
    identity: str = opt("text", "DISCO task-identity source: the instruction text, or (ablations) CLIP's image "
                        "embedding from --text-encoder, or both (the mean of the two cosines)",
                        ("text", "image", "text+image"))
    text_encoder: str = opt(None, "local CLIP folder whose text tower gives DISCO's identity features (paper: "
                            "clip-vit-large-patch14-336); required by disco with --model unless --lm-identity")
    lm_identity: bool = opt(False, "DISCO without --text-encoder: take task identities from the base LM (a fallback "
                            "that can merge distinct tasks; the embedded run sets it)")
    identity_layer: str = opt("last", "with --lm-identity: mean-pool the LM's final hidden states or its input token "
                              "embeddings", ("last", "embedding"))
    identity_center: bool = opt(False, "with --lm-identity: centre the LM's token states on a fixed reference and "
                                "normalise them before pooling")
    orthogonal_subspaces: bool = opt(False, "DISCO: keep each newly opened subspace orthogonal to the existing ones")
    ewc_lambda: float = opt(1.0, "EWC penalty weight on the mean-normalised Fisher: the L2 anchor weight of a "
                            "parameter of average importance, the same at every model scale")
    olora_lambda: float = opt(0.5, "O-LoRA orthogonality penalty weight")
    # model and data
    model: str = opt(None, "local model folder (llava-hf, original LLaVA or a text-only LLaMA/Qwen2); default: the "
                     "embedded tiny VLM")
    vision_tower: str = opt(None, "local CLIP folder for the original LLaVA layout")
    image_aspect: str = opt(None, "pad images to a square with the mean colour before resize and crop (LLaVA-1.5, "
                            "FCIT) or centre-crop them (default: pad, unless an original LLaVA config.json names "
                            "another image_aspect_ratio)", ("pad", "crop"))
    image_preprocess: dict = opt(None, "the resolved image pre-processing (recorded)", cli=False)
    data_root: str = opt(None, "the FCIT release (instructions/, partitioned_data/, images) or a dolly-15k JSONL for "
                         "fedit; default: FCIT-mini / FedIT-mini generated into the cache")
    embedded: bool = opt(False, "the embedded tiny VLM and built-in benchmark are used (recorded)", cli=False)
    shard_seed: int = opt(42, "fedit: seed of Shepherd's category-shard shuffle")
    dolly_extra_categories: bool = opt(False, "fedit: accept categories other than databricks-dolly-15k's eight, each "
                                       "a task of its own (otherwise an unknown category is an error)")
    # evaluation and numerics
    eval_samples: int = opt(None, "test samples per task (default: all)")
    max_new_tokens: int = opt(128, "generation budget")
    eval_batch_size: int = opt(8, "prompts per greedy-decoding batch in evaluation")
    compile: bool = opt(False, "evaluation's decode step through torch.compile with a static KV cache (gpt-fast; CUDA "
                        "graphs on a GPU). A new shape compiles again (seconds to a minute), at most a few per run, "
                        "so it pays off on a GPU with long answers; inductor may round sums differently")
    image_cache_mb: int = opt(0, "keep each image's vision-tower states after its first use, up to this many MB, "
                              "instead of encoding it again every epoch and evaluation (no method trains the tower); "
                              "0: off")
    caption_metric: str = opt("average", "Flickr30k score: average = mean of BLEU-1..4, ROUGE-L and CIDEr x 100 "
                              "(FCIT's 'Average' without METEOR; with METEOR under --scorer official); CIDEr, Bleu_N, "
                              "ROUGE_L x 100; CIDEr_x10 = CIDEr-D on a 0..100 scale", CAPTION_METRICS)
    scorer: str = opt("corrected", "corrected: FCIT's per-dataset rules with the official bugs fixed; official: FCIT's "
                      "eval scripts as released, bugs included, for numbers comparable with the paper (Grounding's "
                      "[1:-1] slice, empty FigureQA/DVQA answers right, METEOR in the caption average, scores "
                      "rounded to 2 decimals; needs pycocoevalcap and Java). docs/differences.md lists each "
                      "divergence", SCORERS)
    dtype: str = opt(None, "weights/compute dtype (default: bfloat16 on GPU, float32 on CPU)",
                     ("float32", "bfloat16", "float16"))
    device: str = opt("cpu", "cpu, cuda, cuda:1 ... (default: cuda if available)", cli=False)
    threads: int = opt(0, "torch CPU threads per process (0: torch's default, one per core, shared out among the "
                       "--workers). A sum's rounding depends on it, so a CPU run's numbers do too (the embedded preset "
                       "fixes 1)")
    workers: int = opt(1, "methods run at the same time, each in a process of its own with --threads threads (1: one "
                       "after another in this process); the results are the same either way")

    def __post_init__(self):
        self.methods, self.lora_targets = tuple(self.methods), tuple(self.lora_targets)
        check(self)


# The paper's protocols (FCIT's training scripts; Shepherd's README command and trainer) and the scaled-down
# protocol of the embedded default, applied over Config's defaults to every flag left unset.
SHEPHERD = dict(clients=10, clients_per_round=1, rounds=10, local_epochs=2, lr=3e-4, rank=8, alpha=16.0,
                subspaces=1, batch_size=32, grad_accum=2, lr_schedule="linear", warmup_ratio=0.0, max_length=512,
                lora_init="peft", template="alpaca", train_on_inputs=True, methods=("fedit", "local"),
                lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), client_sampling="official")
EMBEDDED_FCIT = dict(methods=("zeroshot", "disco", "finetune"), clients=5, clients_per_round=5, rounds=2,
                     local_epochs=2, lr=3e-3, projector_lr=3e-4, batch_size=8, max_new_tokens=12, eval_samples=40,
                     eval_batch_size=40, image_cache_mb=256, lm_identity=True, identity_layer="embedding",
                     identity_center=True, on_full="nearest", client_sampling="seeded", threads=1, workers=2)
PRESETS = {
    "paper": {"task": dict(client_sampling="official"),
              "cap": dict(rank=32, alpha=64.0, subspaces=4, batch_size=64, client_sampling="official"),
              "fedit": SHEPHERD},
    "embedded": {
        "task": EMBEDDED_FCIT,
        "cap": dict(EMBEDDED_FCIT, rank=32, alpha=64.0, subspaces=4),
        "fedit": dict(SHEPHERD, clients=10, clients_per_round=5, rounds=6, lr=1e-2, batch_size=16, grad_accum=1,
                      max_new_tokens=16, eval_batch_size=40, client_sampling="seeded", threads=1, workers=2),
    },
}


def preset(setting: str, embedded: bool) -> dict:
    """The values the setting's protocol gives to the flags left unset."""
    kind = "fedit" if setting == "fedit" else setting.split("-")[0]
    return PRESETS["embedded" if embedded else "paper"][kind]


# ----------------------------------------------------------------------------------------------------
# the command line, generated from Config


def _parse_list(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser):
    """One flag per Config field (underscores become dashes); every default is None, meaning "the preset's"."""
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        shown = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        text = meta["help"] + ("" if f.default is None or f.default is False else f" (default: {shown})")
        kind = {"int": int, "float": float, "str": str, "tuple": _parse_list}[f.type] if f.type != "bool" else None
        if kind is None:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type=kind, default=None, choices=meta["choices"], help=text)


RANGES = {   # field -> (test, what it must be)
    "clients": (lambda v: v >= 1, ">= 1"), "clients_per_round": (lambda v: v >= 1, ">= 1"),
    "rounds": (lambda v: v >= 1, ">= 1"), "stages": (lambda v: v >= 1, ">= 1"),
    "local_epochs": (lambda v: v > 0, "> 0"),
    "batch_size": (lambda v: v >= 1, ">= 1"), "grad_accum": (lambda v: v >= 1, ">= 1"),
    "subspaces": (lambda v: v >= 1, ">= 1"), "rank": (lambda v: v >= 1, ">= 1"), "alpha": (lambda v: v > 0, "> 0"),
    "lr": (lambda v: v > 0, "> 0"), "projector_lr": (lambda v: v > 0, "> 0"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"), "max_length": (lambda v: v >= 1, ">= 1"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0"), "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "tau": (lambda v: -1 <= v <= 1, "a cosine in [-1, 1]"),
    "temperature": (lambda v: v > 0, "> 0"), "small_client": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta": (lambda v: v > 0, "> 0"), "eval_samples": (lambda v: v >= 1, ">= 1"),
    "eval_batch_size": (lambda v: v >= 1, ">= 1"), "image_cache_mb": (lambda v: v >= 0, ">= 0"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"), "ewc_lambda": (lambda v: v >= 0, ">= 0"),
    "olora_lambda": (lambda v: v >= 0, ">= 0"), "prox_mu": (lambda v: v >= 0, ">= 0"),
    "server_lr": (lambda v: v > 0, "> 0"), "server_momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"), "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "tau_adaptive": (lambda v: v > 0, "> 0"), "client_dropout": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "min_clients": (lambda v: v >= 1, ">= 1"), "dp_clip": (lambda v: v > 0, "> 0"),
    "dp_noise": (lambda v: v >= 0, ">= 0"), "dp_identity_noise": (lambda v: v >= 0, ">= 0"),
    "dp_delta": (lambda v: 0 < v < 1, "in (0, 1)"), "threads": (lambda v: v >= 0, ">= 0"),
    "workers": (lambda v: v >= 1, ">= 1"), "seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2^32)"),
    "shard_seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2^32)"),
}


def check(cfg: Config):
    """Every rule on the values alone, once, naming the flag (UsageError)."""
    for f in dataclasses.fields(Config):               # inf and nan pass every comparison test below; refuse them first
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"--{f.name.replace('_', '-')} must be a finite number, not {v}")
    for name, (ok, want) in RANGES.items():
        v = getattr(cfg, name)
        if v is not None and not ok(v):
            raise UsageError(f"--{name.replace('_', '-')} must be {want}, not {v}")
    for f in dataclasses.fields(Config):
        choices, v = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices and v is not None and v not in choices:
            raise UsageError(f"--{f.name.replace('_', '-')} {v!r}: expected one of {', '.join(choices)}")
    known = FEDIT_METHODS if cfg.setting == "fedit" else FCIT_METHODS
    for m in cfg.methods:
        if m not in known:
            raise UsageError(f"unknown method {m!r} for --setting {cfg.setting}; expected one of {', '.join(known)}")
    if len(set(cfg.methods)) != len(cfg.methods) or not cfg.methods:
        raise UsageError(f"--methods must list each method once: {','.join(cfg.methods)}")
    if cfg.min_clients > cfg.clients_per_round:
        raise UsageError(f"--min-clients {cfg.min_clients} exceeds --clients-per-round {cfg.clients_per_round}: "
                         "no round could ever update the global model")
    if cfg.clients_per_round > cfg.clients:
        raise UsageError(f"--clients-per-round {cfg.clients_per_round} exceeds --clients {cfg.clients}")
    if cfg.setting.endswith("-het") and cfg.clients_per_round != 5:
        raise UsageError(f"--setting {cfg.setting} maps the 5 client positions of a round to tasks (the official "
                         f"seq_dyn_list / cap_dyn_list); --clients-per-round must be 5, not {cfg.clients_per_round}")
    if cfg.stages is not None and cfg.stages > STAGES[cfg.setting]:
        raise UsageError(f"--stages {cfg.stages}: --setting {cfg.setting} has {STAGES[cfg.setting]} stage(s)")
    if cfg.rank % cfg.subspaces:
        raise UsageError(f"--rank {cfg.rank} must be divisible by --subspaces {cfg.subspaces}")
    if cfg.lora_avg == "product" and cfg.aggregator not in ("fedavg", "fedprox"):
        raise UsageError("--lora-avg product re-factorises the averaged update by SVD every round, which makes a "
                         "server optimizer's state meaningless; use it with --aggregator fedavg or fedprox")
    if cfg.dp_clip and "ewc" in (cfg.method, *cfg.methods):
        raise UsageError("--dp-clip with ewc: each client uploads its Fisher information un-noised, which the privacy "
                         "accountant does not cover; run ewc without --dp-clip")


def resolve(values: dict, embedded: bool) -> Config:
    """Config from the flags given (None = unset): Config's defaults, then the setting's preset, then the flags.
    Checked before it is returned."""
    given = {k: v for k, v in values.items() if v is not None}
    setting = given.get("setting", Config.setting)
    if setting not in SETTINGS:
        raise UsageError(f"unknown setting {setting!r}; expected one of {', '.join(SETTINGS)}")
    cfg = Config(**{**preset(setting, embedded), **given, "embedded": embedded})
    if "disco" in cfg.methods and cfg.identity != "image" and cfg.text_encoder is None and not cfg.lm_identity:
        raise UsageError("disco needs a task-identity encoder: pass --text-encoder <local CLIP folder> (the paper "
                         "uses clip-vit-large-patch14-336). Without it, the base LM's pooled states can give every "
                         "task the same identity at --tau 0.9, and DISCO silently becomes Finetune; pass "
                         "--lm-identity to use that fallback anyway")
    if cfg.scorer == "official" and setting != "fedit" and (why := official_caption_unavailable()):
        raise UsageError(f"--scorer official scores Flickr30k as FCIT's eval_caption.py does, with pycocoevalcap: "
                         f"{why}; or use --scorer corrected")
    if setting != "fedit":
        cfg.shard_seed = None
    return cfg
