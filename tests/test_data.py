"""Tests for data.py and mini.py: settings tables, partitioners, scorers, metrics, FCIT-mini, FedIT-mini, loaders,
bad-input errors and collation. Reference values for BLEU / CIDEr-D / ROUGE-L(coco) were computed with
pycocoevalcap 1.2 (Bleu(4), Cider(), Rouge()) on the corpus below; others are computed by hand."""
import json
import logging
import math
import os
import re
import sys

import numpy as np
import pytest

import data
import imaging
import mini as synth
import scoring

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import corpus  # noqa: E402

# ---------------------------------------------------------------- settings tables

def test_task_order_and_groups():
    # the official eval scripts' order (Eval_FCIT_task_hom.sh, Eval_FCIT_cap_hom.sh), written out literally
    task_order = ["ImageNet-R", "ArxivQA", "IconQA", "CLEVR-Math", "OCR-VQA", "Flickr30k", "FigureQA", "super-CLEVR"]
    cap = [("General", {"AOKVQA", "IconQA", "Grounding", "ImageNet-R"}), ("Other", {"Flickr30k", "OCR-VQA"}),
           ("Math", {"CLEVR-Math", "super-CLEVR", "TabMWP"}), ("Chart", {"ArxivQA", "FigureQA", "DVQA"})]
    for setting in ("task-hom", "task-het"):
        assert data.task_names(setting) == task_order
        assert [data.task_datasets(setting, k) for k in range(8)] == [[d] for d in task_order]
    for setting in ("cap-hom", "cap-het"):
        assert data.task_names(setting) == [g for g, _ in cap]
        assert [set(data.task_datasets(setting, k)) for k in range(4)] == [ds for _, ds in cap]
    assert sorted(data.FCIT_DATASETS) == sorted(set().union(*(ds for _, ds in cap)))


def test_hom_het_assignment_matches_official_tables():
    official_seq = {1: ["ArxivQA", "IconQA", "OCR-VQA", "Flickr30k", "FigureQA"],
                    2: ["CLEVR-Math", "OCR-VQA", "Flickr30k", "super-CLEVR", "super-CLEVR"],
                    3: ["ImageNet-R", "IconQA", "CLEVR-Math", "OCR-VQA", "Flickr30k"],
                    4: ["ImageNet-R", "ImageNet-R", "ArxivQA", "CLEVR-Math", "super-CLEVR"],
                    5: ["ArxivQA", "IconQA", "OCR-VQA", "OCR-VQA", "Flickr30k"],
                    6: ["ImageNet-R", "CLEVR-Math", "Flickr30k", "super-CLEVR", "super-CLEVR"],
                    7: ["IconQA", "IconQA", "Flickr30k", "super-CLEVR", "super-CLEVR"],
                    8: ["Flickr30k", "Flickr30k", "Flickr30k", "FigureQA", "FigureQA"]}
    for st, names in official_seq.items():
        got = [data.TASK_ORDER[data.stage_task_for("task-het", st - 1, p)] for p in range(5)]
        assert got == names
    official_cap = [[0, 1, 1, 3, 3], [0, 2, 2, 2, 3], [1, 2, 2, 3, 3], [0, 0, 0, 1, 1]]
    for st in range(4):
        assert [data.stage_task_for("cap-dyn", st, p) for p in range(5)] == official_cap[st]
    for st in range(8):
        assert {data.stage_task_for("seq", st, p) for p in range(10)} == {st}
        assert data.tasks_of_stage("task-hom", st) == [st]
        assert data.seen_tasks("task-hom", st) == list(range(st + 1))
    assert data.seen_tasks("task-het", 0) == [1, 2, 4, 5, 6]
    assert data.seen_tasks("task-het", 1) == [1, 2, 3, 4, 5, 6, 7]
    assert data.seen_tasks("task-het", 2) == list(range(8))
    assert data.seen_tasks("cap-het", 0) == [0, 1, 3]
    assert data.num_stages("cap-hom") == 4 and data.num_stages("task-het") == 8
    assert data.task_datasets("cap-hom", 1) == ["Flickr30k", "OCR-VQA"]
    assert data.task_datasets("task-het", 5) == ["Flickr30k"]
    with pytest.raises(ValueError):
        data.stage_task_for("task-het", 0, 5)
    with pytest.raises(ValueError):
        data.stage_task_for("bogus", 0, 0)


# ---------------------------------------------------------------- partitioners

def _check_partition(parts, n, n_clients, min_size=1):
    flat = sorted(i for p in parts for i in p)
    assert len(parts) == n_clients and flat == list(range(n))
    assert min(len(p) for p in parts) >= min_size


def test_dirichlet_partition_basic_and_reproducible():
    for n, k, beta, m in [(1000, 50, 0.5, 1), (1000, 50, 5.0, 1), (300, 10, 0.1, 5), (600, 50, 0.5, 10),
                          (50, 50, 1.0, 1)]:
        parts = data.dirichlet_partition(n, k, beta, seed=3, min_size=m)
        _check_partition(parts, n, k, m)
        assert parts == data.dirichlet_partition(n, k, beta, seed=3, min_size=m)
    assert data.dirichlet_partition(1000, 50, 1.0, 0) != data.dirichlet_partition(1000, 50, 1.0, 1)
    with pytest.raises(ValueError):
        data.dirichlet_partition(40, 50, 1.0, 0)
    with pytest.raises(ValueError):
        data.dirichlet_partition(100, 5, 0.0, 0)


def test_dirichlet_partition_beta_controls_spread():
    def cv(beta):
        out = []
        for s in range(20):
            sizes = np.array([len(p) for p in data.dirichlet_partition(5000, 50, beta, seed=s)])
            out.append(sizes.std() / sizes.mean())
        return np.array(out)
    c05, c1, c5 = cv(0.5), cv(1.0), cv(5.0)
    # E[cv] ~ sqrt((K-1)/(K*beta+1)) / ... : 0.5 -> ~1.35, 1.0 -> ~0.98, 5.0 -> ~0.44
    assert c05.mean() > c1.mean() > c5.mean()
    assert (c05 > c5).all()                                    # every seed
    assert abs(c5.mean() - math.sqrt(49 / 251)) < 0.08        # Dirichlet theory: std/mean = sqrt((K-1)/(K*b+1))
    assert abs(c1.mean() - math.sqrt(49 / 51)) < 0.15


def test_label_partition_and_iid():
    labels = [i % 8 for i in range(1600)]
    for beta in (0.1, 10.0):
        parts = data.dirichlet_label_partition(labels, 10, beta, seed=0, min_size=5)
        _check_partition(parts, 1600, 10, 5)
        assert parts == data.dirichlet_label_partition(labels, 10, beta, seed=0, min_size=5)

    def n_labels(beta):   # distinct labels holding >= 5% of a client's data, averaged
        r = []
        for s in range(5):
            for p in data.dirichlet_label_partition(labels, 10, beta, seed=s):
                c = np.bincount([labels[i] for i in p], minlength=8)
                r.append((c >= 0.05 * len(p)).sum())
        return np.mean(r)
    assert n_labels(0.1) < n_labels(100.0) - 2
    parts = data.iid_partition(103, 10, seed=1)
    _check_partition(parts, 103, 10)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shepherd_partition_categories():
    cats = [c for c in range(8) for _ in range(100)]           # dolly_split's train rows come sorted by category
    parts = data.shepherd_partition(len(cats), 4, seed=42)     # 8 categories x 100, 4 clients -> 8 pure shards
    _check_partition(parts, 800, 4)
    assert all(len({cats[i] for i in p}) == 2 for p in parts)
    # dolly-15k v1 category sizes minus 10 held out each, 10 clients, 2 shards each (Shepherd's README setup)
    sizes = {"open_qa": 3601, "general_qa": 2181, "classification": 2126, "closed_qa": 1813, "brainstorming": 1758,
             "information_extraction": 1502, "summarization": 1253, "creative_writing": 701}
    cats = sorted(c for c, n in sizes.items() for _ in range(n))
    parts = data.shepherd_partition(len(cats), 10, seed=42)
    _check_partition(parts, len(cats), 10)
    lens = [len(p) for p in parts]
    assert max(lens) - min(lens) <= 2                          # near-equal sizes
    ncat = [len({cats[i] for i in p}) for p in parts]
    assert min(ncat) >= 1 and max(ncat) <= 4 and np.mean(ncat) < 3.5   # pathological category skew
    assert parts == data.shepherd_partition(len(cats), 10, seed=42)


def _shepherd_oracle(path, num_clients):
    """Shepherd's client_data_allocation.py (JayZhang42/FederatedGPT-Shepherd, diff_quantity=0) run verbatim with
    pandas, up to its file output: (test rows, train rows, each client's rows)."""
    import random
    import warnings
    pd = pytest.importorskip("pandas")
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        np.random.seed(42)
        random.seed(42)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            df = pd.read_json(path, orient='records')
            sorted_df = df.sort_values(by=['category'])
            grouped = sorted_df.groupby('category')
            sampled_df = grouped.apply(lambda x: x.sample(n=10))
        sampled_df = sampled_df.reset_index(level=0, drop=True)
        remaining_df = sorted_df.drop(index=sampled_df.index)
        sampled_df = sampled_df.reset_index().drop('index', axis=1)
        remaining_df = remaining_df.reset_index().drop('index', axis=1)
        num_shards_per_clients = 2
        remaining_df_index = remaining_df.index.values
        shards = np.array_split(remaining_df_index, int(num_shards_per_clients * num_clients))
        random.shuffle(shards)
        shards = [shards[i:i + num_shards_per_clients] for i in range(0, len(shards), num_shards_per_clients)]
        idx_partition = [np.concatenate(shards[n]).tolist() for n in range(num_clients)]
        rows = lambda d: [r["instruction"] for r in d.to_dict(orient="records")]
        return rows(sampled_df), rows(remaining_df), [rows(remaining_df.loc[idx]) for idx in idx_partition]
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def test_fedit_split_is_shepherds_row_for_row(tmp_path):
    """The held-out rows, the train order and every client's rows equal Shepherd's pandas procedure on a dolly-like
    file (eight categories of uneven sizes, interleaved), for several client counts."""
    rng = np.random.default_rng(5)
    cats = [c for c, n in zip(data.DOLLY_CATEGORIES, (13, 57, 24, 80, 31, 11, 45, 19)) for _ in range(n)]
    rng.shuffle(cats)
    recs = [{"instruction": f"q{i}", "context": "", "response": f"a{i}", "category": c} for i, c in enumerate(cats)]
    path = tmp_path / "new-databricks-dolly-15k.json"
    path.write_text(json.dumps(recs))
    train, test = data.dolly_split(data.load_dolly(path))
    for n in (3, 10):
        want_test, want_train, want_clients = _shepherd_oracle(str(path), n)
        assert [r["instruction"] for r in test] == want_test
        assert [r["instruction"] for r in train] == want_train
        clients = data.shepherd_partition(len(train), n)
        assert [[train[i]["instruction"] for i in idx] for idx in clients] == want_clients
    stable = [r["instruction"] for r in sorted(recs, key=lambda r: r["category"]) if r["instruction"] not in want_test]
    assert stable != want_train                    # pandas' sort is unstable: a stable sort gives other shards


def test_manifest_hash():
    parts = data.dirichlet_partition(100, 5, 1.0, 0)
    m = data.partition_manifest(parts, "dirichlet", 0, 1.0)
    assert m["sizes"] == [len(p) for p in parts] and m["n_items"] == 100
    assert m["sha256"] == data.partition_hash(data.dirichlet_partition(100, 5, 1.0, 0))


# ---------------------------------------------------------------- scorers

def test_exact_and_substring():
    s = scoring.score
    assert s("ImageNet-R", "Goldfish", "goldfish") == 1.0
    assert s("ArxivQA", " B ", "B") == 1.0
    assert s("ArxivQA", "B.", "B") == 0.0              # official rule: no punctuation normalisation
    assert s("CLEVR-Math", "", "3") == 0.0
    assert s("FigureQA", "yes", "Yes") == 1.0
    assert s("FigureQA", "", "Yes") == 0.0             # official bug: '' in 'YES' is True -> fixed
    assert s("FigureQA", "   ", "No") == 0.0
    assert s("DVQA", "5", "15") == 1.0                 # substring rule kept (pred in gt)
    assert s("DVQA", "15", "5") == 0.0
    assert s("TabMWP", "12", "12") == 1.0
    with pytest.raises(ValueError, match="caption"):
        s("Flickr30k", "a dog", "a dog")
    with pytest.raises(ValueError):
        s("MNIST", "1", "1")


