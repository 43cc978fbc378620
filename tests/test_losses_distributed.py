"""The RzenEmbed loss (and its Matryoshka form) across two gloo ranks equals the
single-process loss on the whole batch.

Two CPU processes each encode half of one batch with the same tiny encoder, compute the loss
(candidates gathered with gradient), back-propagate and average gradients as DDP would. The
mean of their losses and the averaged encoder and temperature gradients must equal what one
process gets on the whole batch. Results travel back to the parent as files in tmp_path.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from rzenembed.config import LossConfig, MatryoshkaConfig, TemperatureConfig
from rzenembed.losses import make_loss

from .multiprocess import gloo_rank, run_ranks

WORLD = 2
BATCH, NEGS, IN_DIM, DIM = 8, 2, 12, 6
GROUPS = ["classification", "qa", "retrieval"]
TOL = 1e-5
JOIN_TIMEOUT_S = 120


def make_inputs() -> dict[str, Tensor]:
    """The global batch of raw inputs, ids and tasks; identical in every process."""
    gen = torch.Generator().manual_seed(1)
    xp = torch.randn(BATCH, IN_DIM, generator=gen, dtype=torch.float64)
    xq = xp + 0.5 * torch.randn(BATCH, IN_DIM, generator=gen, dtype=torch.float64)
    xn = torch.randn(BATCH, NEGS, IN_DIM, generator=gen, dtype=torch.float64)
    # A negative held by rank 1 that nearly duplicates a positive held by rank 0: only the
    # gathered false-negative rule can catch it.
    xn[5, 0] = xp[1] + 0.01 * torch.randn(IN_DIM, generator=gen, dtype=torch.float64)
    positive_ids = torch.arange(BATCH)
    positive_ids[6] = positive_ids[2]  # the same item on both ranks
    negative_ids = torch.arange(100, 100 + BATCH * NEGS).reshape(BATCH, NEGS)
    negative_ids[1, 1] = positive_ids[7]
    group_ids = torch.tensor([3, -1, -1, 4, -1, 3, -1, -1])  # rows 0 and 5 share a label
    negative_group_ids = torch.full((BATCH, NEGS), -1)
    negative_group_ids[6, 0] = 4
    task_index = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    return dict(
        xq=xq,
        xp=xp,
        xn=xn,
        positive_ids=positive_ids,
        negative_ids=negative_ids,
        group_ids=group_ids,
        negative_group_ids=negative_group_ids,
        task_index=task_index,
    )


def make_models(gather: bool = True, nested: bool = False) -> tuple[nn.Linear, nn.Module]:
    """Encoder and loss, identical wherever they are built (fixed seed, float64);
    ``nested``: the Matryoshka loss over prefixes 2, 4 and 6."""
    torch.manual_seed(0)
    encoder = nn.Linear(IN_DIM, DIM).double()
    cfg = LossConfig(
        hardness_alpha=9.0,
        false_negative_delta=0.95,
        false_negative_rule="relative",
        temperature=TemperatureConfig(learnable=True, init=0.05, min=0.01, max=1.0),
        task_groups=GROUPS,
        gather_across_ranks=gather,
        matryoshka=MatryoshkaConfig(dims=[2, 4, DIM], weights=[0.5, 1.0, 1.0]) if nested else None,
    )
    loss = make_loss(cfg).double()
    with torch.no_grad():
        loss.theta.copy_(torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64).log())
    return encoder, loss


def forward_backward(
    encoder: nn.Linear, loss: nn.Module, data: dict[str, Tensor], rows: slice
) -> dict:
    """Encode the given rows, run the loss and back-propagate; returns the loss output."""

    def embed(x: Tensor) -> Tensor:
        return F.normalize(encoder(x), dim=-1)

    out = loss(
        embed(data["xq"][rows]),
        embed(data["xp"][rows]),
        data["task_index"][rows],
        negatives=embed(data["xn"][rows]),
        positive_ids=data["positive_ids"][rows],
        negative_ids=data["negative_ids"][rows],
        group_ids=data["group_ids"][rows],
        negative_group_ids=data["negative_group_ids"][rows],
    )
    out["loss"].backward()
    return out


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    """One rank: half the batch, gradients averaged like DDP, results saved to a file."""
    gloo_rank(_run_rank, rank, port, out_dir, WORLD)


def _rank_main_nested(rank: int, port: int, out_dir: str) -> None:
    """``_rank_main`` with the Matryoshka loss."""
    gloo_rank(functools.partial(_run_rank, nested=True), rank, port, out_dir, WORLD)


def _run_rank(rank: int, nested: bool = False) -> dict:
    data = make_inputs()
    local = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    encoder, loss = make_models(nested=nested)
    out = forward_backward(encoder, loss, data, local)
    grads = [encoder.weight.grad, encoder.bias.grad, loss.theta.grad]
    for grad in grads:
        dist.all_reduce(grad)
        grad /= WORLD
    # The same rows without gathering, to show that gathering is what makes the sums agree.
    enc_local, loss_local = make_models(gather=False, nested=nested)
    local_only = forward_backward(enc_local, loss_local, data, local)["loss"].item()
    return {
        "loss": out["loss"].item(),
        "local_only_loss": local_only,
        "weight_grad": grads[0],
        "bias_grad": grads[1],
        "theta_grad": grads[2],
    }


@pytest.mark.parametrize("nested", [False, True], ids=["full", "matryoshka"])
def test_two_ranks_match_single_process(tmp_path: Path, nested: bool) -> None:
    ranks = run_ranks(_rank_main_nested if nested else _rank_main, WORLD, tmp_path, JOIN_TIMEOUT_S)
    encoder, loss = make_models(nested=nested)
    single = forward_backward(encoder, loss, make_inputs(), slice(None))

    mean_loss = sum(r["loss"] for r in ranks) / WORLD
    assert mean_loss == pytest.approx(single["loss"].item(), abs=TOL)
    assert single["masked_fraction"] > 0  # the batch exercises the masks across ranks
    for name, want in [
        ("weight_grad", encoder.weight.grad),
        ("bias_grad", encoder.bias.grad),
        ("theta_grad", loss.theta.grad),
    ]:
        for rank in ranks:  # all_reduce left every rank with the same average
            torch.testing.assert_close(rank[name], want, atol=TOL, rtol=0)
    assert abs(sum(r["local_only_loss"] for r in ranks) / WORLD - mean_loss) > 1e-3
