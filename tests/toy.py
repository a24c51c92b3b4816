"""The toy world the engine tests share: a 2-layer LLaMA (hidden 64) briefly pretrained on a copy task, a word-level
tokenizer, and two conflicting tasks over the same 8 fruits (A: "the color of this fruit" -> colour, B: "the first
letter of the word" -> letter), small enough that a federated round takes about a second on one CPU thread."""
import copy
import random

import pytest
import torch

import data
import disco
import federate as fd
import model as vlm
import prompts
from config import Config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Toy-sized matmuls gain nothing from threads, and oversubscribed threads on a busy 2-core runner cost ~30x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "lime", "plum", "peach"]
COLORS = ["red", "yellow", "red", "purple", "yellow", "green", "purple", "orange"]
TEMPLATE_A = "please tell me the color of this fruit : {x}"          # task A: fruit -> colour
TEMPLATE_B = "spell out only the first letter of the word {x} now"   # task B: fruit -> first letter
prompts.TEMPLATES.setdefault("tiny", ("USER: {instruction} ASSISTANT:", " ", "</s>"))   # short prompts, fast tests


def make_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    pre = pre_tokenizers.Whitespace()
    words = set()
    for t in ("USER: ASSISTANT: repeat the word say echo this : copy", TEMPLATE_A, TEMPLATE_B,
              " ".join(FRUITS + COLORS + [f[0] for f in FRUITS])) + disco.REFERENCE_TEXTS:   # no <unk> in the centre
        words |= {w for w, _ in pre.pre_tokenize_str(t)}
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + sorted(words))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return prompts.Tokenizer(tok, bos_id=1, eos_id=2, pad_id=3, add_bos=True)


def task_examples(task, n, seed):
    r = random.Random(seed)
    out = []
    for i in range(n):
        k = r.randrange(len(FRUITS))
        if task == "A":
            out.append(data.Example("A", TEMPLATE_A.format(x=FRUITS[k]), COLORS[k], qid=i))
        else:
            out.append(data.Example("B", TEMPLATE_B.format(x=FRUITS[k]), FRUITS[k][0], qid=i))
    return out


_BASE = {}


def tiny_model(steps=100):
    """A 2-layer LLaMA (hidden 64) built from model.py's config classes, briefly pretrained (full fine-tuning,
    ~1-2 s) on a generic copy task ("repeat the word X" -> X) so that attention fetches the word: the two tasks
    then need only a LoRA-sized lookup, learnable in a few steps. Cached; returns a fresh deep copy."""
    if "m" not in _BASE:
        tok = make_tokenizer()
        text = vlm.DecoderConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=3)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            m = vlm.VLM(vlm.VLMConfig(text=text, vision=None, image_token_index=4))
            with torch.no_grad():   # a usable logit scale for a from-scratch toy
                m.lm_head.weight.normal_(0, 0.3)
                m.lm.embed_tokens.weight.normal_(0, 1.0)
            words = FRUITS + sorted(set(COLORS)) + sorted({f[0] for f in FRUITS})
            r = random.Random(0)
            fed = fd.Federation(m, tok, None, Config(method="zeroshot", template="tiny"))
            opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
            for p in m.parameters():
                p.requires_grad_(True)
            m.train()
            for _ in range(steps):
                exs = [data.Example("copy", f"{r.choice(['repeat the word', 'say', 'echo this :', 'copy'])} {w}", w)
                       for w in (r.choice(words) for _ in range(32))]
                loss = m.loss(**{k: v for k, v in fed.batch(exs).items() if k != "pixel_values"})
                opt.zero_grad()
                loss.backward()
                opt.step()
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        _BASE["m"], _BASE["tok"] = m, tok
    return copy.deepcopy(_BASE["m"]), _BASE["tok"]


def tiny_cfg(**kw):
    base = dict(method="disco", clients=4, clients_per_round=2, rounds=2, local_epochs=5, lr=1e-2, batch_size=8,
                rank=16, alpha=32, subspaces=2, dropout=0.0, template="tiny", max_new_tokens=3,
                lora_targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), seed=0)
    base.update(kw)
    return Config(**base)


def client_data_for(task, stage, rnd, n=32):
    return lambda pos, cid: task_examples(task, n, 1000 * stage + 10 * (cid if cid is not None else 99) + rnd)


def accuracy(fed, exs):
    preds = fed.predict(exs, batch_size=32)
    return sum(p == e.answer for p, e in zip(preds, exs)) / len(exs)


def run_two_tasks(fed, tasks=("A", "B"), tests=None):
    """Stage s trains task tasks[s]; returns {stage: {task: acc}} and the round logs."""
    tests = tests or {t: task_examples(t, 32, 7 + i) for i, t in enumerate(tasks)}
    accs, logs = {}, []
    for s, t in enumerate(tasks):
        for r in range(fed.cfg.rounds):
            logs.append(fed.run_round(s, r, client_data_for(t, s, r)))
        fed.end_stage(s)
        accs[s] = {t2: accuracy(fed, tests[t2]) for t2 in tasks[:s + 1]}
    return accs, logs, tests
