"""Fault injection on --eval-only's adapters (issue 26): a stage adapter whose method, setting, targets, rank, subspaces
or stage do not fit the run, or whose method disagrees with its tensors (DISCO's identity keys, MoELoRA's routers), and
PEFT adapters with fields we cannot honour, each exit 2 with one line naming the file and every mismatch; the PEFT
fields we honour give peft's own logits (peft and transformers as oracles)."""
import copy
import dataclasses
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_adapters import tiny_llama

import adapters
import checkpoint
import fcit
import federate

RUN = ["--setting", "cap-hom", "--stages", "1", "--rounds", "1", "--clients", "2", "--clients-per-round", "2",
       "--batch-size", "8", "--eval-samples", "2", "--max-new-tokens", "3", "--quiet", "--workers", "1",
       "--threads", "1"]
LM_MLP = r".*language_model.*\.(gate_proj|up_proj|down_proj)"


def small(mp, cache):
    torch.set_num_threads(1)
    mp.setattr(fcit, "CACHE_DIR", str(cache))
    mp.setattr(fcit, "MINI", dict(n_train=30, n_test=4))
    mp.setattr(fcit, "MINI_FEDIT", dict(n_per_category=16))


@pytest.fixture(autouse=True)
def small_benchmarks(tmp_path_factory, monkeypatch):
    small(monkeypatch, tmp_path_factory.getbasetemp() / "cache")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One stage of cap-hom trained by disco, finetune and moelora: the adapters fcit writes."""
    mp = pytest.MonkeyPatch()
    small(mp, tmp_path_factory.getbasetemp() / "cache")
    out = tmp_path_factory.mktemp("run") / "out"
    assert fcit.main(RUN + ["--methods", "disco,finetune,moelora", "--out", str(out)]) == 0
    mp.undo()
    return out


def written(tmp_path, setting, method, stage, *flags):
    """The stage folder fcit.save_adapters writes for `method` of `setting` (an untrained LoRA, no training run)."""
    cfg = fcit.resolve_config(fcit.build_parser().parse_args(["--setting", setting, "--methods", method, *flags]))
    model, tok, improc, enc = fcit.load_model(cfg, "cpu", "float32")
    fed = federate.Federation(model, tok, improc, dataclasses.replace(cfg, method=method), enc)
    fcit.save_adapters(fed, fed.model, str(tmp_path / "w"), stage, True)
    return tmp_path / "w" / "adapters" / method / f"stage{stage + 1}" / "fcit_adapter.safetensors"


def rewrite(src, dst, meta=(), drop=()):
    """A copy of a stage adapter with metadata entries replaced (None: removed) and tensors dropped."""
    with safe_open(str(src), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    m = json.loads(header["metadata"])
    for k, v in dict(meta).items():
        m.pop(k) if v is None else m.__setitem__(k, v)
    header["metadata"] = json.dumps(m)
    save_file(tensors, str(dst), metadata=header)
    return dst


def eval_only(adapter, out, *flags, setting="cap-hom"):
    return fcit.main(RUN + ["--setting", setting, *flags, "--eval-only", "--adapters", str(adapter), "--out", str(out)])


def refused(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert err.startswith("fcit.py: error: ") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)
    return err


# ----------------------------------------------------------------------------------------------------
# our stage adapters


@pytest.mark.parametrize("method, meta, drop, flags, fragments", [
    ("disco", {"method": "olora"}, (), (),
     ["holds DISCO's 'extra.identity_keys' and 'extra.identity_sizes' but its metadata says method 'olora'"]),
    ("disco", {}, ("extra.identity_keys", "extra.identity_sizes"), (),
     ["no 'extra.identity_keys' or 'extra.identity_sizes' tensor: method 'disco' routes with its identity"]),
    ("finetune", {"method": "disco"}, (), (),
     ["no 'extra.identity_keys' or", "subspaces 1 (this run: --subspaces 4)"]),
    ("moelora", {"method": "finetune"}, (), (), ["method 'finetune' has no token routers", "subspaces 4"]),
    ("finetune", {"method": "zeroshot"}, (), (), ["method 'zeroshot' trains no adapter"]),
    ("disco", {"stage": 99}, (), (), ["stage index 99, outside this run's 1 stage(s)"]),
    ("disco", {"stage": -5}, (), ("--stages", "4"), ["stage index -5, outside this run's 4 stage(s)"]),
    ("disco", {"stage": "0"}, (), (), ["stage index '0'"]),
    ("disco", {"setting": None}, (), (), ["setting None (this run: --setting cap-hom)"]),
    ("disco", {"setting": "cap-het"}, (), (), ["setting 'cap-het' (this run: --setting cap-hom)"]),
    ("disco", {}, (), ("--rank", "16", "--alpha", "32", "--lora-targets", "gate_proj,up_proj"),
     ["lora-targets down_proj,gate_proj,up_proj (this run: --lora-targets gate_proj,up_proj)",
      "rank 32 (this run: --rank 16)", "alpha 64.0 (this run: --alpha 32.0)"]),
])
def test_a_stage_adapter_that_does_not_fit_the_run_is_refused(run, tmp_path, capsys, method, meta, drop, flags,
                                                              fragments):
    """Each mismatch is named, in one line with the file; nothing is evaluated or written."""
    src = run / "adapters" / method / "stage1" / "fcit_adapter.safetensors"
    bad = rewrite(src, tmp_path / "bad.safetensors", meta, drop)
    assert eval_only(bad, tmp_path / "e", *flags) == 2
    refused(capsys, str(bad), *fragments)
    assert not (tmp_path / "e").exists()                   # refused before --out is created


def test_the_adapter_as_written_evaluates_to_the_runs_row(run, tmp_path):
    """The control: what save_adapters wrote (method, setting, stage) passes every check and reproduces the run."""
    want = json.load(open(run / "results.json"))["methods"]
    for method in ("disco", "finetune", "moelora"):
        assert eval_only(run / "adapters" / method / "stage1", tmp_path / method) == 0
        got = json.load(open(tmp_path / method / "results.json"))["methods"][method]
        assert got["matrix"] == want[method]["matrix"], method
    meta = adapters.check_stage_adapter(str(run / "adapters" / "disco" / "stage1" / "fcit_adapter.safetensors"),
                                        fcit.resolve_config(fcit.build_parser().parse_args(RUN)), 1, federate.METHODS)
    assert meta == {"method": "disco", "setting": "cap-hom", "stage": 0}


def test_an_adapter_must_cover_every_lora_layer_of_the_model(tmp_path):
    """A file with LoRA for gate_proj only, loaded into a model with LoRA on the whole MLP: refused, naming the first
    layer left without its adapter (it would be evaluated at its initialisation), and nothing is changed."""
    from test_lora import make, randomize_lora
    part, _ = make(targets=("gate_proj",))
    randomize_lora(part)
    adapters.save_adapter(part, str(tmp_path / "a.safetensors"))
    full, _ = make()
    before = {k: v.clone() for k, v in full.state_dict().items()}
    with pytest.raises(ValueError, match=r"a.safetensors: holds no LoRA for the model's lm\.layers\.0\.mlp\.down_proj "
                                         r"\(4 LoRA module"):
        adapters.load_adapter(full, str(tmp_path / "a.safetensors"))
    assert all(torch.equal(v, before[k]) for k, v in full.state_dict().items())


def test_a_fedit_adapter_under_task_hom_names_each_mismatch(tmp_path, capsys):
    """FedIT's adapter (q,k,v,o_proj, r=8, alpha 16) is FedIT's to evaluate: under --setting task-hom the method,
    setting, targets, rank and alpha are each named; under --setting fedit it evaluates."""
    path = written(tmp_path, "fedit", "fedit", 0)
    assert eval_only(path, tmp_path / "e", setting="task-hom") == 2
    refused(capsys, str(path), "method 'fedit' is not one of --setting task-hom's", "setting 'fedit'",
            "lora-targets k_proj,o_proj,q_proj,v_proj (this run: --lora-targets down_proj,gate_proj,up_proj)",
            "rank 8 (this run: --rank 64)", "alpha 16.0 (this run: --alpha 128.0)")
    assert eval_only(path, tmp_path / "f", "--methods", "fedit", setting="fedit") == 0


def test_an_mtl_adapter_has_one_joint_stage(tmp_path, capsys):
    """mtl trains one joint stage: a stage index past it is refused, not read past the task table."""
    path = rewrite(written(tmp_path, "cap-hom", "mtl", 0), tmp_path / "mtl.safetensors", {"stage": 1})
    assert eval_only(path, tmp_path / "e", "--stages", "2") == 2
    refused(capsys, str(path), "stage index 1, but mtl trains one joint stage")


# ----------------------------------------------------------------------------------------------------
# PEFT adapters


@pytest.fixture(scope="module")
def hf_llava():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    return transformers.LlavaForConditionalGeneration.from_pretrained(fcit.TINY_MODEL_DIR, dtype=torch.float32).eval()


def peft_saved(hf, folder, config):
    import peft
    pm = peft.get_peft_model(copy.deepcopy(hf), config)
    pm.save_pretrained(str(folder))
    return folder


def edit_config(folder, **fields):
    path = folder / "adapter_config.json"
    cfg = json.load(open(path))
    cfg.update(fields)
    path.write_text(json.dumps(cfg))
    return folder


def broken_json(folder):
    (folder / "adapter_config.json").write_text("{'r': 8,")
    return folder


def bin_only(folder):
    """adapter_model.bin (a pickle, as old peft wrote it) instead of adapter_model.safetensors."""
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        torch.save({k: f.get_tensor(k) for k in f.keys()}, str(folder / "adapter_model.bin"))
    os.remove(folder / "adapter_model.safetensors")
    return folder


BAD_PEFT = {   # case -> (make the folder from (hf, tmp_path), the fragments of the message)
    "invalid JSON": (lambda hf, d: broken_json(peft_saved(hf, d, _lora())), ["adapter_config.json: malformed JSON"]),
    "DoRA": (lambda hf, d: peft_saved(hf, d, _lora(use_dora=True)), ["use_dora=True (DoRA's magnitude vectors)"]),
    "IA3": (lambda hf, d: peft_saved(hf, d, _ia3()), ["peft_type='IA3' (only LORA adapters)"]),
    "bin only": (lambda hf, d: bin_only(peft_saved(hf, d, _lora())),
                 ["no adapter_model.safetensors (found ['adapter_model.bin'])", "never loaded"]),
    "bias": (lambda hf, d: peft_saved(hf, d, _lora(bias="all")), ["bias='all'"]),
    "modules_to_save": (lambda hf, d: peft_saved(hf, d, _lora(modules_to_save=["multi_modal_projector"])),
                        ["modules_to_save=['multi_modal_projector']"]),
    "layer_replication": (lambda hf, d: edit_config(peft_saved(hf, d, _lora()), layer_replication=[[0, 2], [1, 4]]),
                          ["layer_replication=[[0, 2], [1, 4]] (duplicated decoder layers)"]),
    "pissa": (lambda hf, d: edit_config(peft_saved(hf, d, _lora()), init_lora_weights="pissa"),
              ["init_lora_weights='pissa' (changes the base weights"]),
    "unknown field": (lambda hf, d: edit_config(peft_saved(hf, d, _lora()), use_magic=True),
                      ["use_magic=True (a field this loader does not know)"]),
    "targets beyond the weights": (lambda hf, d: edit_config(peft_saved(hf, d, _lora()), target_modules=[
        "gate_proj", "up_proj", "down_proj", "q_proj"]), ["selects lm.layers.0.self_attn.q_proj (", "holds no lora_A"]),
    "weights beyond the targets": (lambda hf, d: edit_config(peft_saved(hf, d, _lora()), target_modules=[
        "gate_proj", "up_proj"]), ["pe/adapter_model.safetensors: base_model.model.model.language_model.layers.0.mlp.",
                                   "down_proj.lora_A.weight: module", "not selected by adapter_config.json's target_"]),
}


def _lora(**kw):
    import peft
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=LM_MLP, **kw)


def _ia3():
    import peft
    return peft.IA3Config(target_modules=LM_MLP, feedforward_modules=r".*down_proj")


@pytest.mark.parametrize("case", list(BAD_PEFT))
def test_a_peft_adapter_we_cannot_honour_is_refused(hf_llava, tmp_path, capsys, monkeypatch, case):
    """peft's own files (or one field changed): one line naming the file and the field, exit 2; a .bin is never
    unpickled."""
    make, fragments = BAD_PEFT[case]
    folder = make(hf_llava, tmp_path / "pe")
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load"))
    assert eval_only(folder, tmp_path / "e") == 2
    refused(capsys, str(folder), *fragments)
    assert (tmp_path / "e").exists() == ("targets" in case)       # the others are refused before --out is created


def test_a_peft_adapter_with_honoured_fields_evaluates(hf_llava, tmp_path, capsys):
    """peft's LoRA on layers 1 and 3 only (layers_to_transform), rsLoRA scaling: evaluated, exit 0."""
    import peft
    folder = peft_saved(hf_llava, tmp_path / "pe", peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj"], layers_to_transform=[1, 3],
        layers_pattern="layers"))
    edit_config(folder, target_modules=["gate_proj", "up_proj", "down_proj"])       # now down_proj has no weights
    assert eval_only(folder, tmp_path / "e") == 2
    refused(capsys, "selects lm.layers.1.mlp.down_proj (2 module(s))")
    edit_config(folder, target_modules=["gate_proj", "up_proj"])
    assert eval_only(folder, tmp_path / "f") == 0
    assert "peft" in json.load(open(tmp_path / "f" / "results.json"))["methods"]


