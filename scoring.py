"""Scoring: the official FCIT metrics per dataset (exact match, substring, Grounding IoU, captions by
pycocoevalcap's BLEU, ROUGE-L and CIDEr-D) with the official bugs fixed, or (--scorer official) FCIT's eval
scripts as released, bugs included; FedIT's ROUGE-L; and the continual metrics Last, Avg and BWT."""
from __future__ import annotations

import importlib.util
import math
import re
import shutil
from collections import Counter, defaultdict

import numpy as np

# ----------------------------------------------------------------------------------------------------
# Scorers: the official rules (ETrain/Eval/LLaVA/CoIN/eval_*.py) with the official bugs fixed.

EXACT_MATCH = {"ImageNet-R", "ArxivQA", "IconQA", "CLEVR-Math", "OCR-VQA", "super-CLEVR", "TabMWP", "AOKVQA"}
SUBSTRING = {"FigureQA", "DVQA"}
CAPTION = {"Flickr30k"}
KNOWN = sorted(EXACT_MATCH | SUBSTRING | CAPTION | {"Grounding"})


def exact_match(prediction: str, answer: str) -> float:
    """Official: pred.strip().upper() == gt.upper() (no punctuation normalisation)."""
    return float(prediction.strip().upper() == str(answer).strip().upper())


def substring_match(prediction: str, answer: str) -> float:
    """Official FigureQA/DVQA rule pred.upper() in gt.upper(), but an empty prediction is wrong."""
    p = prediction.strip().upper()
    return float(bool(p) and p in str(answer).strip().upper())


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BOX_RE = re.compile(r"\[\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\]")


def parse_box(text) -> tuple[float, float, float, float] | None:
    """First "[x1, y1, x2, y2]" in the text (also accepts a list/tuple); None when there is none or the
    box is degenerate (x2 <= x1 or y2 <= y1). Fixes the official double [1:-1] slicing."""
    if isinstance(text, (list, tuple)):
        vals = [float(v) for v in text] if len(text) == 4 else None
    else:
        m = _BOX_RE.search(str(text))
        vals = [float(v) for v in m.groups()] if m else None
    if vals is None or not all(math.isfinite(v) for v in vals) or vals[2] <= vals[0] or vals[3] <= vals[1]:
        return None
    return tuple(vals)


def box_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_score(prediction: str, answer) -> float:
    """Acc@IoU>0.5. Both boxes are normalised to the same padded square; the official rescaling by
    max(w, h) multiplies both by the same factor and leaves IoU unchanged, so it is not needed."""
    p, g = parse_box(prediction), parse_box(answer)
    if g is None:
        raise ValueError(f"unparsable ground-truth box {answer!r}")
    return float(p is not None and box_iou(p, g) > 0.5)


