"""The federated engine: one round of a federation, whatever the method (FCIT: Guo et al., ICCV 2025; FedIT:
Zhang et al. 2023). The engine samples the clients; the method (methods.py, disco.py) gives each the subspace it
trains; every client trains from the method's weights with a fresh optimizer; empty or non-finite clients are
screened out; the method aggregates, through the engine's `aggregate`. Methods use only the engine's public members:
params, load, batch, aggregate, slot_names, global_state, lora_names, proj_names, K, cfg, model, device, autocast,
pixels, gather, last.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from typing import Callable

import numpy as np
import torch

import data
import disco
import lora
import methods
import privacy
import server
from config import Config
from methods import Round
from server import Upload

METHODS = {"finetune": methods.Finetune, "fedit": methods.FedIT, "zeroshot": methods.ZeroShot, "mtl": methods.MTL,
           "local": methods.Local, "fedsa": methods.FedSA, "ewc": methods.EWC, "olora": methods.OLoRA,
           "moelora": methods.MoELoRA, "disco": disco.DISCO}     # the one list of method names
STATE_VERSION = 4                                                  # of state_dict's metadata

logger = logging.getLogger("fcit.federate")


# ----------------------------------------------------------------------------------------------------
# torch.distributed: the clients of a round are split over ranks, their uploads all-gathered


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed under torchrun (NCCL with CUDA, else gloo); (rank, world), (0, 1) without."""
    import os
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist_info()


def dist_info() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj) -> list:
    """all_gather_object over ranks (CPU tensors inside obj); [obj] without distributed."""
    if dist_info()[1] == 1:
        return [obj]
    out = [None] * dist_info()[1]
    torch.distributed.all_gather_object(out, obj)
    return out


def sharded(answer: Callable, items: list, rank: int, world: int) -> list:
    """A collective: rank r answers items r, r+W, ... and every rank gets every answer, in order."""
    mine = items[rank::world]
    out = [None] * len(items)
    for r, ans in enumerate(all_gather(answer(mine) if mine else [])):
        out[r::world] = ans
    return out


def gather_by_position(part: dict) -> dict:
    """Every rank's {position: value}, merged and sorted by position."""
    out = {}
    for p in all_gather(part):
        out.update(p)
    return dict(sorted(out.items()))


