"""FCIT / FedIT data: the released benchmark layout, the four FCIT settings, seeded partitioners,
scorers and continual metrics, and two small built-in benchmarks (FCIT-mini, FedIT-mini).

Sources:
  * FCIT (Guo et al., ICCV 2025) and its official code, Ghy0501/FCIT @ 9b10259: settings and dyn lists
    (ETrain/Train/LLaVA/train.py), data format (ETrain/Dataset/LLaVA/llava_dataset.py), scorers
    (ETrain/Eval/LLaVA/CoIN/*.py, scripts/LLaVA/Eval_FCIT/*.sh).
  * Shepherd / FedIT, JayZhang42/FederatedGPT-Shepherd: client_data_allocation.py (held-out split,
    category shards), templates/alpaca.json (prompt).
  * pycocoevalcap 1.2: BLEU (bleu_scorer.py) and CIDEr-D (cider_scorer.py), re-implemented here
    because the package's tokenizer/METEOR/SPICE need Java.

Layout expected on disk (the FCIT release; FCIT-mini writes exactly this):
  <root>/instructions/<Folder>/<train file>.json    LLaVA records {"image", "conversations": [human, gpt]}
  <root>/instructions/<Folder>/<test file>.json     [{"question_id", "image", "text", "answer", ...}]
  <root>/images/...                                 image paths in records are relative to this folder
  <root>/partitioned_data/{Task-related/seq|Capability-related/cap}/<beta>/Task<k>/client_<i>.json
Stages, tasks and client positions are 0-based here; task k lives in folder Task{k+1} (as the code).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("fcit.data")

# ----------------------------------------------------------------------------------------------------
# Benchmark tables (Guo et al. ICCV 2025 and the official code). Everything the settings need is here.

# dataset name -> (folder under instructions/, train file, test file)   [code: process_data.py, eval_*.sh]
DATASET_FILES = {
    "ImageNet-R": ("ImageNet-R", "train.json", "test.json"),
    "ArxivQA": ("ArxivQA", "train_4w.json", "test_1w.json"),
    "IconQA": ("IconQA", "train.json", "val.json"),
    "CLEVR-Math": ("CLEVR-Math", "train_4w.json", "test_1w.json"),
    "OCR-VQA": ("OCRVQA", "train_10w.json", "test_1w.json"),
    "Flickr30k": ("Flickr30k-cap", "train_brief_4w.json", "val_brief.json"),
    "FigureQA": ("FigureQA", "train.json", "test.json"),
    "super-CLEVR": ("super-CLEVR", "train.json", "test.json"),
    "AOKVQA": ("AOKVQA", "train.json", "val.json"),
    "Grounding": ("Grounding", "train_11w.json", "test_6000.json"),
    "DVQA": ("DVQA", "train.json", "test.json"),
    "TabMWP": ("TabMWP", "train.json", "test.json"),
}
FLICKR_GT_FILE = "val_coco_type.json"  # COCO-style references, image_id = 1..N in test-file order
FCIT_DATASETS = list(DATASET_FILES)

# Task-related order of the official eval scripts (Eval_FCIT_task_hom.sh; consistent with seq_dyn_list).
TASK_ORDER = ["ImageNet-R", "ArxivQA", "IconQA", "CLEVR-Math", "OCR-VQA", "Flickr30k", "FigureQA",
              "super-CLEVR"]
# Capability-related groups in the order of Eval_FCIT_cap_hom.sh (process_data.py lists another order; the
# released partitions are the truth, and load_partitions checks them against this table).
CAP_GROUPS = [
    ("General", ["AOKVQA", "IconQA", "Grounding", "ImageNet-R"]),
    ("Other", ["Flickr30k", "OCR-VQA"]),
    ("Math", ["CLEVR-Math", "super-CLEVR", "TabMWP"]),
    ("Chart", ["ArxivQA", "FigureQA", "DVQA"]),
]
# Heterogeneous settings: stage t, client position p (0..4) trains task DYN[t][p].
# Source: ETrain/Train/LLaVA/train.py (`seq_dyn_list`, `cap_dyn_list`) at Ghy0501/FCIT@9b10259.
SEQ_DYN_LIST = [[1, 2, 4, 5, 6], [3, 4, 5, 7, 7], [0, 2, 3, 4, 5], [0, 0, 1, 3, 7],
                [1, 2, 4, 4, 5], [0, 3, 5, 7, 7], [2, 2, 5, 7, 7], [5, 5, 5, 6, 6]]
CAP_DYN_LIST = [[0, 1, 1, 3, 3], [0, 2, 2, 2, 3], [1, 2, 2, 3, 3], [0, 0, 0, 1, 1]]

# setting -> (dataset level "seq"|"cap", heterogeneous?). Aliases are the official --fcit_type values.
SETTINGS = {"task-hom": ("seq", False), "task-het": ("seq", True),
            "cap-hom": ("cap", False), "cap-het": ("cap", True)}
_SETTING_ALIASES = {"seq": "task-hom", "seq-dyn": "task-het", "cap": "cap-hom", "cap-dyn": "cap-het"}


def canonical_setting(setting: str) -> str:
    s = _SETTING_ALIASES.get(setting, setting)
    if s not in SETTINGS:
        raise ValueError(f"unknown FCIT setting {setting!r}; expected one of "
                         f"{sorted(SETTINGS) + sorted(_SETTING_ALIASES)}")
    return s


def num_stages(setting: str) -> int:
    return 8 if SETTINGS[canonical_setting(setting)][0] == "seq" else 4


def task_names(setting: str) -> list[str]:
    """Name of each task index (Task{k+1} folder): a dataset (Task-related) or a group (Capability)."""
    return list(TASK_ORDER) if SETTINGS[canonical_setting(setting)][0] == "seq" else [g for g, _ in CAP_GROUPS]


def task_datasets(setting: str, task: int) -> list[str]:
    """Datasets that make up task `task` (one for Task-related, a capability group otherwise)."""
    if SETTINGS[canonical_setting(setting)][0] == "seq":
        return [TASK_ORDER[task]]
    return list(CAP_GROUPS[task][1])


def stage_task_for(setting: str, stage: int, position: int) -> int:
    """Task index trained at `stage` by the client at `position` of the round's selection.
    Hom: every client trains the stage's task. Het: the official dyn table, fixed per position."""
    s = canonical_setting(setting)
    level, het = SETTINGS[s]
    if not 0 <= stage < num_stages(s):
        raise ValueError(f"stage {stage} out of range for {s} ({num_stages(s)} stages, 0-based)")
    if not het:
        return stage
    table = SEQ_DYN_LIST if level == "seq" else CAP_DYN_LIST
    if not 0 <= position < len(table[stage]):
        raise ValueError(f"{s}: the official dyn table has {len(table[stage])} client positions per "
                         f"round; position {position} is undefined (use 5 clients per round)")
    return table[stage][position]


def tasks_of_stage(setting: str, stage: int) -> list[int]:
    """Sorted distinct tasks trained during `stage`."""
    s = canonical_setting(setting)
    if not SETTINGS[s][1]:
        return [stage_task_for(s, stage, 0)]
    return sorted({stage_task_for(s, stage, p) for p in range(5)})


def seen_tasks(setting: str, stage: int) -> list[int]:
    """Tasks seen by the end of `stage` (the evaluation set after that stage)."""
    return sorted({t for st in range(stage + 1) for t in tasks_of_stage(setting, st)})


# ----------------------------------------------------------------------------------------------------
# Examples and reading the release (LLaVA conversation records)

@dataclass
class Example:
    dataset: str                  # FCIT dataset name ("ImageNet-R", ...) or "dolly/<category>"
    instruction: str              # human turn, "<image>" removed
    answer: str                   # gpt turn / test answer ("" if unknown)
    image: str | None = None      # absolute path or None (text-only)
    qid: str | int | None = None  # question_id (test) or "<file>:<index>"
    meta: dict = field(default_factory=dict)  # answer_bbox, size, captions, category, context...


class FCITDataError(ValueError):
    """Bad input: the message names the file and the record."""


def _err(path, i, msg, rec=None):
    rid = ""
    if isinstance(rec, dict):
        for k in ("question_id", "id"):
            if k in rec:
                rid = f" ({k}={rec[k]!r})"
                break
    where = f"{path}" + (f": record {i}{rid}" if i is not None else "")
    return FCITDataError(f"{where}: {msg}")


