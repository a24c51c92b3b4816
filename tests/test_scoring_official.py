"""--scorer official: FCIT's eval scripts as released (Ghy0501/FCIT @ 9b10259, ETrain/Eval/LLaVA/CoIN/eval_*.py,
run by scripts/LLaVA/Eval_FCIT/eval_<dataset>.sh), on cases worked out by hand from the quoted lines. Each
divergence has a case the corrected scorer answers differently; each dataset has a case where the two agree."""
import math
from types import SimpleNamespace

import pytest

import config
import data
import scoring
from scoring import official_score, score

E = data.Example
EXACT = sorted(scoring.EXACT_MATCH)


def test_exact_match_keeps_the_answer_unstripped():
    """eval_iconqa.py / eval_aokvqa.py / eval_arxivqa.py: `if pred.upper() == ground_truth.upper():`, pred being
    model_*.py's `outputs.strip()` and ground_truth the test file's answer as it is."""
    for ds in EXACT:
        assert official_score(ds, "goldfish", "Goldfish") == score(ds, "goldfish", "Goldfish") == 1.0, ds
        assert official_score(ds, " B \n", "B") == score(ds, " B \n", "B") == 1.0, ds
        assert official_score(ds, "B.", "B") == score(ds, "B.", "B") == 0.0, ds      # no punctuation rule either
        assert official_score(ds, "B", "B ") == 0.0, ds                                # 'B' != 'B '
        assert score(ds, "B", "B ") == 1.0, ds


def test_substring_counts_an_empty_prediction_right():
    """eval_okvqa.py (FigureQA, DVQA): `if pred.upper() in ground_truth.upper():`; '' is in every string."""
    for ds in ("FigureQA", "DVQA"):
        for empty in ("", "   "):                                   # model_*.py strips the output to ''
            assert official_score(ds, empty, "Yes") == 1.0, ds
            assert score(ds, empty, "Yes") == 0.0, ds
        assert official_score(ds, "yes", "Yes") == score(ds, "yes", "Yes") == 1.0
        assert official_score(ds, "5", "15") == score(ds, "5", "15") == 1.0         # 'in', both
        assert official_score(ds, "15", "5") == score(ds, "15", "5") == 0.0
        assert official_score(ds, "No", "Yes ") == 0.0


def test_grounding_box_parse_drops_first_and_last_characters():
    """eval_grounding.py: `pred_bbox = pred_bbox.replace('[', '').replace(']', '')` then
    `bbox_pred = [float(x) for x in pred_bbox[1:-1].split(',')]`, `if len(bbox_pred) != 4: continue`, and a bare
    `except: continue` (both count as wrong: the denominator is len(results))."""
    assert scoring.official_box("[0.12,0.34,0.56,0.78]") == [0.12, 0.34, 0.56, 0.7]   # '.12,0.34,0.56,0.7'
    assert scoring.official_box("[0.2,0.2,0.6,0.6]") == [0.2, 0.2, 0.6, 0.0]         # '.2,0.2,0.6,0.'
    assert scoring.official_box("[1,0,1,1]") is None                                  # ',0,1,' -> float('')
    assert scoring.official_box("[0.1,0.2,0.3]") is None                              # 3 numbers
    assert scoring.official_box("0.1,0.2,0.5,0.61") == [0.1, 0.2, 0.5, 0.6]          # no brackets needed
    # y2 0.19 -> 0.1 = y1: an empty box, IoU 0; corrected reads the box as written (IoU 1)
    assert official_score("Grounding", "[0.1,0.1,0.5,0.19]", "[0.1,0.1,0.5,0.19]") == 0.0
    assert score("Grounding", "[0.1,0.1,0.5,0.19]", "[0.1,0.1,0.5,0.19]") == 1.0
    # one-decimal boxes lose y2 entirely: '0.6' -> '0.' = 0.0
    assert official_score("Grounding", "[0.2,0.2,0.6,0.6]", "[0.2,0.2,0.6,0.6]") == 0.0
    assert score("Grounding", "[0.2,0.2,0.6,0.6]", "[0.2,0.2,0.6,0.6]") == 1.0
    # text around the box: 'he box is 0.1' is no float; corrected finds the box in the text
    said = "The box is [0.1, 0.2, 0.5, 0.6]."
    assert official_score("Grounding", said, "[0.1,0.2,0.5,0.6]") == 0.0
    assert score("Grounding", said, "[0.1,0.2,0.5,0.6]") == 1.0
    # a box without brackets: official reads 0.1,0.2,0.5,0.6 (IoU 1); corrected needs "[...]"
    assert official_score("Grounding", "0.1,0.2,0.5,0.61", "[0.1,0.2,0.5,0.6]") == 1.0
    assert score("Grounding", "0.1,0.2,0.5,0.61", "[0.1,0.2,0.5,0.6]") == 0.0