@contextlib.contextmanager
def client_rng(device: torch.device, *key):
    """Seed torch's RNG (dropout, data order) for one client from (seed, stage, round, position, client) inside
    fork_rng, so a client trains the same whatever process runs it; the global state is restored afterwards."""
    seed = int(np.random.default_rng([int(k) % (2 ** 32) for k in key]).integers(2 ** 62))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def lr_multiplier(step: int, total: int, warmup: int, kind: str = "cosine") -> float:
    """transformers' get_cosine_schedule_with_warmup (FCIT's client trainer) or get_linear_schedule_with_warmup
    (the HF Trainer default Shepherd uses): linear warmup from 0, then decay to 0."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------
# a client's training and accounting (fed: the Federation)


def client_penalty(fed, names, ref, regularizer):
    """The method's regulariser (from its `configure`) plus FedProx's μ/2‖w − w_global‖² (Li et al. 2020)."""
    reg = regularizer() if regularizer is not None else None
    if fed.cfg.aggregator == "fedprox" and fed.cfg.prox_mu > 0:
        prox = fed.cfg.prox_mu / 2 * sum(((fed.params[n] - ref[n]) ** 2).sum() for n in names)
        reg = prox if reg is None else reg + prox
    return reg


def client_optimizer(fed, names, n_examples):
    """A fresh AdamW (β=(0.9, 0.999), eps 1e-8, no weight decay) and schedule per client and round, as FCIT's
    per-client HF Trainer; warmup ceil(warmup_ratio · steps). Returns (optim, sched, epoch sizes, steps)."""
    cfg = fed.cfg
    bs, acc = max(1, cfg.batch_size), max(1, cfg.grad_accum)
    whole, frac = divmod(float(fed.method.schedule.local_epochs), 1.0)   # a fraction: a prefix of the last epoch
    epochs = [n_examples] * int(whole) + ([max(1, round(frac * n_examples))] if frac > 1e-9 else [])
    steps = math.ceil(sum(math.ceil(sz / bs) for sz in epochs) / acc)
    warm = math.ceil(cfg.warmup_ratio * steps)
    proj = set(fed.proj_names)
    groups = [{"params": [fed.params[n] for n in names if n not in proj], "lr": cfg.lr},
              {"params": [fed.params[n] for n in names if n in proj],
               "lr": cfg.lr if cfg.projector_lr is None else cfg.projector_lr}]
    optim = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_multiplier(s, steps, warm, cfg.lr_schedule))
    return optim, sched, epochs, steps


def train_epochs(fed, examples, names, regularizer, optim, sched, epochs, gen):
    """The local epochs: gradient accumulation, clipping, autocast (GradScaler for fp16). Returns (losses,
    the first non-finite loss or None)."""
    cfg, bs, acc = fed.cfg, max(1, fed.cfg.batch_size), max(1, fed.cfg.grad_accum)
    params = [fed.params[n] for n in names]
    ref = {n: fed.params[n].detach().clone() for n in names} if cfg.aggregator == "fedprox" else None
    scaler = torch.amp.GradScaler(fed.device.type) if cfg.dtype == "float16" else None   # fp16's narrow range
    total_micro, micro, losses = sum(math.ceil(sz / bs) for sz in epochs), 0, []
    for size in epochs:
        perm = torch.randperm(len(examples), generator=gen).tolist()[:size]
        for b in range(math.ceil(size / bs)):
            batch = fed.batch([examples[i] for i in perm[b * bs:(b + 1) * bs]])
            with fed.autocast():
                loss = fed.model.loss(**batch)
            reg = client_penalty(fed, names, ref, regularizer)
            total = loss.float() + (reg.float() if reg is not None else 0.0)
            if not torch.isfinite(total):
                return losses, float(total.detach())
            losses.append(float(loss.detach()))
            (scaler.scale(total / acc) if scaler else total / acc).backward()
            micro += 1
            if micro % acc == 0 or micro == total_micro:
                if scaler:
                    scaler.unscale_(optim)
                if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if scaler:
                    scaler.step(optim)
                    scaler.update()
                else:
                    optim.step()
                sched.step()
                optim.zero_grad(set_to_none=True)
    return losses, None


def account(fed, u: Upload, sent: int) -> dict:
    """What a client sent (its upload, and `sent` bytes to be assigned) and received (what the method's `job` says it
    downloads, and the projector)."""
    up = down = 0
    if u.slot is not None:                           # it trained
        up = server.nbytes(u.state) + server.nbytes(u.extra)
        down = server.nbytes(fed.method.job(u.slot).downloads | {n: fed.global_state[n] for n in fed.proj_names})
    row = {k: getattr(u, k) for k in ("client", "position", "rank", "n", "slot", "loss", "steps", "trainable_params",
                                      "time_s")} | {"bytes_up": up + sent, "bytes_down": down}
    if row["loss"] is not None and not math.isfinite(row["loss"]):
        row["loss"] = None                           # strict JSON; the reason is in "dropped"
    return row


# ----------------------------------------------------------------------------------------------------
# the engine


def attach_adapters(fed) -> list[str]:
    """Freeze the model; give it the method's LoRA (a local generator: every rank builds identical adapters) and
    return the names of the projector's parameters when it is trained too (fp32 master weights under autocast)."""
    model, cfg = fed.model, fed.cfg
    for p in model.parameters():
        p.requires_grad_(False)
    if not fed.has_lora:
        return []
    g = torch.Generator().manual_seed(int(cfg.seed))
    lora.apply_lora(model, cfg.rank, cfg.alpha, targets=tuple(cfg.lora_targets), num_subspaces=fed.K,
                    init=cfg.lora_init, dropout=cfg.dropout, generator=g)
    if fed.method.router:
        lora.set_moe(model, generator=g)
    proj = getattr(model, "projector", None)
    if not cfg.train_projector or proj is None:
        return []
    proj.float()                                   # trained: float32 master weights whatever the frozen dtype
    return ["projector." + n for n, _ in proj.named_parameters()]


