"""End-to-end tests of the command line: every setting on a very small configuration, the results files,
resume after a simulated crash, and bad input (exit code 2 before any work)."""
import json
import os

import pytest
import torch
from PIL import Image

import data
import fcit
import federate
import server

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
        personal = {"personalized"} if name in ("local", "fedsa") else set()    # each client on its own tasks
        assert set(m) == {"matrix", "last", "avg", "bwt", "per_task_last", "routing_accuracy", "comm_bytes",
                          "wall_s"} | personal
        assert all(len(row) == n_tasks for row in m["matrix"])
        caption = [i for i, t in enumerate(r["tasks"]) if t in ("Flickr30k", "Other")]   # CIDEr can pass 1
        assert all(v is None or 0.0 <= v <= (250.0 if i in caption else 100.0)
                   for row in m["matrix"] for i, v in enumerate(row))
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
    assert fcit.main(["--setting", "fedit", "--methods", "fedit,local,fedsa", "--out", out] + SMALL) == 0
    r = check_results(out, "fedit", ["fedit", "local", "fedsa"])
    assert len(r["tasks"]) == 8 and len(r["methods"]["fedit"]["matrix"]) == 1


@pytest.mark.parametrize("extra", [[], ["--dp-clip", "0.5", "--dp-noise", "0.5", "--client-dropout", "0.3"]])
def test_resume_after_crash_gives_the_same_results(tmp_path, monkeypatch, extra):
    args = ["--setting", "cap-hom", "--methods", "disco", "--rounds", "2"] + SMALL[:4] + SMALL[6:] + extra
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
    if extra:   # the accountant resumed too: 4 stages x 2 rounds
        assert a["methods"]["disco"]["privacy"]["rounds"] == 8


def test_fedsa_scores_each_client_on_its_own_tasks(tmp_path, monkeypatch):
    # cap-het, every client every round: position p of stage t trains CAP_DYN_LIST[t][p] and the seeded draw puts
    # client sel[p] there, so the groups a client owns follow from the sampling table alone. The stub model runs the
    # real weight loading, finds whose B is loaded (and checks A is the global one), and answers right only when that
    # client owns the example's group: every own-task score is 100 only if each client is scored with its own model.
    owned = {c: set() for c in range(5)}
    for t in range(4):
        for p, c in enumerate(server.sample_clients(5, 5, 0, t, 0, "seeded")):
            owned[c].add(data.stage_task_for("cap-het", t, p))
    group = {ds: k for k in range(4) for ds in data.task_datasets("cap-het", k)}
    real = federate.Federation.predict

    def predict(self, examples, batch_size=8, client=None, distributed=False):
        real(self, examples[:1], client=client)                    # loads the model `client` is evaluated with
        cur = {n: self.params[n] for n in self.lora_names}
        assert all(torch.equal(cur[n], self.global_state[n]) for n in cur if ".A." in n)
        whose = [c for c, st in self.method.states.items() if all(torch.equal(cur[n], v) for n, v in st.items())]
        mine = owned[whose[0]] if whose else set()
        return [ex.answer if group[ex.dataset] in mine else "zzz" for ex in examples]
    monkeypatch.setattr(federate.Federation, "predict", predict)
    out = str(tmp_path / "out")
    assert fcit.main(["--setting", "cap-het", "--methods", "fedsa", "--caption-metric", "Bleu_1", "--out", out]
                     + SMALL) == 0
    r = check_results(out, "cap-het", ["fedsa"])     # (only local and fedsa get a personalized entry)
    tasks, fedsa = r["tasks"], r["methods"]["fedsa"]
    p = fedsa["personalized"]
    assert p["clients"] == {str(c): {"tasks": {tasks[k]: 100.0 for k in sorted(owned[c])}, "mean": 100.0}
                            for c in range(5)}
    assert p["mean"] == 100.0 and any(len(owned[c]) < 4 for c in owned)  # clients own different subsets
    # the global test sets average over the clients' models: a group scores the share of clients owning it
    assert fedsa["matrix"][-1] == [100.0] * 4      # a task: the mean over the clients holding it, each its own model
    md = open(os.path.join(out, "results.md")).read()
    assert "| fedsa | mean over clients | | **100.00** |" in md
    c0 = ", ".join(f"{tasks[k]} 100.00" for k in sorted(owned[0]))
    assert f"| fedsa | 0 | {c0} | 100.00 |" in md


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


