from __future__ import annotations

import pytest
import torch

from rzenembed.modeling.pooling import eos_pool, last_token_positions


def test_last_token_positions_under_right_left_and_no_padding():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padded -> 2
            [0, 0, 1, 1, 1],  # left padded -> 4
            [1, 1, 1, 1, 1],  # full -> 4
            [1, 0, 0, 0, 0],  # one token -> 0
        ]
    )
    assert last_token_positions(mask).tolist() == [2, 4, 4, 0]


def test_eos_pool_picks_and_normalises_the_last_attended_state():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    raw = eos_pool(hidden, mask, normalize=False)
    assert torch.equal(raw, torch.stack([hidden[0, 1], hidden[1, 2]]))
    unit = eos_pool(hidden, mask)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(2))
    assert torch.allclose(unit, raw / raw.norm(dim=-1, keepdim=True))


def test_rows_without_tokens_are_an_error():
    with pytest.raises(ValueError, match="at least one attended token"):
        last_token_positions(torch.tensor([[1, 1], [0, 0]]))
