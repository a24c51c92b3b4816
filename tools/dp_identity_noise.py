"""At which identity-token noise σ_id DISCO's matching still works under DP: synthetic unit tokens clustered by task,
noised as disco.private_token noises them, organised by disco.organize and disco.update_keys (equal weights, as under
DP) through a Task-homogeneous run; a run succeeds when it opens exactly one subspace per task. Prints the success
rate per (D, σ_id), the bound 1/(1 + D σ_id²) >= τ that disco.check_private_matching applies, and the ε (δ = 1e-5)
of one round at the largest σ_id that always worked (the identity noise alone; the update noise only adds to it).

    python tools/dp_identity_noise.py                       # D = 64 and 768, 8 tasks, 5 clients x 10 rounds per stage
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import disco  # noqa: E402
import privacy  # noqa: E402
from methods import CapacityError  # noqa: E402


def task_tokens(dim, tasks, within, across, gen):
    """A sampler of clean unit tokens: task centres with pairwise cosine ~ `across`, client tokens of one task with
    pairwise cosine ~ `within` (each the mean feature of a client's many instructions)."""
    shared = torch.randn(dim, generator=gen, dtype=torch.float64)
    unit = lambda v: v / v.norm()
    centres = [unit(math.sqrt(across) * unit(shared) + math.sqrt(1 - across) * unit(torch.randn(
        dim, generator=gen, dtype=torch.float64))) for _ in range(tasks)]
    return lambda t: unit(math.sqrt(within) * centres[t] + math.sqrt(1 - within) * unit(torch.randn(
        dim, generator=gen, dtype=torch.float64)))


def run(dim, sigma, args, seed) -> bool:
    """One Task-homogeneous run: one subspace per task, every client of a stage in its task's subspace."""
    gen = torch.Generator().manual_seed(seed)
    token = task_tokens(dim, args.tasks, args.within, args.across, gen)
    keys, sizes = torch.zeros(args.tasks, dim), torch.zeros(args.tasks, dtype=torch.float64)
    owner = {}
    for t in range(args.tasks):
        for r in range(args.rounds):
            mu = torch.stack([token(t) + sigma * torch.randn(dim, generator=gen, dtype=torch.float64)
                              for _ in range(args.clients)]).float()
            n = [1] * args.clients
            if r == 0:                     # the official schedule: matched in round 0, kept through the stage
                try:
                    slot, _ = disco.organize(mu, n, keys, sizes, args.tau, 0.0)
                except CapacityError:
                    return False
                if len(set(slot)) != 1 or owner.setdefault(slot[0], t) != t:
                    return False
            disco.update_keys(keys, sizes, slot, mu, n)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="64,768")
    p.add_argument("--sigmas", default="0,0.005,0.0075,0.01,0.0125,0.015,0.02,0.025,0.03,0.04")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--within", type=float, default=0.98, help="clean cosine of two clients' tokens of one task")
    p.add_argument("--across", type=float, default=0.7, help="clean cosine of two tasks' centres")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--delta", type=float, default=1e-5)
    args = p.parse_args(argv)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    print(f"tau {args.tau}, {args.tasks} tasks, {args.clients} clients x {args.rounds} rounds per stage, clean "
          f"cosines {args.within} within a task and {args.across} across, {args.trials} runs each")
    print("| D | " + " | ".join(f"σ_id {s:g}" for s in sigmas) + " | bound √((1/τ − 1)/D) | ε after 1 round at the "
          "largest σ_id that always worked |")
    print("|---" * (len(sigmas) + 3) + "|")
    for dim in (int(d) for d in args.dims.split(",")):
        ok = [sum(run(dim, s, args, seed) for seed in range(args.trials)) / args.trials for s in sigmas]
        bound = math.sqrt((1 / args.tau - 1) / dim)
        best = max([s for s, x in zip(sigmas, ok) if x == 1.0], default=0.0)
        eps = privacy.epsilon(1.0, best, 1, args.delta)[0]
        cells = [f"{100 * x:.0f} %" for x in ok] + [f"{bound:.4f}", f"{eps:.3g} (σ_id {best:g})"]
        print(f"| {dim} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