def test_grounding_box_parser_and_iou():
    assert scoring.parse_box("[0.12,0.34,0.56,0.78]") == (0.12, 0.34, 0.56, 0.78)  # official: .2,.34,.56,.7
    assert scoring.parse_box("The region is [0.1, 0.2, 0.5, 0.6].") == (0.1, 0.2, 0.5, 0.6)
    assert scoring.parse_box("[.1,.2,1,1e-0]") == (0.1, 0.2, 1.0, 1.0)
    for bad in ("", "no box here", "[0.1, 0.2, 0.3]", "[0.5,0.5,0.4,0.9]", "[a,b,c,d]"):
        assert scoring.parse_box(bad) is None
    g = "[0.0,0.0,1.0,1.0]"
    assert scoring.score("Grounding", "[0.0,0.0,1.0,0.6]", g) == 1.0        # IoU 0.6
    assert scoring.score("Grounding", "[0.0,0.0,1.0,0.5]", g) == 0.0        # IoU 0.5 is not > 0.5
    assert scoring.score("Grounding", "I cannot tell", g) == 0.0
    assert scoring.score("Grounding", "[0.2,0.2,0.6,0.6]", [0.2, 0.2, 0.6, 0.6]) == 1.0
    assert abs(scoring.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) - 1 / 7) < 1e-12


def test_rouge_l_fedit():
    assert abs(scoring.rouge_l("the cat sat", "The cat sat on the mat.") - 2 / 3) < 1e-12
    assert scoring.rouge_l("", "x") == 0.0
    assert scoring.rouge_l("Paris.", "paris") == 1.0
    assert scoring.score("dolly/open_qa", "The capital is Paris.", "The capital of France is Paris.") == pytest.approx(
        2 * (4 / 4) * (4 / 6) / (4 / 4 + 4 / 6))


GTS = [["a man is riding a horse", "a person rides a brown horse"],
       ["two dogs play in the snow", "dogs are playing in snow"],
       ["a red car parked on the street", "a car on a city street"]]
RES = ["a man riding a horse", "two dogs in the snow", "a blue car on the street"]


def test_caption_metrics_match_pycocoevalcap():
    sc = scoring.caption_scores(RES, GTS)
    # pycocoevalcap 1.2: Bleu(4).compute_score, Cider().compute_score, Rouge().compute_score on the same input
    assert sc["Bleu_1"] == pytest.approx(0.8806997462775461, abs=1e-12)
    assert sc["Bleu_2"] == pytest.approx(0.7568186254410687, abs=1e-12)
    assert sc["Bleu_3"] == pytest.approx(0.5444865517078873, abs=1e-12)
    assert sc["Bleu_4"] == pytest.approx(6.822287337960053e-05, rel=1e-9)
    assert sc["CIDEr"] == pytest.approx(2.871254283348988, abs=1e-12)
    assert sc["ROUGE_L"] == pytest.approx(0.8491875908823429, abs=1e-12)


def test_caption_metrics_hand_values():
    # Papineni et al. 2002: candidate "the the the the the the the" -> modified unigram precision 2/7
    b = scoring.bleu([["the"] * 7], [["the cat is on the mat".split(), "there is a cat on the mat".split()]])
    assert b[0] == pytest.approx(2 / 7, rel=1e-9)
    # brevity penalty: 3-word candidate, closest ref has 6 words -> exp(1 - 6/3)
    b = scoring.bleu([["the", "cat", "sat"]], [["the cat sat on a mat".split()]])
    assert b[0] == pytest.approx(math.exp(1 - 2), rel=1e-9)
    # CIDEr-D: perfect captions whose n-grams appear in no other image -> cos = 1 at every n -> 10
    assert scoring.cider_d([["a", "b", "c", "d"], ["e", "f", "g", "h"]],
                        [[["a", "b", "c", "d"]], [["e", "f", "g", "h"]]]) == pytest.approx(10.0)
    # ... n-grams present in every image's refs have idf 0 -> 0
    assert scoring.cider_d([["x", "y"], ["x", "y"]], [[["x", "y"]], [["x", "y"]]]) == 0.0
    # punctuation and case are removed by the tokenizer
    assert scoring.caption_tokenize("A Dog, running!") == ["a", "dog", "running"]


def test_evaluate_task():
    E = data.Example
    exs = [E("ArxivQA", "q", "A"), E("ArxivQA", "q", "B"), E("ArxivQA", "q", "C"), E("ArxivQA", "q", "D")]
    assert scoring.evaluate_task("ArxivQA", ["A", "b", "x", ""], exs) == 50.0
    g = [E("Grounding", "q", "[0,0,1,1]", meta={"answer_bbox": "[0.0,0.0,1.0,1.0]", "size": [10, 10]})]
    assert scoring.evaluate_task("Grounding", ["[0,0,1,0.9]"], g) == 100.0
    mini = [synth.mini_sample("Flickr30k", 0, "test", i) for i in range(40)]
    mex = [E("Flickr30k", q, a, meta={"captions": m["captions"]}) for _, q, a, m in mini]
    for metric in scoring.CAPTION_METRICS:                              # discriminative on FCIT-mini
        perfect = scoring.evaluate_task("Flickr30k", [a for _, _, a, _ in mini], mex, caption_metric=metric)
        const = scoring.evaluate_task("Flickr30k", [mini[0][2]] * 40, mex, caption_metric=metric)
        assert perfect > 1.5 * const, metric
    perfect = scoring.evaluate_task("Flickr30k", [a for _, _, a, _ in mini], mex, caption_metric="CIDEr_x10")
    assert 80 < perfect <= 100                                       # CIDEr-D x 10 stays within 0..100
    with pytest.raises(ValueError):
        scoring.evaluate_task("ArxivQA", ["A"], exs)


