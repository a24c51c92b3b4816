"""Client-level differential privacy for federated rounds (DP-FedAvg, McMahan et al. 2018): each client's update is
clipped to L2 norm C, the server adds Gaussian noise of standard deviation σ·C to the sum and divides by a fixed
denominator; an RDP accountant (Mironov et al. 2019) gives ε at δ. The client draws are a public function of public
numbers, so no amplification by sampling is claimed: each round a client takes part in is one Gaussian mechanism
(q = 1), and the reported ε is the worst client's (`worst_client`). Neighbouring data sets differ in one client's
data, replaced by none (its update and token zero: the "zero-out" relation of Kairouz et al. 2021)."""
from __future__ import annotations

import math

import torch

ORDERS = tuple(range(2, 65)) + (80, 96, 128, 256)   # integer RDP orders


def clip(update: dict[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """The update scaled to L2 norm at most max_norm, jointly over all its tensors; and its norm before clipping."""
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {n: t * scale for n, t in update.items()}, norm


def noise_generator(*key) -> torch.Generator:
    """A CPU generator keyed by integers (seed, stage, round, ...): the same noise on every rank and after a resume."""
    h = 0
    for k in key:
        h = (h * 1_000_003 + int(k) % (2 ** 61)) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(h)


def gaussian(shape, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).float() * std


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def rdp_sampled_gaussian(q: float, sigma: float, order: int) -> float:
    """RDP at an integer order of one step of the Gaussian mechanism (noise multiplier sigma) on a q-sampled batch:
    log Σ_i C(α,i) q^i (1-q)^(α-i) exp((i²-i)/(2σ²)) / (α-1) (Mironov et al. 2019, Sec. 3.3)."""
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return order / (2 * sigma ** 2)
    log_a = -math.inf
    for i in range(order + 1):
        log_coef = math.lgamma(order + 1) - math.lgamma(i + 1) - math.lgamma(order - i + 1)
        log_a = _log_add(log_a, log_coef + i * math.log(q) + (order - i) * math.log(1 - q)
                         + (i * i - i) / (2 * sigma ** 2))
    return log_a / (order - 1)


def epsilon(q: float, sigma: float, steps: int, delta: float, orders=ORDERS) -> tuple[float, int]:
    """(ε, best order) after `steps` compositions, by the RDP-to-(ε, δ) conversion of Balle et al. 2020 (Opacus')."""
    if steps == 0:
        return 0.0, orders[0]
    best = (math.inf, orders[0])
    for a in orders:
        rdp = steps * rdp_sampled_gaussian(q, sigma, a)
        eps = rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, (eps, a))
    return max(best[0], 0.0), best[1]


def worst_client(participations: dict, sigma: float, delta: float) -> tuple[float, int, int]:
    """(ε, best order, rounds) of the client that took part in the most rounds: its participations composed, each a
    Gaussian mechanism of noise multiplier sigma without amplification (q = 1)."""
    rounds = max(participations.values(), default=0)
    return (*epsilon(1.0, sigma, rounds, delta), rounds)


def effective_noise(*sigmas: float) -> float:
    """The noise multiplier of releasing several Gaussian mechanisms on the same sampled clients at once, each with
    unit sensitivity after scaling: 1/σ² = Σ 1/σ_i²."""
    if any(s == 0 for s in sigmas if s is not None):
        return 0.0
    inv = sum(1.0 / s ** 2 for s in sigmas if s is not None)
    return math.inf if inv == 0 else 1.0 / math.sqrt(inv)
