"""Fault injection on the data side (issue 26): a read-only data root, --dry-run writing nothing into it, bad record
values refused with file, record and id, 16-bit images scaled, dolly's categories, empty and non-UTF-8 files."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import fcit
import files
import imaging
import mini

FLAGS = ["--clients", "3", "--clients-per-round", "3", "--methods", "finetune", "--quiet"]


@pytest.fixture(autouse=True)
def small(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(fcit, "CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def release(tmp_path):
    return mini.make_fcit_mini(str(tmp_path / "release"), seed=0, n_train=6, n_test=1, image_size=16,
                               datasets=data.TASK_ORDER)


def listing(root):
    """Every path under root with its size and mtime: what a run may not change."""
    return sorted((os.path.relpath(os.path.join(d, f), root), os.stat(os.path.join(d, f)).st_size,
                   os.stat(os.path.join(d, f)).st_mtime_ns) for d, _, fs in os.walk(root) for f in fs)


def read_only(root, monkeypatch):
    """chmod root read-only; where that does not bind (running as root), the writability probe says so too."""
    for d, _, _ in os.walk(root):
        os.chmod(d, 0o555)
    probe = os.path.join(root, ".probe")
    try:
        open(probe, "w").close()
        os.remove(probe)
        monkeypatch.setattr(data, "folder_problem", lambda p: "is not writable (read-only)"
                            if os.path.realpath(p).startswith(os.path.realpath(root)) else files.folder_problem(p),
                            raising=False)
    except OSError:
        pass


def writable(root):
    for d, _, _ in os.walk(root):
        os.chmod(d, 0o755)


def bench(*argv, dry_run=False):
    return fcit.Benchmark(fcit.resolve_config(fcit.build_parser().parse_args(list(argv))), log=lambda *a: None,
                          dry_run=dry_run)


# ---------------------------------------------------------------- a read-only data root (26.4)

def test_partition_home_is_the_root_when_writable_else_the_cache(release, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    assert data.partition_home(release, "task-hom", 1.0, cache) == release
    monkeypatch.setattr(data, "folder_problem", lambda p: "is not writable")
    home = data.partition_home(release, "task-hom", 1.0, cache)
    assert os.path.dirname(home) == cache and os.path.basename(home).startswith("release-")
    assert home == data.cache_home(release, cache) != data.cache_home(str(tmp_path / "other" / "release"), cache)
    with pytest.raises(data.FCITDataError, match="is not writable, and no cache folder"):
        data.partition_home(release, "task-hom", 1.0)


def test_read_only_root_partitions_go_to_the_cache_and_are_found_again(release, monkeypatch):
    before = listing(release)
    read_only(release, monkeypatch)
    try:
        b = bench("--setting", "task-hom", "--data-root", release, *FLAGS)
        assert listing(release) == before
        man = os.path.join(data.partition_dir(data.cache_home(release, os.path.join(fcit.CACHE_DIR, "partitions")),
                                              "task-hom", 1.0), "manifest.json")
        assert data.read_json(man)["n_clients"] == 3
        monkeypatch.setattr(data, "partition_tasks", lambda *a: pytest.fail("partitions made again"))
        again = bench("--setting", "task-hom", "--data-root", release, *FLAGS)
        assert [[[e.qid for e in c] for c in t] for t in again.parts] == [[[e.qid for e in c] for c in t]
                                                                          for t in b.parts]
    finally:
        writable(release)


def test_dry_run_writes_nothing_into_the_data_root(release, tmp_path, capsys):
    before = listing(release)
    assert fcit.main(["--setting", "task-hom", "--data-root", release, "--dry-run", "--out", str(tmp_path / "o")]
                     + FLAGS) == 0
    assert "stage 8: trains super-CLEVR" in capsys.readouterr().out
    planned = bench("--setting", "task-hom", "--data-root", release, *FLAGS, dry_run=True).parts   # in memory
    assert listing(release) == before
    made = bench("--setting", "task-hom", "--data-root", release, *FLAGS).parts      # the real run writes them
    assert os.path.isdir(data.partition_dir(release, "task-hom", 1.0))
    assert [[[e.qid for e in c] for c in t] for t in planned] == [[[e.qid for e in c] for c in t] for t in made]


# ---------------------------------------------------------------- bad record values (26.5)

def llava(answer=..., instruction="<image>\nWhat is it?", rid="r5"):
    gpt = {"from": "gpt"} if answer is ... else {"from": "gpt", "value": answer}
    return {"id": rid, "conversations": [{"from": "human", "value": instruction}, gpt]}


@pytest.mark.parametrize("answer,why", [(..., "answer"), (None, "answer"), (["a"], "answer"), (3, "answer"),
                                        ("", "empty answer"), ("  ", "empty answer")])
def test_bad_train_answer_is_refused(tmp_path, answer, why):
    p = tmp_path / "train.json"
    p.write_text(json.dumps([llava("ok", rid="r0"), llava(answer)]))
    with pytest.raises(data.FCITDataError, match=rf"train\.json: record 1 \(id='r5'\): .*{why}"):
        data.load_examples(p, check_images=False)


@pytest.mark.parametrize("instruction", [None, 7, ["q"]])
def test_bad_train_instruction_is_refused(tmp_path, instruction):
    p = tmp_path / "train.json"
    p.write_text(json.dumps([llava("ok", instruction)]))
    with pytest.raises(data.FCITDataError, match=r"train\.json: record 0 \(id='r5'\): conversations\[0\] \(the "
                                                 r"instruction\) must be"):
        data.load_examples(p, check_images=False)


@pytest.mark.parametrize("field,value,dataset", [("answer", ..., "IconQA"), ("answer", None, "IconQA"),
                                                 ("answer", ["A"], "IconQA"), ("answer", "", "IconQA"),
                                                 ("answer", None, "Grounding"), ("text", None, "IconQA"),
                                                 ("text", ["q"], "IconQA")])
def test_bad_test_values_are_refused(tmp_path, field, value, dataset):
    rec = {"question_id": "q9", "text": "What is it?", "answer": "B"}
    if value is ...:
        del rec[field]
    else:
        rec[field] = value
    p = tmp_path / "test.json"
    p.write_text(json.dumps([{"question_id": "q0", "text": "t", "answer": "A"}, rec]))
    with pytest.raises(data.FCITDataError, match=rf"test\.json: record 1 \(question_id='q9'\): .*'?{field}'?"):
        data.load_examples(p, dataset=dataset, kind="test", check_images=False)


def test_grounding_and_flickr_fall_back_as_the_release_does(tmp_path):
    p = tmp_path / "test.json"
    p.write_text(json.dumps([{"question_id": 0, "text": "box?", "answer_bbox": "[0.1,0.2,0.3,0.4]"}]))
    assert data.load_examples(p, dataset="Grounding", kind="test", check_images=False)[0].answer == "[0.1,0.2,0.3,0.4]"
    root = tmp_path / "r"
    os.makedirs(root / "instructions" / "Flickr30k-cap")
    (root / "instructions" / "Flickr30k-cap" / "val_brief.json").write_text(
        json.dumps([{"question_id": 0, "text": "Describe."}]))
    with pytest.raises(data.FCITDataError, match=r"val_coco_type\.json: not found, and test records \[0\] have no "
                                                 r"'answer'"):
        data.load_fcit(root, ["Flickr30k"], check_images=False)
    (root / "instructions" / "Flickr30k-cap" / "val_coco_type.json").write_text(
        json.dumps({"annotations": [{"image_id": 1, "caption": "A dog runs."}]}))
    assert data.load_fcit(root, ["Flickr30k"], check_images=False)["Flickr30k"][0].answer == "A dog runs."


def dolly(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


REC = {"instruction": "Name a colour.", "context": "", "response": "Red.", "category": "open_qa"}


@pytest.mark.parametrize("field,value", [("instruction", ...), ("instruction", None), ("instruction", 3),
                                         ("response", ...), ("response", None), ("response", ["Red."]),
                                         ("response", ""), ("context", ["x"])])
def test_bad_dolly_values_are_refused(tmp_path, field, value):
    bad = {k: v for k, v in REC.items() if k != field or value is not ...}
    if value is not ...:
        bad[field] = value
    with pytest.raises(data.FCITDataError, match=rf"d\.jsonl: line 2: '{field}' must be"):
        data.load_dolly(dolly(tmp_path / "d.jsonl", [REC, bad]))


# ---------------------------------------------------------------- images (26.5, 26.7)

def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    v = np.array([[0, 257, 65535, 1000], [40000, 128, 32896, 65280]], dtype=np.uint16)
    want = np.array([[0, 1, 255, 4], [156, 0, 128, 254]], dtype=np.uint8)    # round(v / 257), by hand
    p = str(tmp_path / "deep.png")
    Image.fromarray(v).save(p)
    assert Image.open(p).mode.startswith("I")
    rgb = data.load_image(p)
    assert rgb.mode == "RGB" and all((np.asarray(rgb)[..., c] == want).all() for c in range(3))
    proc = imaging.ImageProcessor.clip(4)
    assert torch.equal(proc([Image.open(p)]), proc([Image.fromarray(want).convert("RGB")]))


def test_a_non_image_png_names_its_record(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "fake.png").write_text("not an image")
    p = tmp_path / "train.json"
    p.write_text(json.dumps([dict(llava("ok", rid="r0"), image="fake.png")]))
    ex = data.load_examples(p, image_root=tmp_path / "images")[0]
    tok = checkpoint.load_tokenizer(fcit.TINY_MODEL_DIR)
    col = data.Collator(tok, imaging.ImageProcessor.clip(8), "vicuna_v1", image_seq_len=2, image_token_id=5)
    with pytest.raises(data.FCITDataError, match=r"train\.json: record 0 \(id='r0'\): image .*fake\.png: corrupt or "
                                                 r"unreadable image"):
        col([ex])


# ---------------------------------------------------------------- dolly files (26.5, 26.7)

def test_unknown_dolly_category_is_an_error_unless_accepted(tmp_path, capsys):
    recs = [dict(REC, instruction=f"q{i}", category=c) for c in ("open_qa", "poetry") for i in range(12)]
    path = dolly(tmp_path / "d.jsonl", recs)
    with pytest.raises(data.FCITDataError, match=r"d\.jsonl: line 13: unknown category 'poetry'; dolly's are "
                                                 r"brainstorming, classification, .*summarization"):
        data.load_dolly(path)
    assert fcit.main(["--setting", "fedit", "--data-root", path, "--dry-run", "--out", str(tmp_path / "o")]) == 2
    assert "unknown category 'poetry'" in capsys.readouterr().err
    b = bench("--setting", "fedit", "--data-root", path, "--clients", "2", "--dolly-extra-categories")
    assert b.tasks == ["open_qa", "poetry"]


def test_empty_and_non_utf8_dolly_files_are_named(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    for text in ("", "\n  \n"):
        empty.write_text(text)
        with pytest.raises(data.FCITDataError, match=r"empty\.jsonl: no records"):
            data.load_dolly(empty)
    assert fcit.main(["--setting", "fedit", "--data-root", str(empty), "--dry-run", "--out", str(tmp_path / "o")]) == 2
    assert "empty.jsonl: no records" in capsys.readouterr().err
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b"".join(json.dumps(dict(REC, instruction=f"q{i}")).encode() + b"\n" for i in range(2))
                      + json.dumps(dict(REC, instruction="caf\u00e9")).encode().replace(b"\\u00e9", b"\xe9") + b"\n")
    with pytest.raises(data.FCITDataError, match=r"latin\.jsonl: line 3: not UTF-8 \(byte 0xe9"):
        data.load_dolly(latin)
