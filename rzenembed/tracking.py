"""MLflow tracking and lineage of pipeline executions.

One parent run per pipeline execution, one child run per step. Every child run records
what it read and what it wrote as ``LineageRef``s in a ``lineage.json`` artifact (the full
URIs and digests, and the run that produced each input) and, for the MLflow UI, as MLflow
dataset inputs and LoggedModel inputs/outputs. Adapters and the souped model are MLflow
LoggedModels; the souped model is registered with alias ``candidate`` and evaluation moves
``champion`` only when the candidate beats it. ``lineage(model_uri)`` walks from a
registered model version back to the raw source datasets.

Nothing secret reaches MLflow: params, tags and JSON artifacts go through ``redact``, which
masks values of secret-looking keys, credentials inside URLs, and any value equal to a
secret environment variable.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rzenembed.config import PipelineConfig, TrackingConfig

REDACTED = "***"
SECRET_WORDS = {"SECRET", "PASSWORD", "PASSWD", "TOKEN", "CREDENTIAL", "CREDENTIALS", "APIKEY"}
NOT_SECRETS = {"true", "false", "none", "null", "yes", "no"}
URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+(:[^/@\s]*)?@", re.I)
LINEAGE_FILE = "lineage.json"
STEP_TAG = "rzenembed.step"
PIPELINE_TAG = "rzenembed.pipeline"
DIGEST_TAG = "rzenembed.digest"
REGISTERED_BY_TAG = "rzenembed.registered_by"
EVAL_DIGEST_TAG = "rzenembed.evaluation_digest"  # what the score tags were computed on
MAX_PARAM_CHARS = 6000


# --------------------------------------------------------------------------- secrets


def is_secret_name(name: str) -> bool:
    """AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, api_key, HF_TOKEN: yes;
    TOKENIZERS_PARALLELISM, key_frames: no (whole words of the name decide)."""
    words = set(re.split(r"[_\-.\s]+", name.upper()))
    if words & SECRET_WORDS:
        return True
    return "KEY" in words and bool(words & {"ACCESS", "API", "PRIVATE", "SECRET"})


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names are secret (AWS keys, tokens, ...)."""
    env = os.environ if environ is None else environ
    values = {
        v for k, v in env.items()
        if is_secret_name(k) and len(v) >= 4 and v.lower() not in NOT_SECRETS
    }  # fmt: skip
    return sorted(values, key=len, reverse=True)


