"""Methods as their papers and official code run them: EWC's scale-free penalty (Fisher normalised by its mean), MTL
as the official `multask` (one federated stage over every stage's data pooled and re-partitioned), FedSA-LoRA scored
on each client's own tasks (FederatedScope's per-client evaluation) and re-loadable from its exported adapter."""
import pytest
import torch
from toy import _one_thread, task_examples, tiny_cfg, tiny_model  # noqa: F401 (_one_thread: a fixture)

import adapters
import fcit
import federate as fd
import methods
import server
from config import Config

# ----------------------------------------------------------------------------------------------------
# EWC


def _ewc_penalty(F, lam, delta):
    """configure()'s regulariser at w = w* + delta[n] everywhere on tensor n, for a Fisher F on two tensors."""
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="ewc", ewc_lambda=lam))
    n1, n2 = fed.slot_names(0)[:2]
    fed.method.F = {n1: torch.full_like(fed.global_state[n1], F[0]), n2: torch.full_like(fed.global_state[n2], F[1])}
    fed.method.star = {n: fed.global_state[n].clone() for n in (n1, n2)}
    fed.load({n: fed.global_state[n] + delta[i] for i, n in enumerate((n1, n2))})
    reg = fed.method.configure(0)
    return float(reg().detach()), fed.global_state[n1].numel(), fed.global_state[n2].numel()


def test_ewc_penalty_is_lambda_half_sum_of_mean_normalised_fisher_times_squared_shift():
    # F = 1 on tensor 1 (s1 entries), 3 on tensor 2 (s2): mean m = (s1 + 3 s2) / (s1 + s2); shifts 0.1 and 0.2
    got, s1, s2 = _ewc_penalty((1.0, 3.0), 2.0, (0.1, 0.2))
    m = (s1 + 3 * s2) / (s1 + s2)
    assert got == pytest.approx(2.0 / 2 * (1 / m * 0.01 * s1 + 3 / m * 0.04 * s2), rel=1e-5)
    # the loss's scale (the Fisher times c) leaves the penalty unchanged: λ means the same at every scale
    assert _ewc_penalty((1e-6, 3e-6), 2.0, (0.1, 0.2))[0] == pytest.approx(got, rel=1e-5)
    assert _ewc_penalty((1e4, 3e4), 2.0, (0.1, 0.2))[0] == pytest.approx(got, rel=1e-5)
    assert Config.ewc_lambda == 1.0


def test_ewc_without_fisher_mass_has_no_penalty():
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="ewc"))
    n = fed.slot_names(0)[0]
    fed.method.F, fed.method.star = {n: torch.zeros_like(fed.global_state[n])}, {n: fed.global_state[n].clone()}
    assert fed.method.configure(0) is None


# ----------------------------------------------------------------------------------------------------
# MTL: the official multask


def test_mtl_is_one_federated_stage_with_the_usual_rounds_and_client_draws():
    cfg = tiny_cfg(method="mtl", rounds=3, local_epochs=1, clients=6, clients_per_round=2)
    fed = fd.Federation(*tiny_model(), None, cfg)
    s = fed.method.schedule
    assert (s.rounds, s.local_epochs, s.stages(8)) == (3, 1, 1)        # train.py: num_communication_rounds, 1 epoch
    calls = []
    rec = fed.run_round(0, 1, lambda p, c: calls.append((p, c)) or task_examples("A", 6, c) + task_examples("B", 4, c))
    drawn = server.sample_clients(6, 2, 0, 0, 1, "seeded")              # the round's usual draw, 2 of 6 clients
    assert rec["clients"] == drawn and len(set(drawn)) == 2
    assert calls == [(None, c) for c in drawn]                          # each its share of the pooled data
    assert [c["n"] for c in rec["per_client"]] == [10, 10] and rec["samples"] == 20


def _bench(parts, stage_parts, stages, clients, seed=0):
    b = object.__new__(fcit.Benchmark)
    b.cfg = tiny_cfg(method="mtl", clients=clients, clients_per_round=1, beta=1.0, seed=seed)
    b.parts, b.stage_parts, b.stages = parts, stage_parts, stages
    return b


