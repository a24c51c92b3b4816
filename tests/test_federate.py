"""Tests for federate.py: hand-computed aggregators, DISCO key updates / clustering, SSA weights, client sampling,
bad-client screening, and the end-to-end mechanism test on a tiny model (DISCO keeps stage-1 accuracy and
routes each task to its own subspace; Finetune forgets)."""
import copy
import math
import random
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from toy import (  # noqa: F401 (_one_thread: a fixture)
    _one_thread,
    accuracy,
    client_data_for,
    make_tokenizer,
    run_two_tasks,
    task_examples,
    tiny_cfg,
    tiny_model,
)

import data
import disco
import federate as fd
import imaging
import lora
import methods
import model as vlm
import server
from config import Config

# ----------------------------------------------------------------------------------------------------
# client sampling


def test_sample_clients_deterministic_local_rng():
    np.random.seed(123)
    random.seed(5)
    torch.manual_seed(7)
    np_state, py_state, t_state = np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state()
    a = server.sample_clients(50, 5, seed=0, stage=1, rnd=3)
    b = server.sample_clients(50, 5, seed=0, stage=1, rnd=3)
    assert a == b and len(set(a)) == 5 and all(0 <= c < 50 for c in a)
    assert (np.random.get_state()[1] == np_state).all() and random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), t_state)
    draws = {tuple(server.sample_clients(50, 5, 0, s, r)) for s in range(3) for r in range(10)}
    assert len(draws) > 25                       # different per (stage, round)
    assert server.sample_clients(50, 5, 1, 1, 3) != a   # and per seed
    assert sorted(server.sample_clients(4, 4, 0, 0, 0)) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        server.sample_clients(3, 4, 0, 0, 0)


# ----------------------------------------------------------------------------------------------------
# aggregators, hand-computed


G = {"w": torch.tensor([0.0, 0.0])}
C = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
N = [1, 3]                                  # p = [0.25, 0.75] -> weighted mean [2.5, 5.0]


@pytest.mark.parametrize("kind", ["fedavg", "fedprox"])
def test_fedavg_weighted_by_samples(kind):
    out = server.aggregate(G, C, N, server.ServerOptimizer(kind))
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    out = server.aggregate(G, C, [1, 1], server.ServerOptimizer(kind))
    assert torch.allclose(out["w"], torch.tensor([2.0, 4.0]))


def test_fedavgm_two_rounds():
    opt = server.ServerOptimizer("fedavgm", lr=1.0, momentum=0.5)
    x1 = server.aggregate(G, C, N, opt)["w"]                # m = Δ = [2.5, 5]; x = [2.5, 5]
    assert torch.allclose(x1, torch.tensor([2.5, 5.0]))
    x2 = server.aggregate({"w": x1}, C, N, opt)["w"]        # Δ = 0; m = 0.5 m; x = [3.75, 7.5]
    assert torch.allclose(x2, torch.tensor([3.75, 7.5]))
    opt = server.ServerOptimizer("fedavgm", lr=0.5, momentum=0.0)   # η scales the step
    assert torch.allclose(server.aggregate(G, C, N, opt)["w"], torch.tensor([1.25, 2.5]))


