"""Federated training: the engine that runs a round, and one small unit per continual method.

A round (Federation.run_round): the method picks the clients and the subspace each trains; every client trains
from the global state with a fresh optimizer; empty or non-finite clients are screened out; the method
aggregates the uploads. The engine names no method: each unit below overrides only the hooks where it differs
from Finetune, and METHODS lists them. FCIT: Guo et al., ICCV 2025; FedIT: Zhang et al. 2023 (Shepherd).
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
import torch.nn.functional as F

import data
import lora
import server
from config import Config

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


def nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ----------------------------------------------------------------------------------------------------
# task-identity features (DISCO): one vector per instruction, from frozen encoders only

REFERENCE_TEXTS = (   # generic texts whose mean base-LM state centres the LM-identity fallback (identity_center)
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Describe this.", "What is shown here?", "Answer the question.", "Hello world.", "Please help me with this.",
    "Tell me something about it.", "Is this correct? Answer yes or no.", "How many are there?",
    "Give a short answer.", "What does it say?")


def _padded(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and attention mask."""
    x = torch.full((len(ids), max(len(s) for s in ids)), pad, dtype=torch.long)
    att = torch.zeros_like(x)
    for k, s in enumerate(ids):
        x[k, :len(s)], att[k, :len(s)] = torch.tensor(s), 1
    return x, att


def clip_ids(ctok, text: str, max_length: int = 77) -> list[int]:
    """CLIP tokenisation as transformers' CLIPTokenizer(truncation=True, max_length=77): BOS text EOS."""
    ids = ctok.tok.encode(text.replace("<image>", "").strip(), add_special_tokens=False).ids
    return [ctok.bos_id] + ids[:max_length - 2] + [ctok.eos_id]


