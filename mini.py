"""Synthetic benchmarks small enough for CPU: FCIT-mini and FedIT-mini.

FCIT-mini: twelve procedurally drawn tasks that mirror the twelve FCIT datasets, written in the release layout.
FedIT-mini: dolly-style records in the eight dolly categories. (The tiny model's generic pretraining corpus, drawn
with the same painter, is in tools/corpus.py.)
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil

from data import (
    DATASET_FILES,
    DOLLY_CATEGORIES,
    FCIT_DATASETS,
    FLICKR_GT_FILE,
    FCITDataError,
    atomic_write_json,
)
from files import atomic_write, read_json

log = logging.getLogger("fcit.data")


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
# identity fallback without a CLIP text tower) are dominated by a long shared suffix, which would make tasks look
# alike. Real FCIT data keeps the shared suffix and uses the CLIP text tower.
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
            px = cx + .22 * w * math.cos(k * 2 * math.pi / 5)
            py = y0 + .35 * h + .22 * h * math.sin(k * 2 * math.pi / 5)
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


def _curve(rng, d, S, kind):
    """Axes and the points of a noisy curve of one of the CURVES kinds; the caller draws the line."""
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
    return pts


def _mini_arxivqa(rng, S):
    kind = rng.choice(CURVES)
    im, d = _canvas(S)
    d.line(_curve(rng, d, S, kind), fill=COLORS[rng.choice(list(COLORS))], width=2)
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
    q = rng.choice([f"How many {PLURAL[shape]} are there?",
                    f"Count the {PLURAL[shape]} in the picture. How many are there?"])
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
        k, col, sh = (rng.randint(1, 3), rng.choice(["red", "green", "blue", "yellow"]),
                      rng.choice(["circle", "square", "triangle"]))
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
    n, obj, col = (rng.choice([1, 2]), rng.choice(["ball", "tree", "house", "car"]),
                   rng.choice(["red", "green", "blue", "yellow"]))
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
        q = f"Is the {a['color']} object to the left of the {b['color']} object?"
        ans = "yes" if a["x"] < b["x"] else "no"
    return im, f"{q}\n{TASK_SUFFIX['super-CLEVR']}", ans, {"objects": objs}


WEATHER = ["sunny", "rainy", "snowy", "night"]
WEATHER_OPTS = {"cond": {"sunny": "sunny and warm", "rainy": "rainy and wet", "snowy": "snowy and cold",
                         "night": "dark night"},
                "need": {"sunny": "sunglasses", "rainy": "an umbrella", "snowy": "a warm coat",
                         "night": "a flashlight"}}


def _mini_aokvqa(rng, S):
    w = rng.choice(WEATHER)
    sky = {"sunny": (120, 180, 240), "rainy": (115, 115, 125), "snowy": (200, 205, 215), "night": (20, 25, 60)}[w]
    ground = {"sunny": (90, 170, 70), "rainy": (70, 110, 60), "snowy": (250, 250, 250), "night": (30, 50, 35)}[w]
    im, d = _canvas(S, sky)
    d.rectangle((0, .78 * S, S, S), fill=ground)
    hx = rng.uniform(.05, .6) * S
    _object(d, rng.choice(["house", "tree"]), (hx, .5 * S, hx + .3 * S, .82 * S), COLORS[rng.choice(list(COLORS))],
            "photo")
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
    combos = rng.sample([(c, s) for c in ("red", "green", "blue", "yellow")
                         for s in ("circle", "square", "triangle", "star")], 3)
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
            if read_json(stamp, error=FCITDataError) == params:
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
                atomic_write(os.path.join(root, "images", rel), lambda tmp: im.save(tmp, format="PNG"))
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
            atomic_write_json(os.path.join(root, "instructions", folder, name), obj, indent=0)
    atomic_write_json(stamp, params)
    return root


# ----------------------------------------------------------------------------------------------------
# FedIT-mini: dolly-style records in the 8 dolly categories with templated, learnable responses.

_CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
             ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Chile", "Santiago")]
_FRUITS = [("banana", "yellow"), ("tomato", "red"), ("lime", "green"), ("plum", "purple"), ("blueberry", "blue"),
           ("orange", "orange"), ("cherry", "red"), ("lemon", "yellow")]
_ANIMALS = [("dog", "mammal"), ("cat", "mammal"), ("horse", "mammal"), ("eagle", "bird"), ("robin", "bird"),
            ("owl", "bird"), ("salmon", "fish"), ("trout", "fish"), ("shark", "fish")]
_SIZES = ["ant", "bee", "mouse", "rabbit", "cat", "dog", "horse", "elephant", "whale"]          # increasing size
_LISTS = {"fruits": ["apple", "banana", "cherry", "grape", "mango"],
          "colors": ["red", "blue", "green", "yellow", "pink"],
          "sports": ["soccer", "tennis", "golf", "rugby", "hockey"],
          "tools": ["hammer", "saw", "drill", "wrench", "pliers"],
          "vegetables": ["carrot", "onion", "pepper", "potato", "leek"],
          "birds": ["eagle", "robin", "owl", "crow", "swan"],
          "instruments": ["piano", "violin", "drum", "flute", "guitar"],
          "drinks": ["tea", "coffee", "milk", "juice", "water"]}
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
        ins, res = rng.choice([(f"How old is {p}?", f"{p} is {age} years old."),
                               (f"Where does {p} live?", f"{p} lives in {city}.")])
    elif cat == "brainstorming":
        k = rng.choice(list(_LISTS))
        x, y = sorted(rng.sample(_LISTS[k], 2))
        ins = f"Give me three examples of {k}, but not {x} or {y}."
        res = f"Here are three {k}: {', '.join(v for v in _LISTS[k] if v not in (x, y))}."
    elif cat == "information_extraction":
        q, item, city, day = (rng.randint(2, 9), rng.choice(["chairs", "lamps", "boxes"]), rng.choice(_CITIES),
                              rng.choice(_DAYS))
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
            ins = f"Write a short poem about the {t}."
            res = f"The {t} is {adj} and bright,\nit stays with me by day and night."
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
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    atomic_write(path, write)
    return path


def closed_vocabulary() -> list[str]:
    """Every closed-class word FCIT-mini and FedIT-mini draw from (names, labels, numbers, options)."""
    return (list(COLORS) + SHAPES + list(PLURAL.values()) + OBJECTS + CURVES + TITLES + AUTHORS + list(GENRES)
            + list(FIG_COLORS) + DVQA_LABELS + TAB_NAMES + TAB_ITEMS + NUM_WORDS + [str(k) for k in range(31)]
            + [f"{k * .25 + m:.2f}" for k in range(5) for m in (.03, -.03)]
            + [w.upper() for w in TITLES + DVQA_LABELS + TAB_NAMES] + [chr(65 + k) for k in range(26)]
            + [w for pair in _CAPITALS + _FRUITS + _ANIMALS + _TOPICS for w in pair] + _SIZES + _PEOPLE
            + _CITIES + _DAYS + _PLACES + [w for k, v in _LISTS.items() for w in [k] + v])