def _rouge_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _lcs(a, b) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (as Google's rouge-score: lowercase alphanumeric tokens, LCS, beta = 1)."""
    p, r = _rouge_tokens(prediction), _rouge_tokens(reference)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def score(dataset: str, prediction: str, answer) -> float:
    """One sample's score in [0, 1] by the dataset's rule. Flickr30k is scored per corpus
    (caption_scores / evaluate_task). "dolly/..." (FedIT) uses ROUGE-L F1."""
    if dataset in EXACT_MATCH:
        return exact_match(prediction, answer)
    if dataset in SUBSTRING:
        return substring_match(prediction, answer)
    if dataset == "Grounding":
        return grounding_score(prediction, answer)
    if dataset in CAPTION:
        raise ValueError("Flickr30k captions are scored per corpus: use caption_scores(preds, refs) "
                         "or evaluate_task('Flickr30k', preds, examples)")
    if dataset.startswith("dolly") or dataset == "FedIT":
        return rouge_l(prediction, str(answer))
    raise ValueError(f"no scorer for dataset {dataset!r}; known: {KNOWN} and 'dolly/<category>'")


# --- captions: BLEU-1..4 (closest ref length, corpus level) and CIDEr-D, as pycocoevalcap 1.2 ---

def caption_tokenize(text: str) -> list[str]:
    """Stand-in for the PTB tokenizer (Java) used by pycocoevalcap: lowercase, punctuation removed.
    Differs from PTB on clitics ("dog's" -> "dog s", PTB: "dog 's") and hyphens."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(words, n=4) -> Counter:
    c = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            c[tuple(words[i:i + k])] += 1
    return c


def bleu(preds: list[list[str]], refs: list[list[list[str]]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n on token lists exactly as pycocoevalcap's BleuScorer(option='closest')."""
    tiny, small = 1e-15, 1e-9
    testlen = reflen = 0
    guess, correct = [0] * n, [0] * n
    for hyp, rs in zip(preds, refs):
        maxref = Counter()
        for r in rs:
            for g, c in _ngrams(r, n).items():
                maxref[g] = max(maxref[g], c)
        hc = _ngrams(hyp, n)
        testlen += len(hyp)
        reflen += min((abs(len(r) - len(hyp)), len(r)) for r in rs)[1]
        for k in range(n):
            guess[k] += max(len(hyp) - k, 0)
        for g, c in hc.items():
            correct[len(g) - 1] += min(maxref.get(g, 0), c)
    out, b = [], 1.0
    for k in range(n):
        b *= (correct[k] + tiny) / (guess[k] + small)
        out.append(b ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        out = [x * math.exp(1 - 1 / ratio) for x in out]
    return out


def cider_d(preds: list[list[str]], refs: list[list[list[str]]], n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D exactly as pycocoevalcap's CiderScorer (document frequencies from the refs of
    this corpus, clipped tf-idf, Gaussian length penalty on the bigram count, x10, mean over images)."""
    crefs = [[_ngrams(r, n) for r in rs] for rs in refs]
    df = Counter()
    for rs in crefs:
        for g in {g for r in rs for g in r}:
            df[g] += 1
    log_n = math.log(float(len(crefs)))

    def vec(cnts):
        v, norm, length = [dict() for _ in range(n)], [0.0] * n, 0
        for g, tf in cnts.items():
            k = len(g) - 1
            v[k][g] = tf * (log_n - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:  # pycocoevalcap counts bigrams as "length"
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for hyp, rs in zip(preds, crefs):
        vh, nh, lh = vec(_ngrams(hyp, n))
        total = np.zeros(n)
        for r in rs:
            vr, nr, lr = vec(r)
            pen = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * pen
        scores.append(float(np.mean(total)) / len(rs) * 10.0)
    return float(np.mean(scores)) if scores else 0.0


def rouge_l_coco(pred: list[str], refs: list[list[str]], beta: float = 1.2) -> float:
    """pycocoevalcap's ROUGE_L for one image (max precision/recall over refs, beta = 1.2)."""
    prec = [(_lcs(r, pred) / len(pred)) if pred else 0.0 for r in refs]
    rec = [(_lcs(r, pred) / len(r)) if r else 0.0 for r in refs]
    p, r = max(prec), max(rec)
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p and r else 0.0


def caption_scores(preds: list[str], refs: list[list[str]]) -> dict[str, float]:
    """{"Bleu_1".."Bleu_4", "ROUGE_L", "CIDEr"} on the 0-1 (CIDEr 0-10) scales of pycocoevalcap.
    METEOR and SPICE (Java) are not computed."""
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"caption_scores: {len(preds)} predictions for {len(refs)} reference sets")
    P = [caption_tokenize(p) for p in preds]
    R = [[caption_tokenize(r) for r in rs] for rs in refs]
    out = {f"Bleu_{k + 1}": v for k, v in enumerate(bleu(P, R))}
    out["ROUGE_L"] = float(np.mean([rouge_l_coco(p, rs) for p, rs in zip(P, R)]))
    out["CIDEr"] = cider_d(P, R)
    return out


# Caption score names for evaluate_task (default first). "average": the official eval_caption "Average"
# (mean of Bleu_1..4, METEOR, ROUGE_L, CIDEr, x100) without METEOR, which needs Java.
CAPTION_METRICS = ("average", "CIDEr", "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr_x10")
_AVERAGE_OF = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")


def _check_caption_metric(metric):
    if metric not in CAPTION_METRICS:
        raise ValueError(f"unknown caption metric {metric!r}; expected one of {', '.join(CAPTION_METRICS)}")


def caption_metric_value(scores: dict, metric: str = "average") -> float:
    """One caption score from caption_scores() output, x 100 as the official scripts print it: "average"
    (see CAPTION_METRICS) or one metric; CIDEr can exceed 1, so these can exceed 100. "CIDEr_x10" is
    CIDEr-D x 10, which CIDEr-D's bound of 10 keeps within 0..100."""
    _check_caption_metric(metric)
    if metric == "average":
        return 100.0 * float(np.mean([scores[k] for k in _AVERAGE_OF]))
    if metric == "CIDEr_x10":
        return 10.0 * scores["CIDEr"]
    return 100.0 * scores[metric]


def _caption_refs(examples) -> list[list[str]]:
    return [e.meta.get("captions") or [e.answer] for e in examples]


def _box_answer(e):
    return e.meta.get("answer_bbox", e.answer)


def evaluate_task(dataset: str, predictions: list[str], examples: list,
                  caption_metric: str = "average", scorer: str = "corrected") -> float:
    """Task score x 100: accuracy, Acc@IoU>0.5 (meta["answer_bbox"] when present), mean ROUGE-L for
    "dolly/...", or for Flickr30k (references in meta["captions"]) caption_metric_value(caption_metric).
    scorer "official": official_task_score, FCIT's eval scripts as released (FedIT has none)."""
    _check_caption_metric(caption_metric)   # for every dataset, so a typo fails before any caption task
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; expected one of {', '.join(SCORERS)}")
    if len(predictions) != len(examples):
        raise ValueError(f"{dataset}: {len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise ValueError(f"{dataset}: no examples to evaluate")
    preds = [p.strip() for p in predictions]   # model_*.py: outputs = outputs.strip()
    if scorer == "official" and dataset in KNOWN:
        return official_task_score(dataset, preds, examples, caption_metric)
    if dataset in CAPTION:
        return caption_metric_value(caption_scores(preds, _caption_refs(examples)), caption_metric)
    if dataset == "Grounding":
        return 100.0 * float(np.mean([grounding_score(p, _box_answer(e)) for p, e in zip(preds, examples)]))
    return 100.0 * float(np.mean([score(dataset, p, e.answer) for p, e in zip(preds, examples)]))


def evaluate_fedit(predictions: list[str], examples: list) -> dict:
    """FedIT held-out evaluation: mean ROUGE-L F1 and exact match (x100), overall and per dolly category
    (Shepherd releases no evaluation code; these are the reference metrics here)."""
    if len(predictions) != len(examples) or not examples:
        raise ValueError(f"evaluate_fedit: {len(predictions)} predictions for {len(examples)} examples")
    rows = defaultdict(lambda: ([], []))
    for p, e in zip(predictions, examples):
        for key in ("all", e.meta.get("category", e.dataset)):
            rows[key][0].append(rouge_l(p, e.answer))
            rows[key][1].append(exact_match(p, e.answer))
    out = {k: {"rouge_l": 100 * float(np.mean(r)), "exact_match": 100 * float(np.mean(x))}
           for k, (r, x) in rows.items()}
    return {"rouge_l": out["all"]["rouge_l"], "exact_match": out["all"]["exact_match"],
            "per_category": {k: v for k, v in sorted(out.items()) if k != "all"}}


# ----------------------------------------------------------------------------------------------------
# --scorer official: FCIT's eval scripts as released (ETrain/Eval/LLaVA/CoIN/eval_*.py, run by
# scripts/LLaVA/Eval_FCIT/eval_<dataset>.sh), bugs included, for numbers comparable with the paper.
# docs/differences.md lists where they differ from the corrected scorers above.

SCORERS = ("corrected", "official")
OFFICIAL_CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def official_box(text) -> list[float] | None:
    """eval_grounding.py's parse of a predicted box: pred_bbox.replace('[', '').replace(']', ''), then
    [float(x) for x in pred_bbox[1:-1].split(',')], which also drops the first and last characters
    ("[0.12,0.34,0.56,0.78]" -> .12, .34, .56, 0.7). None where that raises or gives other than 4 numbers."""
    fields = str(text).replace("[", "").replace("]", "")[1:-1].split(",")
    try:
        box = [float(x) for x in fields]
    except ValueError:
        return None
    return box if len(box) == 4 else None


def official_grounding(prediction: str, answer_bbox, size=None) -> float:
    """eval_grounding.py: the ground truth parsed without the slice, both boxes x max(size) (IoU is unchanged
    up to rounding), right += iou > 0.5; an unparsable prediction counts as wrong."""
    fields = answer_bbox if isinstance(answer_bbox, (list, tuple)) else \
        str(answer_bbox).replace("[", "").replace("]", "").split(",")
    try:
        gt = [float(x) for x in fields]
    except ValueError:
        gt = []
    if len(gt) != 4:
        raise ValueError(f"unparsable ground-truth box {answer_bbox!r}")
    pred = official_box(prediction)
    if pred is None:
        return 0.0
    if size:
        max_wh = max(size)
        pred, gt = [x * max_wh for x in pred], [x * max_wh for x in gt]
    return float(box_iou(pred, gt) > 0.5)


def official_score(dataset: str, prediction: str, answer, size=None) -> float:
    """One sample by the script FCIT's eval_<dataset>.sh runs. The prediction is stripped as model_*.py
    writes it; the answer is compared as the test file holds it (data.py strips it when loading)."""
    pred = prediction.strip()
    if dataset in EXACT_MATCH:      # eval_iconqa.py, eval_aokvqa.py, eval_arxivqa.py
        return float(pred.upper() == str(answer).upper())
    if dataset in SUBSTRING:        # eval_okvqa.py: '' is in every answer, so an empty prediction is right
        return float(pred.upper() in str(answer).upper())
    if dataset == "Grounding":
        return official_grounding(pred, answer, size)
    return score(dataset, pred, answer)   # captions: per corpus; dolly: Shepherd releases no eval script


def official_caption_unavailable() -> str | None:
    """Why official_caption_scores cannot run here, or None: it needs pycocoevalcap and a Java runtime."""
    if importlib.util.find_spec("pycocoevalcap") is None:
        return "pycocoevalcap is not installed (pip install pycocoevalcap==1.2)"
    if shutil.which("java") is None:
        return "pycocoevalcap's PTB tokenizer and METEOR need Java, and 'java' is not on PATH"
    return None


def official_caption_scores(preds: list[str], refs: list[list[str]]) -> dict[str, float]:
    """eval_caption.py: pycocoevalcap's COCOEvalCap with SPICE removed (the repo's eval.py): PTB tokenizer,
    Bleu(4), Meteor, Rouge, Cider, on image ids 1..N in file order. 0-1 scales (CIDEr 0-10)."""
    why = official_caption_unavailable()
    if why:
        raise ValueError(f"--scorer official scores captions with pycocoevalcap: {why}")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in rs] for i, rs in enumerate(refs, start=1)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds, start=1)})
    out = dict(zip(OFFICIAL_CAPTION_METRICS[:4], Bleu(4).compute_score(gts, res, verbose=0)[0]))
    for name, scorer in (("METEOR", Meteor), ("ROUGE_L", Rouge), ("CIDEr", Cider)):
        out[name] = float(scorer().compute_score(gts, res)[0])
    return out