def lm_states(fed, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen base LM's fp32 states of the bare texts, (B, T, C) and the mask: the final hidden states, or
    the token embeddings with identity_layer="embedding"."""
    ids = [fed.tok.encode(t.replace("<image>", "").strip())[:fed.cfg.max_length] or [fed.tok.eos_id] for t in texts]
    x, att = _padded(ids, fed.tok.pad_id if fed.tok.pad_id is not None else 0)
    x, att = x.to(fed.device), att.to(fed.device)
    if fed.cfg.identity_layer == "embedding":
        return fed.model.lm.embed_tokens(x).float(), att.float()
    with fed.autocast():
        return fed.model.hidden_states(x, attention_mask=att).float(), att.float()


def _identity_chunk(fed, chunk) -> torch.Tensor:
    cfg, model = fed.cfg, fed.model
    if cfg.identity == "image":        # ablation: mean-pooled last-layer patch features
        px = fed.pixels(chunk)
        if px is None:
            raise ValueError("identity='image' needs images and an image processor")
        with fed.autocast():
            return model.vision(px)[-1].float().mean(1).cpu()
    if fed.text_encoder is not None:   # the paper's: CLIP text tower, pooled EOS state, unprojected
        tower, ctok = fed.text_encoder
        length = getattr(getattr(tower, "config", None), "max_position_embeddings", 77)
        x, att = _padded([clip_ids(ctok, ex.instruction, length) for ex in chunk],
                         ctok.pad_id if ctok.pad_id is not None else 0)
        dev = next(tower.parameters()).device
        return tower(x.to(dev), attention_mask=att.to(dev), project=False).float().cpu()
    if fed.has_lora:                   # fallback: the frozen base LM, adapters off
        lora.disable_lora(model)
    h, att = lm_states(fed, [ex.instruction for ex in chunk])                    # (B, T, C), (B, T)
    if cfg.identity_center:
        if fed.lm_reference is None:
            r, ra = lm_states(fed, REFERENCE_TEXTS)
            fed.lm_reference = r[ra.bool()].mean(0)                               # (C,)
        h = F.normalize(h - fed.lm_reference, dim=-1)
    return ((h * att[..., None]).sum(1) / att.sum(1, keepdim=True)).cpu()


@torch.no_grad()
def identity_features(fed, examples, batch_size: int = 32) -> torch.Tensor:
    """(N, D) float32 identity features of the examples' instructions (DISCO's task identity): the CLIP text
    tower's pooled output as in FCIT, the base LM's pooled states (fallback) or image features (ablation)."""
    was_training = fed.model.training
    fed.model.eval()
    try:
        out = [_identity_chunk(fed, examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    finally:
        fed.model.train(was_training)
    return torch.cat(out, 0) if out else torch.zeros(0)


# ----------------------------------------------------------------------------------------------------
# the engine


class Federation:
    """A server and its simulated clients running one method (cfg.method) on one model.

    Clients run one after the other on the same model: each starts from the global state (the method's LoRA
    subspace(s) and the projector), trains and uploads; the server aggregates. Under torchrun each rank trains
    the positions p = rank (mod world) and the uploads are all-gathered, so every rank holds the same state."""

    def __init__(self, model, tokenizer, image_processor, cfg: Config, text_encoder=None):
        self.model, self.tok, self.improc, self.cfg = model, tokenizer, image_processor, cfg
        self.text_encoder = text_encoder          # None or (model.CLIPTextTower, its Tokenizer)
        self.device = torch.device(cfg.device)
        if cfg.method not in METHODS:
            raise ValueError(f"unknown method {cfg.method!r}; expected one of {', '.join(METHODS)}")
        self.method = METHODS[cfg.method](self)
        self.K = self.method.num_subspaces()
        self.has_lora = self.method.has_lora
        for p in model.parameters():
            p.requires_grad_(False)
        if self.has_lora:     # a local generator: every rank builds identical adapters
            g = torch.Generator().manual_seed(int(cfg.seed))
            lora.apply_lora(model, cfg.rank, cfg.alpha, targets=tuple(cfg.lora_targets), num_subspaces=self.K,
                            init=cfg.lora_init, dropout=cfg.dropout, generator=g)
            self.method.setup(g)
        self.proj_names: list[str] = []
        proj = getattr(model, "projector", None)
        if self.has_lora and cfg.train_projector and proj is not None:
            if self.device.type == "cuda" and cfg.dtype in ("bfloat16", "float16"):
                proj.float()          # fp32 master weights for the trained projector; autocast casts on use
            self.proj_names = ["projector." + n for n, _ in proj.named_parameters()]
        self._params = dict(model.named_parameters())
        self.lora_names = list(lora.lora_state(model).keys()) if self.has_lora else []
        self.global_state = {n: self._params[n].detach().to("cpu", copy=True)
                             for n in self.lora_names + self.proj_names}
        self.opt = server.ServerOptimizer(cfg.aggregator, cfg.server_lr, cfg.server_momentum, cfg.beta1,
                                          cfg.beta2, cfg.tau_adaptive)
        self.last = None                          # (stage, round) of the last run_round
        self.rank, self.world = dist_info()
        self.lm_reference = None                  # the LM-identity centre, computed once
        self._collators: dict = {}

    # ---------------------------------------------------------------- names, weights, batches
    def slot_names(self, j: int) -> list[str]:
        return [n for n in self.lora_names if n.endswith((f".A.{j}", f".B.{j}"))]

    def _load(self, state: dict):
        with torch.no_grad():
            for n, t in state.items():
                self._params[n].copy_(t)

    def pixels(self, examples):
        if self.improc is None or not any(ex.image for ex in examples):
            return None
        if not all(ex.image for ex in examples):
            raise ValueError("a batch mixes examples with and without images; batch them separately")
        return self.improc([data.load_image(ex.image) for ex in examples]).to(self.device)

    def _collate(self, examples, with_answer=True):
        """A right-padded training batch (data.Collator) or, with_answer=False, a left-padded prompt batch."""
        key = bool(with_answer)
        if key not in self._collators:
            self._collators[key] = data.Collator(
                self.tok, self.improc, template=self.cfg.template,
                image_seq_len=getattr(self.model, "image_seq_len", 0) if self.improc is not None else 0,
                image_token_id=getattr(self.tok, "image_token_id", None),
                max_length=self.cfg.max_length if key else None,    # prompts are never cut (FCIT, Shepherd)
                train=key, train_on_inputs=self.cfg.train_on_inputs)
        return {k: (v.to(self.device) if v is not None else None) for k, v in self._collators[key](examples).items()}

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.dtype in ("bfloat16", "float16"):
            return torch.autocast("cuda", dtype=getattr(torch, self.cfg.dtype))
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- client side
    def _penalty(self, names, ref, slot):
        """FedProx μ/2‖w − w_global‖² (Li et al. 2020) plus the method's regulariser."""
        reg = self.method.penalty(names, slot)
        if self.cfg.aggregator == "fedprox" and self.cfg.prox_mu > 0:
            prox = self.cfg.prox_mu / 2 * sum(((self._params[n] - ref[n]) ** 2).sum() for n in names)
            reg = prox if reg is None else reg + prox
        return reg

    def _optimizer(self, names, n_examples):
        """A fresh AdamW (β=(0.9, 0.999), eps 1e-8, no weight decay) and schedule per client and round, as FCIT's
        per-client HF Trainer; warmup ceil(warmup_ratio · steps). Returns (optim, sched, epoch sizes, steps)."""
        cfg = self.cfg
        bs, acc = max(1, cfg.batch_size), max(1, cfg.grad_accum)
        whole, frac = divmod(float(self.method.local_epochs()), 1.0)   # a fraction: a prefix of the last epoch
        epochs = [n_examples] * int(whole) + ([max(1, round(frac * n_examples))] if frac > 1e-9 else [])
        steps = math.ceil(sum(math.ceil(sz / bs) for sz in epochs) / acc)
        warm = math.ceil(cfg.warmup_ratio * steps)
        proj = set(self.proj_names)
        groups = [{"params": [self._params[n] for n in names if n not in proj], "lr": cfg.lr},
                  {"params": [self._params[n] for n in names if n in proj],
                   "lr": cfg.lr if cfg.projector_lr is None else cfg.projector_lr}]
        optim = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_multiplier(s, steps, warm, cfg.lr_schedule))
        return optim, sched, epochs, steps

    def _train_loop(self, examples, names, slot, optim, sched, epochs, gen):
        """The local epochs: gradient accumulation, clipping, autocast (GradScaler for fp16). Returns (losses,
        the first non-finite loss or None)."""
        cfg, bs, acc = self.cfg, max(1, self.cfg.batch_size), max(1, self.cfg.grad_accum)
        params = [self._params[n] for n in names]
        ref = {n: self._params[n].detach().clone() for n in names} if cfg.aggregator == "fedprox" else None
        scaler = torch.amp.GradScaler("cuda") if (self.device.type == "cuda" and cfg.dtype == "float16") else None
        total_micro, micro, losses = sum(math.ceil(sz / bs) for sz in epochs), 0, []
        for size in epochs:
            perm = torch.randperm(len(examples), generator=gen).tolist()[:size]
            for b in range(math.ceil(size / bs)):
                batch = self._collate([examples[i] for i in perm[b * bs:(b + 1) * bs]])
                with self.autocast():
                    loss = self.model.loss(**batch)
                reg = self._penalty(names, ref, slot)
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

    def _local_train(self, examples, slot, stage, rnd, position, cid, start: dict | None = None) -> dict:
        """One client's local training of `slot` from the global state (or `start`); returns its upload."""
        cfg, model, t0 = self.cfg, self.model, time.perf_counter()
        self._load(self.global_state)
        if start is not None:
            self._load(start)
        names = self.configure(slot, True)
        optim, sched, epochs, steps = self._optimizer(names, len(examples))
        gc_before = getattr(model, "gradient_checkpointing", False)
        model.gradient_checkpointing = bool(cfg.gradient_checkpointing)
        model.train()
        try:
            with client_rng(self.device, cfg.seed, stage, rnd, position, cid) as gen:
                losses, bad = self._train_loop(examples, names, slot, optim, sched, epochs, gen)
                extra = self.method.after_local_train(examples, names, rnd) if bad is None else {}
        finally:
            model.gradient_checkpointing = gc_before
            model.eval()
            optim.zero_grad(set_to_none=True)
            for n in names:
                self._params[n].requires_grad_(False)
        state = {n: self._params[n].detach().to("cpu", copy=True) for n in self.method.trained(slot) + self.proj_names}
        loss = bad if bad is not None else (float(np.mean(losses)) if losses else float("nan"))
        return {"state": state, "loss": loss, "steps": steps, "time_s": time.perf_counter() - t0, "extra": extra,
                "trainable_params": sum(self._params[n].numel() for n in names)}

    def configure(self, slot, train: bool) -> list[str]:
        """LoRA modes for training `slot` (or for inference) and requires_grad; the names a client trains."""
        if not self.has_lora:
            return []
        self.method.configure(slot, train)
        for n in self.proj_names:
            self._params[n].requires_grad_(train)
        return self.method.trained(slot) + self.proj_names if train else []

    # ---------------------------------------------------------------- one communication round
    def run_round(self, stage: int, rnd: int, client_data: Callable, log: Callable | None = None) -> dict:
        """Round `rnd` of `stage` (both 0-based). client_data(position, client) -> [Example] gives a client's data
        (the position picks the task in Het-FCIT). Returns the round log: clients, per-client accounting,
        dropped clients with reasons and, for DISCO, the assignments and opened subspaces."""
        say, t0 = log or logger.info, time.perf_counter()
        rec = {"stage": stage, "round": rnd, "method": self.cfg.method, "aggregator": self.cfg.aggregator,
               "assignments": None, "opened": [], "active_subspaces": None}
        if not self.method.trains:
            self.last = (stage, rnd)
            return {**rec, "clients": [], "per_client": [], "skipped": f"{self.cfg.method}: no training"}
        sel = self.method.select(stage, rnd)
        mine = [p for p in range(len(sel)) if p % self.world == self.rank]
        datas = {p: list(self.method.client_data(client_data, p, sel[p]) or []) for p in mine}
        dropped = []
        slots = self.method.assign(stage, rnd, sel, datas, dropped, rec, say)
        uploads = gather_by_position({p: self._client(p, sel[p], datas[p], slots.get(p), stage, rnd) for p in mine})
        kept, bad = server.screen_clients(list(uploads.values()))
        dropped += [d for d in bad if not any(d["position"] == x["position"] for x in dropped)]
        for d in dropped:
            say(f"stage {stage + 1} round {rnd + 1}: client {d['client']} (position {d['position']}) excluded: "
                f"{d['reason']}")
        if kept:
            self.method.aggregate(stage, rnd, kept, rec, say)
        self._load(self.global_state)
        self.last = (stage, rnd)
        per = [self._account(p, u) for p, u in uploads.items()]
        n_tot = sum(u["n"] for u in kept)
        rec.update({"clients": [int(c) for c in sel], "per_client": per, "dropped": dropped,
                    "loss": (sum(u["loss"] * u["n"] for u in kept) / n_tot) if n_tot else None,
                    "samples": n_tot, "bytes_up": sum(x["bytes_up"] for x in per),
                    "bytes_down": sum(x["bytes_down"] for x in per), "time_s": time.perf_counter() - t0,
                    "world_size": self.world})
        return rec

    def _client(self, p, cid, examples, slot, stage, rnd) -> dict:
        """One client's part of the round; a client with data but no subspace is screened out as empty."""
        u = {"client": cid, "position": p, "n": len(examples), "rank": self.rank,
             "datasets": dict(Counter(ex.dataset for ex in examples))}
        if examples and slot is not None:
            u.update(self._local_train(examples, slot, stage, rnd, p, cid, start=self.method.start_state(cid)))
            u["slot"] = slot
        elif examples:
            u["n"] = 0
        return u

    def aggregate_uploads(self, kept: list[dict], say) -> bool:
        """FedAvg (or the server optimizer) of each subspace over the clients that trained it and of the projector
        over all; applied only when finite. Returns whether it was applied."""
        groups: dict[int, list] = {}
        for u in kept:
            groups.setdefault(u["slot"], []).append(u)
        new = {}
        for j, us in sorted(groups.items()):
            names = self.method.trained(j)
            new.update(server.aggregate({n: self.global_state[n] for n in names}, [u["state"] for u in us],
                                        [u["n"] for u in us], self.opt, self.cfg.lora_avg))
        if self.proj_names:
            new.update(server.aggregate({n: self.global_state[n] for n in self.proj_names},
                                        [u["state"] for u in kept], [u["n"] for u in kept], self.opt, "factors"))
        if not server.finite_state(new):
            say("aggregated update is not finite; global model kept")
            return False
        self.global_state.update(new)
        return True

    def _account(self, p, u) -> dict:
        """What a client sent and received: its upload, and the global tensors the method says it downloads."""
        up = down = 0
        if "state" in u:
            up = nbytes(u["state"]) + nbytes(u.get("extra") or {})
            names = self.method.downloads(u["slot"]) | set(self.proj_names)
            down = nbytes({n: self.global_state[n] for n in names}) + self.method.download_extra(names)
        row = {k: u.get(k) for k in ("client", "position", "rank", "n", "slot", "loss", "steps", "trainable_params",
                                     "time_s")} | {"bytes_up": up + self.method.upload_extra(p), "bytes_down": down}
        if row["loss"] is not None and not math.isfinite(row["loss"]):
            row["loss"] = None                           # strict JSON; the reason is in "dropped"
        return row

    # ---------------------------------------------------------------- stage boundary, inference, checkpoints
    def end_stage(self, stage: int) -> dict:
        """Close a stage: the method's consolidation; the server optimizer's state is reset unless
        server_state="carry"."""
        if self.cfg.server_state == "reset":
            self.opt.m, self.opt.v = {}, {}
        return {"stage": stage, **self.method.end_stage(stage)}

    @torch.no_grad()
    def predict(self, examples, batch_size: int = 8, client: int | None = None, distributed: bool = False) -> list[str]:
        """Greedy answers, stripped, in input order, with the method's inference-time routing (DISCO: one α per
        sample, fp32). distributed=True is a collective: rank r answers examples r, r+W, ..., all get all."""
        if distributed and self.world > 1:
            mine = list(range(self.rank, len(examples), self.world))
            part = self.predict([examples[i] for i in mine], batch_size, client) if mine else []
            out = [None] * len(examples)
            for r, ans in enumerate(all_gather(part)):
                for k, a in enumerate(ans):
                    out[r + k * self.world] = a
            return out
        if not examples:
            return []
        self._load(self.method.weights_for(client))
        alpha = self.method.prepare_inference(examples) if self.has_lora else None
        self.model.eval()
        out: list[str] = []
        for b in range(0, len(examples), batch_size):
            batch = self._collate(examples[b:b + batch_size], with_answer=False)
            if alpha is not None:
                lora.set_routing(self.model, alpha[b:b + batch_size])
            with self.autocast():
                gen = self.model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                          pixel_values=batch["pixel_values"], max_new_tokens=self.cfg.max_new_tokens,
                                          eos_token_id=self.tok.eos_id)
            out += [self.tok.decode(list(g), skip_special_tokens=True).strip() for g in gen]
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
        meta = {"version": 2, "method": self.cfg.method, "K": self.K, "last": list(self.last) if self.last else None,
                "method_state": mmeta}
        return t, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict):
        if meta.get("method") != self.cfg.method or meta.get("K") != self.K:
            raise ValueError(f"checkpoint is for method {meta.get('method')!r} with K={meta.get('K')}, "
                             f"this federation is {self.cfg.method!r} with K={self.K}")
        sub = lambda prefix: {k[len(prefix):]: v.clone() for k, v in tensors.items() if k.startswith(prefix)}
        g = sub("global/")
        missing = set(self.global_state) - set(g)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} global tensors, e.g. {sorted(missing)[:3]}")
        self.global_state = g
        self.opt.load_state_dict({"m": sub("opt.m/"), "v": sub("opt.v/")})
        self.method.load_state(sub("method/"), meta.get("method_state", {}))
        self.last = tuple(meta["last"]) if meta.get("last") else None
        self._load(self.global_state)