def _adaptive_ref(kind, deltas, lr, b1, b2, tau):
    """Scalar reference of Reddi et al. 2021 Algorithm 2, one coordinate, starting at x = 0."""
    x, m, v = 0.0, 0.0, tau * tau
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if kind == "fedadagrad":
            v = v + d * d
        elif kind == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
        x = x + lr * m / (math.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("kind", ["fedadagrad", "fedadam", "fedyogi"])
def test_adaptive_server_optimizers(kind):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = server.ServerOptimizer(kind, lr=lr, beta1=b1, beta2=b2, tau=tau)
    x = G
    deltas = {0: [], 1: []}
    for rnd in range(3):
        clients = [{"w": x["w"] + torch.tensor([1.0, -2.0]) * (rnd + 1)}, {"w": x["w"] + torch.tensor([3.0, 0.5])}]
        for i in range(2):   # Δ = 0.25 c1 + 0.75 c2 (relative)
            deltas[i].append(0.25 * [1.0, -2.0][i] * (rnd + 1) + 0.75 * [3.0, 0.5][i])
        x = server.aggregate(x, clients, N, opt)
    for i in range(2):
        ref = _adaptive_ref(kind, deltas[i], lr, b1, b2, tau)
        assert abs(float(x["w"][i]) - ref) < 1e-5, (kind, i, float(x["w"][i]), ref)
    # first step of FedAdam by hand: Δ=2.5, m=0.25, v=0.99e-6+0.0625 -> x = 0.1*0.25/(sqrt(v)+1e-3)
    if kind == "fedadam":
        opt = server.ServerOptimizer("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
        x1 = server.aggregate(G, C, N, opt)["w"]
        v = 0.99e-6 + 0.01 * 2.5 ** 2
        assert abs(float(x1[0]) - 0.1 * 0.25 / (math.sqrt(v) + 1e-3)) < 1e-6


def test_yogi_sign_branch():
    # v > Δ² -> yogi *increases* v (v - (1-β2)Δ² * sign(+)) ... i.e. decreases by (1-β2)Δ²; Adam would shrink v
    opt = server.ServerOptimizer("fedyogi", lr=1.0, beta1=0.0, beta2=0.5, tau=1.0)   # v0 = τ² = 1
    x = opt.step("w", torch.tensor([0.0]), torch.tensor([0.5]))   # Δ²=.25 < v: v = 1 - .5*.25 = .875
    assert torch.allclose(opt.v["w"], torch.tensor([0.875]))
    assert torch.allclose(x, torch.tensor([0.5 / (math.sqrt(0.875) + 1.0)]))
    x = opt.step("w", x, torch.tensor([2.0]))                     # Δ²=4 > v: v = .875 + .5*4 = 2.875
    assert torch.allclose(opt.v["w"], torch.tensor([2.875]))


def test_aggregate_keeps_separate_state_per_name():
    opt = server.ServerOptimizer("fedavgm", lr=1.0, momentum=0.9)
    for s in ("s0/w", "s1/w"):
        server.aggregate({s: G["w"]}, [{s: c["w"]} for c in C], N, opt)
    assert set(opt.m) == {"s0/w", "s1/w"}
    sd = opt.state_dict()
    opt2 = server.ServerOptimizer("fedavgm", lr=1.0, momentum=0.9)
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.m["s0/w"], opt.m["s0/w"])


def test_product_average_vs_factor_average():
    A1, B1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]])
    A2, B2 = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0], [0.0]])
    g = {"m.A.0": torch.zeros(1, 2), "m.B.0": torch.zeros(2, 1), "proj": torch.zeros(1)}
    cs = [{"m.A.0": A1, "m.B.0": B1, "proj": torch.ones(1)}, {"m.A.0": A2, "m.B.0": B2, "proj": torch.ones(1) * 3}]
    fac = server.aggregate(g, cs, [1, 1], server.ServerOptimizer("fedavg"))
    prod = server.aggregate(g, cs, [1, 1], server.ServerOptimizer("fedavg"), lora_avg="product")
    want = torch.tensor([[2.0, 0.0], [0.0, 0.0]])          # both clients' BA are exactly this
    assert torch.allclose(prod["m.B.0"] @ prod["m.A.0"], want, atol=1e-6)
    assert torch.allclose(fac["m.B.0"] @ fac["m.A.0"], torch.tensor([[2.25, 0.0], [0.0, 0.0]]))   # cross terms
    assert torch.allclose(prod["proj"], torch.tensor([2.0])) and torch.allclose(fac["proj"], torch.tensor([2.0]))
    # rank truncation: Σ of two orthogonal rank-1 products keeps the top singular direction
    cs = [{"m.A.0": torch.tensor([[1.0, 0.0]]), "m.B.0": torch.tensor([[3.0], [0.0]]), "proj": torch.zeros(1)},
          {"m.A.0": torch.tensor([[0.0, 1.0]]), "m.B.0": torch.tensor([[0.0], [1.0]]), "proj": torch.zeros(1)}]
    prod = server.aggregate(g, cs, [1, 1], server.ServerOptimizer("fedavg"), lora_avg="product")
    assert torch.allclose(prod["m.B.0"] @ prod["m.A.0"], torch.tensor([[1.5, 0.0], [0.0, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError):
        Config(aggregator="fedadam", lora_avg="product")


def test_screen_clients_drops_nan_and_empty():
    up = lambda c, n, loss, state: server.Upload(c, c, n, 0, {}, 0, state=state, loss=loss)
    ok = up(1, 4, 0.5, {"w": torch.ones(2)})
    bad = up(2, 4, 0.5, {"w": torch.tensor([1.0, float("nan")])})
    inf = up(3, 4, float("inf"), {"w": torch.ones(2)})
    empty = up(4, 0, None, {})
    kept, dropped = server.screen_clients([ok, bad, inf, empty])
    assert [u.client for u in kept] == [1]
    assert {d["client"]: d["reason"] for d in dropped} == {
        2: "non-finite parameters after local training", 3: "non-finite training loss (inf)", 4: "empty client data"}


# ----------------------------------------------------------------------------------------------------
# DISCO: key updates and clustering


def _unit(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_update_keys_running_mean_not_precedence_bug():
    keys, sizes = torch.zeros(3, 2), torch.zeros(3, dtype=torch.float64)
    keys[0], sizes[0] = _unit(1.0, 0.0), 2
    mu = torch.stack([_unit(0.0, 1.0), _unit(0.0, 3.0), _unit(5.0, 5.0)])
    disco.update_keys(keys, sizes, [0, 0, 1], mu, [2, 1, 4])
    # slot 0: (2*[1,0] + 2*[0,1] + 1*[0,3]) / (2+3) = [0.4, 1.0]; the official bug gives [2, 1]
    assert torch.allclose(keys[0], _unit(0.4, 1.0)) and float(sizes[0]) == 5
    assert torch.allclose(keys[1], _unit(5.0, 5.0)) and float(sizes[1]) == 4       # new slot: weighted mean
    assert float(sizes[2]) == 0 and torch.equal(keys[2], torch.zeros(2))


def test_organize_first_round_clusters_among_clients():
    keys, sizes = torch.zeros(4, 3), torch.zeros(4, dtype=torch.float64)
    mu = torch.stack([_unit(1, 0, 0), _unit(2, 0.1, 0), _unit(0, 1, 0), _unit(0, 0, 1), _unit(0, 1.1, 0.05)])
    slot, opened = disco.organize(mu, [10, 10, 10, 10, 10], keys, sizes, tau=0.9)
    assert slot == [0, 0, 1, 2, 1] and opened == [0, 1, 2]


def test_organize_matches_global_keys_and_opens_on_miss():
    keys, sizes = torch.zeros(4, 2), torch.zeros(4, dtype=torch.float64)
    keys[1], sizes[1] = _unit(1.0, 0.0), 100         # slot 0 empty, slot 1 used
    mu = torch.stack([_unit(1.0, 0.05), _unit(0.0, 1.0), _unit(0.02, 1.0)])
    slot, opened = disco.organize(mu, [5, 5, 5], keys, sizes, tau=0.9)
    assert slot == [1, 0, 0] and opened == [0]       # first empty slot is reused


def test_organize_exact_threshold():
    keys, sizes = torch.zeros(2, 2), torch.zeros(2, dtype=torch.float64)
    keys[0], sizes[0] = _unit(1.0, 0.0), 10
    at = _unit(0.9, math.sqrt(1 - 0.81))                 # cos = 0.9 exactly (up to rounding) -> match
    below = _unit(0.8999, math.sqrt(1 - 0.8999 ** 2))    # cos = 0.8999 -> miss
    assert disco.organize(at[None], [5], keys, sizes, tau=0.9) == ([0], [])
    assert disco.organize(below[None], [5], keys, sizes, tau=0.9) == ([1], [1])
    # same edge between clients of one round
    keys2, sizes2 = torch.zeros(3, 2), torch.zeros(3, dtype=torch.float64)
    assert disco.organize(torch.stack([_unit(1, 0), at]), [5, 5], keys2, sizes2, 0.9)[0] == [0, 0]
    assert disco.organize(torch.stack([_unit(1, 0), below]), [5, 5], keys2, sizes2, 0.9)[0] == [0, 1]


def test_organize_no_overlapping_clusters():
    # cos(0,1) >= τ, cos(1,2) >= τ, cos(0,2) < τ: the official code yields overlapping [0,1] and [2,1]
    a = math.radians(20)
    mu = torch.stack([_unit(1, 0), _unit(math.cos(a), math.sin(a)), _unit(math.cos(2 * a), math.sin(2 * a))])
    slot, opened = disco.organize(mu, [1, 1, 1], torch.zeros(3, 2), torch.zeros(3, dtype=torch.float64), 0.9)
    assert slot == [0, 0, 1] and opened == [0, 1]


def test_small_client_joins_nearest_even_when_first():
    keys, sizes = torch.zeros(4, 3), torch.zeros(4, dtype=torch.float64)
    mu = torch.stack([_unit(0.3, 0.1, 1.0), _unit(1, 0, 0), _unit(0, 1, 0)])
    n = [1, 1000, 1000]                                  # 1/2001 < 1e-3, and it comes first
    slot, opened = disco.organize(mu, n, keys, sizes, tau=0.9, small_client=1e-3)
    assert opened == [0, 1] and slot == [0, 0, 1]       # joined client 1's cluster (nearest), no own slot
    # not small (2/2002 > 1e-3): opens its own subspace
    slot, opened = disco.organize(mu, [3, 1000, 1000], keys, sizes, tau=0.9, small_client=1e-3)
    assert opened == [0, 1, 2] and slot == [0, 1, 2]
    # small client nearest to an existing key joins that key
    keys[3], sizes[3] = _unit(0.0, 0.2, 1.0), 50
    slot, opened = disco.organize(mu, n, keys, sizes, tau=0.99, small_client=1e-3)
    assert slot == [3, 0, 1] and opened == [0, 1]
    # every client small (share 1/3 < 0.5) and no key in use: nothing to join, so they cluster normally (the two
    # alike ones together) instead of being dropped
    mu3 = torch.stack([_unit(1, 0, 0), _unit(0, 0, 1), _unit(1, 0.05, 0)])
    slot, opened = disco.organize(mu3, [1, 1, 1], torch.zeros(3, 3), torch.zeros(3, dtype=torch.float64), 0.9, 0.5)
    assert slot == [0, 1, 0] and opened == [0, 1]


def test_organize_capacity_error():
    keys, sizes = torch.zeros(2, 2), torch.zeros(2, dtype=torch.float64)
    mu = torch.stack([_unit(1, 0), _unit(0, 1), _unit(-1, 0)])
    with pytest.raises(disco.CapacityError, match="raise --subspaces"):
        disco.organize(mu, [5, 5, 5], keys, sizes, tau=0.9)
    keys[0], keys[1], sizes[:] = _unit(1, 0), _unit(0, 1), 5
    assert disco.organize(mu[:2], [5, 5], keys, sizes, 0.9) == ([0, 1], [])     # full but matched: fine
    with pytest.raises(disco.CapacityError):
        disco.organize(mu[2:], [5], keys, sizes, 0.9)


# ----------------------------------------------------------------------------------------------------
# mechanism: DISCO keeps task A and routes per task; Finetune forgets


def test_mechanism_disco_vs_finetune():
    t0 = time.time()
    m, tok = tiny_model()
    disco = fd.Federation(m, tok, None, tiny_cfg(method="disco"))
    accs, logs, tests = run_two_tasks(disco)
    route = disco.routing_accuracy(tests)
    m2, _ = tiny_model()
    ft = fd.Federation(m2, tok, None, tiny_cfg(method="finetune"))
    accs_ft, _, _ = run_two_tasks(ft)
    print("disco", accs, "routing", route, disco.method.per_task, "finetune", accs_ft, f"{time.time() - t0:.1f}s")
    assert logs[0]["opened"] == [0] and logs[len(logs) // 2]["opened"] == [1]        # one subspace per task
    assert route >= 0.9
    assert accs[0]["A"] >= 0.8 and accs_ft[0]["A"] >= 0.8                           # both learn task A
    assert accs[1]["A"] >= accs[0]["A"] - 0.1                                       # DISCO keeps it
    assert accs_ft[1]["A"] <= accs_ft[0]["A"] - 0.5                                  # Finetune forgets
    assert accs[1]["B"] >= 0.5


# ----------------------------------------------------------------------------------------------------
# SSA weights


def test_ssa_weights_hand_computed():
    m, tok = tiny_model()
    fed = fd.Federation(m, tok, None, tiny_cfg(method="disco", subspaces=4, rank=16))
    fed.method.keys = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [5.0, 5.0]])
    fed.method.sizes = torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)       # slots 2, 3 empty
    f = torch.tensor([[1.0, 0.5], [0.0, -1.0]])
    a = fed.method.routing_weights(f)
    c = torch.tensor([1 / math.sqrt(1.25), 0.5 / math.sqrt(1.25)])
    e = torch.exp(c / 0.05)
    assert a.dtype == torch.float32 and a.shape == (2, 4)
    assert torch.allclose(a[0], torch.tensor([e[0] / e.sum(), e[1] / e.sum(), 0.0, 0.0]), atol=1e-6)
    e2 = torch.exp(torch.tensor([0.0, -1.0]) / 0.05)
    assert torch.allclose(a[1], torch.tensor([e2[0] / e2.sum(), e2[1] / e2.sum(), 0, 0]), atol=1e-6)
    assert torch.equal(fed.method.routing_weights(f, "argmax"), torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
    assert torch.equal(fed.method.routing_weights(f, "concat"), torch.tensor([[1.0, 1, 0, 0], [1.0, 1, 0, 0]]))
    assert torch.allclose(fed.method.routing_weights(f, "cosine"), torch.tensor([[c[0], c[1], 0, 0], [0, -1.0, 0, 0]]))
    fed.method.keys = None
    assert torch.equal(fed.method.routing_weights(f), torch.zeros(2, 4))            # before training: base model


def test_route_variants():
    keys = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 0], [1, 1, 0]])
    f = torch.tensor([[3.0, 0, 0], [0, 1.0, 1.0]])
    cos = torch.tensor([[1, 0, 0, 1 / math.sqrt(2)], [0, 1 / math.sqrt(2), 0, 0.5]])
    torch.testing.assert_close(disco.route(f, keys, "cosine"), cos)
    torch.testing.assert_close(disco.route(f, keys, "softmax", 0.05), torch.softmax(cos / 0.05, -1))
    torch.testing.assert_close(disco.route(f, keys, "argmax"), torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]]))
    torch.testing.assert_close(disco.route(f, keys, "concat"), torch.ones(2, 4))
    valid = torch.tensor([False, True, False, True])
    sv = disco.route(f, keys, "softmax", 0.05, valid=valid)
    assert float(sv[:, ~valid].abs().max()) == 0
    torch.testing.assert_close(sv[:, valid], torch.softmax(cos[:, valid] / 0.05, -1))
    torch.testing.assert_close(disco.route(f, keys, "argmax", valid=valid),
                               torch.tensor([[0.0, 0, 0, 1], [0, 1, 0, 0]]))
    torch.testing.assert_close(disco.route(f, keys, "concat", valid=valid), valid.float().expand(2, 4))
    assert disco.route(f[0], keys).shape == (1, 4)
    assert disco.route(f.half(), keys.bfloat16()).dtype == torch.float32
    assert float(disco.route(f, keys, valid=torch.zeros(4, dtype=torch.bool)).abs().sum()) == 0
    with pytest.raises(ValueError, match="routing mode"):
        disco.route(f, keys, "topk")


