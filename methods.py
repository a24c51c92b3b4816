"""The method protocol and the baseline methods. A method is a unit of hooks that the engine (federate.Federation)
calls; Finetune defines every hook, and each other method overrides only where it differs. What crosses the boundary
is typed: the engine hands a method a `Round`; `assign` answers with an `Assignment`, `job` with a `Job`; clients send
a server.Upload. What a method is and how long it trains are data (class attributes and a `Schedule`), not hooks.
DISCO, the paper's method, is in disco.py, built on Finetune; federate.METHODS lists them all.

The 13 hooks, in the order a run calls them:
  a round     assign, weights_for, job, configure, after_local_train, aggregate
  a stage     end_stage
  inference   (weights_for,) prepare_inference, routing_accuracy
  saving      export, restore, state, load_state
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

import data
import lora
from server import Upload

NOT_FINITE = "the aggregated update is not finite: the global model is left unchanged"


class CapacityError(RuntimeError):
    """A method needs more LoRA subspaces than the model has (O-LoRA: one per stage; DISCO: one per task). The official
    code crashes with an index error or silently drops keys; we stop with this message instead."""


@dataclass(frozen=True)
class Schedule:
    """How a method trains: `rounds` per stage and `local_epochs` per client and round. joint (MTL): one stage, in
    which each client holds its share of every stage's data pooled (Last only)."""
    rounds: int
    local_epochs: float
    joint: bool = False

    def stages(self, n_stages: int) -> int:
        """The stages it trains of a benchmark of n_stages."""
        return 1 if self.joint else n_stages


@dataclass
class Round:
    """One communication round as the engine hands it to a method: clients[p] is the client at position p (in
    Het-FCIT the position picks the task), data[p] its examples, for the positions this rank trains."""
    stage: int
    rnd: int
    clients: list[int]
    data: dict[int, list]
    log: Callable[[str], None]

    def say(self, msg: str):
        self.log(f"stage {self.stage + 1} round {self.rnd + 1}: {msg}")


@dataclass
class Assignment:
    """`assign`'s answer: the subspace each position trains; the positions it excludes, with the reason; the bytes a
    position sent to be assigned (DISCO's identity token); entries for the round log."""
    slots: dict[int, int]
    dropped: dict[int, str] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    log: dict = field(default_factory=dict)


@dataclass
class Job:
    """`job`'s answer: the LoRA tensors a client of one subspace trains, those it uploads for the server to aggregate
    (the rest stay on the client: FedSA's B), and the tensors it downloads (with the projector, for bytes_down)."""
    trained: list[str]
    shared: list[str]
    downloads: dict[str, torch.Tensor]


def tally(counts: dict[str, int], more: dict[str, int]):
    """counts += more, per dataset, in place."""
    for ds, c in more.items():
        counts[ds] = counts.get(ds, 0) + c


