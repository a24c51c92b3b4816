"""The continual methods, each a small unit of hooks the engine (federate.Federation) calls. Finetune defines
every hook; the others override only where they differ from it. METHODS is the one list of names."""
from __future__ import annotations

import torch

import lora
import privacy
import server
from identity import identity_features


class Finetune:
    """One LoRA trained sequentially through the stages, FedAvg'ed each round (FCIT's Finetune row)."""
    has_lora, trains, continual, federated = True, True, True, True
    releases_identity = False            # DISCO uploads an identity token (private data under DP)

    def __init__(self, fed):
        self.fed, self.cfg = fed, fed.cfg

    def num_subspaces(self) -> int:
        return 1

    def setup(self, generator):
        """After the LoRA layers are built (MoELoRA adds its routers)."""

    def stages(self, n_stages: int) -> int:
        return n_stages

    def rounds(self) -> int:
        return self.cfg.rounds

    def local_epochs(self) -> float:
        return self.cfg.local_epochs

    def select(self, stage, rnd) -> list[int]:
        return server.sample_clients(self.cfg.clients, self.cfg.clients_per_round, self.cfg.seed, stage, rnd,
                                     self.cfg.client_sampling)

    def client_data(self, get, position, client):
        return get(position, client)

    def assign(self, stage, rnd, sel, datas, dropped, rec, say) -> dict[int, int]:
        """The subspace each position trains this round."""
        return {p: 0 for p in range(len(sel))}

    def trained(self, slot) -> list[str]:
        """The LoRA tensors a client of `slot` trains and uploads."""
        return self.fed.slot_names(slot)

    def shared(self, slot) -> list[str]:
        """The trained LoRA tensors a client uploads and the server aggregates (the rest it keeps)."""
        return self.trained(slot)

    def downloads(self, slot) -> set[str]:
        """The LoRA tensors a client of `slot` needs from the server."""
        return set(self.shared(slot))

    def upload_extra(self, position) -> int:
        return 0

    def download_extra(self, names) -> int:
        return 0

    def configure(self, slot, train: bool):
        lora.set_active(self.fed.model, slot if train else None)

    def penalty(self, names, slot):
        return None

    def start_state(self, client):
        return None

    def after_local_train(self, examples, names, rnd) -> dict:
        """Extra tensors a client uploads after training, {name: tensor}."""
        return {}

    def aggregate(self, stage, rnd, kept, rec, say):
        if not self.fed.aggregate_uploads(kept, lambda s: say(f"stage {stage + 1} round {rnd + 1}: {s}")):
            rec["aggregation_skipped"] = "non-finite aggregate"

    def end_stage(self, stage) -> dict:
        return {}

    def eval_clients(self) -> list:
        return [None]

    def weights_for(self, client) -> dict:
        return self.fed.global_state

    def personal_datasets(self) -> dict[int, dict[str, int]]:
        """Personalized methods: {client: {dataset: samples it trained on}}, so that each client's own model is also
        scored on its own tasks; empty for a method with one global model."""
        return {}

    def prepare_inference(self, examples):
        """Put the LoRA layers in inference mode; per-example routing weights, or None."""
        self.configure(None, False)
        return None

    def routing_accuracy(self, examples_by_task):
        return None

    def export(self):
        """(extra tensors, PEFT routing α or None) of the stage adapter, or None when there is nothing to save."""
        return {}, (torch.ones(self.fed.K) / self.fed.K if self.fed.K > 1 else None)

    def restore(self, extra: dict, meta: dict):
        """What inference needs from a saved stage adapter (`export`'s extra tensors and its metadata)."""

    def state(self) -> tuple[dict, dict]:
        return {}, {}

    def load_state(self, tensors: dict, meta: dict):
        pass


class FedIT(Finetune):
    """FedIT / Shepherd: one LoRA and the aggregator, in one stage (Zhang et al. 2023)."""


class ZeroShot(Finetune):
    """The base model, no training."""
    has_lora, trains = False, False

    def rounds(self):
        return 1

    def prepare_inference(self, examples):
        return None

    def export(self):
        return None


class MTL(Finetune):
    """The centralised upper bound: one joint training on every stage's pooled data, as one client for
    mtl_epochs (the federated methods' budget), evaluated once (Last only)."""
    continual, federated = False, False

    def stages(self, n_stages):
        return 1

    def rounds(self):
        return 1

    def local_epochs(self):
        return self.cfg.mtl_epochs

    def select(self, stage, rnd):
        return [-1]

    def client_data(self, get, position, client):
        return get(None, None)


