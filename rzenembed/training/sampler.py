"""Which dataset, and which of its rows, every global step of a training stage trains on.

Why one dataset per step
    The recipe draws ONE dataset per global step, with the stage's sampling probabilities,
    so that the in-batch negatives come from the same domain as the positive (hard
    negatives). Every rank of a distributed run must agree on the dataset and on the rows;
    each rank then trains on its own contiguous slice of that global batch
    (``StageSampler.rank_slice``).

The dataset draw
    The dataset of step ``s`` is a pure function of ``(seed, s, current probabilities)``: a
    fresh ``np.random.default_rng([seed, DRAW_STREAM, s])`` draws one uniform number that is
    looked up in the cumulative probabilities. Nothing about the draw is carried between
    steps, so every rank holding the same sampler state gets the same answer, and a resumed
    run needs no generator state.

The rows
    Dataset ``i`` is read in epochs; epoch ``e`` visits the rows in the order of a
    permutation seeded by ``(seed, PERMUTATION_STREAM, i, e)``. A per-dataset cursor counts
    the rows consumed so far and advances by ``global_batch`` each time the dataset is
    drawn. A batch that runs past the end of an epoch is completed from the next epoch's
    permutation, so within an epoch no row repeats and every row is visited. A dataset
    smaller than ``global_batch`` spans as many epochs as needed within one batch, so that
    batch holds some rows more than once (the loss's content-id masking keeps such copies
    from acting as each other's negatives). ``StepPlan.epoch`` is the epoch of the batch's
    first row. Each dataset's current permutation is cached: 4 bytes per row of every
    dataset drawn so far.

Block shuffle (``shuffle="blocks"``)
    A uniform permutation makes every row a read of its own row group, which on an object
    store costs a request and a row group's bytes per row (``rzenembed.training.rows``).
    With ``blocks``, the dataset's rows are cut into blocks of consecutive rows given by
    the caller, one per Parquet row group (``DatasetRows.row_group_sizes``; shards are
    written in row groups of about 256 KiB, so a block is a few image rows or a few hundred
    text rows). Epoch ``e`` permutes the blocks with a generator seeded by ``(seed,
    BLOCK_STREAM, i, e)``, then the same generator shuffles the rows within each window of
    ``shuffle_window`` consecutive blocks of that order. Rows of a window come from
    ``shuffle_window`` row groups, read once each while the window is consumed; rows still
    mix within a window and the windows' order is random, so a batch draws from a window
    or two of random row groups instead of ``global_batch`` random rows. Everything else
    (cursors, epochs, resume) is as above; the mode, the window and a digest of each
    dataset's blocks are part of the configuration a saved state must match. The block
    boundaries cost 8 bytes a block.

Steps are consecutive
    ``plan(step)`` both computes the step's batch and commits it (advances the cursor), so
    it must be called with ``0, 1, 2, ...``; anything else raises. One call that does both
    is harder to misuse than a pure ``plan`` plus a separate ``advance``: forgetting the
    ``advance`` would silently repeat rows. Replaying older steps is impossible by design
    (their cursors are gone); the exception is the ``lookahead + 1`` most recently planned
    steps, which ``plan`` returns again unchanged. The training loader plans up to
    ``lookahead + 1`` steps ahead of the step being trained, so a checkpoint taken at step
    ``s`` has already committed the plans of ``s + 1 .. s + lookahead + 1``; they travel in
    ``state_dict`` and the resumed run asks for them again and gets the same batches. To
    restart from a checkpoint, build a fresh sampler and ``load_state_dict``;
    ``state_dict`` holds everything (JSON-able), so a resumed run continues with exactly
    the data order of an uninterrupted one.

Adaptive sampling (``AdaptiveSettings``; the paper leaves the rule open, this is ours)
    Video losses converge fast and image/document ones slowly, so probability moves toward
    the datasets whose loss falls slowest. ``observe(step, dataset, loss)`` feeds each
    step's loss (the all-reduced global mean, identical on every rank, or the ranks'
    probabilities would drift apart). For every dataset the sampler keeps its first
    observed loss ``L0_i`` and a bias-corrected EMA of its losses ``m_i`` (decay ``ema``,
    corrected like Adam's so early values are not pulled toward 0). Its relative progress
    is ``r_i = (L0_i - m_i) / |L0_i|``: how much of its initial loss it has shed. At every
    update (the first observed step at or after each ``every - 1, 2*every - 1, ...``) the
    observed datasets ``O`` (at least one loss seen, base probability > 0) get the
    standardised slowness ``z_i = (mean_O(r) - r_i) / std_O(r)`` (``z = 0`` when fewer than
    two are observed or all progress is equal), and

        p_i = clip(c * base_i * exp(strength * z_i), min_factor * base_i, max_factor * base_i)

    where the scale ``c > 0`` is solved for so that the observed datasets keep their total
    base mass ``sum_O base_i``. Solving for the scale *inside* the clip is the
    renormalisation: it respects the bounds exactly (a plain clip-then-divide would let the
    division push a probability past its bound by up to ``max_factor / min_factor``); a
    solution exists because ``min_factor <= 1 <= max_factor``. Datasets never observed keep
    exactly their base probability. Probabilities are recomputed from the base ones at
    every update, so nothing compounds across updates. Because ``z`` is standardised, the
    rule depends only on the ranking and spread of progress, not on loss scale; with two
    datasets any difference gives ``z = +-1``.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

STATE_VERSION = 2
DRAW_STREAM = 0
PERMUTATION_STREAM = 1
BLOCK_STREAM = 2
SHUFFLE_MODES = ("rows", "blocks")
_PROGRESS_EPSILON = 1e-8
_FLAT_SPREAD = 1e-12
_BISECTION_ROUNDS = 200


# --------------------------------------------------------------------------- public records


@dataclass(frozen=True)
class AdaptiveSettings:
    """How ``adaptive`` sampling moves probability toward slowly converging datasets."""

    every: int = 20  # update probabilities every N global steps
    ema: float = 0.9  # decay of the per-dataset loss EMA (0 = last loss only)
    strength: float = 1.0  # how hard to move toward slow datasets (0 = never move)
    min_factor: float = 0.5  # p_i stays >= min_factor * base_i (exactly, after renormalising)
    max_factor: float = 2.0  # p_i stays <= max_factor * base_i (exactly, after renormalising)

    def __post_init__(self) -> None:
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"adaptive.every must be an integer >= 1, got {self.every!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"adaptive.ema must be in [0, 1), got {self.ema!r}")
        if not (math.isfinite(self.strength) and self.strength >= 0):
            raise ValueError(f"adaptive.strength must be finite and >= 0, got {self.strength!r}")
        if not 0.0 <= self.min_factor <= 1.0 <= self.max_factor < math.inf:
            raise ValueError(
                "adaptive bounds need 0 <= min_factor <= 1 <= max_factor < inf (so the base "
                f"probabilities are feasible), got {self.min_factor!r}, {self.max_factor!r}"
            )


@dataclass(frozen=True, eq=False)
class StepPlan:
    """The global batch of one step: a dataset and row indices into it (all ranks agree)."""

    step: int
    dataset: str
    indices: np.ndarray  # int64, length global_batch
    epoch: int  # epoch of the dataset's permutation that the batch starts in

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepPlan):
            return NotImplemented
        return self._fields() == other._fields() and np.array_equal(self.indices, other.indices)

    def _fields(self) -> tuple[int, str, int]:
        return self.step, self.dataset, self.epoch

    __hash__ = None  # type: ignore[assignment]  # holds a mutable array


@dataclass(frozen=True)
class ProbabilityChange:
    """One dataset's probability moved by an adaptive update (plain fields, for logging)."""

    step: int
    dataset: str
    old: float
    new: float
    relative_progress: float | None  # (first loss - loss EMA) / |first loss|; None if unseen