# ----------------------------------------------------------------------------------------------------
# engine behaviour: accounting, bad clients, resume, aggregators, methods


def test_warmup_schedule_like_transformers():
    # get_cosine_schedule_with_warmup: step 0 of a warmup has lr 0, so a client with a single optimizer step does
    # not move (as in the official code); steps >= 2 do.
    assert fd.lr_multiplier(0, 1, 1) == 0.0 and fd.lr_multiplier(1, 2, 1) == 1.0
    assert fd.lr_multiplier(5, 10, 0) == pytest.approx(0.5) and fd.lr_multiplier(2, 100, 4) == 0.5


def test_round_accounting_and_log():
    m, tok = tiny_model()
    fed = fd.Federation(m, tok, None, tiny_cfg(method="disco", local_epochs=1))
    rec = fed.run_round(0, 0, client_data_for("A", 0, 0, n=10))
    sub = lora.subspace_bytes(fed.model, 0)
    assert rec["clients"] == server.sample_clients(4, 2, 0, 0, 0) and rec["opened"] == [0]
    for c in rec["per_client"]:
        assert c["n"] == 10 and c["slot"] == 0 and c["steps"] == 2 and c["time_s"] > 0
        assert c["bytes_up"] == sub + 64 * 4                  # subspace 0 + the identity token (float32, D=64)
        assert c["bytes_down"] == sub
        assert c["trainable_params"] == sub // 4
    assert rec["bytes_up"] == 2 * (sub + 256) and rec["samples"] == 20 and math.isfinite(rec["loss"])
    assert fed.state_dict()[1]["method_state"]["slot_data"] == {"0": {"A": 20}}


