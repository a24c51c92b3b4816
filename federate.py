"""Federated training engine: clients, server aggregation, DISCO and the continual baselines.

One engine runs every method of FCIT (Guo et al., ICCV 2025, arXiv 2503.12897) and FedIT (Zhang et al.,
"Towards Building the Federated GPT", arXiv 2305.05644):

    disco     dynamic knowledge organisation (DKO: identity keys, one LoRA subspace per task cluster) and
              subspace selective activation at inference (SSA)
    finetune  one LoRA trained sequentially over the stages (FCIT's "Finetune" row)
    ewc       finetune + diagonal-Fisher penalty (Kirkpatrick et al. 2017), Fisher from the clients' data
    olora     a new subspace per stage + O-LoRA orthogonality penalty (Wang et al. 2023)
    moelora   CoIN's rank-split experts with a trainable token router (Chen et al. 2024)
    zeroshot  the base model, no training
    mtl       one centralised joint training on every stage's pooled data (upper bound), one "client"
    fedit     FedIT / Shepherd: one LoRA + the aggregator, single stage
    local     every client trains alone (FedIT's local baseline); evaluation averages over clients

Any aggregator works with any method: FedAvg, FedProx (Li et al. 2020), FedAvgM (Hsu et al. 2019) and the
adaptive server optimisers FedAdagrad / FedAdam / FedYogi (Reddi et al., ICLR 2021, Algorithm 2).

A round (Federation.run_round): sample the clients; DISCO only: every client uploads its identity token (the
mean frozen-encoder feature of its instructions) and the server assigns it a subspace against the global keys
(organize); each client trains from the global state; screen_clients drops empty or non-finite clients; the
server aggregates each subspace over its clients and the projector over all (aggregate), then updates the keys
(update_keys). Inference: predict, with SSA routing per sample for DISCO. Under torchrun the clients of a round
are split over ranks. Where we differ from the official code, the README's table says what and why.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import time
from collections import Counter as _count
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import data
import lora

logger = logging.getLogger("fcit.federate")

METHODS = ("disco", "finetune", "ewc", "olora", "moelora", "zeroshot", "mtl", "fedit", "local")
AGGREGATORS = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi")


class CapacityError(RuntimeError):
    """More task clusters arrived than the model has LoRA subspaces (the official code crashes with an
    index error or silently drops keys; we stop with this message instead)."""


# ----------------------------------------------------------------------------------------------------
# configuration


@dataclass
class FedConfig:
    """Everything the engine needs. The paper's values in comments; fcit.py fills them per setting."""
    method: str = "disco"
    aggregator: str = "fedavg"
    n_clients: int = 50                  # FCIT: --num_clients 50
    clients_per_round: int = 5           # FCIT: int(50 * 0.1)
    rounds: int = 10                     # rounds per stage
    local_epochs: float = 1              # a fraction trains on a seeded prefix of the last epoch (mtl budgets)
    lr: float = 2e-4                     # AdamW, weight decay 0
    batch_size: int = 32                 # per optimizer micro-step
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.03           # warmup = ceil(0.03 * steps), restarted per client/round
    lr_schedule: str = "cosine"          # cosine (FCIT's HF Trainer) | linear (HF Trainer default, Shepherd)
    client_sampling: str = "seeded"      # seeded: local RNG keyed by (seed, stage, round) | official: FCIT's and
                                         # Shepherd's np.random.seed(stage*10 + round) draw, on a local RandomState
    server_state: str = "reset"          # server-optimizer state (m, v) at a stage boundary: reset | carry
    lora_init: str = "fcit"              # fcit: A ~ N(0, 0.01^2) | peft: kaiming-uniform A (PEFT's default); B = 0
    rank: int = 64                       # TOTAL LoRA rank, split into num_subspaces blocks
    alpha: float = 128.0                 # scaling alpha / rank = 2
    num_subspaces: int = 8               # K
    dropout: float = 0.05
    tau: float = 0.9                     # DISCO matching threshold
    temperature: float = 0.05            # SSA softmax temperature
    small_client: float = 1e-3           # small-client share (official code)
    on_full: str = "error"               # DISCO with no free subspace: error | nearest (official client rule)
    assign: str = "round0"               # DISCO: round0 = match in round 0 of a stage, later rounds reuse the
                                         # position's subspace (official schedule; robust to noisy
                                         # identities) | every_round = match every client of every round
    routing: str = "softmax"             # SSA ablations: softmax | argmax | concat | cosine
    identity: str = "text"               # text (CLIP text tower or base LM) | image (ablation)
    identity_center: bool = False        # base-LM fallback only: centre tokens on REFERENCE_TEXTS' mean, normalise
    identity_layer: str = "last"         # base-LM fallback only: pool the final hidden states ("last") or the
                                         # input embeddings, hidden state 0 ("embedding": a bag of token embeddings)
    orthogonal_subspaces: bool = False   # DISCO option: hard-orthogonalise a new subspace against the old ones
    lora_avg: str = "factors"            # factors (A, B averaged separately; FCIT/Shepherd) | product (SVD of ΣwBA)
    prox_mu: float = 0.01                # FedProx μ
    server_lr: float | None = None       # η; None -> 1 − server_momentum (fedavgm), 1e-3 (adaptive, as OpenFedLLM)
    server_momentum: float = 0.9         # FedAvgM β
    beta1: float = 0.9                   # FedAdam/FedYogi/FedAdagrad β1 (Reddi et al. 2021, §3)
    beta2: float = 0.99                  # FedAdam/FedYogi β2
    tau_adaptive: float = 1e-3           # Reddi et al. τ (adaptivity, v_{-1} = τ²)
    ewc_lambda: float = 1e6              # EWC λ, from a sweep on the toy A→B tasks: the per-sample empirical Fisher
                                         # of a well-fit task is tiny (~1e-6); rescale for other models (README)
    olora_lambda: float = 0.5            # O-LoRA λ1 (cmnfriend/O-LoRA scripts)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"               # autocast dtype on GPU: bfloat16 | float16 | float32
    max_new_tokens: int = 128
    template: str = "vicuna_v1"
    max_length: int = 2048
    gradient_checkpointing: bool = False
    lora_targets: tuple = ("gate_proj", "up_proj", "down_proj")   # FCIT: the MLP only
    train_projector: bool = True         # FCIT trains and averages mm_projector
    projector_lr: float | None = None    # None: lr, which produced the paper's numbers (FCIT's scripts pass
                                         # mm_projector_lr 2e-5, but its optimizer has no projector group)
    train_on_inputs: bool = False        # supervise the prompt too (Shepherd's default for FedIT)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; choose from {AGGREGATORS}")
        if self.lora_avg not in ("factors", "product"):
            raise ValueError("lora_avg must be 'factors' or 'product'")
        if self.lora_avg == "product" and self.aggregator not in ("fedavg", "fedprox"):
            raise ValueError("lora_avg='product' re-factorises ΣwBA by SVD, which changes the basis of A and B "
                             "every round; a server optimizer state (m, v) over A/B is meaningless across such "
                             "re-factorisations, so it is only offered with fedavg/fedprox")
        if self.routing not in ("softmax", "argmax", "concat", "cosine"):
            raise ValueError(f"unknown routing {self.routing!r}")
        if self.assign not in ("every_round", "round0"):
            raise ValueError("assign must be 'every_round' or 'round0'")
        if self.on_full not in ("error", "nearest"):
            raise ValueError("on_full must be 'error' or 'nearest'")
        if self.identity not in ("text", "image"):
            raise ValueError(f"unknown identity {self.identity!r}")
        if self.identity_layer not in ("last", "embedding"):
            raise ValueError(f"unknown identity_layer {self.identity_layer!r}; expected 'last' or 'embedding'")
        if self.clients_per_round > self.n_clients:
            raise ValueError("clients_per_round > n_clients")
        for name, allowed in (("lr_schedule", ("cosine", "linear")), ("client_sampling", ("seeded", "official")),
                              ("server_state", ("reset", "carry")), ("lora_init", ("fcit", "peft"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        if not self.local_epochs > 0:
            raise ValueError(f"local_epochs must be > 0, not {self.local_epochs}")


# ----------------------------------------------------------------------------------------------------
# client sampling


def sample_clients(n_clients: int, per_round: int, seed: int, stage: int, rnd: int,
                   scheme: str = "seeded") -> list[int]:
    """Uniform sampling without replacement; the order is the position (Het-FCIT maps positions to tasks).

    official: the draw of FCIT's and Shepherd's code, np.random.seed(stage*10 + round) then choice, made on a
    local RandomState (same numbers, global RNG untouched; independent of `seed`, and repeating for stages
    with more than 10 rounds, as the original does). seeded: a local generator keyed by (seed, stage, round)."""
    if not 0 < per_round <= n_clients:
        raise ValueError(f"need 0 < clients_per_round ({per_round}) <= n_clients ({n_clients})")
    if scheme == "official":
        rng = np.random.RandomState(int(stage) * 10 + int(rnd))
    elif scheme == "seeded":
        rng = np.random.default_rng([int(seed), int(stage), int(rnd)])
    else:
        raise ValueError(f"client sampling scheme {scheme!r}; expected 'seeded' or 'official'")
    return [int(c) for c in rng.choice(n_clients, size=per_round, replace=False)]


# ----------------------------------------------------------------------------------------------------
# server aggregation (FedAvg / FedProx / Reddi et al. 2021)


def finite_state(state: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def _weights(n: list[float]) -> list[float]:
    tot = float(sum(n))
    if tot <= 0:
        raise ValueError("aggregation needs a positive total weight")
    return [float(x) / tot for x in n]


class ServerOptimizer:
    """Server-side update rule applied to the pseudo-gradient Δ = Σ_k p_k (w_k − x), p_k = n_k / Σ n.

    fedavg / fedprox   x ← Σ p_k w_k (= x + Δ).                 FedProx differs only on the client (prox term).
    fedavgm            m ← β m + Δ ;  x ← x + η m              (Hsu et al. 2019; Reddi et al. 2021 "FedAvgM")
    fedadagrad         m ← β1 m + (1−β1) Δ ; v ← v + Δ²                               } x ← x + η m / (√v + τ)
    fedadam            m ← β1 m + (1−β1) Δ ; v ← β2 v + (1−β2) Δ²                     } Reddi et al. 2021,
    fedyogi            m ← β1 m + (1−β1) Δ ; v ← v − (1−β2) Δ² sign(v − Δ²)           } Algorithm 2, v_{-1}=τ²

    Default η: 1 − β for FedAvgM (steady-state step equal to FedAvg's) and 1e-3 for the adaptive ones (OpenFedLLM's
    default): their first step moves every coordinate by about ±η whatever |Δ| is, and LoRA factors live at the
    1e-2 scale (A ~ N(0, 0.01²)), so η = 1e-1 wipes a subspace out (measured on the toy tasks of the tests).
    Written from the paper, not from OpenFedLLM, which uses an EMA for FedAvgM, updates v from
    m² instead of Δ² and starts v at τ². We also start v at τ² (the paper's v_{-1} ≥ τ²). No bias correction
    (the paper has none). Reddi et al. weight clients uniformly; we use the sample-count weights FedAvg uses,
    so every aggregator sees the same Δ. State is per parameter name (per subspace for DISCO) and float32.
    """

    def __init__(self, kind: str, lr: float | None = None, momentum: float = 0.9, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3):
        if kind not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {kind!r}")
        self.kind = kind
        if lr is None:      # FedAvgM: η = 1 − β keeps the steady-state step Δ/(1 − β)·η equal to FedAvg's
            lr = 1.0 if kind in ("fedavg", "fedprox") else (1.0 - momentum if kind == "fedavgm" else 1e-3)
        self.lr = lr
        self.momentum, self.beta1, self.beta2, self.tau = momentum, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """One server step for parameter `name` at global value x with pseudo-gradient delta; returns new x."""
        x32, d = x.float(), delta.float()
        k = self.kind
        if k in ("fedavg", "fedprox"):
            out = x32 + d
        elif k == "fedavgm":
            m = self.m.get(name)
            m = d.clone() if m is None else self.momentum * m + d
            self.m[name] = m
            out = x32 + self.lr * m
        else:
            m = self.m.get(name, torch.zeros_like(d))
            v = self.v.get(name, torch.full_like(d, self.tau ** 2))
            m = self.beta1 * m + (1 - self.beta1) * d
            d2 = d * d
            if k == "fedadagrad":
                v = v + d2
            elif k == "fedadam":
                v = self.beta2 * v + (1 - self.beta2) * d2
            else:  # fedyogi
                v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
            self.m[name], self.v[name] = m, v
            out = x32 + self.lr * m / (v.sqrt() + self.tau)
        return out.to(x.dtype)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "lr": self.lr, "m": {k: t.clone() for k, t in self.m.items()},
                "v": {k: t.clone() for k, t in self.v.items()}}

    def load_state_dict(self, sd: dict):
        self.m = {k: t.clone() for k, t in sd.get("m", {}).items()}
        self.v = {k: t.clone() for k, t in sd.get("v", {}).items()}


_AB = re.compile(r"^(?P<mod>.*)\.(?P<ab>A|B)\.(?P<j>\d+)$")


def lora_pairs(names) -> dict[tuple[str, str], tuple[str, str]]:
    """Group LoRA factor names "<module>.A.<j>" / "<module>.B.<j>" (lora.py's naming) into (A, B) pairs."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    for n in names:
        m = _AB.match(n)
        if m:
            found.setdefault((m["mod"], m["j"]), {})[m["ab"]] = n
    return {k: (v["A"], v["B"]) for k, v in found.items() if "A" in v and "B" in v}


def product_average(As: list[torch.Tensor], Bs: list[torch.Tensor], p: list[float]):
    """Average the LoRA *product* ΔW = Σ_k p_k B_k A_k and re-factorise it by truncated SVD into (B, A).

    Factor averaging (the default, as FCIT and Shepherd do) gives (Σ p B)(Σ p A), which differs from
    Σ p B A by the cross terms p_i p_j B_i A_j: it is not the mean of the clients' weight updates. The product
    average is exact up to the rank truncation (Σ of K rank-r products has rank ≤ K·r, we keep the top r),
    and it rotates A and B into the singular basis (B = U√S, A = √S Vᵀ), so A/B no longer continue the clients'
    own parameterisation (the next round's AdamW starts from balanced factors). If ΔW ≈ 0 (e.g. B = 0) the
    factors are averaged instead, so a subspace is never reset to A = B = 0 (a dead point for LoRA)."""
    r = As[0].shape[0]
    dW = sum(pk * (B.double() @ A.double()) for pk, A, B in zip(p, As, Bs))   # (out, in)
    if float(dW.norm()) < 1e-12:
        return (sum(pk * A.double() for pk, A in zip(p, As)).to(As[0].dtype),
                sum(pk * B.double() for pk, B in zip(p, Bs)).to(Bs[0].dtype))
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    s = S[:r].sqrt()
    B = U[:, :r] * s[None, :]
    A = s[:, None] * Vh[:r]
    return A.to(As[0].dtype), B.to(Bs[0].dtype)


def aggregate(global_state: dict[str, torch.Tensor], client_states: list[dict[str, torch.Tensor]],
              n: list[float], opt: ServerOptimizer, lora_avg: str = "factors", prefix: str = "",
              base_states: list[dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Aggregate the clients' parameters for the names of global_state; returns the new global values.

    n: client sample counts (FedAvg weights: the client's number of samples).
    base_states[k][name]: the value client k started from (default: global_state[name]); it differs from the
        global value of the *same* name only when a client trained a different slot than the one it is written
        to (not the case in our DISCO, kept for generality).
    prefix: namespace for the server optimizer state (e.g. the DISCO slot).
    fedavg/fedprox compute Σ p_k w_k directly (bit-exact with a hand-computed weighted mean); the other
    aggregators go through ServerOptimizer.step with Δ = Σ p_k (w_k − base_k)."""
    if not client_states:
        return {k: v.clone() for k, v in global_state.items()}
    p = _weights(n)
    out: dict[str, torch.Tensor] = {}
    done = set()
    if lora_avg == "product":
        for (mod, j), (na, nb) in lora_pairs(global_state.keys()).items():
            A, B = product_average([c[na] for c in client_states], [c[nb] for c in client_states], p)
            out[na], out[nb] = A, B
            done |= {na, nb}
    for name, g in global_state.items():
        if name in done:
            continue
        if opt.kind in ("fedavg", "fedprox"):
            out[name] = sum(pk * c[name].double() for pk, c in zip(p, client_states)).to(g.dtype)
        else:
            bases = [b[name] for b in base_states] if base_states else [g] * len(client_states)
            delta = sum(pk * (c[name].double() - b.double()) for pk, c, b in zip(p, client_states, bases))
            out[name] = opt.step(prefix + name, g, delta.float())
    return out


def screen_clients(updates: list[dict]) -> tuple[list[dict], list[dict]]:
    """Drop clients with no data or non-finite parameters / loss ; returns (kept, dropped)
    where dropped entries carry a `reason`. Weights are renormalised by aggregate() over the kept ones."""
    kept, dropped = [], []
    for u in updates:
        reason = None
        if u.get("n", 0) <= 0:
            reason = "empty client data"
        elif u.get("loss") is not None and not math.isfinite(u["loss"]):
            reason = f"non-finite training loss ({u['loss']})"
        elif not finite_state(u.get("state", {})):
            reason = "non-finite parameters after local training"
        elif u.get("mu") is not None and not bool(torch.isfinite(u["mu"]).all()):
            reason = "non-finite identity feature"
        if reason:
            logger.warning("client %s excluded from aggregation: %s", u.get("client"), reason)
            dropped.append({"client": u.get("client"), "position": u.get("position"), "reason": reason})
        else:
            kept.append(u)
    return kept, dropped


# ----------------------------------------------------------------------------------------------------
# DISCO server: identity keys and dynamic knowledge organisation (DKO)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix (Na, Nb) in float64."""
    a = F.normalize(a.double(), dim=-1, eps=1e-12)
    b = F.normalize(b.double(), dim=-1, eps=1e-12)
    return a @ b.T


THRESH_EPS = 1e-6   # cos is compared as cos >= tau - 1e-6 so that "exactly tau" matches despite rounding


def organize(mu: torch.Tensor, n: list[float], keys: torch.Tensor, sizes: torch.Tensor, tau: float = 0.9,
             small_client: float = 1e-3, on_full: str = "error", info: dict | None = None) -> tuple[list[int], list[int]]:
    """DKO assignment of the round's clients to subspaces (DKO, as the paper describes it).

    mu (N, D): client identity tokens (mean feature over the client's samples), n: their sample counts,
    keys (K, D) / sizes (K,): the global identity keys (a slot is empty iff size == 0). Returns
    (slot per client, newly opened slots in opening order).

    1. Each client is matched against the *global* keys: slot = argmax cos if max cos >= τ (paper intent).
    2. The unmatched clients are clustered among themselves greedily in client order: client i opens a cluster
       with every not-yet-clustered j having cos(μ_i, μ_j) >= τ (the official code does not skip visited j, so
       its clusters can overlap — fixed). Each cluster opens the next empty slot.
    3. Small-client rule: an unmatched client with n_k / Σn < small_client does not open a subspace of its own;
       it joins the nearest of the existing keys and the new clusters' centroids (official: the cluster whose
       *first member* is most similar, and the client is dropped if it comes before any valid cluster — fixed;
       only if there is nothing at all to join does it cluster normally).
    4. More clusters than empty slots -> CapacityError (official: crash or silent drop), or with
       on_full="nearest" the official client-side rule ("if no empty slot is left, use argmax"): the
       largest clusters (by samples) open the free slots, every other cluster joins its nearest subspace (an
       existing key or a cluster opened now), and info["merged_on_full"] lists them (logged, never silent).

    Differences from the official code and why: it clusters the 5 clients of round 0 against each other and
    matches keys on the client per micro-batch, using the last batch's choice; rounds 1-9 reuse the round-0
    cluster of the client's position. Here the identity features come from frozen encoders, so the clients
    compute and upload them *before* training and the server assigns every client of every round; this is the
    paper's description ("matched with the global identity tokens, a new token and subspace on a miss") and
    removes the round-0 slot mismatch that discarded updates and the stage-1 "train slot 0 then copy"
    trick. Comparisons use >= on both sides (the official client uses >, the server >=). With
    FedConfig.assign="round0" (default) Federation calls this only in round 0 of a stage (and for positions
    without a round-0 subspace); later rounds reuse the position's subspace (the official schedule)."""
    N = mu.shape[0]
    K = keys.shape[0]
    used = [j for j in range(K) if float(sizes[j]) > 0]
    slot = [-1] * N
    if used:
        S = _cos(mu, keys[used])                                     # (N, U)
        best, arg = S.max(dim=1)
        for i in range(N):
            if float(best[i]) >= tau - THRESH_EPS:
                slot[i] = used[int(arg[i])]
    tot = float(sum(n))
    unmatched = [i for i in range(N) if slot[i] < 0]
    small = [i for i in unmatched if tot > 0 and n[i] / tot < small_client]
    big = [i for i in unmatched if i not in small]
    Smu = _cos(mu, mu)

    def greedy(members):
        clusters, visited = [], set()
        for i in members:
            if i in visited:
                continue
            c = [i] + [j for j in members if j != i and j not in visited and float(Smu[i, j]) >= tau - THRESH_EPS]
            visited |= set(c)
            clusters.append(c)
        return clusters

    clusters = greedy(big)
    # small clients: join nearest existing key or new-cluster centroid
    joined: dict[int, tuple[str, int]] = {}
    for i in small:
        cands = [("key", j, keys[j]) for j in used]
        for ci, c in enumerate(clusters):
            w = torch.tensor([n[k] for k in c], dtype=torch.float64)
            cands.append(("cluster", ci, (w[:, None] * mu[c].double()).sum(0) / w.sum()))
        if not cands:
            continue
        sims = _cos(mu[i:i + 1], torch.stack([c[2].double() for c in cands]))[0]
        kind, idx, _ = cands[int(sims.argmax())]
        joined[i] = (kind, idx)
    leftovers = [i for i in small if i not in joined]
    clusters += greedy(leftovers)
    free = [j for j in range(K) if float(sizes[j]) <= 0]
    keep, overflow = list(range(len(clusters))), []
    if len(clusters) > len(free):
        if on_full != "nearest":
            raise CapacityError(
                f"DISCO needs {len(clusters)} new subspace(s) this round but only {len(free)} of K={K} are free "
                f"(tau={tau}). More distinct tasks arrived than subspaces: raise --subspaces (and --rank "
                f"with it), lower --tau, or let overflowing clusters join their nearest subspace (--on-full nearest).")
        order = sorted(range(len(clusters)), key=lambda c: -sum(n[i] for i in clusters[c]))
        keep, overflow = sorted(order[:len(free)]), order[len(free):]

    def centroid(c):
        w = torch.tensor([float(n[k]) for k in c], dtype=torch.float64)
        return (w[:, None] * mu[c].double()).sum(0) / w.sum()
    opened, cslot = [], {}
    for c, j in zip(keep, free):
        for i in clusters[c]:
            slot[i] = j
        cslot[c] = j
        opened.append(j)
    merged = []
    for c in overflow:
        cands = [(j, keys[j].double()) for j in used] + [(cslot[k], centroid(clusters[k])) for k in keep]
        sims = _cos(centroid(clusters[c])[None], torch.stack([v for _, v in cands]))[0]
        target = cands[int(sims.argmax())][0]
        for i in clusters[c]:
            slot[i] = target
        cslot[c] = target
        merged.append({"clients": list(clusters[c]), "slot": target, "cos": round(float(sims.max()), 4)})
    for i, (kind, idx) in joined.items():
        slot[i] = idx if kind == "key" else cslot[idx]
    if merged:
        logger.warning("DISCO: no free subspace for %d cluster(s); joined the nearest: %s", len(merged), merged)
    if info is not None:
        info["merged_on_full"] = merged
    return slot, opened


def update_keys(keys: torch.Tensor, sizes: torch.Tensor, slot: list[int], mu: torch.Tensor, n: list[float]):
    """Sample-weighted running mean of the identity keys, in place (the intended formula):

        key_j ← (size_j · key_j + Σ_{k→j} n_k μ_k) / (size_j + Σ_{k→j} n_k),   size_j += Σ_{k→j} n_k

    The official code computes `key*size + Σnμ/(Σn + size)` in round 0 of later stages (operator precedence), which freezes the key's direction and inflates its norm; it also stores keys and sizes in
    bf16 (counts > 256 round). We keep keys float32 and sizes float64."""
    for j in sorted(set(slot)):
        if j < 0:
            continue
        idx = [i for i, s in enumerate(slot) if s == j]
        w = torch.tensor([float(n[i]) for i in idx], dtype=torch.float64)
        tot = float(w.sum())
        if tot <= 0:
            continue
        s = (w[:, None] * mu[idx].double()).sum(0)
        old = float(sizes[j])
        keys[j] = ((old * keys[j].double() + s) / (old + tot)).to(keys.dtype)
        sizes[j] = old + tot


# ----------------------------------------------------------------------------------------------------
# torch.distributed helpers: the round's clients are split over ranks, results all-gathered


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (WORLD_SIZE > 1): NCCL when CUDA is available,
    else gloo. Returns (rank, world_size); (0, 1) without torchrun. Sets the CUDA device to LOCAL_RANK."""
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


def _all_gather(obj) -> list:
    """all_gather_object over ranks (CPU tensors inside obj); [obj] without distributed."""
    rank, world = dist_info()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _merge_by_position(parts: list[dict]) -> dict:
    out = {}
    for p in parts:
        out.update(p)
    return dict(sorted(out.items()))


@contextlib.contextmanager
def _rng_scope(device: torch.device, *key):
    """Seed torch's RNG (dropout inside the LoRA layers, data order) for one client, from (seed, stage, round,
    position, client), inside torch.random.fork_rng: the caller's global RNG state is restored afterwards (we
    never reseed global RNGs for good). This makes a client's training independent of which process and in
    which order it runs, so N ranks reproduce the single-process result."""
    seed = int(np.random.default_rng([int(k) % (2 ** 32) for k in key]).integers(2 ** 62))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def lr_multiplier(step: int, total: int, warmup: int, kind: str = "cosine") -> float:
    """LR multiplier of transformers' get_cosine_schedule_with_warmup (FCIT's client trainer) or
    get_linear_schedule_with_warmup (the HF Trainer default Shepherd uses): linear warmup from 0, then decay to 0."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ----------------------------------------------------------------------------------------------------
# the engine


REFERENCE_TEXTS = (   # generic texts whose mean base-LM hidden state centres the identity fallback (option)
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Describe this.", "What is shown here?", "Answer the question.", "Hello world.", "Please help me with this.",
    "Tell me something about it.", "Is this correct? Answer yes or no.", "How many are there?",
    "Give a short answer.", "What does it say?")


class Federation:
    """Server + simulated clients for one method (see the module docstring), on one model.

    model: model.VLM (or a text-only VLM for FedIT); tokenizer: model.Tokenizer; image_processor: model.ImageProcessor
    or None; text_encoder: None or (model.CLIPTextTower, its Tokenizer) for DISCO's identity features.
    LoRA is applied here, per method: disco/olora/moelora get K = cfg.num_subspaces subspaces of rank
    cfg.rank // K, the others one subspace of rank cfg.rank; zeroshot none. LoRA init uses a local
    torch.Generator seeded by cfg.seed, so every rank builds identical adapters.

    Clients are simulated one after the other on the same model: each starts from the global state (the
    parameters the method federates: its LoRA subspace(s) and the projector), trains, uploads what it
    trained; the server aggregates. Under torchrun each rank trains the clients at positions p ≡ rank
    (mod world) and the uploads are all-gathered, so every rank holds the same global state."""

    def __init__(self, model, tokenizer, image_processor, cfg: FedConfig, text_encoder=None):
        self.model, self.tok, self.improc, self.cfg = model, tokenizer, image_processor, cfg
        self.text_encoder = text_encoder
        self.device = torch.device(cfg.device)
        m = cfg.method
        self.K = cfg.num_subspaces if m in ("disco", "olora", "moelora") else 1
        self.has_lora = m != "zeroshot"
        for p in model.parameters():
            p.requires_grad_(False)
        if self.has_lora:
            g = torch.Generator().manual_seed(int(cfg.seed))
            lora.apply_lora(model, cfg.rank, cfg.alpha, targets=tuple(cfg.lora_targets), num_subspaces=self.K,
                            init=cfg.lora_init, dropout=cfg.dropout, generator=g)
            if m == "moelora":
                lora.set_moe(model, generator=g)
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
        self.opt = ServerOptimizer(cfg.aggregator, cfg.server_lr, cfg.server_momentum, cfg.beta1, cfg.beta2,
                                   cfg.tau_adaptive)
        self.keys: torch.Tensor | None = None                         # (K, D) float32   DISCO identity keys
        self.sizes = torch.zeros(self.K, dtype=torch.float64)         # (K,) samples behind each key
        self.slot_data: dict[int, dict[str, float]] = {}              # slot -> {dataset: samples trained}
        self.open_order: list[int] = []
        self.stage_slot: dict[int, int] = {}                          # olora: stage -> subspace
        self.ewc_F: dict[str, torch.Tensor] = {}
        self.ewc_star: dict[str, torch.Tensor] = {}
        self.stage_fisher: dict[str, torch.Tensor] = {}
        self.local_states: dict[int, dict[str, torch.Tensor]] = {}
        self.last = None                                              # (stage, round) of the last run_round
        self.pos_slot: dict = {}                                      # DISCO assign=round0: position -> slot
        self.rank, self.world = dist_info()
        self._collators: dict = {}
        self._ewc_dev = None
        self._lm_ref = None                                           # identity fallback centre

    # ---------------------------------------------------------------- names, loading
    def slot_names(self, j: int) -> list[str]:
        suf = (f".A.{j}", f".B.{j}")
        return [n for n in self.lora_names if n.endswith(suf)]

    def _trained_names(self, slot: int) -> list[str]:
        """LoRA names a client trains (and uploads) for the method."""
        if self.cfg.method == "moelora":
            return list(self.lora_names)                               # all experts + routers
        return self.slot_names(slot)

    def _load(self, state: dict):
        with torch.no_grad():
            for n, t in state.items():
                self._params[n].copy_(t)

    def _slot_for_stage(self, stage: int) -> int:
        m = self.cfg.method
        if m == "olora":
            if stage >= self.K:
                raise CapacityError(f"O-LoRA opens one subspace per stage; stage {stage + 1} needs "
                                    f"{stage + 1} > K={self.K} subspaces (raise --subspaces)")
            return stage
        return 0

    # ---------------------------------------------------------------- batching
    def _pixels(self, examples):
        if self.improc is None or not any(ex.image for ex in examples):
            return None
        if not all(ex.image for ex in examples):
            raise ValueError("a batch mixes examples with and without images; batch them separately")
        return self.improc([data.load_image(ex.image) for ex in examples]).to(self.device)

    def _collate(self, examples, with_answer=True):
        """data.Collator: right-padded training batch (answer + end token supervised; the prompt too with
        train_on_inputs, Shepherd's default) or, with with_answer=False, a left-padded generation batch."""
        key = bool(with_answer)
        if key not in self._collators:
            self._collators[key] = data.Collator(
                self.tok, self.improc, template=self.cfg.template,
                image_seq_len=getattr(self.model, "image_seq_len", 0) if self.improc is not None else 0,
                image_token_id=getattr(self.tok, "image_token_id", None),
                max_length=self.cfg.max_length if key else None,    # prompts are never cut (FCIT, Shepherd)
                train=key, train_on_inputs=self.cfg.train_on_inputs)
        b = self._collators[key](examples)
        return {k: (v.to(self.device) if v is not None else None) for k, v in b.items()}

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.dtype in ("bfloat16", "float16"):
            return torch.autocast("cuda", dtype=getattr(torch, self.cfg.dtype))
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- identity features
    @torch.no_grad()
    def identity_features(self, examples, batch_size: int = 32) -> torch.Tensor:
        """(N, D) float32 task-identity features, one per example, from frozen encoders only:

        identity="text" with a text encoder: the CLIP text tower's pooled (EOS) output of the instruction
            (`<image>` removed, truncated to 77 tokens), 768-d and unprojected, as FCIT does;
        identity="text" without one (our fallback; FCIT always has CLIP): the frozen base LM's final hidden
            states (adapters off) of the instruction alone (no template), mean-pooled over its tokens. With
            identity_center=True each token is first centred on a fixed reference vector (the mean hidden state
            of REFERENCE_TEXTS, identical on every client, computed once) and L2-normalised, which removes the
            LM's common direction (anisotropy). Measured on FCIT-mini with 20-30-sample clients: a toy LLaVA
            pre-trained 40 steps had cos >= 0.92 within a task but up to 0.93 across tasks plain, >= 0.95 vs
            <= 0.82 centred; a longer-trained one overlapped both ways (plain 0.92 vs 0.97, centred 0.71 vs
            0.94, the three caption phrasings of Flickr30k drifting apart). An LM's hidden states are no
            paraphrase-invariant task encoder: use a CLIP text tower (the paper's) for real runs. With
            identity_layer="embedding" the pooled states are hidden state 0, a bag of the instruction's token
            embeddings: on FCIT-mini with the embedded tiny VLM, >= 0.90 within a task, <= 0.84 across all twelve
            tasks (the embedded default uses it);
        identity="image": the vision tower's mean-pooled last-layer patch features (ablation; FCIT stores
            CLIP image_embeds but never uses them).
        FCIT recovers the instruction by decoding the LLaMA ids and cutting at "ASSISTANT"; we feed the
        instruction text directly (same text up to the tokenizer round-trip)."""
        model = self.model
        out = []
        was_training = model.training
        model.eval()
        try:
            for i in range(0, len(examples), batch_size):
                chunk = examples[i:i + batch_size]
                if self.cfg.identity == "image":
                    px = self._pixels(chunk)
                    if px is None:
                        raise ValueError("identity='image' needs images and an image processor")
                    with self._autocast():
                        h = model.vision(px)[-1]                                  # (B, P(+1), Cv)
                    out.append(h.float().mean(1).cpu())
                elif self.text_encoder is not None:
                    tower, ctok = self.text_encoder
                    L = getattr(getattr(tower, "config", None), "max_position_embeddings", 77)
                    ids = [self._clip_ids(ctok, ex.instruction, L) for ex in chunk]
                    T = max(len(x) for x in ids)
                    pad = ctok.pad_id if ctok.pad_id is not None else 0
                    x = torch.full((len(ids), T), pad, dtype=torch.long)
                    att = torch.zeros((len(ids), T), dtype=torch.long)
                    for k, s in enumerate(ids):
                        x[k, :len(s)], att[k, :len(s)] = torch.tensor(s), 1
                    dev = next(tower.parameters()).device
                    out.append(tower(x.to(dev), attention_mask=att.to(dev), project=False).float().cpu())
                else:
                    if self.has_lora:
                        lora.disable_lora(model)
                    h, att = self._lm_hidden([ex.instruction for ex in chunk])          # (B, T, C), (B, T)
                    if self.cfg.identity_center:
                        if self._lm_ref is None:
                            r, ra = self._lm_hidden(REFERENCE_TEXTS)
                            self._lm_ref = r[ra.bool()].mean(0)                         # (C,)
                        h = F.normalize(h - self._lm_ref, dim=-1)
                    out.append(((h * att[..., None]).sum(1) / att.sum(1, keepdim=True)).cpu())
        finally:
            model.train(was_training)
        return torch.cat(out, 0) if out else torch.zeros(0)

    def _lm_hidden(self, texts):
        """Frozen base-LM hidden states (fp32) of the bare texts (no template, no image), right-padded: the final
        ones, or with identity_layer="embedding" hidden state 0 (the token embeddings)."""
        ids = [self.tok.encode(t.replace("<image>", "").strip())[:self.cfg.max_length] or [self.tok.eos_id]
               for t in texts]
        T = max(len(s) for s in ids)
        pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        x = torch.full((len(ids), T), pad, dtype=torch.long)
        att = torch.zeros((len(ids), T), dtype=torch.long)
        for k, s in enumerate(ids):
            x[k, :len(s)], att[k, :len(s)] = torch.tensor(s), 1
        x, att = x.to(self.device), att.to(self.device)
        if self.cfg.identity_layer == "embedding":
            return self.model.lm.embed_tokens(x).float(), att.float()
        with self._autocast():
            h = self.model.hidden_states(x, attention_mask=att).float()
        return h, att.float()

    @staticmethod
    def _clip_ids(ctok, text, max_length=77):
        """CLIP tokenisation as transformers' CLIPTokenizer(truncation=True, max_length=77): BOS text EOS."""
        ids = ctok.tok.encode(text.replace("<image>", "").strip(), add_special_tokens=False).ids
        return [ctok.bos_id] + ids[:max_length - 2] + [ctok.eos_id]

    # ---------------------------------------------------------------- client side
    def _configure(self, slot: int, train: bool):
        """Set LoRA modes and requires_grad for training `slot` (train=True) or for inference."""
        m, model = self.cfg.method, self.model
        if not self.has_lora:
            return []
        if m == "moelora":
            lora.set_moe(model, trainable=train)
        else:
            lora.set_active(model, slot if train else None)
            if m == "olora" and slot > 0:
                # O-LoRA trains the new subspace with the frozen old ones in the forward pass (cmnfriend/O-LoRA)
                lora.set_routing(model, torch.tensor([1.0] * (slot + 1) + [0.0] * (self.K - slot - 1)))
        for n in self.proj_names:
            self._params[n].requires_grad_(train)
        return self._trained_names(slot) + self.proj_names if train else []

    def _penalty(self, names, ref, slot, stage):
        """Client-side regularisers: FedProx μ/2‖w − w_g‖² (Li et al. 2020), EWC λ/2 Σ F (w − w*)²
        (Kirkpatrick et al. 2017) and O-LoRA λ1 Σ |A_old A_newᵀ| (Wang et al. 2023)."""
        cfg, reg = self.cfg, None

        def add(x):
            nonlocal reg
            reg = x if reg is None else reg + x
        if cfg.aggregator == "fedprox" and cfg.prox_mu > 0:
            add(cfg.prox_mu / 2 * sum(((self._params[n] - ref[n]) ** 2).sum() for n in names))
        if cfg.method == "ewc" and self.ewc_F and cfg.ewc_lambda > 0:
            if self._ewc_dev is None:       # device copies of (F, w*), built once per stage
                self._ewc_dev = {n: (self.ewc_F[n].to(self.device), self.ewc_star[n].to(self.device))
                                 for n in self.ewc_F}
            add(cfg.ewc_lambda / 2 * sum((F_ * (self._params[n] - w) ** 2).sum()
                                         for n, (F_, w) in self._ewc_dev.items() if n in names))
        if cfg.method == "olora" and slot > 0 and cfg.olora_lambda > 0:
            add(lora.olora_penalty(self.model, slot, list(range(slot)), weight=cfg.olora_lambda))
        return reg

    def _local_train(self, examples, slot, stage, rnd, position, cid, start: dict | None = None,
                     fisher: bool = False) -> dict:
        """One client's local training: a fresh AdamW (β=(0.9, 0.999), eps 1e-8, no weight decay) and a fresh
        schedule with warmup ceil(warmup_ratio · steps) per client and round, as FCIT's per-client HF Trainer;
        gradient accumulation, clipping, autocast on CUDA. Trains the method's LoRA and the projector."""
        cfg, model = self.cfg, self.model
        t0 = time.perf_counter()
        self._load(self.global_state)
        if start is not None:
            self._load(start)      # method 'local': the client's own adapter
        names = self._configure(slot, True)
        params = [self._params[n] for n in names]
        n_trainable = sum(p.numel() for p in params)
        ref = {n: self._params[n].detach().clone() for n in names} if cfg.aggregator == "fedprox" else None
        bs, acc = max(1, cfg.batch_size), max(1, cfg.grad_accum)
        whole, frac = divmod(float(cfg.local_epochs), 1.0)
        epoch_sizes = [len(examples)] * int(whole) + ([max(1, round(frac * len(examples)))] if frac > 1e-9 else [])
        total_micro = sum(math.ceil(sz / bs) for sz in epoch_sizes)
        steps = math.ceil(total_micro / acc)
        warm = math.ceil(cfg.warmup_ratio * steps)
        proj = set(self.proj_names)
        groups = [{"params": [self._params[n] for n in names if n not in proj], "lr": cfg.lr},
                  {"params": [self._params[n] for n in names if n in proj],
                   "lr": cfg.lr if cfg.projector_lr is None else cfg.projector_lr}]
        optim = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_multiplier(s, steps, warm, cfg.lr_schedule))
        scaler = torch.amp.GradScaler("cuda") if (self.device.type == "cuda" and cfg.dtype == "float16") else None
        gc_before = getattr(model, "gradient_checkpointing", False)
        model.gradient_checkpointing = bool(cfg.gradient_checkpointing)
        losses, bad, micro = [], None, 0
        model.train()
        try:
            with _rng_scope(self.device, cfg.seed, stage, rnd, position, cid) as gen:
                for size in epoch_sizes:
                    perm = torch.randperm(len(examples), generator=gen).tolist()[:size]
                    for b in range(math.ceil(size / bs)):
                        batch = self._collate([examples[i] for i in perm[b * bs:(b + 1) * bs]])
                        with self._autocast():
                            loss = model.loss(**batch)
                        reg = self._penalty(names, ref, slot, stage)
                        total = loss.float() + (reg.float() if reg is not None else 0.0)
                        if not torch.isfinite(total):
                            bad = float(total.detach())
                            break
                        losses.append(float(loss.detach()))
                        total = total / acc
                        (scaler.scale(total) if scaler else total).backward()
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
                    if bad is not None:
                        break
                if cfg.method == "moelora" or (cfg.method == "olora" and slot > 0):
                    self._configure(slot, False)
                F_k = self._fisher(examples, names) if (fisher and bad is None) else None
        finally:
            model.gradient_checkpointing = gc_before
            model.eval()
            optim.zero_grad(set_to_none=True)
            for p in params:
                p.requires_grad_(False)
        up_names = self._trained_names(slot) + self.proj_names
        state = {n: self._params[n].detach().to("cpu", copy=True) for n in up_names}
        loss = bad if bad is not None else (float(np.mean(losses)) if losses else float("nan"))
        return {"state": state, "loss": loss, "steps": steps, "trainable_params": n_trainable,
                "time_s": time.perf_counter() - t0, "fisher": F_k}

    def _fisher(self, examples, names) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher (Kirkpatrick et al. 2017) at the client's final weights, dropout off:
        F = (1/N) Σ_i (∂ℓ_i/∂w)², ℓ_i the mean token loss of sample i alone (exact per-sample loop, batch 1).
        The squared gradient of a batch-mean loss underestimates it by up to the batch size (5-8x at batch 8)."""
        model = self.model
        if self.has_lora:
            lora.set_active(model, 0)
        for n in names:
            self._params[n].requires_grad_(True)
        F_ = {n: torch.zeros_like(self._params[n], dtype=torch.float32) for n in names}
        model.eval()
        for ex in examples:
            batch = self._collate([ex])
            model.zero_grad(set_to_none=True)
            with self._autocast():
                loss = model.loss(**batch)
            loss.float().backward()
            for n in names:
                g = self._params[n].grad
                if g is not None:
                    F_[n] += g.detach().float() ** 2
        model.zero_grad(set_to_none=True)
        return {n: (f / max(1, len(examples))).cpu() for n, f in F_.items()}

    # ---------------------------------------------------------------- one communication round
    def run_round(self, stage: int, rnd: int, client_data: Callable, log: Callable | None = None) -> dict:
        """One communication round of `stage` (0-based) / `rnd` (0-based).

        client_data(position, client_id) -> list[Example]: the data of the client at that position of the
        round's selection (Het-FCIT maps the position to a task). For method "mtl" it is called once as
        client_data(None, None) and must return the pooled training data of every task seen so far.
        Returns the round log: clients, per-client n / slot / loss / steps / bytes up and down / trainable
        parameters / wall time / rank, DISCO assignments and opened subspaces, dropped clients with reasons."""
        cfg, t_round = self.cfg, time.perf_counter()
        say = log or logger.info
        m = cfg.method
        rec = {"stage": stage, "round": rnd, "method": m, "aggregator": cfg.aggregator}
        if m == "zeroshot":
            self.last = (stage, rnd)
            return {**rec, "clients": [], "per_client": [], "skipped": "zeroshot: no training"}
        if m == "mtl":
            sel = [-1]
        else:
            sel = sample_clients(cfg.n_clients, cfg.clients_per_round, cfg.seed, stage, rnd, cfg.client_sampling)
        mine = [p for p in range(len(sel)) if p % self.world == self.rank]
        datas = {p: list((client_data(None, None) if m == "mtl" else client_data(p, sel[p])) or []) for p in mine}

        # phase 1 (DISCO): identity tokens up, subspace assignment down (DKO, before training)
        slots: dict[int, int] = {}
        opened: list[int] = []
        mus: dict[int, tuple] = {}
        dropped = []
        if m == "disco":
            local = {}
            for p in mine:
                if datas[p]:
                    f = self.identity_features(datas[p], batch_size=max(1, cfg.batch_size))
                    local[p] = (f.mean(0), len(datas[p]))
            mus = _merge_by_position(_all_gather(local))
            for p in list(mus):
                if not bool(torch.isfinite(mus[p][0]).all()):
                    dropped.append({"client": sel[p], "position": p, "reason": "non-finite identity feature"})
                    del mus[p]
            if rnd == 0 or self.pos_slot.get("stage") != stage:
                self.pos_slot = {"stage": stage}
            if cfg.assign == "round0" and rnd > 0:     # official: reuse the round-0 subspace of the position
                slots = {p: self.pos_slot[str(p)] for p in mus if str(p) in self.pos_slot}
            if mus and len(slots) < len(mus):
                pos = [p for p in mus if p not in slots]
                mu = torch.stack([mus[p][0] for p in pos]).float()
                if self.keys is None:
                    self.keys = torch.zeros(self.K, mu.shape[1])
                info = {}
                asg, opened = organize(mu, [mus[p][1] for p in pos], self.keys, self.sizes, cfg.tau,
                                       cfg.small_client, cfg.on_full, info)
                if info.get("merged_on_full"):
                    rec["merged_on_full"] = [dict(d, clients=[pos[i] for i in d["clients"]])
                                             for d in info["merged_on_full"]]
                    say(f"stage {stage + 1} round {rnd + 1}: no free subspace; positions joined the nearest: "
                        f"{rec['merged_on_full']}")
                slots.update(zip(pos, asg))
                for p in pos:
                    self.pos_slot.setdefault(str(p), slots[p])
                for j in opened:
                    old = [o for o in self.open_order if o != j]
                    if cfg.orthogonal_subspaces and old:
                        self._orthogonalize(j, old)
                    say(f"stage {stage + 1} round {rnd + 1}: DISCO opened subspace {j} for positions "
                        f"{[p for p in pos if slots[p] == j]}")
                slots = dict(sorted(slots.items()))
        else:
            slots = {p: self._slot_for_stage(stage) for p in range(len(sel))}

        # phase 2: local training
        ups = {}
        fisher = m == "ewc" and rnd == cfg.rounds - 1
        for p in mine:
            u = {"client": sel[p], "position": p, "n": len(datas[p]), "rank": self.rank,
                 "datasets": dict(_count(ex.dataset for ex in datas[p]))}
            if datas[p] and p in slots:
                start = self.local_states.get(sel[p]) if m == "local" else None
                u.update(self._local_train(datas[p], slots[p], stage, rnd, p, sel[p], start=start, fisher=fisher))
                u["slot"] = slots[p]
            elif datas[p] and m == "disco":
                u["n"] = 0   # its identity feature was excluded above
            ups[p] = u
        allu = _merge_by_position(_all_gather(ups))
        kept, bad = screen_clients(list(allu.values()))
        dropped += [d for d in bad if not any(d["position"] == x["position"] for x in dropped)]
        for d in dropped:
            say(f"stage {stage + 1} round {rnd + 1}: client {d['client']} (position {d['position']}) excluded: {d['reason']}")

        # server aggregation
        if m == "local":
            for u in kept:
                self.local_states[u["client"]] = u["state"]
        elif kept:
            groups: dict[int, list] = {}
            for u in kept:
                groups.setdefault(u["slot"], []).append(u)
            new = {}
            for j, us in sorted(groups.items()):
                names = self._trained_names(j)
                new.update(aggregate({n: self.global_state[n] for n in names}, [u["state"] for u in us],
                                     [u["n"] for u in us], self.opt, cfg.lora_avg))
            if self.proj_names:
                new.update(aggregate({n: self.global_state[n] for n in self.proj_names}, [u["state"] for u in kept],
                                     [u["n"] for u in kept], self.opt, "factors"))
            applied = finite_state(new)
            if applied:
                self.global_state.update(new)
            else:
                say(f"stage {stage + 1} round {rnd + 1}: aggregated update is not finite; global model kept")
                rec["aggregation_skipped"] = "non-finite aggregate"
            if m == "disco" and applied:
                pos = [u["position"] for u in kept]
                update_keys(self.keys, self.sizes, [u["slot"] for u in kept],
                            torch.stack([mus[p][0] for p in pos]).float(), [mus[p][1] for p in pos])
                for j in opened:
                    if float(self.sizes[j]) > 0 and j not in self.open_order:
                        self.open_order.append(j)
                if cfg.orthogonal_subspaces:
                    for j in sorted(groups):
                        old = self.open_order[:self.open_order.index(j)] if j in self.open_order else []
                        if old:
                            self._orthogonalize(j, old)
            for u in kept:
                sd = self.slot_data.setdefault(u["slot"], {})
                for ds, c in u["datasets"].items():
                    sd[ds] = sd.get(ds, 0) + c
            if fisher:
                tot = sum(u["n"] for u in kept if u.get("fisher"))
                for u in kept:
                    for n, f in (u.get("fisher") or {}).items():
                        self.stage_fisher[n] = self.stage_fisher.get(n, 0) + f * (u["n"] / tot)
        self._load(self.global_state)
        self.last = (stage, rnd)

        # accounting: what each client actually receives and sends
        per = []
        for p, u in allu.items():
            slot = u.get("slot")
            down = up = 0
            if "state" in u:
                up = _nbytes(u["state"]) + (_nbytes(u["fisher"]) if u.get("fisher") else 0)
                dn = set(self._trained_names(slot)) | set(self.proj_names)
                if m == "olora":
                    for o in range(slot):
                        dn |= set(self.slot_names(o))
                down = sum(self.global_state[n].numel() * self.global_state[n].element_size() for n in dn)
                if m == "ewc" and self.ewc_F:
                    down += 2 * _nbytes({n: t for n, t in self.ewc_F.items() if n in dn})
            if m == "disco" and p in mus:
                up += mus[p][0].numel() * 4                  # the identity token (float32)
            row = {k: u.get(k) for k in ("client", "position", "rank", "n", "slot", "loss", "steps", "trainable_params",
                                         "time_s")} | {"bytes_up": up, "bytes_down": down}
            if row["loss"] is not None and not math.isfinite(row["loss"]):
                row["loss"] = None                           # strict JSON; the reason is in "dropped"
            per.append(row)
        n_tot = sum(u["n"] for u in kept)
        rec.update({
            "clients": [int(c) for c in sel], "per_client": per, "dropped": dropped,
            "assignments": {str(p): s for p, s in slots.items()} if m == "disco" else None,
            "opened": opened, "active_subspaces": [j for j in range(self.K) if float(self.sizes[j]) > 0]
            if m == "disco" else None,
            "loss": (sum(u["loss"] * u["n"] for u in kept) / n_tot) if n_tot else None,
            "samples": n_tot, "bytes_up": sum(x["bytes_up"] for x in per),
            "bytes_down": sum(x["bytes_down"] for x in per), "time_s": time.perf_counter() - t_round,
            "world_size": self.world})
        return rec

    def _orthogonalize(self, j: int, old: list[int]):
        """Hard-orthogonalise subspace j's A against the old subspaces' A (lora.orthogonalize_subspace), in the
        model and in the global state (DISCO option `orthogonal_subspaces`)."""
        self._load({n: self.global_state[n] for n in self.lora_names})
        lora.orthogonalize_subspace(self.model, j, old)
        for n in self.slot_names(j):
            self.global_state[n] = self._params[n].detach().to("cpu", copy=True)

    # ---------------------------------------------------------------- stage boundary
    def end_stage(self, stage: int) -> dict:
        """Close a stage. EWC: consolidate the stage's Fisher (sample-weighted mean of the clients' Fishers
        from the stage's last round) into the running sum F ← F + F_stage and anchor w* ← the global weights
        (online EWC over stages). O-LoRA: the stage's subspace is frozen from now on (later stages train the
        next one). DISCO: keys and sizes carry over, as in FCIT's stage handover. The server optimizer's state
        (FedAvgM momentum, FedAdam/Yogi/Adagrad m and v) is reset unless server_state="carry"."""
        info = {"stage": stage}
        if self.cfg.server_state == "reset":
            self.opt.m, self.opt.v = {}, {}
        if self.cfg.method == "ewc" and self.stage_fisher:
            for n, f in self.stage_fisher.items():
                self.ewc_F[n] = self.ewc_F.get(n, torch.zeros_like(f)) + f
                self.ewc_star[n] = self.global_state[n].clone().float()
            self._ewc_dev = None
            info["fisher_mean"] = float(torch.cat([f.flatten() for f in self.ewc_F.values()]).mean())
            self.stage_fisher = {}
        if self.cfg.method == "olora":
            self.stage_slot[stage] = self._slot_for_stage(stage)
        if self.cfg.method == "disco":
            info["keys_used"] = [j for j in range(self.K) if float(self.sizes[j]) > 0]
            info["slot_data"] = {str(k): v for k, v in self.slot_data.items()}
        return info

    # ---------------------------------------------------------------- inference (SSA)
    def routing_weights(self, features: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """DISCO SSA weights α (B, K) in fp32: softmax(cos(feature, keys) / temperature) over the used
        slots (lora.route). Empty slots get exactly 0 (the official code includes them with cos = 0, which
        costs them a negligible e^0 share). Ablations: argmax | concat | cosine."""
        if self.keys is None:
            return torch.zeros(features.shape[0], self.K)
        return lora.route(features, self.keys, mode or self.cfg.routing, self.cfg.temperature,
                          valid=self.sizes > 0)

    def _inference_mode(self, examples, client=None):
        """Load the weights to evaluate and put the LoRA layers in the method's inference mode; returns the
        per-example routing weights for DISCO (else None)."""
        m = self.cfg.method
        if m == "local":
            if client is None:
                raise ValueError("method 'local' evaluates one client at a time: predict(..., client=id)")
            self._load(self.local_states.get(client, self.global_state))
        else:
            self._load(self.global_state)
        if not self.has_lora:
            return None
        if m == "disco":
            feats = self.identity_features(examples, batch_size=32)
            return self.routing_weights(feats)
        if m == "olora":
            used = sorted(set(self.stage_slot.values()) | ({self._slot_for_stage(self.last[0])} if self.last else set()))
            lora.set_routing(self.model, torch.tensor([1.0 if j in used else 0.0 for j in range(self.K)]))
        elif m == "moelora":
            lora.set_moe(self.model, trainable=False)
        else:
            lora.set_active(self.model, None)      # single subspace 0, nothing trainable
        return None

    @torch.no_grad()
    def predict(self, examples, batch_size: int = 8, client: int | None = None, distributed: bool = False) -> list[str]:
        """Greedy answers (max_new_tokens from the config), stripped, in input order. DISCO routes every
        sample with its own α (computed in fp32 and set per batch as (B, K), so no stale mask).
        method 'local': pass the client id (evaluation averages over clients in fcit.py).
        distributed=True (a collective: call it on every rank): rank r answers examples r, r+W, ... and the
        answers are all-gathered, so every rank returns the full list."""
        if distributed and self.world > 1:
            mine = list(range(self.rank, len(examples), self.world))
            part = self.predict([examples[i] for i in mine], batch_size, client) if mine else []
            out = [None] * len(examples)
            for r, ans in enumerate(_all_gather(part)):
                for k, a in enumerate(ans):
                    out[r + k * self.world] = a
            return out
        if not examples:
            return []
        alpha = self._inference_mode(examples, client)
        model = self.model
        model.eval()
        out: list[str | None] = [None] * len(examples)
        for b in range(0, len(examples), batch_size):
            chunk = examples[b:b + batch_size]
            batch = self._collate(chunk, with_answer=False)
            if alpha is not None:
                lora.set_routing(model, alpha[b:b + batch_size])
            with self._autocast():
                gen = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                     pixel_values=batch["pixel_values"], max_new_tokens=self.cfg.max_new_tokens,
                                     eos_token_id=self.tok.eos_id)
            for k, g in enumerate(gen):
                out[b + k] = self.tok.decode(list(g), skip_special_tokens=True).strip()
        return out

    def routing_accuracy(self, examples_by_task: dict) -> float | None:
        """DISCO: the fraction of examples whose argmax α is the subspace that trained the most samples of the
        example's dataset (slot_data); examples of datasets never trained are skipped. None for the other
        methods or before training. Per-task values are kept in self.last_routing."""
        if self.cfg.method != "disco" or self.keys is None or not self.slot_data:
            return None
        owner = {}
        for j, d in self.slot_data.items():
            for ds, c in d.items():
                if c > owner.get(ds, (-1, 0))[1]:
                    owner[ds] = (j, c)
        hit = tot = 0
        self.last_routing = {}
        for task, exs in examples_by_task.items():
            exs = [e for e in exs if e.dataset in owner]
            if not exs:
                continue
            a = self.routing_weights(self.identity_features(exs), mode="softmax")
            got = a.argmax(-1).tolist()
            h = sum(int(g == owner[e.dataset][0]) for g, e in zip(got, exs))
            self.last_routing[str(task)] = h / len(exs)
            hit, tot = hit + h, tot + len(exs)
        return hit / tot if tot else None

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta): everything needed to resume exactly after a round. tensors (CPU, contiguous,
        safetensors-ready): 'global/<param>', 'disco/keys', 'disco/sizes', 'opt.m/<name>', 'opt.v/<name>',
        'ewc.F/', 'ewc.star/', 'ewc.stage/<param>', 'local/<client>/<param>'; meta is JSON-able."""
        t = {f"global/{n}": v for n, v in self.global_state.items()}
        if self.keys is not None:
            t["disco/keys"] = self.keys
        t["disco/sizes"] = self.sizes
        t.update({f"opt.m/{n}": v for n, v in self.opt.m.items()})
        t.update({f"opt.v/{n}": v for n, v in self.opt.v.items()})
        t.update({f"ewc.F/{n}": v for n, v in self.ewc_F.items()})
        t.update({f"ewc.star/{n}": v for n, v in self.ewc_star.items()})
        t.update({f"ewc.stage/{n}": v for n, v in self.stage_fisher.items()})
        for c, st in self.local_states.items():
            t.update({f"local/{c}/{n}": v for n, v in st.items()})
        t = {k: v.detach().cpu().contiguous().clone() for k, v in t.items()}
        meta = {"version": 1, "method": self.cfg.method, "aggregator": self.cfg.aggregator, "K": self.K,
                "last": list(self.last) if self.last else None, "open_order": self.open_order, "pos_slot": self.pos_slot,
                "stage_slot": {str(k): v for k, v in self.stage_slot.items()},
                "slot_data": {str(k): v for k, v in self.slot_data.items()},
                "config": dataclasses.asdict(self.cfg)}
        return t, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict):
        if meta.get("method") != self.cfg.method or meta.get("K") != self.K:
            raise ValueError(f"checkpoint is for method {meta.get('method')!r} with K={meta.get('K')}, "
                             f"this federation is {self.cfg.method!r} with K={self.K}")

        def sub(prefix):
            return {k[len(prefix):]: v.clone() for k, v in tensors.items() if k.startswith(prefix)}
        g = sub("global/")
        missing = set(self.global_state) - set(g)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} global tensors, e.g. {sorted(missing)[:3]}")
        self.global_state = g
        self.keys = tensors["disco/keys"].clone() if "disco/keys" in tensors else None
        self.sizes = tensors["disco/sizes"].clone().double()
        self.opt.load_state_dict({"m": sub("opt.m/"), "v": sub("opt.v/")})
        self.ewc_F, self.ewc_star, self.stage_fisher = sub("ewc.F/"), sub("ewc.star/"), sub("ewc.stage/")
        self._ewc_dev = None
        self.local_states = {}
        for k, v in sub("local/").items():
            c, n = k.split("/", 1)
            self.local_states.setdefault(int(c), {})[n] = v
        self.last = tuple(meta["last"]) if meta.get("last") else None
        self.open_order = list(meta.get("open_order", []))
        self.pos_slot = dict(meta.get("pos_slot", {}))
        self.stage_slot = {int(k): v for k, v in meta.get("stage_slot", {}).items()}
        self.slot_data = {int(k): v for k, v in meta.get("slot_data", {}).items()}
        self._load(self.global_state)

    def local_clients(self) -> list[int]:
        """Clients with a local model (method 'local')."""
        return sorted(self.local_states)
