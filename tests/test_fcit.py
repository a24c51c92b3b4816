"""End-to-end tests of the command line: every setting on a very small configuration, the results files,
resume after a simulated crash, and bad input (exit code 2 before any work)."""
import json
import os

import pytest
import torch
from PIL import Image

import fcit
import federate

SMALL = ["--clients", "5", "--clients-per-round", "5", "--rounds", "1", "--batch-size", "8", "--eval-samples", "2",
         "--max-new-tokens", "3", "--quiet"]


@pytest.fixture(autouse=True)
def small_benchmarks(tmp_path_factory, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(fcit, "CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setattr(fcit, "MINI", dict(n_train=30, n_test=4))
    monkeypatch.setattr(fcit, "MINI_FEDIT", dict(n_per_category=16))


def check_results(out, setting, methods):
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    assert r["setting"] == setting and r["beta"] == 1.0 and r["seed"] == 0
    assert list(r["methods"]) == methods
    n_tasks = len(r["tasks"])
    for name, m in r["methods"].items():
        assert set(m) == {"matrix", "last", "avg", "bwt", "per_task_last", "routing_accuracy", "comm_bytes", "wall_s"}
        assert all(len(row) == n_tasks for row in m["matrix"])
        assert all(v is None or 0.0 <= v <= 100.0 for row in m["matrix"] for v in row)
        final = [v for v in m["matrix"][-1] if v is not None]
        assert m["last"] == pytest.approx(sum(final) / len(final), abs=1e-3)
        assert set(m["per_task_last"]) <= set(r["tasks"])
        assert m["comm_bytes"] >= 0 and m["wall_s"] >= 0
        img = Image.open(os.path.join(out, f"matrix_{name}.png"))
        assert img.format == "PNG" and img.width > 100
    md = open(os.path.join(out, "results.md")).read()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert header.split("|")[-4:-1] == [" Last ", " Avg ", " BWT "]
    for name in methods:
        assert any(line.startswith(f"| {name} |") for line in md.splitlines())
    return r


@pytest.mark.parametrize("setting", ["task-hom", "cap-het"])
def test_fcit_settings_end_to_end(tmp_path, setting):
    out = str(tmp_path / "out")
    assert fcit.main(["--setting", setting, "--methods", "disco,finetune", "--out", out] + SMALL) == 0
    r = check_results(out, setting, ["disco", "finetune"])
    stages = 8 if setting.startswith("task") else 4
    assert len(r["methods"]["disco"]["matrix"]) == stages
    assert r["methods"]["finetune"]["routing_accuracy"] is None
    assert r["methods"]["disco"]["comm_bytes"] > 0
    for k in range(1, stages + 1):
        assert os.path.exists(os.path.join(out, "adapters", "disco", f"stage{k}", "peft", "adapter_config.json"))
        assert os.path.exists(os.path.join(out, "adapters", "disco", f"stage{k}", "fcit_adapter.safetensors"))


def test_fedit_end_to_end(tmp_path):
    out = str(tmp_path / "out")
    assert fcit.main(["--setting", "fedit", "--methods", "fedit,local", "--out", out] + SMALL) == 0
    r = check_results(out, "fedit", ["fedit", "local"])
    assert len(r["tasks"]) == 8 and len(r["methods"]["fedit"]["matrix"]) == 1


def test_resume_after_crash_gives_the_same_results(tmp_path, monkeypatch):
    args = ["--setting", "cap-hom", "--methods", "disco", "--rounds", "2"] + SMALL[:4] + SMALL[6:]
    ref = str(tmp_path / "ref")
    assert fcit.main(args + ["--out", ref]) == 0

    out = str(tmp_path / "out")
    real = federate.Federation.run_round
    calls = {"n": 0}

    def crashing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:   # dies inside stage 2, round 2, after three completed rounds
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(federate.Federation, "run_round", crashing)
    with pytest.raises(KeyboardInterrupt):
        fcit.main(args + ["--out", out])
    with open(os.path.join(out, "state", "disco.json")) as f:
        progress = json.load(f)["progress"]
    assert (progress["stage"], progress["round"]) == (1, 1) and not progress["done"]
    monkeypatch.setattr(federate.Federation, "run_round", real)
    assert fcit.main(args + ["--out", out]) == 0

    a = json.load(open(os.path.join(ref, "results.json")))
    b = json.load(open(os.path.join(out, "results.json")))
    for r in (a, b):
        for m in r["methods"].values():
            m.pop("wall_s")
    assert a == b


def test_changed_config_on_existing_out_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"setting": "task-hom", "lr": 0.5}))
    assert fcit.main(["--setting", "task-hom", "--out", str(out)] + SMALL) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "lr: 0.5" in err


def test_bad_input_exits_2_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fcit.main(["--setting", "task-weird"])
    assert e.value.code == 2
    assert fcit.main(["--setting", "task-hom", "--methods", "disco,lwf"]) == 2
    assert "unknown method 'lwf'" in capsys.readouterr().err
    assert fcit.main(["--setting", "fedit", "--methods", "disco"]) == 2
    not_model = tmp_path / "nomodel"
    not_model.mkdir()
    assert fcit.main(["--setting", "task-hom", "--model", str(not_model)]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert fcit.main(["--setting", "task-hom", "--data-root", str(tmp_path)]) == 2
    assert "not an FCIT release" in capsys.readouterr().err
    assert fcit.main(["--setting", "task-hom", "--model", str(tmp_path / "missing")]) == 2
    assert fcit.main(["--setting", "task-het", "--clients-per-round", "3"]) == 2
    assert "must be 5" in capsys.readouterr().err


def test_dry_run_prints_the_plan(capsys):
    assert fcit.main(["--setting", "task-het", "--dry-run"] + SMALL) == 0
    text = capsys.readouterr().out
    assert "8 stage(s)" in text and "stage 1: trains ArxivQA, IconQA, OCR-VQA, Flickr30k, FigureQA" in text
