"""Client-level differential privacy: the RDP accountant against Opacus' (a test-only oracle), clipping, the noise the
server adds, DISCO's noised identity tokens, and ε reported through the command line."""
import json
import math
import os

import pytest
import torch
from test_fcit import SMALL, small_benchmarks  # noqa: F401 (fixture: FCIT-mini sizes, one thread)
from toy import _one_thread, task_examples, tiny_cfg, tiny_model  # noqa: F401 (fixture)

import disco
import fcit
import federate as fd
import privacy


@pytest.mark.parametrize("q,sigma,steps", [(0.1, 1.0, 80), (0.01, 1.1, 1000), (1.0, 2.0, 16), (0.5, 0.7, 30)])
def test_accountant_matches_opacus(q, sigma, steps):
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    orders = list(privacy.ORDERS)
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    for a, want in zip(orders, rdp):
        assert steps * privacy.rdp_sampled_gaussian(q, sigma, a) == pytest.approx(float(want), rel=1e-9)
    eps_ref, order_ref = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    eps, order = privacy.epsilon(q, sigma, steps, 1e-5)
    assert eps == pytest.approx(float(eps_ref), rel=1e-9) and order == int(order_ref)


def test_clip_and_effective_noise():
    up = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}                 # joint norm 5
    clipped, norm = privacy.clip(up, 1.0)
    assert norm == pytest.approx(5.0)
    assert math.sqrt(sum(float(t.pow(2).sum()) for t in clipped.values())) == pytest.approx(1.0)
    same, _ = privacy.clip(up, 10.0)
    assert all(torch.equal(same[k], up[k]) for k in up)
    assert privacy.effective_noise(1.0, 1.0) == pytest.approx(1 / math.sqrt(2))
    assert privacy.effective_noise(2.0, None) == 2.0 and privacy.effective_noise(1.0, 0.0) == 0.0


def test_server_adds_calibrated_noise_to_a_fixed_denominator():
    # clients that do not move (lr 0): every coordinate of the new global - old is N(0, (sigma C / clients per round)^2)
    cfg = tiny_cfg(method="finetune", local_epochs=1, lr=1e-12, dp_clip=0.5, dp_noise=2.0, train_projector=False)
    fed = fd.Federation(*tiny_model(), None, cfg)
    before = {k: v.clone() for k, v in fed.global_state.items()}
    rec = fed.run_round(0, 0, lambda p, c: task_examples("A", 8, c))
    d = torch.cat([(fed.global_state[k] - before[k]).flatten().double() for k in before])
    assert d.numel() > 5000 and abs(float(d.mean())) < 0.02
    assert float(d.std()) == pytest.approx(2.0 * 0.5 / 2, rel=0.05)
    assert rec["epsilon"] == pytest.approx(privacy.epsilon(2 / 4, 2.0, 1, 1e-5)[0])
    # no noise and a large C: the plain sum of the updates over the fixed denominator (not FedAvg's weighting)
    cfg = tiny_cfg(method="finetune", local_epochs=1, dp_clip=1e6, dp_noise=0.0)
    fed, ref = fd.Federation(*tiny_model(), None, cfg), fd.Federation(*tiny_model(), None, tiny_cfg(
        method="finetune", local_epochs=1))
    data = lambda p, c: task_examples("A", 6 + 4 * p, c)                          # unequal clients
    g0 = {k: v.clone() for k, v in fed.global_state.items()}
    fed.run_round(0, 0, data)
    sel = fd.server.sample_clients(4, 2, 0, 0, 0)
    ups = [ref._local_train(data(p, sel[p]), 0, 0, 0, p, sel[p]) for p in (0, 1)]
    for k in g0:
        want = g0[k] + sum(u.state[k] - g0[k] for u in ups) / 2
        assert torch.allclose(fed.global_state[k], want, atol=1e-6), k


def test_disco_identity_tokens_are_clipped_and_noised_on_the_client():
    cfg = tiny_cfg(method="disco", local_epochs=1, dp_clip=1.0, dp_noise=0.0, dp_identity_noise=0.0)
    fed = fd.Federation(*tiny_model(), None, cfg)
    tok = disco.identity_token(fed, task_examples("A", 6, 0), 0, 0, 3)
    assert float(tok.norm()) <= 1.0 + 1e-6
    noisy = fd.Federation(*tiny_model(), None, tiny_cfg(method="disco", dp_clip=1.0, dp_identity_noise=0.5))
    a = disco.identity_token(noisy, task_examples("A", 6, 0), 0, 0, 3)
    b = disco.identity_token(noisy, task_examples("A", 6, 0), 0, 0, 3)
    assert torch.equal(a, b) and float((a - tok).std()) == pytest.approx(0.5, rel=0.3)   # seeded per client
    spent = fd.privacy_spent(noisy)
    assert spent["noise_multiplier"] == pytest.approx(privacy.effective_noise(1.0, 0.5))


def test_privacy_in_results_json(tmp_path):
    out = str(tmp_path / "out")
    assert fcit.main(["--setting", "cap-hom", "--methods", "disco", "--dp-clip", "0.1", "--dp-noise", "1.5",
                      "--out", out] + SMALL) == 0
    p = json.load(open(os.path.join(out, "results.json")))["methods"]["disco"]["privacy"]
    sigma = privacy.effective_noise(1.5, 1.5)
    assert p["rounds"] == 4 and p["epsilon"] == pytest.approx(privacy.epsilon(1.0, sigma, 4, 1e-5)[0])
