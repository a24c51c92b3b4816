"""The paper's GPU recipe rehearsed on a CPU: a llava-hf checkpoint written by transformers (random weights, GQA,
CLIP pre-processing as llava-1.5's at 56 px), frozen weights in bfloat16, LoRA and projector in float32, the
computation under CPU autocast, gradient checkpointing on. Every method of every setting trains, evaluates and writes
its adapters; --eval-only, --compile, a resume after a kill and two gloo processes give the run's own results."""
import json
import math
import os
import socket
import warnings
import zlib

import pytest
import torch
import torch.multiprocessing as mp
from test_model import hf_llava, make_llama_tokenizer, tiny_clip_cfg, tiny_llama_cfg

import fcit
import federate
import mini
import model as M

pytest.importorskip("transformers")

FCIT_ALL = "disco,finetune,ewc,olora,moelora,fedsa,mtl,zeroshot"
EXPORTS = {"disco", "finetune", "ewc", "olora", "moelora", "mtl", "fedit", "fedsa"}  # those saving a stage adapter
SHORT = ["--dtype", "bfloat16", "--device", "cpu", "--gradient-checkpointing", "--lm-identity", "--on-full",
         "nearest", "--clients", "5", "--clients-per-round", "5", "--rounds", "1", "--local-epochs", "2",
         "--batch-size", "4", "--lr", "0.05", "--eval-samples", "2", "--max-new-tokens", "3", "--eval-batch-size", "1",
         "--threads", "1", "--quiet"]


def fingerprint(dataset, predictions, examples, **kw):
    """A random model scores 0 on every task, so the scorer here fingerprints the answers instead (a CRC in 0..99.99):
    equal matrices mean equal answers, and an adapter that changes any answer changes its row."""
    return zlib.crc32(json.dumps([dataset, predictions]).encode()) % 10000 / 100


@pytest.fixture(scope="module", autouse=True)
def fingerprinted():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fcit.scoring, "evaluate_task", fingerprint)
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(llava-hf folder, LLaMA causal-LM folder, FCIT release, dolly file), all written here."""
    from tokenizers import Tokenizer
    from transformers import CLIPImageProcessor, LlamaForCausalLM
    d = tmp_path_factory.mktemp("rehearsal")
    llava, llama = str(d / "llava"), str(d / "llama")
    vocab = make_llama_tokenizer(llava)
    make_llama_tokenizer(llama)
    image_id = Tokenizer.from_file(os.path.join(llava, "tokenizer.json")).token_to_id("<image>")
    vision = tiny_clip_cfg()
    vision.image_size, vision.patch_size = 56, 14                  # ViT-L/14-336's patching, 16 image tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = hf_llava(tiny_llama_cfg(vocab_size=vocab + 8), vision, image_id, vision_feature_layer=-2)
        hf.to(torch.bfloat16).save_pretrained(llava)
        CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(llava)
        torch.manual_seed(1)
        LlamaForCausalLM(tiny_llama_cfg(vocab_size=vocab + 8)).to(torch.bfloat16).save_pretrained(llama)
    release = str(d / "release")
    mini.make_fcit_mini(release, seed=0, n_train=12, n_test=2, image_size=72)
    dolly = mini.make_fedit_mini(str(d / "dolly"), n_per_category=14)
    return llava, llama, release, dolly


def fcit_args(world, setting, methods, out, *extra):
    llava, llama, release, dolly = world
    model, data = (llama, dolly) if setting == "fedit" else (llava, release)
    return ["--setting", setting, "--model", model, "--data-root", data, "--methods", methods, "--out", str(out),
            *SHORT, *extra]


def results(out):
    r = json.load(open(os.path.join(out, "results.json")))
    for m in r["methods"].values():
        m.pop("wall_s")
    return r


@pytest.fixture
def spy(monkeypatch):
    """What every training loss and every generation saw: autocast on the CPU, its dtype, and the dtypes of the frozen
    weights, the LoRA weights and the trained projector."""
    seen = []

    def wrap(name):
        real = getattr(M.VLM, name)

        def f(self, *a, **k):
            lora_w = [p for n, p in self.named_parameters() if ".A." in n]
            trained = lora_w and self.projector is not None             # zeroshot's projector stays frozen
            proj = [p.dtype for p in self.projector.parameters()] if trained else [torch.float32]
            seen.append((name, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                         self.lm.embed_tokens.weight.dtype, {p.dtype for p in lora_w} or {torch.float32}, set(proj),
                         self.gradient_checkpointing or name == "generate"))
            return real(self, *a, **k)
        monkeypatch.setattr(M.VLM, name, f)
    wrap("loss")
    wrap("generate")
    return seen


def check_run(out, setting, methods, stages, dp=False):
    """Every method's matrix is finite; each saves its stage adapter (FedSA none under DP: the clients' B are not
    noised)."""
    exports = EXPORTS - ({"fedsa"} if dp else set())
    r = results(out)
    assert list(r["methods"]) == methods
    for name, m in r["methods"].items():
        assert len(m["matrix"]) == (1 if name == "mtl" else stages), name
        final = [v for v in m["matrix"][-1] if v is not None]
        assert final and all(math.isfinite(v) for v in final), (name, m["matrix"])
        saved = os.path.join(out, "adapters", name, f"stage{len(m['matrix'])}")
        assert os.path.isfile(os.path.join(saved, "fcit_adapter.safetensors")) == (name in exports), name
        assert os.path.isfile(os.path.join(saved, "peft", "adapter_config.json")) == (name in exports), name
    return r


@pytest.fixture(scope="module")
def task_hom(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("task-hom") / "out"
    assert fcit.main(fcit_args(world, "task-hom", FCIT_ALL, out, "--stages", "2")) == 0
    return out


@pytest.mark.parametrize("setting,methods,dtype,extra", [
    ("task-het", FCIT_ALL, "bfloat16", ["--aggregator", "fedadam"]),
    ("cap-hom", "disco,olora,fedsa", "bfloat16", ["--dp-clip", "0.5", "--dp-noise", "0.5", "--client-dropout", "0.2"]),
    ("cap-het", FCIT_ALL, "bfloat16", ["--image-cache-mb", "64", "--identity", "image"]),
    ("fedit", "fedit,local,fedsa,mtl", "bfloat16", ["--aggregator", "fedprox"]),
    ("cap-hom", "disco,moelora", "float16", [])])
def test_every_method_of_every_setting_in_half_precision(world, tmp_path, spy, monkeypatch, setting, methods, dtype,
                                                         extra):
    scalers, real = [], torch.amp.GradScaler.__init__
    monkeypatch.setattr(torch.amp.GradScaler, "__init__", lambda self, device, *a, **k: (
        scalers.append(device), real(self, device, *a, **k))[1])
    out = tmp_path / "out"
    stages = 1 if setting == "fedit" else 2
    assert fcit.main(fcit_args(world, setting, methods, out, "--stages", str(stages), "--dtype", dtype, *extra)) == 0
    check_run(out, setting, methods.split(","), stages, dp="--dp-clip" in extra)
    half = getattr(torch, dtype)
    want = {(True, half, half, frozenset({torch.float32}), frozenset({torch.float32}), True)}
    assert {(a, d, w, frozenset(lw), frozenset(pj), gc) for _, a, d, w, lw, pj, gc in spy} == want
    assert {s[0] for s in spy} == {"loss", "generate"}
    assert set(scalers) == ({"cpu"} if dtype == "float16" else set())          # fp16 trains with loss scaling
    if setting == "fedit":                        # the PEFT export, loaded as one LoRA on the bf16 base model
        peft = os.path.join(out, "adapters", "fedit", "stage1", "peft")
        assert fcit.main(fcit_args(world, setting, "fedit", tmp_path / "e", "--eval-only", "--adapters", peft)) == 0
        assert results(tmp_path / "e")["methods"]["peft"]["matrix"] == results(out)["methods"]["fedit"]["matrix"]


def test_task_hom_every_method_and_eval_only(world, task_hom, tmp_path):
    run = check_run(task_hom, "task-hom", FCIT_ALL.split(","), 2)["methods"]
    for method, stage in (("disco", 2), ("olora", 2), ("moelora", 2), ("finetune", 2), ("ewc", 1)):
        want = run[method]["matrix"][stage - 1]
        assert want != run["zeroshot"]["matrix"][stage - 1]             # the adapter changes the answers
        folder = os.path.join(task_hom, "adapters", method, f"stage{stage}")
        ev = tmp_path / f"eval-{method}-{stage}"
        assert fcit.main(fcit_args(world, "task-hom", "disco", ev, "--stages", "2", "--eval-only", "--adapters",
                                   folder)) == 0
        assert results(ev)["methods"][method]["matrix"] == [want], (method, stage)


def test_compiled_evaluation_gives_eager_tokens(world, task_hom):
    """DISCO's routed evaluation under bf16 autocast: the compiled decode step answers as the eager one."""
    args = fcit.build_parser().parse_args(fcit_args(world, "task-hom", "disco", task_hom, "--stages", "2"))
    cfg = fcit.resolve_config(args)
    bench = fcit.Benchmark(cfg, log=lambda s: None)
    fed, _, _ = fcit.load_saved_adapter(cfg, os.path.join(task_hom, "adapters", "disco", "stage2"), bench, "cpu",
                                        "bfloat16")
    exs = [ex for k in bench.seen(1) for ds in bench.test_datasets[bench.tasks[k]] for ex in bench.test[ds]]
    eager = fed.predict(exs, batch_size=4)
    fed.cfg.compile = True
    assert fed.predict(exs, batch_size=4) == eager


def test_resume_after_a_kill_mid_stage(world, tmp_path, monkeypatch):
    args = lambda out: fcit_args(world, "cap-hom", "disco", out, "--stages", "2", "--rounds", "2")
    assert fcit.main(args(tmp_path / "ref")) == 0
    real, calls = federate.Federation.run_round, []

    def killed(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:                      # stage 1, round 2: mid-stage
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(federate.Federation, "run_round", killed)
    with pytest.raises(KeyboardInterrupt):
        fcit.main(args(tmp_path / "out"))
    monkeypatch.setattr(federate.Federation, "run_round", real)
    assert fcit.main(args(tmp_path / "out")) == 0
    assert results(tmp_path / "out") == results(tmp_path / "ref")


def _rank(rank, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fcit.scoring.evaluate_task = fingerprint                       # a spawned process: the fixture's patch is not here
    assert fcit.main(argv) == 0


def test_two_gloo_processes_give_the_single_process_results(world, task_hom, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "gloo"
    try:
        mp.spawn(_rank, args=(port, fcit_args(world, "task-hom", "disco,fedsa", out, "--stages", "2")), nprocs=2)
    except mp.ProcessExitedException as e:   # gloo's C++ teardown can abort once the run is done (test_distributed.py)
        if e.signal_name != "SIGABRT" or not (out / "results.json").exists():
            raise
        warnings.warn(f"gloo teardown aborted after the run completed: {e}")
    single = results(task_hom)["methods"]
    assert results(out)["methods"] == {m: single[m] for m in ("disco", "fedsa")}