# ----------------------------------------------------------------------------------------------------
# the methods: Finetune defines every hook; each other unit overrides only where it differs


class Finetune:
    """One LoRA trained sequentially through the stages, FedAvg'ed each round (FCIT's Finetune row)."""
    has_lora, trains, continual = True, True, True

    def __init__(self, fed: Federation):
        self.fed, self.cfg = fed, fed.cfg

    def num_subspaces(self) -> int:
        return 1

    def setup(self, generator):
        """After the LoRA layers are built (MoELoRA adds its routers)."""

    def stages(self, n_stages: int) -> int:
        return n_stages

    def rounds(self) -> int:
        return self.cfg.rounds

    def local_epochs(self) -> float:
        return self.cfg.local_epochs

    def select(self, stage, rnd) -> list[int]:
        return server.sample_clients(self.cfg.clients, self.cfg.clients_per_round, self.cfg.seed, stage, rnd,
                                     self.cfg.client_sampling)

    def client_data(self, get, position, client):
        return get(position, client)

    def assign(self, stage, rnd, sel, datas, dropped, rec, say) -> dict[int, int]:
        """The subspace each position trains this round."""
        return {p: 0 for p in range(len(sel))}

    def trained(self, slot) -> list[str]:
        """The LoRA tensors a client of `slot` trains and uploads."""
        return self.fed.slot_names(slot)

    def downloads(self, slot) -> set[str]:
        """The LoRA tensors a client of `slot` needs from the server."""
        return set(self.trained(slot))

    def upload_extra(self, position) -> int:
        return 0

    def download_extra(self, names) -> int:
        return 0

    def configure(self, slot, train: bool):
        lora.set_active(self.fed.model, slot if train else None)

    def penalty(self, names, slot):
        return None

    def start_state(self, client):
        return None

    def after_local_train(self, examples, names, rnd) -> dict:
        """Extra tensors a client uploads after training, {name: tensor}."""
        return {}

    def aggregate(self, stage, rnd, kept, rec, say):
        if not self.fed.aggregate_uploads(kept, lambda s: say(f"stage {stage + 1} round {rnd + 1}: {s}")):
            rec["aggregation_skipped"] = "non-finite aggregate"

    def end_stage(self, stage) -> dict:
        return {}

    def eval_clients(self) -> list:
        return [None]

    def weights_for(self, client) -> dict:
        return self.fed.global_state

    def prepare_inference(self, examples):
        """Put the LoRA layers in inference mode; per-example routing weights, or None."""
        self.configure(None, False)
        return None

    def routing_accuracy(self, examples_by_task):
        return None

    def export(self):
        """(extra tensors, PEFT routing α or None) of the stage adapter, or None when there is nothing to save."""
        return {}, (torch.ones(self.fed.K) / self.fed.K if self.fed.K > 1 else None)

    def state(self) -> tuple[dict, dict]:
        return {}, {}

    def load_state(self, tensors: dict, meta: dict):
        pass