def redact(value: Any, secrets: Iterable[str] | None = None) -> Any:
    """``value`` with secrets masked, recursively through dicts and lists."""
    secrets = list(secret_values() if secrets is None else secrets)
    if isinstance(value, Mapping):
        return {
            k: REDACTED if is_secret_name(str(k)) and v not in (None, "") else redact(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        text = URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", value)
        for secret in secrets:
            text = text.replace(secret, REDACTED)
        return text
    return value


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys -> string values (lists as JSON), for MLflow params."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            out[name] = text[:MAX_PARAM_CHARS]
    return out


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=cwd, timeout=10, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------- lineage refs


@dataclass
class LineageRef:
    """A dataset version, stage manifest, model, report or raw source a step read or wrote.

    ``run_id`` is the MLflow run that produced it (None for raw sources). ``model_id`` is
    its MLflow LoggedModel, for models.
    """

    kind: str  # raw | dataset | stage-manifest | model | adapter | report | eval-sets
    name: str
    uri: str
    digest: str
    run_id: str | None = None
    model_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def identity(self) -> tuple[str, str, str]:
        """What makes two refs the same thing (one input read by several steps): kind, URI
        and digest; not the run that read it."""
        return (self.kind, self.uri, self.digest)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LineageRef:
        return cls(**data)


# --------------------------------------------------------------------------- the tracker


def artifact_location(cfg: TrackingConfig) -> str | None:
    """Where artifacts go: configured, else beside a SQLite file, else the server's default."""
    if cfg.artifact_location:
        return cfg.artifact_location
    if cfg.tracking_uri.startswith("sqlite:///"):
        db = Path(cfg.tracking_uri.removeprefix("sqlite:///"))
        return (db.parent.resolve() / "mlartifacts").as_uri()
    return None


def with_environment_tracking(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with ``MLFLOW_TRACKING_URI`` as its tracking URI when that is set: a service
    stack (or a cluster's worker pod) names its MLflow server once, for every config."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return cfg
    return cfg.model_copy(
        update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": uri})}
    )


@contextlib.contextmanager
def process_tracking_uri(uri: str):
    """MLflow's process-wide tracking URI set to ``uri`` for the block, then put back.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, which the flows and
    ``rzenembed serve`` read as the service stack's server: left behind, one pipeline's
    store would become the next flow's in the same process, and every child process's."""
    import mlflow

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


class _SerialClient:
    """An MlflowClient whose calls run one at a time in this process: steps run in threads,
    and a SQLite store answers concurrent writers with "database is locked"."""

    _lock = threading.RLock()

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return call


class Tracker:
    """Explicit-run-id MLflow calls (no fluent active-run state, safe across threads)."""

    def __init__(self, cfg: TrackingConfig):
        from mlflow import MlflowClient

        self.cfg = cfg
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.client = _SerialClient(
            MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
        )
        found = self.client.get_experiment_by_name(cfg.experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(
                cfg.experiment, artifact_location=artifact_location(cfg)
            )
        else:
            self.experiment_id = found.experiment_id

    # runs ------------------------------------------------------------------

    def start_pipeline(self, cfg: PipelineConfig, flow_run_id: str | None, digest: str) -> str:
        tags = {
            PIPELINE_TAG: "true",
            "rzenembed.config_digest": digest,
            "rzenembed.git_commit": git_commit(Path(__file__).parent),
            "rzenembed.prefect_flow_run_id": flow_run_id or "none",
            "rzenembed.config_name": cfg.name,
        }
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"{cfg.name}-pipeline")
        config = redact(cfg.model_dump(mode="json"))
        self.log_params(run.info.run_id, {"config_digest": digest, "config_name": cfg.name})
        self.log_json(run.info.run_id, "config.json", config)
        return run.info.run_id

    def start_step(
        self, parent_run_id: str | None, step: str, name: str, section: Mapping[str, Any]
    ) -> str:
        tags = {STEP_TAG: step}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        self.log_params(run.info.run_id, flatten(redact(dict(section))))
        return run.info.run_id

    def end(self, run_id: str, failed: bool = False) -> None:
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in redact(dict(params)).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, rows: Iterable[tuple[str, float, int]]) -> None:
        """(key, value, step) rows, in batches."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(s)) for k, v, s in rows]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[start : start + 1000])

    def log_json(self, run_id: str, name: str, data: Any) -> None:
        self.log_text(run_id, name, json.dumps(redact(data), indent=2, sort_keys=True) + "\n")

    def log_text(self, run_id: str, name: str, text: str, artifact_path: str | None = None) -> None:
        """``text`` as the run's artifact ``[artifact_path/]name``."""
        self.log_bytes(run_id, name, text.encode(), artifact_path)

    def add_model_file(self, model_id: str, name: str, data: bytes) -> None:
        """``data`` as the file ``name`` among a LoggedModel's uploaded files (one written
        beside the weights after the upload, such as the int8 calibration)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_model_artifact(model_id, str(path))

    def log_bytes(
        self, run_id: str, name: str, data: bytes, artifact_path: str | None = None
    ) -> None:
        """``data`` (a picture, say) as the run's artifact ``[artifact_path/]name``."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    # lineage ---------------------------------------------------------------

    def record_lineage(
        self, run_id: str, step: str, inputs: list[LineageRef], outputs: list[LineageRef]
    ) -> None:
        """lineage.json, plus MLflow dataset and LoggedModel inputs for the UI."""
        from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput

        datasets, models = [], []
        for ref in inputs:
            if ref.model_id:
                models.append(LoggedModelInput(ref.model_id))
            elif ref.kind in ("raw", "dataset", "stage-manifest"):
                source = json.dumps({"uri": redact(ref.uri)})
                dataset = Dataset(ref.name, ref.digest[:36], ref.kind, source)
                datasets.append(DatasetInput(dataset, [InputTag("mlflow.data.context", step)]))
        if datasets or models:
            self.client.log_inputs(run_id, datasets=datasets or None, models=models or None)
        payload = {"step": step, "inputs": [r.to_json() for r in inputs],
                   "outputs": [r.to_json() for r in outputs]}  # fmt: skip
        self.log_json(run_id, LINEAGE_FILE, payload)

    def read_lineage(self, run_id: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            path = self.client.download_artifacts(run_id, LINEAGE_FILE, tmp)
            return json.loads(Path(path).read_text())

    # models ----------------------------------------------------------------

    def log_model(
        self, run_id: str, name: str, folder: str | Path, model_type: str,
        params: Mapping[str, Any], tags: Mapping[str, str], upload: bool = True,
        endpoint_url: str | None = None,
    ) -> str:  # fmt: skip
        """A LoggedModel produced by ``run_id``, tagged with its folder's URI on the storage
        root; its files are also uploaded as MLflow artifacts when ``upload`` (a remote
        folder is staged here first: on a cluster prefer ``tracking.upload_models: false``,
        the storage root already holds the model)."""
        from mlflow.entities import LoggedModelOutput

        from rzenembed.data.folders import stage_folder
        from rzenembed.data.storage import is_remote

        uri = str(folder) if is_remote(str(folder)) else str(Path(folder).resolve())
        model = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=run_id, model_type=model_type,
            params={k: str(v) for k, v in redact(dict(params)).items()},
            tags={**redact(dict(tags)), "rzenembed.folder": uri},
        )  # fmt: skip
        if upload:
            self.client.log_model_artifacts(model.model_id, str(stage_folder(uri, endpoint_url)))
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        return model.model_id

    def model_folder(self, version: Any) -> str | None:
        """The storage-root folder a registered version's model was logged from (its
        LoggedModel's ``rzenembed.folder`` tag), or None when that is not recorded."""
        from mlflow.exceptions import MlflowException

        model_id = version.tags.get("rzenembed.model_id")
        if not model_id:
            return None
        try:
            return self.client.get_logged_model(model_id).tags.get("rzenembed.folder")
        except MlflowException:
            return None

    def version_with_digest(self, digest: str) -> Any | None:
        """The registered version whose model has this content digest (the oldest if there
        were ever several), or None."""
        from mlflow.exceptions import MlflowException

        name = self.cfg.registered_model
        query = f"name = '{name}' AND tags.`{DIGEST_TAG}` = '{digest}'"
        try:
            found = self.client.search_model_versions(query)
        except MlflowException:  # no such registered model yet
            return None
        found = [v for v in found if v.tags.get(DIGEST_TAG) == digest]
        return min(found, key=lambda v: int(v.version)) if found else None

    def register(
        self, model_id: str, run_id: str, digest: str, tags: Mapping[str, str]
    ) -> tuple[str, bool]:
        """The registered version of the model with content ``digest``, alias ``candidate``;
        returns (version, reused).

        One identity, one version: when a version with this digest exists (a rerun, the
        same training on another storage root), it is reused instead of registering a
        duplicate; the registering run is added to its ``rzenembed.registered_by`` tag and
        the run is tagged with the version it resolved to.
        """
        from mlflow.exceptions import MlflowException

        # The registry resolves a models:/ source through the process's tracking URI.
        with process_tracking_uri(self.cfg.tracking_uri):
            name = self.cfg.registered_model
            existing = self.version_with_digest(digest)
            if existing is not None:
                version, reused = str(existing.version), True
                runs = json.loads(existing.tags.get(REGISTERED_BY_TAG, "[]"))
                if run_id not in runs:
                    runs.append(run_id)
                    self.client.set_model_version_tag(
                        name, version, REGISTERED_BY_TAG, json.dumps(runs)
                    )
            else:
                with contextlib.suppress(MlflowException):  # already registered
                    self.client.create_registered_model(name)
                created = self.client.create_model_version(
                    name,
                    source=f"models:/{model_id}",
                    run_id=run_id,
                    model_id=model_id,
                    tags={
                        **redact(dict(tags)),
                        DIGEST_TAG: digest,
                        "rzenembed.model_id": model_id,
                        REGISTERED_BY_TAG: json.dumps([run_id]),
                    },
                )
                version, reused = str(created.version), False
        self.client.set_tag(run_id, "rzenembed.registered_version", f"{name}/{version}")
        self.client.set_tag(run_id, "rzenembed.reused_version", str(reused).lower())
        self.client.set_registered_model_alias(name, "candidate", version)
        return version, reused

    def champion(self) -> Any | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.cfg.registered_model, "champion")
        except MlflowException:
            return None

    def promote_if_better(
        self,
        version: str,
        metric: str,
        score: float,
        min_improvement: float = 0.0,
        evaluation_digest: str | None = None,
        rescore: Callable[[Any], float | None] | None = None,
        paired: Callable[[Any], dict[str, Any] | None] | None = None,
    ) -> dict[str, Any]:
        """Move ``champion`` to ``version`` when its score beats the champion's by more than
        ``min_improvement`` (or there is no champion); the decision and both scores are
        tagged on the new version and returned.

        Scores are compared only when both models were scored on the same evaluation sets
        (``evaluation_digest``, tagged on each version). When the champion's digest differs
        (or it has none), ``rescore(champion_version)`` scores it again on the candidate's
        sets and that score is compared (and tagged on the champion); without ``rescore``,
        or when it returns None, the champion stays and the decision says why
        (``refused``).

        With ``paired`` (``eval.gating: significant``), a candidate whose mean beats the
        champion's must also beat it on the paired bootstrap: ``paired(champion_version)``
        gives the interval of candidate minus champion on the same queries
        (``uncertainty.paired_difference``), and its lower end must exceed
        ``min_improvement``; otherwise the champion stays and ``refused`` states the
        interval. When the two cannot be paired (a champion report without per-query
        scores), the means decide and the decision says so."""
        name = self.cfg.registered_model
        tag = f"rzenembed.score.{metric}"
        self.client.set_model_version_tag(name, version, tag, repr(score))
        if evaluation_digest is not None:
            self.client.set_model_version_tag(name, version, EVAL_DIGEST_TAG, evaluation_digest)
        current = self.champion()
        previous = None
        if current is not None and tag in current.tags:
            previous = float(current.tags[tag])
        already = current is not None and str(current.version) == str(version)
        refused, rescored = None, False
        champion_digest = None if current is None else current.tags.get(EVAL_DIGEST_TAG)
        comparable = current is None or already or evaluation_digest is None
        if not comparable and champion_digest != evaluation_digest:
            if rescore is None:
                refused = (
                    f"champion v{current.version} was scored on other evaluation sets "
                    f"(digest {str(champion_digest)[:12]}) than v{version} "
                    f"({evaluation_digest[:12]}); scores on different sets are not "
                    f"compared (eval.rescore_champion scores the champion again)"
                )
            else:
                again = rescore(current)
                if again is None:
                    refused = (
                        f"champion v{current.version} was scored on other evaluation sets "
                        f"and could not be scored again (its model folder is gone); move "
                        f"the alias by hand if v{version} should replace it"
                    )
                else:
                    previous, rescored = float(again), True
                    self.client.set_model_version_tag(name, current.version, tag, repr(previous))
                    self.client.set_model_version_tag(
                        name, current.version, EVAL_DIGEST_TAG, evaluation_digest
                    )
        promoted = refused is None and (
            already or current is None or previous is None or score > previous + min_improvement
        )
        gating, interval = ("mean" if paired is None else "significant"), None
        contested = not already and current is not None and previous is not None
        if promoted and paired is not None and contested:
            interval = paired(current)
            if interval is None:
                gating = "mean (the champion's report has no per-query scores to pair)"
            elif interval["low"] <= min_improvement:
                promoted = False
                refused = (
                    f"the paired {100 * interval['confidence']:.0f}% interval of candidate "
                    f"minus champion v{current.version} on {metric} is "
                    f"[{100 * interval['low']:+.1f}, {100 * interval['high']:+.1f}] points "
                    f"(mean {100 * interval['difference']:+.1f}, {interval['queries']} queries): "
                    f"it does not lie above {100 * min_improvement:g} (eval.gating: significant)"
                )
        if promoted:
            self.client.set_registered_model_alias(name, "champion", version)
        decision = {
            "candidate_version": version,
            "candidate_score": score,
            "champion_version": None if current is None else str(current.version),
            "champion_score": previous,
            "metric": metric,
            "min_improvement": min_improvement,
            "promoted": promoted,
            "already_champion": already,
            "champion_rescored": rescored,
            "refused": refused,
            "gating": gating,
            "paired": interval,
        }
        self.client.set_model_version_tag(
            name, version, "rzenembed.promotion", json.dumps(decision)
        )
        return decision


# --------------------------------------------------------------------------- the walk


@dataclass
class LineageNode:
    ref: LineageRef
    step: str | None = None
    children: list[LineageNode] = field(default_factory=list)
    seen_before: bool = False


def resolve_model_version(tracker: Tracker, model_uri: str) -> Any:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` -> the MLflow model version."""
    if not model_uri.startswith("models:/"):
        raise ValueError(f"expected models:/NAME/VERSION or models:/NAME@ALIAS, got {model_uri}")
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return tracker.client.get_model_version_by_alias(name, alias)
    name, _, version = rest.rpartition("/")
    if not name:
        raise ValueError(f"expected models:/NAME/VERSION or models:/NAME@ALIAS, got {model_uri}")
    return tracker.client.get_model_version(name, version)


def lineage(tracker: Tracker, model_uri: str) -> LineageNode:
    """The tree of everything the registered model came from, down to raw sources."""
    version = resolve_model_version(tracker, model_uri)
    model = tracker.client.get_logged_model(version.model_id or version.tags["rzenembed.model_id"])
    root_ref = LineageRef(
        kind="registered-model", name=f"{version.name} v{version.version}",
        uri=model_uri, digest=model.tags.get(DIGEST_TAG, ""),
        run_id=model.source_run_id, model_id=model.model_id,
        extra={"aliases": list(version.aliases), "folder": model.tags.get("rzenembed.folder"),
               "registered_digest": version.tags.get(DIGEST_TAG)},
    )  # fmt: skip
    return expand_lineage(tracker, root_ref)


def logged_models_with_digest(tracker: Tracker, digest: str) -> list[Any]:
    """Every LoggedModel (in any experiment) tagged with this content digest, oldest first."""
    experiments = [e.experiment_id for e in tracker.client.search_experiments()]
    found = tracker.client.search_logged_models(
        experiments, filter_string=f"tags.`{DIGEST_TAG}` = '{digest}'"
    )
    return sorted(found, key=lambda m: m.creation_timestamp)


def expand_lineage(tracker: Tracker, root_ref: LineageRef) -> LineageNode:
    """The tree under ``root_ref``: the inputs its producing run recorded, recursively."""
    root = LineageNode(root_ref)
    _expand(tracker, root, {})
    return root


def _expand(tracker: Tracker, node: LineageNode, seen: dict[str, LineageNode]) -> None:
    run_id = node.ref.run_id
    if not run_id:
        return
    if run_id in seen:
        node.seen_before = True
        node.step = seen[run_id].step
        return
    seen[run_id] = node
    data = tracker.read_lineage(run_id)
    node.step = data["step"]
    for raw in data["inputs"]:
        child = LineageNode(LineageRef.from_json(raw))
        node.children.append(child)
        _expand(tracker, child, seen)


def raw_sources(node: LineageNode) -> list[LineageRef]:
    """Every raw source reached from ``node``."""
    found = [node.ref] if node.ref.kind == "raw" else []
    for child in node.children:
        found += raw_sources(child)
    return found


def render(
    node: LineageNode,
    prefix: str = "",
    last: bool = True,
    top: bool = True,
    shown: set[tuple[str, str, str]] | None = None,
) -> str:
    """A text tree: kind, name, digest (12 chars), the producing step and run. An input
    read by several steps (the evaluation sets every clean step checked) is printed in
    full once, then as "(as above)"; evaluation sets by count, not by their paths."""
    shown = set() if shown is None else shown
    ref = node.ref
    key = ref.identity
    producer = f" <- {node.step} run {ref.run_id}" if ref.run_id else ""
    where = f"{len(ref.extra.get('sets', []))} sets" if ref.kind == "eval-sets" else ref.uri
    again = node.seen_before or (not ref.run_id and key in shown)
    if again:
        line = f"{ref.kind} {ref.name} [{ref.digest[:12]}] (as above)"
    else:
        line = f"{ref.kind} {ref.name} [{ref.digest[:12]}] {where}{producer}"
    shown.add(key)
    if "eval_overlap" in ref.extra:  # a clean step's output: what decontamination removed
        counts = ", ".join(f"{k} {v}" for k, v in sorted(ref.extra["eval_overlap"].items()))
        line += f" | eval_overlap: {counts or 'none'}"
    out = [line if top else f"{prefix}{'└─ ' if last else '├─ '}{line}"]
    inner = prefix if top else prefix + ("   " if last else "│  ")
    for i, child in enumerate(node.children):
        out.append(render(child, inner, i == len(node.children) - 1, top=False, shown=shown))
    return "\n".join(out)
