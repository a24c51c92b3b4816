"""FCIT / FedIT data: the benchmark tables and four FCIT settings, examples read from the released layout, seeded
partitioners, databricks-dolly loading (FedIT) and the Collator. mini.py writes small synthetic benchmarks in the
same layout; scoring.py scores predictions.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from files import atomic_write, folder_problem, read_json
from model import IGNORE_INDEX
from prompts import encode_example

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
# Examples and reading the release (LLaVA conversation records). Layout on disk (mini.py writes the same):
#   <root>/instructions/<Folder>/<train file>.json    LLaVA records {"image", "conversations": [human, gpt]}
#   <root>/instructions/<Folder>/<test file>.json     [{"question_id", "image", "text", "answer", ...}]
#   <root>/images/...                                 image paths in records are relative to this folder
#   <root>/partitioned_data/{Task-related/seq|Capability-related/cap}/<beta>/Task<k>/client_<i>.json
# Stages, tasks and client positions are 0-based here; task k lives in folder Task{k+1} (as the official code).

@dataclass
class Example:
    dataset: str                  # FCIT dataset name ("ImageNet-R", ...) or "dolly/<category>"
    instruction: str              # human turn, "<image>" removed
    answer: str                   # gpt turn / test answer ("" if unknown)
    image: str | None = None      # absolute path or None (text-only)
    qid: str | int | None = None  # question_id (test) or "<file>:<index>"
    meta: dict = field(default_factory=dict)  # answer_bbox, size, captions, category, context...
    source: tuple | None = None   # (file, record index) it was read from, for error messages


class FCITDataError(ValueError):
    """Bad input: the message names the file and the record."""


def _err(path, i, msg, rec=None):
    rid = next((f" ({k}={rec[k]!r})" for k in ("question_id", "id") if isinstance(rec, dict) and k in rec), "")
    return FCITDataError(f"{path}" + (f": record {i}{rid}" if i is not None else "") + f": {msg}")


def atomic_write_json(path, obj, indent=None) -> None:
    """json.dump to `path` atomically (files.atomic_write)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n" if indent is not None else "")
    atomic_write(path, write)


def load_image(path, ex: Example | None = None):
    """Open an image as RGB PIL.Image (imaging.to_rgb: 16-bit scaled to 8); errors name the path and, given the
    Example, the record it came from."""
    from PIL import Image

    from imaging import to_rgb
    def fail(msg):
        if ex is not None and ex.source:
            return _err(*ex.source, f"image {path}: {msg}", {"id": ex.qid})
        return FCITDataError(f"{path}: {msg}")
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except FileNotFoundError:
        raise fail("image not found") from None
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, ...
        raise fail(f"corrupt or unreadable image ({type(e).__name__}: {e})") from None


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
    for j, role, what in ((0, "human", "instruction"), (1, "gpt", "answer")):
        t = conv[j]
        if not (isinstance(t, dict) and t.get("from") == role and isinstance(t.get("value"), str)):
            raise _err(path, i, f"conversations[{j}] (the {what}) must be {{from: {role}, value: <string>}}, got "
                       f"{json.dumps(t)[:80]}", rec)
    if not conv[1]["value"].strip():
        raise _err(path, i, "empty answer (conversations[1].value): a training record needs one", rec)
    image = rec.get("image")
    ds = rec.get("dataset") or _dataset_of_image(image, dataset or "unknown")
    img_path = _resolve_image(image, image_root, path, i, rec, check_images)
    return Example(ds, _clean_instruction(conv[0]["value"]), conv[1]["value"].strip(), img_path,
                   rec.get("id", f"{os.path.basename(str(path))}:{i}"), {}, (path, i))