def test_dry_run_prints_the_plan(tmp_path, capsys):
    assert fcit.main(["--setting", "task-het", "--dry-run", "--out", str(tmp_path)] + SMALL) == 0
    text = capsys.readouterr().out
    assert "8 stage(s)" in text and "stage 1: trains ArxivQA, IconQA, OCR-VQA, Flickr30k, FigureQA" in text
    assert json.load(open(tmp_path / "config.json"))["setting"] == "task-het"


def test_workers_give_the_results_of_one_process(tmp_path):
    """--workers 2 runs the methods in two spawned processes (disco, which trains, first) and gives the results.json
    of one process running them one after another; the worker count may change on a resume (it is not part of the
    configuration); the caller's torch thread count is restored after a run with --threads."""
    args = ["--setting", "cap-hom", "--methods", "zeroshot,disco", "--threads", "1"] + SMALL
    torch.set_num_threads(2)
    assert fcit.main(args + ["--workers", "1", "--out", str(tmp_path / "one")]) == 0
    assert torch.get_num_threads() == 2
    assert fcit.main(args + ["--workers", "2", "--out", str(tmp_path / "two")]) == 0
    assert fcit.main(args + ["--workers", "1", "--out", str(tmp_path / "two")]) == 0        # resumed: all done
    a, b = (json.load(open(tmp_path / d / "results.json")) for d in ("one", "two"))
    for r in (a, b):
        for m in r["methods"].values():
            m.pop("wall_s")
    assert list(b["methods"]) == ["zeroshot", "disco"] and a == b      # in the order of --methods


TASK_ORDER = ["ImageNet-R", "ArxivQA", "IconQA", "CLEVR-Math", "OCR-VQA", "Flickr30k", "FigureQA", "super-CLEVR"]


def test_scores_follow_the_predictions(tmp_path, monkeypatch):
    # A model that answers a task right only in the stage that trains it (the gold answer; "zzz" otherwise):
    # the matrix is 100 on the diagonal and 0 below it, so Last = 100/8, Avg = 100/8 * H_8, BWT = -100.
    def predict(self, examples, batch_size=8, client=None, distributed=False):
        own = TASK_ORDER[self.last[0]]
        return [ex.answer if ex.dataset == own else "zzz" for ex in examples]
    monkeypatch.setattr(federate.Federation, "predict", predict)
    out = str(tmp_path / "out")
    args = ["--setting", "task-hom", "--methods", "finetune", "--caption-metric", "Bleu_1", "--out", out]
    assert fcit.main(args + SMALL) == 0
    r = json.load(open(os.path.join(out, "results.json")))["methods"]["finetune"]
    assert r["matrix"] == [[100.0 if i == t else (0.0 if i < t else None) for i in range(8)] for t in range(8)]
    assert r["last"] == pytest.approx(12.5, abs=1e-4)
    assert r["avg"] == pytest.approx(12.5 * (1 + 1/2 + 1/3 + 1/4 + 1/5 + 1/6 + 1/7 + 1/8), abs=1e-4)
    assert r["bwt"] == pytest.approx(-100.0)


def test_mtl_is_one_joint_training_with_the_federated_budget(tmp_path):
    # 8 tasks x 30 training samples pooled; budget = rounds x local epochs x per-round share = 1 x 2 x 5/5 = 2
    # epochs -> ceil(480 / 8) = 60 optimizer steps, one evaluation on all 8 tasks, Last only.
    out, log = str(tmp_path / "out"), str(tmp_path / "log.jsonl")
    assert fcit.main(["--setting", "task-hom", "--methods", "mtl", "--out", out, "--json-log", log] + SMALL) == 0
    r = json.load(open(os.path.join(out, "results.json")))["methods"]["mtl"]
    assert len(r["matrix"]) == 1 and all(v is not None for v in r["matrix"][0])
    assert r["avg"] is None and r["bwt"] is None and r["last"] is not None
    recs = [json.loads(line) for line in open(log)]
    assert len(recs) == 5 and sum(r["n"] for r in recs) == 240      # every client's share of the pooled data
    assert "mtl_epochs" not in json.load(open(os.path.join(out, "config.json")))
    md = open(os.path.join(out, "results.md")).read()
    assert "| mtl |" in md and md.strip().endswith("| – | – |")


def test_stages_runs_the_first_stages_only(tmp_path, capsys):
    """--stages N: N rows, the tasks seen by stage N evaluated, mtl pooling only those stages' data (2 x 30 samples);
    more stages than the setting has is refused, naming the flag and the setting's count."""
    out, log = str(tmp_path / "out"), str(tmp_path / "log.jsonl")
    args = ["--setting", "task-hom", "--methods", "finetune,mtl", "--stages", "2", "--out", out, "--json-log", log]
    assert fcit.main(args + SMALL) == 0
    r = json.load(open(os.path.join(out, "results.json")))["methods"]
    assert [[v is not None for v in row] for row in r["finetune"]["matrix"]] == \
        [[True] + [False] * 7, [True, True] + [False] * 6]
    assert [v is not None for v in r["mtl"]["matrix"][0]] == [True, True] + [False] * 6
    assert sum(json.loads(line)["n"] for line in open(log) if json.loads(line)["method"] == "mtl") == 60
    capsys.readouterr()
    assert fcit.main(["--setting", "cap-hom", "--stages", "5", "--dry-run", "--out", str(tmp_path / "c")]) == 2
    assert "--stages 5: --setting cap-hom has 4 stage(s)" in capsys.readouterr().err


def test_bad_values_name_their_flag(capsys):
    for flag, value in [("--rounds", "0"), ("--lr", "-1"), ("--tau", "2"), ("--eval-samples", "0"),
                        ("--subspaces", "0"), ("--batch-size", "0"), ("--warmup-ratio", "1"),
                        ("--max-length", "0"), ("--clients", "0"), ("--stages", "0")]:
        assert fcit.main(["--setting", "task-hom", flag, value, "--dry-run"]) == 2, flag
        assert f"{flag} must be" in capsys.readouterr().err


def tiny_llava_hf(tmp_path):
    import shutil
    d = tmp_path / "llava-hf"
    shutil.copytree(fcit.TINY_MODEL_DIR, d)
    assert "do_pad" not in json.load(open(d / "preprocessor_config.json"))
    return d