class Finetune:
    """One LoRA trained sequentially through the stages, FedAvg'ed each round (FCIT's Finetune row)."""
    trains = True                 # False: the base model only, no adapters and no rounds (ZeroShot)
    subspaces = False             # K = cfg.subspaces LoRA subspaces per layer, else one
    router = False                # a token-level router per layer (MoELoRA)
    releases_identity = False     # uploads an identity token (DISCO), noised under DP
    releases_updates = True       # the server aggregates the clients' updates: DP-noised and accounted under --dp-clip
    scores_own_tasks = False      # a client's personalized model is scored only on the tasks its data holds (FedSA)

    def __init__(self, fed):
        self.fed, self.cfg = fed, fed.cfg
        self.schedule = Schedule(fed.cfg.rounds, fed.cfg.local_epochs)
        self.personal: dict[int, dict[str, int]] = {}   # personalized methods: {client: {dataset: samples trained}}

    # ---- a round
    def assign(self, ctx: Round) -> Assignment:
        """The subspace each position trains this round."""
        return Assignment({p: 0 for p in range(len(ctx.clients))})

    def weights_for(self, client: int | None) -> dict[str, torch.Tensor]:
        """The weights a client trains from and is evaluated with (None: the global model)."""
        return self.fed.global_state

    def job(self, slot: int) -> Job:
        """What a client of subspace `slot` trains, uploads and downloads."""
        names = self.fed.slot_names(slot)
        return Job(names, names, {n: self.fed.global_state[n] for n in names})

    def configure(self, slot: int) -> Callable[[], torch.Tensor] | None:
        """Set the LoRA layers to train `slot`; return the method's regulariser of the client's loss, or None."""
        lora.set_active(self.fed.model, slot)
        return None

    def after_local_train(self, examples, names: list[str], rnd: int) -> dict[str, torch.Tensor]:
        """Extra tensors a client uploads after its training."""
        return {}

    def aggregate(self, ctx: Round, kept: list[Upload]) -> dict:
        """The server's update from the screened uploads; returns entries for the round log. Every client trained
        the same subspace: FedAvg of it and of the projector over all of them."""
        if self.fed.aggregate([(self.job(kept[0].slot).shared, kept), (self.fed.proj_names, kept)]):
            return {}
        return {"aggregation_skipped": NOT_FINITE}

    # ---- a stage
    def end_stage(self, stage: int) -> dict:
        """Consolidate at the end of a stage; returns what to log."""
        return {}

    # ---- inference (from weights_for(client))
    def prepare_inference(self, examples) -> torch.Tensor | None:
        """Put the LoRA layers in inference mode; per-example routing weights (B, K), or None."""
        lora.set_active(self.fed.model, None)
        return None

    def routing_accuracy(self, examples_by_task: dict) -> float | None:
        """How often inference routes a test example to the subspace that learned its task (None: no routing)."""
        return None

    # ---- saving
    def export(self) -> tuple[dict, torch.Tensor | None] | None:
        """(extra tensors, PEFT routing α or None) of the stage adapter, or None when there is nothing to save."""
        return {}, (torch.ones(self.fed.K) / self.fed.K if self.fed.K > 1 else None)

    def restore(self, extra: dict, meta: dict):
        """What inference needs from a saved stage adapter (`export`'s extra tensors and its metadata)."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON metadata) to resume exactly after a round."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict):
        pass


class FedIT(Finetune):
    """FedIT / Shepherd: one LoRA and the aggregator, in one stage (Zhang et al. 2023)."""


class ZeroShot(Finetune):
    """The base model, no training."""
    trains = False

    def __init__(self, fed):
        super().__init__(fed)
        self.schedule = replace(self.schedule, rounds=1)


class MTL(Finetune):
    """The multi-task upper bound as the official code trains it (fcit_type 'multask', whose model
    multi_task/multask_llava_lora_ours/llava_lora_finetune_epoch_9 the eval scripts default to): one federated stage
    of the usual rounds and client draws, each client holding its Dirichlet(β) share of every stage's training data
    pooled (process_data.py's FCIT_multi_task_data_path partitioned as one task), evaluated once (Last only)."""

    def __init__(self, fed):
        super().__init__(fed)
        self.schedule = replace(self.schedule, joint=True)

    @staticmethod
    def partition(n_items: int, cfg) -> list[list[int]]:
        """Each client's indices into the pooled data: FCIT's quantity skew over cfg.clients, seeded (seed·1000 + 999,
        apart from data.make_partitions' per-task seed·1000 + k)."""
        return data.dirichlet_partition(n_items, cfg.clients, cfg.beta, seed=cfg.seed * 1000 + 999)


class Local(Finetune):
    """FedIT's local baseline: every client trains its own adapter alone; evaluation averages over clients, and
    each client's adapter is also scored on the tasks it trained on."""
    releases_updates = False      # nothing leaves a client: no noise, no ε

    def __init__(self, fed):
        super().__init__(fed)
        self.states: dict[int, dict[str, torch.Tensor]] = {}          # client -> the tensors it keeps

    def keep(self, u: Upload, state: dict[str, torch.Tensor]):
        """Client u keeps `state` (its own tensors) and counts the datasets it has trained on."""
        self.states[u.client] = state
        tally(self.personal.setdefault(u.client, {}), u.datasets)

    def aggregate(self, ctx, kept):
        for u in kept:
            self.keep(u, u.state)
        return {}

    def weights_for(self, client):
        if client is None:
            raise ValueError("method 'local' evaluates one client at a time: predict(..., client=id)")
        return {**self.fed.global_state, **self.states.get(client, {})}

    def export(self):
        return None

    def state(self):
        return ({f"{c}/{n}": v for c, st in self.states.items() for n, v in st.items()},
                {"personal": {str(c): d for c, d in self.personal.items()}})

    def load_state(self, tensors, meta):
        self.states = {}
        self.personal = {int(c): dict(d) for c, d in meta["personal"].items()}
        for k, v in tensors.items():
            c, n = k.split("/", 1)
            self.states.setdefault(int(c), {})[n] = v


class FedSA(Local):
    """FedSA-LoRA (Guo et al., ICLR 2025): A is shared and FedAvg'ed, B stays on its client (personalization);
    a client trains from the global A and its own B. As its code (FederatedScope, make_global_eval off) evaluates,
    each client's model (global A + own B) is scored on its own data's tasks only: a task's score is the mean over
    the clients holding it."""
    releases_updates = True       # A is aggregated
    scores_own_tasks = True

    def job(self, slot):
        names = self.fed.slot_names(slot)
        shared = [n for n in names if ".A." in n]
        return Job(names, shared, {n: self.fed.global_state[n] for n in shared})

    def aggregate(self, ctx, kept):
        log = Finetune.aggregate(self, ctx, kept)
        for u in kept:
            self.keep(u, u.local)
        return log

    def export(self):
        """The adapter: global A and the clients' sample-weighted mean B (the one model PEFT's copy can hold); extra:
        each client's B ('B/<client>/<name>') and trained datasets ('personal/<client>/<dataset>': samples). None
        under --dp-clip: the B stay on their clients, un-noised."""
        if self.cfg.dp_clip:
            return None
        n = {c: sum(d.values()) for c, d in self.personal.items()}
        mean_b = {name: sum(st[name] * (n[c] / sum(n.values())) for c, st in self.states.items())
                  for name in next(iter(self.states.values()), {})}
        self.fed.load({**self.fed.global_state, **mean_b})
        extra = {f"B/{c}/{name}": v for c, st in self.states.items() for name, v in st.items()}
        extra |= {f"personal/{c}/{ds}": torch.tensor(k) for c, d in self.personal.items() for ds, k in d.items()}
        return extra, None

    def restore(self, extra, meta):
        self.states, self.personal = {}, {}
        for key, v in extra.items():
            kind, c, rest = (key.split("/", 2) + [None, None])[:3]
            if kind == "B":
                self.states.setdefault(int(c), {})[rest] = v
            elif kind == "personal":
                self.personal.setdefault(int(c), {})[rest] = int(v)


def normalised(F: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """F / mean(F) over every entry of every tensor: mean 1, the same for F and c·F (None when F is all zero)."""
    mean = sum(float(f.double().sum()) for f in F.values()) / max(1, sum(f.numel() for f in F.values()))
    return {n: f / mean for n, f in F.items()} if mean > 0 else None


class EWC(Finetune):
    """Finetune + λ/2 Σ F̂ (w − w*)² (Kirkpatrick et al. 2017): F the diagonal empirical Fisher of each stage's
    last round (per-sample gradients, sample-weighted over clients) summed over stages, w* the stage's end, and
    F̂ = F / mean(F), scale-free as Cossu et al. 2021 normalise it (ContinualLearning_RecurrentNetworks,
    clutils/strategies/utils.py; we divide by the mean, not min-max): λ is the weight of an L2 anchor on a weight of
    average importance, whatever the model's or the loss's scale."""

    def __init__(self, fed):
        super().__init__(fed)
        self.F, self.star, self.stage_fisher = {}, {}, {}

    def job(self, slot):
        j = super().job(slot)     # a client also downloads F and w* (the projector's too)
        return replace(j, downloads=j.downloads | {f"F/{n}": f for n, f in self.F.items()}
                       | {f"star/{n}": w for n, w in self.star.items()})

    def configure(self, slot):
        super().configure(slot)
        if not self.F or self.cfg.ewc_lambda <= 0:
            return None
        p, dev, F = self.fed.params, self.fed.device, normalised(self.F)
        if F is None:
            return None
        anchor = {n: (F[n].to(dev), self.star[n].to(dev)) for n in F}
        return lambda: self.cfg.ewc_lambda / 2 * sum((f * (p[n] - w) ** 2).sum() for n, (f, w) in anchor.items())

    def after_local_train(self, examples, names, rnd):
        return self.fisher(examples, names) if rnd == self.schedule.rounds - 1 else {}

    def fisher(self, examples, names) -> dict[str, torch.Tensor]:
        """F = (1/N) Σ_i (∂ℓ_i/∂w)², ℓ_i the mean token loss of sample i alone, at the client's final weights,
        dropout off (an exact batch-of-1 loop; a batch-mean gradient would underestimate it)."""
        fed, model, p = self.fed, self.fed.model, self.fed.params
        lora.set_active(model, 0)
        for n in names:
            p[n].requires_grad_(True)
        out = {n: torch.zeros_like(p[n], dtype=torch.float32) for n in names}
        model.eval()
        for ex in examples:
            model.zero_grad(set_to_none=True)
            with fed.autocast():
                loss = model.loss(**fed.batch([ex]))
            loss.float().backward()
            for n in names:
                if p[n].grad is not None:
                    out[n] += p[n].grad.detach().float() ** 2
        model.zero_grad(set_to_none=True)
        return {n: (f / max(1, len(examples))).cpu() for n, f in out.items()}

    def aggregate(self, ctx, kept):
        log = super().aggregate(ctx, kept)
        with_f = [u for u in kept if u.extra]            # the stage's last round uploads a Fisher
        tot = sum(u.n for u in with_f)
        for u in with_f:
            for n, f in u.extra.items():
                self.stage_fisher[n] = self.stage_fisher.get(n, 0) + f * (u.n / tot)
        return log

    def end_stage(self, stage):
        if not self.stage_fisher:
            return {}
        for n, f in self.stage_fisher.items():
            self.F[n] = self.F.get(n, torch.zeros_like(f)) + f
            self.star[n] = self.fed.global_state[n].clone().float()
        self.stage_fisher = {}
        return {"fisher_mean": float(torch.cat([f.flatten() for f in self.F.values()]).mean())}

    def state(self):
        t = {f"F/{n}": v for n, v in self.F.items()} | {f"star/{n}": v for n, v in self.star.items()}
        return t | {f"stage/{n}": v for n, v in self.stage_fisher.items()}, {}

    def load_state(self, tensors, meta):
        sub = lambda p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
        self.F, self.star, self.stage_fisher = sub("F/"), sub("star/"), sub("stage/")


class OLoRA(Finetune):
    """A new subspace per stage, trained with the frozen earlier ones in the forward pass and the penalty
    λ1 Σ |A_old A_newᵀ| (Wang et al. 2023); inference sums the subspaces used so far."""
    subspaces = True

    def assign(self, ctx):
        if ctx.stage >= self.fed.K:
            raise CapacityError(f"O-LoRA opens one subspace per stage; stage {ctx.stage + 1} needs "
                                f"{ctx.stage + 1} > K={self.fed.K} subspaces (raise --subspaces)")
        return Assignment({p: ctx.stage for p in range(len(ctx.clients))})

    def job(self, slot):
        j = super().job(slot)     # the frozen old subspaces are in the client's forward pass
        old = [n for o in range(slot) for n in self.fed.slot_names(o)]
        return replace(j, downloads=j.downloads | {n: self.fed.global_state[n] for n in old})

    def configure(self, slot):
        super().configure(slot)
        if slot == 0:
            return None
        lora.set_routing(self.fed.model, torch.tensor([1.0] * (slot + 1) + [0.0] * (self.fed.K - slot - 1)))
        if self.cfg.olora_lambda <= 0:
            return None
        return lambda: lora.olora_penalty(self.fed.model, slot, list(range(slot)), weight=self.cfg.olora_lambda)

    def prepare_inference(self, examples):
        used = self.fed.last[0] + 1 if self.fed.last else 0          # stage s trained subspace s
        lora.set_routing(self.fed.model, torch.tensor([1.0 if j < used else 0.0 for j in range(self.fed.K)]))
        return None


class MoELoRA(Finetune):
    """CoIN's rank-split experts with a trainable token router; all experts and routers trained and averaged
    (Chen et al. 2024)."""
    subspaces, router = True, True

    def job(self, slot):
        names = list(self.fed.lora_names)
        return Job(names, names, {n: self.fed.global_state[n] for n in names})

    def configure(self, slot):
        lora.set_moe(self.fed.model, trainable=True)
        return None

    def prepare_inference(self, examples):
        lora.set_moe(self.fed.model, trainable=False)
        return None
