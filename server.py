"""The server side of a federation: client sampling, aggregation (FedAvg and the server optimizers of Reddi
et al. 2021) and DISCO's knowledge organisation: identity keys matched and updated, subspaces opened."""
from __future__ import annotations

import logging
import math
import re

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger("fcit.server")

AGGREGATORS = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi")


class CapacityError(RuntimeError):
    """More task clusters arrived than the model has LoRA subspaces (the official code crashes with an
    index error or silently drops keys; we stop with this message instead)."""


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


def dropouts(clients: list[int], p: float, seed: int, stage: int, rnd: int) -> set[int]:
    """Positions whose client fails before its upload this round, each with probability p, drawn from a generator
    keyed by (seed, stage, round, client), so the same clients fail on every rank and after a resume."""
    if p <= 0:
        return set()
    return {i for i, c in enumerate(clients)
            if np.random.default_rng([int(seed), int(stage), int(rnd), int(c) % 2 ** 32, 0xD0]).random() < p}


def nbytes(state: dict) -> int:
    """Bytes of a state dict: what a client sends or receives."""
    return sum(t.numel() * t.element_size() for t in state.values())


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


def _centroid(mu: torch.Tensor, n: list[float], members: list[int]) -> torch.Tensor:
    """Sample-weighted mean of the members' identity tokens, float64."""
    w = torch.tensor([float(n[k]) for k in members], dtype=torch.float64)
    return (w[:, None] * mu[members].double()).sum(0) / w.sum()


def _greedy_clusters(members: list[int], sim: torch.Tensor, tau: float) -> list[list[int]]:
    """Client i opens a cluster with every not-yet-clustered j with cos(μ_i, μ_j) ≥ τ, in client order (the
    official code does not skip clustered j, so its clusters can overlap)."""
    clusters, visited = [], set()
    for i in members:
        if i not in visited:
            c = [i] + [j for j in members if j != i and j not in visited and float(sim[i, j]) >= tau - THRESH_EPS]
            visited |= set(c)
            clusters.append(c)
    return clusters


def _nearest(target: torch.Tensor, candidates: list[tuple]) -> tuple[object, float]:
    """(label, cos) of the candidate (label, vector) most similar to target."""
    sims = _cos(target[None], torch.stack([v.double() for _, v in candidates]))[0]
    return candidates[int(sims.argmax())][0], float(sims.max())


def organize(mu: torch.Tensor, n: list[float], keys: torch.Tensor, sizes: torch.Tensor, tau: float = 0.9,
             small_client: float = 1e-3, on_full: str = "error", info: dict | None = None):
    """DKO: assign the round's clients (identity tokens mu (N, D), sample counts n) to subspaces, given the global
    keys (K, D) and sizes (K,) (a slot is empty iff its size is 0). A client takes the key it matches (cos ≥ τ);
    the others cluster among themselves and each cluster opens an empty subspace; a client below `small_client`
    of the round's samples joins the nearest key or cluster instead. More clusters than free subspaces: a
    CapacityError, or with on_full="nearest" the largest open them and the rest join their nearest (logged in
    info["merged_on_full"]). Returns (subspace per client, subspaces opened in order)."""
    used = [j for j in range(keys.shape[0]) if float(sizes[j]) > 0]
    slot = [-1] * mu.shape[0]
    if used:
        best, arg = _cos(mu, keys[used]).max(dim=1)                  # (N,) against the global keys
        slot = [used[int(a)] if float(b) >= tau - THRESH_EPS else -1 for b, a in zip(best, arg)]
    tot = float(sum(n))
    unmatched = [i for i in range(mu.shape[0]) if slot[i] < 0]
    small = [i for i in unmatched if tot > 0 and n[i] / tot < small_client]
    sim = _cos(mu, mu)
    small_set = set(small)
    clusters = _greedy_clusters([i for i in unmatched if i not in small_set], sim, tau)
    cands = [(("key", j), keys[j]) for j in used] + [(("cluster", c), _centroid(mu, n, m))
                                                    for c, m in enumerate(clusters)]
    joined = {}                        # small client -> ("key", slot) or ("cluster", index)
    for i in small:
        if cands:
            joined[i] = _nearest(mu[i].double(), cands)[0]
    clusters += _greedy_clusters([i for i in small if i not in joined], sim, tau)
    cslot, opened, merged = _open_subspaces(clusters, mu, n, keys, sizes, used, tau, on_full)
    for c, members in enumerate(clusters):
        for i in members:
            slot[i] = cslot[c]
    for i, (kind, idx) in joined.items():
        slot[i] = idx if kind == "key" else cslot[idx]
    if merged:
        logger.warning("DISCO: no free subspace for %d cluster(s); joined the nearest: %s", len(merged), merged)
    if info is not None:
        info["merged_on_full"] = merged
    return slot, opened


def _open_subspaces(clusters, mu, n, keys, sizes, used, tau, on_full):
    """Each new cluster opens the next empty subspace; the overflow raises or joins its nearest (on_full).
    Returns (subspace per cluster, opened, merges)."""
    free = [j for j in range(keys.shape[0]) if float(sizes[j]) <= 0]
    keep, overflow = list(range(len(clusters))), []
    if len(clusters) > len(free):
        if on_full != "nearest":
            raise CapacityError(
                f"DISCO needs {len(clusters)} new subspace(s) this round but only {len(free)} of "
                f"K={keys.shape[0]} are free (tau={tau}). More distinct tasks arrived than subspaces: raise "
                f"--subspaces (and --rank with it), lower --tau, or let overflowing clusters join their nearest "
                f"subspace (--on-full nearest).")
        order = sorted(range(len(clusters)), key=lambda c: -sum(n[i] for i in clusters[c]))
        keep, overflow = sorted(order[:len(free)]), order[len(free):]
    cslot = dict(zip(keep, free))
    opened = [cslot[c] for c in keep]
    merged = []
    for c in overflow:
        cands = [(j, keys[j]) for j in used] + [(cslot[k], _centroid(mu, n, clusters[k])) for k in keep]
        cslot[c], cos = _nearest(_centroid(mu, n, clusters[c]), cands)
        merged.append({"clients": list(clusters[c]), "slot": cslot[c], "cos": round(cos, 4)})
    return cslot, opened, merged


def update_keys(keys: torch.Tensor, sizes: torch.Tensor, slot: list[int], mu: torch.Tensor, n: list[float]):
    """Sample-weighted running mean of the identity keys, in place (DKO):
    key_j ← (size_j · key_j + Σ_{k→j} n_k μ_k) / (size_j + Σ_{k→j} n_k),  size_j += Σ_{k→j} n_k."""
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