def test_bad_clients_excluded_and_renormalised(monkeypatch):
    m, tok = tiny_model()
    fed = fd.Federation(m, tok, None, tiny_cfg(method="finetune", local_epochs=1))
    sel = server.sample_clients(4, 2, 0, 0, 0)
    good = task_examples("A", 12, 3)
    # position 0 has no data: the round equals training position 1 alone (weight renormalised to 1)
    rec = fed.run_round(0, 0, lambda p, c: [] if p == 0 else good)
    assert rec["dropped"] == [{"client": sel[0], "position": 0, "reason": "empty client data"}]
    alone = fd.Federation(*tiny_model(), None, tiny_cfg(method="finetune", local_epochs=1))
    u = alone._local_train(good, 0, 0, 0, 1, sel[1])
    for n, t in u.state.items():
        assert torch.allclose(fed.global_state[n], t, atol=1e-7)
    # a NaN loss: excluded with its reason, the global model stays finite and unchanged by it
    before = {k: v.clone() for k, v in fed.global_state.items()}
    orig = fed.model.loss

    def nan_loss(*a, **k):
        out = orig(*a, **k)
        return out * float("nan") if k.get("labels", a[1] if len(a) > 1 else None) is not None and \
            fed._nan_now else out
    fed._nan_now = True
    monkeypatch.setattr(fed.model, "loss", nan_loss)
    rec = fed.run_round(0, 1, client_data_for("A", 0, 1))
    assert {d["reason"] for d in rec["dropped"]} == {"non-finite training loss (nan)"} and len(rec["dropped"]) == 2
    assert all(torch.equal(before[k], v) for k, v in fed.global_state.items())
    assert rec["loss"] is None and server.finite_state(fed.global_state)


def test_resume_is_exact():
    cfg = tiny_cfg(method="disco", aggregator="fedadam", server_lr=0.01, local_epochs=1, dropout=0.05)
    a = fd.Federation(*tiny_model(), None, cfg)
    for r in range(2):
        a.run_round(0, r, client_data_for("A", 0, r, n=12))
    tensors, meta = a.state_dict()
    import json
    meta = json.loads(json.dumps(meta))                        # JSON round trip, as fcit.py stores it
    b = fd.Federation(*tiny_model(), None, cfg)
    b.load_state_dict(tensors, meta)
    a.end_stage(0), b.end_stage(0)
    ra = a.run_round(1, 0, client_data_for("B", 1, 0, n=12))
    rb = b.run_round(1, 0, client_data_for("B", 1, 0, n=12))
    assert ra["assignments"] == rb["assignments"] == {"0": 1, "1": 1}
    ta, tb = a.state_dict()[0], b.state_dict()[0]
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(ValueError):
        fd.Federation(*tiny_model(), None, tiny_cfg(method="finetune")).load_state_dict(tensors, meta)


