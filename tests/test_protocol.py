"""The paper's protocol where it is a choice: client draws, learning-rate schedules, server-optimizer state at a
stage boundary, fractional local epochs (the mtl budget) and LLaVA-1.5's pad-to-square pre-processing."""
import json
import math

import numpy as np
import pytest
import torch
from toy import _one_thread, task_examples, tiny_cfg, tiny_model  # noqa: F401 (fixture)

import federate as fd
import imaging
import prompts
import server

# (clients, per round, stage, round) -> the positions of FCIT's train.py, `enumerate(client_selection(...))`, worked
# out from its procedure: np.random.seed(stage*10 + round); set(np.random.choice(np.arange(clients), per_round,
# replace=False)); the set's iteration order. Shepherd's main.py is stage 0 (np.random.seed(round)).
OFFICIAL_DRAWS = [
    ((50, 5, 0, 0), [28, 11, 10, 41, 2], [2, 41, 10, 11, 28]),
    ((50, 5, 7, 9), [39, 44, 21, 42, 48], [39, 42, 44, 48, 21]),             # 39, 42, 44, 48 wrap at 32
    ((50, 5, 3, 3), [5, 27, 37, 15, 40], [37, 5, 40, 15, 27]),               # 5 and 37 share a slot: 37 first
    ((50, 5, 4, 6), [9, 14, 3, 35, 10], [3, 35, 9, 10, 14]),
    ((10, 5, 0, 3), [5, 4, 1, 2, 9], [1, 2, 4, 5, 9]),                       # FedIT-sized
    ((10, 1, 0, 4), [3], [3]),                                             # Shepherd's 1 of 10
    ((100, 20, 2, 5), [41, 29, 33, 65, 74, 6, 57, 89, 87, 98, 0, 64, 81, 72, 66, 91, 95, 63, 59, 46],
     [0, 6, 29, 33, 41, 46, 57, 59, 63, 64, 65, 66, 72, 74, 81, 87, 89, 91, 95, 98]),   # two resizes
    ((1000, 30, 1, 3), [945, 452, 304, 433, 864, 291, 986, 923, 260, 546, 591, 390, 407, 261, 594, 618, 196, 78,
                        765, 644, 991, 417, 416, 165, 279, 388, 576, 810, 729, 669],
     [260, 261, 390, 644, 388, 407, 279, 923, 669, 416, 417, 546, 291, 165, 810, 304, 945, 433, 576, 452, 196, 78,
      591, 594, 729, 986, 991, 864, 618, 765])]                             # collisions in a 128-slot table


@pytest.mark.parametrize("args,choice,positions", OFFICIAL_DRAWS)
def test_official_client_draw_is_the_set_order_of_the_reseeding_code(args, choice, positions):
    n, k, stage, rnd = args
    saved = np.random.get_state()
    try:
        np.random.seed(stage * 10 + rnd)                          # FCIT's / Shepherd's client_selection
        drawn = np.random.choice(np.arange(n), k, replace=False)
        assert drawn.tolist() == choice
        np.random.seed(123)
        before = np.random.random()
        np.random.seed(123)
        got = server.sample_clients(n, k, seed=7, stage=stage, rnd=rnd, scheme="official")
        assert np.random.random() == before                       # the global RNG was not touched
    finally:
        np.random.set_state(saved)
    assert got == positions
    assert got == [int(c) for c in set(drawn)]                    # and this interpreter's set agrees


def test_set_order_emulates_cpython_sets():
    rng = np.random.default_rng(0)
    for n, k in [(8, 8), (64, 40), (10 ** 6, 300), (2 ** 40, 5)]:
        keys = [int(x) for x in rng.choice(n, k, replace=False)]
        assert server.set_order(keys) == list(set(keys))
    assert server.set_order([8, 0, 16]) == [8, 0, 16]     # all at slot 0 of 8: too near the end for linear probes
    with pytest.raises(ValueError, match="key -1"):
        server.set_order([-1])


def test_seeded_draw_and_unknown_scheme():
    seeded = [server.sample_clients(50, 5, seed=s, stage=0, rnd=0) for s in (0, 1)]
    assert seeded[0] != seeded[1] and seeded[0] == server.sample_clients(50, 5, seed=0, stage=0, rnd=0)
    with pytest.raises(ValueError, match="scheme"):
        server.sample_clients(50, 5, 0, 0, 0, scheme="round-robin")


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_lr_schedules_match_transformers(kind):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
    make = get_cosine_schedule_with_warmup if kind == "cosine" else get_linear_schedule_with_warmup
    for total, warmup in [(10, 0), (10, 1), (37, 2), (1, 1)]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt, num_warmup_steps=warmup, num_training_steps=total)
        for step in range(total):
            assert fd.lr_multiplier(step, total, warmup, kind) == pytest.approx(sched.get_last_lr()[0], abs=1e-12)
            opt.step()
            sched.step()


@pytest.mark.parametrize("server_state", ["reset", "carry"])
def test_server_optimizer_state_at_a_stage_boundary(server_state):
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="finetune", aggregator="fedavgm", rounds=1,
                                                        local_epochs=1, server_state=server_state))
    fed.run_round(0, 0, lambda p, c: task_examples("A", 16, c))
    momentum = {k: v.clone() for k, v in fed.opt.m.items()}
    assert momentum and any(float(v.abs().sum()) > 0 for v in momentum.values())
    fed.end_stage(0)
    if server_state == "reset":
        assert fed.opt.m == {} and fed.opt.v == {}
    else:
        assert fed.opt.m.keys() == momentum.keys() and all(torch.equal(fed.opt.m[k], momentum[k]) for k in momentum)


def test_fractional_local_epochs_train_a_seeded_prefix():
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="finetune", local_epochs=1.5, batch_size=4))
    exs = task_examples("A", 10, 0)
    u = fed._local_train(exs, 0, 0, 0, 0, 0)
    assert u.steps == math.ceil(10 / 4) + math.ceil(5 / 4)     # one full epoch, then 5 of the 10 samples
    with pytest.raises(ValueError, match="local-epochs"):
        tiny_cfg(local_epochs=0)


def _llava_hf_folder(tmp_path, preprocessor, config=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    (tmp_path / "config.json").write_text(json.dumps(config or {"model_type": "llava"}))
    return tmp_path


def test_llava_checkpoints_pad_to_a_square_by_default(tmp_path):
    from PIL import Image
    from transformers import CLIPImageProcessor
    pre = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 28},
           "crop_size": {"height": 28, "width": 28}}                                   # no do_pad, as llava-hf ships
    hf = _llava_hf_folder(tmp_path / "hf", pre)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 44, 3), dtype=np.uint8))
    ours = imaging.ImageProcessor.for_checkpoint(str(hf))
    assert ours.pad_to_square and ours.describe()["pad_to_square"] is True
    # LLaVA-1.5's expand2square by hand: the mean colour as int(mean * 255), the image centred, then CLIP.
    mean = (0.48145466, 0.4578275, 0.40821073)
    square = Image.new("RGB", (44, 44), tuple(int(m * 255) for m in mean))
    square.paste(img, (0, 12))
    ref = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    expected = torch.as_tensor(np.asarray(ref(images=[square], return_tensors="np")["pixel_values"]))
    assert (ours([img]) - expected).abs().max() < 1e-5
    crop = imaging.ImageProcessor.for_checkpoint(str(hf), aspect="crop")
    expected_crop = torch.as_tensor(np.asarray(ref(images=[img], return_tensors="np")["pixel_values"]))
    assert (crop([img]) - expected_crop).abs().max() < 1e-5
    # the original layout: the CLIP folder holds the processor, the model's config.json its aspect ratio
    clip = _llava_hf_folder(tmp_path / "clip", pre, {"model_type": "clip_vision_model"})
    orig = _llava_hf_folder(tmp_path / "orig", pre, {"model_type": "llava", "image_aspect_ratio": "square"})
    (orig / "preprocessor_config.json").unlink()
    assert not imaging.ImageProcessor.for_checkpoint(str(orig), str(clip)).pad_to_square
    assert imaging.ImageProcessor.for_checkpoint(str(orig), str(clip), aspect="pad").pad_to_square
    with pytest.raises(ValueError, match="aspect"):
        imaging.ImageProcessor.for_checkpoint(str(hf), aspect="stretch")


