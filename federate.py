"""Federated training engine: clients, server aggregation, DISCO and the continual baselines.

One engine runs every method of FCIT (Guo et al., ICCV 2025, arXiv 2503.12897) and FedIT (Zhang et al.,
"Towards Building the Federated GPT", arXiv 2305.05644):

    disco     dynamic knowledge organisation (identity keys + one LoRA subspace per task cluster, §4.1-4.4)
              and subspace selective activation at inference (§4.5)
    finetune  one LoRA trained sequentially over the stages (FCIT's "Finetune" row)
    ewc       finetune + diagonal-Fisher penalty (Kirkpatrick et al. 2017), Fisher from the clients' data
    olora     a new subspace per stage + O-LoRA orthogonality penalty (Wang et al. 2023)
    moelora   CoIN's rank-split experts with a trainable token router (Chen et al. 2024)
    zeroshot  the base model, no training
    mtl       centralised multi-task training on the pooled data (upper bound), one "client"
    fedit     FedIT / Shepherd: one LoRA + the aggregator, single stage
    local     every client trains alone (FedIT's local baseline); evaluation averages over clients

Any aggregator works with any method: FedAvg, FedProx (Li et al. 2020), FedAvgM (Hsu et al. 2019) and the
adaptive server optimisers FedAdagrad / FedAdam / FedYogi (Reddi et al., ICLR 2021, Algorithm 2).

Section numbers "§x.y" refer to /work/shared/research/fcit_paper.md (the engineering spec of the paper and the
official code Ghy0501/FCIT@9b10259). Where we differ from the official code, the docstring says so and why.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("fcit.federate")

METHODS = ("disco", "finetune", "ewc", "olora", "moelora", "zeroshot", "mtl", "fedit", "local")
AGGREGATORS = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi")


class CapacityError(RuntimeError):
    """More task clusters arrived than the model has LoRA subspaces (§4.7.6: the official code crashes with an
    index error or silently drops keys; we stop with this message instead)."""


# ----------------------------------------------------------------------------------------------------
# configuration


@dataclass
class FedConfig:
    """Everything the engine needs. Paper values (§1.2, §6) in comments; fcit.py fills them per setting."""
    method: str = "disco"
    aggregator: str = "fedavg"
    n_clients: int = 50                  # §1.2 --num_clients 50
    clients_per_round: int = 5           # §1.2 int(50 * 0.1)
    rounds: int = 10                     # rounds per stage
    local_epochs: int = 1
    lr: float = 2e-4                     # AdamW, weight decay 0 (§6)
    batch_size: int = 32                 # per optimizer micro-step
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.03           # warmup = ceil(0.03 * steps), cosine decay, restarted per client/round
    rank: int = 64                       # TOTAL LoRA rank, split into num_subspaces blocks (§4.2)
    alpha: float = 128.0                 # scaling alpha / rank = 2 (§4.2)
    num_subspaces: int = 8               # K
    dropout: float = 0.05
    tau: float = 0.9                     # DISCO matching threshold (§4.4)
    temperature: float = 0.05            # SSA softmax temperature (§4.5)
    small_client: float = 1e-3           # small-client share (§4.4)
    routing: str = "softmax"             # SSA ablations: softmax | argmax | concat | cosine (§5)
    identity: str = "text"               # text (CLIP text tower or base LM) | image (ablation, §4.1)
    orthogonal_subspaces: bool = False   # DISCO option: hard-orthogonalise a new subspace against the old ones
    lora_avg: str = "factors"            # factors (A, B averaged separately; FCIT/Shepherd) | product (SVD of ΣwBA)
    prox_mu: float = 0.01                # FedProx μ
    server_lr: float | None = None       # η; None -> 1.0 for fedavgm, 1e-2 for the adaptive optimisers
    server_momentum: float = 0.9         # FedAvgM β
    beta1: float = 0.9                   # FedAdam/FedYogi/FedAdagrad β1 (Reddi et al. §3)
    beta2: float = 0.99                  # FedAdam/FedYogi β2
    tau_adaptive: float = 1e-3           # Reddi et al. τ (adaptivity, v_{-1} = τ²)
    ewc_lambda: float = 1.0
    olora_lambda: float = 0.5            # O-LoRA λ1 (cmnfriend/O-LoRA scripts)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"               # autocast dtype on GPU: bfloat16 | float16 | float32
    max_new_tokens: int = 128
    template: str = "vicuna_v1"
    max_length: int = 2048
    gradient_checkpointing: bool = False
    lora_targets: tuple = ("gate_proj", "up_proj", "down_proj")   # §4.2: MLP only
    train_projector: bool = True         # §4.3: FCIT trains and averages mm_projector

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
        if self.identity not in ("text", "image"):
            raise ValueError(f"unknown identity {self.identity!r}")
        if self.clients_per_round > self.n_clients:
            raise ValueError("clients_per_round > n_clients")


# ----------------------------------------------------------------------------------------------------
# client sampling (§1.2)


def sample_clients(n_clients: int, per_round: int, seed: int, stage: int, rnd: int) -> list[int]:
    """Uniform sampling without replacement, deterministic per (seed, stage, round) (§1.2).

    The official code calls np.random.seed(stage*10 + round) (reseeding the global NumPy RNG, and colliding for
    stages with >= 10 rounds); we use a local generator keyed by the tuple, so nothing global is touched. The
    order matters: in Het-FCIT the position in this list selects the task (§1.5)."""
    if not 0 < per_round <= n_clients:
        raise ValueError(f"need 0 < clients_per_round ({per_round}) <= n_clients ({n_clients})")
    rng = np.random.default_rng([int(seed), int(stage), int(rnd)])
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

    Written from the paper, not from OpenFedLLM (anchors §1.3), which uses an EMA for FedAvgM, updates v from
    m² instead of Δ² and starts v at τ². We also start v at τ² (the paper's v_{-1} ≥ τ²). No bias correction
    (the paper has none). Reddi et al. weight clients uniformly; we use the sample-count weights FedAvg uses,
    so every aggregator sees the same Δ. State is per parameter name (per subspace for DISCO) and float32.
    """

    def __init__(self, kind: str, lr: float | None = None, momentum: float = 0.9, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3):
        if kind not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {kind!r}")
        self.kind = kind
        self.lr = lr if lr is not None else (1.0 if kind in ("fedavg", "fedprox", "fedavgm") else 1e-2)
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

    Factor averaging (the default, as FCIT §4.4 and Shepherd do) gives (Σ p B)(Σ p A), which differs from
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

    n: client sample counts (FedAvg weights, §1.6 "aggregation weight = len(client_json)").
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
    """Drop clients with no data or non-finite parameters / loss (issue 5 "bad input"); returns (kept, dropped)
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
            log.warning("client %s excluded from aggregation: %s", u.get("client"), reason)
            dropped.append({"client": u.get("client"), "position": u.get("position"), "reason": reason})
        else:
            kept.append(u)
    return kept, dropped


# ----------------------------------------------------------------------------------------------------
# DISCO server: identity keys and dynamic knowledge organisation (§4.1, §4.4, §4.7)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix (Na, Nb) in float64."""
    a = F.normalize(a.double(), dim=-1, eps=1e-12)
    b = F.normalize(b.double(), dim=-1, eps=1e-12)
    return a @ b.T