@pytest.mark.parametrize("agg,extra", [("fedprox", {}), ("fedavgm", {}), ("fedadagrad", {}), ("fedadam", {}),
                                       ("fedyogi", {}), ("fedavg", {"lora_avg": "product"})])
def test_every_aggregator_runs_with_disco(agg, extra):
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="disco", aggregator=agg, local_epochs=1, **extra))
    g0 = {k: v.clone() for k, v in fed.global_state.items()}
    rec = fed.run_round(0, 0, client_data_for("A", 0, 0, n=12))
    assert not rec["dropped"] and server.finite_state(fed.global_state)
    changed = [k for k in g0 if not torch.equal(g0[k], fed.global_state[k])]
    assert changed and all(k.endswith(".0") for k in changed)          # only subspace 0 was trained
    if agg not in ("fedavg", "fedprox"):
        assert fed.opt.m                                                # server optimizer state exists


def test_fedprox_pulls_towards_global():
    ex = task_examples("A", 16, 1)
    far = []
    for mu in (0.0, 100.0):
        fed = fd.Federation(*tiny_model(), None,
                            tiny_cfg(method="fedit", aggregator="fedprox", prox_mu=mu, local_epochs=2))
        u = fed._local_train(ex, 0, 0, 0, 0, 0)
        far.append(sum(float((u.state[n] - fed.global_state[n]).norm() ** 2) for n in u.state))
    assert far[1] < far[0]


def test_olora_one_subspace_per_stage_and_penalty():
    cfg = tiny_cfg(method="olora", rounds=1, local_epochs=2, olora_lambda=1.0)
    fed = fd.Federation(*tiny_model(), None, cfg)
    accs, logs, _ = run_two_tasks(fed)
    assert [c["slot"] for c in logs[0]["per_client"]] == [0, 0] and [c["slot"] for c in logs[1]["per_client"]] == [1, 1]
    fed.method.prepare_inference([])                                  # inference sums the subspaces of both stages
    assert all(m.alpha.tolist() == [1.0, 1.0] for m in lora.lora_modules(fed.model).values())
    assert logs[1]["per_client"][0]["bytes_down"] == 2 * lora.subspace_bytes(fed.model, 0)   # old one is needed
    with pytest.raises(methods.CapacityError):
        fed.run_round(2, 0, client_data_for("A", 2, 0))
    # the penalty is what lowers the overlap: the same run (same seed, data, init) without it overlaps more
    free = fd.Federation(*tiny_model(), None, tiny_cfg(method="olora", rounds=1, local_epochs=2, olora_lambda=0.0))
    run_two_tasks(free)
    ov, ov0 = float(lora.subspace_overlap(fed.model)[0, 1]), float(lora.subspace_overlap(free.model)[0, 1])
    print("olora overlap with / without the penalty", ov, ov0)
    assert ov < 0.8 * ov0


def _hand_fisher(fed, state, exs):
    """Independent diagonal empirical Fisher at `state`: one padded batch, each sample's own mean token loss
    written out by hand, its gradient taken alone; F = mean over samples of the squared gradients."""
    names = fed.slot_names(0)
    fed.load(state)
    lora.set_active(fed.model, 0)
    params = [fed.params[n] for n in names]
    b = fed.batch(exs)
    h = fed.model.hidden_states(b["input_ids"], None, b["attention_mask"])[:, :-1]
    tgt = b["labels"][:, 1:]
    ce = F.cross_entropy(fed.model.lm_head(h).float().transpose(1, 2), tgt.clamp_min(0), reduction="none")
    valid = (tgt != -100).float()
    per_sample = (ce * valid).sum(1) / valid.sum(1)
    fis = {n: torch.zeros_like(p) for n, p in zip(names, params)}
    for i in range(len(exs)):
        for n, g in zip(names, torch.autograd.grad(per_sample[i], params, retain_graph=True)):
            fis[n] += g.detach() ** 2 / len(exs)
    for p in params:
        p.requires_grad_(False)
    fed.load(fed.global_state)
    return fis


def test_ewc_fisher_per_sample_and_online_consolidation():
    lam = 10.0
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="ewc", rounds=1, local_epochs=1, ewc_lambda=lam))
    n_at = {0: 6, 1: 10}                                      # unequal clients: the stage Fisher is sample-weighted
    expected_F, anchors = {}, []
    for stage, task in enumerate("AB"):
        g0 = {k: v.clone() for k, v in fed.global_state.items()}
        data = lambda p, c: task_examples(task, n_at[p], 100 * stage + c)
        rec = fed.run_round(stage, 0, data)                    # rounds=1: the stage's last round computes Fisher
        sel = rec["clients"]
        sub = lora.subspace_bytes(fed.model, 0)
        assert [c["bytes_up"] for c in rec["per_client"]] == [2 * sub, 2 * sub]        # adapter + its Fisher
        assert all(c["bytes_down"] == (3 * sub if stage else sub) for c in rec["per_client"])   # + F and w*
        want = {n: torch.zeros_like(v) for n, v in g0.items()}
        for p in (0, 1):                                       # the client's final weights, then its Fisher by hand
            u = fed._local_train(data(p, sel[p]), 0, stage, 0, p, sel[p], start=g0)
            for n, f in _hand_fisher(fed, u.state, data(p, sel[p])).items():
                want[n] += f * n_at[p] / 16
        assert max(float(f.max()) for f in want.values()) > 1e-8
        for n in want:
            assert torch.allclose(fed.method.stage_fisher[n], want[n], rtol=1e-3, atol=1e-4 * float(want[n].max())), n
        info = fed.end_stage(stage)
        for n in want:                                         # online EWC: F <- F + F_stage, w* <- global weights
            expected_F[n] = expected_F.get(n, 0) + want[n]
            assert torch.allclose(fed.method.F[n], expected_F[n], rtol=1e-3, atol=1e-4 * float(expected_F[n].max()))
            assert torch.equal(fed.method.star[n], fed.global_state[n])
        assert set(fed.method.F) == set(fed.slot_names(0)) and fed.method.stage_fisher == {}
        assert info["fisher_mean"] == pytest.approx(float(torch.cat([f.flatten() for f in expected_F.values()]).mean()),
                                                    rel=1e-3)
        anchors.append({n: fed.global_state[n].clone() for n in want})
    assert any(not torch.equal(anchors[0][n], anchors[1][n]) for n in anchors[0])       # the anchor moved
    # the client penalty at some weights w: λ/2 Σ F (w − w*)², by hand
    names = fed.slot_names(0)
    g = torch.Generator().manual_seed(0)
    w = {n: anchors[1][n] + 0.01 * torch.randn(anchors[1][n].shape, generator=g) for n in names}
    fed.load(w)
    got = float(fd.client_penalty(fed, names, None, fed.method.configure(0)).detach())
    m = float(torch.cat([f.flatten() for f in expected_F.values()]).double().mean())      # F̂ = F / mean(F)
    want_pen = lam / 2 * sum(float((expected_F[n] / m * (w[n] - anchors[1][n]) ** 2).sum()) for n in names)
    assert got == pytest.approx(want_pen, rel=1e-3) and want_pen > 0


