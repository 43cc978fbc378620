"""The RzenEmbed contrastive loss: InfoNCE with hardness weighting, false-negative masking
and one temperature per task group.

For a query q with positive k+ and negatives k-_i, with cosine similarity s and the
temperature tau_t of the query's task group,

    L = -log( e^{s(q,k+)/tau_t} / (e^{s(q,k+)/tau_t} + sum_i w_i e^{s(q,k-_i)/tau_t}) ).

Plain InfoNCE has w_i = 1. Three refinements sit on top, each switchable from
``LossConfig`` so that ablations need no code change:

* Hardness weighting, w_i = exp(alpha * stopgrad(s(q,k-_i))). It pushes harder on the
  negatives the model currently confuses with the positive. Multiplying by w_i equals adding
  alpha * stopgrad(s) to that negative's logit (not divided by tau), which is how it is done
  here: a constant shift of a logit needs no extra exponentials and keeps the softmax stable.
* False-negative masking. A "negative" that scores about as high as the positive is more
  often an unlabelled positive than a hard negative; pushing it away teaches the model to
  separate things that belong together, so it leaves the denominator.
* Id masking. A candidate sharing the positive's item id or the query's group id (for example
  the identical label text of two images of one class) is the positive under another index.

Embeddings arrive L2-normalised, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from rzenembed.config import LossConfig
from rzenembed.runtime import check_collective

NO_ID = -1
FalseNegativeRule = Literal["relative", "absolute"]

# --------------------------------------------------------------------------- building blocks


def distributed_world_size() -> int:
    """World size of the default process group, 1 when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order), keeping autograd.

    The backward pass hands each rank the sum, over all ranks, of the gradients flowing into
    its own slice. That is what lets an embedding computed on one rank learn from every
    rank's queries. Without an initialised multi-rank group this is the identity.
    """
    if distributed_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    check_collective(x, "gather_with_grad")

    with warnings.catch_warnings():
        # all_gather is marked deprecated, but the suggested replacement has no backward;
        # the gradient path is the whole point here.
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(x)
    return torch.cat(parts, dim=0)


def gather_without_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0; for ids and other non-differentiable data."""
    if distributed_world_size() == 1:
        return x
    check_collective(x, "gather_without_grad")
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def same_id_mask(row_ids: Tensor, candidate_ids: Tensor) -> Tensor:
    """``(b, N)`` bool: candidate j carries row i's id. ``NO_ID`` (-1) never matches."""
    return (row_ids[:, None] == candidate_ids[None, :]) & (row_ids[:, None] != NO_ID)


def false_negative_mask(
    pos_sim: Tensor, cand_sim: Tensor, delta: float | None, rule: FalseNegativeRule
) -> Tensor:
    """``(b, N)`` bool: candidates scoring too close to the positive to be trusted as negatives.

    "relative" (after NV-Retriever's positive-aware mining) drops s_neg > s_pos - (1 - delta)
    * |s_pos|, which is delta * s_pos for a positive s_pos but, unlike that product, does
    not flip into a lenient bound when s_pos <= 0. "absolute" drops s_neg > delta. Works on
    detached values: the mask is a selection, not something to learn through. The caller
    must unmask each row's own positive, which always passes its own threshold.
    """
    cand_sim = cand_sim.detach()
    if delta is None:
        return torch.zeros_like(cand_sim, dtype=torch.bool)
    if rule == "absolute":
        return cand_sim > delta
    if rule == "relative":
        pos_sim = pos_sim.detach()
        threshold = pos_sim - (1.0 - delta) * pos_sim.abs()  # (b,)
        return cand_sim > threshold[:, None]
    raise ValueError(f"unknown false-negative rule {rule!r}; expected 'relative' or 'absolute'")


def hardness_logit_bias(cand_sim: Tensor, alpha: float) -> Tensor:
    """``(b, N)`` log-weights alpha * stopgrad(s): adding them to logits multiplies by w_i.

    Detached on purpose (LLaVE): the weight tells the loss where to push, it is not itself a
    quantity the model may lower by moving embeddings.
    """
    return alpha * cand_sim.detach()


def candidate_ids(
    row_ids: Tensor | None, negative_ids: Tensor | None, batch: int, num_neg: int, device: Any
) -> Tensor:
    """``(b * (1 + K),)`` ids in candidate order (positives, then flattened negatives).

    Missing ids become ``NO_ID`` so that every rank gathers tensors of one shape, whether or
    not its caller passed ids.
    """
    if row_ids is None:
        row_ids = torch.full((batch,), NO_ID, dtype=torch.long, device=device)
    if negative_ids is None:
        negative_ids = torch.full((batch, num_neg), NO_ID, dtype=torch.long, device=device)
    parts = [row_ids.reshape(-1), negative_ids.reshape(-1)]
    return torch.cat([part.to(device=device, dtype=torch.long) for part in parts])


def _real_slots(mask: Tensor | None, batch: int, num_neg: int, device: Any) -> Tensor:
    """``(b * (1 + K),)`` 1 for a real candidate, 0 for a padded negative slot."""
    positives = torch.ones(batch, dtype=torch.long, device=device)
    if mask is None:
        negatives = torch.ones(batch * num_neg, dtype=torch.long, device=device)
    else:
        negatives = mask.reshape(-1).to(device=device, dtype=torch.long)
    return torch.cat([positives, negatives])


# --------------------------------------------------------------------------- input checks


def _check_tensor(name: str, value: Any, shape: Sequence[int], kind: str) -> None:
    """Raise a ValueError naming the argument unless it is a tensor of ``shape`` and ``kind``."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(value.shape)}")
    is_float = value.is_floating_point()
    is_int = not is_float and not value.is_complex() and value.dtype != torch.bool
    is_bool = value.dtype == torch.bool
    if (
        (kind == "float" and not is_float)
        or (kind == "int" and not is_int)
        or (kind == "bool" and not is_bool)
    ):
        raise ValueError(f"{name}: expected {kind} dtype, got {value.dtype}")


def _check_optional(name: str, value: Tensor | None, shape: Sequence[int], kind: str) -> None:
    if value is not None:
        _check_tensor(name, value, shape, kind)


def _embedding_shapes(query: Any, negatives: Any) -> tuple[int, int, int]:
    """(b, D, K) read from query and negatives; the full checks follow in ``_check_tensor``."""
    if not isinstance(query, Tensor) or query.dim() != 2:
        got = tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__
        raise ValueError(f"query: expected shape (b, D), got {got}")
    if query.shape[0] == 0:
        raise ValueError("query: empty batch (b = 0)")
    num_neg = 0
    if isinstance(negatives, Tensor) and negatives.dim() == 3:
        num_neg = negatives.shape[1]
    return query.shape[0], query.shape[1], num_neg


# --------------------------------------------------------------------------- the loss


class RzenEmbedLoss(nn.Module):
    """Hardness-weighted, false-negative-masked InfoNCE with a temperature per task group.

    Each query is scored against every candidate: all positives of the batch and all explicit
    hard negatives, gathered from every rank when training is distributed (and
    ``cfg.gather_across_ranks``). Gathering keeps the gradient, so candidates embedded on one
    rank learn from the queries of all ranks.

    Distributed convention (as open_clip under DDP): each rank returns the MEAN over its
    LOCAL queries. The mean of the per-rank losses then equals the single-process loss over
    the whole global batch, and parameter gradients averaged across ranks (what DDP's
    all-reduce does) equal the single-process gradients. Every rank must pass the same local
    batch size, number of negatives and embedding dim (checked). ``theta`` is a parameter
    like the encoder's: register this module inside the DDP-wrapped model (or all-reduce
    its gradient yourself), otherwise the ranks' temperatures drift apart.

    Candidate layout: rank by rank, each rank's block being its b positives then its b*K
    flattened negatives; query i on rank r targets index r*b*(1+K) + i (r*b + i without
    explicit negatives). The layout is an implementation detail; the loss does not depend
    on it.

    References:
        InfoNCE: van den Oord et al., "Representation Learning with Contrastive Predictive
        Coding", 2018. Hardness weighting: Lan et al., "LLaVE: Large Language and Vision
        Embedding Models with Hardness-Weighted Contrastive Learning", 2025. Positive-aware
        false-negative rule: Moreira et al., "NV-Retriever: Improving text embedding models
        with effective hard-negative mining", 2024.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.task_groups: list[str] = list(cfg.task_groups)
        temp = cfg.temperature
        theta = torch.full((len(self.task_groups),), math.log(temp.init))
        if temp.learnable:
            self.theta = nn.Parameter(theta)
        else:
            self.register_buffer("theta", theta)
        self._log_min = math.log(temp.min)
        self._log_max = math.log(temp.max)

    # ----------------------------------------------------------------------- temperatures

    def temperatures(self) -> Tensor:
        """Per-group tau = exp(clamp(theta, log min, log max)), clamped in log space.

        Clamping keeps a learnable tau from collapsing to 0 (exploding logits) or growing past
        the point where the softmax is flat; outside the range theta gets no gradient.
        """
        return self.theta.clamp(self._log_min, self._log_max).exp()

    def temperature_dict(self) -> dict[str, float]:
        """Current temperature of each task group, for logging."""
        return dict(zip(self.task_groups, self.temperatures().detach().tolist(), strict=True))

    def task_index(self, names: Sequence[str]) -> Tensor:
        """Map task group names to the LongTensor ``forward`` expects (on theta's device)."""
        lookup = {name: i for i, name in enumerate(self.task_groups)}
        unknown = sorted({name for name in names if name not in lookup})
        if unknown:
            raise ValueError(f"unknown task group(s) {unknown}; known groups: {self.task_groups}")
        return torch.tensor([lookup[n] for n in names], dtype=torch.long, device=self.theta.device)

    # ----------------------------------------------------------------------- forward

    def forward(
        self,
        query: Tensor,
        positive: Tensor,
        task_index: Tensor,
        negatives: Tensor | None = None,
        positive_ids: Tensor | None = None,
        negative_ids: Tensor | None = None,
        group_ids: Tensor | None = None,
        negative_group_ids: Tensor | None = None,
        negative_mask: Tensor | None = None,
    ) -> dict[str, Any]:
        """Contrastive loss of the local queries against all (gathered) candidates.

        Args:
            query: ``(b, D)`` L2-normalised query embeddings.
            positive: ``(b, D)`` L2-normalised embeddings of each query's positive.
            task_index: ``(b,)`` integer index into ``cfg.task_groups`` (see ``task_index()``);
                picks the temperature of each query.
            negatives: ``(b, K, D)`` explicit hard negatives, or None. Every rank's negatives
                are candidates for every query.
            positive_ids: ``(b,)`` item id of each positive; a candidate with the same id is
                never a negative. -1 means "no id".
            negative_ids: ``(b, K)`` item ids of the explicit negatives.
            group_ids: ``(b,)`` group id of query i and its positive (e.g. a class label);
                candidates in the same group are never negatives. -1 means "no id".
            negative_group_ids: ``(b, K)`` group ids of the explicit negatives.
            negative_mask: ``(b, K)`` bool, True where a negative slot holds a real
                negative. Rows with fewer than K negatives are padded (every rank must pass
                the same K); a padded slot is no candidate of any query: it never enters a
                denominator and is not counted in ``masked_fraction``. None: all real.

        Returns:
            ``loss``: scalar tensor, mean over local queries. ``per_task_loss``: group name ->
            mean loss of the local queries of that group (present groups only).
            ``temperatures``: group name -> tau. ``masked_fraction``: share of would-be
            negatives that were masked (ids or false-negative rule).
        """
        self._check_inputs(
            query,
            positive,
            task_index,
            negatives,
            positive_ids,
            negative_ids,
            group_ids,
            negative_group_ids,
            negative_mask,
        )
        # Ids and tasks often come straight from a CPU dataloader.
        task_index = task_index.to(device=query.device, dtype=torch.long)
        cands, cand_ids, targets = self._candidates(
            positive,
            negatives,
            positive_ids,
            negative_ids,
            group_ids,
            negative_group_ids,
            negative_mask,
        )
        return self._from_candidates(
            query, cands, cand_ids, targets, task_index, positive_ids, group_ids
        )

    def _from_candidates(
        self,
        query: Tensor,
        cands: Tensor,
        cand_ids: Tensor,
        targets: Tensor,
        task_index: Tensor,
        positive_ids: Tensor | None,
        group_ids: Tensor | None,
    ) -> dict[str, Any]:
        """The loss of the local queries against the gathered candidates (checked inputs);
        ``MatryoshkaLoss`` computes it on every nested prefix instead."""
        dtype = self.similarity_dtype(query)
        # Similarities in at least float32: at tau ~ 0.02 a bf16 rounding error of a cosine
        # becomes a sizeable logit error.
        cand_sim = query.to(dtype) @ cands.to(dtype).T  # (b, N)
        return self.from_similarities(
            cand_sim, targets, task_index, cand_ids, positive_ids, group_ids
        )

    def similarity_dtype(self, query: Tensor) -> torch.dtype:
        return torch.promote_types(query.dtype, self.theta.dtype)

    def from_similarities(
        self,
        cand_sim: Tensor,
        targets: Tensor,
        task_index: Tensor,
        cand_ids: Tensor,
        positive_ids: Tensor | None,
        group_ids: Tensor | None,
        id_excluded: Tensor | None = None,
        report: bool = True,
    ) -> dict[str, Any]:
        """The loss from the ``(b, N)`` cosine similarities of the local queries to every
        candidate (``candidates``' order): masks, hardness weights, temperatures, report.
        ``id_excluded``: ``id_exclusions``' result when the caller already has it (it does
        not depend on the similarities); ``report`` False: the loss alone, no numbers
        leave the device."""
        if id_excluded is None:
            id_excluded = self.id_exclusions(cand_sim.shape[0], positive_ids, group_ids, cand_ids)
        excluded = self._excluded(cand_sim, targets, id_excluded)  # (b, N)
        padded = cand_ids[:, 2] == 0  # (N,) slots that hold no candidate at all
        logits = self._logits(cand_sim, targets, task_index, excluded | padded[None, :])
        del cand_sim  # autograd keeps it only if tau is learnable; else free it before softmax
        row_loss = F.cross_entropy(logits, targets, reduction="none")  # (b,)
        if not report:
            return {"loss": row_loss.mean()}
        return self._report(row_loss, task_index, excluded & ~padded[None, :], padded)

    def id_exclusions(
        self,
        batch: int,
        positive_ids: Tensor | None,
        group_ids: Tensor | None,
        cand_ids: Tensor,
    ) -> Tensor | None:
        """``(b, N)`` bool: candidates carrying a row's item id or group id (never its
        negatives, whatever the similarities); None when no ids were given."""
        out = None
        for column, row_ids in enumerate((positive_ids, group_ids)):
            if row_ids is not None:
                row_ids = row_ids.to(device=cand_ids.device, dtype=torch.long)
                same = same_id_mask(row_ids, cand_ids[:, column])
                out = same if out is None else out | same
        return out

    def _gathering(self) -> bool:
        return self.cfg.gather_across_ranks and distributed_world_size() > 1

    def _candidates(
        self,
        positive: Tensor,
        negatives: Tensor | None,
        positive_ids: Tensor | None,
        negative_ids: Tensor | None,
        group_ids: Tensor | None,
        negative_group_ids: Tensor | None,
        negative_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Candidates ``(N, D)``, their (item id, group id, real) columns ``(N, 3)`` and the
        targets ``(b,)``; ``real`` is 0 for a padded negative slot."""
        batch, dim = positive.shape
        num_neg = 0 if negatives is None else negatives.shape[1]
        local = positive
        if negatives is not None:
            local = torch.cat([positive, negatives.reshape(-1, dim).to(positive.dtype)])
        ids = torch.stack(
            [
                candidate_ids(positive_ids, negative_ids, batch, num_neg, positive.device),
                candidate_ids(group_ids, negative_group_ids, batch, num_neg, positive.device),
                _real_slots(negative_mask, batch, num_neg, positive.device),
            ],
            dim=1,
        )  # (b * (1 + K), 3)
        offset = 0
        if self._gathering():
            _check_same_shape_on_all_ranks(batch, num_neg, dim, positive.device)
            offset = dist.get_rank() * local.shape[0]
            local, ids = gather_with_grad(local), gather_without_grad(ids)
        targets = torch.arange(batch, device=positive.device) + offset
        return local, ids, targets

    def _excluded(self, cand_sim: Tensor, targets: Tensor, id_excluded: Tensor | None) -> Tensor:
        """``(b, N)`` bool: candidates that are not negatives of the row (target included)."""
        batch = cand_sim.shape[0]
        pos_sim = cand_sim.detach().gather(1, targets[:, None]).squeeze(1)  # (b,)
        excluded = false_negative_mask(
            pos_sim, cand_sim, self.cfg.false_negative_delta, self.cfg.false_negative_rule
        )
        if id_excluded is not None:
            excluded |= id_excluded
        # The target is the numerator, not a negative: never count or mask it here.
        excluded[torch.arange(batch, device=targets.device), targets] = False
        return excluded

    def _logits(
        self, cand_sim: Tensor, targets: Tensor, task_index: Tensor, excluded: Tensor
    ) -> Tensor:
        """``(b, N)`` logits s / tau, plus the hardness log-weights on negatives, masked."""
        tau = self.temperatures().to(cand_sim.dtype)[task_index, None]  # (b, 1)
        logits = cand_sim / tau  # (b, N)
        if self.cfg.hardness_alpha > 0:
            bias = hardness_logit_bias(cand_sim, self.cfg.hardness_alpha)  # (b, N)
            bias.scatter_(1, targets[:, None], 0.0)  # the positive keeps weight 1
            logits = logits + bias
        # In place is safe: div and add save their inputs for backward, not their output.
        return logits.masked_fill_(excluded, float("-inf"))

    def _report(
        self, row_loss: Tensor, task_index: Tensor, excluded: Tensor, padded: Tensor
    ) -> dict[str, Any]:
        """The result dict; all logging numbers leave the device in one transfer."""
        groups = len(self.task_groups)
        sums = torch.zeros(groups, dtype=torch.float64, device=row_loss.device)
        sums.index_add_(0, task_index, row_loss.detach().double())
        counts = torch.bincount(task_index, minlength=groups).double()
        masked = excluded.sum().double().reshape(1)
        real = (~padded).sum().double().reshape(1)
        temps = self.temperatures().detach().double()
        values = torch.cat([sums, counts, masked, real, temps]).tolist()
        per_task = {
            name: total / count
            for name, total, count in zip(
                self.task_groups, values[:groups], values[groups : 2 * groups], strict=True
            )
            if count > 0
        }
        # Per row: every real candidate but its own target.
        would_be_negatives = excluded.shape[0] * (values[2 * groups + 1] - 1)
        return {
            "loss": row_loss.mean(),
            "per_task_loss": per_task,
            "temperatures": dict(zip(self.task_groups, values[-groups:], strict=True)),
            "masked_fraction": values[2 * groups] / max(would_be_negatives, 1),
        }

    def _check_inputs(
        self,
        query: Tensor,
        positive: Tensor,
        task_index: Tensor,
        negatives: Tensor | None,
        positive_ids: Tensor | None,
        negative_ids: Tensor | None,
        group_ids: Tensor | None,
        negative_group_ids: Tensor | None,
        negative_mask: Tensor | None = None,
    ) -> None:
        """Fail early, naming the argument, before a shape error surfaces deep in a matmul."""
        batch, dim, num_neg = _embedding_shapes(query, negatives)
        _check_tensor("query", query, (batch, dim), "float")
        _check_tensor("positive", positive, (batch, dim), "float")
        _check_tensor("task_index", task_index, (batch,), "int")
        if negatives is None and (negative_ids is not None or negative_group_ids is not None):
            raise ValueError("negative_ids / negative_group_ids given without negatives")
        _check_optional("negatives", negatives, (batch, num_neg, dim), "float")
        _check_optional("positive_ids", positive_ids, (batch,), "int")
        _check_optional("negative_ids", negative_ids, (batch, num_neg), "int")
        _check_optional("group_ids", group_ids, (batch,), "int")
        _check_optional("negative_group_ids", negative_group_ids, (batch, num_neg), "int")
        if negative_mask is not None:
            if negatives is None:
                raise ValueError("negative_mask given without negatives")
            _check_tensor("negative_mask", negative_mask, (batch, num_neg), "bool")
        self._check_task_range(task_index)

    def _check_task_range(self, task_index: Tensor) -> None:
        low, high = (int(v) for v in torch.aminmax(task_index))
        if low < 0 or high >= len(self.task_groups):
            raise ValueError(
                f"task_index: values must lie in [0, {len(self.task_groups) - 1}] "
                f"(groups {self.task_groups}), got range [{low}, {high}]"
            )


def _check_same_shape_on_all_ranks(batch: int, num_neg: int, dim: int, device: Any) -> None:
    """Raise on every rank alike if local shapes differ: all_gather needs equal shapes."""
    mine = torch.tensor([batch, num_neg, dim], dtype=torch.long, device=device)
    everyone = gather_without_grad(mine[None, :])  # (W, 3)
    if not bool((everyone == mine).all()):
        raise ValueError(
            "every rank must pass the same local batch size, number of negatives and dim; "
            f"got (b, K, D) per rank {everyone.tolist()}"
        )


class MatryoshkaLoss(RzenEmbedLoss):
    """The RzenEmbed loss on nested prefixes of the embeddings (Matryoshka representation
    learning: Kusupati et al., 2022), so a vector cut to its first d values, renormalised,
    still embeds well.

    For each d in ``cfg.matryoshka.dims`` the full loss (hardness weights, false-negative
    mask, per-task temperatures, cross-rank candidates) is computed on the first d values of
    every query, positive and negative, each renormalised; the loss is the weighted sum.
    Everything a prefix decides (the mask, the hardness weights) is decided on that prefix.
    The temperatures are shared by all prefixes (the same parameters as the plain loss's:
    a checkpoint names them alike). Under GradCache the gradient of the summed loss with
    respect to the cached full embeddings flows through the slicing, so chunked and plain
    steps agree. The returned ``per_task_loss`` and ``masked_fraction`` are the largest
    prefix's; ``per_dim_loss`` gives each prefix's loss.
    """

    def __init__(self, cfg: LossConfig) -> None:
        if cfg.matryoshka is None:
            raise ValueError("MatryoshkaLoss needs loss.matryoshka")
        super().__init__(cfg)
        self.dims = list(cfg.matryoshka.dims)
        self.weights = list(cfg.matryoshka.weights or [1.0] * len(self.dims))

    def _from_candidates(
        self,
        query: Tensor,
        cands: Tensor,
        cand_ids: Tensor,
        targets: Tensor,
        task_index: Tensor,
        positive_ids: Tensor | None,
        group_ids: Tensor | None,
    ) -> dict[str, Any]:
        full = query.shape[-1]
        if self.dims[-1] > full:
            raise ValueError(
                f"loss.matryoshka.dims {self.dims} exceed the embedding dimension {full}"
            )
        id_excluded = self.id_exclusions(query.shape[0], positive_ids, group_ids, cand_ids)
        total, out, per_dim = None, {}, {}
        for dim, weight, cand_sim in zip(
            self.dims, self.weights, self._prefix_similarities(query, cands), strict=True
        ):
            out = self.from_similarities(
                cand_sim,
                targets,
                task_index,
                cand_ids,
                positive_ids,
                group_ids,
                id_excluded,
                report=dim == self.dims[-1],  # the numbers logged are the largest prefix's
            )
            per_dim[dim] = out["loss"].detach()
            term = weight * out["loss"]
            total = term if total is None else total + term
        return {**out, "loss": total, "per_dim_loss": per_dim}

    def _prefix_similarities(self, query: Tensor, cands: Tensor) -> Iterator[Tensor]:
        """The ``(b, N)`` cosine similarities of every prefix in ``dims``, in order, from one
        pass over the dimensions: the raw dot products grow block by block (d_{k-1}..d_k),
        so the matrix products together cost one full-size product, and each prefix is
        renormalised by dividing by its queries' and candidates' prefix norms (the same as
        cutting, renormalising and multiplying, as ``F.normalize`` does: norms below 1e-12
        count as 1e-12)."""
        dtype = self.similarity_dtype(query)
        q, c = query.to(dtype), cands.to(dtype)
        raw, q_sq, c_sq, start = None, 0.0, 0.0, 0
        for dim in self.dims:
            q_block, c_block = q[:, start:dim], c[:, start:dim]
            block = q_block @ c_block.T
            raw = block if raw is None else raw + block
            q_sq = q_sq + (q_block * q_block).sum(dim=1)  # squared norms of the prefix
            c_sq = c_sq + (c_block * c_block).sum(dim=1)
            start = dim
            q_inv = 1.0 / q_sq.sqrt().clamp_min(1e-12)
            c_inv = 1.0 / c_sq.sqrt().clamp_min(1e-12)
            yield raw * q_inv[:, None] * c_inv[None, :]


def make_loss(cfg: LossConfig) -> nn.Module:
    """The loss ``cfg`` describes: ``MatryoshkaLoss`` with nested dimensions, else
    ``RzenEmbedLoss``."""
    return MatryoshkaLoss(cfg) if cfg.matryoshka is not None else RzenEmbedLoss(cfg)
