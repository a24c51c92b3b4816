"""DISCO's task identity: one feature vector per instruction, from frozen encoders only. FCIT uses the CLIP text
tower's pooled output (Guo et al. 2025); the base LM's pooled states are a fallback; image features an ablation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import lora

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


def _identity_chunk(fed, chunk) -> torch.Tensor:
    cfg, model = fed.cfg, fed.model
    if cfg.identity == "image":        # ablation: mean-pooled last-layer patch features
        px = fed.pixels(chunk)
        if px is None:
            raise ValueError("identity='image' needs images and an image processor")
        with fed.autocast():
            return model.vision(px)[-1].float().mean(1).cpu()
    if fed.text_encoder is not None:   # the paper's: CLIP text tower, pooled EOS state, unprojected
        tower, ctok = fed.text_encoder
        length = getattr(getattr(tower, "config", None), "max_position_embeddings", 77)
        x, att = _padded([clip_ids(ctok, ex.instruction, length) for ex in chunk],
                         ctok.pad_id if ctok.pad_id is not None else 0)
        dev = next(tower.parameters()).device
        return tower(x.to(dev), attention_mask=att.to(dev), project=False).float().cpu()
    if fed.has_lora:                   # fallback: the frozen base LM, adapters off
        lora.disable_lora(model)
    h, att = lm_states(fed, [ex.instruction for ex in chunk])                    # (B, T, C), (B, T)
    if cfg.identity_center:
        if fed.lm_reference is None:
            r, ra = lm_states(fed, REFERENCE_TEXTS)
            fed.lm_reference = r[ra.bool()].mean(0)                               # (C,)
        h = F.normalize(h - fed.lm_reference, dim=-1)
    return ((h * att[..., None]).sum(1) / att.sum(1, keepdim=True)).cpu()


@torch.no_grad()
def identity_features(fed, examples, batch_size: int = 32) -> torch.Tensor:
    """(N, D) float32 identity features of the examples' instructions (DISCO's task identity): the CLIP text
    tower's pooled output as in FCIT, the base LM's pooled states (fallback) or image features (ablation)."""
    was_training = fed.model.training
    fed.model.eval()
    try:
        out = [_identity_chunk(fed, examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    finally:
        fed.model.train(was_training)
    return torch.cat(out, 0) if out else torch.zeros(0)
