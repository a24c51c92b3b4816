"""The generic corpus the embedded tiny VLM is pretrained on, and the texts its tokenizer is trained on.

A stand-in for LLaVA-1.5's pretraining and instruction-tuning mix: plain captions, short visual questions and
text-only instructions (copying, reading a context, word and list knowledge), drawn with FCIT-mini's painter
but never in an FCIT-mini or FedIT-mini task format (tests/test_data.py checks that rule).
"""
from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mini  # noqa: E402
from data import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, DOLLY_CATEGORIES, FCIT_DATASETS  # noqa: E402
from mini import (  # noqa: E402
    AUTHORS,
    COLORS,
    CURVES,
    FIG_COLORS,
    GENRES,
    NUM_WORDS,
    OBJECTS,
    PLURAL,
    SHAPES,
    _bars,
    _canvas,
    _cells,
    _curve,
    _font,
    _object,
    _person,
    _shape,
)
from prompts import TEMPLATES  # noqa: E402

CAPTION_PROMPTS = ["Describe the image.", "What is in this picture?", "Write a short caption for the image.",
                   "Tell me what you see."]
WORDS = ["MOON", "RIVER", "STONE", "CLOUD", "TIGER", "APPLE", "OCEAN", "MAPLE", "ACE", "BED", "CAT", "DOG", "ELF",
         "FOX", "GEM", "HAT", "ANN", "BOB", "CAL", "DEE", "ELI", "FAY"]
POSITIONS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1),
             "center": (.5, .5)}
ORDINALS = ["first", "second", "third", "fourth", "fifth"]


def _pick(rng, answer, others, k=2):
    """A natural-language choice list ("red, blue or green") with the answer among k distractors."""
    opts = [answer] + rng.sample([o for o in others if o != answer], k)
    rng.shuffle(opts)
    return ", ".join(opts[:-1]) + " or " + opts[-1]


def _one(rng, d, S):
    col, shp, where, big = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(POSITIONS)), rng.random() < .5
    s = (.45 if big else .25) * S
    px, py = POSITIONS[where]
    x0, y0 = .05 * S + px * (.9 * S - s), .05 * S + py * (.9 * S - s)
    _shape(d, shp, (x0, y0, x0 + s, y0 + s), COLORS[col])
    other = rng.choice([x for x in SHAPES if x != shp])
    qa = [("What color is the shape?", col), ("What shape do you see?", shp), ("Where is the shape?", where),
          ("Is the shape large or small?", "large" if big else "small"),
          (f"Is the shape a {col} {shp}?", "yes"), (f"Is there a {other} in the image?", "no"),
          (f"Is the shape {_pick(rng, col, list(COLORS))}?", col)]
    return f"A {'large' if big else 'small'} {col} {shp} in the {where} of the image.", qa


def _count(rng, d, S):
    col, shp, n = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.randint(1, 6)
    g = S / 3
    for r, c in _cells(rng, n, 3):
        _shape(d, shp, (c * g + 3, r * g + 3, (c + 1) * g - 3, (r + 1) * g - 3), COLORS[col])
    qa = [("How many shapes are in the image? Give a number.", str(n)),
          (f"How many {col} shapes can you see?", NUM_WORDS[n]), ("What color are the shapes?", col),
          ("Which shape is repeated in the image?", shp)]
    return f"{NUM_WORDS[n].capitalize()} {col} {PLURAL[shp] if n > 1 else shp} on a white background.", qa


def _pair(rng, d, S):
    col, shp = rng.choice(list(COLORS)), rng.choice(SHAPES)
    col2, shp2 = rng.choice([c for c in COLORS if c != col]), rng.choice(SHAPES)
    s, side = .35 * S, rng.random() < .5
    if side:
        _shape(d, shp, (.08 * S, .3 * S, .08 * S + s, .3 * S + s), COLORS[col])
        _shape(d, shp2, (.57 * S, .3 * S, .57 * S + s, .3 * S + s), COLORS[col2])
        rel, first, second = "to the left of", "left", "right"
    else:
        _shape(d, shp, (.3 * S, .08 * S, .3 * S + s, .08 * S + s), COLORS[col])
        _shape(d, shp2, (.3 * S, .57 * S, .3 * S + s, .57 * S + s), COLORS[col2])
        rel, first, second = "above", "top", "bottom"
    qa = [(f"What color is the shape at the {first}?", col), (f"What color is the shape at the {second}?", col2),
          (f"Where is the {col} {shp}, {first} or {second}?", first), (f"What is {rel} the {col2} {shp2}?",
                                                                       f"a {col} {shp}")]
    return f"A {col} {shp} {rel} a {col2} {shp2}.", qa


