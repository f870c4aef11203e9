"""Distillation losses: pure tensor functions of student outputs, teacher outputs and the attention mask.

All terms are averaged over real (non-padding) tokens, computed in float32 whatever the autocast dtype, and made
scale-free (MSE relative to the teacher's mean square) so that one set of weights works across model sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from normswap.training.recipe import LossSpec


def _token_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(device=like.device, dtype=torch.float32)


def kl_logits(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
              ) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) at ``temperature``, scaled by T² (the usual distillation scale)."""
    t = teacher.float() / temperature
    s = student.float() / temperature
    logp_t = F.log_softmax(t, dim=-1)
    kl = (logp_t.exp() * (logp_t - F.log_softmax(s, dim=-1))).sum(-1)
    m = _token_mask(mask, kl)
    return (kl * m).sum() / m.sum().clamp_min(1) * temperature**2


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, centered: bool) -> torch.Tensor:
    """Σ‖s−t‖² / Σ‖t‖² over real tokens; ``centered`` first removes each vector's mean over the hidden dim."""
    s, t = student.float(), teacher.float()
    if centered:
        s = s - s.mean(-1, keepdim=True)
        t = t - t.mean(-1, keepdim=True)
    m = _token_mask(mask, s).unsqueeze(-1)
    return ((s - t).pow(2) * m).sum() / (t.pow(2) * m).sum().clamp_min(1e-12)


def hidden_mse(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
               mask: torch.Tensor) -> torch.Tensor:
    """Mean over intermediate layers (all but the last hidden state) of the centred relative MSE."""
    pairs = list(zip(student_hidden[:-1], teacher_hidden[:-1], strict=True))
    if not pairs:
        return student_hidden[-1].new_zeros((), dtype=torch.float32)
    return torch.stack([relative_mse(s, t, mask, centered=True) for s, t in pairs]).mean()


def token_cosine_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    m = _token_mask(mask, cos)
    return ((1 - cos) * m).sum() / m.sum().clamp_min(1)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings the sentence-transformers way: the mean of the token vectors over real tokens."""
    m = _token_mask(mask, hidden).unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1)


def pooled_cosine_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(mean_pool(student, mask), mean_pool(teacher, mask), dim=-1)).mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """CE on labels (-100 = ignore); causal models predict the next token, so logits and labels are shifted."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def causal_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def distillation_loss(spec: LossSpec, student_out, teacher_out, batch: dict[str, torch.Tensor], causal: bool
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the enabled terms, and each term's value (for logs)."""
    mask = batch["attention_mask"]
    parts: dict[str, torch.Tensor] = {}
    if spec.kl:
        parts["kl"] = kl_logits(student_out.logits, teacher_out.logits, mask, spec.temperature)
    if spec.hidden_mse:
        parts["hidden_mse"] = hidden_mse(student_out.hidden_states, teacher_out.hidden_states, mask)
    s_final, t_final = student_out.hidden_states[-1], teacher_out.hidden_states[-1]
    if spec.final_mse:
        parts["final_mse"] = relative_mse(s_final, t_final, mask, centered=False)
    if spec.final_cosine:
        parts["final_cosine"] = token_cosine_loss(s_final, t_final, mask)
    if spec.pooled_cosine:
        parts["pooled_cosine"] = pooled_cosine_loss(s_final, t_final, mask)
    if spec.ce:
        labels = batch.get("labels")
        if labels is None:
            labels = causal_labels(batch)
        parts["ce"] = cross_entropy(student_out.logits, labels, causal)
    total = sum(getattr(spec, name) * value for name, value in parts.items())
    return total, {name: float(value.detach()) for name, value in parts.items()}