class Local(Finetune):
    """FedIT's local baseline: every client trains its own adapter alone; evaluation averages over clients, and
    each client's adapter is also scored on the tasks it trained on."""

    def __init__(self, fed):
        super().__init__(fed)
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.trained_on: dict[int, dict[str, int]] = {}              # client -> {dataset: samples trained}

    def start_state(self, client):
        return self.states.get(client)

    def keep(self, u, state):
        """Client u keeps `state` (its own tensors) and counts the datasets it has trained on."""
        self.states[u["client"]] = state
        seen = self.trained_on.setdefault(u["client"], {})
        for ds, c in u["datasets"].items():
            seen[ds] = seen.get(ds, 0) + c

    def aggregate(self, stage, rnd, kept, rec, say):
        for u in kept:
            self.keep(u, u["state"])

    def eval_clients(self):
        return sorted(self.states)

    def weights_for(self, client):
        if client is None:
            raise ValueError("method 'local' evaluates one client at a time: predict(..., client=id)")
        return self.states.get(client, self.fed.global_state)

    def personal_datasets(self):
        return {c: dict(d) for c, d in sorted(self.trained_on.items())}

    def export(self):
        return None

    def state(self):
        return ({f"{c}/{n}": v for c, st in self.states.items() for n, v in st.items()},
                {"trained_on": {str(c): d for c, d in self.trained_on.items()}})

    def load_state(self, tensors, meta):
        self.states = {}
        self.trained_on = {int(c): dict(d) for c, d in meta.get("trained_on", {}).items()}
        for k, v in tensors.items():
            c, n = k.split("/", 1)
            self.states.setdefault(int(c), {})[n] = v


class FedSA(Local):
    """FedSA-LoRA (Guo et al., ICLR 2025): A is shared and FedAvg'ed, B stays on its client (personalization);
    a client trains from the global A and its own B. Evaluation averages over the clients' models (global A + own
    B) on the global test sets, and scores each client's model on its own tasks."""

    def shared(self, slot):
        return [n for n in self.trained(slot) if ".A." in n]

    def aggregate(self, stage, rnd, kept, rec, say):
        Finetune.aggregate(self, stage, rnd, kept, rec, say)
        for u in kept:
            self.keep(u, u["local"])

    def weights_for(self, client):
        return {**self.fed.global_state, **super().weights_for(client)}


class EWC(Finetune):
    """Finetune + λ/2 Σ F (w − w*)² (Kirkpatrick et al. 2017): F the diagonal empirical Fisher of each stage's
    last round (per-sample gradients, sample-weighted over clients) summed over stages, w* the stage's end."""

    def __init__(self, fed):
        super().__init__(fed)
        self.F, self.star, self.stage_fisher, self._on_device = {}, {}, {}, None

    def penalty(self, names, slot):
        if not self.F or self.cfg.ewc_lambda <= 0:
            return None
        if self._on_device is None:
            self._on_device = {n: (self.F[n].to(self.fed.device), self.star[n].to(self.fed.device)) for n in self.F}
        p = self.fed._params
        return self.cfg.ewc_lambda / 2 * sum((f * (p[n] - w) ** 2).sum()
                                             for n, (f, w) in self._on_device.items() if n in names)

    def after_local_train(self, examples, names, rnd):
        return self.fisher(examples, names) if rnd == self.rounds() - 1 else {}

    def fisher(self, examples, names) -> dict[str, torch.Tensor]:
        """F = (1/N) Σ_i (∂ℓ_i/∂w)², ℓ_i the mean token loss of sample i alone, at the client's final weights,
        dropout off (an exact batch-of-1 loop; a batch-mean gradient would underestimate it)."""
        fed, model = self.fed, self.fed.model
        lora.set_active(model, 0)
        for n in names:
            fed._params[n].requires_grad_(True)
        out = {n: torch.zeros_like(fed._params[n], dtype=torch.float32) for n in names}
        model.eval()
        for ex in examples:
            model.zero_grad(set_to_none=True)
            with fed.autocast():
                loss = model.loss(**fed._collate([ex]))
            loss.float().backward()
            for n in names:
                if fed._params[n].grad is not None:
                    out[n] += fed._params[n].grad.detach().float() ** 2
        model.zero_grad(set_to_none=True)
        return {n: (f / max(1, len(examples))).cpu() for n, f in out.items()}

    def download_extra(self, names):
        return 2 * server.nbytes({n: t for n, t in self.F.items() if n in names})

    def aggregate(self, stage, rnd, kept, rec, say):
        super().aggregate(stage, rnd, kept, rec, say)
        with_f = [u for u in kept if u["extra"]]            # the stage's last round uploads a Fisher
        tot = sum(u["n"] for u in with_f)
        for u in with_f:
            for n, f in u["extra"].items():
                self.stage_fisher[n] = self.stage_fisher.get(n, 0) + f * (u["n"] / tot)

    def end_stage(self, stage):
        if not self.stage_fisher:
            return {}
        for n, f in self.stage_fisher.items():
            self.F[n] = self.F.get(n, torch.zeros_like(f)) + f
            self.star[n] = self.fed.global_state[n].clone().float()
        self.stage_fisher, self._on_device = {}, None
        return {"fisher_mean": float(torch.cat([f.flatten() for f in self.F.values()]).mean())}

    def state(self):
        t = {f"F/{n}": v for n, v in self.F.items()} | {f"star/{n}": v for n, v in self.star.items()}
        return t | {f"stage/{n}": v for n, v in self.stage_fisher.items()}, {}

    def load_state(self, tensors, meta):
        sub = lambda p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
        self.F, self.star, self.stage_fisher, self._on_device = sub("F/"), sub("star/"), sub("stage/"), None


