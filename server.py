"""The server side of a federation: client sampling and dropout, what a client uploads and its screening, and
aggregation (FedAvg and the server optimizers of Reddi et al. 2021). The aggregators' names are config.AGGREGATORS,
the one list the command line offers (config imports nothing of the federation)."""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from config import AGGREGATORS

logger = logging.getLogger("fcit.server")


@dataclass
class Upload:
    """What one client sends back after a round: its sample count n (the FedAvg weight; 0 = nothing to aggregate)
    and, if it trained `slot`, the tensors the server aggregates (`state`: its shared LoRA tensors and the projector),
    the method's extra tensors (EWC's Fisher), what it keeps (`local`: FedSA's B) and its training statistics."""
    client: int
    position: int
    n: int
    rank: int
    datasets: dict[str, int]                  # {dataset: samples}
    slot: int | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    local: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: float | None = None
    steps: int | None = None
    time_s: float | None = None
    trainable_params: int | None = None


# ----------------------------------------------------------------------------------------------------
# client sampling


def sample_clients(n_clients: int, per_round: int, seed: int, stage: int, rnd: int,
                   scheme: str = "seeded") -> list[int]:
    """Uniform sampling without replacement; the order is the position (Het-FCIT maps positions to tasks).

    official: the draw of FCIT's and Shepherd's client_selection, set(np.random.choice(...)) after
    np.random.seed(stage*10 + round), made on a local RandomState (same numbers, global RNG untouched; independent of
    `seed`, and repeating for stages with more than 10 rounds, as the original does); train.py enumerates that set, so
    the positions follow the set's iteration order (`set_order`). seeded: a local generator keyed by (seed, stage,
    round), in the order drawn."""
    if not 0 < per_round <= n_clients:
        raise ValueError(f"need 0 < clients_per_round ({per_round}) <= n_clients ({n_clients})")
    if scheme == "official":
        rng = np.random.RandomState(int(stage) * 10 + int(rnd))
        return set_order([int(c) for c in rng.choice(np.arange(n_clients), per_round, replace=False)])
    if scheme == "seeded":
        rng = np.random.default_rng([int(seed), int(stage), int(rnd)])
        return [int(c) for c in rng.choice(n_clients, size=per_round, replace=False)]
    raise ValueError(f"client sampling scheme {scheme!r}; expected 'seeded' or 'official'")


SET_MINSIZE, LINEAR_PROBES, PERTURB_SHIFT = 8, 9, 5       # CPython's Objects/setobject.c


def set_order(keys: list[int]) -> list[int]:
    """The order in which CPython (3.7 to 3.13, setobject.c) iterates set(keys), for distinct ints in [0, 2^61 - 1)
    (hash(i) == i, numpy's integers alike), written out: the slots of an 8-slot table, grown to the smallest power of
    two above 4·used (2·used past 50,000) once 5·fill >= 3·mask, the old table re-inserted slot by slot."""
    table: list[int | None] = [None] * SET_MINSIZE
    for used, key in enumerate(keys, 1):
        if not 0 <= key < 2 ** 61 - 1:
            raise ValueError(f"set_order: key {key} is not an int in [0, 2^61 - 1)")
        _set_insert(table, key)
        if used * 5 >= (len(table) - 1) * 3:
            size = SET_MINSIZE
            while size <= (used * 2 if used > 50000 else used * 4):
                size <<= 1
            old, table = table, [None] * size
            for k in old:
                if k is not None:
                    _set_insert(table, k)
    return [k for k in table if k is not None]


def _set_insert(table: list, key: int):
    """set_add_entry's probe sequence: slot hash & mask, then the next LINEAR_PROBES slots when they fit in the table,
    then i = 5i + 1 + perturb (perturb = hash, shifted right by PERTURB_SHIFT each time)."""
    mask, perturb = len(table) - 1, key
    i = key & mask
    while True:
        for j in range(i, i + (LINEAR_PROBES if i + LINEAR_PROBES <= mask else 0) + 1):
            if table[j] is None:
                table[j] = key
                return
        perturb >>= PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask


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
              n: list[float], opt: ServerOptimizer, lora_avg: str = "factors") -> dict[str, torch.Tensor]:
    """Aggregate the clients' parameters for the names of global_state; returns the new global values.

    n: client sample counts (FedAvg weights: the client's number of samples).
    fedavg/fedprox compute Σ p_k w_k directly (bit-exact with a hand-computed weighted mean); the other
    aggregators go through ServerOptimizer.step with Δ = Σ p_k (w_k − x)."""
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
            delta = sum(pk * (c[name].double() - g.double()) for pk, c in zip(p, client_states))
            out[name] = opt.step(name, g, delta.float())
    return out


def screen_clients(uploads: list[Upload]) -> tuple[list[Upload], list[dict]]:
    """Drop clients with no data or non-finite parameters / loss; returns (kept, dropped) where dropped entries
    carry a `reason`. Weights are renormalised by aggregate() over the kept ones."""
    kept, dropped = [], []
    for u in uploads:
        reason = None
        if u.n <= 0:
            reason = "empty client data"
        elif u.loss is not None and not math.isfinite(u.loss):
            reason = f"non-finite training loss ({u.loss})"
        elif not finite_state(u.state):
            reason = "non-finite parameters after local training"
        if reason:
            logger.warning("client %s excluded from aggregation: %s", u.client, reason)
            dropped.append({"client": u.client, "position": u.position, "reason": reason})
        else:
            kept.append(u)
    return kept, dropped
