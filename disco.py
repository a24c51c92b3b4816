"""DISCO (Guo et al., ICCV 2025), top to bottom in the paper's order:
  1. the identity token: a client's mean instruction feature from a frozen encoder      [official: clip_encoder.py]
  2. dynamic knowledge organisation (DKO): match tokens to keys, cluster, open subspaces [official: model_aggregation]
  3. per-subspace aggregation: each subspace averaged over its own clients only        [official: model_aggregation.py]
  4. the key update: a sample-weighted running mean of the tokens                      [official: process_text_feature]
  5. subspace selective activation (SSA): y = W x + s Σ_j α_j B_j A_j x per test sample [official: coinmoelora.py]
then DISCO's unit of the method protocol (methods.py), and last the ablations and differential privacy. Each docstring
writes its equation out; the brackets name the official code (Ghy0501/FCIT) that implements the step, and
docs/differences.md lists where this file departs from it, and why.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

import data
import lora
import privacy
from config import UsageError
from methods import NOT_FINITE, Assignment, CapacityError, Finetune, Round, tally
from server import Upload

logger = logging.getLogger("fcit.disco")


# ----------------------------------------------------------------------------------------------------
# 1. the identity token: μ_k = (1/n_k) Σ_i f(x_i) over client k's instructions x_i, f a frozen encoder:
#    the CLIP text tower's pooled output (the paper's), or the base LM's pooled states (a fallback)

REFERENCE_TEXTS = (   # generic texts whose mean base-LM state centres the LM-identity fallback (identity_center)
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Describe this.", "What is shown here?", "Answer the question.", "Hello world.", "Please help me with this.",
    "Tell me something about it.", "Is this correct? Answer yes or no.", "How many are there?",
    "Give a short answer.", "What does it say?")


def _padded(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and attention mask."""
    x = torch.full((len(ids), max(len(s) for s in ids)), pad, dtype=torch.long)
    att = torch.zeros_like(x)
    for k, s in enumerate(ids):
        x[k, :len(s)], att[k, :len(s)] = torch.tensor(s), 1
    return x, att


def clip_ids(ctok, text: str, max_length: int = 77) -> list[int]:
    """CLIP tokenisation as transformers' CLIPTokenizer(truncation=True, max_length=77): BOS text EOS."""
    ids = ctok.tok.encode(text.replace("<image>", "").strip(), add_special_tokens=False).ids
    return [ctok.bos_id] + ids[:max_length - 2] + [ctok.eos_id]


def clip_text_features(fed, chunk) -> torch.Tensor:
    """f(x): the CLIP text tower's pooled EOS state of the instruction, (B, 768), unprojected."""
    tower, ctok = fed.text_encoder
    length = getattr(getattr(tower, "config", None), "max_position_embeddings", 77)
    x, att = _padded([clip_ids(ctok, ex.instruction, length) for ex in chunk],
                     ctok.pad_id if ctok.pad_id is not None else 0)
    dev = next(tower.parameters()).device
    return tower(x.to(dev), attention_mask=att.to(dev), project=False).float().cpu()


