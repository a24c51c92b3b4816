"""bench/gpu.py on its tiny config on CPU: every measurement is reported, the greedy outputs match, the 7B shape is
LLaVA-1.5-7B's, and CPU without --tiny is refused. The GPU numbers themselves need a GPU (see the script)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
pytest.importorskip("transformers")
pytest.importorskip("peft")
import gpu  # noqa: E402  (bench/gpu.py)

LINES = ("config:", "train step (", "train MFU (", "train peak memory:", "generate (", "greedy outputs identical:",
         "generate, decode step compiled", "24 GB recipe (", "total ")


def test_tiny_cpu_report_and_json(tmp_path, capsys):
    path = tmp_path / "gpu.json"
    gpu.main(["--tiny", "--device", "cpu", "--json", str(path)])
    out = capsys.readouterr().out
    for start in LINES:
        assert any(line.startswith(start) for line in out.splitlines()), (start, out)
    assert "greedy outputs identical: yes; 4/4 rows" in out
    res = json.loads(path.read_text())
    gen, train, rec = res["generate"], res["train"], res["recipe_24gb"]
    assert gen["identical"] and gen["prefill_max_abs_dlogits"] <= 1e-4
    assert gen["ours_tok_s"] > 0 and gen["transformers_tok_s"] > 0 and gen["ratio_tok_s"] > 0
    assert train["step_s"]["ours"] > 0 and train["step_s"]["transformers"] > 0 and train["flops"] > 0
    assert train["ratio_step"] == pytest.approx(train["step_s"]["ours"] / train["step_s"]["transformers"])
    assert res["shared_tensors"] > 0 and res["peak_tflops"] is None
    assert rec["fits_24gb"] is None and rec["peak_bytes"] is None          # no CUDA: no memory numbers
    assert train["mfu"] == {"ours": None, "transformers": None}            # no peak on CPU without --peak-tflops


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


def test_peak_table():
    assert gpu.peak_tflops("NVIDIA H200") == gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert gpu.peak_tflops("NVIDIA L40S") == 362 and gpu.peak_tflops("NVIDIA L4") == 121
    assert gpu.peak_tflops("Some GPU") is None and gpu.peak_tflops("Some GPU", 100.0) == 100.0
    assert gpu.peak_tflops("cpu") is None