class ImageStates:
    """Each image's vision states (N_img, P, D_v), encoded once and kept while `mb` megabytes allow
    (--image-cache-mb): an image's pixels never change, and no method trains the vision tower."""

    def __init__(self, mb: int):
        self.mb, self.kept, self.nbytes = mb, {}, 0              # kept: image path -> (P, D_v) on the CPU

    def __call__(self, fed, examples) -> torch.Tensor:
        paths = [ex.image for ex in examples if ex.image]
        missing, new = list({ex.image: ex for ex in examples if ex.image and ex.image not in self.kept}.values()), {}
        if missing:
            with torch.no_grad(), fed.autocast():
                new = dict(zip([ex.image for ex in missing], fed.model.vision_states(fed.pixels(missing)).cpu()))
            for p, s in new.items():
                if self.nbytes + s.nbytes <= self.mb * 2 ** 20:
                    self.kept[p], self.nbytes = s, self.nbytes + s.nbytes
        return torch.stack([self.kept.get(p, new.get(p)) for p in paths]).to(fed.device)


class Federation:
    """A server and its simulated clients running one method (cfg.method) on one model.

    Clients run one after the other on the same model: each starts from the method's weights (the global state of
    its LoRA subspace(s) and the projector), trains and uploads; the server aggregates. Under torchrun each rank
    trains the positions p = rank (mod world) and the uploads are all-gathered, so every rank holds the same state."""

    def __init__(self, model, tokenizer, image_processor, cfg: Config, text_encoder=None):
        self.model, self.tok, self.improc, self.cfg = model, tokenizer, image_processor, cfg
        self.text_encoder = text_encoder          # None or (model.CLIPTextTower, its Tokenizer)
        self.device = torch.device(cfg.device)
        if cfg.method not in METHODS:
            raise ValueError(f"unknown method {cfg.method!r}; expected one of {', '.join(METHODS)}")
        self.method = METHODS[cfg.method](self)
        self.K = cfg.subspaces if self.method.subspaces else 1
        self.has_lora = self.method.trains
        self.proj_names = attach_adapters(self)
        self.params = dict(model.named_parameters())
        self.lora_names = list(lora.lora_state(model).keys()) if self.has_lora else []
        self.global_state = {n: self.params[n].detach().to("cpu", copy=True)
                             for n in self.lora_names + self.proj_names}
        self.opt = server.ServerOptimizer(cfg.aggregator, cfg.server_lr, cfg.server_momentum, cfg.beta1,
                                          cfg.beta2, cfg.tau_adaptive)
        self.last, self.round_key, self.dp_rounds = None, (0, 0), 0   # last: (stage, round) of the last run_round
        self.dp_participations: Counter = Counter()      # client -> DP rounds it took part in (the accountant's)
        self.rank, self.world = dist_info()
        self.gather = gather_by_position          # every rank's {position: value} of this round, merged
        self.lm_reference, self._collators = None, {}   # the LM-identity centre (computed once); the collators
        self.image_states = ImageStates(cfg.image_cache_mb)

    # ---------------------------------------------------------------- names, weights, batches
    def slot_names(self, j: int) -> list[str]:
        return [n for n in self.lora_names if n.endswith((f".A.{j}", f".B.{j}"))]

    def load(self, state: dict):
        """Copy `state` ({name: tensor}) into the model's parameters."""
        with torch.no_grad():
            for n, t in state.items():
                self.params[n].copy_(t)

    def pixels(self, examples):
        if self.improc is None or not any(ex.image for ex in examples):
            return None
        if not all(ex.image for ex in examples):
            raise ValueError("a batch mixes examples with and without images; batch them separately")
        return self.improc([data.load_image(ex.image, ex) for ex in examples]).to(self.device)

    def batch(self, examples, with_answer=True) -> dict:
        """A right-padded training batch (data.Collator) or, with_answer=False, a left-padded prompt batch."""
        key, cached = bool(with_answer), self.cfg.image_cache_mb > 0 and self.improc is not None
        if key not in self._collators:
            self._collators[key] = data.Collator(
                self.tok, self.improc, template=self.cfg.template,
                image_seq_len=getattr(self.model, "image_seq_len", 0) if self.improc is not None else 0,
                image_token_id=getattr(self.tok, "image_token_id", None),
                max_length=self.cfg.max_length if key else None,    # prompts are never cut (FCIT, Shepherd)
                train=key, train_on_inputs=self.cfg.train_on_inputs, pixels=not cached)
        batch = {k: (v.to(self.device) if v is not None else None) for k, v in self._collators[key](examples).items()}
        if cached and any(ex.image for ex in examples):
            batch["image_states"] = self.image_states(self, examples)
        return batch

    def autocast(self):
        """Mixed precision, the same on every device: frozen weights in --dtype, the trained LoRA and projector in
        float32, the computation under the device's autocast in --dtype."""
        if self.cfg.dtype in ("bfloat16", "float16"):
            return torch.autocast(self.device.type, dtype=getattr(torch, self.cfg.dtype))
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- client side
    def _local_train(self, examples, slot, stage, rnd, position, cid, start: dict | None = None) -> Upload:
        """One client's local training of `slot` from the method's weights for it (or `start`); returns its upload."""
        cfg, model, t0 = self.cfg, self.model, time.perf_counter()
        self.load(self.method.weights_for(cid) if start is None else start)
        job = self.method.job(slot)
        regularizer = self.method.configure(slot)              # the LoRA modes: job.trained require grad
        for n in self.proj_names:
            self.params[n].requires_grad_(True)
        names = job.trained + self.proj_names
        optim, sched, epochs, steps = client_optimizer(self, names, len(examples))
        gc_before = getattr(model, "gradient_checkpointing", False)
        model.gradient_checkpointing = bool(cfg.gradient_checkpointing)
        model.train()
        try:
            with client_rng(self.device, cfg.seed, stage, rnd, position, cid) as gen:
                losses, bad = train_epochs(self, examples, names, regularizer, optim, sched, epochs, gen)
                extra = self.method.after_local_train(examples, names, rnd) if bad is None else {}
        finally:
            model.gradient_checkpointing = gc_before
            model.eval()
            optim.zero_grad(set_to_none=True)
            for n in names:
                self.params[n].requires_grad_(False)
        copy = lambda ns: {n: self.params[n].detach().to("cpu", copy=True) for n in ns}
        return Upload(cid, position, len(examples), self.rank, dict(Counter(ex.dataset for ex in examples)), slot,
                      state=copy(job.shared + self.proj_names), extra=extra,
                      local=copy(set(job.trained) - set(job.shared)),     # what the client keeps (FedSA's B)
                      loss=bad if bad is not None else (float(np.mean(losses)) if losses else float("nan")),
                      steps=steps, time_s=time.perf_counter() - t0,
                      trainable_params=sum(self.params[n].numel() for n in names))

    def _client(self, ctx: Round, p: int, slot: int | None) -> Upload:
        """One client's part of the round; a client with data but no subspace is screened out as empty."""
        examples = ctx.data[p]
        if examples and slot is not None:
            return self._local_train(examples, slot, ctx.stage, ctx.rnd, p, ctx.clients[p])
        return Upload(ctx.clients[p], p, 0, self.rank, dict(Counter(ex.dataset for ex in examples)))

    # ---------------------------------------------------------------- one communication round
    def run_round(self, stage: int, rnd: int, client_data: Callable, log: Callable | None = None) -> dict:
        """Round `rnd` of `stage` (both 0-based). client_data(position, client) -> [Example] gives a client's data
        (the position picks the task in Het-FCIT; None for mtl: the client's share of every stage's data pooled).
        Returns the round log: clients, per-client accounting, dropped clients with reasons and the method's entries
        (DISCO: the assignments and opened subspaces)."""
        cfg, t0 = self.cfg, time.perf_counter()
        rec = {"stage": stage, "round": rnd, "method": cfg.method, "aggregator": cfg.aggregator,
               "assignments": None, "opened": [], "active_subspaces": None}
        if not self.method.trains:
            self.last = (stage, rnd)
            return {**rec, "clients": [], "per_client": [], "skipped": f"{cfg.method}: no training"}
        clients = server.sample_clients(cfg.clients, cfg.clients_per_round, cfg.seed, stage, rnd, cfg.client_sampling)
        mine = [p for p in range(len(clients)) if p % self.world == self.rank]
        failed = server.dropouts(clients, cfg.client_dropout, cfg.seed, stage, rnd)
        joint = self.method.schedule.joint
        data = {p: [] if p in failed else list(client_data(None if joint else p, clients[p]) or []) for p in mine}
        ctx = Round(stage, rnd, clients, data, log or logger.info)
        asg = self.method.assign(ctx)
        rec.update(asg.log)
        why = {p: "dropped out before its upload" for p in sorted(failed)} | asg.dropped
        dropped = [{"client": clients[p], "position": p, "reason": reason} for p, reason in why.items()]
        uploads = gather_by_position({p: self._client(ctx, p, asg.slots.get(p)) for p in mine})
        kept, bad = server.screen_clients(list(uploads.values()))
        dropped += [d for d in bad if not any(d["position"] == x["position"] for x in dropped)]
        for d in dropped:
            ctx.say(f"client {d['client']} (position {d['position']}) excluded: {d['reason']}")
        self.round_key = (stage, rnd)
        if cfg.dp_clip and self.method.releases_updates:   # its clients spend privacy budget
            self.dp_rounds += 1
            self.dp_participations.update(c for p, c in enumerate(clients) if p not in failed)
            rec["epsilon"] = privacy_spent(self)["epsilon"]
        if len(kept) < cfg.min_clients:
            rec["aggregation_skipped"] = f"{len(kept)} of {len(clients)} clients uploaded (--min-clients " \
                                         f"{cfg.min_clients}): the global model is left unchanged"
        elif kept:
            rec.update(self.method.aggregate(ctx, kept))
        if "aggregation_skipped" in rec:
            ctx.say(rec["aggregation_skipped"])
        self.load(self.global_state)
        self.last = (stage, rnd)
        per = [account(self, u, asg.bytes_up.get(p, 0)) for p, u in uploads.items()]
        n_tot = sum(u.n for u in kept)
        rec.update({"clients": [int(c) for c in clients], "per_client": per, "dropped": dropped,
                    "loss": (sum(u.loss * u.n for u in kept) / n_tot) if n_tot else None,
                    "samples": n_tot, "bytes_up": sum(x["bytes_up"] for x in per),
                    "bytes_down": sum(x["bytes_down"] for x in per), "time_s": time.perf_counter() - t0,
                    "world_size": self.world})
        return rec

    def aggregate(self, groups: list[tuple[list[str], list[Upload]]]) -> bool:
        """The server update, generic: each group's tensors `names` averaged over the group's uploads (FedAvg with
        weights n_k, or the server optimizer; DP-FedAvg with --dp-clip), written into the global state only when
        every result is finite. Returns whether it was."""
        new = (dp_aggregate if self.cfg.dp_clip else weighted_aggregate)(self, groups)
        if not server.finite_state(new):
            return False
        self.global_state.update(new)
        return True

    # ---------------------------------------------------------------- stage boundary, inference, checkpoints
    def end_stage(self, stage: int) -> dict:
        """Close a stage: the method's consolidation; the server optimizer's state is reset unless
        server_state="carry"."""
        if self.cfg.server_state == "reset":
            self.opt.m, self.opt.v = {}, {}
        return {"stage": stage, **self.method.end_stage(stage)}

    def eval_clients(self, datasets=None) -> list:
        """The models a task (its test `datasets`) is scored with: the global one (None), or a personalized method's
        every client's own; with method.scores_own_tasks (FedSA-LoRA) those of the clients whose data holds it."""
        if not self.method.personal:
            return [None]
        own = self.method.scores_own_tasks and datasets is not None
        return [c for c, d in sorted(self.method.personal.items()) if not own or set(d) & set(datasets)]

    @torch.no_grad()
    def predict(self, examples, batch_size: int | None = None, client: int | None = None,
                distributed: bool = False) -> list[str]:
        """Greedy answers, stripped, in input order, with the method's inference-time routing (DISCO: one α per
        sample, fp32), batch_size (default --eval-batch-size) prompts at a time. distributed=True is a collective:
        rank r answers examples r, r+W, ..., all get all."""
        batch_size = batch_size or self.cfg.eval_batch_size
        if distributed and self.world > 1:
            return sharded(lambda exs: self.predict(exs, batch_size, client), examples, self.rank, self.world)
        if not examples:
            return []
        self.load(self.method.weights_for(client))
        alpha = self.method.prepare_inference(examples) if self.has_lora else None
        self.model.eval()
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].instruction))   # similar lengths batched:
        out: list[str] = [""] * len(examples)                                               # less left padding
        for b in range(0, len(examples), batch_size):
            idx = order[b:b + batch_size]
            batch = self.batch([examples[i] for i in idx], with_answer=False)
            if alpha is not None:
                lora.set_routing(self.model, alpha[idx])
            with self.autocast():
                gen = self.model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                          pixel_values=batch["pixel_values"], image_states=batch.get("image_states"),
                                          max_new_tokens=self.cfg.max_new_tokens,
                                          eos_token_id=self.tok.eos_id, compile=self.cfg.compile)
            for i, g in zip(idx, gen):
                out[i] = self.tok.decode(list(g), skip_special_tokens=True).strip()
        return out

    def routing_accuracy(self, examples_by_task: dict) -> float | None:
        """How often inference routes a test example to the subspace that learned its task (DISCO; else None)."""
        return self.method.routing_accuracy(examples_by_task)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta) to resume exactly after a round: global state, server-optimizer state and the method's."""
        t = {f"global/{n}": v for n, v in self.global_state.items()}
        t.update({f"opt.m/{n}": v for n, v in self.opt.m.items()})
        t.update({f"opt.v/{n}": v for n, v in self.opt.v.items()})
        mt, mmeta = self.method.state()
        t.update({f"method/{k}": v for k, v in mt.items()})
        t = {k: v.detach().cpu().contiguous().clone() for k, v in t.items()}
        meta = {"version": STATE_VERSION, "method": self.cfg.method, "K": self.K,
                "last": list(self.last) if self.last else None, "method_state": mmeta, "dp_rounds": self.dp_rounds,
                "dp_participations": {str(c): k for c, k in sorted(self.dp_participations.items())}}
        return t, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict):
        if meta["version"] != STATE_VERSION:
            raise ValueError(f"state file version {meta['version']}; this code reads version {STATE_VERSION}")
        if meta["method"] != self.cfg.method or meta["K"] != self.K:
            raise ValueError(f"checkpoint is for method {meta['method']!r} with K={meta['K']}, "
                             f"this federation is {self.cfg.method!r} with K={self.K}")
        sub = lambda prefix: {k[len(prefix):]: v.clone() for k, v in tensors.items() if k.startswith(prefix)}
        g = sub("global/")
        missing = set(self.global_state) - set(g)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} global tensors, e.g. {sorted(missing)[:3]}")
        self.global_state = g
        self.opt.load_state_dict({"m": sub("opt.m/"), "v": sub("opt.v/")})
        self.method.load_state(sub("method/"), meta["method_state"])
        self.last = tuple(meta["last"]) if meta["last"] else None
        self.dp_rounds = int(meta["dp_rounds"])
        self.dp_participations = Counter({int(c): int(k) for c, k in meta["dp_participations"].items()})
        self.load(self.global_state)