class OLoRA(Finetune):
    """A new subspace per stage, trained with the frozen earlier ones in the forward pass and the penalty
    λ1 Σ |A_old A_newᵀ| (Wang et al. 2023); inference sums the subspaces used so far."""

    def __init__(self, fed):
        super().__init__(fed)
        self.stage_slot: dict[int, int] = {}

    def num_subspaces(self):
        return self.cfg.subspaces

    def slot(self, stage):
        if stage >= self.fed.K:
            raise server.CapacityError(f"O-LoRA opens one subspace per stage; stage {stage + 1} needs "
                                       f"{stage + 1} > K={self.fed.K} subspaces (raise --subspaces)")
        return stage

    def assign(self, stage, rnd, sel, datas, dropped, rec, say):
        return {p: self.slot(stage) for p in range(len(sel))}

    def downloads(self, slot):
        return set(self.trained(slot)).union(*[self.fed.slot_names(o) for o in range(slot)])

    def configure(self, slot, train):
        super().configure(slot, train)
        if slot and slot > 0:
            lora.set_routing(self.fed.model, torch.tensor([1.0] * (slot + 1) + [0.0] * (self.fed.K - slot - 1)))

    def penalty(self, names, slot):
        if slot == 0 or self.cfg.olora_lambda <= 0:
            return None
        return lora.olora_penalty(self.fed.model, slot, list(range(slot)), weight=self.cfg.olora_lambda)

    def end_stage(self, stage):
        self.stage_slot[stage] = self.slot(stage)
        return {}

    def prepare_inference(self, examples):
        last = {self.slot(self.fed.last[0])} if self.fed.last else set()
        used = set(self.stage_slot.values()) | last
        lora.set_routing(self.fed.model, torch.tensor([1.0 if j in used else 0.0 for j in range(self.fed.K)]))
        return None

    def restore(self, extra, meta):
        self.stage_slot = {s: self.slot(s) for s in range(int(meta.get("stage", 0)) + 1)}

    def state(self):
        return {}, {"stage_slot": {str(k): v for k, v in self.stage_slot.items()}}

    def load_state(self, tensors, meta):
        self.stage_slot = {int(k): v for k, v in meta.get("stage_slot", {}).items()}


class MoELoRA(Finetune):
    """CoIN's rank-split experts with a trainable token router; all experts and routers trained and averaged
    (Chen et al. 2024)."""

    def num_subspaces(self):
        return self.cfg.subspaces

    def setup(self, generator):
        lora.set_moe(self.fed.model, generator=generator)

    def trained(self, slot):
        return list(self.fed.lora_names)

    def configure(self, slot, train):
        lora.set_moe(self.fed.model, trainable=train)