def parse_test_record(rec, path, i, image_root=None, dataset=None, check_images=True) -> Example:
    """One test record {"question_id", "image", "text", "answer"[, "answer_bbox", "size"]} -> Example."""
    if not isinstance(rec, dict):
        raise _err(path, i, f"expected an object, got {type(rec).__name__}")
    for k in ("question_id", "text"):
        if k not in rec:
            raise _err(path, i, f"missing '{k}' (test records need question_id, image, text, answer)", rec)
    if not isinstance(rec["text"], str):
        raise _err(path, i, f"'text' (the instruction) must be a string, got {json.dumps(rec['text'])[:80]}", rec)
    meta = {k: rec[k] for k in ("answer_bbox", "size", "captions") if k in rec}
    ans = rec.get("answer", rec.get("answer_bbox") if dataset == "Grounding" else None)
    if dataset == "Flickr30k" and not rec.get("answer"):
        ans = ""                                   # the references come from val_coco_type.json
    elif not isinstance(ans, str) or not ans.strip():
        what = f"'answer' {json.dumps(ans)[:80]}" if "answer" in rec else "missing 'answer'"
        raise _err(path, i, f"{what}: expected a non-empty string" + (" (or 'answer_bbox')" if dataset == "Grounding"
                                                                       else ""), rec)
    img_path = _resolve_image(rec.get("image"), image_root, path, i, rec, check_images)
    return Example(dataset or rec.get("dataset", "unknown"), _clean_instruction(rec["text"]), ans.strip(), img_path,
                   rec["question_id"], meta, (path, i))


def _resolve_image(image, image_root, path, i, rec, check):
    """A record's image path under image_root. It must stay inside it once `..` and symlinks are resolved: a record
    cannot make the loader read an arbitrary file (FCITDataError naming the record)."""
    if image is None:
        return None
    if not isinstance(image, str) or not image:
        raise _err(path, i, f"'image' must be a relative path string, got {image!r}", rec)
    if image_root is None:
        p = image
    else:
        p, root = os.path.join(str(image_root), image), os.path.realpath(str(image_root))
        if os.path.isabs(image) or os.path.commonpath([root, os.path.realpath(p)]) != root:
            raise _err(path, i, f"image {image!r} is outside the image folder {image_root} (paths in a record are "
                       "relative to it, and may not leave it)", rec)
    if check and not os.path.isfile(p):
        raise _err(path, i, f"image not found: {p}", rec)
    return p


def load_examples(path, dataset=None, image_root=None, kind="train", check_images=True,
                  skip_bad=False) -> list[Example]:
    """Read a train ("train": LLaVA records) or test ("test") JSON list. Bad records raise
    FCITDataError naming file and record, or with skip_bad=True are skipped and counted in the log."""
    return parse_records(read_json(path, error=FCITDataError), path, dataset, image_root, kind, check_images, skip_bad)


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
        missing = [e.qid for e in exs if not e.answer]
        if missing:
            raise FCITDataError(f"{gt_path}: not found, and test records {missing[:3]} have no 'answer' (expected "
                                "the COCO-style references of the release)")
        for e in exs:
            e.meta.setdefault("captions", [e.answer])
        return
    gt = read_json(gt_path, error=FCITDataError)
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
    by_label = {u: np.array([i for i, label in enumerate(labels) if label == u]) for u in uniq}
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


def shepherd_partition(n_items: int, n_clients: int, seed: int = 42, shards_per_client: int = 2) -> list[list[int]]:
    """Shepherd's client shards (client_data_allocation.py, diff_quantity=0) of dolly_split's train rows, which are in
    its category order: shards_per_client * n_clients contiguous shards (np.array_split), shuffled by Python's
    random seeded with `seed`; client c gets shards 2c and 2c+1, in that order."""
    shards = np.array_split(np.arange(n_items), shards_per_client * n_clients)
    random.Random(seed).shuffle(shards)
    k = shards_per_client
    return [np.concatenate(shards[c * k:(c + 1) * k]).tolist() for c in range(n_clients)]


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


