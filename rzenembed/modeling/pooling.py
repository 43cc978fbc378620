"""Pooling of the backbone's last hidden states into one vector per input."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row, under left or right padding.

    With right padding it is ``sum(mask) - 1``; with left padding it is the last column.
    Taking the arg-max of ``mask * position`` covers both (and any mix) in one expression.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got {tuple(attention_mask.shape)}")
    if not bool(attention_mask.any(dim=1).all()):
        raise ValueError("every row needs at least one attended token")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)  # (batch,)


def eos_pool(
    hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """Hidden state of each row's final (EOS) token, as float32, L2-normalised by default."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    pooled = hidden[rows, last_token_positions(attention_mask)].float()  # (batch, dim)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled
