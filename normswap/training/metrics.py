"""Held-out evaluation of a student against its teacher: the figures the before/after report is made of.

Sentence encoders are judged on their mean-pooled embeddings (cosine to the teacher's, and whether each text's
nearest neighbour is still the same text); language models on their next-token / masked-token distributions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normswap.training.losses import causal_labels, cross_entropy, kl_logits, mean_pool


def nearest_neighbour_agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row (cosine) is the same under both embeddings."""
    if student.shape[0] < 2:
        return 1.0

    def nearest(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e.double(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(-1)

    return float((nearest(student) == nearest(teacher)).double().mean())


def _forward(model: nn.Module, batch: dict, device: torch.device):
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return model(**inputs, output_hidden_states=True)


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module, batches: list[dict], family: str, device: torch.device
             ) -> dict[str, float]:
    """Metrics on fixed held-out batches; both models are put in eval mode and restored afterwards."""
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        if family == "sentence-encoder":
            return _encoder_metrics(student, teacher, batches, device)
        return _lm_metrics(student, teacher, batches, device, causal=family == "causal-lm")
    finally:
        student.train(modes[0])
        teacher.train(modes[1])


def _encoder_metrics(student, teacher, batches, device) -> dict[str, float]:
    s_emb, t_emb, tok_cos, tok_n = [], [], 0.0, 0
    for batch in batches:
        mask = batch["attention_mask"].to(device)
        s = _forward(student, batch, device).hidden_states[-1].float()
        t = _forward(teacher, batch, device).hidden_states[-1].float()
        s_emb.append(mean_pool(s, mask).cpu())
        t_emb.append(mean_pool(t, mask).cpu())
        cos = F.cosine_similarity(s, t, dim=-1)
        tok_cos += float((cos * mask).sum())
        tok_n += int(mask.sum())
    s_all, t_all = torch.cat(s_emb), torch.cat(t_emb)
    cos = F.cosine_similarity(s_all.double(), t_all.double(), dim=-1)
    return {
        "examples": int(s_all.shape[0]),
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "nn_agreement": nearest_neighbour_agreement(s_all, t_all),
        "token_cosine": tok_cos / max(tok_n, 1),
    }


def _lm_metrics(student, teacher, batches, device, causal: bool) -> dict[str, float]:
    kl_sum = top1_sum = tokens = 0.0
    ce_s = ce_t = 0.0
    ce_batches = 0
    for batch in batches:
        mask = batch["attention_mask"].to(device)
        s = _forward(student, batch, device).logits.float()
        t = _forward(teacher, batch, device).logits.float()
        n = float(mask.sum())
        kl_sum += float(kl_logits(s, t, mask)) * n
        top1_sum += float(((s.argmax(-1) == t.argmax(-1)).float() * mask).sum())
        tokens += n
        labels = batch.get("labels")
        labels = (causal_labels(batch) if labels is None else labels).to(device)
        if (labels[:, 1:] if causal else labels).ne(-100).any():
            ce_s += float(cross_entropy(s, labels, causal))
            ce_t += float(cross_entropy(t, labels, causal))
            ce_batches += 1
    out = {"tokens": int(tokens), "kl": kl_sum / max(tokens, 1), "top1_agreement": top1_sum / max(tokens, 1)}
    if ce_batches:
        out["student_perplexity"] = float(torch.tensor(ce_s / ce_batches).exp())
        out["teacher_perplexity"] = float(torch.tensor(ce_t / ce_batches).exp())
    return out
