"""torch.distributed: the same Federation code on 2 gloo processes (CPU) gives the same aggregated adapters as the
single-process run. Clients of a round are split across ranks (position p -> rank p % world); their
uploads and identity tokens are all-gathered, every rank aggregates identically."""
import json
import os
import socket
import sys
import tempfile
import warnings

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toy as tf  # noqa: E402

import checkpoint  # noqa: E402
import federate as fd  # noqa: E402

WORLD = 2


# DP-FedAvg noise, DISCO's noised identity tokens and client dropout are keyed by (seed, stage, round, client), so
# they agree across ranks too; FedSA keeps each client's B and what it trained on
UNRELIABLE = dict(dp_clip=0.5, dp_noise=0.3, client_dropout=0.3)
RUNS = {"disco": dict(method="disco"), "fedit": dict(method="fedit"),
        "disco-dp": dict(method="disco", on_full="nearest", **UNRELIABLE),
        "fedsa-dp": dict(method="fedsa", **UNRELIABLE)}


def _cfg(name):
    # 3 clients per round: rank 0 trains positions 0 and 2, rank 1 position 1 (an uneven split)
    return tf.tiny_cfg(clients=6, clients_per_round=3, rounds=2, local_epochs=2, dropout=0.05, **RUNS[name])


def _run(fed, method):
    """(tensors, meta) after two stages, meta with each round's dropped positions and epsilon."""
    log = []
    for s, task in enumerate("AB"):
        for r in range(fed.cfg.rounds):
            rec = fed.run_round(s, r, tf.client_data_for(task, s, r, n=16))
            log.append([[d["position"] for d in rec["dropped"]], rec.get("epsilon")])
        fed.end_stage(s)
    tensors, meta = fed.state_dict()
    return tensors, {**meta, "rounds": log}


def _eval_set():
    return tf.task_examples("A", 5, 3) + tf.task_examples("B", 4, 4)


def _worker(rank, port, base_dir, out_dir, methods):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    assert fd.init_distributed() == (rank, WORLD)
    try:
        base, tok = checkpoint.load_vlm(base_dir), checkpoint.load_tokenizer(base_dir)
        for method in methods:
            fed = fd.Federation(tf.copy.deepcopy(base), tok, None, _cfg(method))
            tensors, meta = _run(fed, method)
            client = fed.eval_clients()[0]                                   # FedSA: a client's own model
            preds = fed.predict(_eval_set(), batch_size=4, client=client, distributed=True)   # sharded evaluation
            if rank == 0:       # rank 0 writes (safetensors + JSON: nothing is unpickled)
                save_file(tensors, os.path.join(out_dir, f"{method}.safetensors"))
                with open(os.path.join(out_dir, f"{method}.json"), "w") as f:
                    json.dump({"meta": meta, "preds": preds}, f)
    finally:
        torch.distributed.barrier()   # no rank tears gloo down while the other still talks to it
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_single_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        methods = list(RUNS)
        base, tok = tf.tiny_model()
        with tempfile.TemporaryDirectory() as d:
            base_dir = os.path.join(d, "base")
            checkpoint.save_vlm(base, base_dir, tokenizer=tok)
            try:
                mp.spawn(_worker, args=(_free_port(), base_dir, d, methods), nprocs=WORLD, join=True)
            except mp.ProcessExitedException as e:
                # Seen 2 times in ~10 full-suite runs on a loaded 2-core box, never alone: a worker aborts in gloo's
                # C++ teardown ("terminate called without an active exception") after its work is done. Rank 0
                # writes its results after the last collective, so with every result file present the run itself
                # completed; anything else is a real failure.
                done = all(os.path.exists(os.path.join(d, f"{m}.json")) for m in methods)
                if e.signal_name != "SIGABRT" or not done:
                    raise
                warnings.warn(f"gloo teardown aborted after the run completed: {e}")
            for method in methods:
                fed = fd.Federation(tf.copy.deepcopy(base), tok, None, _cfg(method))
                single, meta1 = _run(fed, method)
                multi = load_file(os.path.join(d, f"{method}.safetensors"))
                with open(os.path.join(d, f"{method}.json")) as f:
                    saved = json.load(f)
                meta2, preds = saved["meta"], saved["preds"]
                assert preds == fed.predict(_eval_set(), batch_size=4, client=fed.eval_clients()[0])
                assert set(single) == set(multi)
                for k in single:
                    assert torch.allclose(single[k].double(), multi[k].double(), atol=1e-6, rtol=1e-5), (method, k)
                assert meta1["method_state"] == meta2["method_state"]
                assert meta1["rounds"] == meta2["rounds"] and meta1["dp_rounds"] == meta2["dp_rounds"]
                if method.endswith("-dp"):      # some clients dropped, the same ones; the accountant counted 4 rounds
                    dropped = [p for d, _ in meta1["rounds"] for p in d]
                    assert 0 < len(dropped) < 12 and meta1["dp_rounds"] == 4
                    assert meta1["rounds"][-1][1] == fd.privacy_spent(fed)["epsilon"] > 0
                if method == "fedsa-dp":
                    assert len(meta1["method_state"]["personal"]) >= 2
                if method == "disco":
                    assert meta1["method_state"]["open_order"] == [0, 1]
                    assert meta1["method_state"]["slot_data"] == meta2["method_state"]["slot_data"]
                    b1 = [v for k, v in single.items() if k.startswith("global/") and k.endswith(".B.1")]
                    assert b1 and all(float(v.abs().sum()) > 0 for v in b1)      # subspace 1 was trained
    finally:
        torch.set_num_threads(threads)