class FedIT(Finetune):
    """FedIT / Shepherd: one LoRA and the aggregator, in one stage (Zhang et al. 2023)."""


class ZeroShot(Finetune):
    """The base model, no training."""
    has_lora, trains = False, False

    def rounds(self):
        return 1

    def prepare_inference(self, examples):
        return None

    def export(self):
        return None


class MTL(Finetune):
    """The centralised upper bound: one joint training on every stage's pooled data, as one client for
    mtl_epochs (the federated methods' budget), evaluated once (Last only)."""
    continual = False

    def stages(self, n_stages):
        return 1

    def rounds(self):
        return 1

    def local_epochs(self):
        return self.cfg.mtl_epochs

    def select(self, stage, rnd):
        return [-1]

    def client_data(self, get, position, client):
        return get(None, None)


class Local(Finetune):
    """FedIT's local baseline: every client trains its own adapter alone; evaluation averages over clients."""

    def __init__(self, fed):
        super().__init__(fed)
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def start_state(self, client):
        return self.states.get(client)

    def aggregate(self, stage, rnd, kept, rec, say):
        for u in kept:
            self.states[u["client"]] = u["state"]

    def eval_clients(self):
        return sorted(self.states)

    def weights_for(self, client):
        if client is None:
            raise ValueError("method 'local' evaluates one client at a time: predict(..., client=id)")
        return self.states.get(client, self.fed.global_state)

    def export(self):
        return None

    def state(self):
        return {f"{c}/{n}": v for c, st in self.states.items() for n, v in st.items()}, {}

    def load_state(self, tensors, meta):
        self.states = {}
        for k, v in tensors.items():
            c, n = k.split("/", 1)
            self.states.setdefault(int(c), {})[n] = v