def lm_states(fed, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen base LM's fp32 states of the bare texts, (B, T, C) and the mask: the final hidden states, or
    the token embeddings with identity_layer="embedding"."""
    ids = [fed.tok.encode(t.replace("<image>", "").strip())[:fed.cfg.max_length] or [fed.tok.eos_id] for t in texts]
    x, att = _padded(ids, fed.tok.pad_id if fed.tok.pad_id is not None else 0)
    x, att = x.to(fed.device), att.to(fed.device)
    if fed.cfg.identity_layer == "embedding":
        return fed.model.lm.embed_tokens(x).float(), att.float()
    with fed.autocast():
        return fed.model.hidden_states(x, attention_mask=att).float(), att.float()


def lm_features(fed, chunk) -> torch.Tensor:
    """The fallback f(x): the base LM's states mean-pooled over the instruction, adapters off (B, C); identity_center
    centres them on the mean state of REFERENCE_TEXTS and L2-normalises them first."""
    if fed.has_lora:
        lora.disable_lora(fed.model)
    h, att = lm_states(fed, [ex.instruction for ex in chunk])                    # (B, T, C), (B, T)
    if fed.cfg.identity_center:
        if fed.lm_reference is None:
            r, ra = lm_states(fed, REFERENCE_TEXTS)
            fed.lm_reference = r[ra.bool()].mean(0)                               # (C,)
        h = F.normalize(h - fed.lm_reference, dim=-1)
    return ((h * att[..., None]).sum(1) / att.sum(1, keepdim=True)).cpu()


def text_features(fed, chunk) -> torch.Tensor:
    return clip_text_features(fed, chunk) if fed.text_encoder is not None else lm_features(fed, chunk)


def text_image_features(fed, chunk) -> torch.Tensor:
    """--identity text+image (ablation): [f_text(x), f_image(x)], the shorter zero-padded to the longer; compared
    through identity_space."""
    t, i = text_features(fed, chunk), image_features(fed, chunk)
    d = max(t.shape[1], i.shape[1])
    return torch.cat([F.pad(t, (0, d - t.shape[1])), F.pad(i, (0, d - i.shape[1]))], dim=1)


def identity_space(x: torch.Tensor, cfg) -> torch.Tensor:
    """Tokens, keys or features (..., D) as DKO and SSA compare them by cosine. With --identity text+image each half
    is normalised and scaled by 1/√2, so that cos = (cos_text + cos_image) / 2: the official ablation's mean of the
    text and image similarities [official: model_aggregation.py, commented out]. Otherwise x itself."""
    if cfg.identity != "text+image":
        return x
    return F.normalize(x.unflatten(-1, (2, -1)), dim=-1, eps=1e-12).flatten(-2) / 2 ** 0.5


@torch.no_grad()
def identity_features(fed, examples, batch_size: int = 32) -> torch.Tensor:
    """f(x) of each example, (N, D) float32: the CLIP text tower's (the paper's), the base LM's (fallback), the
    image's or both (ablations, last section)."""
    was_training = fed.model.training
    fed.model.eval()
    f = {"image": image_features, "text+image": text_image_features}.get(fed.cfg.identity, text_features)
    try:
        out = [f(fed, examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    finally:
        fed.model.train(was_training)
    return torch.cat(out, 0) if out else torch.zeros(0)


def identity_token(fed, examples, stage: int, rnd: int, client: int) -> torch.Tensor:
    """Client k's identity token μ_k = (1/n_k) Σ_i f(x_i), the mean feature of its instructions (D,); under DP
    clipped and noised on the client (`private_token`, last section)."""
    mu = identity_features(fed, examples, max(1, fed.cfg.batch_size)).mean(0)
    return private_token(mu, fed.cfg, stage, rnd, client) if fed.cfg.dp_clip else mu


def client_tokens(fed, ctx: Round) -> tuple[dict[int, tuple[torch.Tensor, int]], dict[int, str]]:
    """The round's tokens, uploaded before training: ({position: (μ_k, n_k)} of every rank, {position: reason} for the
    non-finite ones, which are left out)."""
    mus = fed.gather({p: (identity_token(fed, xs, ctx.stage, ctx.rnd, ctx.clients[p]), len(xs))
                      for p, xs in ctx.data.items() if xs})
    bad = {p: "non-finite identity feature" for p, (mu, _) in mus.items() if not torch.isfinite(mu).all()}
    return {p: t for p, t in mus.items() if p not in bad}, bad


# ----------------------------------------------------------------------------------------------------
# 2. dynamic knowledge organisation (DKO): a token matches key j if cos(μ_k, key_j) ≥ τ; the unmatched
#    tokens cluster among themselves (cos ≥ τ) and each cluster opens an empty subspace


THRESH_EPS = 1e-6   # cos is compared as cos >= tau - 1e-6 so that "exactly tau" matches despite rounding


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix (Na, Nb) in float64."""
    a = F.normalize(a.double(), dim=-1, eps=1e-12)
    b = F.normalize(b.double(), dim=-1, eps=1e-12)
    return a @ b.T


def _centroid(mu: torch.Tensor, n: list[float], members: list[int]) -> torch.Tensor:
    """Sample-weighted mean of the members' identity tokens, float64."""
    w = torch.tensor([float(n[k]) for k in members], dtype=torch.float64)
    return (w[:, None] * mu[members].double()).sum(0) / w.sum()


def _greedy_clusters(members: list[int], sim: torch.Tensor, tau: float) -> list[list[int]]:
    """Client i opens a cluster with every not-yet-clustered j with cos(μ_i, μ_j) ≥ τ, in client order (the
    official code does not skip clustered j, so its clusters can overlap)."""
    clusters, visited = [], set()
    for i in members:
        if i not in visited:
            c = [i] + [j for j in members if j != i and j not in visited and float(sim[i, j]) >= tau - THRESH_EPS]
            visited |= set(c)
            clusters.append(c)
    return clusters


def _nearest(target: torch.Tensor, candidates: list[tuple]) -> tuple[object, float]:
    """(label, cos) of the candidate (label, vector) most similar to target."""
    sims = _cos(target[None], torch.stack([v.double() for _, v in candidates]))[0]
    return candidates[int(sims.argmax())][0], float(sims.max())


def organize(mu: torch.Tensor, n: list[float], keys: torch.Tensor, sizes: torch.Tensor, tau: float = 0.9,
             small_client: float = 1e-3, on_full: str = "error", info: dict | None = None):
    """DKO: the subspace of each of the round's clients (tokens mu (N, D), sample counts n), given the keys
    (K, D) and sizes (K,) (a subspace is empty iff its size is 0). A client takes the key it matches; the others cluster
    and each cluster opens an empty subspace; a client below `small_client` of the round's samples joins the nearest
    key or cluster instead. More clusters than empty subspaces: CapacityError, or on_full="nearest" (last section; the
    merges in info["merged_on_full"]). Returns (subspace per client, subspaces opened in order)."""
    used = [j for j in range(keys.shape[0]) if float(sizes[j]) > 0]
    slot = [-1] * mu.shape[0]
    if used:
        best, arg = _cos(mu, keys[used]).max(dim=1)                  # (N,) against the global keys
        slot = [used[int(a)] if float(b) >= tau - THRESH_EPS else -1 for b, a in zip(best, arg)]
    tot = float(sum(n))
    unmatched = [i for i in range(mu.shape[0]) if slot[i] < 0]
    small = [i for i in unmatched if tot > 0 and n[i] / tot < small_client]
    sim = _cos(mu, mu)
    small_set = set(small)
    clusters = _greedy_clusters([i for i in unmatched if i not in small_set], sim, tau)
    cands = [(("key", j), keys[j]) for j in used] + [(("cluster", c), _centroid(mu, n, m))
                                                    for c, m in enumerate(clusters)]
    joined = {}                        # small client -> ("key", subspace) or ("cluster", index)
    for i in small:
        if cands:
            joined[i] = _nearest(mu[i].double(), cands)[0]
    clusters += _greedy_clusters([i for i in small if i not in joined], sim, tau)
    cslot, opened, merged = _open_subspaces(clusters, mu, n, keys, sizes, used, tau, on_full)
    for c, members in enumerate(clusters):
        for i in members:
            slot[i] = cslot[c]
    for i, (kind, idx) in joined.items():
        slot[i] = idx if kind == "key" else cslot[idx]
    if merged:
        logger.warning("DISCO: no free subspace for %d cluster(s); joined the nearest: %s", len(merged), merged)
    if info is not None:
        info["merged_on_full"] = merged
    return slot, opened


def _open_subspaces(clusters, mu, n, keys, sizes, used, tau, on_full):
    """Each new cluster opens the next empty subspace. Returns (subspace per cluster, opened, merges on_full)."""
    free = [j for j in range(keys.shape[0]) if float(sizes[j]) <= 0]
    if len(clusters) > len(free):
        if on_full != "nearest":
            raise CapacityError(
                f"DISCO needs {len(clusters)} new subspace(s) this round but only {len(free)} of "
                f"K={keys.shape[0]} are free (tau={tau}). More distinct tasks arrived than subspaces: raise "
                f"--subspaces (and --rank with it), lower --tau, or let overflowing clusters join their nearest "
                f"subspace (--on-full nearest).")
        return _join_nearest_on_full(clusters, free, mu, n, keys, used)
    cslot = dict(zip(range(len(clusters)), free))
    return cslot, list(cslot.values()), []


def match(mus: dict[int, tuple[torch.Tensor, int]], keys, sizes, cfg, ctx: Round) -> tuple[dict, list[int], dict]:
    """`organize` for the positions of `mus` ({position: (μ_k, n_k)}): ({position: subspace}, the subspaces opened,
    entries for the round log)."""
    pos, info, log = list(mus), {}, {}
    slot, opened = organize(identity_space(torch.stack([mus[p][0] for p in pos]).float(), cfg),
                            [mus[p][1] for p in pos], identity_space(keys, cfg), sizes,
                            cfg.tau, 0.0 if cfg.dp_clip else cfg.small_client, cfg.on_full, info)
    if info["merged_on_full"]:
        log["merged_on_full"] = [dict(d, clients=[pos[i] for i in d["clients"]]) for d in info["merged_on_full"]]
        ctx.say(f"no free subspace; positions joined the nearest: {log['merged_on_full']}")
    for j in opened:
        ctx.say(f"DISCO opened subspace {j} for positions {[p for p, s in zip(pos, slot) if s == j]}")
    return dict(zip(pos, slot)), opened, log


# ----------------------------------------------------------------------------------------------------
# 3. per-subspace aggregation: A_j ← Σ_{k∈C_j} n_k A_j^(k) / Σ_{k∈C_j} n_k (B_j alike, A and B separately)


def aggregate_subspaces(fed, kept: list[Upload]) -> bool:
    """ Each subspace j over the clients C_j that trained it, the projector over all (the engine's FedAvg, or
    its server optimizer, per group); returns whether the update was finite and applied."""
    by_slot: dict[int, list[Upload]] = {}
    for u in kept:
        by_slot.setdefault(u.slot, []).append(u)
    return fed.aggregate([(fed.slot_names(j), us) for j, us in sorted(by_slot.items())] + [(fed.proj_names, kept)])


# ----------------------------------------------------------------------------------------------------
# 4. the key update


def update_keys(keys: torch.Tensor, sizes: torch.Tensor, slot: list[int], mu: torch.Tensor, n: list[float]):
    """ key_j ← (size_j · key_j + Σ_{k→j} n_k μ_k) / (size_j + Σ_{k→j} n_k), size_j ← size_j + Σ_{k→j} n_k, in
    place (the official code's precedence bug multiplies an existing key by its size instead)."""
    for j in sorted(set(slot)):
        if j < 0:
            continue
        idx = [i for i, s in enumerate(slot) if s == j]
        w = torch.tensor([float(n[i]) for i in idx], dtype=torch.float64)
        tot = float(w.sum())
        if tot <= 0:
            continue
        s = (w[:, None] * mu[idx].double()).sum(0)
        old = float(sizes[j])
        keys[j] = ((old * keys[j].double() + s) / (old + tot)).to(keys.dtype)
        sizes[j] = old + tot


# ----------------------------------------------------------------------------------------------------
# 5. subspace selective activation (SSA): α = softmax(cos(f(x), keys) / ε), ε = 0.05, per test sample;
#    lora.set_routing then computes y = W x + s Σ_j α_j B_j A_j x


def route(features, keys, mode="softmax", temperature=0.05, valid=None) -> torch.Tensor:
    """SSA: α (B, K) in fp32 from features (B, D) or (D,) and keys (K, D), softmax(cos(f, key_j) / ε) over the
    `valid` (K,) subspaces, 0 for the others (all 0 if none is valid); ε = temperature. Other modes: ablations (last
    section)."""
    f = torch.as_tensor(features).float()
    if f.dim() == 1:
        f = f[None]
    k = torch.as_tensor(keys).float().to(f.device)
    if f.shape[-1] != k.shape[-1]:
        raise ValueError(f"feature dim {f.shape[-1]} != key dim {k.shape[-1]}")
    v = torch.ones(k.shape[0], dtype=torch.bool, device=f.device) if valid is None else \
        torch.as_tensor(valid, dtype=torch.bool, device=f.device)
    s = F.normalize(f, dim=-1) @ F.normalize(k, dim=-1).t()         # (B, K); a zero key gives s = 0
    if mode != "softmax":
        return ablation_weights(s, v, mode)
    if not bool(v.any()):
        return torch.zeros_like(s)
    return torch.softmax((s / temperature).masked_fill(~v, float("-inf")), dim=-1)


def routing_accuracy(alpha_of, slot_data: dict[int, dict[str, float]], examples_by_task: dict):
    """The fraction of test examples whose argmax α (alpha_of(examples) -> (B, K)) is the subspace that trained most
    of their dataset's samples; and that fraction per task. (None, {}) before any training."""
    owner = {}
    for j, d in slot_data.items():
        for ds, c in d.items():
            if c > owner.get(ds, (-1, 0))[1]:
                owner[ds] = (j, c)
    hit = tot = 0
    per_task = {}
    for task, exs in examples_by_task.items():
        exs = [e for e in exs if e.dataset in owner]
        if exs:
            got = alpha_of(exs).argmax(-1).tolist()
            h = sum(int(g == owner[e.dataset][0]) for g, e in zip(got, exs))
            per_task[str(task)] = h / len(exs)
            hit, tot = hit + h, tot + len(exs)
    return (hit / tot if tot else None), per_task


# ----------------------------------------------------------------------------------------------------
# DISCO's unit of the method protocol (methods.Finetune's hooks)


class DISCO(Finetune):
    """DKO assigns each client a subspace before training (1, 2), each subspace is aggregated over its own clients
    and the keys follow (3, 4); inference mixes the subspaces per sample (5). Keys and sizes persist across stages."""
    subspaces, releases_identity = True, True

    def __init__(self, fed):
        super().__init__(fed)
        self.keys: torch.Tensor | None = None                                  # (K, D), created by the first match
        self.sizes = torch.zeros(self.cfg.subspaces, dtype=torch.float64)      # (K,) samples behind each key
        self.mus: dict[int, tuple[torch.Tensor, int]] = {}                     # the round's {position: (μ_k, n_k)}
        self.opened: list[int] = []                                            # subspaces opened this round
        self.pos_slot: dict = {}                          # {"stage": s, "<position>": subspace} (assign="round0")
        self.open_order: list[int] = []                   # subspaces in the order they were first trained
        self.slot_data: dict[int, dict[str, int]] = {}    # subspace -> {dataset: samples it trained on}

    def assign(self, ctx: Round) -> Assignment:
        """Tokens up, a subspace down, before training; a position matched in round 0 of a stage keeps its subspace
        through the stage (the official schedule; --assign every_round re-matches every round)."""
        self.mus, bad = client_tokens(self.fed, ctx)
        self.mus = released_counts(self.mus, self.cfg)
        if ctx.rnd == 0 or self.pos_slot.get("stage") != ctx.stage:
            self.pos_slot = {"stage": ctx.stage}
        slots = reused_slots(self.pos_slot, self.mus, ctx, self.cfg.assign)
        new, self.opened, log = {p: t for p, t in self.mus.items() if p not in slots}, [], {}
        if new:
            if self.keys is None:
                self.keys = torch.zeros(self.fed.K, next(iter(new.values()))[0].shape[0])
                check_private_matching(self.cfg, self.keys.shape[1])
            got, self.opened, log = match(new, self.keys, self.sizes, self.cfg, ctx)
            slots |= got
            self.pos_slot |= {str(p): s for p, s in got.items() if str(p) not in self.pos_slot}
            orthogonalize_opened(self)
        log |= {"assignments": {str(p): s for p, s in sorted(slots.items())}, "opened": self.opened}
        return Assignment(dict(sorted(slots.items())), bad, {p: mu.numel() * 4 for p, (mu, _) in self.mus.items()},
                          log | {"active_subspaces": self.used()})

    def aggregate(self, ctx, kept):
        for u in kept:
            tally(self.slot_data.setdefault(u.slot, {}), u.datasets)
        if not aggregate_subspaces(self.fed, kept):
            return {"aggregation_skipped": NOT_FINITE, "active_subspaces": self.used()}
        mu, n = torch.stack([self.mus[u.position][0] for u in kept]).float(), [self.mus[u.position][1] for u in kept]
        update_keys(self.keys, self.sizes, [u.slot for u in kept], mu, n)
        for j in self.opened + [u.slot for u in kept]:          # a subspace opens when it is first trained
            if float(self.sizes[j]) > 0 and j not in self.open_order:
                self.open_order.append(j)
        reorthogonalize(self, kept)
        return {"active_subspaces": self.used()}

    def used(self) -> list[int]:
        return [j for j in range(self.fed.K) if float(self.sizes[j]) > 0]

    def end_stage(self, stage):
        return {"keys_used": self.used(), "slot_data": {str(k): v for k, v in self.slot_data.items()}}

    def routing_weights(self, features: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        if self.keys is None:
            return torch.zeros(features.shape[0], self.fed.K)
        return route(identity_space(features, self.cfg), identity_space(self.keys, self.cfg), mode or self.cfg.routing,
                     self.cfg.temperature, valid=self.sizes > 0)

    def prepare_inference(self, examples):
        return self.routing_weights(identity_features(self.fed, examples, batch_size=32))

    def routing_accuracy(self, examples_by_task):
        if self.keys is None or not self.slot_data:
            return None
        alpha_of = lambda exs: self.routing_weights(identity_features(self.fed, exs), mode="softmax")
        acc, self.per_task = routing_accuracy(alpha_of, self.slot_data, examples_by_task)
        return acc

    def export(self):
        extra = {} if self.keys is None else {"identity_keys": self.keys, "identity_sizes": self.sizes.float()}
        used = (self.sizes > 0).float()
        return extra, (used / used.sum().clamp(min=1) if self.fed.K > 1 else None)

    def restore(self, extra, meta):
        self.keys, self.sizes = extra["identity_keys"].float().clone(), extra["identity_sizes"].double().clone()

    def state(self):
        return {"sizes": self.sizes} | ({} if self.keys is None else {"keys": self.keys}), {
            "open_order": self.open_order, "pos_slot": self.pos_slot,
            "slot_data": {str(k): v for k, v in self.slot_data.items()}}

    def load_state(self, tensors, meta):
        self.keys = tensors["keys"].clone() if "keys" in tensors else None
        self.sizes = tensors["sizes"].clone().double()
        self.open_order, self.pos_slot = list(meta["open_order"]), dict(meta["pos_slot"])
        self.slot_data = {int(k): v for k, v in meta["slot_data"].items()}


# ----------------------------------------------------------------------------------------------------
# ABLATIONS AND DIFFERENTIAL PRIVACY, off by default: --identity image, --assign every_round (and round0's reuse),
# --on-full nearest, --routing argmax|concat|cosine, --orthogonal-subspaces; the identity tokens' noise under --dp-clip


def image_features(fed, chunk) -> torch.Tensor:
    """--identity image: f(x) = CLIP's image embedding visual_projection(post_layernorm(CLS)) (B, 768 for
    ViT-L/14-336) from the --text-encoder CLIPModel [official: clip_encoder.py, CLIPVisionModelWithProjection's
    image_embeds]. Without a --text-encoder (a fallback, as lm_features is for text): the VLM's own tower's last-layer
    states, mean-pooled (B, D_v)."""
    clip = fed.text_encoder[0].image_tower if fed.text_encoder is not None else None
    if clip is not None and all(ex.image for ex in chunk):
        px = clip.processor([data.load_image(ex.image, ex) for ex in chunk])
        return clip(px.to(clip.visual_projection.weight.device)).float().cpu()
    px = fed.pixels(chunk) if clip is None else None
    if px is None:
        raise ValueError(f"--identity {fed.cfg.identity} needs an image in every example")
    with fed.autocast():
        return fed.model.vision(px)[-1].float().mean(1).cpu()


def reused_slots(pos_slot: dict, mus: dict, ctx: Round, assign: str) -> dict[int, int]:
    """The positions that keep the subspace they were matched to in round 0 of the stage (assign="round0", the
    official schedule); none with --assign every_round, which re-matches every position every round."""
    if assign != "round0" or ctx.rnd == 0:
        return {}
    return {p: pos_slot[str(p)] for p in mus if str(p) in pos_slot}


def _join_nearest_on_full(clusters, free, mu, n, keys, used):
    """--on-full nearest: the largest clusters open the free subspaces, each other joins its nearest key or newly
    opened cluster. Returns (subspace per cluster, opened, merges)."""
    order = sorted(range(len(clusters)), key=lambda c: -sum(n[i] for i in clusters[c]))
    keep, overflow = sorted(order[:len(free)]), order[len(free):]
    cslot = dict(zip(keep, free))
    opened = [cslot[c] for c in keep]
    merged = []
    for c in overflow:
        cands = [(j, keys[j]) for j in used] + [(cslot[k], _centroid(mu, n, clusters[k])) for k in keep]
        cslot[c], cos = _nearest(_centroid(mu, n, clusters[c]), cands)
        merged.append({"clients": list(clusters[c]), "slot": cslot[c], "cos": round(cos, 4)})
    return cslot, opened, merged


def ablation_weights(s: torch.Tensor, valid: torch.Tensor, mode: str) -> torch.Tensor:
    """The paper's SSA ablations from the cosines s (B, K): "concat" all ones, "cosine" s itself, "argmax" one-hot,
    each over the valid subspaces only."""
    if mode == "concat":
        return valid.float().expand(*s.shape).clone()
    if mode == "cosine":
        return s * valid.float()
    if not bool(valid.any()):
        return torch.zeros_like(s)
    if mode == "argmax":
        return F.one_hot(s.masked_fill(~valid, float("-inf")).argmax(-1), s.shape[1]).float()
    raise ValueError(f"unknown routing mode {mode!r} (softmax|argmax|concat|cosine)")


def orthogonalize(fed, j: int, old: list[int]):
    """--orthogonal-subspaces: hard-orthogonalise subspace j's A against the old subspaces' A (QR), in the model and
    the global state."""
    fed.load({n: fed.global_state[n] for n in fed.lora_names})
    lora.orthogonalize_subspace(fed.model, j, old)
    for n in fed.slot_names(j):
        fed.global_state[n] = fed.params[n].detach().to("cpu", copy=True)


def orthogonalize_opened(method: DISCO):
    """Each subspace opened this round, against every subspace opened before."""
    for j in method.opened:
        old = [o for o in method.open_order if o != j]
        if method.cfg.orthogonal_subspaces and old:
            orthogonalize(method.fed, j, old)


def reorthogonalize(method: DISCO, kept: list[Upload]):
    """After an aggregation, each trained subspace again against those opened before it."""
    if method.cfg.orthogonal_subspaces:
        for j in sorted({u.slot for u in kept}):
            old = method.open_order[:method.open_order.index(j)] if j in method.open_order else []
            if old:
                orthogonalize(method.fed, j, old)


def identity_noise(cfg) -> float:
    """σ_id: --dp-identity-noise, default --dp-noise."""
    return cfg.dp_identity_noise if cfg.dp_identity_noise is not None else cfg.dp_noise


def private_token(mu: torch.Tensor, cfg, stage: int, rnd: int, client: int) -> torch.Tensor:
    """Under DP (--dp-clip) the client clips its token to unit norm and adds N(0, σ_id²) per coordinate, keyed by
    (seed, stage, round, client); the accountant counts it."""
    return mu / max(1.0, float(mu.norm())) + privacy.gaussian(
        mu.shape, identity_noise(cfg), privacy.noise_generator(cfg.seed, stage, rnd, client, 0xD2))


def released_counts(mus: dict[int, tuple[torch.Tensor, int]], cfg) -> dict[int, tuple[torch.Tensor, int]]:
    """Under DP a client sends its noised token and no sample count: each weighs 1, so the key update averages
    tokens, sizes count client-rounds, centroids and --on-full's order count clients (the small-client rule is off)."""
    return {p: (mu, 1) for p, (mu, _) in mus.items()} if cfg.dp_clip else mus


def check_private_matching(cfg, dim: int):
    """Two noised copies of one unit D-d token have a cosine of about 1/(1 + D σ_id²), at best; below τ no token
    matches another or a key and every client opens a subspace: refused up front with --on-full error, else warned
    (measured: tools/dp_identity_noise.py, docs/protocol.md)."""
    sigma = identity_noise(cfg)
    if not cfg.dp_clip or 1 / (1 + dim * sigma ** 2) >= cfg.tau:
        return
    msg = (f"DISCO under DP: {dim}-d identity tokens with N(0, {sigma:g}^2) noise per coordinate (--dp-identity-noise, "
           f"default --dp-noise) have a cosine of about {1 / (1 + dim * sigma ** 2):.3f} even for one task, below "
           f"--tau {cfg.tau}, so no client matches; matching needs --dp-identity-noise <= "
           f"{math.sqrt((1 / cfg.tau - 1) / dim):.3g} (a far larger epsilon)")
    if cfg.on_full == "error":
        raise UsageError(msg + "; or pass --on-full nearest to merge into the nearest subspace when they run out")
    logger.warning("%s; every cluster beyond the free subspaces joins its nearest (--on-full nearest)", msg)
