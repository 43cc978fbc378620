"""Mixture: the data manifest of one training stage (or one stage-2 data mixture).

It lists the dataset versions the stage trains on, with their sampling probabilities, so
the trainer needs nothing else and lineage can walk from a run to its exact data:

- from the mixture's weights (``stage2.mixtures[].datasets``), normalised; classification
  sources are represented by the merged classification dataset, which receives the sum of
  their weights;
- or, without weights (stage 1), proportional to size with a temperature:
  ``p_i ~ rows_i ** (1 / prep.mixture_temperature)`` (T = 1: by size; larger T: flatter).

The manifest is written once, at a location derived from its content, and is immutable.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from rzenembed.config import MixtureConfig, PipelineConfig
from rzenembed.data.schema import is_mined
from rzenembed.data.storage import filesystem, join
from rzenembed.data.version import DatasetVersion, ShardInfo, write_atomically
from rzenembed.identity import dumps_canonical, json_digest

STAGE_MANIFEST = "stage-manifest.json"
log = logging.getLogger(__name__)


@dataclass
class StageDataset:
    dataset: str
    uri: str
    content_digest: str
    rows: int
    task_group: str
    probability: float
    # The most hard negatives a row has (fixes K for every rank without reading the rows),
    # and sibling references that point at no row of their shard (counted, left empty).
    max_negatives: int | None = None
    unresolved_negatives: int = 0
    # Which of its negatives training reads: given | mined | both (the mixture's choice).
    negatives: str = "both"


@dataclass
class StageManifest:
    stage: str
    mixture: str
    datasets: list[StageDataset]
    digest: str = ""
    uri: str = ""

    def to_json(self) -> str:
        return dumps_canonical(asdict(self))

    def content_digest(self) -> str:
        """What the stage trains on: each dataset's name, content digest, rows, task group
        and probability. Where the versions live (their URIs) is left out, so the same data
        prepared under another storage root gives the same stage identity."""
        content = {
            "stage": self.stage,
            "mixture": self.mixture,
            "datasets": [asdict(d) for d in self.datasets],
        }
        return json_digest(content)

    @classmethod
    def load(cls, uri: str, endpoint_url: str | None = None) -> StageManifest:
        fs, path = filesystem(uri, endpoint_url)
        with fs.open(path if path.endswith(".json") else join(path, STAGE_MANIFEST), "r") as f:
            data = json.loads(f.read())
        data["datasets"] = [StageDataset(**d) for d in data["datasets"]]
        return cls(**data)


def _task_group(cfg: PipelineConfig, dataset: str) -> str:
    if dataset == cfg.prep.classification_dataset:
        return "image_classification"
    for source in cfg.sources:
        if source.name == dataset:
            return source.task_group
    raise KeyError(f"dataset {dataset!r} is not a configured source")


def mixture_weights(
    cfg: PipelineConfig, versions: dict[str, DatasetVersion], mixture: MixtureConfig | None
) -> dict[str, float]:
    """Unnormalised weight per dataset in ``versions``."""
    if mixture is None:
        power = 1.0 / cfg.prep.mixture_temperature
        return {name: float(v.rows) ** power for name, v in versions.items()}
    classification = {s.name for s in cfg.sources if s.classification}
    weights: dict[str, float] = {}
    for name, weight in mixture.datasets.items():
        target = cfg.prep.classification_dataset if name in classification else name
        if target not in versions:
            raise KeyError(f"mixture {mixture.name!r}: no prepared version of {target!r}")
        weights[target] = weights.get(target, 0.0) + weight
    return weights


@dataclass(frozen=True)
class NegativesProfile:
    """The most negatives any row has, by choice (given, mined, both), and the sibling
    references that point at no row of their shard."""

    given: int = 0
    mined: int = 0
    both: int = 0
    unresolved: int = 0

    def most(self, choice: str) -> int:
        return {"given": self.given, "mined": self.mined, "both": self.both}[choice]

    def __add__(self, other: NegativesProfile) -> NegativesProfile:
        return NegativesProfile(
            max(self.given, other.given),
            max(self.mined, other.mined),
            max(self.both, other.both),
            self.unresolved + other.unresolved,
        )


def _shard_negatives(job: tuple[str, ShardInfo, str | None]) -> NegativesProfile:
    """The ``NegativesProfile`` of one shard (mined references may name any shard of the
    version: they are never unresolved here)."""
    uri, shard, endpoint = job
    table = DatasetVersion.open(uri, endpoint).read_shard(shard, columns=["id", "negatives"])
    ids = set(table.column("id").to_pylist())
    profile = NegativesProfile()
    for negatives in table.column("negatives").to_pylist():
        mined = sum(is_mined(n) for n in negatives or [])
        given = len(negatives or []) - mined
        unresolved = sum(
            bool(n.get("ref")) and not is_mined(n) and n["ref"] not in ids for n in negatives or []
        )
        profile = profile + NegativesProfile(given, mined, given + mined, unresolved)
    return profile


_PROFILES: dict[str, NegativesProfile] = {}  # content digest -> profile, per process


def profile_negatives(
    version: DatasetVersion, show_progress: bool = False, in_process: bool = False
) -> NegativesProfile:
    """The ``NegativesProfile`` of ``version``: one pass over its ``id`` and ``negatives``
    columns, a Ray task per shard (``in_process``: shard by shard here); remembered per
    content digest, so the stage-2 mixtures of one run scan each version once."""
    from rzenembed.data.engine import run_shards

    known = _PROFILES.get(version.content_digest)
    if known is not None:
        return known
    jobs = [(version.uri, shard, version.endpoint_url) for shard in version.manifest.shards]
    if in_process:
        results = [_shard_negatives(job) for job in jobs]
    else:
        results = run_shards(_shard_negatives, jobs, show_progress=show_progress) if jobs else []
    profile = sum(results, NegativesProfile())
    _PROFILES[version.content_digest] = profile
    return profile


def run_mixture(
    cfg: PipelineConfig,
    stage: str,
    versions: dict[str, DatasetVersion],
    mixture: MixtureConfig | None = None,
) -> StageManifest:
    """Write (or find) the stage's data manifest for ``versions``."""
    weights = mixture_weights(cfg, versions, mixture)
    weights = {k: w for k, w in weights.items() if versions[k].rows > 0 and w > 0}
    if not weights:
        raise ValueError(f"stage {stage}: no non-empty dataset to train on")
    total = sum(weights.values())
    datasets = []
    choice = mixture.negatives if mixture is not None else "both"
    for name in sorted(weights):
        profile = profile_negatives(versions[name])
        if choice == "mined" and profile.mined == 0:
            log.warning(
                "%s: mixture %s trains on mined negatives but the dataset has none (is "
                "mining.enabled off?): its rows train on in-batch negatives only",
                name,
                mixture.name if mixture else "all",
            )
        unresolved = profile.unresolved
        if unresolved:
            log.warning(
                "%s: %d sibling negatives point at rows no longer in their shard (dropped "
                "by deduplication or the cap); their slots stay empty",
                name,
                unresolved,
            )
        datasets.append(
            StageDataset(
                name,
                versions[name].uri,
                versions[name].content_digest,
                versions[name].rows,
                _task_group(cfg, name),
                weights[name] / total,
                max_negatives=profile.most(choice),
                unresolved_negatives=unresolved,
                negatives=choice,
            )
        )
    manifest = StageManifest(stage, mixture.name if mixture else "all", datasets)
    manifest.digest = manifest.content_digest()
    folder = join(cfg.storage.root, "_stages", f"{stage}-{manifest.mixture}", manifest.digest[:16])
    manifest.uri = join(folder, STAGE_MANIFEST)
    fs, path = filesystem(manifest.uri, cfg.storage.endpoint_url)
    if not fs.exists(path):
        fs.makedirs(join(filesystem(folder, cfg.storage.endpoint_url)[1]), exist_ok=True)
        write_atomically(fs, path, manifest.to_json())
    return manifest