HONOURED = {   # LoraConfig fields this loader honours, each against peft's logits
    "use_rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rank_pattern, alpha_pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                                        alpha_pattern={"down_proj": 3}),
    "layers_to_transform, layers_pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                layers_to_transform=[1], layers_pattern="layers"),
    "layers_to_transform": dict(r=4, lora_alpha=8, target_modules=["gate_proj"], layers_to_transform=0),
    "exclude_modules": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            exclude_modules=["model.layers.0.self_attn.v_proj"]),
    "target_modules regex": dict(r=4, lora_alpha=16, target_modules=r"model\.layers\.1\.mlp\.(gate_proj|up_proj)"),
}


@pytest.mark.parametrize("case", list(HONOURED))
def test_honoured_peft_fields_give_peft_logits(tmp_path, case):
    """peft's adapter with the field, read into our model of the same checkpoint: peft's logits within 1e-4. The same
    folder told to target one module more (o_proj, or layer 0's) is refused: its weights are not what it targets."""
    peft = pytest.importorskip("peft")
    hf = tiny_llama(tmp_path)
    hf.save_pretrained(str(tmp_path / "base"))
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**HONOURED[case]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    pm.eval().save_pretrained(str(tmp_path / "pe"))
    ours = checkpoint.load_vlm(str(tmp_path / "base"), dtype=torch.float32).eval()
    adapters.load_peft_adapter(ours, str(tmp_path / "pe"))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pm(ids).logits
        assert float((ours(ids) - want).abs().max()) <= 1e-4
        assert float((hf(ids).logits - want).abs().max()) > 1e-3                   # the adapter does something
    cfg = json.load(open(tmp_path / "pe" / "adapter_config.json"))
    tm = cfg["target_modules"]
    more = tm.replace("1", "[01]") if isinstance(tm, str) else tm + ["o_proj"]
    if cfg.get("exclude_modules"):
        more = tm
        cfg["exclude_modules"] = None
    edit_config(tmp_path / "pe", target_modules=more, exclude_modules=cfg.get("exclude_modules"),
                layers_to_transform=None, layers_pattern=None)
    with pytest.raises(ValueError, match=r"adapter_config.json: target_modules .* selects lm\.layers\.0\..*holds no"):
        adapters.load_peft_adapter(checkpoint.load_vlm(str(tmp_path / "base"), dtype=torch.float32),
                                   str(tmp_path / "pe"))