class DISCO(Finetune):
    """DISCO (Guo et al. 2025). DKO: a client's identity token μ_k (its mean instruction feature) is matched
    against the global keys (cos ≥ τ); a miss opens a new subspace; each subspace is FedAvg'ed over its own
    clients and key_j ← (size_j·key_j + Σ n_k μ_k)/(size_j + Σ n_k). SSA: y = Wx + s Σ_j α_j B_j A_j x with
    α = softmax(cos(f(x), keys) / 0.05) per sample."""
    releases_identity = True

    def __init__(self, fed):
        super().__init__(fed)
        self.keys: torch.Tensor | None = None                       # (K, D) identity keys
        self.sizes = torch.zeros(self.cfg.subspaces, dtype=torch.float64)   # samples behind each key
        self.mus: dict[int, tuple] = {}                             # this round: position -> (μ, n)
        self.pos_slot: dict = {}                                    # assign="round0": position -> subspace
        self.open_order: list[int] = []
        self.slot_data: dict[int, dict[str, float]] = {}            # subspace -> {dataset: samples trained}

    def num_subspaces(self):
        return self.cfg.subspaces

    def assign(self, stage, rnd, sel, datas, dropped, rec, say):
        """Identity tokens up, a subspace down, before training: the positions with no subspace yet are matched
        (round 0 of a stage with assign="round0", the official schedule; every round with "every_round")."""
        fed = self.fed
        local = {p: (self._token(datas[p], stage, rnd, sel[p]), len(datas[p])) for p in datas if datas[p]}
        self.mus = fed.gather(local)
        for p in [p for p in self.mus if not bool(torch.isfinite(self.mus[p][0]).all())]:
            dropped.append({"client": sel[p], "position": p, "reason": "non-finite identity feature"})
            del self.mus[p]
        if rnd == 0 or self.pos_slot.get("stage") != stage:
            self.pos_slot = {"stage": stage}
        slots = {p: self.pos_slot[str(p)] for p in self.mus if str(p) in self.pos_slot} \
            if self.cfg.assign == "round0" and rnd > 0 else {}
        pos = [p for p in self.mus if p not in slots]
        if pos:
            slots.update(self._match(pos, stage, rnd, rec, say))
        rec["assignments"] = {str(p): s for p, s in sorted(slots.items())}
        rec["active_subspaces"] = [j for j in range(self.fed.K) if float(self.sizes[j]) > 0]
        return dict(sorted(slots.items()))

    def _token(self, examples, stage, rnd, client) -> torch.Tensor:
        """A client's identity token μ_k, the mean feature of its instructions; under DP clipped to unit norm and
        noised on the client (its own noise multiplier, counted by the accountant)."""
        mu = identity_features(self.fed, examples, max(1, self.cfg.batch_size)).mean(0)
        if self.cfg.dp_clip:
            sigma = self.cfg.dp_identity_noise if self.cfg.dp_identity_noise is not None else self.cfg.dp_noise
            mu = mu / max(1.0, float(mu.norm())) + privacy.gaussian(
                mu.shape, sigma, privacy.noise_generator(self.cfg.seed, stage, rnd, client, 0xD2))
        return mu

    def _match(self, pos, stage, rnd, rec, say) -> dict[int, int]:
        mu = torch.stack([self.mus[p][0] for p in pos]).float()
        if self.keys is None:
            self.keys = torch.zeros(self.fed.K, mu.shape[1])
        info = {}
        asg, opened = server.organize(mu, [self.mus[p][1] for p in pos], self.keys, self.sizes, self.cfg.tau,
                                      self.cfg.small_client, self.cfg.on_full, info)
        if info.get("merged_on_full"):
            rec["merged_on_full"] = [dict(d, clients=[pos[i] for i in d["clients"]]) for d in info["merged_on_full"]]
            say(f"stage {stage + 1} round {rnd + 1}: no free subspace; positions joined the nearest: "
                f"{rec['merged_on_full']}")
        slots = dict(zip(pos, asg))
        for p in pos:
            self.pos_slot.setdefault(str(p), slots[p])
        for j in opened:
            old = [o for o in self.open_order if o != j]
            if self.cfg.orthogonal_subspaces and old:
                self._orthogonalize(j, old)
            say(f"stage {stage + 1} round {rnd + 1}: DISCO opened subspace {j} for positions "
                f"{[p for p in pos if slots[p] == j]}")
        rec["opened"] = opened
        return slots

    def upload_extra(self, position):
        return self.mus[position][0].numel() * 4 if position in self.mus else 0   # the identity token (fp32)

    def aggregate(self, stage, rnd, kept, rec, say):
        super().aggregate(stage, rnd, kept, rec, say)
        if "aggregation_skipped" not in rec:
            pos = [u["position"] for u in kept]
            server.update_keys(self.keys, self.sizes, [u["slot"] for u in kept],
                               torch.stack([self.mus[p][0] for p in pos]).float(), [self.mus[p][1] for p in pos])
            for j in rec["opened"] + [u["slot"] for u in kept]:     # a subspace opens when it is first trained
                if float(self.sizes[j]) > 0 and j not in self.open_order:
                    self.open_order.append(j)
            if self.cfg.orthogonal_subspaces:
                for j in sorted({u["slot"] for u in kept}):
                    old = self.open_order[:self.open_order.index(j)] if j in self.open_order else []
                    if old:
                        self._orthogonalize(j, old)
        for u in kept:
            sd = self.slot_data.setdefault(u["slot"], {})
            for ds, c in u["datasets"].items():
                sd[ds] = sd.get(ds, 0) + c
        rec["active_subspaces"] = [j for j in range(self.fed.K) if float(self.sizes[j]) > 0]

    def _orthogonalize(self, j: int, old: list[int]):
        """Hard-orthogonalise subspace j's A against the old subspaces' A, in the model and the global state."""
        fed = self.fed
        fed._load({n: fed.global_state[n] for n in fed.lora_names})
        lora.orthogonalize_subspace(fed.model, j, old)
        for n in fed.slot_names(j):
            fed.global_state[n] = fed._params[n].detach().to("cpu", copy=True)

    def end_stage(self, stage):
        return {"keys_used": [j for j in range(self.fed.K) if float(self.sizes[j]) > 0],
                "slot_data": {str(k): v for k, v in self.slot_data.items()}}

    def routing_weights(self, features: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """SSA weights α (B, K) in fp32 over the used subspaces; empty ones get exactly 0 (the official code
        gives them an e⁰ share). Ablations: argmax | concat | cosine."""
        if self.keys is None:
            return torch.zeros(features.shape[0], self.fed.K)
        return lora.route(features, self.keys, mode or self.cfg.routing, self.cfg.temperature, valid=self.sizes > 0)

    def prepare_inference(self, examples):
        return self.routing_weights(identity_features(self.fed, examples, batch_size=32))

    def routing_accuracy(self, examples_by_task: dict) -> float | None:
        """The fraction of test examples whose argmax α is the subspace that trained most of their dataset."""
        if self.keys is None or not self.slot_data:
            return None
        owner = {}
        for j, d in self.slot_data.items():
            for ds, c in d.items():
                if c > owner.get(ds, (-1, 0))[1]:
                    owner[ds] = (j, c)
        hit = tot = 0
        self.per_task = {}
        for task, exs in examples_by_task.items():
            exs = [e for e in exs if e.dataset in owner]
            if exs:
                got = self.routing_weights(identity_features(self.fed, exs), mode="softmax").argmax(-1).tolist()
                h = sum(int(g == owner[e.dataset][0]) for g, e in zip(got, exs))
                self.per_task[str(task)] = h / len(exs)
                hit, tot = hit + h, tot + len(exs)
        return hit / tot if tot else None

    def export(self):
        extra = {} if self.keys is None else {"identity_keys": self.keys, "identity_sizes": self.sizes.float()}
        used = (self.sizes > 0).float()
        return extra, (used / used.sum().clamp(min=1) if self.fed.K > 1 else None)

    def restore(self, extra, meta):
        self.keys = extra["identity_keys"].float().clone()
        self.sizes = extra["identity_sizes"].double().clone()

    def state(self):
        t = {"sizes": self.sizes} | ({"keys": self.keys} if self.keys is not None else {})
        return t, {"open_order": self.open_order, "pos_slot": self.pos_slot,
                   "slot_data": {str(k): v for k, v in self.slot_data.items()}}

    def load_state(self, tensors, meta):
        self.keys = tensors["keys"].clone() if "keys" in tensors else None
        self.sizes = tensors["sizes"].clone().double()
        self.open_order = list(meta.get("open_order", []))
        self.pos_slot = dict(meta.get("pos_slot", {}))
        self.slot_data = {int(k): v for k, v in meta.get("slot_data", {}).items()}


METHODS = {"finetune": Finetune, "fedit": FedIT, "zeroshot": ZeroShot, "mtl": MTL, "local": Local, "fedsa": FedSA,
           "ewc": EWC, "olora": OLoRA, "moelora": MoELoRA, "disco": DISCO}