def test_max_length_cuts_training_sequences_but_never_a_prompt():
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="finetune", max_length=6))
    ex = task_examples("A", 1, 0)[0]
    full = prompts.encode_example(fed.tok, ex.instruction, None, template=fed.cfg.template, max_length=None)[0]
    assert len(full) > 6
    assert fed.batch([ex], with_answer=False)["input_ids"][0].tolist()[-len(full):] == full
    assert fed.batch([ex])["input_ids"].shape[1] == 6


def test_client_dropout_is_seeded_per_client_and_min_clients_keeps_the_model():
    drops = [server.dropouts(list(range(50)), 0.2, seed=0, stage=s, rnd=r) for s in range(4) for r in range(10)]
    rate = sum(len(d) for d in drops) / (50 * 40)
    assert abs(rate - 0.2) < 0.03                                            # 2,000 Bernoulli(0.2) draws
    assert drops[0] == server.dropouts(list(range(50)), 0.2, seed=0, stage=0, rnd=0)      # same on every call
    assert server.dropouts([3, 7], 0.0, 0, 0, 0) == set() and server.dropouts([3, 7], 1.0, 0, 0, 0) == {0, 1}
    cfg = tiny_cfg(method="finetune", local_epochs=1, client_dropout=1.0)
    fed = fd.Federation(*tiny_model(), None, cfg)
    before = {k: v.clone() for k, v in fed.global_state.items()}
    rec = fed.run_round(0, 0, lambda p, c: task_examples("A", 8, c))
    assert {d["reason"] for d in rec["dropped"]} == {"dropped out before its upload"} and len(rec["dropped"]) == 2
    assert "left unchanged" in rec["aggregation_skipped"] and rec["bytes_up"] == 0
    assert all(torch.equal(before[k], fed.global_state[k]) for k in before)
    fed = fd.Federation(*tiny_model(), None, tiny_cfg(method="finetune", local_epochs=1, min_clients=2))
    rec = fed.run_round(0, 0, lambda p, c: task_examples("A", 8, c) if p == 0 else [])     # one upload of two
    assert "1 of 2 clients uploaded" in rec["aggregation_skipped"]
    assert all(torch.equal(before[k], fed.global_state[k]) for k in before)
    with pytest.raises(ValueError, match="min-clients"):
        tiny_cfg(min_clients=3)


def test_disco_opens_a_dropped_clients_task_in_the_next_round():
    # Stage 2 brings task B to one client only; it drops out in round 1, so B's subspace must open in round 2.
    cfg = tiny_cfg(method="disco", local_epochs=1, clients=2, clients_per_round=2)
    fed = fd.Federation(*tiny_model(), None, cfg)
    fed.run_round(0, 0, lambda p, c: task_examples("A", 12, c))
    assert float(fed.method.sizes[0]) == 24
    fed.end_stage(0)
    real = server.dropouts
    try:
        server.dropouts = lambda sel, p, seed, stage, rnd: {1} if (stage, rnd) == (1, 0) else set()
        data = lambda p, c: task_examples("AB"[p], 12, 100 + c)
        r0 = fed.run_round(1, 0, data)
        assert r0["opened"] == [] and r0["dropped"][0]["position"] == 1
        r1 = fed.run_round(1, 1, data)
    finally:
        server.dropouts = real
    assert r1["opened"] == [1] and r1["assignments"] == {"0": 0, "1": 1}
    assert float(fed.method.sizes[1]) == 12 and fed.method.open_order == [0, 1]
