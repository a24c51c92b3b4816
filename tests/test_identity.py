"""DISCO's identity from images as the official code computes it (Ghy0501/FCIT clip_encoder.py: the image_embeds of
CLIPVisionModelWithProjection), and the text + image ablation (model_aggregation.py, commented out: the mean of the
text and the image similarities), against transformers' CLIPModel on a tiny random CLIP written on the fly."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_fcit import small_benchmarks  # noqa: F401  (autouse: a small FCIT-mini, a temporary cache)
from test_model import make_llama_tokenizer, save
from toy import tiny_cfg, tiny_model

import checkpoint as C
import data
import disco
import fcit
import federate as fd
from methods import Round

TOL = 1e-4


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny CLIPModel (text 32-d, image embedding 16-d) with its tokenizer and image processor, and two images."""
    tf = pytest.importorskip("transformers")
    from PIL import Image
    d = tmp_path_factory.mktemp("clip")
    torch.manual_seed(5)
    tc = dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=40, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vc = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = tf.CLIPModel(tf.CLIPConfig(text_config=tc, vision_config=vc, projection_dim=16)).eval()
    with torch.no_grad():   # non-trivial norms and biases: every parameter matters
        for n, p in hf.named_parameters():
            if "norm" in n or "bias" in n or "class_embedding" in n:
                p.add_(torch.randn_like(p) * 0.1)
    save(hf, d)
    make_llama_tokenizer(d)
    json.dump({"bos_token": "<s>", "eos_token": "<pad>", "pad_token": "<pad>", "add_bos_token": True},
              open(d / "tokenizer_config.json", "w"))   # as OpenAI CLIP's: EOT is the largest id and pads
    tf.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(d)
    paths = []
    for i, size in enumerate([(20, 16), (16, 24), (30, 30)]):
        g = torch.Generator().manual_seed(i)
        px = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        paths.append(str(d / f"{i}.png"))
        Image.fromarray(px).save(paths[-1])
    return d, hf, paths


def fed_with(clip_dir, identity):
    m, tok = tiny_model()
    enc = C.load_clip_text(clip_dir, image_tower=True, pad_to_square=False)
    return fd.Federation(m, tok, None, tiny_cfg(method="disco", identity=identity), text_encoder=enc)


def oracle(hf, clip_dir, paths, texts, ctok):
    """transformers' image embeddings (of transformers' own pre-processing) and its text tower's pooled states."""
    from PIL import Image
    from transformers import CLIPImageProcessor
    px = CLIPImageProcessor.from_pretrained(clip_dir)(images=[Image.open(p).convert("RGB") for p in paths],
                                                      return_tensors="pt").pixel_values
    ids, att = disco._padded([disco.clip_ids(ctok, t) for t in texts], ctok.pad_id)
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=px)
        txt = hf.text_model(input_ids=ids, attention_mask=att).pooler_output
    return (img if torch.is_tensor(img) else img.pooler_output), txt


def examples(paths):
    texts = ["What is in the image ?", "Describe the scene in detail please .", "How many dogs are there ?"]
    return [data.Example("A", t, "x", image=p, qid=i) for i, (t, p) in enumerate(zip(texts, paths))], texts


def test_image_identity_is_clips_image_embedding(clip):
    """--identity image: f(x) = CLIPModel.get_image_features (visual_projection of the post-layernormed CLS), 16-d,
    from the --text-encoder folder; not a mean over the patches."""
    d, hf, paths = clip
    fed = fed_with(d, "image")
    exs, texts = examples(paths)
    img, _ = oracle(hf, d, paths, texts, fed.text_encoder[1])
    f = disco.identity_features(fed, exs)
    assert f.shape == (3, 16) and (f - img).abs().max() <= TOL