def read_json(path) -> object:
    """json.load with errors that name the file (and line/column for malformed JSON)."""
    path = str(path)
    if not os.path.exists(path):
        raise FCITDataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FCITDataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def atomic_write_json(path, obj, indent=None) -> None:
    """json.dump to `path` through a temporary file in the same folder and os.replace, so that a reader
    (or a crash) never sees a half-written file."""
    path = str(path)
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"   # not `random`: leaves the global RNG alone
    f = open(tmp, "x", encoding="utf-8")
    try:
        with f:
            json.dump(obj, f, indent=indent)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def load_image(path):
    """Open an image as RGB PIL.Image; errors name the path."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FCITDataError(f"{path}: image not found") from None
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, ...
        raise FCITDataError(f"{path}: corrupt or unreadable image ({type(e).__name__}: {e})") from None


def _clean_instruction(text: str) -> str:
    return text.replace("<image>", "").strip()


def _dataset_of_image(image: str | None, default: str) -> str:
    if image:
        head = image.replace("\\", "/").split("/")[0]
        for name, (folder, _, _) in DATASET_FILES.items():
            if head in (folder, name):
                return name
    return default


def parse_train_record(rec, path, i, image_root=None, dataset=None, check_images=True) -> Example:
    """One LLaVA conversation record -> Example (first human/gpt pair; later turns are ignored)."""
    if not isinstance(rec, dict):
        raise _err(path, i, f"expected an object, got {type(rec).__name__}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise _err(path, i, "missing 'conversations' (expected a list [{from: human}, {from: gpt}])", rec)
    h, g = conv[0], conv[1]
    if not (isinstance(h, dict) and isinstance(g, dict) and h.get("from") == "human" and g.get("from") == "gpt"
            and isinstance(h.get("value"), str) and isinstance(g.get("value"), str)):
        raise _err(path, i, "conversations[0:2] must be {from: human, value: str}, {from: gpt, value: str}", rec)
    image = rec.get("image")
    ds = rec.get("dataset") or _dataset_of_image(image, dataset or "unknown")
    img_path = _resolve_image(image, image_root, path, i, rec, check_images)
    return Example(ds, _clean_instruction(h["value"]), g["value"].strip(), img_path,
                   rec.get("id", f"{os.path.basename(str(path))}:{i}"), {})


def parse_test_record(rec, path, i, image_root=None, dataset=None, check_images=True) -> Example:
    """One test record {"question_id", "image", "text", "answer"[, "answer_bbox", "size"]} -> Example."""
    if not isinstance(rec, dict):
        raise _err(path, i, f"expected an object, got {type(rec).__name__}")
    for k in ("question_id", "text"):
        if k not in rec:
            raise _err(path, i, f"missing '{k}' (test records need question_id, image, text, answer)", rec)
    meta = {k: rec[k] for k in ("answer_bbox", "size", "captions") if k in rec}
    if dataset == "Grounding" and "answer_bbox" not in rec and "answer" not in rec:
        raise _err(path, i, "grounding record without 'answer_bbox'", rec)
    img_path = _resolve_image(rec.get("image"), image_root, path, i, rec, check_images)
    ans = rec.get("answer", rec.get("answer_bbox", ""))
    return Example(dataset or rec.get("dataset", "unknown"), _clean_instruction(str(rec["text"])),
                   str(ans).strip(), img_path, rec["question_id"], meta)


def _resolve_image(image, image_root, path, i, rec, check):
    if image is None:
        return None
    if not isinstance(image, str) or not image:
        raise _err(path, i, f"'image' must be a relative path string, got {image!r}", rec)
    p = image if os.path.isabs(image) or image_root is None else os.path.join(str(image_root), image)
    if check and not os.path.isfile(p):
        raise _err(path, i, f"image not found: {p}", rec)
    return p


def load_examples(path, dataset=None, image_root=None, kind="train", check_images=True,
                  skip_bad=False) -> list[Example]:
    """Read a train ("train": LLaVA records) or test ("test") JSON list. Bad records raise
    FCITDataError naming file and record, or with skip_bad=True are skipped and counted in the log."""
    return parse_records(read_json(path), path, dataset, image_root, kind, check_images, skip_bad)


def parse_records(data, path, dataset=None, image_root=None, kind="train", check_images=True,
                  skip_bad=False) -> list[Example]:
    """load_examples on records already read from `path` (a JSON list)."""
    if not isinstance(data, list):
        raise FCITDataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    parse = parse_train_record if kind == "train" else parse_test_record
    out, bad = [], []
    for i, rec in enumerate(data):
        try:
            out.append(parse(rec, path, i, image_root, dataset, check_images))
        except FCITDataError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
    if bad:
        log.warning("skipped %d of %d records in %s (first: %s)", len(bad), len(data), path, bad[0])
    return out


def load_fcit(root, datasets=None, split="test", image_root=None, check_images=True,
              skip_bad=False) -> dict[str, list[Example]]:
    """{dataset: [Example]} for the given split ("train" | "test") of the release under `root`.
    Flickr30k test references are read from val_coco_type.json when present (pairs by file order,
    as the official eval does)."""
    root = str(root)
    image_root = image_root or os.path.join(root, "images")
    out = {}
    for ds in datasets or FCIT_DATASETS:
        if ds not in DATASET_FILES:
            raise ValueError(f"unknown FCIT dataset {ds!r}; expected one of {FCIT_DATASETS}")
        folder, train_f, test_f = DATASET_FILES[ds]
        p = os.path.join(root, "instructions", folder, train_f if split == "train" else test_f)
        if not os.path.exists(p):
            raise FCITDataError(f"{p}: not found (expected the FCIT release layout <root>/instructions/"
                                f"{folder}/{os.path.basename(p)}; see DATASET_FILES)")
        exs = load_examples(p, ds, image_root, "train" if split == "train" else "test", check_images, skip_bad)
        if ds == "Flickr30k" and split != "train":
            _attach_coco_refs(exs, os.path.join(root, "instructions", folder, FLICKR_GT_FILE))
        out[ds] = exs
    return out


def _attach_coco_refs(exs, gt_path):
    if not os.path.exists(gt_path):
        for e in exs:
            e.meta.setdefault("captions", [e.answer])
        return
    gt = read_json(gt_path)
    refs = defaultdict(list)
    for a in gt.get("annotations", []) if isinstance(gt, dict) else []:
        refs[a["image_id"]].append(a["caption"])
    for n, e in enumerate(exs, start=1):  # official: image_id = 1..N in file order
        if n not in refs:
            raise FCITDataError(f"{gt_path}: no caption for image_id {n} (test record {n - 1})")
        e.meta["captions"] = refs[n]
        if not e.answer:
            e.answer = refs[n][0]


# ----------------------------------------------------------------------------------------------------
# Partitioners (official: ETrain/Fed_utils/process_data.py). Seeded local RNGs; every item assigned.

def dirichlet_partition(n_items: int, n_clients: int, beta: float, seed: int, min_size: int = 1) -> list[list[int]]:
    """FCIT quantity skew: client shares w ~ Dir(beta * 1), client c gets a random ~w_c fraction of
    the items (content IID). Differences from the official code: seeded; `min_size` is a real
    minimum (the official call passes beta as min_size); the floor() remainder is assigned (largest
    fractional parts first) instead of dropped. Rejection-samples w (<= 1000 draws) until every client
    has >= min_size items, then tops up the smallest clients from the largest ones."""
    if n_items < n_clients * min_size:
        raise ValueError(f"cannot give {n_clients} clients >= {min_size} items each from {n_items} items")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        w = rng.dirichlet([beta] * n_clients)
        raw = w * n_items
        counts = np.floor(raw).astype(np.int64)
        rem = n_items - int(counts.sum())
        counts[np.argsort(-(raw - counts), kind="stable")[:rem]] += 1
        if counts.min() >= min_size:
            break
    else:  # deterministic repair of the last draw
        while counts.min() < min_size:
            counts[int(np.argmax(counts))] -= 1
            counts[int(np.argmin(counts))] += 1
    perm = rng.permutation(n_items)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [sorted(perm[bounds[c]:bounds[c + 1]].tolist()) for c in range(n_clients)]


def dirichlet_label_partition(labels, n_clients: int, beta: float, seed: int, min_size: int = 1,
                              balance_cap: bool = True) -> list[list[int]]:
    """Label (category) skew: for each label, its items are split by p ~ Dir(beta). With balance_cap
    (as Shepherd's diff_quantity=1 mode), clients already holding >= N/n_clients items get no share.
    Redraws (<= 1000 times) until every client has >= min_size items."""
    labels = list(labels)
    n = len(labels)
    if n < n_clients * min_size:
        raise ValueError(f"cannot give {n_clients} clients >= {min_size} items each from {n} items")
    rng = np.random.default_rng(seed)
    uniq = sorted(set(labels), key=str)
    by_label = {u: np.array([i for i, l in enumerate(labels) if l == u]) for u in uniq}
    for _ in range(1000):
        parts = [[] for _ in range(n_clients)]
        for u in uniq:
            idx = rng.permutation(by_label[u])
            p = rng.dirichlet([beta] * n_clients)
            if balance_cap:
                p = p * np.array([len(q) < n / n_clients for q in parts])
                p = p / p.sum() if p.sum() > 0 else np.full(n_clients, 1.0 / n_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(chunk.tolist())
        if min(len(q) for q in parts) >= min_size:
            return [sorted(q) for q in parts]
    raise ValueError(f"dirichlet_label_partition: no draw gave every client >= {min_size} items "
                     f"(n={n}, clients={n_clients}, beta={beta}); lower min_size or raise beta")


def iid_partition(n_items: int, n_clients: int, seed: int) -> list[list[int]]:
    """Uniform random split into near-equal parts."""
    perm = np.random.default_rng(seed).permutation(n_items)
    return [sorted(a.tolist()) for a in np.array_split(perm, n_clients)]


def shepherd_partition(categories, n_clients: int, seed: int = 42, shards_per_client: int = 2) -> list[list[int]]:
    """Shepherd's FedIT split (client_data_allocation.py, diff_quantity=0): sort items by category,
    cut into shards_per_client * n_clients contiguous shards, shuffle the shards, give each client
    `shards_per_client` of them. (Shepherd sorts with pandas' unstable quicksort and shuffles with
    the global `random`; here the sort is stable and the RNG is random.Random(seed).)"""
    cats = list(categories)
    order = sorted(range(len(cats)), key=lambda i: (str(cats[i]), i))
    shards = [a.tolist() for a in np.array_split(np.array(order, dtype=np.int64), shards_per_client * n_clients)]
    random.Random(seed).shuffle(shards)
    return [sorted(sum(shards[c * shards_per_client:(c + 1) * shards_per_client], [])) for c in range(n_clients)]


def partition_hash(parts: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def partition_manifest(parts, kind: str, seed, beta=None, **extra) -> dict:
    return {"kind": kind, "seed": seed, "beta": beta, "n_clients": len(parts),
            "n_items": sum(len(p) for p in parts), "sizes": [len(p) for p in parts],
            "sha256": partition_hash(parts), **extra}


def partition_dir(root, setting: str, beta: float) -> str:
    level = SETTINGS[canonical_setting(setting)][0]
    sub = os.path.join("Task-related", "seq") if level == "seq" else os.path.join("Capability-related", "cap")
    return os.path.join(str(root), "partitioned_data", sub, str(float(beta)))


def make_partitions(root, setting: str, beta: float, n_clients: int = 50, seed: int = 0,
                    min_size: int = 1, overwrite: bool = False) -> str:
    """Write partitioned_data/.../<beta>/Task<k>/client_<i>.json (+ manifest.json per beta) from the
    train instruction files, with dirichlet_partition per task. Capability tasks concatenate their
    group's datasets and shuffle (seeded), as the official code does (unseeded there). Records keep
    their fields and gain "dataset". Existing folders are kept unless overwrite (as the official)."""
    s = canonical_setting(setting)
    out = partition_dir(root, s, beta)
    manifest = {"setting_level": SETTINGS[s][0], "beta": float(beta), "seed": seed, "min_size": min_size,
                "n_clients": n_clients, "partitioner": "dirichlet_partition (quantity skew)", "tasks": []}
    for k, name in enumerate(task_names(s)):
        tdir = os.path.join(out, f"Task{k + 1}")
        recs = []
        for ds in task_datasets(s, k):
            folder, train_f, _ = DATASET_FILES[ds]
            p = os.path.join(str(root), "instructions", folder, train_f)
            rows = read_json(p)
            if not isinstance(rows, list):
                raise FCITDataError(f"{p}: expected a JSON list of records")
            recs += [dict(r, dataset=ds) if isinstance(r, dict) else r for r in rows]
        if len(task_datasets(s, k)) > 1:
            random.Random(f"{seed}:{k}").shuffle(recs)
        parts = dirichlet_partition(len(recs), n_clients, beta, seed * 1000 + k, min_size)
        if os.path.isdir(tdir) and not overwrite:
            manifest["tasks"].append({"task": k, "folder": f"Task{k + 1}", "name": name, "kept_existing": True})
            continue
        manifest["tasks"].append({"task": k, "folder": f"Task{k + 1}", "name": name,
                                  **partition_manifest(parts, "dirichlet", seed * 1000 + k, float(beta))})
        os.makedirs(tdir, exist_ok=True)
        for f in os.listdir(tdir):   # stale clients of an earlier, larger partition
            m = re.fullmatch(r"client_(\d+)\.json", f)
            if m and int(m.group(1)) >= n_clients:
                os.remove(os.path.join(tdir, f))
        for c, idx in enumerate(parts):
            atomic_write_json(os.path.join(tdir, f"client_{c}.json"), [recs[i] for i in idx])
    atomic_write_json(os.path.join(out, "manifest.json"), manifest, indent=1)
    return out


def _client_path(root, setting: str, beta: float, task: int, client: int) -> str:
    return os.path.join(partition_dir(root, setting, beta), f"Task{task + 1}", f"client_{client}.json")


def _client_examples(path, rows, root, setting, task, image_root, check_images, skip_bad) -> list[Example]:
    default = task_datasets(setting, task)[0] if len(task_datasets(setting, task)) == 1 else "unknown"
    exs = parse_records(rows, path, default, image_root or os.path.join(str(root), "images"), "train",
                        check_images, skip_bad)
    if not exs:
        raise FCITDataError(f"{path}: empty client file (expected >= 1 LLaVA record); re-partition with "
                            f"min_size >= 1 or check the download")
    return exs


def load_client(root, setting: str, beta: float, task: int, client: int, image_root=None,
                check_images=True, skip_bad=False) -> list[Example]:
    """Examples of one client file; an empty or missing file is an error naming the path."""
    p = _client_path(root, setting, beta, task, client)
    return _client_examples(p, read_json(p), root, setting, task, image_root, check_images, skip_bad)


def record_dataset(rec) -> str | None:
    """FCIT dataset of a train record: its "dataset" field, else the first folder of its image path (a
    dataset or instructions/ folder name); None when neither names one."""
    if not isinstance(rec, dict):
        return None
    for v in (rec.get("dataset"), rec.get("image")):
        ds = _dataset_of_image(v, None) if isinstance(v, str) else None
        if ds is not None:
            return ds
    return None


def check_task_datasets(setting: str, task: int, found: Counter, where: str) -> None:
    """Check the datasets found in folder Task{task+1} (a Counter of record_dataset values, None for
    undeterminable records) against task_datasets(setting, task). The released partitions fix the
    stage order, so a mismatch raises FCITDataError naming the group (and stage) the folder holds."""
    s = canonical_setting(setting)
    names, expected = task_names(s), task_datasets(s, task)
    known = {d: n for d, n in found.items() if d is not None}

    def fmt(ds):
        return "{" + ", ".join(sorted(ds)) + "}"
    if not known:
        if found:
            log.warning("%s: no record names a known FCIT dataset (no \"dataset\" field, unknown image folders): "
                        "the stage order could not be verified (expected %s %s)", where, names[task], fmt(expected))
        return
    foreign = set(known) - set(expected)
    if not foreign:
        return
    cap = SETTINGS[s][0] == "cap"
    other = [j for j in range(num_stages(s)) if j != task and set(known) <= set(task_datasets(s, j))]
    held = f"{names[other[0]]} datasets" if other and cap else "datasets"
    msg = (f"{where}: holds {held} {fmt(known)} ({sum(known.values())} records); expected "
           + (f"{names[task]} {fmt(expected)}" if cap else expected[0]))
    if other:
        msg += (f": the release's stage order differs from this code's ({names[other[0]]} is "
                f"Task{other[0] + 1} in the order {', '.join(names)})")
    else:
        msg += f": {fmt(foreign)} not part of {names[task]}; the folder mixes tasks, check the release"
    raise FCITDataError(msg)


def load_partitions(root, setting: str, beta: float, n_clients: int = 50, seed: int = 0, min_size: int = 1,
                    image_root=None, check_images=True, skip_bad=False, create=True,
                    check_order=True) -> list[list[list[Example]]]:
    """parts[task][client] -> [Example] from the released partitions; when the beta folder is absent
    and create=True, generate it with make_partitions (manifest included). A folder that we generated
    (it has our manifest.json) with other n_clients / seed / min_size is regenerated; a released folder
    (no manifest) is never touched. check_order: every Task folder must hold its task's datasets
    (check_task_datasets)."""
    d = partition_dir(root, setting, beta)
    man = os.path.join(d, "manifest.json")
    if not os.path.isdir(d):
        if not create:
            raise FCITDataError(f"{d}: partition folder not found (expected Task<k>/client_<i>.json)")
        make_partitions(root, setting, beta, n_clients, seed, min_size)
    elif create and os.path.exists(man):
        m = read_json(man)
        if (m.get("n_clients"), m.get("seed"), m.get("min_size")) != (n_clients, seed, min_size):
            log.info("regenerating %s for n_clients=%d seed=%d min_size=%d", d, n_clients, seed, min_size)
            make_partitions(root, setting, beta, n_clients, seed, min_size, overwrite=True)
    for k in range(num_stages(setting)):
        tdir = os.path.join(d, f"Task{k + 1}")
        if not os.path.isdir(tdir):
            raise FCITDataError(f"{tdir}: missing task folder (expected Task1..Task{num_stages(setting)})")
    out = []
    for k in range(num_stages(setting)):
        files = [(p, read_json(p)) for p in (_client_path(root, setting, beta, k, c) for c in range(n_clients))]
        if check_order:
            found = Counter(record_dataset(r) for _, rows in files if isinstance(rows, list) for r in rows)
            check_task_datasets(setting, k, found, os.path.join(d, f"Task{k + 1}"))
        out.append([_client_examples(p, rows, root, setting, k, image_root, check_images, skip_bad)
                    for p, rows in files])
    return out


# ----------------------------------------------------------------------------------------------------
# FedIT (Shepherd): databricks-dolly-15k, held-out split, Alpaca prompt

DOLLY_CATEGORIES = ["brainstorming", "classification", "closed_qa", "creative_writing", "general_qa",
                    "information_extraction", "open_qa", "summarization"]
# alpaca-lora templates/alpaca.json (used by Shepherd's utils/prompter.py)
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(instruction: str, context: str = "", response: str | None = None) -> str:
    p = (ALPACA_PROMPT_INPUT.format(instruction=instruction, input=context) if context
         else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
    return p + (response or "")


def load_dolly(path) -> list[dict]:
    """databricks-dolly-15k records (JSONL, or a JSON list as Shepherd's new-databricks-dolly-15k.json)
    with fields instruction, context, response, category; errors name the file and line."""
    path = str(path)
    if not os.path.exists(path):
        raise FCITDataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        rows = [(i, r) for i, r in enumerate(read_json(path))]
    else:
        rows = []
        for ln, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((ln, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise FCITDataError(f"{path}: line {ln}: malformed JSON ({e.msg})") from None
    out = []
    for ln, r in rows:
        if not isinstance(r, dict) or any(not isinstance(r.get(k), str) for k in ("instruction", "response", "category")):
            raise FCITDataError(f"{path}: record at line/index {ln}: expected an object with string fields "
                                f"instruction, context, response, category")
        out.append({"instruction": r["instruction"], "context": r.get("context") or "",
                    "response": r["response"], "category": r["category"]})
    return out


def dolly_split(records, n_per_category: int = 10, seed: int = 42):
    """Shepherd's held-out test: n_per_category random records per category -> (train, test)."""
    rng = random.Random(seed)
    by_cat = defaultdict(list)
    for i, r in enumerate(records):
        by_cat[r["category"]].append(i)
    test = set()
    for c in sorted(by_cat):
        if len(by_cat[c]) < n_per_category:
            raise ValueError(f"category {c!r} has {len(by_cat[c])} < {n_per_category} records")
        test.update(rng.sample(by_cat[c], n_per_category))
    train = [r for i, r in enumerate(records) if i not in test]
    return train, [records[i] for i in sorted(test, key=lambda i: (records[i]["category"], i))]


def dolly_example(rec: dict, i=None) -> Example:
    """A dolly record as an Example; a context is appended as "\n\n### Input:\n<context>", which makes
    model.TEMPLATES["alpaca"] render exactly alpaca_prompt() (prompt_input). Raw fields stay in meta."""
    instr = rec["instruction"] if not rec.get("context") else f"{rec['instruction']}\n\n### Input:\n{rec['context']}"
    return Example(f"dolly/{rec['category']}", instr, rec["response"], None, i,
                   {"category": rec["category"], "context": rec.get("context", ""),
                    "instruction": rec["instruction"]})


# ----------------------------------------------------------------------------------------------------
# Scorers: the official rules (ETrain/Eval/LLaVA/CoIN/eval_*.py) with the official bugs fixed.

EXACT_MATCH = {"ImageNet-R", "ArxivQA", "IconQA", "CLEVR-Math", "OCR-VQA", "super-CLEVR", "TabMWP", "AOKVQA"}
SUBSTRING = {"FigureQA", "DVQA"}
CAPTION = {"Flickr30k"}


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
    raise ValueError(f"no scorer for dataset {dataset!r}; known: {FCIT_DATASETS} and 'dolly/<category>'")


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


def evaluate_task(dataset: str, predictions: list[str], examples: list[Example],
                  caption_metric: str = "average") -> float:
    """Task score x 100: accuracy, Acc@IoU>0.5 (meta["answer_bbox"] when present), mean ROUGE-L for
    "dolly/...", or for Flickr30k (references in meta["captions"]) caption_metric_value(caption_metric)."""
    _check_caption_metric(caption_metric)   # for every dataset, so a typo fails before any caption task
    if len(predictions) != len(examples):
        raise ValueError(f"{dataset}: {len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise ValueError(f"{dataset}: no examples to evaluate")
    preds = [p.strip() for p in predictions]
    if dataset in CAPTION:
        refs = [e.meta.get("captions") or [e.answer] for e in examples]
        return caption_metric_value(caption_scores(preds, refs), caption_metric)
    if dataset == "Grounding":
        return 100.0 * float(np.mean([grounding_score(p, e.meta.get("answer_bbox", e.answer))
                                      for p, e in zip(preds, examples)]))
    return 100.0 * float(np.mean([score(dataset, p, e.answer) for p, e in zip(preds, examples)]))


def evaluate_fedit(predictions: list[str], examples: list[Example]) -> dict:
    """FedIT held-out evaluation: mean ROUGE-L F1 and exact match (x100), overall and per dolly category
    (Shepherd releases no evaluation code; these are the reference metrics here)."""
    if len(predictions) != len(examples) or not examples:
        raise ValueError(f"evaluate_fedit: {len(predictions)} predictions for {len(examples)} examples")
    rows = defaultdict(lambda: ([], []))
    for p, e in zip(predictions, examples):
        for key in ("all", e.meta.get("category", e.dataset)):
            rows[key][0].append(rouge_l(p, e.answer))
            rows[key][1].append(exact_match(p, e.answer))
    out = {k: {"rouge_l": 100 * float(np.mean(r)), "exact_match": 100 * float(np.mean(x))} for k, (r, x) in rows.items()}
    return {"rouge_l": out["all"]["rouge_l"], "exact_match": out["all"]["exact_match"],
            "per_category": {k: v for k, v in sorted(out.items()) if k != "all"}}


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


# ----------------------------------------------------------------------------------------------------
# FCIT-mini: twelve procedurally drawn tasks mirroring the twelve FCIT datasets (same release layout).
# Designed for a tiny VLM on CPU: small images, few distinct short answers, one fixed phrasing family
# per task (tasks are separable from text alone), and conflicting answer formats across tasks
# (letters / digits / Yes-No / yes-no / class words / boxes / captions), so later tasks overwrite
# earlier ones under sequential finetuning.

COLORS = {"red": (215, 38, 38), "green": (34, 160, 60), "blue": (40, 80, 215), "yellow": (235, 195, 20),
          "purple": (140, 60, 190), "orange": (245, 130, 20)}
SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
          "star": "stars", "cross": "crosses"}
OBJECTS = ["house", "tree", "fish", "car", "boat", "flower"]
NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# FCIT-mini replaces the shared suffix by a task-specific answer-format line: a tiny LM's mean-pooled states (DISCO's
# identity fallback without a CLIP text tower) are dominated by a long shared suffix, which made three tasks look
# alike (cos > 0.95) and merge at tau = 0.9. Real FCIT data keeps the shared suffix and uses the CLIP text tower.
TASK_SUFFIX = {"ImageNet-R": "Answer with the name of the object class.",
               "CLEVR-Math": "Answer with the number of objects.",
               "OCR-VQA": "Answer by reading the book cover.",
               "super-CLEVR": "Answer with an attribute of the objects.",
               "DVQA": "Answer by reading the bar chart.",
               "TabMWP": "Answer with a number computed from the table."}
SUFFIX_LETTER = "Answer with the option's letter from the given choices directly."
_FONTS = {}


def _font(px):
    from PIL import ImageFont
    if px not in _FONTS:
        _FONTS[px] = ImageFont.load_default(size=px)
    return _FONTS[px]


def _canvas(S, bg=(255, 255, 255)):
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (S, S), bg)
    return im, ImageDraw.Draw(im)


def _shape(d, shape, box, fill, outline=None, width=1):
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    kw = {"fill": fill, "outline": outline, "width": width if outline else 0}
    if shape == "circle":
        d.ellipse(box, **kw)
    elif shape == "square":
        d.rectangle(box, **kw)
    elif shape == "triangle":
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], **kw)
    elif shape == "diamond":
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], **kw)
    elif shape == "star":
        pts = [(cx + (w / 2 if k % 2 == 0 else w / 5) * math.sin(k * math.pi / 5),
                cy - (h / 2 if k % 2 == 0 else h / 5) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(pts, **kw)
    elif shape == "cross":
        a, b = w / 3, h / 3
        d.polygon([(x0 + a, y0), (x1 - a, y0), (x1 - a, y0 + b), (x1, y0 + b), (x1, y1 - b), (x1 - a, y1 - b),
                   (x1 - a, y1), (x0 + a, y1), (x0 + a, y1 - b), (x0, y1 - b), (x0, y0 + b), (x0 + a, y0 + b)], **kw)
    else:
        raise ValueError(shape)


def _object(d, obj, box, fill, style):
    """Draw an ImageNet-R-like object class in one of four renditions."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if style == "sketch":
        f2, ol, wd = None, (0, 0, 0), 1
    elif style == "silhouette":
        fill, f2, ol, wd = (20, 20, 20), (20, 20, 20), None, 0
    elif style == "cartoon":
        f2, ol, wd = (120, 80, 40), (0, 0, 0), 2
    else:  # photo
        f2, ol, wd = (120, 80, 40), None, 0
    fl = None if style == "sketch" else fill
    kw = {"fill": fl, "outline": ol, "width": wd}
    kw2 = {"fill": f2, "outline": ol, "width": wd}
    if obj == "house":
        d.rectangle((x0, y0 + .45 * h, x1, y1), **kw)
        d.polygon([(x0, y0 + .45 * h), (cx, y0), (x1, y0 + .45 * h)], **kw2)
        d.rectangle((cx - .1 * w, y0 + .7 * h, cx + .1 * w, y1), **kw2)
    elif obj == "tree":
        d.rectangle((cx - .1 * w, y0 + .55 * h, cx + .1 * w, y1), **kw2)
        d.ellipse((x0 + .1 * w, y0, x1 - .1 * w, y0 + .65 * h), **kw)
    elif obj == "fish":
        d.polygon([(x0, y0 + .2 * h), (x0 + .3 * w, cy), (x0, y1 - .2 * h)], **kw2)
        d.ellipse((x0 + .2 * w, y0 + .25 * h, x1, y1 - .25 * h), **kw)
        eye = (0, 0, 0) if style != "silhouette" else (250, 250, 250)
        d.ellipse((x1 - .25 * w, cy - .08 * h, x1 - .15 * w, cy + .02 * h), fill=eye)
    elif obj == "car":
        d.rectangle((x0 + .25 * w, y0 + .2 * h, x1 - .25 * w, y0 + .45 * h), **kw)
        d.rectangle((x0, y0 + .45 * h, x1, y0 + .8 * h), **kw)
        for wx in (x0 + .25 * w, x1 - .25 * w):
            d.ellipse((wx - .13 * w, y0 + .68 * h, wx + .13 * w, y0 + .94 * h), fill=(30, 30, 30), outline=ol, width=wd)
    elif obj == "boat":
        d.polygon([(x0, y0 + .65 * h), (x1, y0 + .65 * h), (x1 - .15 * w, y1), (x0 + .15 * w, y1)], **kw2)
        d.line((cx, y0, cx, y0 + .65 * h), fill=(0, 0, 0) if style != "silhouette" else fill, width=max(1, wd))
        d.polygon([(cx + 1, y0), (cx + 1, y0 + .6 * h), (x1 - .1 * w, y0 + .6 * h)], **kw)
    elif obj == "flower":
        d.line((cx, cy, cx, y1), fill=(34, 120, 40) if style != "silhouette" else fill, width=2)
        r = .16 * min(w, h)
        for k in range(5):
            px, py = cx + .22 * w * math.cos(k * 2 * math.pi / 5), y0 + .35 * h + .22 * h * math.sin(k * 2 * math.pi / 5)
            d.ellipse((px - r, py - r, px + r, py + r), **kw)
        mid = (250, 220, 0) if style != "silhouette" else fill
        d.ellipse((cx - r * .8, y0 + .35 * h - r * .8, cx + r * .8, y0 + .35 * h + r * .8), fill=mid)
    else:
        raise ValueError(obj)


def _mc(rng, correct, options):
    """Shuffle options (correct included) -> (lines 'A. x', letter of the correct one)."""
    opts = list(options)
    rng.shuffle(opts)
    letters = "ABCD"
    return "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(opts)), letters[opts.index(correct)]


def _cells(rng, n, grid):
    return rng.sample([(r, c) for r in range(grid) for c in range(grid)], n)


def _mini_imagenet_r(rng, S):
    obj, style = rng.choice(OBJECTS), rng.choice(["photo", "sketch", "cartoon", "silhouette"])
    bg = (255, 255, 255) if style == "sketch" else tuple(rng.randint(200, 250) for _ in range(3))
    im, d = _canvas(S, bg)
    sz = rng.uniform(.55, .85) * S
    x0, y0 = rng.uniform(0, S - sz), rng.uniform(0, S - sz)
    _object(d, obj, (x0, y0, x0 + sz, y0 + sz), COLORS[rng.choice(list(COLORS))], style)
    q = rng.choice(["What is the object in the image?", "What object is shown in this picture?"])
    return im, f"{q}\n{TASK_SUFFIX['ImageNet-R']}", obj, {"object": obj, "style": style}


CURVES = ["increasing", "decreasing", "peak", "valley", "flat", "oscillating"]


def _mini_arxivqa(rng, S):
    kind = rng.choice(CURVES)
    im, d = _canvas(S)
    d.line((.12 * S, .08 * S, .12 * S, .88 * S), fill=(0, 0, 0), width=1)
    d.line((.12 * S, .88 * S, .95 * S, .88 * S), fill=(0, 0, 0), width=1)
    a, c, f, ph = rng.uniform(.6, 1.6), rng.uniform(.35, .65), rng.uniform(2, 3), rng.uniform(0, 6.28)
    pts = []
    for k in range(16):
        t = k / 15
        v = {"increasing": t ** a, "decreasing": 1 - t ** a, "peak": math.exp(-((t - c) ** 2) / .03),
             "valley": 1 - math.exp(-((t - c) ** 2) / .03), "flat": .5,
             "oscillating": .5 + .4 * math.sin(2 * math.pi * f * t + ph)}[kind] + rng.uniform(-.03, .03)
        pts.append((.18 * S + t * .74 * S, .8 * S - v * .65 * S))
    d.line(pts, fill=COLORS[rng.choice(list(COLORS))], width=2)
    opts = [kind] + rng.sample([k for k in CURVES if k != kind], 3)
    lines, letter = _mc(rng, kind, opts)
    q = rng.choice(["Which of the following best describes the trend of the curve in the plot?",
                    "How does the plotted quantity change from left to right in the figure?"])
    return im, f"{q}\n{lines}\n{SUFFIX_LETTER}", letter, {"curve": kind}


def _mini_iconqa(rng, S):
    shape, color, n = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.randint(1, 7)
    im, d = _canvas(S)
    g, m = S / 3, max(2, S // 20)
    for r, c in _cells(rng, n, 3):
        _shape(d, shape, (c * g + m, r * g + m, (c + 1) * g - m, (r + 1) * g - m), COLORS[color])
    choices = sorted([n] + rng.sample([k for k in range(1, 8) if k != n], 2))
    q = rng.choice([f"How many {PLURAL[shape]} are there?", f"Count the {PLURAL[shape]} in the picture. How many are there?"])
    return (im, f"{q}\nChoices: {', '.join(map(str, choices))}\nAnswer with the correct number from the choices.",
            str(n), {"count": n, "shape": shape, "color": color})


def _scene(rng, S, n, grid=4, colors=("red", "green", "blue", "yellow"), shapes=("circle", "square", "triangle")):
    """n objects on distinct grid cells; returns the object list (color, shape, cell, box)."""
    g, m = S / grid, max(2, S // 24)
    objs = []
    for r, c in _cells(rng, n, grid):
        objs.append({"color": rng.choice(colors), "shape": rng.choice(shapes), "cell": (r, c),
                     "box": (c * g + m, r * g + m, (c + 1) * g - m, (r + 1) * g - m)})
    return objs


def _mini_clevr_math(rng, S):
    im, d = _canvas(S, (200, 200, 200))
    objs = _scene(rng, S, rng.randint(2, 6))
    for o in objs:
        _shape(d, o["shape"], o["box"], COLORS[o["color"]])
    n, kind = len(objs), rng.choice(["sub_color", "sub_shape", "add"])
    if kind == "sub_color":
        col = rng.choice([o["color"] for o in objs] + ["red", "green", "blue", "yellow"])
        q, ans = f"Subtract all {col} objects. How many objects are left?", n - sum(o["color"] == col for o in objs)
    elif kind == "sub_shape":
        sh = rng.choice([o["shape"] for o in objs] + ["circle", "square", "triangle"])
        q, ans = f"Subtract all {PLURAL[sh]}. How many objects are left?", n - sum(o["shape"] == sh for o in objs)
    else:
        k, col, sh = rng.randint(1, 3), rng.choice(["red", "green", "blue", "yellow"]), rng.choice(["circle", "square", "triangle"])
        q, ans = f"Add {k} {col} {PLURAL[sh] if k > 1 else sh}. How many objects exist?", n + k
    return im, f"{q}\n{TASK_SUFFIX['CLEVR-Math']}", str(ans), {"objects": objs}


GENRES = {"Cooking": (245, 130, 20), "Travel": (40, 80, 215), "History": (140, 90, 50), "Science": (34, 160, 60)}
TITLES = ["Moon", "River", "Stone", "Cloud", "Tiger", "Apple", "Ocean", "Maple"]
AUTHORS = ["Ann Lee", "Bob Ray", "Eve Kim", "Max Roy"]


def _mini_ocrvqa(rng, S):
    genre, title, author = rng.choice(list(GENRES)), rng.choice(TITLES), rng.choice(AUTHORS)
    im, d = _canvas(S, (235, 235, 235))
    d.rectangle((.08 * S, .04 * S, .92 * S, .96 * S), fill=GENRES[genre])
    d.text((S / 2, .38 * S), title.upper(), fill=(255, 255, 255), font=_font(max(8, int(.2 * S))), anchor="mm")
    d.text((S / 2, .78 * S), author.upper(), fill=(0, 0, 0), font=_font(max(6, int(.13 * S))), anchor="mm")
    kind = rng.choice(["title", "author", "genre"])
    q, ans = {"title": ("What is the title of this book?", title), "author": ("Who wrote this book?", author),
              "genre": ("What is the genre of this book?", genre)}[kind]
    return im, f"{q}\n{TASK_SUFFIX['OCR-VQA']}", ans, {"title": title, "author": author, "genre": genre}


def _person(d, x, y, s, color=(30, 30, 30)):
    d.ellipse((x - .12 * s, y, x + .12 * s, y + .24 * s), fill=color)
    d.line((x, y + .24 * s, x, y + .62 * s), fill=color, width=2)
    d.line((x - .2 * s, y + .38 * s, x + .2 * s, y + .38 * s), fill=color, width=2)
    d.line((x, y + .62 * s, x - .15 * s, y + s), fill=color, width=2)
    d.line((x, y + .62 * s, x + .15 * s, y + s), fill=color, width=2)


def _mini_flickr30k(rng, S):
    n, obj, col = rng.choice([1, 2]), rng.choice(["ball", "tree", "house", "car"]), rng.choice(["red", "green", "blue", "yellow"])
    rel = rng.choice(["next to", "under"]) if obj == "ball" else "next to"
    im, d = _canvas(S, (170, 210, 245))
    d.rectangle((0, .8 * S, S, S), fill=(110, 170, 90))
    for k in range(n):
        _person(d, (.18 + .22 * k) * S if rel == "next to" else (.35 + .3 * k) * S, .42 * S, .42 * S)
    box = (.55 * S, .4 * S, .95 * S, .84 * S) if rel == "next to" else (.38 * S, .05 * S, .62 * S, .3 * S)
    if obj == "ball":
        bw = (box[2] - box[0]) * .6
        box = (box[0] + bw * .3, box[3] - bw - 2, box[0] + bw * 1.3, box[3] - 2) if rel == "next to" else box
        d.ellipse(box, fill=COLORS[col])
    else:
        _object(d, obj, box, COLORS[col], "photo")
    subj, verb, be = ("a person", "stands", "is") if n == 1 else ("two people", "stand", "are")
    caps = [f"{subj} {verb} {rel} a {col} {obj}", f"{subj} {be} {rel} a {col} {obj}"]
    q = rng.choice(["Describe the image concisely.", "Describe the image briefly.",
                    "Describe the image in a few words."])   # one phrasing family per task, as for the others
    return im, q, caps[0], {"captions": caps, "people": n, "object": obj, "color": col, "relation": rel}


FIG_COLORS = {"Red": (215, 38, 38), "Blue": (40, 80, 215), "Green": (34, 160, 60), "Orange": (245, 130, 20),
              "Purple": (140, 60, 190)}


def _bars(d, S, values, colors, x0=.12, x1=.95, base=.9, top=.1, vmax=10):
    nb = len(values)
    step = (x1 - x0) * S / nb
    boxes = []
    for k, (v, c) in enumerate(zip(values, colors)):
        bx0 = x0 * S + k * step + .15 * step
        bx1 = bx0 + .7 * step
        by0 = base * S - v / vmax * (base - top) * S
        d.rectangle((bx0, by0, bx1, base * S), fill=c)
        boxes.append((bx0, by0, bx1, base * S))
    d.line((x0 * S, base * S, x1 * S, base * S), fill=(0, 0, 0), width=1)
    return boxes


def _mini_figureqa(rng, S):
    names = rng.sample(list(FIG_COLORS), rng.choice([3, 4]))
    vals = rng.sample(range(2, 11), len(names))
    im, d = _canvas(S)
    _bars(d, S, vals, [FIG_COLORS[c] for c in names], base=.95, top=.05)
    kind = rng.choice(["max", "min", "gt", "lt"])
    big, small = names[vals.index(max(vals))], names[vals.index(min(vals))]
    if kind in ("max", "min"):
        want = big if kind == "max" else small
        c = want if rng.random() < .5 else rng.choice([x for x in names if x != want])
        q, ans = f"Is {c} the {'maximum' if kind == 'max' else 'minimum'}?", c == want
    else:
        a, b = rng.sample(names, 2)
        va, vb = vals[names.index(a)], vals[names.index(b)]
        q, ans = f"Is {a} {'greater' if kind == 'gt' else 'less'} than {b}?", (va > vb) if kind == "gt" else (va < vb)
    return im, q, "Yes" if ans else "No", {"bars": dict(zip(names, vals))}


def _mini_super_clevr(rng, S):
    im, d = _canvas(S, (225, 225, 215))
    d.rectangle((0, .62 * S, S, S), fill=(190, 190, 180))
    n = rng.choice([2, 3])
    cols = rng.sample(["red", "green", "blue", "yellow", "purple"], n)
    shps = rng.sample(["circle", "square", "triangle", "diamond"], n)
    xs = sorted(rng.sample(range(3), n)) if n < 3 else [0, 1, 2]
    rng.shuffle(xs)
    objs = []
    for k in range(n):
        size = rng.choice(["small", "large"])
        s = (.26 if size == "large" else .15) * S
        cx = (.18 + .32 * xs[k]) * S
        box = (cx - s / 2, .8 * S - s, cx + s / 2, .8 * S)
        _shape(d, shps[k], box, COLORS[cols[k]])
        objs.append({"color": cols[k], "shape": shps[k], "size": size, "x": xs[k]})
    o = rng.choice(objs)
    kind = rng.choice(["color", "shape", "size", "left"])
    if kind == "color":
        q, ans = f"What is the color of the {o['shape']}?", o["color"]
    elif kind == "shape":
        q, ans = f"What shape is the {o['color']} object?", o["shape"]
    elif kind == "size":
        q, ans = f"What size is the {o['color']} {o['shape']}?", o["size"]
    else:
        a, b = rng.sample(objs, 2)
        q, ans = f"Is the {a['color']} object to the left of the {b['color']} object?", "yes" if a["x"] < b["x"] else "no"
    return im, f"{q}\n{TASK_SUFFIX['super-CLEVR']}", ans, {"objects": objs}


WEATHER = ["sunny", "rainy", "snowy", "night"]
WEATHER_OPTS = {"cond": {"sunny": "sunny and warm", "rainy": "rainy and wet", "snowy": "snowy and cold",
                         "night": "dark night"},
                "need": {"sunny": "sunglasses", "rainy": "an umbrella", "snowy": "a warm coat", "night": "a flashlight"}}


def _mini_aokvqa(rng, S):
    w = rng.choice(WEATHER)
    sky = {"sunny": (120, 180, 240), "rainy": (115, 115, 125), "snowy": (200, 205, 215), "night": (20, 25, 60)}[w]
    ground = {"sunny": (90, 170, 70), "rainy": (70, 110, 60), "snowy": (250, 250, 250), "night": (30, 50, 35)}[w]
    im, d = _canvas(S, sky)
    d.rectangle((0, .78 * S, S, S), fill=ground)
    hx = rng.uniform(.05, .6) * S
    _object(d, rng.choice(["house", "tree"]), (hx, .5 * S, hx + .3 * S, .82 * S), COLORS[rng.choice(list(COLORS))], "photo")
    cx = rng.uniform(.15, .85) * S
    if w == "sunny":
        d.ellipse((cx - .1 * S, .06 * S, cx + .1 * S, .26 * S), fill=(250, 210, 30))
    elif w == "rainy":
        for k in range(3):
            d.ellipse(((.1 + .28 * k) * S, .04 * S, (.4 + .28 * k) * S, .22 * S), fill=(80, 80, 90))
        for k in range(14):
            x, y = rng.uniform(0, S), rng.uniform(.25, .75) * S
            d.line((x, y, x - 2, y + .08 * S), fill=(60, 90, 220), width=1)
    elif w == "snowy":
        for k in range(22):
            x, y = rng.uniform(0, S), rng.uniform(0, .78) * S
            d.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(255, 255, 255))
    else:
        d.ellipse((cx - .09 * S, .06 * S, cx + .09 * S, .24 * S), fill=(240, 240, 200))
        d.ellipse((cx - .04 * S, .04 * S, cx + .12 * S, .22 * S), fill=sky)
        for k in range(8):
            x, y = rng.uniform(0, S), rng.uniform(0, .45) * S
            d.point((x, y), fill=(255, 255, 255))
    kind = rng.choice(["cond", "need"])
    q = {"cond": "What is the most likely condition outside in this scene?",
         "need": "What would a person most likely need if they went outside here?"}[kind]
    lines, letter = _mc(rng, WEATHER_OPTS[kind][w], [WEATHER_OPTS[kind][x] for x in WEATHER])
    return im, f"{q}\n{lines}\n{SUFFIX_LETTER}", letter, {"weather": w}


def _mini_grounding(rng, S):
    im, d = _canvas(S, tuple(rng.randint(225, 250) for _ in range(3)))
    combos = rng.sample([(c, s) for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle", "star")], 3)
    occupied, objs = set(), []
    for col, shp in combos[:rng.choice([2, 3])]:
        for _ in range(50):
            span = rng.choice([1, 2])
            r, c = rng.randint(0, 4 - span), rng.randint(0, 4 - span)
            cells = {(r + i, c + j) for i in range(span) for j in range(span)}
            if not cells & occupied:
                break
        else:
            continue
        occupied |= cells
        m = .03
        box = (c * .25 + m, r * .25 + m, (c + span) * .25 - m, (r + span) * .25 - m)
        _shape(d, shp, tuple(v * S for v in box), COLORS[col])
        objs.append({"color": col, "shape": shp, "box": [round(v, 2) for v in box]})
    o = rng.choice(objs)
    ref = rng.choice([f"the {o['color']} {o['shape']}", f"the {o['shape']} that is {o['color']}"])
    ans = "[" + ",".join(f"{v:.2f}" for v in o["box"]) + "]"
    return (im, f"Please provide the bounding box coordinate of the region this sentence describes: {ref}.",
            ans, {"answer_bbox": ans, "size": [S, S], "objects": objs})


DVQA_LABELS = ["ace", "bed", "cat", "dog", "elf", "fox", "gem", "hat"]


def _mini_dvqa(rng, S):
    labels, vals = rng.sample(DVQA_LABELS, 3), [rng.randint(1, 9) for _ in range(3)]
    while vals.count(max(vals)) > 1:
        vals = [rng.randint(1, 9) for _ in range(3)]
    im, d = _canvas(S)
    _bars(d, S, vals, [(70, 110, 190)] * 3, x0=.05, x1=.95, base=.8, top=.05)
    for k, lab in enumerate(labels):
        d.text(((.05 + .3 * k + .15) * S, .9 * S), lab, fill=(0, 0, 0), font=_font(max(6, int(.13 * S))), anchor="mm")
    kind = rng.choice(["value", "largest_value", "largest_label", "count"])
    if kind == "value":
        k = rng.randrange(3)
        q, ans = f"What is the value of {labels[k]}?", str(vals[k])
    elif kind == "largest_value":
        q, ans = "What is the value of the largest bar?", str(max(vals))
    elif kind == "largest_label":
        q, ans = "Which bar has the largest value?", labels[vals.index(max(vals))]
    else:
        t = rng.randint(1, 8)
        q, ans = f"How many bars have values larger than {t}?", str(sum(v > t for v in vals))
    return im, f"{q}\n{TASK_SUFFIX['DVQA']}", ans, {"labels": labels, "values": vals}


TAB_NAMES = ["Ann", "Bob", "Cal", "Dee", "Eli", "Fay"]
TAB_ITEMS = ["pens", "cups", "books", "kites"]


def _mini_tabmwp(rng, S):
    item, names = rng.choice(TAB_ITEMS), rng.sample(TAB_NAMES, 3)
    vals = rng.sample(range(1, 10), 3)
    im, d = _canvas(S)
    rh, f = S / 4, _font(max(6, int(.16 * S)))
    for k in range(5):
        d.line((2, k * rh if k < 4 else S - 1, S - 3, k * rh if k < 4 else S - 1), fill=(0, 0, 0))
    d.line((.6 * S, rh, .6 * S, S - 1), fill=(0, 0, 0))
    d.rectangle((3, 1, S - 4, rh - 1), fill=(210, 225, 245))
    d.text((S / 2, rh / 2), item.capitalize(), fill=(0, 0, 0), font=f, anchor="mm")
    for k, (nm, v) in enumerate(zip(names, vals)):
        d.text((.3 * S, (k + 1.5) * rh), nm, fill=(0, 0, 0), font=f, anchor="mm")
        d.text((.8 * S, (k + 1.5) * rh), str(v), fill=(0, 0, 0), font=f, anchor="mm")
    kind = rng.choice(["sum", "diff", "max"])
    if kind == "sum":
        q, ans = f"How many {item} do they have in total?", sum(vals)
    elif kind == "diff":
        pair = range(3) if rng.random() < .5 else rng.sample(range(3), 2)   # top two, or a random pair
        i, j = sorted(pair, key=lambda k: -vals[k])[:2]
        q, ans = f"How many more {item} does {names[i]} have than {names[j]}?", vals[i] - vals[j]
    else:
        q, ans = f"What is the largest number of {item} in the table?", max(vals)
    ins = f"Look at the table. Then answer the question.\nQuestion: {q}\n{TASK_SUFFIX['TabMWP']}"
    return im, ins, str(ans), {"names": names, "values": vals, "item": item}


MINI_TASKS = {"ImageNet-R": _mini_imagenet_r, "ArxivQA": _mini_arxivqa, "IconQA": _mini_iconqa,
              "CLEVR-Math": _mini_clevr_math, "OCR-VQA": _mini_ocrvqa, "Flickr30k": _mini_flickr30k,
              "FigureQA": _mini_figureqa, "super-CLEVR": _mini_super_clevr, "AOKVQA": _mini_aokvqa,
              "Grounding": _mini_grounding, "DVQA": _mini_dvqa, "TabMWP": _mini_tabmwp}


def mini_sample(dataset: str, seed: int, split: str, i: int, image_size: int = 64):
    """One FCIT-mini sample -> (PIL image, instruction, answer, meta); a pure function of its arguments."""
    rng = random.Random(f"fcit-mini:{seed}:{dataset}:{split}:{i}")
    return MINI_TASKS[dataset](rng, image_size)


def make_fcit_mini(root, seed: int = 0, n_train: int = 300, n_test: int = 50, image_size: int = 64,
                   datasets=None, overwrite: bool = False) -> str:
    """Write FCIT-mini into `root` in the release layout (instructions/, images/; partitions are made
    on demand by load_partitions). Skips the work when root/fcit_mini.json records the same
    parameters. Same seed -> byte-identical files."""
    root = str(root)
    params = {"seed": seed, "n_train": n_train, "n_test": n_test, "image_size": image_size,
              "datasets": list(datasets or FCIT_DATASETS), "version": 3}
    stamp = os.path.join(root, "fcit_mini.json")
    if not overwrite and os.path.exists(stamp):
        try:
            if read_json(stamp) == params:
                return root
        except FCITDataError:
            pass
    # partitions copy the records: ones made from an earlier version of these files would be stale
    shutil.rmtree(os.path.join(root, "partitioned_data"), ignore_errors=True)
    for ds in params["datasets"]:
        folder, train_f, test_f = DATASET_FILES[ds]
        os.makedirs(os.path.join(root, "images", folder), exist_ok=True)
        os.makedirs(os.path.join(root, "instructions", folder), exist_ok=True)
        train, test, coco = [], [], {"images": [], "annotations": []}
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                im, instr, ans, meta = mini_sample(ds, seed, split, i, image_size)
                rel = f"{folder}/{split}_{i:05d}.png"
                im.save(os.path.join(root, "images", rel), format="PNG")
                if split == "train":
                    train.append({"id": f"{ds}-{i}", "image": rel, "conversations": [
                        {"from": "human", "value": f"<image>\n{instr}"}, {"from": "gpt", "value": ans}]})
                else:
                    rec = {"question_id": f"{ds}-test-{i}", "image": rel, "text": instr, "answer": ans}
                    if ds == "Grounding":
                        rec.update(answer_bbox=meta["answer_bbox"], size=meta["size"])
                    test.append(rec)
                    if ds == "Flickr30k":
                        coco["images"].append({"id": i + 1, "file_name": rel})
                        coco["annotations"] += [{"image_id": i + 1, "id": len(coco["annotations"]) + k, "caption": c}
                                                for k, c in enumerate(meta["captions"])]
        for name, obj in ((train_f, train), (test_f, test)) + (((FLICKR_GT_FILE, coco),) if ds == "Flickr30k" else ()):
            with open(os.path.join(root, "instructions", folder, name), "w") as f:
                json.dump(obj, f, indent=0)
    with open(stamp, "w") as f:
        json.dump(params, f)
    return root


# ----------------------------------------------------------------------------------------------------
# Generic caption corpus for pretraining the embedded tiny VLM (no FCIT-mini question formats).

def _caption_sample(rng, S):
    kind = rng.choice(["one", "count", "pair", "text", "object", "plot"])
    im, d = _canvas(S)
    col, shp = rng.choice(list(COLORS)), rng.choice(SHAPES)
    if kind == "one":
        pos = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1), "center": (.5, .5)}
        where = rng.choice(list(pos))
        big = rng.random() < .5
        s = (.45 if big else .25) * S
        px, py = pos[where]
        x0, y0 = .05 * S + px * (.9 * S - s), .05 * S + py * (.9 * S - s)
        _shape(d, shp, (x0, y0, x0 + s, y0 + s), COLORS[col])
        cap = f"A {'large' if big else 'small'} {col} {shp} in the {where} of the image."
    elif kind == "count":
        n = rng.randint(1, 6)
        g = S / 3
        for r, c in _cells(rng, n, 3):
            _shape(d, shp, (c * g + 3, r * g + 3, (c + 1) * g - 3, (r + 1) * g - 3), COLORS[col])
        cap = f"{NUM_WORDS[n].capitalize()} {col} {PLURAL[shp] if n > 1 else shp} on a white background."
    elif kind == "pair":
        col2, shp2 = rng.choice([c for c in COLORS if c != col]), rng.choice(SHAPES)
        s = .35 * S
        if rng.random() < .5:
            _shape(d, shp, (.08 * S, .3 * S, .08 * S + s, .3 * S + s), COLORS[col])
            _shape(d, shp2, (.57 * S, .3 * S, .57 * S + s, .3 * S + s), COLORS[col2])
            rel = "to the left of"
        else:
            _shape(d, shp, (.3 * S, .08 * S, .3 * S + s, .08 * S + s), COLORS[col])
            _shape(d, shp2, (.3 * S, .57 * S, .3 * S + s, .57 * S + s), COLORS[col2])
            rel = "above"
        cap = f"A {col} {shp} {rel} a {col2} {shp2}."
    elif kind == "text":
        what = rng.choice(["digit", "letter", "word"])
        txt = {"digit": str(rng.randint(0, 9)), "letter": chr(65 + rng.randrange(26)),
               "word": rng.choice(TITLES + DVQA_LABELS + TAB_NAMES).upper()}[what]
        d.text((S / 2, S / 2), txt, fill=COLORS[col], font=_font(max(8, int((.5 if what != "word" else .2) * S))), anchor="mm")
        cap = f"The {what} {txt} written in {col}."
    elif kind == "object":
        obj, style = rng.choice(OBJECTS), rng.choice(["photo", "sketch", "cartoon", "silhouette"])
        _object(d, obj, (.15 * S, .15 * S, .85 * S, .85 * S), COLORS[col], style)
        cap = {"photo": f"A {col} {obj}.", "sketch": f"A black line sketch of a {obj}.",
               "cartoon": f"A cartoon {obj} with a black outline.", "silhouette": f"The dark silhouette of a {obj}."}[style]
    else:
        n = rng.randint(2, 5)
        _bars(d, S, [rng.randint(1, 10) for _ in range(n)], [COLORS[col]] * n)
        cap = f"A chart with {NUM_WORDS[n]} {col} bars."
    return im, cap


def caption_corpus(n: int, seed: int = 0, image_size: int = 64) -> list:
    """n generic (PIL image, caption) pairs: shapes, colours, positions, counts, drawn digits/letters/
    words, object renditions and bar charts, described in plain sentences."""
    return [_caption_sample(random.Random(f"captions:{seed}:{i}"), image_size) for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# FedIT-mini: dolly-style records in the 8 dolly categories with templated, learnable responses.

_CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
             ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Chile", "Santiago")]
_FRUITS = [("banana", "yellow"), ("tomato", "red"), ("lime", "green"), ("plum", "purple"), ("blueberry", "blue"),
           ("orange", "orange"), ("cherry", "red"), ("lemon", "yellow")]
_ANIMALS = [("dog", "mammal"), ("cat", "mammal"), ("horse", "mammal"), ("eagle", "bird"), ("robin", "bird"),
            ("owl", "bird"), ("salmon", "fish"), ("trout", "fish"), ("shark", "fish")]
_SIZES = ["ant", "bee", "mouse", "rabbit", "cat", "dog", "horse", "elephant", "whale"]          # increasing size
_LISTS = {"fruits": ["apple", "banana", "cherry", "grape", "mango"], "colors": ["red", "blue", "green", "yellow", "pink"],
          "sports": ["soccer", "tennis", "golf", "rugby", "hockey"], "tools": ["hammer", "saw", "drill", "wrench", "pliers"],
          "vegetables": ["carrot", "onion", "pepper", "potato", "leek"], "birds": ["eagle", "robin", "owl", "crow", "swan"],
          "instruments": ["piano", "violin", "drum", "flute", "guitar"], "drinks": ["tea", "coffee", "milk", "juice", "water"]}
_PEOPLE = ["Alice", "Ben", "Clara", "David", "Emma", "Frank"]
_CITIES = ["Paris", "Berlin", "Lisbon", "Dublin", "Vienna", "Prague"]
_DAYS = ["Monday", "Tuesday", "Friday", "Sunday"]
_TOPICS = [("sun", "warm"), ("sea", "deep"), ("moon", "pale"), ("rain", "soft"), ("snow", "white"), ("wind", "wild"),
           ("sky", "wide"), ("night", "dark"), ("river", "long"), ("forest", "green")]
_PLACES = ["forest", "desert", "city", "village", "mountains", "sea"]


def _fedit_record(rng, cat):
    ctx = ""
    if cat == "open_qa":
        if rng.random() < .3:
            c, cap = rng.choice(_CAPITALS)
            ins, res = f"What is the capital of {c}?", f"The capital of {c} is {cap}."
        else:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            ins, res = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    elif cat == "general_qa":
        if rng.random() < .3:
            f, col = rng.choice(_FRUITS)
            ins, res = f"What color is a ripe {f}?", f"A ripe {f} is usually {col}."
        else:
            x, y = rng.sample(_SIZES, 2)
            big, small = (x, y) if _SIZES.index(x) > _SIZES.index(y) else (y, x)
            ins, res = f"Which is bigger, a {x} or a {y}?", f"A {big} is bigger than a {small}."
    elif cat == "classification":
        ans = rng.sample(_ANIMALS, 3)
        ins = f"Classify each animal as a mammal, bird or fish: {', '.join(a for a, _ in ans)}."
        res = " ".join(f"{a.capitalize()} is a {k}." for a, k in ans)
    elif cat == "closed_qa":
        p, age, city = rng.choice(_PEOPLE), rng.randint(20, 60), rng.choice(_CITIES)
        ctx = f"{p} is {age} years old and lives in {city}."
        ins, res = rng.choice([(f"How old is {p}?", f"{p} is {age} years old."), (f"Where does {p} live?", f"{p} lives in {city}.")])
    elif cat == "brainstorming":
        k = rng.choice(list(_LISTS))
        x, y = sorted(rng.sample(_LISTS[k], 2))
        ins = f"Give me three examples of {k}, but not {x} or {y}."
        res = f"Here are three {k}: {', '.join(v for v in _LISTS[k] if v not in (x, y))}."
    elif cat == "information_extraction":
        q, item, city, day = rng.randint(2, 9), rng.choice(["chairs", "lamps", "boxes"]), rng.choice(_CITIES), rng.choice(_DAYS)
        ctx = f"Order {rng.randint(100, 999)}: {q} {item} shipped to {city} on {day}."
        ins, res = rng.choice([("Extract the city from the text.", city), ("Extract the day from the text.", day),
                               ("Extract the number of items from the text.", str(q))])
    elif cat == "summarization":
        p, place, day = rng.choice(_PEOPLE), rng.choice(["market", "shop", "fair"]), rng.choice(_DAYS)
        q, item = rng.randint(2, 9), rng.choice(["apples", "books", "cups"])
        ctx = f"{p} went to the {place} on {day}. There, {p} bought {q} {item}. Later, {p} went home happy."
        ins, res = "Summarize the text in one sentence.", f"{p} bought {q} {item} at the {place} on {day}."
    elif cat == "creative_writing":
        if rng.random() < .3:
            t, adj = rng.choice(_TOPICS)
            ins, res = f"Write a short poem about the {t}.", f"The {t} is {adj} and bright,\nit stays with me by day and night."
        else:
            a, pl = rng.choice(_ANIMALS)[0], rng.choice(_PLACES)
            ins = f"Write one sentence of a story about a {a} in the {pl}."
            res = f"Once upon a time, a {a} lived in the {pl} and was very happy."
    else:
        raise ValueError(cat)
    return {"instruction": ins, "context": ctx, "response": res, "category": cat}


def make_fedit_mini(root, seed: int = 0, n_per_category: int = 60) -> str:
    """Write root/databricks-dolly-15k.jsonl (dolly fields) with n_per_category distinct records per
    category (fewer if a category's template space is smaller; logged); returns the file path.
    Use dolly_split() for Shepherd's 10-per-category held-out test."""
    os.makedirs(str(root), exist_ok=True)
    path = os.path.join(str(root), "databricks-dolly-15k.jsonl")
    rng = random.Random(f"fedit-mini:{seed}")
    recs = []
    for c in DOLLY_CATEGORIES:
        seen = {}
        for _ in range(100 * n_per_category):
            if len(seen) == n_per_category:
                break
            r = _fedit_record(rng, c)
            seen.setdefault((r["instruction"], r["context"]), r)
        if len(seen) < n_per_category:
            log.warning("FedIT-mini: only %d distinct %s records", len(seen), c)
        recs += list(seen.values())
    rng.shuffle(recs)
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return path


def vocab_corpus(seed: int = 0, n_per_task: int = 200, image_size: int = 64) -> list[str]:
    """Every kind of text FCIT-mini, FedIT-mini, caption_corpus and the prompt templates produce
    (for training a small BPE tokenizer that covers them)."""
    texts = [ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, "### Response:", "<image>"]
    try:
        import model
        for fmt, sep, end in getattr(model, "TEMPLATES", {}).values():
            texts.append(fmt.replace("{instruction}", " ") + sep + end)
    except Exception:  # model.py not importable: templates are added by the caller
        pass
    texts = texts * 100  # prompt text recurs in every example: weight it so BPE merges it
    closed = (list(COLORS) + SHAPES + list(PLURAL.values()) + OBJECTS + CURVES + TITLES + AUTHORS + list(GENRES)
              + list(FIG_COLORS) + DVQA_LABELS + TAB_NAMES + TAB_ITEMS + NUM_WORDS + [str(k) for k in range(31)]
              + [f"{k * .25 + m:.2f}" for k in range(5) for m in (.03, -.03)]
              + [w.upper() for w in TITLES + DVQA_LABELS + TAB_NAMES] + [chr(65 + k) for k in range(26)]
              + [w for pair in _CAPITALS + _FRUITS + _ANIMALS + _TOPICS for w in pair] + _SIZES + _PEOPLE
              + _CITIES + _DAYS + _PLACES + [w for k, v in _LISTS.items() for w in [k] + v])
    texts.append(" ".join(closed))
    for ds in FCIT_DATASETS:
        for i in range(n_per_task):
            _, ins, ans, meta = mini_sample(ds, seed, "vocab", i, image_size)
            texts += [ins, ans] + list(meta.get("captions", []))
    texts += [c for _, c in caption_corpus(n_per_task * 2, seed, image_size)]
    rng = random.Random(f"vocab:{seed}")
    for c in DOLLY_CATEGORIES:
        for _ in range(n_per_task // 4):
            r = _fedit_record(rng, c)
            texts += [r["instruction"], r["context"], r["response"]]
    return [t for t in texts if t]


# ----------------------------------------------------------------------------------------------------
# Collation: model.encode_example templates, labels on answers only, padding, images.

IGNORE_INDEX = -100


class Collator:
    """list[Example] -> {"input_ids" (B, T), "attention_mask" (B, T), "labels" (B, T), "pixel_values"
    (N_img, 3, H, W) or None}. train=True: answers supervised (+ end token), RIGHT padding with
    tokenizer.pad_id. train=False: generation prompts, LEFT padding, labels all -100. pixel_values
    holds only the examples that have an image, in batch order (the model splices them into the
    image tokens in order); examples without an image get no image tokens. train_on_inputs=True
    (Shepherd's default) supervises the prompt too (image tokens and padding excluded)."""

    def __init__(self, tokenizer, image_processor=None, template: str = "vicuna_v1", image_seq_len: int = 0,
                 image_token_id: int | None = None, max_length: int = 2048, train: bool = True,
                 train_on_inputs: bool = False):
        self.tokenizer, self.image_processor, self.template = tokenizer, image_processor, template
        self.image_seq_len, self.max_length, self.train = image_seq_len, max_length, train
        self.image_token_id = image_token_id if image_token_id is not None else getattr(tokenizer, "image_token_id", None)
        self.train_on_inputs = train_on_inputs
        pad = getattr(tokenizer, "pad_id", None)
        self.pad_id = pad if pad is not None else (getattr(tokenizer, "eos_id", None) or 0)

    def _uses_image(self, ex: Example) -> bool:
        return ex.image is not None and self.image_seq_len > 0

    def encode(self, ex: Example) -> tuple[list[int], list[int]]:
        from model import encode_example
        img = self._uses_image(ex)
        ids, labels = encode_example(self.tokenizer, ex.instruction, ex.answer if self.train else None,
                                     template=self.template, image_seq_len=self.image_seq_len if img else 0,
                                     image_token_id=self.image_token_id, max_length=self.max_length)
        if img and ids.count(self.image_token_id) != self.image_seq_len:
            raise FCITDataError(f"example {ex.qid!r} ({ex.dataset}): max_length={self.max_length} cuts the "
                                f"{self.image_seq_len} image tokens")
        if self.train and self.train_on_inputs:
            labels = [i if i != self.image_token_id else IGNORE_INDEX for i in ids]
        return ids, labels

    def lengths(self, examples) -> list[int]:
        return [len(self.encode(e)[0]) for e in examples]

    def __call__(self, examples) -> dict:
        import torch
        enc = [self.encode(e) for e in examples]
        T = max(len(i) for i, _ in enc)
        B = len(enc)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, (i, l) in enumerate(enc):
            sl = slice(0, len(i)) if self.train else slice(T - len(i), T)
            ids[b, sl], labels[b, sl], mask[b, sl] = torch.tensor(i), torch.tensor(l), 1
        pix = None
        imgs = [e for e in examples if self._uses_image(e)]
        if imgs:
            if self.image_processor is None:
                raise ValueError("Collator: examples have images but no image_processor was given")
            pix = self.image_processor([load_image(e.image) for e in imgs])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pix}


def length_bucketed_batches(lengths, batch_size: int, seed: int = 0, shuffle: bool = True,
                            megabatch_mult: int = 50) -> list[list[int]]:
    """Index batches that group similar lengths (HF LengthGroupedSampler style): shuffle, cut into
    megabatches of megabatch_mult * batch_size, sort each by length (descending), split into batches,
    then shuffle the batch order. Every index appears exactly once; seeded."""
    n = len(lengths)
    rng = random.Random(seed)
    idx = list(range(n))
    if shuffle:
        rng.shuffle(idx)
    mb = max(1, megabatch_mult) * batch_size
    batches = []
    for s in range(0, n, mb):
        chunk = sorted(idx[s:s + mb], key=lambda i: -lengths[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches
