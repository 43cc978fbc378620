"""Hard negatives with one K per step on every rank: rows with fewer negatives are padded,
and padded slots never enter the loss, however the rows are spread over ranks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from rzenembed.config import LossConfig, TemperatureConfig, config_from_dict
from rzenembed.data.schema import RECORD_SCHEMA, record, records_table, side
from rzenembed.data.version import VersionWriter
from rzenembed.losses import RzenEmbedLoss
from rzenembed.prep.mixture import run_mixture
from rzenembed.training.collate import NO_ID, SourceInfo, collate, negatives_per_step
from rzenembed.training.gradcache import gradcache_step, plain_step, prepare_batch
from rzenembed.training.loop import average_gradients
from rzenembed.training.metrics import MaskingWatch, read_jsonl

from .multiprocess import gloo_rank, run_ranks
from .test_gradcache import StackPreparer, ToyEncoder, toy_data

COUNTS = [0, 1, 2, 1]  # real negatives per row; K = 2
K, DIM, ALPHA, TAU = 2, 6, 9.0, 0.05


def loss_module(**kw: Any) -> RzenEmbedLoss:
    cfg = LossConfig(
        hardness_alpha=ALPHA,
        false_negative_delta=None,
        temperature=TemperatureConfig(init=TAU, learnable=False),
        **kw,
    )
    return RzenEmbedLoss(cfg).double()


def padded_inputs(counts: list[int], seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Query, positive, (b, K, D) negatives whose padded slots hold large garbage, the mask."""
    g = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> Tensor:
        x = torch.randn(*shape, DIM, generator=g, dtype=torch.float64)
        return torch.nn.functional.normalize(x, dim=-1)

    query, positive, negatives = unit(len(counts)), unit(len(counts)), unit(len(counts), K)
    mask = torch.tensor([[j < c for j in range(K)] for c in counts])
    negatives = torch.where(mask[..., None], negatives, 50.0 * unit(len(counts), K))
    return query.requires_grad_(), positive.requires_grad_(), negatives.requires_grad_(), mask


def reference(query: Tensor, positive: Tensor, negatives: Tensor, mask: Tensor) -> Tensor:
    """Mean over rows of -log(e^{s+/t} / (e^{s+/t} + sum_j w_j e^{s_j/t})) over the REAL
    candidates only (every positive of the batch and every real negative), one at a time."""
    candidates = [positive[j] for j in range(len(positive))]
    candidates += [negatives[i, k] for i in range(len(mask)) for k in range(K) if mask[i, k]]
    rows = []
    for i in range(len(query)):
        numerator = torch.exp(query[i] @ positive[i] / TAU)
        denominator = numerator
        for index, candidate in enumerate(candidates):
            if index == i:
                continue
            s = query[i] @ candidate
            denominator = denominator + torch.exp(ALPHA * s.detach()) * torch.exp(s / TAU)
        rows.append(-torch.log(numerator / denominator))
    return torch.stack(rows).mean()


def test_padded_slots_never_enter_the_loss_or_its_gradient():
    q, p, n, mask = padded_inputs(COUNTS)
    loss = loss_module()
    task = torch.zeros(len(COUNTS), dtype=torch.long)
    got = loss(q, p, task, negatives=n, negative_mask=mask)
    got["loss"].backward()
    grads = [q.grad.clone(), p.grad.clone(), n.grad.clone()]
    for t in (q, p, n):
        t.grad = None
    want = reference(q, p, n, mask)
    want.backward()
    torch.testing.assert_close(got["loss"], want)
    for g, w in zip(grads, [q.grad, p.grad, n.grad], strict=True):
        torch.testing.assert_close(g, w)
    assert bool((grads[2][~mask] == 0).all())  # the garbage in padded slots learns nothing
    assert bool((grads[2][mask] != 0).any())
    # Without the mask the garbage would count: the comparison is not vacuous.
    unmasked = loss(q.detach(), p.detach(), task, negatives=n.detach())["loss"]
    assert not math.isclose(float(unmasked), float(want.detach()), rel_tol=1e-3)


def test_masked_fraction_counts_real_candidates_only():
    q, p, n, mask = padded_inputs(COUNTS)
    ids = torch.arange(len(COUNTS))
    negative_ids = torch.full((len(COUNTS), K), NO_ID)
    negative_ids[1, 0] = 3  # row 1's negative is row 3's positive item
    out = loss_module()(
        q,
        p,
        torch.zeros(4, dtype=torch.long),
        negatives=n,
        positive_ids=ids,
        negative_ids=negative_ids,
        negative_mask=mask,
    )
    real = len(COUNTS) + sum(COUNTS)  # 4 positives + 4 real negatives
    assert out["masked_fraction"] == pytest.approx(1 / (len(COUNTS) * (real - 1)))


def test_a_mask_of_the_wrong_shape_or_kind_is_refused():
    q, p, n, mask = padded_inputs(COUNTS)
    task = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="negative_mask: expected shape"):
        loss_module()(q, p, task, negatives=n, negative_mask=mask[:, :1])
    with pytest.raises(ValueError, match="negative_mask: expected bool"):
        loss_module()(q, p, task, negatives=n, negative_mask=mask.long())
    with pytest.raises(ValueError, match="without negatives"):
        loss_module()(q, p, task, negative_mask=mask)


def toy_padded_batch(counts: list[int], chunk: int | None):
    q, p, n = toy_data(len(counts), K)
    mask = torch.tensor([[j < c for j in range(K)] for c in counts])
    real = [n[i * K + j] for i in range(len(counts)) for j in range(K) if mask[i, j]]
    return prepare_batch(StackPreparer(), q, p, real, K, chunk, negative_mask=mask), mask


def toy_grads(step, batch, mask) -> tuple[float, list[Tensor]]:
    encoder, loss = ToyEncoder(), loss_module()
    task = torch.zeros(len(mask), dtype=torch.long)
    out = step(encoder, batch, lambda q, p, n: loss(q, p, task, negatives=n, negative_mask=mask))
    return float(out["loss"]), [param.grad.clone() for param in encoder.parameters()]


@pytest.mark.parametrize("counts", [COUNTS, [0, 0, 0, 0]])
def test_gradcache_with_padding_matches_the_plain_step(counts):
    batch, mask = toy_padded_batch(counts, None)
    want_loss, want = toy_grads(plain_step, batch, mask)
    batch, mask = toy_padded_batch(counts, 2)
    got_loss, got = toy_grads(gradcache_step, batch, mask)
    assert got_loss == pytest.approx(want_loss)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert (batch.negatives is None) == (sum(counts) == 0)  # nothing embedded for padding


def dataset(counts: list[int]) -> tuple[list[dict], SourceInfo]:
    rows = [
        record(
            f"r{i}",
            "pad",
            "text_retrieval",
            side(f"query {i}"),
            side(f"answer {i}"),
            [side(f"wrong {i}.{j}") for j in range(c)],
        )
        for i, c in enumerate(counts)
    ]
    return rows, SourceInfo("pad", "text_retrieval", "", "same-item", max_negatives=max(counts))


def test_collate_gives_every_slice_the_same_k():
    rows, source = dataset([0, 1, 2, 1])
    assert negatives_per_step(source, 2) == negatives_per_step(source, 5) == 2
    batch = collate(rows, source, hard_negatives=2, max_frames=4)
    assert batch.num_negatives == 2 and len(batch.negatives) == 4
    assert batch.negative_mask.tolist() == [
        [False, False],
        [True, False],
        [True, True],
        [True, False],
    ]
    assert batch.negative_ids[0].tolist() == [NO_ID, NO_ID] and batch.negative_ids[2].min() > 0
    assert batch.padded_fraction == pytest.approx(4 / 8)
    # A slice holding only the row without negatives still has K = 2 (it used to get 0 and
    # crash the other ranks' gather), fully padded.
    alone = collate(rows[:1], source, hard_negatives=2, max_frames=4)
    assert alone.num_negatives == 2 and alone.negatives == [] and alone.padded_fraction == 1.0
    one = collate(rows, source, 1, 4).negative_mask
    assert one.tolist() == [[False], [True], [True], [True]]
    none_rows, none = dataset([0, 0])
    plain = collate(none_rows, none, hard_negatives=2, max_frames=4)
    assert plain.num_negatives == 0 and plain.negative_mask is None


# --------------------------------------------------------------------------- two ranks

RANK_COUNTS = [[0, 1], [2, 2]]


def _padding_rank(rank: int, port: int, out_dir: str) -> None:
    gloo_rank(_padded_loss_on_rank, rank, port, out_dir, 2)


def _padded_loss_on_rank(rank: int) -> dict[str, Any]:
    q, p, n, mask = padded_inputs([c for counts in RANK_COUNTS for c in counts], seed=3)
    rows = slice(2 * rank, 2 * rank + 2)
    loss = loss_module(gather_across_ranks=True)
    out = loss(
        q.detach()[rows],
        p.detach()[rows],
        torch.zeros(2, dtype=torch.long),
        negatives=n.detach()[rows],
        negative_mask=mask[rows],
    )
    return {"loss": float(out["loss"]), "masked_fraction": out["masked_fraction"]}


def test_two_ranks_with_different_padding_match_one_process(tmp_path: Path):
    ranks = run_ranks(_padding_rank, 2, tmp_path, 120)
    q, p, n, mask = padded_inputs([c for counts in RANK_COUNTS for c in counts], seed=3)
    want = float(reference(q, p, n, mask).detach())
    assert sum(r["loss"] for r in ranks) / 2 == pytest.approx(want)


# --------------------------------------------------------------------------- optimizer


def test_parameters_without_gradient_are_skipped_by_the_optimizer():
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([used, unused], lr=0.1, weight_decay=0.5)
    used.grad = torch.full((3,), 0.5)
    assert average_gradients([used, unused]) == 1
    assert unused.grad is None
    optimizer.step()
    assert torch.equal(unused.detach(), torch.ones(3))  # no decay, no momentum
    assert not torch.equal(used.detach(), torch.ones(3))


def test_masking_watch_warns_after_a_long_streak_only():
    watch = MaskingWatch(fraction=0.5, steps=3)
    seen = [watch.observe(s, f) for s, f in enumerate([0.9, 0.9, 0.1, 0.9, 0.6, 0.7, 0.8])]
    assert [s for s, w in enumerate(seen) if w] == [5]
    assert "3 consecutive steps" in seen[5] and "70%" in seen[5]


# --------------------------------------------------------------------------- Ray Train


def padding_stage(root: Path, model_dir: Path, counts: list[int], steps: int):
    """A stage-2 config with two workers and ``hard_negatives: 2``, and the stage manifest
    of one text dataset whose rows have ``counts`` negatives."""
    cfg = config_from_dict(
        {
            "name": "padding",
            "storage": {"root": str(root / "store")},
            "sources": [
                {
                    "name": "pad",
                    "uri": str(root / "raw"),
                    "stage": "stage2",
                    "task_group": "text_retrieval",
                }
            ],
            "model": {"name_or_path": str(model_dir), "max_text_tokens": 32},
            "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
            "loss": {"false_negative_delta": None},
            "stage2": {
                "global_batch_size": 4,
                "gradcache_chunk": 2,
                "max_steps": steps,
                "checkpoint_every": steps,
                "hard_negatives": 2,
                "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
                "mixtures": [{"name": "pad", "datasets": {"pad": 1.0}}],
            },
            "compute": {"num_workers": 2, "cpus_per_worker": 1},
        }
    )
    writer = VersionWriter(str(root / "store" / "pad" / "v1"), RECORD_SCHEMA)
    writer.write_shard("part-00000", records_table(dataset(counts)[0]))
    version = writer.commit(
        dataset="pad",
        step="ingest",
        config_digest="-",
        code_version="1",
        inputs=[],
        stats={"media_root": str(root)},
    )
    return cfg, run_mixture(cfg, "stage2", {"pad": version}, cfg.stage2.mixtures[0])


@pytest.mark.slow
def test_two_workers_train_on_rows_with_0_1_and_2_negatives(ray_local, tiny_model_dir, tmp_path):
    from rzenembed.training.stages import run_training

    cfg, manifest = padding_stage(tmp_path, tiny_model_dir, [0, 1, 2, 0, 1, 2, 0, 1], steps=4)
    result = run_training(cfg, "stage2", manifest, tiny_model_dir, "pad")
    metrics = read_jsonl(result.metrics_uri)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert all(m["negatives_per_query"] == 2 for m in metrics)
    assert all(0.0 < m["padded_negatives"] < 1.0 for m in metrics)
    assert all(math.isfinite(m["loss"]) and 0.0 <= m["masked_fraction"] <= 1.0 for m in metrics)
