"""Many clients are cheap. Not a test: prints measurements.

  (a) memory vs clients N: for each N in --clients, a fresh process builds the embedded setup as fcit.py does
      (FCIT-mini with the same total data for every N, its partitions for N clients by data.load_partitions, the
      tiny VLM, a DISCO Federation with the embedded task preset and --per-round clients per round) and runs
      --rounds round(s) of stage 1. It reports its peak RSS (getrusage ru_maxrss) after each phase and the bytes of
      the tensors alive after the rounds. Target: peak(N) / peak(first N) ~ 1 (only a round's clients train).
  (b) server time vs clients per round K: disco.aggregate_subspaces (server.aggregate of one LoRA subspace and
      of the projector, as after a DISCO round) of K uploads (random tensors of the tiny model's shapes) with
      fedavg and fedadam, and DISCO's knowledge organisation (disco.organize + update_keys) of K identity tokens
      drawn around 8 task centres; median of repeats. Target: linear in K: time per client ~ constant, marginal
      cost per client (between consecutive K) ~ constant, R^2 of a linear fit ~ 1.

The memory processes are started through a small launcher: a process started straight from this one would inherit
its peak RSS (Linux carries ru_maxrss over fork and exec), so N would be measured against this process's peak.

    python bench/clients.py                                   # N = 50, 200, 1000; K = 5, 50, 200, 1000
    python bench/clients.py --clients 50,1000 --per-round 5,1000 --threads 0 --json runs/bench_clients.json
"""
import argparse
import dataclasses
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import data  # noqa: E402
import disco  # noqa: E402
import fcit  # noqa: E402
import federate  # noqa: E402
import mini  # noqa: E402
import server  # noqa: E402

SETTING = "task-hom"
LAUNCH = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
MEMORY_FIELDS = ("clients", "samples", "samples_per_client", "round_samples", "peak_import_mb", "peak_data_mb",
                 "peak_model_mb", "peak_mb", "tensor_mb", "ratio", "time_s")
AGG_FIELDS = ("kind", "k", "median_s", "per_client_us")
FIT_FIELDS = ("kind", "slope_us_per_client", "intercept_ms", "r2", "marginal_us", "marginal_ratio")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def peak_mb() -> float:
    """This process's peak resident set size so far, MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2 ** 20 if sys.platform == "darwin" else r / 1024


def tensor_mb() -> float:
    """MiB of the distinct tensor storages reachable from Python objects (the model, adapters, global state)."""
    seen, total = set(), 0
    with warnings.catch_warnings():          # isinstance on torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type == "cpu"]
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total / 2 ** 20


def make_data(root: str, n_train: int, seed: int = 0) -> str:
    """FCIT-mini of the setting's datasets into root (a no-op when root already holds the same)."""
    datasets = sorted({ds for k in range(data.num_stages(SETTING)) for ds in data.task_datasets(SETTING, k)})
    return mini.make_fcit_mini(root, seed=seed, n_train=n_train, n_test=1, datasets=datasets)


def embedded_federation(n_clients: int, per_round: int, rounds: int):
    """The embedded tiny VLM and a DISCO Federation with fcit.py's embedded task preset; returns (fed, cfg)."""
    argv = ["--setting", SETTING, "--methods", "disco", "--clients", str(n_clients),
            "--clients-per-round", str(per_round), "--rounds", str(rounds)]
    cfg = fcit.resolve_config(fcit.build_parser().parse_args(argv))
    model, tok, improc, text_encoder = fcit.load_model(cfg, "cpu", "float32")
    cfg = dataclasses.replace(cfg, method="disco", device="cpu", dtype="float32")
    return federate.Federation(model, tok, improc, cfg, text_encoder), cfg


# ----------------------------------------------------------------------------------------------------
# (a) memory: one fresh process per N


def child_memory(n_clients: int, root: str, n_train: int, per_round: int, rounds: int) -> dict:
    """Inside the fresh process: build data, partitions, model and federation, run the rounds; peak RSS per phase."""
    out = {"clients": n_clients, "peak_import_mb": peak_mb()}
    t0 = time.perf_counter()
    make_data(root, n_train)
    parts = data.load_partitions(root, SETTING, 1.0, n_clients, seed=0)
    out["samples"] = sum(len(c) for task in parts for c in task)
    out["samples_per_client"] = out["samples"] / (n_clients * len(parts))
    out["peak_data_mb"] = peak_mb()
    fed, cfg = embedded_federation(n_clients, per_round, rounds)
    torch.manual_seed(cfg.seed)
    out["peak_model_mb"] = peak_mb()
    get = lambda position, client: parts[data.stage_task_for(SETTING, 0, position)][client]
    out["round_samples"] = []
    for rnd in range(rounds):
        rec = fed.run_round(0, rnd, get, log=lambda s: None)
        out["round_samples"].append([c["n"] for c in rec["per_client"]])
    gc.collect()
    out.update(peak_mb=peak_mb(), tensor_mb=tensor_mb(), time_s=time.perf_counter() - t0)
    return out


