"""LoRA souping: several stage-2 adapters trained on one base become one shipped model.

Each adapter i stores, for every targeted linear layer, factors ``A_i`` (r x in) and
``B_i`` (out x r) and a scale ``s_i`` (alpha / r, or alpha / sqrt(r) with rsLoRA); its
weight update is ``s_i * B_i @ A_i``. Three ways to combine them:

``delta`` (default)
    The weighted average of the updates, ``sum_i w_i * s_i * B_i @ A_i``, added to the base
    weight. Exact: the souped model equals what averaging the fine-tuned weights would
    give. Ranks may differ between adapters.
``factors``
    Average the factors, ``(sum_i w_i B_i) @ (sum_i w_i A_i) * s``. This is what some tools
    call a linear combination of adapters. It is NOT the average of the updates: the
    product brings cross terms ``w_i w_j B_i A_j`` (i != j) that no adapter learnt, and two
    independently trained adapters shrink to about ``w^2`` of their size instead of ``w``.
    Needs equal ranks and scales.
``greedy``
    The greedy model soup: score every adapter alone on held-out data, start from the best,
    and add the others in order of their score, each kept only when the soup's score does
    not drop; kept adapters get uniform weights and are combined with ``delta``.

Everything is checked before anything is written: one base model (by weights digest), the
same targeted modules, a shared prompt template, compatible shapes, finite weights with a
positive sum. The output is a merged model folder (safetensors, processor,
``rzenembed.json`` with the template and the soup recipe, including every input adapter's
digest) that loads through ``RzenEmbedder`` and through the family's transformers class.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import load_file

from rzenembed.compact import trained_dimensions
from rzenembed.data.folders import FolderNotPublishedError, stage_folder
from rzenembed.data.storage import is_remote
from rzenembed.modeling.card import ModelCard, ModelFolderError
from rzenembed.modeling.digest import folder_digest, weights_digest
from rzenembed.modeling.embedder import RzenEmbedder, resolve_base

if TYPE_CHECKING:
    from rzenembed.config import PipelineConfig

SoupMethod = Literal["delta", "factors", "greedy"]
PEFT_PREFIX = "base_model.model."
LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class SoupError(ValueError):
    """Adapters that cannot be souped together, or a bad soup recipe."""


@dataclass(eq=False)  # identity: two loaded adapters are never "equal" by their tensors
class Adapter:
    """One LoRA adapter folder, read into memory."""

    path: Path  # the local (staged) folder
    card: ModelCard
    base_path: Path
    base_digest: str
    digest: str
    alpha: float
    rslora: bool
    # module name (as in the base model) -> (A, B)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    uri: str = ""  # where it was read from (a local folder or a storage-root URI)
    base_uri: str = ""

    @property
    def name(self) -> str:
        """The stage-2 mixture it was trained on, else its folder name."""
        extra = self.card.extra
        return str(extra.get("mixture") or self.path.name)

    def scale(self, module: str) -> float:
        rank = self.factors[module][0].shape[0]
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)

    def update(self, module: str) -> torch.Tensor:
        """``scale * B @ A`` of one module, in float64."""
        a, b = self.factors[module]
        return self.scale(module) * (b.double() @ a.double())


def load_adapter(path: str | Path, endpoint_url: str | None = None) -> Adapter:
    """Read an adapter folder written by training (peft safetensors + ``rzenembed.json``),
    local or on the storage root (staged, with its base, to this machine's cache)."""
    uri = str(path) if is_remote(str(path)) else str(Path(path).resolve())
    try:
        path = stage_folder(uri, endpoint_url)
    except FolderNotPublishedError:
        raise ModelFolderError(f"model folder not found: {uri}") from None
    card = ModelCard.load(path)
    if card.kind != "adapter":
        raise SoupError(f"{path} is a {card.kind} folder, not a LoRA adapter")
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (path / name).is_file():
            raise ModelFolderError(f"{path}: missing {name}")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    unsupported = {
        k: config.get(k)
        for k in ("use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "modules_to_save")
        if config.get(k)
    }
    if unsupported:
        raise SoupError(f"{path}: unsupported adapter settings {unsupported}")
    base_uri = resolve_base(uri, card)
    try:
        base = stage_folder(base_uri, endpoint_url)
    except FolderNotPublishedError:
        raise ModelFolderError(f"{path}: base model folder {base_uri} not found") from None
    return Adapter(
        path=path,
        card=card,
        base_path=base,
        base_digest=card.base_digest or weights_digest(base),
        digest=folder_digest(path),
        alpha=float(config["lora_alpha"]),
        rslora=bool(config.get("use_rslora")),
        factors=_factors(path, load_file(str(path / ADAPTER_WEIGHTS))),
        uri=uri,
        base_uri=base_uri,
    )


def _factors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix, slot in ((LORA_A, "A"), (LORA_B, "B")):
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix(PEFT_PREFIX)
                modules.setdefault(module, {})[slot] = tensor
                break
        else:
            raise SoupError(f"{path}: unexpected tensor {key!r} in {ADAPTER_WEIGHTS}")
    for module, pair in modules.items():
        missing = sorted({"A", "B"} - set(pair))
        if missing:
            raise SoupError(f"{path}: module {module} lacks lora_{missing[0]}")
        if pair["A"].shape[0] != pair["B"].shape[1]:
            raise SoupError(f"{path}: module {module} has A {tuple(pair['A'].shape)} and "
                            f"B {tuple(pair['B'].shape)} of different ranks")  # fmt: skip
    return {m: (p["A"], p["B"]) for m, p in sorted(modules.items())}


# --------------------------------------------------------------------------- validation


def check_compatible(adapters: Sequence[Adapter], method: SoupMethod) -> None:
    """Raise ``SoupError`` naming the first adapter (and module) that does not fit the first."""
    if not adapters:
        raise SoupError("souping needs at least one adapter")
    first = adapters[0]
    current = weights_digest(first.base_path)
    if current != first.base_digest:
        raise SoupError(
            f"adapter {first.path}: its base {first.base_path} changed since training "
            f"(weights digest {current[:12]}, trained on {first.base_digest[:12]})"
        )
    for other in adapters[1:]:
        if other.base_digest != first.base_digest:
            raise SoupError(
                f"adapter {other.path} was trained on base {other.base_path} (weights digest "
                f"{other.base_digest[:12]}), adapter {first.path} on {first.base_path} "
                f"({first.base_digest[:12]}): adapters of different base models cannot be souped"
            )
        if other.card.template != first.card.template:
            raise SoupError(
                f"adapter {other.path} uses template {other.card.template!r}, adapter "
                f"{first.path} uses {first.card.template!r}"
            )
        _check_modules(first, other)
        for module in first.factors:
            _check_shapes(first, other, module, method)


def _check_modules(first: Adapter, other: Adapter) -> None:
    extra = sorted(set(other.factors) - set(first.factors))
    missing = sorted(set(first.factors) - set(other.factors))
    if extra or missing:
        parts = []
        if extra:
            parts.append(
                f"targets {extra[0]} (and {len(extra) - 1} more) that {first.path} does not"
            )
        if missing:
            parts.append(f"does not target {missing[0]} (and {len(missing) - 1} more) that "
                         f"{first.path} does")  # fmt: skip
        raise SoupError(f"adapter {other.path} " + "; ".join(parts))


def _check_shapes(first: Adapter, other: Adapter, module: str, method: SoupMethod) -> None:
    (a1, b1), (a2, b2) = first.factors[module], other.factors[module]
    if a1.shape[1] != a2.shape[1] or b1.shape[0] != b2.shape[0]:
        raise SoupError(
            f"adapter {other.path}, module {module}: update shape {(b2.shape[0], a2.shape[1])} "
            f"differs from {(b1.shape[0], a1.shape[1])} of {first.path}"
        )
    if method == "factors":
        if a1.shape[0] != a2.shape[0]:
            raise SoupError(
                f"adapter {other.path}, module {module}: rank {a2.shape[0]} differs from "
                f"rank {a1.shape[0]} of {first.path}; 'factors' needs equal ranks (use 'delta')"
            )
        if not math.isclose(first.scale(module), other.scale(module)):
            raise SoupError(
                f"adapter {other.path}, module {module}: scale {other.scale(module)} differs "
                f"from {first.scale(module)} of {first.path}; 'factors' needs equal scales"
            )


def resolve_weights(
    weights: Sequence[float] | None, count: int, normalize: bool = True
) -> list[float]:
    """Uniform when ``weights`` is None; otherwise finite, one per adapter, positive sum."""
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise SoupError(f"{len(values)} soup weights for {count} adapters")
    bad = [w for w in values if not math.isfinite(w)]
    if bad:
        raise SoupError(f"soup weights must be finite, got {values}")
    total = sum(values)
    if not total > 0:
        raise SoupError(f"soup weights must sum to a positive number, got {values} (sum {total})")
    return [w / total for w in values] if normalize else values


# --------------------------------------------------------------------------- arithmetic


def iter_soup_updates(
    adapters: Sequence[Adapter], weights: Sequence[float], method: Literal["delta", "factors"]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(module name, souped weight update in float64), one module at a time: a consumer
    that applies each and lets it go holds one module's dense update, never the model's
    (all of them at once would be ~16 GB for a 2B model, ~57 GB for 7B)."""
    for module in adapters[0].factors:
        if method == "delta":
            update = _weighted_sum(module, adapters, weights)
        elif method == "factors":
            pairs = list(zip(weights, adapters, strict=True))
            a_mix = sum(w * a.factors[module][0].double() for w, a in pairs)
            b_mix = sum(w * a.factors[module][1].double() for w, a in pairs)
            update = adapters[0].scale(module) * (b_mix @ a_mix)
        else:
            raise SoupError(f"unknown soup arithmetic {method!r}")
        yield module, update


def _weighted_sum(module: str, adapters: Sequence[Adapter], weights: Sequence[float]):
    """``sum_i w_i * s_i * B_i @ A_i`` accumulated in place: two dense float64 matrices
    alive at a time (the sum and the next product), the same operations in the same order
    as the plain expression, so the same bits."""
    total = None
    for w, adapter in zip(weights, adapters, strict=True):
        a, b = adapter.factors[module]
        part = (b.double() @ a.double()).mul_(adapter.scale(module)).mul_(w)
        total = part if total is None else total.add_(part)
        del part
    return total


def soup_updates(
    adapters: Sequence[Adapter], weights: Sequence[float], method: Literal["delta", "factors"]
) -> dict[str, torch.Tensor]:
    """Module name -> the souped weight update (float64), every module at once (for
    inspection and tests; ``soup`` streams ``iter_soup_updates`` instead)."""
    return dict(iter_soup_updates(adapters, weights, method))


def apply_updates(
    model: torch.nn.Module,
    updates: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> None:
    """Add each update to its module's weight in place (in the weight's own dtype), one
    module at a time when ``updates`` streams them."""
    owned = not isinstance(updates, Mapping)  # streamed updates are ours to add into
    pairs = updates.items() if isinstance(updates, Mapping) else updates
    with torch.no_grad():
        for module, update in pairs:
            weight = model.get_submodule(module).weight
            if weight.shape != update.shape:
                raise SoupError(
                    f"module {module}: update {tuple(update.shape)} does not fit weight "
                    f"{tuple(weight.shape)} of the base model"
                )
            update = update.to(weight.device)
            merged = update.add_(weight) if owned else weight.double() + update
            weight.copy_(merged.to(weight.dtype))
            del merged, update


def base_embedder(adapter: Adapter, device: torch.device | str | None = None) -> RzenEmbedder:
    """The adapters' base model as an embedder, queried with the adapter's template."""
    from rzenembed.config import ModelConfig

    cfg = ModelConfig(
        name_or_path=str(adapter.base_path), template=adapter.card.template,
        **adapter.card.settings,
    )  # fmt: skip
    return RzenEmbedder.from_pretrained(adapter.base_path, config=cfg, device=device)


# --------------------------------------------------------------------------- greedy


@dataclass
class GreedyTrace:
    """How the greedy soup was chosen: every score it looked at."""

    alone: dict[str, float] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def greedy_select(
    adapters: Sequence[Adapter],
    score: Callable[[RzenEmbedder], float],
    device: torch.device | str | None = None,
) -> tuple[list[int], GreedyTrace]:
    """Indices of the adapters the greedy soup keeps, and the scores behind the choice.

    One base model is loaded; the targeted weights are saved once and restored before each
    candidate soup is applied, so every candidate is scored on exactly base + its soup.
    """
    embedder = base_embedder(adapters[0], device)
    model = embedder.hf_model
    originals = {m: model.get_submodule(m).weight.detach().clone() for m in adapters[0].factors}

    def scored(indices: list[int]) -> float:
        with torch.no_grad():
            for module, weight in originals.items():
                model.get_submodule(module).weight.copy_(weight)
        chosen = [adapters[i] for i in indices]
        apply_updates(model, iter_soup_updates(chosen, resolve_weights(None, len(chosen)), "delta"))
        return float(score(embedder))

    trace = GreedyTrace()
    alone = [scored([i]) for i in range(len(adapters))]
    trace.alone = {adapters[i].name: alone[i] for i in range(len(adapters))}
    order = sorted(range(len(adapters)), key=lambda i: -alone[i])
    kept, best = [order[0]], alone[order[0]]
    for i in order[1:]:
        candidate = scored([*kept, i])
        keep = candidate >= best
        trace.steps.append({"adapter": adapters[i].name, "score": candidate, "best": best,
                            "kept": keep})  # fmt: skip
        if keep:
            kept, best = [*kept, i], candidate
    trace.kept = [adapters[i].name for i in kept]
    return kept, trace


# --------------------------------------------------------------------------- the soup


@dataclass
class SoupResult:
    path: Path
    recipe: dict[str, Any]


def soup(
    adapter_paths: Sequence[str | Path],
    out_dir: str | Path,
    method: SoupMethod = "delta",
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    score: Callable[[RzenEmbedder], float] | None = None,
    device: torch.device | str | None = None,
    endpoint_url: str | None = None,
) -> SoupResult:
    """Combine the adapters in ``adapter_paths`` into a merged model folder at ``out_dir``.

    ``weights`` (one per adapter, uniform when omitted) are normalised to sum to 1 unless
    ``normalize`` is False. ``greedy`` needs ``score``: a held-out score of an embedder,
    higher is better. The folder is written under a temporary name and renamed when
    complete; a failed check leaves nothing behind.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; souping never overwrites a model")
    adapters = [load_adapter(p, endpoint_url) for p in adapter_paths]
    check_compatible(adapters, "factors" if method == "factors" else "delta")
    if method == "greedy":
        if score is None:
            raise SoupError("greedy souping needs a score function (held-out evaluation)")
        if weights is not None:
            raise SoupError("greedy souping chooses uniform weights; do not pass weights")
        kept, trace = greedy_select(adapters, score, device)
        chosen, final_weights, arithmetic = [adapters[i] for i in kept], None, "delta"
    else:
        chosen, trace, arithmetic = adapters, None, method
        final_weights = weights
    resolved = resolve_weights(final_weights, len(chosen), normalize)
    recipe = _recipe(method, adapters, chosen, resolved, normalize, trace)
    embedder = base_embedder(chosen[0], device)
    apply_updates(embedder.hf_model, iter_soup_updates(chosen, resolved, arithmetic))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        embedder.save_pretrained(staging, extra={"soup": recipe, **nested_dimensions(chosen)})
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SoupResult(out, recipe)


def nested_dimensions(chosen: list[Adapter]) -> dict[str, Any]:
    """The nested dimensions every souped adapter was trained for (``loss.matryoshka``),
    as the souped card's ``matryoshka`` entry; nothing when one adapter was trained
    without them (a prefix only one ingredient learned is not a trained size of the soup)."""
    sets = [set(trained_dimensions(a.card.extra)) for a in chosen]
    common = sorted(set.intersection(*sets)) if sets else []
    return {"matryoshka": {"dims": common}} if common else {}


def _recipe(method, adapters, chosen, weights, normalize, trace) -> dict[str, Any]:
    first = adapters[0]
    return {
        "method": method,
        "normalize": normalize,
        "base_model": first.base_uri,
        "base_digest": first.base_digest,
        "adapters": [
            {
                "name": a.name,
                "path": a.uri,
                "digest": a.digest,
                "stage": a.card.extra.get("stage"),
                "mixture": a.card.extra.get("mixture"),
                "manifest_digest": a.card.extra.get("manifest_digest"),
                # What it was trained on: int8 ranges are calibrated on a sample of it.
                "stage_manifest": a.card.extra.get("stage_manifest"),
                "weight": weights[chosen.index(a)] if a in chosen else 0.0,
                "kept": a in chosen,
            }
            for a in adapters
        ],
        "greedy": None if trace is None else vars(trace),
    }


def random_adapters(
    modules: Sequence[str], shape: tuple[int, int], count: int, rank: int, seed: int = 0
) -> list[Adapter]:
    """``count`` in-memory adapters with random factors on every module of ``shape`` (out,
    in) and scale 2: the arithmetic's inputs for the soup benchmark and tests (no folder,
    card or base behind them)."""
    generator = torch.Generator().manual_seed(seed)
    out, inputs = shape
    return [
        Adapter(
            path=Path(f"adapter-{k}"),
            card=None,  # type: ignore[arg-type]
            base_path=Path("base"),
            base_digest="",
            digest="",
            alpha=2.0 * rank,
            rslora=False,
            factors={
                m: (
                    torch.randn(rank, inputs, generator=generator) * 0.01,
                    torch.randn(out, rank, generator=generator) * 0.01,
                )
                for m in modules
            },
        )
        for k in range(count)
    ]


# --------------------------------------------------------------------------- the pipeline step


def _soup_task(cfg: PipelineConfig, adapters: list[str], out_uri: str, weights, eval_sets):
    from rzenembed.evaluation.actors import stage_eval_set
    from rzenembed.modeling.digest import digests_of
    from rzenembed.runtime import task_runtime

    endpoint = cfg.storage.endpoint_url
    runtime = task_runtime(cfg.model, cfg.compute)
    score = None
    if cfg.soup.method == "greedy":
        sets = [str(stage_eval_set(s, endpoint)) for s in eval_sets]

        def score(embedder) -> float:
            from rzenembed.evaluation import evaluate

            results = evaluate(
                embedder,
                sets,
                batch_size=cfg.eval.batch_size,
                datasets=cfg.eval.datasets,
                ndcg_k=cfg.eval.ndcg_k,
            )
            return sum(r.score for r in results) / len(results)

    from rzenembed.data.folders import publish_folder

    work = Path(tempfile.mkdtemp(prefix="rzenembed-soup-"))
    try:
        result = soup(
            adapters,
            work / "soup",
            cfg.soup.method,
            weights,
            cfg.soup.normalize,
            score,
            device=runtime.device,
            endpoint_url=endpoint,
        )
        digests = digests_of(result.path)
        publish_folder(result.path, out_uri, endpoint, **digests)
        return {"recipe": result.recipe, **digests}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def soup_step(
    cfg: PipelineConfig,
    adapters: list[str],
    out_uri: str,
    weights: list[float] | None,
    eval_sets: Sequence[str] = (),
) -> dict[str, Any]:
    """The adapters souped and published at ``out_uri`` (or the published soup read back):
    ``{"recipe", "digest", "weights_digest"}``."""
    from rzenembed.compute.steps import on_ray
    from rzenembed.data.folders import is_published, published_info

    endpoint = cfg.storage.endpoint_url
    if is_published(out_uri, endpoint):
        info = published_info(out_uri, endpoint) or {}
        card = json.loads((stage_folder(out_uri, endpoint) / "rzenembed.json").read_text())
        return {
            "recipe": card["extra"]["soup"],
            "digest": info["digest"],
            "weights_digest": info["weights_digest"],
        }
    return on_ray(cfg, _soup_task, cfg, list(adapters), out_uri, weights, list(eval_sets))