def test_grounding_agreement_and_scaling():
    """eval_grounding.py: the ground truth `bbox_string.replace('[', '').replace(']', '')` is parsed without the
    slice; `max_wh = max(size)` scales both boxes; `right += iou > 0.5`."""
    g = "[0.1,0.2,0.5,0.6]"
    # y2 0.61 -> 0.6: official IoU 1; corrected IoU 0.4*0.4 / (0.4*0.41) = 0.976: both right
    assert official_score("Grounding", "[0.1,0.2,0.5,0.61]", g) == score("Grounding", "[0.1,0.2,0.5,0.61]", g) == 1.0
    # a wide miss and no box at all: both wrong
    for p in ("[0.6,0.7,0.9,0.95]", "I cannot tell", ""):
        assert official_score("Grounding", p, g) == score("Grounding", p, g) == 0.0
    assert official_score("Grounding", "[0.1,0.2,0.5,0.61]", [0.1, 0.2, 0.5, 0.6]) == 1.0   # a list answer
    with pytest.raises(ValueError, match="ground-truth box"):
        official_score("Grounding", "[0.1,0.2,0.5,0.61]", "[0.1,0.2,0.5]")
    # IoU exactly 0.5 in real numbers (0.3*0.6 / (0.18 + 0.36 - 0.18)): only rounding decides `> 0.5`. Unscaled
    # doubles give 0.5000000000000001 (right); the boxes x 640 (max of size [640, 480]) give 0.5 (wrong).
    p, g = "[0.1,0.1,0.4,0.70]", "[0.1,0.1,0.7,0.7]"                     # official reads y2 '0.7'
    assert official_score("Grounding", p, g, size=[640, 480]) == 0.0
    assert official_score("Grounding", p, g) == 1.0
    assert score("Grounding", p, g) == 1.0


def test_task_score_is_the_rounded_result_text():
    """eval_*.py write 'Accuracy: {:.2f}%'.format(100. * right / total) to Result.text, from which the paper's
    tables were assembled; the Grounding box comes from meta answer_bbox and the scale from meta size. FedIT:
    Shepherd releases no evaluation code, so dolly keeps ROUGE-L."""
    exs = [E("ArxivQA", "q", a) for a in "ABC"]
    assert scoring.evaluate_task("ArxivQA", ["A", "x", "y"], exs, scorer="official") == 33.33
    assert scoring.evaluate_task("ArxivQA", ["A", "x", "y"], exs) == pytest.approx(100 / 3, rel=1e-12)
    assert scoring.evaluate_task("ArxivQA", ["A", "B", "y"], exs, scorer="official") == 66.67
    assert scoring.evaluate_task("ArxivQA", ["A", "B", "C"], exs, scorer="official") == 100.0
    fig = [E("FigureQA", "q", a) for a in ("Yes", "No", "Yes")]
    assert scoring.evaluate_task("FigureQA", ["yes", "", "no"], fig, scorer="official") == 66.67
    assert scoring.evaluate_task("FigureQA", ["yes", "", "no"], fig) == pytest.approx(100 / 3, rel=1e-12)
    box = [E("Grounding", "q", "a box", meta={"answer_bbox": "[0.1,0.1,0.5,0.19]", "size": [100, 50]}),
           E("Grounding", "q", "a box", meta={"answer_bbox": "[0.1,0.2,0.5,0.6]", "size": [100, 50]})]
    assert scoring.evaluate_task("Grounding", ["[0.1,0.1,0.5,0.19]", "[0.1,0.2,0.5,0.61]"], box,
                                 scorer="official") == 50.0
    assert scoring.evaluate_task("Grounding", ["[0.1,0.1,0.5,0.19]", "[0.1,0.2,0.5,0.61]"], box) == 100.0
    # Shepherd releases no evaluation code: dolly is scored by ROUGE-L either way, unrounded
    dolly = [E("dolly/open_qa", "q", "The cat sat on the mat.")]
    for scorer in scoring.SCORERS:
        assert scoring.evaluate_task("dolly/open_qa", ["the cat sat"], dolly, scorer=scorer) == pytest.approx(
            100 * 2 * (3 / 3) * (3 / 6) / (3 / 3 + 3 / 6), rel=1e-12)
    with pytest.raises(ValueError, match="unknown scorer 'paper'"):
        scoring.evaluate_task("ArxivQA", ["A"], exs[:1], scorer="paper")