def _text(rng, d, S):
    col, what = rng.choice(list(COLORS)), rng.choice(["digit", "letter", "word"])
    txt = {"digit": str(rng.randint(0, 9)), "letter": chr(65 + rng.randrange(26)), "word": rng.choice(WORDS)}[what]
    d.text((S / 2, S / 2), txt, fill=COLORS[col], font=_font(max(8, int((.5 if what != "word" else .2) * S))),
           anchor="mm")
    qa = [("What is written in the image?", txt), ("What color is the writing?", col),
          ("Is it a digit, a letter or a word?", what)]
    return f"The {what} {txt} written in {col}.", qa


def _backdrop(rng, d, S):
    """A plain, tinted background: photos and drawings are not always on white."""
    if rng.random() < .5:
        d.rectangle((0, 0, S, S), fill=tuple(rng.randint(185, 250) for _ in range(3)))


def _rendition(rng, d, S):
    col, obj, style = rng.choice(list(COLORS)), rng.choice(OBJECTS), rng.choice(["photo", "sketch", "cartoon",
                                                                                   "silhouette"])
    if style != "sketch":
        _backdrop(rng, d, S)
    sz = rng.uniform(.45, .9) * S
    x0, y0 = rng.uniform(0, S - sz), rng.uniform(0, S - sz)
    _object(d, obj, (x0, y0, x0 + sz, y0 + sz), COLORS[col], style)
    cap = {"photo": f"A {col} {obj}.", "sketch": f"A black line sketch of a {obj}.",
           "cartoon": f"A cartoon {obj} with a black outline.", "silhouette": f"The dark silhouette of a {obj}."}[style]
    qa = [("What is drawn here?", obj), ("Is this a photo, a sketch, a cartoon or a silhouette?", style),
          (f"Is this a {_pick(rng, obj, OBJECTS)}?", obj)]
    return cap, qa


LINE_WORDS = {"increasing": "goes up", "decreasing": "goes down", "peak": "rises and then falls",
              "valley": "falls and then rises", "flat": "stays level",
              "oscillating": "goes up and down again and again"}


def _line(rng, d, S):
    kind, col = rng.choice(CURVES), rng.choice(list(COLORS))
    d.line(_curve(rng, d, S, kind), fill=COLORS[col], width=2)
    qa = [("What does the line do from left to right?", f"it {LINE_WORDS[kind]}"), ("What color is the line?", col),
          ("Is the line higher at the right end than at the left end?",
           "yes" if kind == "increasing" else "no" if kind == "decreasing" else "about the same")]
    return f"A line plot; the {col} line {LINE_WORDS[kind]}.", qa


def _colored_bars(rng, d, S):
    names = rng.sample(list(FIG_COLORS), rng.randint(2, 5))
    vals = rng.sample(range(1, 11), len(names))
    _bars(d, S, vals, [FIG_COLORS[c] for c in names], base=rng.choice([.9, .95]), top=.05)
    hi, lo = names[vals.index(max(vals))].lower(), names[vals.index(min(vals))].lower()
    a, b = rng.sample(names, 2)
    qa = [("Which bar is the tallest?", f"the {hi} one"), ("Which bar is the shortest?", f"the {lo} one"),
          (f"Is the {a.lower()} bar taller than the {b.lower()} bar?", "yes" if vals[names.index(a)] >
           vals[names.index(b)] else "no"), ("How many bars are there?", NUM_WORDS[len(names)])]
    return f"Bars in {', '.join(c.lower() for c in names)}; the {hi} bar is the tallest.", qa


