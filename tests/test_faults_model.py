"""Faults in a checkpoint folder: each is refused before any weight loads, with exit 2 and one line naming the file and
the key, never a traceback or a silent default. The broken folders are copies of the embedded tiny VLM (llava-hf
layout, test_fcit.tiny_llava_hf) with one thing changed."""
import json

import pytest
from test_fcit import small_benchmarks, tiny_llava_hf  # noqa: F401  (autouse: a small FCIT-mini, a temporary cache)
from test_model import make_llama_tokenizer

import checkpoint as C
import fcit

ARGS = ["--setting", "cap-hom", "--methods", "finetune", "--stages", "1", "--rounds", "1", "--clients", "2",
        "--clients-per-round", "2", "--batch-size", "4", "--eval-samples", "2", "--max-new-tokens", "2", "--quiet",
        "--workers", "1", "--threads", "1"]


def tiny_copy(tmp_path, edit_config=None):
    """A copy of the embedded tiny VLM; edit_config(config dict) changes its config.json in place."""
    d = tiny_llava_hf(tmp_path)
    if edit_config is not None:
        cfg = json.load(open(d / "config.json"))
        edit_config(cfg)
        json.dump(cfg, open(d / "config.json", "w"))
    return d


def refused(tmp_path, capsys, *argv):
    """fcit.main on a fresh --out: exit 2, one line on stderr, no traceback, no --out folder made. Returns the line."""
    out = tmp_path / "out"
    assert fcit.main(ARGS + list(argv) + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fcit.py: error: ") and "\n" not in err and "Traceback" not in err, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("section,key,default", [("text_config", "hidden_size", 4096),
                                                 ("text_config", "vocab_size", 32000),
                                                 ("text_config", "num_hidden_layers", 32),
                                                 ("vision_config", "image_size", 224)])
def test_a_missing_shape_key_is_named_before_any_weight_loads(tmp_path, capsys, monkeypatch, section, key, default):
    """transformers' default for a key that fixes weight shapes (LlamaConfig's 7B sizes, CLIPVisionConfig's ViT-B/32)
    does not fit these weights: the key is named, with its default, and no tensor is read."""
    tf = pytest.importorskip("transformers")
    oracle = tf.LlamaConfig() if section == "text_config" else tf.CLIPVisionConfig()
    assert getattr(oracle, key) == default
    d = tiny_copy(tmp_path, lambda c: c[section].pop(key))
    err = refused(tmp_path, capsys, "--model", str(d))
    assert f"{d}/config.json lacks {section}.{key} (default {default})" in err and "expected the key" in err
    monkeypatch.setattr(C, "load_weights", lambda *a, **k: pytest.fail("a weight was loaded"))
    with pytest.raises(C.CheckpointError, match=rf"lacks {section}\.{key} \(default {default}\)"):
        C.load_vlm(d)


def test_a_missing_key_keeps_the_transformers_default_where_it_fits(tmp_path):
    """Keys whose default does not decide a shape (rms_norm_eps), or whose default matches the weights (num_channels 3,
    head_dim = hidden / heads), keep transformers' default, as a sparse llava-hf config.json relies on."""
    tf = pytest.importorskip("transformers")

    def sparse(c):
        for k in ("rms_norm_eps", "head_dim", "rope_theta", "max_position_embeddings"):
            c["text_config"].pop(k)
        c["text_config"].pop("rope_parameters")
        c["vision_config"].pop("num_channels")
    d = tiny_copy(tmp_path, sparse)
    cfg = C.check_checkpoint(d)
    ref = tf.LlamaConfig(hidden_size=160, num_attention_heads=5)
    assert (cfg.text.rms_norm_eps, cfg.text.max_position_embeddings) == (ref.rms_norm_eps, ref.max_position_embeddings)
    assert (cfg.text.head_dim, cfg.vision.num_channels) == (ref.head_dim, tf.CLIPVisionConfig().num_channels)
    C.load_vlm(d)


def test_a_truncated_weight_file_is_named(tmp_path, capsys):
    d = tiny_copy(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = refused(tmp_path, capsys, "--model", str(d))
    assert f"{f}: cannot read safetensors file (truncated or corrupt?)" in err
    assert "expected a complete safetensors file" in err


def test_a_missing_image_token_index_is_named(tmp_path, capsys):
    """LlavaConfig's default 32000 is not this tokenizer's <image> (id 4, vocabulary 1027)."""
    d = tiny_copy(tmp_path, lambda c: c.pop("image_token_index"))
    err = refused(tmp_path, capsys, "--model", str(d))
    assert f"{d}/config.json has no image_token_index (LlavaConfig's default 32000 was used)" in err
    assert "expected the tokenizer's <image> id 4" in err


def test_a_tokenizer_beyond_the_vocabulary_is_named(tmp_path, capsys):
    """A token id >= vocab_size would index past embed_tokens at the first batch that holds it: refused at load."""
    d = tiny_copy(tmp_path)
    tok = json.load(open(d / "tokenizer.json"))
    vocab = json.load(open(d / "config.json"))["text_config"]["vocab_size"]
    assert max(t["id"] for t in tok["added_tokens"]) == vocab - 1
    tok["added_tokens"].append(dict(tok["added_tokens"][-1], id=vocab, content="<extra>"))
    json.dump(tok, open(d / "tokenizer.json", "w"))
    err = refused(tmp_path, capsys, "--model", str(d))
    assert f"{d}/tokenizer.json: token '<extra>' has id {vocab}, outside the model's vocabulary (config.json " \
           f"text_config.vocab_size {vocab}); expected every token id below vocab_size" in err


def test_a_corrupt_config_json_is_named(tmp_path, capsys):
    """In the --model folder and in the --text-encoder (CLIP) folder, which is otherwise read only once training
    starts."""
    d = tiny_copy(tmp_path)
    (d / "config.json").write_text('{"model_type": "llava", ')
    err = refused(tmp_path, capsys, "--model", str(d))
    assert f"{d}/config.json: malformed JSON at line 1 column 25" in err
    clip = tmp_path / "clip"
    clip.mkdir()
    make_llama_tokenizer(clip)
    (clip / "config.json").write_text('{"model_type": "clip",\n "text_config": {')
    err = refused(tmp_path, capsys, "--model", fcit.TINY_MODEL_DIR, "--text-encoder", str(clip))
    assert f"--text-encoder {str(clip)!r}" in err and f"{clip}/config.json: malformed JSON at line 2" in err