class EWC(Finetune):
    """Finetune + λ/2 Σ F (w − w*)² (Kirkpatrick et al. 2017): F the diagonal empirical Fisher of each stage's
    last round (per-sample gradients, sample-weighted over clients) summed over stages, w* the stage's end."""

    def __init__(self, fed):
        super().__init__(fed)
        self.F, self.star, self.stage_fisher, self._on_device = {}, {}, {}, None

    def penalty(self, names, slot):
        if not self.F or self.cfg.ewc_lambda <= 0:
            return None
        if self._on_device is None:
            self._on_device = {n: (self.F[n].to(self.fed.device), self.star[n].to(self.fed.device)) for n in self.F}
        p = self.fed._params
        return self.cfg.ewc_lambda / 2 * sum((f * (p[n] - w) ** 2).sum()
                                             for n, (f, w) in self._on_device.items() if n in names)

    def after_local_train(self, examples, names, rnd):
        return self.fisher(examples, names) if rnd == self.rounds() - 1 else {}

    def fisher(self, examples, names) -> dict[str, torch.Tensor]:
        """F = (1/N) Σ_i (∂ℓ_i/∂w)², ℓ_i the mean token loss of sample i alone, at the client's final weights,
        dropout off (an exact batch-of-1 loop; a batch-mean gradient would underestimate it)."""
        fed, model = self.fed, self.fed.model
        lora.set_active(model, 0)
        for n in names:
            fed._params[n].requires_grad_(True)
        out = {n: torch.zeros_like(fed._params[n], dtype=torch.float32) for n in names}
        model.eval()
        for ex in examples:
            model.zero_grad(set_to_none=True)
            with fed.autocast():
                loss = model.loss(**fed._collate([ex]))
            loss.float().backward()
            for n in names:
                if fed._params[n].grad is not None:
                    out[n] += fed._params[n].grad.detach().float() ** 2
        model.zero_grad(set_to_none=True)
        return {n: (f / max(1, len(examples))).cpu() for n, f in out.items()}

    def download_extra(self, names):
        return 2 * nbytes({n: t for n, t in self.F.items() if n in names})

    def aggregate(self, stage, rnd, kept, rec, say):
        super().aggregate(stage, rnd, kept, rec, say)
        with_f = [u for u in kept if u["extra"]]            # the stage's last round uploads a Fisher
        tot = sum(u["n"] for u in with_f)
        for u in with_f:
            for n, f in u["extra"].items():
                self.stage_fisher[n] = self.stage_fisher.get(n, 0) + f * (u["n"] / tot)

    def end_stage(self, stage):
        if not self.stage_fisher:
            return {}
        for n, f in self.stage_fisher.items():
            self.F[n] = self.F.get(n, torch.zeros_like(f)) + f
            self.star[n] = self.fed.global_state[n].clone().float()
        self.stage_fisher, self._on_device = {}, None
        return {"fisher_mean": float(torch.cat([f.flatten() for f in self.F.values()]).mean())}

    def state(self):
        t = {f"F/{n}": v for n, v in self.F.items()} | {f"star/{n}": v for n, v in self.star.items()}
        return t | {f"stage/{n}": v for n, v in self.stage_fisher.items()}, {}

    def load_state(self, tensors, meta):
        sub = lambda p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
        self.F, self.star, self.stage_fisher, self._on_device = sub("F/"), sub("star/"), sub("stage/"), None