def partition_tasks(root, setting: str, beta: float, n_clients: int, seed: int, min_size: int):
    """Per task: (name, records, client index lists) from the train instruction files, dirichlet_partition per task.
    Capability tasks concatenate their group's datasets and shuffle (seeded), as the official code does (unseeded
    there). Records keep their fields and gain "dataset"."""
    s = canonical_setting(setting)
    for k, name in enumerate(task_names(s)):
        recs = []
        for ds in task_datasets(s, k):
            folder, train_f, _ = DATASET_FILES[ds]
            p = os.path.join(str(root), "instructions", folder, train_f)
            rows = read_json(p, error=FCITDataError)
            if not isinstance(rows, list):
                raise FCITDataError(f"{p}: expected a JSON list of records")
            recs += [dict(r, dataset=ds) if isinstance(r, dict) else r for r in rows]
        if len(task_datasets(s, k)) > 1:
            random.Random(f"{seed}:{k}").shuffle(recs)
        yield name, recs, dirichlet_partition(len(recs), n_clients, beta, seed * 1000 + k, min_size)


def make_partitions(root, setting: str, beta: float, n_clients: int = 50, seed: int = 0,
                    min_size: int = 1, overwrite: bool = False, home=None) -> str:
    """Write <home>/partitioned_data/.../<beta>/Task<k>/client_<i>.json (+ manifest.json per beta) from the data
    root's partition_tasks; home: the data root, or the cache folder partition_home picks when it is read-only.
    Existing folders are kept unless overwrite (as the official)."""
    s = canonical_setting(setting)
    out = partition_dir(home or root, s, beta)
    manifest = {"setting_level": SETTINGS[s][0], "beta": float(beta), "seed": seed, "min_size": min_size,
                "n_clients": n_clients, "partitioner": "dirichlet_partition (quantity skew)", "tasks": []}
    for k, (name, recs, parts) in enumerate(partition_tasks(root, s, beta, n_clients, seed, min_size)):
        tdir = os.path.join(out, f"Task{k + 1}")
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


def partition_home(root, setting: str, beta: float, cache=None) -> str:
    """Where generated partitions go (their partitioned_data/ folder's parent): the data root when it is writable
    (the release layout), else cache_home(root, cache), where the next run finds them again."""
    problem = folder_problem(partition_dir(root, setting, beta))
    if problem is None:
        return str(root)
    if cache is None:
        raise FCITDataError(f"{partition_dir(root, setting, beta)} {problem}, and no cache folder for the partitions")
    return cache_home(root, cache)


def cache_home(root, cache) -> str:
    """The cache's folder for the data root `root`: <cache>/<name>-<hash of its real path>."""
    real = os.path.realpath(str(root))
    return os.path.join(str(cache), f"{os.path.basename(real)}-{hashlib.sha256(real.encode()).hexdigest()[:12]}")