def _objects(rng, d, S):
    d.rectangle((0, 0, S, S), fill=rng.choice([(200, 200, 200), (255, 255, 255), (225, 225, 215)]))
    n, grid = rng.randint(2, 6), rng.choice([3, 4])
    g, m = S / grid, max(2, S // 24)
    objs = []
    for r, c in _cells(rng, n, grid):
        col, shp = rng.choice(list(COLORS)[:5]), rng.choice(SHAPES[:4])
        _shape(d, shp, (c * g + m, r * g + m, (c + 1) * g - m, (r + 1) * g - m), COLORS[col])
        objs.append((col, shp))
    col, shp = rng.choice(objs)
    qa = [("Count all the things in the picture.", NUM_WORDS[n]),
          (f"What is the number of {col} things?", NUM_WORDS[sum(o[0] == col for o in objs)]),
          (f"What is the number of {PLURAL[shp]}?", NUM_WORDS[sum(o[1] == shp for o in objs)]),
          (f"What color is the {shp}?" if sum(o[1] == shp for o in objs) == 1 else "Name a color you see.", col)]
    return f"{NUM_WORDS[n].capitalize()} things: " + ", ".join(f"a {c} {s}" for c, s in objs) + ".", qa


def _card(rng, d, S):
    colour, word, name = rng.choice(list(GENRES)), rng.choice(WORDS[:8]), rng.choice(AUTHORS)
    cname = {"Cooking": "orange", "Travel": "blue", "History": "brown", "Science": "green"}[colour]
    d.rectangle((.08 * S, .04 * S, .92 * S, .96 * S), fill=GENRES[colour])
    top = rng.uniform(.3, .45)
    d.text((S / 2, top * S), word, fill=(255, 255, 255), font=_font(max(8, int(.2 * S))), anchor="mm")
    d.text((S / 2, (top + .38) * S), name.upper(), fill=(0, 0, 0), font=_font(max(6, int(.13 * S))), anchor="mm")
    qa = [("Which big word is written in white?", word.capitalize()), ("Whose name is printed in black?", name),
          ("What color is the card?", cname)]
    art = "An" if cname == "orange" else "A"
    return f"{art} {cname} card with the word {word} in white and the name {name} in black.", qa


def _people(rng, d, S):
    n, col, obj = rng.choice([1, 2, 3]), rng.choice(list(COLORS)), rng.choice(["tree", "house", "car", "boat"])
    _backdrop(rng, d, S)
    for k in range(n):
        _person(d, (.12 + .18 * k) * S, .45 * S, .4 * S)
    _object(d, obj, (.6 * S, .45 * S, .96 * S, .85 * S), COLORS[col], "photo")
    who = {1: "One person", 2: "Two people", 3: "Three people"}[n]
    qa = [("How many people can you see?", NUM_WORDS[n]), ("What is beside the people?", f"a {col} {obj}")]
    return f"{who} and a {col} {obj}.", qa


def _chart(rng, d, S):
    col, n = rng.choice(list(COLORS)), rng.randint(2, 5)
    heights = [rng.randint(1, 10) for _ in range(n)]
    _bars(d, S, heights, [COLORS[col]] * n)
    qa = [("How many bars does the chart have?", str(n)), ("What color are the bars?", col)]
    if len(set(heights)) == n:
        qa.append(("Which bar is the tallest?", f"the {ORDINALS[heights.index(max(heights))]} one"))
        qa.append(("Is the first bar taller than the last one?", "yes" if heights[0] > heights[-1] else "no"))
    return f"A chart with {NUM_WORDS[n]} {col} bars.", qa


SCENES = [_one, _count, _pair, _text, _rendition, _chart, _line, _colored_bars, _objects, _card, _people]


def scene(rng, S):
    """(image, caption, [(question, short answer)]) for one generic drawn scene."""
    im, d = _canvas(S)
    cap, qa = rng.choice(SCENES)(rng, d, S)
    return im, cap, qa


def caption_corpus(n: int, seed: int = 0, image_size: int = 64) -> list:
    """n generic (PIL image, caption) pairs: shapes, colours, positions, counts, drawn digits/letters/words,
    object renditions, bar charts, line plots, object grids, lettered cards and people, in plain sentences."""
    return [scene(random.Random(f"captions:{seed}:{i}"), image_size)[:2] for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# text-only instructions

PETS = ["cat", "dog", "parrot", "rabbit", "hamster", "turtle"]
NAMES = ["Ken", "Lena", "Omar", "Rosa", "Tom", "Yuki", "Ivan", "Nora"]
JOBS = ["baker", "pilot", "doctor", "farmer", "teacher", "painter"]
TOWNS = ["Leeds", "Porto", "Kyoto", "Quito", "Turin", "Bergen"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("old", "new"), ("wet", "dry"),
             ("light", "dark"), ("happy", "sad"), ("early", "late"), ("open", "closed")]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
GROUPS = {"pets": PETS, "jobs": JOBS, "towns": TOWNS, "months": MONTHS[:6], "shapes": SHAPES}


def _sentence(rng):
    name, pet, job, town = rng.choice(NAMES), rng.choice(PETS), rng.choice(JOBS), rng.choice(TOWNS)
    return rng.choice([f"{name} is a {job} from {town}.", f"{name} has a {pet} called {rng.choice(NAMES)}.",
                       f"The {pet} of {name} sleeps all day."])


def text_instruction(rng):
    """(instruction, context, answer): one generic text-only instruction, answered in words or a sentence."""
    kind = rng.randrange(8)
    name, pet, job, town = rng.choice(NAMES), rng.choice(PETS), rng.choice(JOBS), rng.choice(TOWNS)
    if kind == 0:
        s = _sentence(rng)
        return rng.choice(["Repeat this sentence exactly.", "Copy the following text."]), s, s
    if kind == 1:
        ctx = f"{name} works as a {job} in {town} and owns a {pet}."
        q, a = rng.choice([(f"What is {name}'s job?", f"{name} is a {job}."), (f"Which town does {name} work in?",
                                                                                town),
                           (f"What pet does {name} have?", f"{name} has a {pet}.")])
        return q, ctx, a
    if kind == 2:
        w, o = rng.choice(OPPOSITES)
        return f"Give the opposite of the word \"{w}\".", "", o
    if kind == 3:
        m = rng.randrange(11)
        return f"Which month comes after {MONTHS[m]}?", "", MONTHS[m + 1]
    if kind == 4:
        g = rng.choice(list(GROUPS))
        a, b = rng.sample(GROUPS[g], 2)
        return f"Name two {g}.", "", f"{a} and {b}"
    if kind == 5:
        words, end = _sentence(rng).rstrip(".").split(), rng.choice(["first", "last"])
        return f"What is the {end} word of the text?", " ".join(words) + ".", words[0 if end == "first" else -1]
    if kind == 6:
        return f"Write one sentence about a {pet}.", "", f"A {pet} is a friendly animal that lives with people."
    return f"Tell me who {name} is.", f"{name} is a {job}. {name} lives in {town}.", \
        f"{name} is a {job} who lives in {town}."


def pretraining_corpus(n: int, seed: int = 0, image_size: int = 64, text_share: float = .25) -> list:
    """n (image or None, instruction, answer, context) samples: captions and visual questions on generic scenes,
    and a text_share of text-only instructions."""
    out = []
    for i in range(n):
        rng = random.Random(f"pretrain:{seed}:{i}")
        if rng.random() < text_share:
            ins, ctx, ans = text_instruction(rng)
            out.append((None, ins, ans, ctx))
            continue
        im, cap, qa = scene(rng, image_size)
        q, a = (rng.choice(CAPTION_PROMPTS), cap) if rng.random() < .3 else rng.choice(qa)
        out.append((im, q, a, ""))
    return out


def vocab_corpus(seed: int = 0, n_per_task: int = 200, image_size: int = 64) -> list[str]:
    """Every kind of text FCIT-mini, FedIT-mini, this corpus and the prompt templates produce (for training a small
    BPE tokenizer that covers them)."""
    texts = [ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, "### Response:", "<image>"] + CAPTION_PROMPTS
    for fmt, sep, end in TEMPLATES.values():
        texts.append(fmt.replace("{instruction}", " ") + sep + end)
    texts = texts * 100  # prompt text recurs in every example: weight it so BPE merges it
    texts.append(" ".join(mini.closed_vocabulary() + WORDS + NAMES + PETS + JOBS + TOWNS + MONTHS
                          + [w for pair in OPPOSITES for w in pair] + ORDINALS + list(GROUPS)))
    for ds in FCIT_DATASETS:
        for i in range(n_per_task):
            _, ins, ans, meta = mini.mini_sample(ds, seed, "vocab", i, image_size)
            texts += [ins, ans] + list(meta.get("captions", []))
    for _, ins, ans, ctx in pretraining_corpus(n_per_task * 4, seed, image_size):
        texts += [ins, ans, ctx]
    rng = random.Random(f"vocab:{seed}")
    for c in DOLLY_CATEGORIES:
        for _ in range(n_per_task // 4):
            r = mini._fedit_record(rng, c)
            texts += [r["instruction"], r["context"], r["response"]]
    return [t for t in texts if t]