def test_mechanism_ewc_retains_first_task_at_default_lambda():
    """At the default λ, EWC keeps clearly more of task A than Finetune on the mechanism task while learning B."""
    ewc = fd.Federation(*tiny_model(), None, tiny_cfg(method="ewc"))
    assert ewc.cfg.ewc_lambda == Config.ewc_lambda == 1.0
    accs, _, _ = run_two_tasks(ewc)
    ft = fd.Federation(*tiny_model(), None, tiny_cfg(method="finetune"))
    accs_ft, _, _ = run_two_tasks(ft)
    print("ewc", accs, "finetune", accs_ft, "lambda", ewc.cfg.ewc_lambda)
    assert accs[0]["A"] >= 0.8 and accs_ft[0]["A"] >= 0.8
    assert accs[1]["A"] >= accs_ft[1]["A"] + 0.4                                   # keeps A (Finetune: 0)
    assert accs[1]["B"] >= 0.5                                                      # and still learns B


def test_moelora_trains_experts_and_router():
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="moelora", local_epochs=3))
    g0 = {k: v.clone() for k, v in fed.global_state.items()}
    rec = fed.run_round(0, 0, client_data_for("A", 0, 0, n=12))
    changed = {k for k in g0 if not torch.equal(g0[k], fed.global_state[k])}
    assert any(k.endswith("router.weight") for k in changed) and any(k.endswith(".B.1") for k in changed)
    assert rec["per_client"][0]["trainable_params"] == sum(v.numel() for v in g0.values())
    assert len(fed.predict(task_examples("A", 3, 0))) == 3


def test_zeroshot_mtl_local():
    z = fd.Federation(*tiny_model(), None, tiny_cfg(method="zeroshot"))
    assert z.run_round(0, 0, client_data_for("A", 0, 0))["skipped"] and z.global_state == {}
    assert len(z.predict(task_examples("A", 2, 0))) == 2
    calls = []
    mtl = fd.Federation(*tiny_model(), None, tiny_cfg(method="mtl", local_epochs=1))
    rec = mtl.run_round(0, 0, lambda p, c: calls.append((p, c)) or task_examples("A", 8, 0) + task_examples("B", 8, 0))
    assert calls == [(None, c) for c in rec["clients"]]
    loc = fd.Federation(*tiny_model(), None, tiny_cfg(method="local", local_epochs=2))
    g0 = {k: v.clone() for k, v in loc.global_state.items()}
    rec = loc.run_round(0, 0, client_data_for("A", 0, 0, n=8))
    assert loc.eval_clients() == sorted(rec["clients"])
    assert all(torch.equal(g0[k], loc.global_state[k]) for k in g0)      # nothing is aggregated
    c0, c1 = loc.eval_clients()
    assert not torch.equal(loc.method.states[c0][loc.slot_names(0)[1]], loc.method.states[c1][loc.slot_names(0)[1]])
    assert len(loc.predict(task_examples("A", 2, 0), client=c0)) == 2
    with pytest.raises(ValueError):
        loc.predict(task_examples("A", 2, 0))


def test_disco_orthogonal_subspaces():
    fed = fd.Federation(*tiny_model(), None,
                        tiny_cfg(method="disco", orthogonal_subspaces=True, rounds=1, local_epochs=2))
    run_two_tasks(fed)
    assert fed.method.open_order == [0, 1]
    assert float(lora.subspace_overlap(fed.model, reduce="max")[0, 1]) < 1e-4


def test_disco_with_clip_text_encoder():
    from tokenizers import AddedToken
    m, tok = tiny_model()
    ctok = copy.deepcopy(tok)
    ctok.tok.add_special_tokens([AddedToken("<|startoftext|>", special=True),
                                 AddedToken("<|endoftext|>", special=True)])
    ctok.bos_id, ctok.eos_id = ctok.tok.token_to_id("<|startoftext|>"), ctok.tok.token_to_id("<|endoftext|>")
    ccfg = vlm.CLIPTextConfig(vocab_size=len(ctok), hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                              num_attention_heads=4, max_position_embeddings=77, projection_dim=16, pad_token_id=0,
                              bos_token_id=ctok.bos_id, eos_token_id=ctok.eos_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tower = vlm.CLIPTextTower(ccfg).eval()
    fed = fd.Federation(m, tok, None, tiny_cfg(method="disco", rounds=1, local_epochs=1), text_encoder=(tower, ctok))
    f = disco.identity_features(fed, task_examples("A", 3, 0) + task_examples("B", 3, 0))
    assert f.shape == (6, 48)                                  # pooled, unprojected (as FCIT uses CLIP)
    _, logs, tests = run_two_tasks(fed)
    assert fed.method.keys.shape == (2, 48) and fed.method.open_order == [0, 1]
    assert fed.routing_accuracy(tests) == 1.0


def test_image_identity_and_projector_averaged(tmp_path):
    from PIL import Image
    tok = make_tokenizer()
    text = vlm.DecoderConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                             pad_token_id=3)
    vis = vlm.VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = vlm.VLM(vlm.VLMConfig(text=text, vision=vis, image_token_index=4)).eval()
    paths = []
    for i, col in enumerate([(255, 0, 0), (0, 0, 255)]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (20, 16), col).save(p)
        paths.append(str(p))
    exs = lambda k: [data.Example("A", "please tell me the color of this fruit : apple", "red", image=paths[k], qid=i)
                     for i in range(6)]
    cfg = tiny_cfg(method="disco", identity="image", local_epochs=3, tau=0.99)
    fed = fd.Federation(m, tok, imaging.ImageProcessor.clip(16), cfg, text_encoder=None)
    p0 = {n: fed.global_state[n].clone() for n in fed.proj_names}
    rec = fed.run_round(0, 0, lambda p, c: exs(p))
    assert fed.method.keys.shape == (2, 16) and rec["opened"] == [0, 1]           # red and blue images: two identities
    assert fed.proj_names and all(not torch.equal(p0[n], fed.global_state[n]) for n in fed.proj_names)
    sub = lora.subspace_bytes(fed.model, 0)
    proj = sum(fed.global_state[n].numel() * 4 for n in fed.proj_names)
    assert rec["per_client"][0]["bytes_up"] == sub + proj + 16 * 4
    assert len(fed.predict(exs(0)[:2] + exs(1)[:2])) == 4