def adopt_adapter(fed: Federation, extra: dict, meta: dict):
    """Take the adapter loaded into the model (and the projector saved with it) as the global state, to evaluate
    a saved stage (--eval-only); the method restores what it routes with (DISCO: its identity keys)."""
    fed.load({n: extra[f"param/{n}"] for n in fed.proj_names if f"param/{n}" in extra})
    fed.global_state = {n: fed.params[n].detach().to("cpu", copy=True) for n in fed.lora_names + fed.proj_names}
    fed.last = (int(meta["stage"]), 0)
    fed.method.restore(extra, meta)


def weighted_aggregate(fed: Federation, groups: list[tuple[list[str], list[Upload]]]) -> dict:
    """Each group's tensors averaged over its uploads with weights n_k (FedAvg), or the server optimizer's step."""
    new = {}
    for names, us in groups:
        new.update(server.aggregate({n: fed.global_state[n] for n in names}, [u.state for u in us],
                                    [u.n for u in us], fed.opt, fed.cfg.lora_avg))
    return new


def dp_aggregate(fed: Federation, groups: list[tuple[list[str], list[Upload]]]) -> dict:
    """DP-FedAvg (McMahan et al. 2018): each client's update (what it uploads minus what it downloaded) clipped to
    L2 norm C jointly; per tensor, the sum over its group's clients plus N(0, (σC)²), divided by the clients per
    round (a fixed denominator); then FedAvg's step or the server optimizer's."""
    c, (stage, rnd) = fed.cfg, fed.round_key
    clipped = {}
    for u in (u for _, us in groups for u in us):
        if u.position not in clipped:
            clipped[u.position] = privacy.clip({n: t.float() - fed.global_state[n].float() for n, t in u.state.items()},
                                               c.dp_clip)[0]
    gen = privacy.noise_generator(c.seed, stage, rnd, 0xD1)
    new = {}
    for n, us in [(n, us) for names, us in groups for n in names]:
        x = fed.global_state[n]
        d = (sum(clipped[u.position][n] for u in us) + privacy.gaussian(x.shape, c.dp_noise * c.dp_clip, gen)) \
            / c.clients_per_round
        new[n] = (x.float() + d).to(x.dtype) if fed.opt.kind in ("fedavg", "fedprox") else fed.opt.step(n, x, d)
    return new


def privacy_spent(fed: Federation) -> dict:
    """DP-FedAvg's (ε, δ) so far, for the worst client: the draws are public, so each round a client took part in
    (sampled, not dropped out) is one Gaussian mechanism with q = 1 (privacy.worst_client); the noise of the updates
    and (DISCO) of the identity tokens composed. docs/protocol.md says what it covers."""
    c = fed.cfg
    sigma = privacy.effective_noise(c.dp_noise, (c.dp_identity_noise if c.dp_identity_noise is not None
                                                 else c.dp_noise) if fed.method.releases_identity else None)
    eps, order, worst = privacy.worst_client(fed.dp_participations, sigma, c.dp_delta)
    return {"epsilon": eps, "delta": c.dp_delta, "rounds": fed.dp_rounds, "participations": worst,
            "noise_multiplier": sigma, "clip": c.dp_clip, "order": order}