def test_caption_average_is_official_scale():
    E = data.Example
    caps = [E("Flickr30k", "q", GTS[i][0], meta={"captions": GTS[i]}) for i in range(3)]
    # pycocoevalcap 1.2 values of RES vs GTS (test_caption_metrics_match_pycocoevalcap)
    ref = {"Bleu_1": 0.8806997462775461, "Bleu_2": 0.7568186254410687, "Bleu_3": 0.5444865517078873,
           "Bleu_4": 6.822287337960053e-05, "ROUGE_L": 0.8491875908823429, "CIDEr": 2.871254283348988}
    avg = 100 * (ref["Bleu_1"] + ref["Bleu_2"] + ref["Bleu_3"] + ref["Bleu_4"] + ref["ROUGE_L"] + ref["CIDEr"]) / 6
    assert scoring.CAPTION_METRICS[0] == "average"
    assert scoring.evaluate_task("Flickr30k", RES, caps) == pytest.approx(avg, rel=1e-9)      # default
    for m in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert scoring.evaluate_task("Flickr30k", RES, caps, caption_metric=m) == pytest.approx(100 * ref[m], rel=1e-9)
    assert scoring.evaluate_task("Flickr30k", RES, caps, caption_metric="CIDEr_x10") == pytest.approx(28.71254283348988)

    # A corpus computed by hand. Image 1 is perfect; image 2 predicts "e f x" for the reference "e f g h".
    preds, refs = ["a b c d", "e f x"], [["a b c d"], ["e f g h"]]
    bp = math.exp(1 - 8 / 7)                                  # 7 predicted words, 8 reference words
    p = [6 / 7, 4 / 5, 2 / 3, 1 / 1]                          # clipped n-gram precisions (n = 1..4)
    bleu = [bp * math.prod(p[:n]) ** (1 / n) for n in (1, 2, 3, 4)]
    pr, rc = 2 / 3, 2 / 4                                     # LCS("e f x", "e f g h") = 2
    rouge = (1 + (2.44 * pr * rc) / (rc + 1.44 * pr)) / 2     # ROUGE_L beta = 1.2, image 1 scores 1
    # CIDEr-D: every reference n-gram has idf log(2); image 2's cosines are 2/(sqrt3 * 2) (unigrams),
    # 1/(sqrt2 * sqrt3) (bigrams), 0, 0, and its length penalty is exp(-(2 - 3)^2 / 72) (bigram counts)
    cider = (10 + 10 * (1 / math.sqrt(3) + 1 / math.sqrt(6)) / 4 * math.exp(-1 / 72)) / 2
    hand = {"Bleu_1": bleu[0], "Bleu_2": bleu[1], "Bleu_3": bleu[2], "Bleu_4": bleu[3], "ROUGE_L": rouge,
            "CIDEr": cider}
    caps = [E("Flickr30k", "q", r[0], meta={"captions": r}) for r in refs]
    got = {m: scoring.evaluate_task("Flickr30k", preds, caps, caption_metric=m) for m in scoring.CAPTION_METRICS}
    assert got["average"] == pytest.approx(100 * sum(hand.values()) / 6, rel=1e-9)
    for m, v in hand.items():
        assert got[m] == pytest.approx(100 * v, rel=1e-9), m
    assert got["CIDEr_x10"] == pytest.approx(10 * cider, rel=1e-9)
    assert len(set(round(v, 6) for v in got.values())) == len(got)       # every name selects its own value
    with pytest.raises(ValueError, match=r"unknown caption metric 'CIDEr_x100'.*average, CIDEr"):
        scoring.evaluate_task("Flickr30k", preds, caps, caption_metric="CIDEr_x100")
    with pytest.raises(ValueError, match="'bleu'"):
        scoring.evaluate_task("ArxivQA", ["A"], [E("ArxivQA", "q", "A")], caption_metric="bleu")


# ---------------------------------------------------------------- continual metrics

def test_continual_metrics_hom_and_het():
    m = [[80, None, None], [60, 70, None], [50, 65, 90]]
    r = scoring.continual_metrics(m)
    assert r["last"] == pytest.approx((50 + 65 + 90) / 3)
    assert r["avg"] == pytest.approx((80 + 65 + (50 + 65 + 90) / 3) / 3)
    assert r["bwt"] == pytest.approx(((50 - 80) + (65 - 70)) / 2)
    het = [[40, None, 60, None], [45, 50, 55, None], [30, 52, 50, 70]]   # task 1 appears at stage 1, task 3 at 2
    r = scoring.continual_metrics(het)
    assert r["last"] == pytest.approx(50.5)
    assert r["avg"] == pytest.approx((50 + 50 + 50.5) / 3)
    assert r["bwt"] == pytest.approx(((30 - 40) + (52 - 50) + (50 - 60)) / 3)
    one = scoring.continual_metrics([[70.0]])
    assert one["last"] == one["avg"] == 70.0 and math.isnan(one["bwt"])
    with pytest.raises(ValueError):
        scoring.continual_metrics([[1, 2], [3]])


# ---------------------------------------------------------------- FCIT-mini

@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    synth.make_fcit_mini(root, seed=0, n_train=30, n_test=6)
    return str(root)


def test_mini_layout_and_loading(mini):
    train = data.load_fcit(mini, split="train")
    test = data.load_fcit(mini, split="test")
    assert set(train) == set(data.FCIT_DATASETS)
    for ds in data.FCIT_DATASETS:
        folder, tf, vf = data.DATASET_FILES[ds]
        assert os.path.exists(os.path.join(mini, "instructions", folder, tf))
        assert len(train[ds]) == 30 and len(test[ds]) == 6
        for e in train[ds][:3] + test[ds][:3]:
            assert e.dataset == ds and os.path.isfile(e.image) and "<image>" not in e.instruction and e.answer
            assert data.load_image(e.image).size == (64, 64)
    assert all(len(e.meta["captions"]) == 2 for e in test["Flickr30k"])
    assert all("answer_bbox" in e.meta for e in test["Grounding"])