def test_grad_accumulation_and_checkpointing_are_equivalent():
    ex = task_examples("A", 16, 2)
    states = []
    for kw in ({"batch_size": 8, "grad_accum": 1}, {"batch_size": 4, "grad_accum": 2},
               {"batch_size": 8, "grad_accum": 1, "gradient_checkpointing": True}):
        fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="fedit", local_epochs=2, max_grad_norm=0.0, **kw))
        # the same permutation: two micro-batches of 4 hold the batch of 8 (equal supervised tokens each)
        u = fed._local_train(ex, 0, 0, 0, 0, 0)
        assert u.steps == 4 and not fed.model.gradient_checkpointing
        states.append(u.state)
    for s in states[1:]:
        for n in s:
            assert torch.allclose(s[n], states[0][n], atol=1e-5), n


def test_organize_on_full_nearest():
    keys, sizes = torch.zeros(2, 2), torch.zeros(2, dtype=torch.float64)
    keys[0], sizes[0] = _unit(1, 0), 10
    mu = torch.stack([_unit(0, 1), _unit(-1, 0.2), _unit(0.7, -1)])   # three new clusters, one free slot
    info = {}
    slot, opened = disco.organize(mu, [5, 50, 5], keys, sizes, 0.9, on_full="nearest", info=info)
    # the biggest cluster (client 1) opens slot 1; client 0 is nearer to client 1 (cos .19) than to key 0 (0);
    # client 2 is nearer to key 0 (cos .57)
    assert opened == [1] and slot == [1, 1, 0]
    assert [d["clients"] for d in info["merged_on_full"]] == [[0], [2]]
    with pytest.raises(disco.CapacityError, match="--on-full nearest"):
        disco.organize(mu, [5, 50, 5], keys, sizes, 0.9)


def test_disco_het_round_opens_one_subspace_per_task_and_aggregates_separately():
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="disco", clients_per_round=4, local_epochs=2))
    task_of = {0: "A", 1: "B", 2: "A", 3: "B"}                  # Het-FCIT: the position picks the task
    g0 = {k: v.clone() for k, v in fed.global_state.items()}
    rec = fed.run_round(0, 0, lambda p, c: task_examples(task_of[p], 16, 10 * p + c))
    assert rec["assignments"] == {"0": 0, "1": 1, "2": 0, "3": 1} and rec["opened"] == [0, 1]
    assert fed.method.slot_data == {0: {"A": 32}, 1: {"B": 32}}
    # slot 0 = FedAvg of the two A clients' slot-0 uploads only: retrain them alone and compare
    sel = rec["clients"]
    ups = [fed._local_train(task_examples("A", 16, 10 * p + sel[p]), 0, 0, 0, p, sel[p], start=g0) for p in (0, 2)]
    for n in fed.slot_names(0):
        assert torch.allclose(fed.global_state[n], 0.5 * ups[0].state[n] + 0.5 * ups[1].state[n], atol=1e-6)
    assert fed.routing_accuracy({"A": task_examples("A", 8, 1), "B": task_examples("B", 8, 2)}) == 1.0


def test_fedit_alpaca_train_on_inputs():
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="fedit", template="alpaca", train_on_inputs=True,
                                                      local_epochs=2, lora_targets=("q_proj", "k_proj", "v_proj",
                                                                                    "o_proj")))
    b = fed.batch(task_examples("A", 2, 0))
    assert int((b["labels"] != -100).sum()) > 10                 # the prompt is supervised too
    rec = fed.run_round(0, 0, client_data_for("A", 0, 0, n=16))
    assert not rec["dropped"] and rec["per_client"][0]["trainable_params"] == sum(
        fed.global_state[n].numel() for n in fed.slot_names(0))


def test_identity_center_option():
    base, tok = tiny_model()                  # the bare base model, no adapters: the reference computation
    exs = task_examples("A", 4, 0) + task_examples("B", 4, 0)

    @torch.no_grad()
    def states(text):                         # (T, C) final hidden states of one unpadded text
        return base.hidden_states(torch.tensor([tok.encode(text)]))[0].float()
    ref = torch.cat([states(t) for t in disco.REFERENCE_TEXTS]).mean(0)           # mean over all reference tokens
    want_plain = torch.stack([states(e.instruction).mean(0) for e in exs])
    want_cen = torch.stack([F.normalize(states(e.instruction) - ref, dim=-1).mean(0) for e in exs])
    feats = {}
    for center in (False, True):
        fed = fd.Federation(*tiny_model(), None, tiny_cfg(identity_center=center))
        with torch.no_grad():                 # non-zero adapters: the identity must still come from the base LM
            for n in fed.lora_names:
                fed.params[n].normal_(0, 0.5)
        feats[center] = disco.identity_features(fed, exs, batch_size=3)      # padded batches of mixed lengths
    assert feats[True].shape == (8, 64)
    assert torch.allclose(feats[False], want_plain, atol=1e-4)
    assert torch.allclose(feats[True], want_cen, atol=1e-4)
    assert not torch.allclose(want_plain, want_cen, atol=1e-2)