def test_real_model_preprocessing_is_padded_and_recorded(tmp_path):
    d = tiny_llava_hf(tmp_path)
    base = ["--setting", "task-hom", "--model", str(d), "--methods", "finetune", "--dry-run"] + SMALL
    assert fcit.main(base + ["--out", str(tmp_path / "a")]) == 0
    pre = json.load(open(tmp_path / "a" / "config.json"))["image_preprocess"]
    assert pre == {"pad_to_square": True, "size": ["shortest", 64], "crop_size": [64, 64],
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    assert fcit.main(base + ["--out", str(tmp_path / "b"), "--image-aspect", "crop"]) == 0
    assert json.load(open(tmp_path / "b" / "config.json"))["image_preprocess"]["pad_to_square"] is False


def test_disco_on_a_real_model_needs_an_identity_encoder(tmp_path, capsys):
    d = tiny_llava_hf(tmp_path)
    base = ["--setting", "task-hom", "--model", str(d), "--methods", "disco", "--dry-run"] + SMALL
    assert fcit.main(base + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--text-encoder" in err and "--lm-identity" in err
    assert fcit.main(base + ["--out", str(tmp_path / "b"), "--lm-identity"]) == 0
    assert fcit.main(["--setting", "task-hom", "--methods", "disco", "--dry-run", "--out", str(tmp_path / "c")]
                     + SMALL) == 0   # the embedded default requests the fallback itself


def test_protocol_defaults(tmp_path):
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text("".join(json.dumps({"instruction": f"q{i}", "context": "", "response": "a", "category": c}) + "\n"
                             for c in ("open_qa", "closed_qa") for i in range(12)))
    release = tmp_path / "release"
    (release / "instructions").mkdir(parents=True)
    resolve = lambda *a: fcit.resolve_config(fcit.build_parser().parse_args(list(a)))
    fedit = resolve("--setting", "fedit", "--data-root", str(dolly))
    assert (fedit.lr_schedule, fedit.warmup_ratio, fedit.max_length, fedit.lora_init, fedit.shard_seed) == \
        ("linear", 0.0, 512, "peft", 42)
    assert (fedit.batch_size, fedit.grad_accum, fedit.client_sampling, fedit.clients_per_round) == \
        (32, 2, "official", 1)
    task = resolve("--setting", "task-hom", "--data-root", str(release), "--methods", "finetune,mtl")
    assert (task.lr_schedule, task.warmup_ratio, task.max_length, task.lora_init) == ("cosine", 0.03, 2048, "fcit")
    assert (task.lr, task.projector_lr, task.client_sampling, task.server_state) == (2e-4, None, "official", "reset")
    assert task.caption_metric == "average"
    assert task.projector_lr is None and task.lr == 2e-4   # the projector trains at the LoRA lr, as the paper's did
    mtl = federate.METHODS["mtl"](type("Fed", (), {"cfg": task})())
    assert (mtl.schedule.stages(8), mtl.schedule.rounds, mtl.schedule.local_epochs) == (1, 10, 1.0)
    emb = resolve("--setting", "task-hom")
    assert (emb.client_sampling, emb.lm_identity, emb.image_aspect) == ("seeded", True, "pad")


def test_two_runs_with_the_same_seed_agree_exactly(tmp_path):
    args = ["--setting", "cap-het", "--methods", "disco"] + SMALL
    results = []
    for name in ("a", "b"):
        assert fcit.main(args + ["--out", str(tmp_path / name)]) == 0
        r = json.load(open(tmp_path / name / "results.json"))
        for m in r["methods"].values():
            m.pop("wall_s")
        results.append(r)
    assert results[0] == results[1]


def test_eval_only_reproduces_a_saved_stage(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert fcit.main(["--setting", "cap-hom", "--methods", "disco,olora", "--out", out] + SMALL) == 0
    run = json.load(open(os.path.join(out, "results.json")))["methods"]
    for method, stage in (("disco", 4), ("disco", 2), ("olora", 3)):
        ev = str(tmp_path / f"eval-{method}-{stage}")
        folder = os.path.join(out, "adapters", method, f"stage{stage}")
        assert fcit.main(["--setting", "cap-hom", "--eval-only", "--adapters", folder, "--out", ev] + SMALL) == 0
        r = json.load(open(os.path.join(ev, "results.json")))
        assert r["adapters"] == os.path.abspath(folder)
        got = r["methods"][method]
        assert got["matrix"] == [run[method]["matrix"][stage - 1]] and got["avg"] is None
    # a PEFT adapter (FedIT's, text-only): one LoRA on the base model, evaluated at the final stage
    out = str(tmp_path / "fedit")
    assert fcit.main(["--setting", "fedit", "--methods", "fedit", "--out", out] + SMALL) == 0
    want = json.load(open(os.path.join(out, "results.json")))["methods"]["fedit"]["matrix"]
    peft_dir = os.path.join(out, "adapters", "fedit", "stage1", "peft")
    assert fcit.main(["--setting", "fedit", "--eval-only", "--adapters", peft_dir, "--out", str(tmp_path / "e")]
                     + SMALL) == 0
    assert json.load(open(tmp_path / "e" / "results.json"))["methods"]["peft"]["matrix"] == want
    assert fcit.main(["--setting", "cap-hom", "--eval-only", "--adapters", str(tmp_path)] + SMALL) == 2
    assert "expected a stage folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fcit.main(["--setting", "cap-hom", "--eval-only"])


def test_image_cache_changes_nothing_but_the_time(tmp_path):
    """--image-cache-mb: each image's frozen vision states are computed once and reused. Training and answers are
    bit-identical to encoding every image each time, also when the cache is full."""
    def run(mb, full=False):
        args = fcit.build_parser().parse_args(["--setting", "task-hom", "--image-cache-mb", str(mb)] + SMALL)
        cfg = fcit.resolve_config(args)
        bench = fcit.Benchmark(cfg, log=lambda s: None)
        model, tok, improc, _ = fcit.load_model(cfg, "cpu", "float32")
        fed = federate.Federation(model, tok, improc, cfg)
        fed.image_states.nbytes = mb * 2 ** 20 if full else 0
        torch.manual_seed(0)
        fed.run_round(0, 0, bench.client_data(0))
        test = bench.test[bench.test_datasets[bench.tasks[0]][0]]
        return fed, fed.global_state, fed.predict(test), {ex.image for ex in bench.client_data(0)(0, 0)}

    _, ref_state, ref_answers, _ = run(0)
    for mb, full in ((256, False), (1, True)):
        fed, state, answers, train_images = run(mb, full)
        assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
        assert answers == ref_answers
        kept = set(fed.image_states.kept)
        assert (train_images <= kept) != full and bool(kept) != full