class OLoRA(Finetune):
    """A new subspace per stage, trained with the frozen earlier ones in the forward pass and the penalty
    λ1 Σ |A_old A_newᵀ| (Wang et al. 2023); inference sums the subspaces used so far."""

    def __init__(self, fed):
        super().__init__(fed)
        self.stage_slot: dict[int, int] = {}

    def num_subspaces(self):
        return self.cfg.subspaces

    def slot(self, stage):
        if stage >= self.fed.K:
            raise server.CapacityError(f"O-LoRA opens one subspace per stage; stage {stage + 1} needs "
                                       f"{stage + 1} > K={self.fed.K} subspaces (raise --subspaces)")
        return stage

    def assign(self, stage, rnd, sel, datas, dropped, rec, say):
        return {p: self.slot(stage) for p in range(len(sel))}

    def downloads(self, slot):
        return set(self.trained(slot)).union(*[self.fed.slot_names(o) for o in range(slot)])

    def configure(self, slot, train):
        super().configure(slot, train)
        if slot and slot > 0:
            lora.set_routing(self.fed.model, torch.tensor([1.0] * (slot + 1) + [0.0] * (self.fed.K - slot - 1)))

    def penalty(self, names, slot):
        if slot == 0 or self.cfg.olora_lambda <= 0:
            return None
        return lora.olora_penalty(self.fed.model, slot, list(range(slot)), weight=self.cfg.olora_lambda)

    def end_stage(self, stage):
        self.stage_slot[stage] = self.slot(stage)
        return {}

    def prepare_inference(self, examples):
        last = {self.slot(self.fed.last[0])} if self.fed.last else set()
        used = set(self.stage_slot.values()) | last
        lora.set_routing(self.fed.model, torch.tensor([1.0 if j in used else 0.0 for j in range(self.fed.K)]))
        return None

    def state(self):
        return {}, {"stage_slot": {str(k): v for k, v in self.stage_slot.items()}}

    def load_state(self, tensors, meta):
        self.stage_slot = {int(k): v for k, v in meta.get("stage_slot", {}).items()}