@pytest.mark.parametrize("assign", ["every_round", "round0"])
def test_disco_assign_every_round_vs_round0(assign):
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="disco", local_epochs=1, assign=assign, subspaces=4))
    r0 = fed.run_round(0, 0, lambda p, c: task_examples("AB"[p], 12, c))
    assert r0["assignments"] == {"0": 0, "1": 1}
    r1 = fed.run_round(0, 1, lambda p, c: task_examples("BA"[p], 12, c))        # the positions swap tasks
    assert r1["assignments"] == ({"0": 1, "1": 0} if assign == "every_round" else {"0": 0, "1": 1})
    t, meta = fed.state_dict()
    assert meta["method_state"]["pos_slot"] == {"stage": 0, "0": 0, "1": 1}
    if assign == "every_round":    # (round0 has just mixed B into key 0 and A into key 1, as the official code would)
        r2 = fed.run_round(1, 0, lambda p, c: task_examples("BA"[p], 12, c))
        assert r2["assignments"] == {"0": 1, "1": 0}
    else:   # a new stage matches again from its round 0: on clean keys (A -> 0, B -> 1) the swapped positions
        fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="disco", local_epochs=1, assign=assign,
                                                          subspaces=4))
        fed.run_round(0, 0, lambda p, c: task_examples("AB"[p], 12, c))
        assert fed.method.pos_slot == {"stage": 0, "0": 0, "1": 1}
        r2 = fed.run_round(1, 0, lambda p, c: task_examples("BA"[p], 12, c))
        assert r2["assignments"] == {"0": 1, "1": 0} and r2["opened"] == []
        assert fed.method.pos_slot == {"stage": 1, "0": 1, "1": 0}
        r3 = fed.run_round(1, 1, lambda p, c: task_examples("AB"[p], 12, c))   # reused within the stage
        assert r3["assignments"] == {"0": 1, "1": 0} and fed.method.pos_slot == {"stage": 1, "0": 1, "1": 0}


def test_fedsa_shares_a_and_keeps_b_on_each_client():
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="fedsa", local_epochs=1, train_projector=False))
    g0 = {k: v.clone() for k, v in fed.global_state.items()}
    data = lambda p, c: task_examples("A", 6 + 4 * p, c)
    rec = fed.run_round(0, 0, data)
    sel = server.sample_clients(4, 2, 0, 0, 0)
    ref = fd.Federation(*tiny_model(), None, tiny_cfg(method="finetune", local_epochs=1, train_projector=False))
    ups = [ref._local_train(data(p, sel[p]), 0, 0, 0, p, sel[p]) for p in (0, 1)]
    a_names = [n for n in fed.lora_names if ".A." in n]
    b_names = [n for n in fed.lora_names if ".B." in n]
    for n in a_names:                                   # A: FedAvg over the clients, weights 6 : 10
        want = (6 * ups[0].state[n].double() + 10 * ups[1].state[n].double()) / 16
        assert torch.allclose(fed.global_state[n].double(), want, atol=1e-6)
    for n in b_names:                                   # B: the global one never moves, each client keeps its own
        assert torch.equal(fed.global_state[n], g0[n])
        for p in (0, 1):
            assert torch.equal(fed.method.states[sel[p]][n], ups[p].state[n])
    a_bytes = sum(fed.global_state[n].numel() * 4 for n in a_names)
    assert all(c["bytes_up"] == a_bytes == c["bytes_down"] for c in rec["per_client"])   # only A travels
    w = fed.method.weights_for(sel[0])
    assert torch.equal(w[b_names[0]], ups[0].state[b_names[0]]) and torch.equal(w[a_names[0]],
                                                                                    fed.global_state[a_names[0]])
    start = fed.method.weights_for(sel[1])                                               # it trains from its own B
    assert all(start[n] is fed.method.states[sel[1]][n] for n in b_names) and fed.eval_clients() == sorted(sel)
    assert fed.method.personal == {sel[0]: {"A": 6}, sel[1]: {"A": 10}}                 # what each client trained on
    back = fd.Federation(*tiny_model(), None, tiny_cfg(method="fedsa", local_epochs=1, train_projector=False))
    back.load_state_dict(*fed.state_dict())                                              # resume keeps it
    assert back.method.personal == fed.method.personal
    assert all(torch.equal(back.method.states[c][n], fed.method.states[c][n]) for c in sel for n in b_names)


def test_predict_batches_by_length_and_answers_in_input_order(monkeypatch):
    """predict sorts the prompts by length before batching (less left padding) and puts each answer, and each row's
    routing weights, back with its own example."""
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="disco"))
    words = [5, 1, 9, 3, 7, 2, 8]
    exs = [data.Example("A", " ".join(["apple"] * n), "x", qid=i) for i, n in enumerate(words)]
    alpha = torch.arange(len(exs), dtype=torch.float32)[:, None].repeat(1, fed.K)        # row i carries i
    monkeypatch.setattr(fed.method, "prepare_inference", lambda examples: alpha)
    routed, lengths = [], []
    monkeypatch.setattr(fd.lora, "set_routing", lambda model, a: routed.append(a[:, 0].long().tolist()))

    def fake_generate(input_ids, attention_mask=None, **kw):
        assert kw["compile"] is False                                  # --compile's default
        lengths.append(attention_mask.sum(1).tolist())
        return [[int(n)] for n in attention_mask.sum(1)]
    monkeypatch.setattr(fed.model, "generate", fake_generate)
    monkeypatch.setattr(fed.tok, "decode", lambda ids, skip_special_tokens=True: str(ids[0]))
    out = fed.predict(exs, batch_size=3)
    assert routed == [[1, 5, 3], [0, 4, 6], [2]]                     # examples by instruction length, 3 at a time
    flat = [n for b in lengths for n in b]
    assert flat == sorted(flat) and len(lengths) == 3
    by_len = dict(zip([i for b in routed for i in b], flat))
    assert out == [str(by_len[i]) for i in range(len(exs))]           # each answer back in its example's place
