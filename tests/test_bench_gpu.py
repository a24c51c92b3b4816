"""bench/gpu.py on its tiny config on CPU: every phase of the pipeline (checkpoint, data, fcit.py --dry-run, the run,
--eval-only) and every measurement is reported and passes, the greedy outputs match, a failed phase fails the run,
the 7B shape is LLaVA-1.5-7B's, and CPU without --tiny is refused. The GPU numbers themselves need a GPU (see the
script)."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
pytest.importorskip("transformers")
pytest.importorskip("peft")
import gpu  # noqa: E402  (bench/gpu.py)

LINES = ("config:", "train step (", "train MFU (", "train peak memory:", "generate (", "greedy outputs identical:",
         "generate, decode step compiled", "24 GB recipe (", "total ")
CHECKS = ("checkpoint ", "data ", "dry-run ", "pipeline disco train+eval+adapters",
          "pipeline finetune train+eval+adapters", "eval-only disco reproduces stage 2",
          "eval-only finetune reproduces stage 2", "measurements ran")


def test_tiny_cpu_report_and_json(tmp_path, capsys):
    """The tiny form runs every phase, fcit.py itself in bfloat16 included, and each prints PASS (none FAIL)."""
    path, work = tmp_path / "gpu.json", tmp_path / "work"
    res = gpu.main(["--tiny", "--device", "cpu", "--json", str(path), "--workdir", str(work)])
    out = capsys.readouterr().out
    for start in LINES:
        assert any(line.startswith(start) for line in out.splitlines()), (start, out)
    for check in CHECKS:
        assert any(line.startswith("PASS " + check) for line in out.splitlines()), (check, out)
    assert "FAIL" not in out and f"PASS: {len(CHECKS)}/{len(CHECKS)} checks passed" in out
    assert "greedy outputs identical: yes; 4/4 rows" in out
    assert res["pass"] and os.listdir(work) == []                          # the pipeline's folder is removed
    res = json.loads(path.read_text())
    assert res["pass"] and [c["pass"] for c in res["checks"]] == [True] * len(CHECKS)
    assert {"checkpoint", "data", "dry-run", "pipeline", "eval-only disco", "eval-only finetune",
            "measurements"} == set(res["phases"]) and all(p["wall_s"] > 0 for p in res["phases"].values())
    cmd = res["pipeline"]["command"]
    assert cmd[:4] == ["python", "fcit.py", "--setting", "task-hom"] and "--lm-identity" in cmd
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16" and cmd[cmd.index("--stages") + 1] == "2"
    gen, train, rec = res["generate"], res["train"], res["recipe_24gb"]
    assert gen["identical"] and gen["prefill_max_abs_dlogits"] <= 1e-4
    assert gen["ours_tok_s"] > 0 and gen["transformers_tok_s"] > 0 and gen["ratio_tok_s"] > 0
    assert train["step_s"]["ours"] > 0 and train["step_s"]["transformers"] > 0 and train["flops"] > 0
    assert train["ratio_step"] == pytest.approx(train["step_s"]["ours"] / train["step_s"]["transformers"])
    assert res["shared_tensors"] > 0 and res["peak_tflops"] is None
    assert rec["fits_24gb"] is None and rec["peak_bytes"] is None          # no CUDA: no memory numbers
    assert train["mfu"] == {"ours": None, "transformers": None}            # no peak on CPU without --peak-tflops


def test_a_failed_phase_fails_the_run(tmp_path, capsys, monkeypatch):
    """A phase that raises is a FAIL naming the error, the phases after it are FAILs "not run", and main's result
    says so (python bench/gpu.py then exits 1)."""
    def broken(*args):
        raise OSError("disk full")
    monkeypatch.setattr(gpu, "write_checkpoint", broken)
    monkeypatch.setattr(gpu, "measure", lambda *args: ([("measurements ran", [])], {}))
    res = gpu.main(["--tiny", "--device", "cpu", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert not res["pass"] and "FAIL checkpoint: OSError: disk full" in out
    for phase in ("data", "dry-run", "pipeline", "eval-only disco", "eval-only finetune"):
        assert f"FAIL {phase} not run: an earlier phase failed" in out, (phase, out)
    assert "PASS measurements ran" in out and "FAIL: 1/7 checks passed" in out


def test_checks_catch_a_broken_run(tmp_path):
    """check_run names missing adapters, a non-finite loss and a wrong matrix; check_eval a differing row."""
    tasks = ["ImageNet-R", "ArxivQA", "IconQA", "CLEVR-Math", "OCR-VQA", "Flickr30k", "FigureQA", "super-CLEVR"]
    row1, row2 = [0.0] + [None] * 7, [0.0, 25.0] + [None] * 6
    results = {"tasks": tasks, "methods": {"disco": {"matrix": [row1, row2]}, "finetune": {"matrix": [row2]}}}
    records = [{"method": "disco", "stage": s, "client": c, "steps": 2, "loss": 6.9} for s in (0, 1) for c in (0, 1)]
    records[1]["loss"] = math.nan
    problems = gpu.check_run(results, records, str(tmp_path), "disco")
    assert "stage 1 client 1: loss nan, 2 steps" in problems and len(problems) == 1 + 2 * 3   # 3 files per stage
    assert any("accuracy matrix" in p for p in gpu.check_run(results, records, str(tmp_path), "finetune"))
    assert gpu.check_run(results, records, str(tmp_path), "ewc") == ["no ewc in results.json"]
    ev = lambda row: {"methods": {"disco": {"matrix": [row]}}}
    assert gpu.check_eval(results, ev(row2), "disco") == []
    assert gpu.check_eval(results, ev([0.0, 0.0] + [None] * 6), "disco") != []
    assert gpu.check_eval(results, {}, "disco") != []


def test_cpu_without_tiny_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        gpu.main(["--device", "cpu"])
    assert e.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_full_shape_is_llava_1_5_7b():
    """The 7B path's model building on the meta device (no memory): transformers' model from our config, every one
    of our tensors mapped from it, 7,063,427,072 parameters as llava-hf/llava-1.5-7b-hf."""
    import torch

    import model as M
    cfg = gpu.model_config(tiny=False)
    hf, ours, shared = gpu.build_models(cfg, torch.device("meta"), torch.bfloat16)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(ours) == n(hf) == 7_063_427_072 and shared == len(list(ours.parameters()))
    assert M.image_seq_len(cfg) == 576 and next(ours.parameters()).dtype == torch.bfloat16
    tok = gpu.checkpoint.load_tokenizer(gpu.TOKENIZER_DIR)        # the pipeline's checkpoint: the same shape, with
    cfg = gpu.pipeline_config(False, tok)                         # the tokenizer's <image> as image_token_index
    with torch.device("meta"):
        assert n(M.VLM(cfg)) == 7_063_427_072
    assert cfg.image_token_index == tok.image_token_id == 4 and cfg.text.vocab_size == 32064
    assert M.image_seq_len(cfg) == 576 and gpu.model_config(False).vision.image_size == 336


def test_peak_table():
    assert gpu.peak_tflops("NVIDIA H200") == gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert gpu.peak_tflops("NVIDIA L40S") == 362 and gpu.peak_tflops("NVIDIA L4") == 121
    assert gpu.peak_tflops("Some GPU") is None and gpu.peak_tflops("Some GPU", 100.0) == 100.0
    assert gpu.peak_tflops("cpu") is None
