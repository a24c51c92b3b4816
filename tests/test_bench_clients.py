"""bench/clients.py on tiny sizes: the report has every field, the same data for every N, and memory does not grow
with the number of clients (a generous factor; no timing is asserted)."""
import importlib.util
import json
import os

import pytest
import torch

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "clients.py")
_SPEC = importlib.util.spec_from_file_location("bench_clients", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_report_fields_and_memory_flat_in_clients(tmp_path, capsys):
    out = tmp_path / "report.json"
    bench.main(["--clients", "5,20", "--per-round", "2,8", "--repeats", "1", "--threads", "1",
                "--cache", str(tmp_path / "data"), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "(a) memory" in printed and "(b) server time" in printed
    rep = json.loads(out.read_text())
    small, large = rep["memory"]
    for row in (small, large):
        assert set(bench.MEMORY_FIELDS) <= set(row)
        assert len(row["round_samples"]) == 1 and len(row["round_samples"][0]) == 5
    assert (small["clients"], large["clients"]) == (5, 20)
    assert small["samples"] == large["samples"] == 8 * 20          # the same total data for every N
    assert large["peak_mb"] <= 1.5 * small["peak_mb"]
    assert large["peak_data_mb"] <= 1.5 * small["peak_data_mb"]
    assert large["tensor_mb"] <= 1.5 * small["tensor_mb"]          # no adapters kept for unsampled clients
    agg = rep["aggregation"]
    assert {(r["kind"], r["k"]) for r in agg["rows"]} == {(k, n) for k in ("fedavg", "fedadam", "disco-dko")
                                                          for n in (2, 8)}
    for row in agg["rows"]:
        assert set(bench.AGG_FIELDS) <= set(row) and row["median_s"] > 0
    for fit in agg["fits"]:
        assert set(bench.FIT_FIELDS) <= set(fit) and len(fit["marginal_us"]) == 1
    assert agg["upload_params"] > 0


def test_linear_fit_tells_linear_from_quadratic():
    rows = lambda f: [{"kind": "x", "k": k, "median_s": f(k)} for k in (5, 50, 200, 1000)]
    lin = bench.linear_fit(rows(lambda k: 1e-3 + 2e-5 * k))
    assert lin["r2"] == pytest.approx(1.0) and lin["slope_us_per_client"] == pytest.approx(20.0)
    assert lin["intercept_ms"] == pytest.approx(1.0) and lin["marginal_ratio"] == pytest.approx(1.0)
    quad = bench.linear_fit(rows(lambda k: 1e-8 * k * k))
    assert quad["marginal_ratio"] > 10
