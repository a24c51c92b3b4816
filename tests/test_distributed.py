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
import test_federate as tf  # noqa: E402

import checkpoint  # noqa: E402
import federate as fd  # noqa: E402

WORLD = 2


def _cfg(method):
    # 3 clients per round: rank 0 trains positions 0 and 2, rank 1 position 1 (an uneven split)
    return tf.tiny_cfg(method=method, clients=6, clients_per_round=3, rounds=2, local_epochs=2, dropout=0.05)


def _run(fed, method):
    for s, task in enumerate("AB"):
        for r in range(fed.cfg.rounds):
            fed.run_round(s, r, tf.client_data_for(task, s, r, n=16))
        fed.end_stage(s)
    tensors, meta = fed.state_dict()
    return tensors, meta


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
            preds = fed.predict(_eval_set(), batch_size=4, distributed=True)   # sharded evaluation
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
        methods = ["disco", "fedit"]
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
                assert preds == fed.predict(_eval_set(), batch_size=4)
                assert set(single) == set(multi)
                for k in single:
                    assert torch.allclose(single[k].double(), multi[k].double(), atol=1e-6, rtol=1e-5), (method, k)
                assert meta1["method_state"] == meta2["method_state"]
                if method == "disco":
                    assert meta1["method_state"]["open_order"] == [0, 1]
                    assert meta1["method_state"]["slot_data"] == meta2["method_state"]["slot_data"]
                    b1 = [v for k, v in single.items() if k.startswith("global/") and k.endswith(".B.1")]
                    assert b1 and all(float(v.abs().sum()) > 0 for v in b1)      # subspace 1 was trained
    finally:
        torch.set_num_threads(threads)