def official_caption_value(scores: dict, metric: str = "average") -> float:
    """eval_caption.py's Result.text: each metric x 100, and "Average" = sum(results) / len(results) over
    Bleu_1..4, METEOR, ROUGE_L and CIDEr (x 100) in that order; other names as caption_metric_value."""
    if metric == "average":
        results = [scores[k] * 100. for k in OFFICIAL_CAPTION_METRICS]
        return sum(results) / len(results)
    return caption_metric_value(scores, metric)


def official_task_score(dataset: str, preds: list[str], examples: list, caption_metric: str = "average") -> float:
    """The number FCIT's Result.text holds for a test set, printed '{:.2f}' (the paper's Last and Avg were
    assembled from these files): 100. * right / total over every sample, or the caption value."""
    if dataset in CAPTION:
        v = official_caption_value(official_caption_scores(preds, _caption_refs(examples)), caption_metric)
    else:
        right = sum(official_score(dataset, p, _box_answer(e) if dataset == "Grounding" else e.answer,
                                   e.meta.get("size")) for p, e in zip(preds, examples))
        v = 100. * right / len(examples)
    return float(f"{v:.2f}")


# ----------------------------------------------------------------------------------------------------
# Continual metrics (Last / Avg, Guo et al. ICCV 2025)

def continual_metrics(matrix) -> dict[str, float]:
    """matrix[t][i] = score (0-100) on task i after stage t, None where task i is unseen by stage t.
    last = mean over seen tasks after the final stage; avg = mean over stages of the mean over the
    tasks seen at that stage (HiDe-LLaVA/MCITlib definition); bwt = mean over tasks first seen
    before the final stage of A[T][i] - A[first stage seeing i][i] (nan when there is none)."""
    if not matrix or not all(len(r) == len(matrix[0]) for r in matrix):
        raise ValueError("continual_metrics: matrix must be a non-empty list of equal-length rows")
    T = len(matrix)

    def mean_seen(row):
        vals = [v for v in row if v is not None]
        if not vals:
            raise ValueError("continual_metrics: a stage with no seen task")
        return float(np.mean(vals))

    last = mean_seen(matrix[-1])
    avg = float(np.mean([mean_seen(r) for r in matrix]))
    diffs = []
    for i in range(len(matrix[0])):
        first = next((t for t in range(T) if matrix[t][i] is not None), None)
        if first is not None and first < T - 1:
            if matrix[-1][i] is None:
                raise ValueError(f"continual_metrics: task {i} seen at stage {first} but None at the last stage")
            diffs.append(matrix[-1][i] - matrix[first][i])
    return {"last": last, "avg": avg, "bwt": float(np.mean(diffs)) if diffs else float("nan")}