def test_mtl_pools_every_stage_and_repartitions_it_over_the_clients():
    # task 0 held as shards [a0 a1 | a2], task 1 as [b0 | b1 b2 b3 | b4]: pooled, every record once, in part order
    parts = [[["a0", "a1"], ["a2"], []], [["b0"], ["b1", "b2", "b3"], ["b4"]]]
    b = _bench(parts, [[0], [1]], 2, 3)
    every = ["a0", "a1", "a2", "b0", "b1", "b2", "b3", "b4"]
    assert b.pooled() == every
    shares = [b.pooled(c) for c in range(3)]
    assert sorted(x for s in shares for x in s) == sorted(every) and all(shares)     # a partition, none empty
    idx = methods.MTL.partition(8, b.cfg)                                # quantity skew, keyed apart from the tasks'
    assert shares == [[every[i] for i in ix] for ix in idx]
    assert methods.MTL.partition(8, _bench(parts, [[0], [1]], 2, 3, seed=1).cfg) != idx    # the seed moves it
    assert any(set(s) & {"a0", "a1", "a2"} and set(s) & {"b0", "b1", "b2", "b3", "b4"} for s in shares)   # mixed
    first = _bench(parts, [[0], [1]], 1, 3)                              # --stages 1: stage 1's data only
    assert first.pooled() == ["a0", "a1", "a2"]
    assert sorted(x for c in range(3) for x in first.pooled(c)) == ["a0", "a1", "a2"]


# ----------------------------------------------------------------------------------------------------
# FedSA-LoRA: each client on its own tasks


class _Bench:
    tasks = ["tA", "tB"]
    test_datasets = {"tA": ["A"], "tB": ["B"]}


def test_fedsa_scores_each_client_only_on_the_tasks_its_data_holds(monkeypatch):
    # client 0 trained on task A only, client 1 on A and B; score(c, k) = 10 (c + 1) + k by hand
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="fedsa"))
    fed.method.personal = {0: {"A": 5}, 1: {"A": 3, "B": 4}}
    scored = []

    def score(f, bench, k, c, cache=None):
        scored.append((c, k))
        return 10.0 * (c + 1) + k
    monkeypatch.setattr(fcit, "client_score", score)
    row = fcit.evaluate(fed, _Bench(), [0, 1])
    assert sorted(scored) == [(0, 0), (1, 0), (1, 1)]                    # never client 0 on task B
    assert row == [(10.0 + 20.0) / 2, 21.0]                              # a task: the mean over the clients holding it
    p = fcit.evaluate_personalized(fed, _Bench(), [0, 1])
    assert p == {"clients": {"0": {"tasks": {"tA": 10.0}, "mean": 10.0},
                             "1": {"tasks": {"tA": 20.0, "tB": 21.0}, "mean": 20.5}}, "mean": (10.0 + 20.5) / 2}
    fed.method.personal = {0: {"A": 5}}                                  # nobody holds B: not scored, None
    assert fcit.evaluate(fed, _Bench(), [0, 1]) == [10.0, None]
    local = fd.Federation(*tiny_model(), None, tiny_cfg(method="local"))  # FedIT's local: every client, every task
    local.method.personal = {0: {"A": 5}, 1: {"A": 3, "B": 4}}
    assert fcit.evaluate(local, _Bench(), [0, 1]) == [15.0, 16.0]


def test_fedsa_export_reloads_every_clients_personalized_model(tmp_path):
    cfg = tiny_cfg(method="fedsa", local_epochs=1, train_projector=False)
    fed = fd.Federation(*tiny_model(), None, cfg)
    fed.run_round(0, 0, lambda p, c: task_examples("A", 6 + 2 * p, c))
    fed.end_stage(0)
    assert len(fed.method.states) == 2
    extra, alpha = fed.method.export()
    path = str(tmp_path / "fcit_adapter.safetensors")
    adapters.save_adapter(fed.model, path, extra=extra, metadata={"method": "fedsa", "stage": 0})
    n = {c: sum(d.values()) for c, d in fed.method.personal.items()}
    back = fd.Federation(*tiny_model(), None, cfg)                       # what --eval-only does: load, adopt, restore
    got, meta = adapters.load_adapter(back.model, path)
    fd.adopt_adapter(back, got, meta)
    assert back.method.personal == fed.method.personal
    for c in fed.method.personal:
        want, have = fed.method.weights_for(c), back.method.weights_for(c)
        assert set(want) == set(have) and all(torch.equal(want[k], have[k]) for k in want), c
    assert back.eval_clients(["A"]) == sorted(fed.method.personal) and back.eval_clients(["B"]) == []
    for name in fed.slot_names(0):                                       # the adapter itself: global A, mean B
        if ".A." in name:
            assert torch.equal(back.global_state[name], fed.global_state[name])
        else:
            mean = sum(fed.method.states[c][name] * n[c] / sum(n.values()) for c in n)
            assert torch.allclose(back.global_state[name], mean)
