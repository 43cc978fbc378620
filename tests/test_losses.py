"""RzenEmbedLoss against a slow loop-by-loop transcription of the loss formula.

The reference below walks over queries and candidates one at a time and evaluates
-log(e^{s+/tau} / (e^{s+/tau} + sum_i w_i e^{s_i/tau})) literally, with w_i a multiplicative
weight, so that it shares no trick (logit bias, masked_fill, cross_entropy) with the module.
Autograd through the loops gives the reference gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from rzenembed.config import LossConfig, TemperatureConfig
from rzenembed.losses import (
    RzenEmbedLoss,
    false_negative_mask,
    hardness_logit_bias,
    same_id_mask,
)

GROUPS = ["classification", "qa", "retrieval"]
TOL = 1e-5


# --------------------------------------------------------------------------- reference


def reference_loss(
    cfg: LossConfig, theta: Tensor, batch: Batch, use_negatives: bool, use_ids: bool
) -> tuple[list[Tensor], int, int]:
    """(per-row losses, masked negatives, would-be negatives), one pair at a time."""
    q, p = batch.query, batch.positive
    cands = reference_candidates(batch, use_negatives)
    rows, masked, would_be = [], 0, 0
    for i in range(q.shape[0]):
        log_theta = theta[int(batch.task_index[i])]
        tau = torch.exp(
            log_theta.clamp(math.log(cfg.temperature.min), math.log(cfg.temperature.max))
        )
        s_pos = torch.dot(q[i], p[i])
        numerator = torch.exp(s_pos / tau)
        denominator = numerator
        for emb, item, group, owner in cands:
            if owner == i:
                continue
            would_be += 1
            s = torch.dot(q[i], emb)
            if is_masked(cfg, s.item(), s_pos.item(), item, group, batch, i, use_ids):
                masked += 1
                continue
            weight = torch.exp(cfg.hardness_alpha * s.detach())
            denominator = denominator + weight * torch.exp(s / tau)
        rows.append(-torch.log(numerator / denominator))
    return rows, masked, would_be


def reference_candidates(batch: Batch, use_negatives: bool) -> list[tuple]:
    """(embedding, item id, group id, row whose positive it is or None) per candidate."""
    cands = []
    for j in range(batch.query.shape[0]):
        ids = int(batch.positive_ids[j]), int(batch.group_ids[j])
        cands.append((batch.positive[j], *ids, j))
    if use_negatives:
        for j in range(batch.query.shape[0]):
            for k in range(batch.negatives.shape[1]):
                ids = int(batch.negative_ids[j, k]), int(batch.negative_group_ids[j, k])
                cands.append((batch.negatives[j, k], *ids, None))
    return cands


def is_masked(
    cfg: LossConfig, s: float, s_pos: float, item: int, group: int, batch: Batch, i: int, ids: bool
) -> bool:
    """The masking rules for one (query, candidate) pair, spelled out."""
    if ids and item != -1 and item == int(batch.positive_ids[i]):
        return True
    if ids and group != -1 and group == int(batch.group_ids[i]):
        return True
    delta = cfg.false_negative_delta
    if delta is None:
        return False
    if cfg.false_negative_rule == "absolute":
        return s > delta
    return s > s_pos - (1 - delta) * abs(s_pos)


# --------------------------------------------------------------------------- data


@dataclass
class Batch:
    query: Tensor
    positive: Tensor
    negatives: Tensor
    task_index: Tensor
    positive_ids: Tensor
    negative_ids: Tensor
    group_ids: Tensor
    negative_group_ids: Tensor


def random_batch(seed: int = 0, b: int = 6, k: int = 2, dim: int = 16) -> Batch:
    """Unit vectors, each query near its positive, ids all distinct, tasks cycling."""
    gen = torch.Generator().manual_seed(seed)
    positive = unit_vectors(gen, b, dim)
    query = F.normalize(positive + 0.6 * unit_vectors(gen, b, dim), dim=-1)
    negatives = unit_vectors(gen, b, k, dim)
    return Batch(
        query=query,
        positive=positive,
        negatives=negatives,
        task_index=torch.arange(b) % len(GROUPS),
        positive_ids=torch.arange(b),
        negative_ids=torch.arange(100, 100 + b * k).reshape(b, k),
        group_ids=torch.full((b,), -1),
        negative_group_ids=torch.full((b, k), -1),
    )


def unit_vectors(gen: torch.Generator, *shape: int) -> Tensor:
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def make_batch() -> Batch:
    """Six rows, two negatives each, where every masking rule fires at least once."""
    batch = random_batch(b=6, k=2, dim=16)
    gen = torch.Generator().manual_seed(1)
    # Near-duplicates of positives 0 and 3, scoring about as high as the positive itself.
    for (row, col), source in {(1, 0): 0, (4, 1): 3}.items():
        noisy = batch.positive[source] + 0.02 * unit_vectors(gen, 16)
        batch.negatives[row, col] = F.normalize(noisy, dim=-1)
    batch.positive_ids[5] = batch.positive_ids[2]  # one item is the positive of two rows
    batch.negative_ids[0, 1] = batch.positive_ids[4]
    batch.group_ids = torch.tensor([7, 7, -1, 8, -1, 9])  # rows 0 and 1 share a label text
    batch.negative_group_ids[2, 0] = 9
    batch.task_index = torch.tensor([0, 1, 2, 0, 2, 1])
    return batch


def make_loss(
    alpha: float = 0.0,
    delta: float | None = None,
    rule: str = "relative",
    learnable: bool = True,
    temps: tuple[float, ...] = (0.02, 0.05, 0.1),
) -> RzenEmbedLoss:
    """A float64 loss with distinct per-group temperatures."""
    cfg = LossConfig(
        hardness_alpha=alpha,
        false_negative_delta=delta,
        false_negative_rule=rule,
        temperature=TemperatureConfig(learnable=learnable, init=0.05, min=0.01, max=1.0),
        task_groups=GROUPS,
    )
    loss = RzenEmbedLoss(cfg).double()
    with torch.no_grad():
        loss.theta.copy_(torch.tensor(temps, dtype=torch.float64).log())
    return loss


def run_module(
    loss: RzenEmbedLoss, batch: Batch, use_negatives: bool, use_ids: bool
) -> tuple[dict, Tensor, Tensor, Tensor]:
    """Forward + backward through the module; returns the output and input gradients."""
    q = batch.query.clone().requires_grad_()
    p = batch.positive.clone().requires_grad_()
    n = batch.negatives.clone().requires_grad_()
    kwargs = {}
    if use_negatives:
        kwargs["negatives"] = n
    if use_ids:
        kwargs.update(positive_ids=batch.positive_ids, group_ids=batch.group_ids)
        if use_negatives:
            kwargs.update(
                negative_ids=batch.negative_ids, negative_group_ids=batch.negative_group_ids
            )
    out = loss(q, p, batch.task_index, **kwargs)
    out["loss"].backward()
    grad_n = n.grad if n.grad is not None else torch.zeros_like(n)
    return out, q.grad, p.grad, grad_n


def run_reference(
    loss: RzenEmbedLoss, batch: Batch, use_negatives: bool, use_ids: bool
) -> tuple[Tensor, int, int, list[Tensor | None]]:
    leaves = [t.clone().requires_grad_() for t in (batch.query, batch.positive, batch.negatives)]
    theta = loss.theta.detach().clone().requires_grad_(loss.theta.requires_grad)
    ref_batch = replace(batch, query=leaves[0], positive=leaves[1], negatives=leaves[2])
    rows, masked, would_be = reference_loss(loss.cfg, theta, ref_batch, use_negatives, use_ids)
    value = sum(rows) / len(rows)
    value.backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return value, masked, would_be, [*grads, theta.grad]


# --------------------------------------------------------------------------- equivalence

CONFIGS = {
    "plain_infonce": dict(alpha=0.0, delta=None, learnable=False),
    "hardness_only": dict(alpha=9.0, delta=None),
    "mask_relative": dict(alpha=0.0, delta=0.95, rule="relative"),
    "mask_absolute": dict(alpha=0.0, delta=0.3, rule="absolute"),
    "all_on": dict(alpha=9.0, delta=0.95, rule="relative"),
}


@pytest.mark.parametrize("use_negatives", [True, False], ids=["hard_negs", "in_batch_only"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_gradients_match_reference(name: str, use_negatives: bool) -> None:
    use_ids = name != "plain_infonce"
    loss = make_loss(**CONFIGS[name])
    batch = make_batch()
    out, gq, gp, gn = run_module(loss, batch, use_negatives, use_ids)
    ref, masked, would_be, ref_grads = run_reference(loss, batch, use_negatives, use_ids)

    assert out["loss"].item() == pytest.approx(ref.item(), abs=TOL)
    for got, want in zip([gq, gp, gn], ref_grads[:3], strict=True):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    if loss.theta.requires_grad:
        torch.testing.assert_close(loss.theta.grad, ref_grads[3], atol=TOL, rtol=0)
    assert out["masked_fraction"] == pytest.approx(masked / would_be, abs=1e-12)
    if name != "plain_infonce" and name != "hardness_only":
        assert masked > 0  # the batch exercises the masks it claims to test


def test_plain_config_equals_cross_entropy() -> None:
    """With every refinement off, the module is textbook InfoNCE over q @ candidates.T / tau."""
    loss = make_loss(alpha=0.0, delta=None, learnable=False, temps=(0.05, 0.05, 0.05))
    batch = make_batch()
    out = loss(batch.query, batch.positive, batch.task_index, batch.negatives)
    cands = torch.cat([batch.positive, batch.negatives.reshape(-1, batch.positive.shape[1])])
    expected = F.cross_entropy(batch.query @ cands.T / 0.05, torch.arange(6))
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-12)
    assert out["masked_fraction"] == 0.0


def test_per_task_loss_and_temperatures_reported() -> None:
    loss = make_loss(alpha=9.0, delta=0.95)
    batch = make_batch()
    out, *_ = run_module(loss, batch, use_negatives=True, use_ids=True)
    rows, _, _ = reference_loss(loss.cfg, loss.theta.detach(), batch, True, True)
    for g, name in enumerate(GROUPS):
        members = [rows[i].item() for i in range(6) if int(batch.task_index[i]) == g]
        assert out["per_task_loss"][name] == pytest.approx(sum(members) / len(members), abs=TOL)
    assert out["temperatures"] == pytest.approx(dict(zip(GROUPS, [0.02, 0.05, 0.1], strict=True)))
    assert loss.temperature_dict() == pytest.approx(out["temperatures"])


def test_only_present_groups_are_reported() -> None:
    loss = make_loss()
    batch = make_batch()
    task = torch.zeros(6, dtype=torch.long)
    out = loss(batch.query, batch.positive, task)
    assert list(out["per_task_loss"]) == ["classification"]
    assert out["per_task_loss"]["classification"] == pytest.approx(out["loss"].item())


# --------------------------------------------------------------------------- masking


def test_near_duplicate_negative_is_masked() -> None:
    """A negative above the threshold gets no gradient and does not change the loss."""
    loss = make_loss(alpha=9.0, delta=0.95, temps=(0.05, 0.05, 0.05))
    batch = random_batch(b=1, k=3)
    negatives = batch.negatives.clone()
    negatives[0, 0] = F.normalize(
        batch.positive[0] + 0.01 * torch.ones(16, dtype=torch.float64), dim=-1
    )
    s_pos = torch.dot(batch.query[0], batch.positive[0]).item()
    assert torch.dot(batch.query[0], negatives[0, 0]).item() > 0.95 * s_pos > 0
    negatives.requires_grad_()
    out = loss(batch.query, batch.positive, batch.task_index, negatives)
    out["loss"].backward()
    without = loss(batch.query, batch.positive, batch.task_index, negatives[:, 1:].detach())

    assert torch.count_nonzero(negatives.grad[0, 0]).item() == 0
    assert torch.count_nonzero(negatives.grad[0, 1:]).item() > 0
    assert out["loss"].item() == pytest.approx(without["loss"].item(), abs=1e-12)
    assert out["masked_fraction"] == pytest.approx(1 / 3)


def test_shared_group_id_is_masked() -> None:
    """Two rows with the same label text: neither is a negative of the other."""
    loss = make_loss(alpha=0.0, delta=None, temps=(0.05, 0.05, 0.05))
    batch = random_batch(b=3)
    groups = torch.tensor([5, 5, -1])
    p = batch.positive.clone().requires_grad_()
    out = loss(batch.query, p, batch.task_index, group_ids=groups)

    logits = batch.query @ batch.positive.T / 0.05
    logits[0, 1] = logits[1, 0] = float("-inf")
    expected = F.cross_entropy(logits, torch.arange(3))
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-12)
    assert out["masked_fraction"] == pytest.approx(2 / 6)
    # With only the two same-group rows, nothing is left to contrast: loss and gradient vanish.
    pair = loss(batch.query[:2], p[:2], batch.task_index[:2], group_ids=groups[:2])
    assert pair["loss"].item() == 0.0 and pair["masked_fraction"] == 1.0


def test_shared_item_id_is_masked_and_minus_one_never_matches() -> None:
    loss = make_loss(alpha=0.0, delta=None)
    batch = random_batch(b=3)
    task = batch.task_index
    same = loss(batch.query, batch.positive, task, positive_ids=torch.tensor([4, 4, 6]))
    none = loss(batch.query, batch.positive, task, positive_ids=torch.tensor([-1, -1, -1]))
    assert same["masked_fraction"] == pytest.approx(2 / 6)
    assert none["masked_fraction"] == 0.0
    assert same["loss"].item() < none["loss"].item()


def test_mask_building_blocks() -> None:
    pos = torch.tensor([0.8, -0.5])
    cand = torch.tensor([[0.77, 0.75, 0.9], [-0.52, -0.4, 0.0]])
    relative = false_negative_mask(pos, cand, 0.95, "relative")
    # Thresholds: 0.8 - 0.05*0.8 = 0.76 and -0.5 - 0.05*0.5 = -0.525.
    assert relative.tolist() == [[True, False, True], [True, True, True]]
    assert false_negative_mask(pos, cand, 0.8, "absolute").tolist() == [
        [False, False, True],
        [False, False, False],
    ]
    assert not false_negative_mask(pos, cand, None, "relative").any()
    with pytest.raises(ValueError, match="rule"):
        false_negative_mask(pos, cand, 0.9, "cosine")
    ids = same_id_mask(torch.tensor([3, -1]), torch.tensor([3, -1, 2]))
    assert ids.tolist() == [[True, False, False], [False, False, False]]
    sim = torch.tensor([[0.5]], requires_grad=True)
    bias = hardness_logit_bias(sim, 9.0)
    assert bias.item() == pytest.approx(4.5) and not bias.requires_grad


# --------------------------------------------------------------------------- hardness


def negative_grad_ratio(alpha: float) -> float:
    """|grad hard negative| / |grad easy negative| for one query at tau = 0.1."""
    loss = make_loss(alpha=alpha, delta=None, learnable=False, temps=(0.1, 0.1, 0.1))
    q = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.9, math.sqrt(1 - 0.81), 0.0]], dtype=torch.float64)
    hard = [0.6, 0.0, math.sqrt(1 - 0.36)]  # s = 0.6
    easy = [0.1, 0.0, -math.sqrt(1 - 0.01)]  # s = 0.1
    n = torch.tensor([[hard, easy]], dtype=torch.float64, requires_grad=True)
    loss(q, p, torch.tensor([0]), n)["loss"].backward()
    return (n.grad[0, 0].norm() / n.grad[0, 1].norm()).item()


def test_hardness_weighting_shifts_gradient_to_hard_negatives() -> None:
    plain, weighted = negative_grad_ratio(0.0), negative_grad_ratio(9.0)
    # Gradient on a negative is proportional to its softmax share: exp(s/tau [+ alpha*s]).
    assert plain == pytest.approx(math.exp(0.5 / 0.1), rel=1e-9)
    assert weighted == pytest.approx(math.exp(0.5 / 0.1 + 9.0 * 0.5), rel=1e-9)
    assert weighted / plain == pytest.approx(math.exp(4.5), rel=1e-9)


# --------------------------------------------------------------------------- temperature


def test_learnable_temperature_gets_gradient() -> None:
    loss = make_loss(learnable=True)
    batch = make_batch()
    task = torch.tensor([0, 0, 2, 2, 0, 2])  # group 1 absent
    loss(batch.query, batch.positive, task)["loss"].backward()
    assert loss.theta.grad[0].item() != 0.0 and loss.theta.grad[2].item() != 0.0
    assert loss.theta.grad[1].item() == 0.0
    assert [name for name, _ in loss.named_parameters()] == ["theta"]


def test_fixed_temperature_has_no_gradient() -> None:
    loss = make_loss(learnable=False)
    batch = make_batch()
    q = batch.query.clone().requires_grad_()
    loss(q, batch.positive, batch.task_index)["loss"].backward()
    assert not loss.theta.requires_grad and loss.theta.grad is None
    assert list(loss.parameters()) == []
    assert "theta" in dict(loss.named_buffers())
    assert q.grad.abs().sum().item() > 0


def test_temperature_is_clamped() -> None:
    loss = make_loss(temps=(0.02, 0.05, 0.1))
    with torch.no_grad():
        loss.theta[0] = math.log(1e-4)  # below min 0.01
        loss.theta[2] = math.log(50.0)  # above max 1.0
    assert loss.temperatures().tolist() == pytest.approx([0.01, 0.05, 1.0])
    batch = make_batch()
    loss(batch.query, batch.positive, batch.task_index)["loss"].backward()
    # Outside the range theta has no say in the loss, hence no gradient.
    assert loss.theta.grad[0].item() == 0.0 and loss.theta.grad[2].item() == 0.0
    assert loss.theta.grad[1].item() != 0.0


def test_default_config_initialises_every_group_at_init() -> None:
    loss = RzenEmbedLoss(LossConfig())
    assert len(loss.temperature_dict()) == 8
    assert list(loss.temperature_dict().values()) == pytest.approx([0.02] * 8)


def test_low_precision_inputs_are_scored_in_float32() -> None:
    loss = RzenEmbedLoss(LossConfig(task_groups=GROUPS))
    batch = make_batch()
    out = loss(batch.query.bfloat16(), batch.positive.bfloat16(), batch.task_index)
    assert out["loss"].dtype == torch.float32 and math.isfinite(out["loss"].item())


# --------------------------------------------------------------------------- errors


def test_task_index_maps_names_and_rejects_unknown() -> None:
    loss = make_loss()
    assert loss.task_index(["qa", "classification", "qa"]).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"unknown task group\(s\) \['video'\].*retrieval"):
        loss.task_index(["qa", "video"])


def _bad_inputs() -> dict[str, tuple[dict, str]]:
    b = random_batch(b=4, k=2, dim=8)
    good = dict(query=b.query, positive=b.positive, task_index=b.task_index)
    return {
        "query_1d": ({**good, "query": b.query[0]}, r"query: expected shape \(b, D\)"),
        "query_empty": ({**good, "query": b.query[:0]}, "empty batch"),
        "positive_rows": ({**good, "positive": b.positive[:3]}, r"positive: expected shape"),
        "positive_dim": ({**good, "positive": b.positive[:, :4]}, r"positive: expected shape"),
        "task_len": ({**good, "task_index": b.task_index[:2]}, "task_index: expected shape"),
        "task_float": ({**good, "task_index": b.task_index.double()}, "task_index: expected int"),
        "task_range": ({**good, "task_index": torch.tensor([0, 1, 2, 3])}, r"\[0, 2\]"),
        "negatives_2d": ({**good, "negatives": b.negatives[:, 0]}, "negatives: expected shape"),
        "negatives_dim": ({**good, "negatives": b.negatives[..., :4]}, "negatives: expected"),
        "ids_float": ({**good, "positive_ids": torch.zeros(4)}, "positive_ids: expected int"),
        "ids_len": ({**good, "group_ids": torch.zeros(3, dtype=torch.long)}, "group_ids"),
        "neg_ids_alone": ({**good, "negative_ids": b.negative_ids}, "without negatives"),
        "neg_ids_shape": (
            {**good, "negatives": b.negatives, "negative_ids": b.negative_ids[:, :1]},
            "negative_ids: expected shape",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_raise(case: str) -> None:
    kwargs, message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        make_loss()(**kwargs)


def test_the_matryoshka_loss_is_the_weighted_sum_over_renormalised_prefixes():
    """By hand: the base loss on each prefix (cut, renormalised), weighted and summed; the
    masks and hardness weights are the prefix's own; the temperatures are shared."""
    from rzenembed.config import MatryoshkaConfig
    from rzenembed.losses import MatryoshkaLoss, make_loss

    gen = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(5, 8, generator=gen, dtype=torch.float64), dim=-1)
    p = F.normalize(q + 0.3 * torch.randn(5, 8, generator=gen, dtype=torch.float64), dim=-1)
    n = F.normalize(torch.randn(5, 2, 8, generator=gen, dtype=torch.float64), dim=-1)
    task = torch.zeros(5, dtype=torch.long)
    nested = MatryoshkaConfig(dims=[2, 4, 8], weights=[0.25, 0.5, 1.0])
    loss = make_loss(LossConfig(matryoshka=nested)).double()
    assert isinstance(loss, MatryoshkaLoss)
    base = RzenEmbedLoss(LossConfig()).double()

    def prefix(x, d):
        return F.normalize(x[..., :d], dim=-1)

    expected = sum(
        w * base(prefix(q, d), prefix(p, d), task, negatives=prefix(n, d))["loss"]
        for d, w in ((2, 0.25), (4, 0.5), (8, 1.0))
    )
    out = loss(q, p, task, negatives=n)
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-12)
    assert set(out["per_dim_loss"]) == {2, 4, 8}
    assert float(out["per_dim_loss"][8]) == pytest.approx(
        float(base(q, p, task, negatives=n)["loss"]), rel=1e-12
    )
    out["loss"].backward()
    assert loss.theta.grad is not None and loss.temperature_dict() == base.temperature_dict()
    with pytest.raises(ValueError, match="exceed the embedding dimension 8"):
        make_loss(LossConfig(matryoshka=MatryoshkaConfig(dims=[4, 16]))).double()(q, p, task)
    with pytest.raises(ValueError, match="must increase"):
        MatryoshkaConfig(dims=[8, 4])
    with pytest.raises(ValueError, match="weights has 1 entries for 2 dims"):
        MatryoshkaConfig(dims=[4, 8], weights=[1.0])