def test_caption_average_includes_meteor():
    """eval_caption.py: `metrics_to_print = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L",
    "CIDEr"]`, `results.append(score * 100.)`, 'Average: {:.2f}'.format(sum(results) / len(results))."""
    sc = {"Bleu_1": 0.8, "Bleu_2": 0.6, "Bleu_3": 0.4, "Bleu_4": 0.2, "METEOR": 0.3, "ROUGE_L": 0.5, "CIDEr": 1.4}
    assert scoring.official_caption_value(sc) == pytest.approx((80 + 60 + 40 + 20 + 30 + 50 + 140) / 7)   # 60
    assert scoring.caption_metric_value(sc) == pytest.approx((80 + 60 + 40 + 20 + 50 + 140) / 6)          # 65
    assert scoring.official_caption_value(sc, "CIDEr") == pytest.approx(140.0)


def test_caption_scores_by_pycocoevalcap(monkeypatch):
    """eval_caption.py runs COCOEvalCap (PTB tokenizer; Bleu(4), Meteor, Rouge, Cider; SPICE removed by the repo's
    eval.py). PTB keeps 'black-and-white' one token, the corrected stand-in splits it into three."""
    pytest.importorskip("pycocoevalcap")
    if scoring.official_caption_unavailable():
        pytest.skip(scoring.official_caption_unavailable())
    pred, refs = ["a black-and-white dog"], [["a black and white dog"]]
    sc = scoring.official_caption_scores(pred, refs)
    assert set(sc) == set(scoring.OFFICIAL_CAPTION_METRICS)
    # hypothesis [a, black-and-white, dog], reference [a, black, and, white, dog]: 2 of 3 unigrams match, brevity
    # penalty exp(1 - 5/3); ROUGE-L LCS 2: P 2/3, R 2/5, beta 1.2; CIDEr of a one-image corpus: idf 0
    assert sc["Bleu_1"] == pytest.approx(2 / 3 * math.exp(1 - 5 / 3), rel=1e-6)
    assert sc["ROUGE_L"] == pytest.approx(2.44 * (2 / 3) * (2 / 5) / (2 / 5 + 1.44 * 2 / 3), rel=1e-9)
    assert sc["CIDEr"] == 0.0 and 0.0 < sc["METEOR"] <= 1.0
    assert scoring.caption_scores(pred, refs)["Bleu_1"] == pytest.approx(1.0)
    calls = []
    monkeypatch.setattr(scoring, "official_caption_scores", lambda p, r: calls.append((p, r)) or sc)
    ex = [E("Flickr30k", "q", refs[0][0], meta={"captions": refs[0]})]
    got = scoring.evaluate_task("Flickr30k", [" a black-and-white dog\n"], ex, scorer="official")
    assert calls == [(pred, refs)]
    assert got == float(f"{sum(sc[k] * 100. for k in scoring.OFFICIAL_CAPTION_METRICS) / 7:.2f}")


def test_official_captions_need_pycocoevalcap_and_java(monkeypatch):
    monkeypatch.setattr(scoring, "importlib", SimpleNamespace(util=SimpleNamespace(find_spec=lambda name: None)))
    assert "pip install pycocoevalcap" in scoring.official_caption_unavailable()
    with pytest.raises(ValueError, match="pycocoevalcap is not installed"):
        scoring.evaluate_task("Flickr30k", ["a dog"], [E("Flickr30k", "q", "a dog")], scorer="official")
    with pytest.raises(config.UsageError, match="--scorer official .* pycocoevalcap is not installed"):
        config.resolve({"scorer": "official"}, embedded=True)
    assert config.resolve({"scorer": "official", "setting": "fedit"}, embedded=True).scorer == "official"
    assert config.resolve({}, embedded=True).scorer == "corrected"
    with pytest.raises(config.UsageError, match="--scorer 'paper'"):
        config.resolve({"scorer": "paper"}, embedded=True)


def test_bench_passes_the_scorer(monkeypatch):
    """Benchmark.score_task scores with cfg.scorer: an empty FigureQA answer is right only under official."""
    import fcit
    monkeypatch.setattr(config, "official_caption_unavailable", lambda: None)
    bench = object.__new__(fcit.Benchmark)
    bench.tasks, bench.test_datasets = ["FigureQA"], {"FigureQA": ["FigureQA"]}
    bench.test = {"FigureQA": [E("FigureQA", "q", "Yes"), E("FigureQA", "q", "No")]}
    for scorer, want in (("official", 100.0), ("corrected", 0.0)):
        bench.cfg = config.resolve({"scorer": scorer}, embedded=True)
        assert bench.score_task(0, lambda exs: ["", ""]) == want