def measure_memory(clients: list[int], root: str, n_train: int, per_round: int = 5, rounds: int = 1,
                   threads: int = 1) -> list[dict]:
    """One fresh process per N (through the launcher); adds each peak's ratio to the first N's."""
    make_data(root, n_train)         # once, here: the children only read it
    rows = []
    for n in clients:
        cmd = [sys.executable, "-c", LAUNCH, sys.executable, os.path.abspath(__file__), "--child", str(n),
               "--cache", root, "--n-train", str(n_train), "--per-round", str(per_round), "--rounds", str(rounds),
               "--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"memory child for N={n} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    for r in rows:
        r["ratio"] = r["peak_mb"] / rows[0]["peak_mb"]
    return rows


# ----------------------------------------------------------------------------------------------------
# (b) server time vs clients per round


def fake_uploads(fed, k: int, seed: int = 0) -> list[server.Upload]:
    """k uploads of subspace 0 (+ projector) as the round's kept clients: the global state plus noise."""
    g = torch.Generator().manual_seed(seed)
    names = fed.method.job(0).shared + fed.proj_names
    return [server.Upload(i, i, int(torch.randint(1, 100, (1,), generator=g)), 0, {}, 0,
                          state={n: fed.global_state[n] + 0.01 * torch.randn(fed.global_state[n].shape, generator=g)
                                 for n in names}) for i in range(k)]


def time_call(fn, repeats: int) -> float:
    """Median wall seconds of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def aggregation_fn(fed, kept: list[server.Upload], kind: str):
    """One aggregation of `kept` with a fresh server optimizer of `kind`, from the same global state every call."""
    base = dict(fed.global_state)

    def run():
        fed.global_state = dict(base)
        fed.opt = server.ServerOptimizer(kind)
        if not disco.aggregate_subspaces(fed, kept):
            raise RuntimeError("aggregate not finite")
    return run


def organize_fn(fed, k: int, seed: int = 0):
    """DISCO's server step for k clients: DKO from empty keys, then the key update (identities around 8 tasks)."""
    g = torch.Generator().manual_seed(seed)
    dim = fed.model.lm.embed_tokens.weight.shape[1]
    centres = torch.randn(8, dim, generator=g)
    mu = centres[torch.arange(k) % 8] + 0.1 * torch.randn(k, dim, generator=g)
    n = [int(x) for x in torch.randint(1, 100, (k,), generator=g)]
    cfg = fed.cfg

    def run():
        keys, sizes = torch.zeros(fed.K, dim), torch.zeros(fed.K, dtype=torch.float64)
        slot, _ = disco.organize(mu, n, keys, sizes, cfg.tau, cfg.small_client, "nearest")
        disco.update_keys(keys, sizes, slot, mu, n)
    return run


def measure_aggregation(ks: list[int], kinds=("fedavg", "fedadam", "disco-dko"), repeats: int = 5) -> dict:
    """Median time of each server step for each K; per-client time and a linear fit per kind."""
    fed, _ = embedded_federation(max(5, max(ks)), 5, 1)
    uploads = fake_uploads(fed, max(ks))
    rows = []
    for kind in kinds:
        for k in ks:
            fn = organize_fn(fed, k) if kind == "disco-dko" else aggregation_fn(fed, uploads[:k], kind)
            t = time_call(fn, repeats)
            rows.append({"kind": kind, "k": k, "median_s": t, "per_client_us": t / k * 1e6})
    params = sum(t.numel() for t in uploads[0].state.values())
    return {"rows": rows, "fits": [linear_fit([r for r in rows if r["kind"] == kind]) for kind in kinds],
            "upload_params": params, "repeats": repeats}


def linear_fit(rows: list[dict]) -> dict:
    """Least squares time = a + b K, its R^2, and the marginal cost per client between consecutive K."""
    k = np.array([r["k"] for r in rows], dtype=float)
    t = np.array([r["median_s"] for r in rows], dtype=float)
    b, a = np.polyfit(k, t, 1) if len(k) > 1 else (t[0] / k[0], 0.0)
    ss = float(((t - t.mean()) ** 2).sum())
    r2 = 1.0 - float(((t - (a + b * k)) ** 2).sum()) / ss if ss > 0 else 1.0
    marg = [float((t[i + 1] - t[i]) / (k[i + 1] - k[i]) * 1e6) for i in range(len(k) - 1)]
    ratio = marg[-1] / marg[0] if len(marg) > 1 and marg[0] > 0 else None
    return {"kind": rows[0]["kind"], "slope_us_per_client": float(b) * 1e6, "intercept_ms": float(a) * 1e3,
            "r2": r2, "marginal_us": marg, "marginal_ratio": ratio}


# ----------------------------------------------------------------------------------------------------
# report


def print_memory(rows: list[dict], per_round: int, rounds: int):
    print(f"(a) memory vs clients N: fresh process per N; DISCO, {per_round} clients per round, {rounds} round(s) of "
          f"stage 1; peak RSS (ru_maxrss, MiB) after each phase")
    print(f"{'N':>6} {'samples':>8} {'per client':>10} {'import':>8} {'+data':>8} {'+model':>8} {'peak':>8} "
          f"{'tensors':>8} {'peak/first':>10} {'time s':>7}  sampled clients' samples")
    for r in rows:
        print(f"{r['clients']:>6} {r['samples']:>8} {r['samples_per_client']:>10.1f} {r['peak_import_mb']:>8.1f} "
              f"{r['peak_data_mb']:>8.1f} {r['peak_model_mb']:>8.1f} {r['peak_mb']:>8.1f} {r['tensor_mb']:>8.1f} "
              f"{r['ratio']:>10.3f} {r['time_s']:>7.1f}  {r['round_samples']}")


def print_aggregation(rep: dict):
    print(f"(b) server time vs clients per round K: median of {rep['repeats']}; an upload is "
          f"{rep['upload_params']:,} parameters (one LoRA subspace + projector)")
    ks = sorted({r["k"] for r in rep["rows"]})
    print(f"{'kind':<10} " + " ".join(f"{'K=' + str(k):>10}" for k in ks) + "   per client (us) at each K")
    for fit in rep["fits"]:
        rows = [r for r in rep["rows"] if r["kind"] == fit["kind"]]
        print(f"{fit['kind']:<10} " + " ".join(f"{r['median_s'] * 1e3:>8.2f}ms" for r in rows) + "   "
              + " ".join(f"{r['per_client_us']:.1f}" for r in rows))
    print(f"{'kind':<10} {'slope us/client':>15} {'intercept ms':>12} {'R^2':>7}  marginal us/client (last/first)")
    for f in rep["fits"]:
        ratio = "-" if f["marginal_ratio"] is None else f"{f['marginal_ratio']:.2f}"
        print(f"{f['kind']:<10} {f['slope_us_per_client']:>15.1f} {f['intercept_ms']:>12.2f} {f['r2']:>7.4f}  "
              + " ".join(f"{m:.1f}" for m in f["marginal_us"]) + f"  ({ratio})")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=ints, default=[50, 200, 1000], help="comma list of clients N (memory)")
    ap.add_argument("--per-round", type=ints, default=[5, 50, 200, 1000],
                    help="comma list of clients per round K (server time); the memory runs use 5")
    ap.add_argument("--n-train", type=int, default=None, help="FCIT-mini training samples per task, the same for "
                    "every N (default: the largest N: every client needs one)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of stage 1 in each memory run")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per server step (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default). 1: the tiny model "
                    "and the server steps gain nothing from threads, and on a busy shared CPU they make tiny ops "
                    "erratic (a 5k-element sqrt took 8 ms with 2 threads, 5 us with 1)")
    ap.add_argument("--cache", default=None, help="folder for FCIT-mini and its partitions (default: a temp folder, "
                    "removed afterwards)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-aggregation", action="store_true")
    ap.add_argument("--json", default=None, help="write the numbers to this file")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.n_train = args.n_train or max(args.clients)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(child_memory(args.child, args.cache, args.n_train, args.per_round[0], args.rounds)))
        return
    print(f"clients N={args.clients}, {args.n_train} samples per task for every N; per round K={args.per_round}; "
          f"threads={torch.get_num_threads()}")
    report = {"setting": SETTING, "n_train": args.n_train, "threads": torch.get_num_threads()}
    if not args.skip_memory:
        root = args.cache or tempfile.mkdtemp(prefix="fcit-bench-clients-")
        try:
            report["memory"] = measure_memory(args.clients, root, args.n_train, 5, args.rounds, args.threads)
        finally:
            if args.cache is None:
                shutil.rmtree(root, ignore_errors=True)
        print_memory(report["memory"], 5, args.rounds)
    if not args.skip_aggregation:
        report["aggregation"] = measure_aggregation(args.per_round, repeats=args.repeats)
        print_aggregation(report["aggregation"])
    if args.json:
        data.atomic_write_json(args.json, report, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