def test_mini_byte_identical(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, s in ((a, 5), (b, 5), (c, 6)):
        synth.make_fcit_mini(d, seed=s, n_train=6, n_test=2)

    def files(root):
        out = {}
        for dp, _, fs in os.walk(root):
            for f in fs:
                p = os.path.join(dp, f)
                out[os.path.relpath(p, root)] = open(p, "rb").read()
        return out
    fa, fb, fc = files(a), files(b), files(c)
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    assert any(fa[k] != fc[k] for k in fa if k.endswith(".png"))


def _mask(im, rgb):
    x = np.asarray(im).astype(int)
    return (np.abs(x - np.array(rgb)).sum(-1) == 0)


def _components(mask):
    """Number of 4-connected True regions (the structure scipy.ndimage.label uses by default)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        n += 1
        seen[y0, x0] = True
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for v, u in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    stack.append((v, u))
    return n


def test_components_flood_fill():
    m = np.zeros((6, 6), dtype=bool)
    m[0, 0] = m[0, 1] = True            # one region of two
    m[2, 2] = True                      # diagonal neighbour of nothing connected
    m[3, 3] = True                      # diagonal to (2, 2): separate under 4-connectivity
    m[5, 0:6] = True
    assert _components(m) == 4 and _components(np.zeros((3, 3), dtype=bool)) == 0


def test_mini_answers_derivable_by_construction():
    for i in range(40):
        im, ins, ans, meta = synth.mini_sample("IconQA", 1, "train", i)
        n = _components(_mask(im, synth.COLORS[meta["color"]]))
        assert n == meta["count"] == int(ans) and f"{synth.PLURAL[meta['shape']]}" in ins and ans in ins

        im, ins, ans, meta = synth.mini_sample("FigureQA", 1, "train", i)
        heights = {c: _mask(im, synth.FIG_COLORS[c]).any(1).sum() for c in meta["bars"]}
        order = sorted(heights, key=heights.get)
        assert order == sorted(meta["bars"], key=meta["bars"].get)      # pixel heights rank like the values
        words = ins.rstrip("?").split()
        if "maximum" in ins:
            assert (ans == "Yes") == (words[1] == order[-1])
        elif "minimum" in ins:
            assert (ans == "Yes") == (words[1] == order[0])
        else:
            a, b = words[1], words[-1]
            assert (ans == "Yes") == ((heights[a] > heights[b]) if "greater" in ins else (heights[a] < heights[b]))

        im, ins, ans, meta = synth.mini_sample("Grounding", 1, "train", i)
        box = scoring.parse_box(ans)
        col, shp = [(o["color"], o["shape"]) for o in meta["objects"] if o["box"] == list(box)][0]
        assert col in ins and shp in ins
        ys, xs = np.nonzero(_mask(im, synth.COLORS[col]))
        own = (xs >= box[0] * 64 - 1) & (xs <= box[2] * 64 + 1) & (ys >= box[1] * 64 - 1) & (ys <= box[3] * 64 + 1)
        assert own.sum() > 20                                            # the object is drawn inside its box
        assert xs[own].min() <= box[0] * 64 + 8 and xs[own].max() >= box[2] * 64 - 8

        im, ins, ans, meta = synth.mini_sample("DVQA", 1, "train", i)
        cols = _mask(im, (70, 110, 190)).any(0)
        runs = np.flatnonzero(np.diff(np.concatenate([[0], cols.astype(int), [0]])))
        hs = [_mask(im, (70, 110, 190))[:, s:e].any(1).sum() for s, e in zip(runs[::2], runs[1::2])]
        assert np.argsort(hs, kind="stable").tolist() == np.argsort(meta["values"], kind="stable").tolist() or \
            len(set(meta["values"])) < 3
        if "largest bar" in ins:
            assert ans == str(max(meta["values"]))

        im, ins, ans, meta = synth.mini_sample("CLEVR-Math", 1, "train", i)
        n_obj = _components(np.abs(np.asarray(im).astype(int) - 200).sum(-1) > 0)
        assert n_obj == len(meta["objects"])
        if ins.startswith("Subtract all") and meta["objects"]:
            what = ins.split(".")[0].split()[2]
            left = [o for o in meta["objects"] if o["color"] != what and synth.PLURAL[o["shape"]] != what]
            assert int(ans) == len(left)

        im, ins, ans, meta = synth.mini_sample("TabMWP", 1, "train", i)
        v = meta["values"]
        assert int(ans) in (sum(v), max(v)) or int(ans) in {a - b for a in v for b in v if a > b}


def test_mini_task_design():
    firsts, answers = {}, {}
    for ds in data.FCIT_DATASETS:
        s = [synth.mini_sample(ds, 0, "train", i) for i in range(150)]
        firsts[ds] = {ins.split("\n")[0].split()[0] for _, ins, _, _ in s}   # phrasing family (first word)
        answers[ds] = {a for _, _, a, _ in s}
        if ds not in ("Flickr30k", "Grounding"):
            assert all(len(a.split()) <= 3 for a in answers[ds]), ds
            assert len(answers[ds]) <= 30, (ds, len(answers[ds]))
    assert answers["ArxivQA"] <= set("ABCD") and answers["AOKVQA"] <= set("ABCD")
    assert answers["FigureQA"] == {"Yes", "No"} and answers["super-CLEVR"] >= {"yes", "no"}
    # instructions tell the tasks apart: every full instruction belongs to one task only
    full = {ds: {synth.mini_sample(ds, 0, "train", i)[1].split("\n")[0] for i in range(150)}
            for ds in data.FCIT_DATASETS}
    for a in full:
        for b in full:
            if a < b:
                assert not (full[a] & full[b]), (a, b)


def test_caption_and_vocab_corpus(tmp_path):
    pairs = corpus.caption_corpus(60, seed=0)
    assert len(pairs) == 60 and pairs[0][0].size == (64, 64)
    caps = [c for _, c in pairs]
    assert caps == [c for _, c in corpus.caption_corpus(60, seed=0)]
    assert not any("?" in c or "Answer" in c or "[" in c for c in caps)
    assert len(set(caps)) > 30
    v = corpus.vocab_corpus()
    joined = "\n".join(v)
    words = set(re.findall(r"[A-Za-z]+", joined))
    seen = set()
    for ds in data.FCIT_DATASETS:
        for i in range(150):
            _, ins, ans, meta = synth.mini_sample(ds, 9, "test", i)
            seen |= set(re.findall(r"[A-Za-z]+", " ".join([ins, ans] + meta.get("captions", []))))
    for r in data.load_dolly(synth.make_fedit_mini(tmp_path, seed=3, n_per_category=40)):
        seen |= set(re.findall(r"[A-Za-z]+", " ".join([r["instruction"], r["context"], r["response"]])))
    seen |= {w for s in corpus.pretraining_corpus(600, seed=4) for t in s[1:] for w in re.findall(r"[A-Za-z]+", t)}
    assert seen <= words, sorted(seen - words)                  # every word any generator can emit
    for ds in data.FCIT_DATASETS:
        for i in range(5):
            _, ins, ans, _ = synth.mini_sample(ds, 0, "train", i)
            assert all(w in joined for w in re.split(r"[\[\], ]+", ans) if w), (ds, ans)


def test_pretraining_corpus_never_uses_a_task_format(tmp_path):
    """The tiny model learns generic skills, not FCIT-mini's or FedIT-mini's task formats: no task's question stem,
    answer-format suffix, option layout or instruction appears in the pretraining corpus."""
    samples = corpus.pretraining_corpus(3000, seed=0)
    assert samples == corpus.pretraining_corpus(3000, seed=0)
    assert 0.15 < sum(img is None for img, *_ in samples) / len(samples) < 0.35   # text-only share
    ours = {ins.split("\n")[0] for _, ins, _, _ in samples}
    stems = set()
    for ds in data.FCIT_DATASETS:
        for i in range(300):
            stems.add(synth.mini_sample(ds, 0, "train", i)[1].split("\n")[0])
    dolly = {r["instruction"] for r in data.load_dolly(synth.make_fedit_mini(tmp_path, seed=0))}
    assert not ours & stems and not ours & dolly
    suffixes = list(synth.TASK_SUFFIX.values()) + [synth.SUFFIX_LETTER, "Choices:", "\nA. ", "Answer with"]
    dolly_forms = ["plus", "capital of", "Classify", "Extract", "Summarize", "examples of", "poem", "story",
                   "bigger", "ripe"]
    for _, ins, ans, ctx in samples:
        assert not any(s in ins for s in suffixes), ins
        assert not any(f in ins for f in dolly_forms), ins


# ---------------------------------------------------------------- partitions on disk

def test_partitions_generated_and_loaded(mini):
    parts = data.load_partitions(mini, "task-hom", 1.0, n_clients=5, seed=0)
    assert len(parts) == 8 and all(len(p) == 5 for p in parts)
    assert sum(len(c) for c in parts[0]) == 30 and all(e.dataset == "ImageNet-R" for c in parts[0] for e in c)
    man = json.load(open(os.path.join(data.partition_dir(mini, "seq", 1.0), "manifest.json")))
    assert man["beta"] == 1.0 and len(man["tasks"]) == 8 and man["tasks"][0]["n_items"] == 30
    het = data.load_client(mini, "task-het", 1.0, data.stage_task_for("task-het", 0, 0), 3)
    assert all(e.dataset == "ArxivQA" for e in het)
    again = data.load_partitions(mini, "task-hom", 1.0, n_clients=3, seed=2)           # other params: regenerated
    assert [len(p) for p in again] == [3] * 8 and sum(len(c) for c in again[0]) == 30
    assert (sorted(os.listdir(os.path.join(data.partition_dir(mini, "seq", 1.0), "Task1")))
            == [f"client_{i}.json" for i in range(3)])
    assert json.load(open(os.path.join(data.partition_dir(mini, "seq", 1.0), "manifest.json")))["n_clients"] == 3
    cap = data.load_partitions(mini, "cap-het", 0.5, n_clients=4, seed=1)
    assert len(cap) == 4 and sum(len(c) for c in cap[0]) == 120
    assert {e.dataset for c in cap[0] for e in c} == {"AOKVQA", "IconQA", "Grounding", "ImageNet-R"}
    assert os.path.exists(os.path.join(mini, "partitioned_data", "Capability-related", "cap", "0.5", "Task4",
                                       "client_3.json"))
    for k, task in enumerate(cap):                     # the order check passed and each folder holds its group
        assert {e.dataset for c in task for e in c} == set(data.task_datasets("cap-het", k))


def _release(root, setting, tasks, n_clients=2):
    """A release-shaped partition folder (no manifest): tasks[k] = image folders of Task{k+1}'s records."""
    d = data.partition_dir(root, setting, 1.0)
    for k, folders in enumerate(tasks):
        os.makedirs(os.path.join(d, f"Task{k + 1}"))
        for c in range(n_clients):
            recs = [{"id": f"{k}-{c}-{i}", "image": f"{f}/{i}.jpg",
                     "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
                    for i, f in enumerate(folders)]
            _write(os.path.join(d, f"Task{k + 1}", f"client_{c}.json"), recs)
    return d


def test_partition_order_checked(tmp_path, caplog):
    general, other = ["AOKVQA", "IconQA", "Grounding", "ImageNet-R"], ["Flickr30k-cap", "OCRVQA"]
    math_, chart = ["CLEVR-Math", "super-CLEVR", "TabMWP"], ["ArxivQA", "FigureQA", "DVQA"]
    _release(tmp_path / "ok", "cap", [general, other, math_, chart])
    ok = data.load_partitions(tmp_path / "ok", "cap-hom", 1.0, n_clients=2, check_images=False)
    assert [{e.dataset for c in t for e in c} for t in ok] == [
        {"AOKVQA", "IconQA", "Grounding", "ImageNet-R"}, {"Flickr30k", "OCR-VQA"},
        {"CLEVR-Math", "super-CLEVR", "TabMWP"}, {"ArxivQA", "FigureQA", "DVQA"}]
    # the release's order General, Chart, Math, Other (process_data.py's list): Task2 holds Chart
    d = _release(tmp_path / "swapped", "cap", [general, chart, math_, other])
    with pytest.raises(data.FCITDataError) as e:
        data.load_partitions(tmp_path / "swapped", "cap-het", 1.0, n_clients=2, check_images=False)
    msg = str(e.value)
    assert msg.startswith(os.path.join(d, "Task2") + ": holds Chart datasets {ArxivQA, DVQA, FigureQA} (6 records)")
    assert "expected Other {Flickr30k, OCR-VQA}" in msg and "stage order differs" in msg and "Chart is Task4" in msg
    unchecked = data.load_partitions(tmp_path / "swapped", "cap-het", 1.0, n_clients=2, check_images=False,
                                     check_order=False)
    assert {e.dataset for c in unchecked[1] for e in c} == {"ArxivQA", "FigureQA", "DVQA"}
    # one foreign dataset in an otherwise right folder: named, no stage claimed
    _release(tmp_path / "mixed", "cap", [general + ["DVQA"], other, math_, chart])
    with pytest.raises(data.FCITDataError, match=r"Task1: holds datasets \{.*DVQA.*\}.*expected General "
                                                 r"\{AOKVQA, Grounding, IconQA, ImageNet-R\}: "
                                                 r"\{DVQA\} not part of General"):
        data.load_partitions(tmp_path / "mixed", "cap-hom", 1.0, n_clients=2, check_images=False)
    # Task-related: a single dataset per folder; the "dataset" field wins over the image folder
    _release(tmp_path / "seq", "seq", [["ImageNet-R"], ["IconQA"]] + [["x"]] * 6)
    with pytest.raises(data.FCITDataError, match=r"Task2: holds datasets \{IconQA\} \(2 records\); expected ArxivQA: "
                                                 r"the release's stage order differs .*IconQA is Task3"):
        data.load_partitions(tmp_path / "seq", "task-hom", 1.0, n_clients=2, check_images=False)
    assert data.record_dataset({"dataset": "ArxivQA", "image": "IconQA/1.png"}) == "ArxivQA"
    assert data.record_dataset({"image": "OCRVQA/1.png"}) == "OCR-VQA"
    assert data.record_dataset({"image": "coco/1.png"}) is None and data.record_dataset("x") is None
    # undeterminable records are not failures; a folder with none determinable is logged
    _release(tmp_path / "unk", "cap", [general, other + ["misc"], ["coco", "vg"], chart])
    with caplog.at_level(logging.WARNING, logger="fcit.data"):
        parts = data.load_partitions(tmp_path / "unk", "cap-hom", 1.0, n_clients=2, check_images=False)
    assert len(parts) == 4 and caplog.text.count("could not be verified") == 1
    assert "Task3: no record names a known FCIT dataset" in caplog.text and "Math" in caplog.text


def test_atomic_write_json(tmp_path):
    p = tmp_path / "m.json"
    data.atomic_write_json(p, {"a": [1, 2]})
    data.atomic_write_json(p, {"b": 3}, indent=1)
    assert json.load(open(p)) == {"b": 3} and os.listdir(tmp_path) == ["m.json"]
    with pytest.raises(TypeError):
        data.atomic_write_json(p, {"c": object()})            # fails half-way: old file kept, no temp left
    assert json.load(open(p)) == {"b": 3} and os.listdir(tmp_path) == ["m.json"]
    mode = os.stat(p).st_mode & 0o777
    probe = tmp_path / "probe"
    probe.write_text("x")
    assert mode == os.stat(probe).st_mode & 0o777              # ordinary permissions (umask), not 0600


# ---------------------------------------------------------------- bad input

def _write(p, obj):
    with open(p, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


def test_bad_input_errors(tmp_path, mini, caplog):
    p = tmp_path / "bad.json"
    _write(p, '[{"image": "x.png", "conversations": [}]')
    with pytest.raises(data.FCITDataError, match=r"bad\.json: malformed JSON at line 1"):
        data.load_examples(p)
    img = os.path.relpath(data.load_fcit(mini, ["IconQA"], "train")["IconQA"][0].image, os.path.join(mini, "images"))
    good = {"image": img, "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    _write(p, [good, {"id": "r7", "image": img}])
    with pytest.raises(data.FCITDataError, match=r"bad\.json: record 1 \(id='r7'\): missing 'conversations'"):
        data.load_examples(p, image_root=os.path.join(mini, "images"))
    _write(p, [good, dict(good, image="nope/missing.png")])
    with pytest.raises(data.FCITDataError, match=r"record 1.*image not found: .*missing\.png"):
        data.load_examples(p, image_root=os.path.join(mini, "images"))
    with caplog.at_level(logging.WARNING, logger="fcit.data"):
        exs = data.load_examples(p, image_root=os.path.join(mini, "images"), skip_bad=True)
    assert len(exs) == 1 and "skipped 1 of 2 records" in caplog.text
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(data.FCITDataError, match=r"corrupt\.png: corrupt or unreadable image"):
        data.load_image(str(corrupt))
    # empty client file
    root = tmp_path / "rel"
    d = os.path.join(data.partition_dir(root, "seq", 1.0), "Task1")
    os.makedirs(d)
    _write(os.path.join(d, "client_0.json"), [])
    with pytest.raises(data.FCITDataError, match=r"client_0\.json: empty client file"):
        data.load_client(root, "seq", 1.0, 0, 0)
    with pytest.raises(data.FCITDataError, match=r"client_1\.json: file not found"):
        data.load_client(root, "seq", 1.0, 0, 1)
    with pytest.raises(data.FCITDataError, match="Task2: missing task folder"):
        data.load_partitions(root, "seq", 1.0, n_clients=1)
    with pytest.raises(data.FCITDataError,
                       match=r"instructions/DVQA/test\.json: not found \(expected the FCIT release"):
        data.load_fcit(tmp_path, ["DVQA"])
    # test record without question_id
    _write(p, [{"image": img, "text": "q", "answer": "a"}])
    with pytest.raises(data.FCITDataError, match=r"record 0: missing 'question_id'"):
        data.load_examples(p, kind="test", image_root=os.path.join(mini, "images"))


# ---------------------------------------------------------------- FedIT

def test_fedit_mini_and_dolly(tmp_path):
    path = synth.make_fedit_mini(tmp_path, seed=0, n_per_category=20)
    recs = data.load_dolly(path)
    assert len(recs) == 160 and sorted({r["category"] for r in recs}) == data.DOLLY_CATEGORIES
    again = synth.make_fedit_mini(tmp_path / "b", seed=0, n_per_category=20)
    assert open(path, "rb").read() == open(again, "rb").read()
    train, test = data.dolly_split(recs, 10, seed=42)
    assert len(test) == 80 and len(train) == 80
    assert all(sum(r["category"] == c for r in test) == 10 for c in data.DOLLY_CATEGORIES)
    assert not any(r in train for r in test)
    ex = data.dolly_example(next(r for r in recs if r["context"]))
    assert ex.dataset.startswith("dolly/") and ex.meta["context"] in ex.instruction
    assert data.alpaca_prompt("Say hi.").endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert "### Input:\nctx\n\n### Response:\nok" in data.alpaca_prompt("Do.", "ctx", "ok")
    exs = [data.dolly_example(r) for r in test]
    ev = scoring.evaluate_fedit([e.answer for e in exs[:-1]] + ["nothing"], exs)
    assert ev["exact_match"] == pytest.approx(100 * 79 / 80) and len(ev["per_category"]) == 8
    assert ev["per_category"]["open_qa"]["rouge_l"] == 100.0 and ev["rouge_l"] < 100.0
    parts = data.shepherd_partition(len(train), 4, seed=42)
    assert sorted(sum(parts, [])) == list(range(80))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(recs[0]) + "\n{oops\n")
    with pytest.raises(data.FCITDataError, match=r"bad\.jsonl: line 2: malformed JSON"):
        data.load_dolly(bad)
    bad.write_text(json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(data.FCITDataError, match=r"bad\.jsonl: line 1: 'response' must be a non-empty string"):
        data.load_dolly(bad)


# ---------------------------------------------------------------- collation

@pytest.fixture(scope="module")
def tiny_tok():
    prompts = pytest.importorskip("prompts")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus.vocab_corpus(n_per_task=10), tr)
    return prompts.Tokenizer(tok, bos_id=1, eos_id=2, pad_id=3, add_bos=True)


def test_collator(tiny_tok, mini):
    exs = data.load_fcit(mini, ["ArxivQA", "TabMWP"], "train")
    batch_ex = [exs["ArxivQA"][0], exs["TabMWP"][1], data.Example("x", "text only", "ok")]
    proc = imaging.ImageProcessor.clip(32)
    col = data.Collator(tiny_tok, proc, "vicuna_v1", image_seq_len=4, max_length=512)
    b = col(batch_ex)
    B, T = b["input_ids"].shape
    assert B == 3 and b["pixel_values"].shape == (2, 3, 32, 32)
    assert (b["input_ids"] == tiny_tok.image_token_id).sum(1).tolist() == [4, 4, 0]
    for r, e in enumerate(batch_ex):
        n = int(b["attention_mask"][r].sum())
        assert b["attention_mask"][r, :n].all() and not b["attention_mask"][r, n:].any()      # right padding
        assert (b["input_ids"][r, n:] == 3).all()
        sup = b["labels"][r][b["labels"][r] != -100].tolist()
        assert sup[-1] == 2 and tiny_tok.decode(sup[:-1]).strip() == e.answer                   # answer + </s> only
    ev = data.Collator(tiny_tok, proc, "vicuna_v1", image_seq_len=4, train=False)(batch_ex)
    assert (ev["labels"] == -100).all()
    m = ev["attention_mask"]
    assert m[:, -1].all() and not bool(m[m.sum(1).argmin(), 0])                              # left padding
    assert tiny_tok.decode(ev["input_ids"][0][m[0].bool()].tolist()).rstrip().endswith("ASSISTANT:")
    toi = data.Collator(tiny_tok, None, "alpaca", train_on_inputs=True)([data.Example("d", "Say hi.", "hi")])
    assert (toi["labels"] == toi["input_ids"]).all() and toi["pixel_values"] is None
    bad = data.Example("IconQA", "q", "a", str(mini) + "/images/nope.png")
    with pytest.raises(data.FCITDataError, match="nope.png"):
        col([bad])


def _shepherd_tokenize(tok, text, cutoff_len):
    """Shepherd's main.py tokenize(): the tokenizer adds BOS, truncates to cutoff_len, then EOS is appended
    only if the last token is not EOS and the result is shorter than cutoff_len; labels = input_ids."""
    ids = ([tok.bos_id] + tok.encode(text))[:cutoff_len]
    if ids[-1] != tok.eos_id and len(ids) < cutoff_len:
        ids.append(tok.eos_id)
    return ids


def test_fedit_alpaca_prompt_with_and_without_input(tiny_tok):
    with_ctx = {"instruction": "Where does Emma live?", "context": "Emma is 31 years old and lives in Paris.",
                "response": "Emma lives in Paris.", "category": "closed_qa"}
    no_ctx = {"instruction": "What is the capital of Peru?", "context": "", "response": "The capital of Peru is Lima.",
              "category": "open_qa"}
    header_input = ("Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response that appropriately completes the request.\n\n")
    header_plain = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n")
    assert data.alpaca_prompt(with_ctx["instruction"], with_ctx["context"]) == (
        header_input + "### Instruction:\nWhere does Emma live?\n\n### Input:\nEmma is 31 years old and lives in "
        "Paris.\n\n### Response:\n")
    assert data.alpaca_prompt(no_ctx["instruction"]) == (
        header_plain + "### Instruction:\nWhat is the capital of Peru?\n\n### Response:\n")
    for rec in (with_ctx, no_ctx):
        prompt = data.alpaca_prompt(rec["instruction"], rec["context"])
        ex = data.dolly_example(rec)
        b = data.Collator(tiny_tok, None, "alpaca", train_on_inputs=True, max_length=512)([ex])
        ids = b["input_ids"][0].tolist()
        assert ids == [1] + tiny_tok.encode(prompt + rec["response"]) + [2]               # BOS ... EOS
        assert tiny_tok.decode(ids) == prompt + rec["response"]
        assert b["labels"][0].tolist() == ids                                               # prompt supervised too
        gen = data.Collator(tiny_tok, None, "alpaca", train=False, max_length=512)([ex])
        assert gen["input_ids"][0].tolist() == [1] + tiny_tok.encode(prompt)
    # Shepherd's cutoff: truncate BOS + prompt + response to cutoff_len, EOS only when shorter than cutoff_len
    ex = data.dolly_example(with_ctx)
    text = data.alpaca_prompt(with_ctx["instruction"], with_ctx["context"], with_ctx["response"])
    n = 1 + len(tiny_tok.encode(text))
    for cutoff in (n - 7, n - 1, n, n + 1, n + 2, 512):
        b = data.Collator(tiny_tok, None, "alpaca", train_on_inputs=True, max_length=cutoff)([ex])
        ref = _shepherd_tokenize(tiny_tok, text, cutoff)
        assert b["input_ids"][0].tolist() == ref and b["labels"][0].tolist() == ref, cutoff
        assert (ref[-1] == 2) == (cutoff > n)


def test_regenerated_fcit_mini_drops_stale_partitions(tmp_path):
    """Partitions copy the records, so regenerating FCIT-mini (other parameters) must not keep old client files."""
    root = str(tmp_path / "mini")
    synth.make_fcit_mini(root, seed=0, n_train=4, n_test=1, datasets=data.TASK_ORDER)
    data.make_partitions(root, "task-hom", 1.0, n_clients=2, seed=0)
    assert os.path.isdir(os.path.join(root, "partitioned_data"))
    synth.make_fcit_mini(root, seed=1, n_train=4, n_test=1, datasets=data.TASK_ORDER)
    assert not os.path.exists(os.path.join(root, "partitioned_data"))