THRESH_EPS = 1e-6   # cos is compared as cos >= tau - 1e-6 so that "exactly tau" matches despite rounding


def organize(mu: torch.Tensor, n: list[float], keys: torch.Tensor, sizes: torch.Tensor, tau: float = 0.9,
             small_client: float = 1e-3) -> tuple[list[int], list[int]]:
    """DKO assignment of the round's clients to subspaces (§4.4, paper intent per §4.7.1).

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
    4. More clusters than empty slots -> CapacityError (official: crash or silent drop, §4.7.6).

    Differences from the official code and why: it clusters the 5 clients of round 0 against each other and
    matches keys on the client per micro-batch, using the last batch's choice; rounds 1-9 reuse the round-0
    cluster of the client's position. Here the identity features come from frozen encoders, so the clients
    compute and upload them *before* training and the server assigns every client of every round; this is the
    paper's description ("matched with the global identity tokens, a new token and subspace on a miss") and
    removes the round-0 slot mismatch that discarded updates (§4.7.3) and the stage-1 "train slot 0 then copy"
    trick. Comparisons use >= on both sides (the official client uses >, the server >=)."""
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
    if len(clusters) > len(free):
        raise CapacityError(
            f"DISCO needs {len(clusters)} new subspace(s) this round but only {len(free)} of K={K} are free "
            f"(tau={tau}). More distinct tasks arrived than subspaces: raise --num-subspaces (and the LoRA rank "
            f"with it) or lower --tau.")
    opened = []
    for c, j in zip(clusters, free):
        for i in c:
            slot[i] = j
        opened.append(j)
    for i, (kind, idx) in joined.items():
        slot[i] = idx if kind == "key" else opened[idx]
    return slot, opened


def update_keys(keys: torch.Tensor, sizes: torch.Tensor, slot: list[int], mu: torch.Tensor, n: list[float]):
    """Sample-weighted running mean of the identity keys, in place (§4.4, intended formula):

        key_j ← (size_j · key_j + Σ_{k→j} n_k μ_k) / (size_j + Σ_{k→j} n_k),   size_j += Σ_{k→j} n_k

    The official code computes `key*size + Σnμ/(Σn + size)` in round 0 of later stages (operator precedence,
    §4.4/§4.7.2), which freezes the key's direction and inflates its norm; it also stores keys and sizes in
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