def test_text_and_image_identity_averages_the_two_cosines(clip):
    """--identity text+image: f(x) = [pooled text state (32-d), image embedding (16-d, zero-padded)]; DKO and SSA
    compare by (cos_text + cos_image) / 2, as the official ablation averages its two similarity matrices."""
    d, hf, paths = clip
    fed = fed_with(d, "text+image")
    exs, texts = examples(paths)
    img, txt = oracle(hf, d, paths, texts, fed.text_encoder[1])
    f = disco.identity_features(fed, exs)
    assert f.shape == (3, 64) and (f[:, :32] - txt).abs().max() <= TOL
    assert (f[:, 32:48] - img).abs().max() <= TOL and not f[:, 48:].any()
    unit = disco.identity_space(f, fed.cfg)
    cos = lambda x: F.cosine_similarity(x[:, None], x[None], dim=-1)
    want = (cos(txt) + cos(img)) / 2
    assert (unit @ unit.T - want).abs().max() <= TOL
    # SSA: α = softmax(((cos_text + cos_image) / 2) / 0.05) against keys that are raw features
    method = fed.method
    method.keys, method.sizes = f[:2].clone(), torch.tensor([3.0, 5.0], dtype=torch.float64)
    alpha = method.routing_weights(f)
    assert (alpha - torch.softmax(want[:, :2] / 0.05, dim=-1)).abs().max() <= TOL


def test_text_and_image_matching_uses_the_mean_cosine():
    """A token whose text matches key 0 (cos 1) and whose image does not (cos 0) has mean 0.5 < τ and opens a new
    subspace, although the cosine of the concatenation (0.98, the text dominating) would pass τ = 0.9."""
    cfg = tiny_cfg(method="disco", identity="text+image", tau=0.9, subspaces=2)
    keys = torch.tensor([[10.0, 0, 0.1, 0], [0, 0, 0, 0]])
    token = torch.tensor([5.0, 0, 0, 1])
    assert F.cosine_similarity(token, keys[0], dim=0) > 0.9
    ctx = Round(0, 0, [0], {}, log=lambda s: None)
    got, opened, _ = disco.match({0: (token, 4)}, keys, torch.tensor([7.0, 0], dtype=torch.float64), cfg, ctx)
    assert got == {0: 1} and opened == [1]
    got, opened, _ = disco.match({0: (token, 4)}, keys, torch.tensor([7.0, 0], dtype=torch.float64),
                                 tiny_cfg(method="disco", tau=0.9, subspaces=2), ctx)
    assert got == {0: 0} and opened == []   # --identity text: the plain cosine


def test_image_identity_needs_a_full_clip_model(tmp_path, clip, capsys):
    """A CLIPTextModel folder has no vision tower: --identity image is refused before any work, naming the file."""
    d, hf, _ = clip
    from transformers import CLIPTextModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text_only = save(CLIPTextModel(hf.config.text_config), tmp_path / "clip-text")
    make_llama_tokenizer(text_only)
    with pytest.raises(C.CheckpointError, match="clip_text_model.*needs? a full CLIPModel"):
        C.load_clip_text(text_only, image_tower=True)
    out = tmp_path / "out"
    assert fcit.main(["--setting", "cap-hom", "--methods", "disco", "--identity", "image", "--text-encoder", text_only,
                      "--stages", "1", "--rounds", "1", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{text_only}/config.json: model_type 'clip_text_model'" in err and "Traceback" not in err
    assert not out.exists()


def test_clip_identities_in_the_bf16_recipe(clip, tmp_path, monkeypatch):
    """The GPU recipe on a CPU with CLIP identities: bf16 frozen weights under autocast, --identity text+image from
    the --text-encoder folder; DISCO trains, routes and writes its adapter, and --eval-only reproduces its row. The
    CLIP towers stay float32 whatever --dtype is (their features are the matching's, not the VLM's)."""
    import model as M
    d, _, _ = clip
    seen, real = [], M.CLIPImageTower.forward
    monkeypatch.setattr(M.CLIPImageTower, "forward", lambda self, px: seen.append(
        (torch.is_autocast_enabled("cpu"), self.visual_projection.weight.dtype)) or real(self, px))
    out = tmp_path / "out"
    args = ["--setting", "cap-hom", "--methods", "disco", "--identity", "text+image", "--text-encoder", str(d),
            "--dtype", "bfloat16", "--stages", "1", "--rounds", "1", "--quiet"]
    assert fcit.main(args + ["--out", str(out)]) == 0
    row = json.load(open(out / "results.json"))["methods"]["disco"]["matrix"][0]
    assert any(v is not None for v in row)
    assert fcit.main(args + ["--eval-only", "--adapters", str(out / "adapters" / "disco" / "stage1"),
                             "--out", str(tmp_path / "e")]) == 0
    assert json.load(open(tmp_path / "e" / "results.json"))["methods"]["disco"]["matrix"][0] == row
    assert seen and set(seen) == {(False, torch.float32)}       # CLIP's image embedding, in float32, in both runs
