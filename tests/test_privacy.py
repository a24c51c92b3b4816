"""Client-level differential privacy: the RDP accountant against Opacus' (a test-only oracle), the worst client's ε at
q = 1 over its participations, clipping, the noise the server adds, DISCO's noised identity tokens and what it releases
under DP, no ε where nothing is released, and ε reported through the command line."""
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
from config import UsageError


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


def _opacus_epsilon(sigma, steps, delta=1e-5):
    """Opacus' RDP accountant, stepped `steps` times with sample_rate 1 (no sampling), at our orders."""
    from opacus.accountants import RDPAccountant
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=1.0)
    return acc.get_privacy_spent(delta=delta, alphas=list(privacy.ORDERS))[0]


def test_worst_client_matches_opacus_at_q1():
    for counts, sigma in [({3: 2, 7: 5, 11: 1}, 1.3), ({0: 1}, 0.8), ({4: 40, 5: 39}, 4.0)]:
        eps, _, rounds = privacy.worst_client(counts, sigma, 1e-5)
        assert rounds == max(counts.values()) and eps == pytest.approx(_opacus_epsilon(sigma, rounds), rel=1e-9)
    assert privacy.worst_client({}, 1.0, 1e-5)[0] == 0.0


def test_epsilon_counts_each_clients_participations_and_resumes():
    # 5 rounds of 2 of 4 clients, some dropping out: ε is the most-sampled client's, without amplification
    cfg = tiny_cfg(method="finetune", local_epochs=1, lr=1e-12, dp_clip=0.5, dp_noise=1.5, client_dropout=0.3)
    fed = fd.Federation(*tiny_model(), None, cfg)
    counts = {}
    for r in range(5):
        rec = fed.run_round(0, r, lambda p, c: task_examples("A", 2, c))
        out = {d["client"] for d in rec["dropped"] if d["reason"] == "dropped out before its upload"}
        for c in set(rec["clients"]) - out:
            counts[c] = counts.get(c, 0) + 1
    assert 1 <= max(counts.values()) < 5                          # the worst client took part in fewer than 5 rounds
    spent = fd.privacy_spent(fed)
    assert spent["participations"] == max(counts.values()) and spent["rounds"] == 5
    assert rec["epsilon"] == spent["epsilon"] == pytest.approx(_opacus_epsilon(1.5, max(counts.values())), rel=1e-9)
    tensors, meta = fed.state_dict()
    again = fd.Federation(*tiny_model(), None, cfg)
    again.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert fd.privacy_spent(again) == spent


def test_local_releases_nothing_and_reports_no_epsilon():
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="local", local_epochs=1, dp_clip=0.5, dp_noise=1.0))
    rec = fed.run_round(0, 0, lambda p, c: task_examples("A", 4, c))
    assert "epsilon" not in rec and fed.dp_rounds == 0 and not fed.dp_participations
    fedsa = fd.Federation(*tiny_model(), None, tiny_cfg(method="fedsa", local_epochs=1, dp_clip=0.5, dp_noise=1.0))
    assert "epsilon" in fedsa.run_round(0, 0, lambda p, c: task_examples("A", 4, c))     # FedSA shares A
    with pytest.raises(UsageError, match="ewc: each client uploads its Fisher information un-noised"):
        tiny_cfg(method="ewc", dp_clip=0.5)                                          # nothing un-noised is released


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
    assert rec["epsilon"] == pytest.approx(_opacus_epsilon(2.0, 1))                 # q = 1: no amplification
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


def test_disco_under_dp_releases_no_sample_counts():
    # unequal clients (12 and 2 samples), no noise so that tokens still match: every client weighs 1 in the key update,
    # sizes count client-rounds, the export holds no sample count, and the small-client rule (a share of the round's
    # samples) does not fire: the 2-sample client of another task opens its own subspace
    data = lambda p, c: task_examples("AB"[p], 12 if p == 0 else 2, c)
    cfg = dict(method="disco", local_epochs=1, lr=1e-12, clients=2, small_client=0.3)
    plain = fd.Federation(*tiny_model(), None, tiny_cfg(**cfg))
    assert plain.run_round(0, 0, data)["opened"] == [0]                     # 2/14 < 0.3: B joins A's subspace
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(**cfg, dp_clip=1e3, dp_noise=0.0, dp_identity_noise=0.0))
    toks = []
    for r in range(2):
        rec = fed.run_round(0, r, data)
        assert rec["opened"] == ([0, 1] if r == 0 else []) and rec["assignments"] == {"0": 0, "1": 1}
        toks.append([disco.identity_token(fed, data(p, c), 0, r, c) for p, c in enumerate(rec["clients"])])
    assert fed.method.sizes.tolist()[:2] == [2.0, 2.0]                     # client-rounds, not 24 and 4 samples
    for j in (0, 1):
        want = (toks[0][j].double() + toks[1][j].double()) / 2               # the plain mean of its two tokens
        assert torch.allclose(fed.method.keys[j].double(), want, atol=1e-6)
    extra, _ = fed.method.export()
    assert extra["identity_sizes"].tolist()[:2] == [2.0, 2.0]


def test_unmatchable_identity_noise_is_refused_before_training(tmp_path, capsys, caplog):
    cfg = lambda sigma, on_full="error": tiny_cfg(method="disco", dp_clip=1.0, dp_identity_noise=sigma, on_full=on_full)
    # 768-d unit tokens: two noised copies of one token have cosine ~ 1/(1 + 768 σ²): 0.93 at σ = 0.01, 0.34 at 0.05
    disco.check_private_matching(cfg(0.01), 768)
    with pytest.raises(UsageError, match="dp-identity-noise <= 0.012"):
        disco.check_private_matching(cfg(0.05), 768)
    disco.check_private_matching(cfg(0.05, "nearest"), 768)
    assert "no client matches" in caplog.text
    fed = fd.Federation(*tiny_model(), None, cfg(1.0))
    with pytest.raises(UsageError, match="--tau 0.9"):
        fed.run_round(0, 0, lambda p, c: task_examples("A", 4, c))
    assert all(torch.equal(v, fed.params[k]) for k, v in fed.global_state.items())      # nothing trained
    out = str(tmp_path / "out")
    assert fcit.main(["--setting", "cap-hom", "--methods", "disco", "--dp-clip", "0.5", "--on-full", "error",
                      "--out", out] + SMALL) == 2
    assert "--dp-identity-noise" in capsys.readouterr().err