class MoELoRA(Finetune):
    """CoIN's rank-split experts with a trainable token router; all experts and routers trained and averaged
    (Chen et al. 2024)."""

    def num_subspaces(self):
        return self.cfg.subspaces

    def setup(self, generator):
        lora.set_moe(self.fed.model, generator=generator)

    def trained(self, slot):
        return list(self.fed.lora_names)

    def configure(self, slot, train):
        lora.set_moe(self.fed.model, trainable=train)


class DISCO(Finetune):
    """DISCO (Guo et al. 2025). DKO: a client's identity token μ_k (its mean instruction feature) is matched
    against the global keys (cos ≥ τ); a miss opens a new subspace; each subspace is FedAvg'ed over its own
    clients and key_j ← (size_j·key_j + Σ n_k μ_k)/(size_j + Σ n_k). SSA: y = Wx + s Σ_j α_j B_j A_j x with
    α = softmax(cos(f(x), keys) / 0.05) per sample."""

    def __init__(self, fed):
        super().__init__(fed)
        self.keys: torch.Tensor | None = None                       # (K, D) identity keys
        self.sizes = torch.zeros(self.cfg.subspaces, dtype=torch.float64)   # samples behind each key
        self.mus: dict[int, tuple] = {}                             # this round: position -> (μ, n)
        self.pos_slot: dict = {}                                    # assign="round0": position -> subspace
        self.open_order: list[int] = []
        self.slot_data: dict[int, dict[str, float]] = {}            # subspace -> {dataset: samples trained}

    def num_subspaces(self):
        return self.cfg.subspaces

    def assign(self, stage, rnd, sel, datas, dropped, rec, say):
        """Identity tokens up, a subspace down, before training: the positions with no subspace yet are matched
        (round 0 of a stage with assign="round0", the official schedule; every round with "every_round")."""
        fed = self.fed
        local = {p: (identity_features(fed, datas[p], max(1, self.cfg.batch_size)).mean(0), len(datas[p]))
                 for p in datas if datas[p]}
        self.mus = gather_by_position(local)
        for p in [p for p in self.mus if not bool(torch.isfinite(self.mus[p][0]).all())]:
            dropped.append({"client": sel[p], "position": p, "reason": "non-finite identity feature"})
            del self.mus[p]
        if rnd == 0 or self.pos_slot.get("stage") != stage:
            self.pos_slot = {"stage": stage}
        slots = {p: self.pos_slot[str(p)] for p in self.mus if str(p) in self.pos_slot} \
            if self.cfg.assign == "round0" and rnd > 0 else {}
        pos = [p for p in self.mus if p not in slots]
        if pos:
            slots.update(self._match(pos, stage, rnd, rec, say))
        rec["assignments"] = {str(p): s for p, s in sorted(slots.items())}
        rec["active_subspaces"] = [j for j in range(self.fed.K) if float(self.sizes[j]) > 0]
        return dict(sorted(slots.items()))

    def _match(self, pos, stage, rnd, rec, say) -> dict[int, int]:
        mu = torch.stack([self.mus[p][0] for p in pos]).float()
        if self.keys is None:
            self.keys = torch.zeros(self.fed.K, mu.shape[1])
        info = {}
        asg, opened = server.organize(mu, [self.mus[p][1] for p in pos], self.keys, self.sizes, self.cfg.tau,
                                      self.cfg.small_client, self.cfg.on_full, info)
        if info.get("merged_on_full"):
            rec["merged_on_full"] = [dict(d, clients=[pos[i] for i in d["clients"]]) for d in info["merged_on_full"]]
            say(f"stage {stage + 1} round {rnd + 1}: no free subspace; positions joined the nearest: "
                f"{rec['merged_on_full']}")
        slots = dict(zip(pos, asg))
        for p in pos:
            self.pos_slot.setdefault(str(p), slots[p])
        for j in opened:
            old = [o for o in self.open_order if o != j]
            if self.cfg.orthogonal_subspaces and old:
                self._orthogonalize(j, old)
            say(f"stage {stage + 1} round {rnd + 1}: DISCO opened subspace {j} for positions "
                f"{[p for p in pos if slots[p] == j]}")
        rec["opened"] = opened
        return slots

    def upload_extra(self, position):
        return self.mus[position][0].numel() * 4 if position in self.mus else 0   # the identity token (fp32)

    def aggregate(self, stage, rnd, kept, rec, say):
        super().aggregate(stage, rnd, kept, rec, say)
        if "aggregation_skipped" not in rec:
            pos = [u["position"] for u in kept]
            server.update_keys(self.keys, self.sizes, [u["slot"] for u in kept],
                               torch.stack([self.mus[p][0] for p in pos]).float(), [self.mus[p][1] for p in pos])
            self.open_order += [j for j in rec["opened"] if float(self.sizes[j]) > 0 and j not in self.open_order]
            if self.cfg.orthogonal_subspaces:
                for j in sorted({u["slot"] for u in kept}):
                    old = self.open_order[:self.open_order.index(j)] if j in self.open_order else []
                    if old:
                        self._orthogonalize(j, old)
        for u in kept:
            sd = self.slot_data.setdefault(u["slot"], {})
            for ds, c in u["datasets"].items():
                sd[ds] = sd.get(ds, 0) + c
        rec["active_subspaces"] = [j for j in range(self.fed.K) if float(self.sizes[j]) > 0]

    def _orthogonalize(self, j: int, old: list[int]):
        """Hard-orthogonalise subspace j's A against the old subspaces' A, in the model and the global state."""
        fed = self.fed
        fed._load({n: fed.global_state[n] for n in fed.lora_names})
        lora.orthogonalize_subspace(fed.model, j, old)
        for n in fed.slot_names(j):
            fed.global_state[n] = fed._params[n].detach().to("cpu", copy=True)

    def end_stage(self, stage):
        return {"keys_used": [j for j in range(self.fed.K) if float(self.sizes[j]) > 0],
                "slot_data": {str(k): v for k, v in self.slot_data.items()}}

    def routing_weights(self, features: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """SSA weights α (B, K) in fp32 over the used subspaces; empty ones get exactly 0 (the official code
        gives them an e⁰ share). Ablations: argmax | concat | cosine."""
        if self.keys is None:
            return torch.zeros(features.shape[0], self.fed.K)
        return lora.route(features, self.keys, mode or self.cfg.routing, self.cfg.temperature, valid=self.sizes > 0)

    def prepare_inference(self, examples):
        return self.routing_weights(identity_features(self.fed, examples, batch_size=32))

    def routing_accuracy(self, examples_by_task: dict) -> float | None:
        """The fraction of test examples whose argmax α is the subspace that trained most of their dataset."""
        if self.keys is None or not self.slot_data:
            return None
        owner = {}
        for j, d in self.slot_data.items():
            for ds, c in d.items():
                if c > owner.get(ds, (-1, 0))[1]:
                    owner[ds] = (j, c)
        hit = tot = 0
        self.per_task = {}
        for task, exs in examples_by_task.items():
            exs = [e for e in exs if e.dataset in owner]
            if exs:
                got = self.routing_weights(identity_features(self.fed, exs), mode="softmax").argmax(-1).tolist()
                h = sum(int(g == owner[e.dataset][0]) for g, e in zip(got, exs))
                self.per_task[str(task)] = h / len(exs)
                hit, tot = hit + h, tot + len(exs)
        return hit / tot if tot else None

    def export(self):
        extra = {} if self.keys is None else {"identity_keys": self.keys, "identity_sizes": self.sizes.float()}
        used = (self.sizes > 0).float()
        return extra, (used / used.sum().clamp(min=1) if self.fed.K > 1 else None)

    def state(self):
        t = {"sizes": self.sizes} | ({"keys": self.keys} if self.keys is not None else {})
        return t, {"open_order": self.open_order, "pos_slot": self.pos_slot,
                   "slot_data": {str(k): v for k, v in self.slot_data.items()}}

    def load_state(self, tensors, meta):
        self.keys = tensors["keys"].clone() if "keys" in tensors else None
        self.sizes = tensors["sizes"].clone().double()
        self.open_order = list(meta.get("open_order", []))
        self.pos_slot = dict(meta.get("pos_slot", {}))
        self.slot_data = {int(k): v for k, v in meta.get("slot_data", {}).items()}


METHODS = {"finetune": Finetune, "fedit": FedIT, "zeroshot": ZeroShot, "mtl": MTL, "local": Local, "ewc": EWC,
           "olora": OLoRA, "moelora": MoELoRA, "disco": DISCO}