def _usable(d, n_clients: int, seed: int, min_size: int) -> bool:
    """A partition folder to read as it is: released (no manifest.json), or ours made with these parameters."""
    man = os.path.join(d, "manifest.json")
    if not os.path.isdir(d) or not os.path.exists(man):
        return os.path.isdir(d)
    m = read_json(man, error=FCITDataError)
    return isinstance(m, dict) and (m.get("n_clients"), m.get("seed"), m.get("min_size")) == (n_clients, seed, min_size)


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
    return _client_examples(p, read_json(p, error=FCITDataError), root, setting, task, image_root, check_images,
                            skip_bad)


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
                    image_root=None, check_images=True, skip_bad=False, create=True, check_order=True,
                    cache=None, write=True) -> list[list[list[Example]]]:
    """parts[task][client] -> [Example] from the released partitions, else from ours (they have a manifest.json)
    made with these n_clients / seed / min_size, in the data root or in cache_home(root, cache). With create=True
    other or missing partitions are generated: written by make_partitions to partition_home (the data root when
    writable, else the cache), or with write=False (--dry-run) computed in memory only. A released folder is never
    touched. check_order: every Task folder must hold its task's datasets (check_task_datasets)."""
    d, rows = partition_dir(root, setting, beta), None
    if create and not _usable(d, n_clients, seed, min_size):
        cached = partition_dir(cache_home(root, cache), setting, beta) if cache is not None else None
        if cached and _usable(cached, n_clients, seed, min_size):
            d = cached
        elif write:
            home = partition_home(root, setting, beta, cache)
            log.info("generating %s for n_clients=%d seed=%d min_size=%d", partition_dir(home, setting, beta),
                     n_clients, seed, min_size)
            d = make_partitions(root, setting, beta, n_clients, seed, min_size, overwrite=True, home=home)
        else:
            tasks = partition_tasks(root, setting, beta, n_clients, seed, min_size)
            rows = [[(os.path.join(d, f"Task{k + 1}", f"client_{c}.json"), [recs[i] for i in idx])
                     for c, idx in enumerate(parts)] for k, (_, recs, parts) in enumerate(tasks)]
    elif not os.path.isdir(d):
        raise FCITDataError(f"{d}: partition folder not found (expected Task<k>/client_<i>.json)")
    if rows is None:
        for k in range(num_stages(setting)):
            if not os.path.isdir(os.path.join(d, f"Task{k + 1}")):
                raise FCITDataError(f"{os.path.join(d, f'Task{k + 1}')}: missing task folder (expected "
                                    f"Task1..Task{num_stages(setting)})")
        rows = [[(p, read_json(p, error=FCITDataError))
                 for p in (os.path.join(d, f"Task{k + 1}", f"client_{c}.json") for c in range(n_clients))]
                for k in range(num_stages(setting))]
    out = []
    for k, files in enumerate(rows):
        if check_order:
            found = Counter(record_dataset(r) for _, recs in files if isinstance(recs, list) for r in recs)
            check_task_datasets(setting, k, found, os.path.join(d, f"Task{k + 1}"))
        out.append([_client_examples(p, recs, root, setting, k, image_root, check_images, skip_bad)
                    for p, recs in files])
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