# --------------------------------------------------------------------------- pure helpers


def normalised_probabilities(
    datasets: list[str], probabilities: list[float], sizes: list[int]
) -> np.ndarray:
    """Validate a stage's mixture and return its probabilities scaled to sum to 1."""
    if not datasets:
        raise ValueError("a stage needs at least one dataset")
    if len(set(datasets)) != len(datasets):
        raise ValueError(f"dataset names must be unique, got {datasets}")
    if len(probabilities) != len(datasets):
        raise ValueError(f"got {len(probabilities)} probabilities for {len(datasets)} datasets")
    if len(sizes) != len(datasets):
        raise ValueError(f"got {len(sizes)} sizes for {len(datasets)} datasets")
    bad_sizes = {d: s for d, s in zip(datasets, sizes, strict=True) if not _is_positive_int(s)}
    if bad_sizes:
        raise ValueError(f"dataset sizes must be integers > 0, got {bad_sizes}")
    values = np.asarray(probabilities, dtype=np.float64)
    bad = {d: p for d, p in zip(datasets, values.tolist(), strict=True) if not p >= 0}
    if bad or not np.all(np.isfinite(values)):
        raise ValueError(f"sampling probabilities must be finite and >= 0, got {bad}")
    total = float(values.sum())
    if not total > 0:
        raise ValueError("sampling probabilities must not all be 0")
    return values / total


def draw_dataset(seed: int, step: int, probabilities: np.ndarray) -> int:
    """Index of the dataset of ``step``: a pure function, so all ranks and resumes agree."""
    uniform = np.random.default_rng([seed, DRAW_STREAM, step]).random()
    cumulative = list(itertools.accumulate(float(p) for p in probabilities))
    index = bisect.bisect_right(cumulative, uniform * cumulative[-1])
    return _last_positive_at_or_before(probabilities, index)


def epoch_permutation(seed: int, dataset_index: int, epoch: int, size: int) -> np.ndarray:
    """The order in which ``epoch`` of a dataset visits its rows."""
    rng = np.random.default_rng([seed, PERMUTATION_STREAM, dataset_index, epoch])
    return rng.permutation(size).astype(np.int64, copy=False)


def block_permutation(
    seed: int, dataset_index: int, epoch: int, block_bounds: np.ndarray, window: int
) -> np.ndarray:
    """The order in which ``epoch`` of a dataset visits its rows under the block shuffle:
    blocks in a seeded random order, rows shuffled within each ``window`` blocks of it.
    ``block_bounds`` holds the first row of every block, then the row count."""
    rng = np.random.default_rng([seed, BLOCK_STREAM, dataset_index, epoch])
    lengths = np.diff(block_bounds)
    order = rng.permutation(len(lengths))
    rows = _concatenated_ranges(block_bounds[:-1][order], lengths[order])
    window_ends = np.cumsum(lengths[order])[window - 1 :: window].tolist()
    if not window_ends or window_ends[-1] != len(rows):
        window_ends.append(len(rows))
    start = 0
    for end in window_ends:
        rng.shuffle(rows[start:end])  # in place: a view of ``rows``
        start = end
    return rows


def _concatenated_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``range(starts[0], starts[0] + lengths[0])``, then the next range, ... as one array."""
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def block_bounds_of(block_sizes: Sequence[int], size: int) -> np.ndarray:
    """First row of each block, then ``size``, after checking the sizes tile the dataset."""
    sizes = np.asarray(block_sizes)
    if sizes.ndim != 1 or not len(sizes) or not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError("blocks must be a non-empty list of integer block sizes per dataset")
    if sizes.min() <= 0 or int(sizes.sum()) != size:
        raise ValueError(
            f"block sizes must be > 0 and add up to the dataset's {size} rows, "
            f"got {len(sizes)} blocks of {int(sizes.sum())} rows"
        )
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _blocks_digest(bounds: np.ndarray) -> dict[str, Any]:
    """What identifies a dataset's blocks in a saved state: their count and a digest."""
    digest = hashlib.sha256(bounds.astype("<i8").tobytes()).hexdigest()[:16]
    return {"count": len(bounds) - 1, "sha256": digest}


def adaptive_probabilities(
    base: np.ndarray, progress: list[float | None], settings: AdaptiveSettings
) -> np.ndarray:
    """The adaptive rule of the module docstring: ``progress[i]`` None = never observed."""
    observed = np.array([r is not None and b > 0 for r, b in zip(progress, base, strict=True)])
    result = base.copy()
    if observed.sum() < 2:
        return result
    rates = np.array([r for r, seen in zip(progress, observed, strict=True) if seen], float)
    slowness = _standardised_slowness(rates)
    group_base = base[observed]
    result[observed] = _scale_within_bounds(
        log_weights=np.log(group_base) + settings.strength * slowness,
        lower=settings.min_factor * group_base,
        upper=settings.max_factor * group_base,
        total=float(group_base.sum()),
    )
    return result / result.sum()


def _standardised_slowness(rates: np.ndarray) -> np.ndarray:
    """High for datasets whose loss fell least (relative to the others)."""
    spread = float(rates.std())
    if spread <= _FLAT_SPREAD:
        return np.zeros_like(rates)
    return (rates.mean() - rates) / spread


def _scale_within_bounds(
    log_weights: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: float
) -> np.ndarray:
    """``clip(c * exp(log_weights), lower, upper)`` with the ``c`` that makes it sum to
    ``total`` (which must lie in ``[sum(lower), sum(upper)]``).

    The clipped sum grows monotonically with ``c``, so bisection on ``log c`` finds it.
    Working with logarithms keeps a large ``strength`` from overflowing ``exp`` or from
    underflowing a weight to 0, which would pin it to its lower bound for every ``c``.
    """

    def clipped(log_scale: float) -> np.ndarray:
        with np.errstate(over="ignore", under="ignore"):
            return np.clip(np.exp(log_scale + log_weights), lower, upper)

    high = float(np.max(np.log(upper) - log_weights))  # every entry at its upper bound
    if np.all(lower > 0):
        low = float(np.min(np.log(lower) - log_weights))  # every entry at its lower bound
    else:  # lower bounds are all 0: make every entry at most total / n
        low = float(np.log(total / len(log_weights)) - np.max(log_weights))
    for _ in range(_BISECTION_ROUNDS):
        middle = 0.5 * (low + high)
        if clipped(middle).sum() < total:
            low = middle
        else:
            high = middle
    return clipped(high)


def _last_positive_at_or_before(probabilities: np.ndarray, index: int) -> int:
    """Guard against rounding that lands a draw on (or past) a zero-probability tail."""
    index = min(index, len(probabilities) - 1)
    while probabilities[index] <= 0:
        index -= 1
    return index


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


# --------------------------------------------------------------------------- internal state


@dataclass
class _LossStats:
    """One dataset's loss history, reduced to what the adaptive rule needs."""

    count: int = 0
    ema_raw: float = 0.0  # EMA started at 0; divide by (1 - decay**count) for the level
    first: float | None = None

    def add(self, loss: float, decay: float) -> None:
        if self.first is None:
            self.first = loss
        self.count += 1
        self.ema_raw = decay * self.ema_raw + (1.0 - decay) * loss

    def relative_progress(self, decay: float) -> float | None:
        if self.first is None:
            return None
        level = self.ema_raw / (1.0 - decay**self.count)
        return (self.first - level) / max(abs(self.first), _PROGRESS_EPSILON)


@dataclass(frozen=True)
class _Progress:
    """Where the sampler is in the stage, replaced as a whole so that a ``state_dict`` taken
    while another thread prefetches the next plan never sees half an update."""

    next_step: int
    rows_consumed: tuple[int, ...]
    # The most recent plans, oldest first: (step, dataset index, rows consumed before).
    recent: tuple[tuple[int, int, int], ...] = ()


@dataclass
class _AdaptiveState:
    stats: list[_LossStats]
    next_update_step: int


# --------------------------------------------------------------------------- the sampler


class StageSampler:
    """Plans every global step of one stage: one dataset, its global batch, per-rank slices."""

    def __init__(
        self,
        datasets: list[str],
        probabilities: list[float],
        sizes: list[int],
        global_batch: int,
        seed: int,
        adaptive: AdaptiveSettings | None = None,
        lookahead: int = 0,
        shuffle: str = "rows",
        shuffle_window: int = 16,
        blocks: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """``shuffle`` orders each epoch's rows: ``rows`` a uniform permutation, ``blocks``
        the block shuffle of the module docstring, over ``blocks`` (per dataset, the sizes
        of its consecutive blocks: its row groups' row counts) in windows of
        ``shuffle_window`` blocks."""
        if not (_is_int(lookahead) and lookahead >= 0):
            raise ValueError(f"lookahead must be an integer >= 0, got {lookahead!r}")
        self._lookahead = int(lookahead)
        self._base = normalised_probabilities(list(datasets), list(probabilities), list(sizes))
        if not _is_positive_int(global_batch):
            raise ValueError(f"global_batch must be an integer > 0, got {global_batch!r}")
        if not (_is_int(seed) and seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self._datasets = list(datasets)
        self._index_of = {name: i for i, name in enumerate(self._datasets)}
        self._sizes = [int(s) for s in sizes]
        self._global_batch = int(global_batch)
        self._seed = int(seed)
        self._settings = adaptive
        self._probabilities = self._base.copy()
        self._progress = _Progress(next_step=0, rows_consumed=(0,) * len(self._datasets))
        self._last_observed_step = -1
        self._adaptive = self._fresh_adaptive_state()
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}
        self._shuffle = shuffle
        self._shuffle_window = shuffle_window
        self._block_bounds = self._checked_blocks(shuffle, shuffle_window, blocks)

    def _checked_blocks(
        self, shuffle: str, window: int, blocks: Sequence[Sequence[int]] | None
    ) -> list[np.ndarray] | None:
        if shuffle not in SHUFFLE_MODES:
            raise ValueError(f"shuffle must be one of {SHUFFLE_MODES}, got {shuffle!r}")
        if not (_is_int(window) and window >= 1):
            raise ValueError(f"shuffle_window must be an integer >= 1, got {window!r}")
        if shuffle == "rows":
            if blocks is not None:
                raise ValueError("blocks only apply to shuffle='blocks'")
            return None
        if blocks is None or len(blocks) != len(self._datasets):
            raise ValueError(
                "shuffle='blocks' needs the block sizes (row groups' rows) of every dataset"
            )
        return [block_bounds_of(b, size) for b, size in zip(blocks, self._sizes, strict=True)]

    # ------------------------------------------------------------------ read-only views

    @property
    def datasets(self) -> list[str]:
        return list(self._datasets)

    @property
    def probabilities(self) -> dict[str, float]:
        """Current sampling probabilities (the base ones unless adaptive moved them)."""
        return dict(zip(self._datasets, self._probabilities.tolist(), strict=True))

    @property
    def base_probabilities(self) -> dict[str, float]:
        return dict(zip(self._datasets, self._base.tolist(), strict=True))

    @property
    def next_step(self) -> int:
        """The step the next ``plan`` call must ask for."""
        return self._progress.next_step

    # ------------------------------------------------------------------ planning

    def plan(self, step: int) -> StepPlan:
        """The dataset and global batch of ``step``, committing the dataset's cursor.

        Steps must come in order ``0, 1, 2, ...``; asking again for one of the
        ``lookahead + 1`` most recently planned steps returns the same plan without
        advancing anything.
        """
        progress = self._progress
        for planned_step, dataset_index, start in progress.recent:
            if step == planned_step:
                return self._build_plan(step, dataset_index, start)
        if step != progress.next_step:
            raise ValueError(
                f"plan(step={step}) but the next step is {progress.next_step}: steps must be "
                "planned consecutively (earlier steps cannot be replayed); to resume, "
                "load_state_dict() on a fresh sampler"
            )
        dataset_index = draw_dataset(self._seed, step, self._probabilities)
        start = progress.rows_consumed[dataset_index]
        plan = self._build_plan(step, dataset_index, start)
        consumed = list(progress.rows_consumed)
        consumed[dataset_index] = start + self._global_batch
        recent = (*progress.recent, (step, dataset_index, start))[-(self._lookahead + 1) :]
        self._progress = _Progress(step + 1, tuple(consumed), recent)
        return plan

    def rank_slice(self, plan: StepPlan, rank: int, world_size: int) -> np.ndarray:
        """This rank's contiguous share of the global batch; the ranks' shares, in rank
        order, concatenate back to ``plan.indices``."""
        if not (_is_int(world_size) and world_size >= 1):
            raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
        if not (_is_int(rank) and 0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        if self._global_batch % world_size:
            raise ValueError(
                f"global_batch {self._global_batch} does not divide by world_size {world_size}"
            )
        if len(plan.indices) != self._global_batch:
            raise ValueError(
                f"plan has {len(plan.indices)} rows, this sampler's global_batch is "
                f"{self._global_batch}"
            )
        per_rank = self._global_batch // world_size
        return plan.indices[rank * per_rank : (rank + 1) * per_rank]

    def _build_plan(self, step: int, dataset_index: int, start: int) -> StepPlan:
        size = self._sizes[dataset_index]
        parts, position, end = [], start, start + self._global_batch
        while position < end:
            epoch, offset = divmod(position, size)
            take = min(size - offset, end - position)
            parts.append(self._permutation(dataset_index, epoch)[offset : offset + take])
            position += take
        indices = np.concatenate(parts).astype(np.int64, copy=False)
        return StepPlan(step, self._datasets[dataset_index], indices, start // size)

    def _permutation(self, dataset_index: int, epoch: int) -> np.ndarray:
        """Cached: one epoch's permutation per dataset, rebuilt when the epoch changes."""
        cached = self._permutations.get(dataset_index)
        if cached is None or cached[0] != epoch:
            size = self._sizes[dataset_index]
            order = self._epoch_order(dataset_index, epoch)
            if size < 2**31:  # kept as int32: 4 bytes a row (plans are int64)
                order = order.astype(np.int32)
            cached = (epoch, order)
            self._permutations[dataset_index] = cached
        return cached[1]

    def _epoch_order(self, dataset_index: int, epoch: int) -> np.ndarray:
        if self._block_bounds is None:
            return epoch_permutation(self._seed, dataset_index, epoch, self._sizes[dataset_index])
        bounds = self._block_bounds[dataset_index]
        return block_permutation(self._seed, dataset_index, epoch, bounds, self._shuffle_window)

    # ------------------------------------------------------------------ adaptive

    def observe(self, step: int, dataset: str, loss: float) -> list[ProbabilityChange]:
        """Record the (globally averaged) loss of a planned step; returns the probability
        changes an adaptive update made at this step (empty otherwise, always when static).

        Steps must be observed in increasing order; skipping one (e.g. a non-finite loss the
        caller drops) is allowed, and an update due at a skipped step happens at the next
        observed one.
        """
        if dataset not in self._index_of:
            raise ValueError(f"unknown dataset {dataset!r}; known: {self._datasets}")
        if step >= self.next_step:
            raise ValueError(f"observe(step={step}) before plan({step})")
        if step <= self._last_observed_step:
            raise ValueError(
                f"observe(step={step}) after step {self._last_observed_step}: each step is "
                "observed at most once, in order"
            )
        self._last_observed_step = step
        if self._settings is None:
            return []
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"loss of step {step} is {loss}: it would poison the loss EMA")
        self._adaptive.stats[self._index_of[dataset]].add(loss, self._settings.ema)
        if step < self._adaptive.next_update_step:
            return []
        every = self._settings.every
        self._adaptive.next_update_step = ((step + 1) // every + 1) * every - 1
        return self._update_probabilities(step)

    def _update_probabilities(self, step: int) -> list[ProbabilityChange]:
        assert self._settings is not None
        progress = [s.relative_progress(self._settings.ema) for s in self._adaptive.stats]
        old = self._probabilities
        new = adaptive_probabilities(self._base, progress, self._settings)
        self._probabilities = new
        return [
            ProbabilityChange(step, name, float(old[i]), float(new[i]), progress[i])
            for i, name in enumerate(self._datasets)
            if new[i] != old[i]
        ]

    def _fresh_adaptive_state(self) -> _AdaptiveState:
        every = self._settings.every if self._settings is not None else 1
        return _AdaptiveState([_LossStats() for _ in self._datasets], every - 1)

    # ------------------------------------------------------------------ checkpointing

    def _config(self) -> dict[str, Any]:
        """What must match between the run that saved a state and the one loading it."""
        return {
            "datasets": list(self._datasets),
            "base_probabilities": self._base.tolist(),
            "sizes": list(self._sizes),
            "global_batch": self._global_batch,
            "seed": self._seed,
            "adaptive": asdict(self._settings) if self._settings is not None else None,
            "lookahead": self._lookahead,
            "shuffle": self._shuffle_config(),
        }

    def _shuffle_config(self) -> dict[str, Any]:
        if self._block_bounds is None:
            return {"mode": "rows"}
        return {
            "mode": self._shuffle,
            "window": self._shuffle_window,
            "blocks": [_blocks_digest(b) for b in self._block_bounds],
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact data order; JSON-serialisable."""
        progress = self._progress
        return {
            "version": STATE_VERSION,
            "config": self._config(),
            "next_step": progress.next_step,
            "rows_consumed": list(progress.rows_consumed),
            "recent_plans": [list(p) for p in progress.recent],
            "last_observed_step": self._last_observed_step,
            "probabilities": self._probabilities.tolist(),
            "adaptive": {
                "next_update_step": self._adaptive.next_update_step,
                "loss_stats": [asdict(s) for s in self._adaptive.stats],
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state saved under a different configuration,
        since its data order could not be reproduced."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported sampler state version {state.get('version')!r}")
        # States saved before shuffle modes existed were all uniform row permutations.
        _check_same_config(self._config(), {"shuffle": {"mode": "rows"}, **state["config"]})
        self._progress = _Progress(
            next_step=int(state["next_step"]),
            rows_consumed=tuple(int(n) for n in state["rows_consumed"]),
            recent=tuple((int(s), int(d), int(c)) for s, d, c in state["recent_plans"]),
        )
        self._last_observed_step = int(state["last_observed_step"])
        self._probabilities = np.asarray(state["probabilities"], dtype=np.float64)
        adaptive = state["adaptive"]
        self._adaptive = _AdaptiveState(
            stats=[_LossStats(**s) for s in adaptive["loss_stats"]],
            next_update_step=int(adaptive["next_update_step"]),
        )
        self._permutations.clear()


def _check_same_config(mine: dict[str, Any], saved: dict[str, Any]) -> None:
    differing = [key for key in mine if not _same_value(mine[key], saved.get(key))]
    if differing:
        details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {mine[k]!r}" for k in differing)
        raise ValueError(f"sampler state was saved with a different configuration ({details})")


def _same_value(mine: Any, saved: Any) -> bool:
    """Equality that forgives float noise from re-normalising the same configured weights."""
    if isinstance(mine, list) and isinstance(saved, list):
        return len(mine) == len(saved) and all(
            _same_value(a, b) for a, b in zip(mine, saved, strict=True)
        )
    if isinstance(mine, dict) and isinstance(saved, dict):
        return mine.keys() == saved.keys() and all(_same_value(mine[k], saved[k]) for k in mine)
    if isinstance(mine, float) and isinstance(saved, int | float):
        return math.isclose(mine, saved, rel_tol=1e-12, abs_tol=1e-15)
    return mine == saved