def load_dolly(path, extra_categories: bool = False) -> list[dict]:
    """databricks-dolly-15k records (JSONL, or a JSON list as Shepherd's new-databricks-dolly-15k.json): non-empty
    string instruction, response and category (one of DOLLY_CATEGORIES unless extra_categories), an optional string
    context. Errors name the file and the line (JSONL) or record (list)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FCITDataError(f"{path}: file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise FCITDataError(f"{path}: line {line}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None
    if text.lstrip().startswith("["):
        rows = [(f"record {i}", r) for i, r in enumerate(read_json(path, error=FCITDataError))]
    else:
        rows = []
        for ln, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"line {ln}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise FCITDataError(f"{path}: line {ln}: malformed JSON ({e.msg})") from None
    if not rows:
        raise FCITDataError(f"{path}: no records (expected databricks-dolly-15k: one JSON object per line with "
                            "instruction, context, response, category)")
    return [_dolly_record(r, f"{path}: {where}", extra_categories) for where, r in rows]


def _dolly_record(r, where: str, extra_categories: bool) -> dict:
    if not isinstance(r, dict):
        raise FCITDataError(f"{where}: expected an object with instruction, context, response, category")
    for k in ("instruction", "response", "category"):
        if not isinstance(r.get(k), str) or not r[k].strip():
            raise FCITDataError(f"{where}: '{k}' must be a non-empty string, got "
                                + (json.dumps(r[k])[:80] if k in r else "none"))
    if not isinstance(r.get("context") or "", str):
        raise FCITDataError(f"{where}: 'context' must be a string, got {json.dumps(r['context'])[:80]}")
    if r["category"] not in DOLLY_CATEGORIES and not extra_categories:
        raise FCITDataError(f"{where}: unknown category {r['category']!r}; dolly's are {', '.join(DOLLY_CATEGORIES)} "
                            "(--dolly-extra-categories makes each other category a task)")
    return {"instruction": r["instruction"], "context": r.get("context") or "", "response": r["response"],
            "category": r["category"]}


def dolly_split(records, n_per_category: int = 10, seed: int = 42):
    """Shepherd's held-out test, row for row (client_data_allocation.py): pandas' sort_values by category (numpy's
    unstable quicksort), then per category in sorted order DataFrame.sample(n), i.e. choice(size, n, replace=False)
    on one RandomState seeded once. -> (train: the other rows in sorted order, test: the drawn rows in draw order)."""
    order = np.argsort(np.array([r["category"] for r in records], dtype=object), kind="quicksort")
    rng, by_cat = np.random.RandomState(seed), defaultdict(list)
    for p in order:
        by_cat[records[p]["category"]].append(p)
    test = []
    for c in sorted(by_cat):
        if len(by_cat[c]) < n_per_category:
            raise FCITDataError(f"dolly category {c!r} has {len(by_cat[c])} records; the held-out split takes "
                                f"{n_per_category} from each")
        test += [by_cat[c][j] for j in rng.choice(len(by_cat[c]), n_per_category, replace=False)]
    held = set(test)
    return [records[p] for p in order if p not in held], [records[p] for p in test]


def dolly_example(rec: dict, i=None) -> Example:
    """A dolly record as an Example; a context is appended as "\n\n### Input:\n<context>", which makes
    prompts.TEMPLATES["alpaca"] render exactly alpaca_prompt() (prompt_input). Raw fields stay in meta."""
    instr = rec["instruction"] if not rec.get("context") else f"{rec['instruction']}\n\n### Input:\n{rec['context']}"
    return Example(f"dolly/{rec['category']}", instr, rec["response"], None, i,
                   {"category": rec["category"], "context": rec.get("context", ""),
                    "instruction": rec["instruction"]})


# ----------------------------------------------------------------------------------------------------
# Collation: prompts.encode_example templates, labels on answers only, padding, images.


class Collator:
    """list[Example] -> {"input_ids" (B, T), "attention_mask" (B, T), "labels" (B, T), "pixel_values"
    (N_img, 3, H, W) or None}. train=True: answers supervised (+ end token), RIGHT padding with
    tokenizer.pad_id. train=False: generation prompts, LEFT padding, labels all -100. pixel_values
    holds only the examples that have an image, in batch order (the model splices them into the
    image tokens in order); examples without an image get no image tokens. train_on_inputs=True
    (Shepherd's default) supervises the prompt too (image tokens and padding excluded). pixels=False: the image
    tokens without pixel_values, for a caller that supplies the images' vision states itself."""

    def __init__(self, tokenizer, image_processor=None, template: str = "vicuna_v1", image_seq_len: int = 0,
                 image_token_id: int | None = None, max_length: int = 2048, train: bool = True,
                 train_on_inputs: bool = False, pixels: bool = True):
        self.tokenizer, self.image_processor, self.template = tokenizer, image_processor, template
        self.pixels = pixels
        self.image_seq_len, self.max_length, self.train = image_seq_len, max_length, train
        self.image_token_id = (image_token_id if image_token_id is not None
                               else getattr(tokenizer, "image_token_id", None))
        self.train_on_inputs = train_on_inputs
        pad = getattr(tokenizer, "pad_id", None)
        self.pad_id = pad if pad is not None else (getattr(tokenizer, "eos_id", None) or 0)

    def _uses_image(self, ex: Example) -> bool:
        return ex.image is not None and self.image_seq_len > 0

    def encode(self, ex: Example) -> tuple[list[int], list[int]]:
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
        for b, (row_ids, row_labels) in enumerate(enc):
            sl = slice(0, len(row_ids)) if self.train else slice(T - len(row_ids), T)
            ids[b, sl], labels[b, sl], mask[b, sl] = torch.tensor(row_ids), torch.tensor(row_labels), 1
        pix = None
        imgs = [e for e in examples if self._uses_image(e)]
        if imgs and self.pixels:
            if self.image_processor is None:
                raise ValueError("Collator: examples have images but no image_processor was given")
            pix = self.image_processor([load_image(e.image, e) for e in imgs])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pix}

