"""Verify a model and everything on its lineage against the files as they are now.

``verify(tracker, target)`` takes a registered model (``models:/NAME/VERSION``,
``models:/NAME@ALIAS``) or a model folder, walks the lineage MLflow recorded for it
(adapters, merged models, stage manifests, every dataset version, the raw sources) and
recomputes each node's digest from the files on the storage root, by the same rules that
produced the recorded one:

=================  ==================================================================
kind               recomputed from
=================  ==================================================================
model, adapter     the folder's tensors and canonical config files (``folder_digest``;
                   ``weights_digest`` for base models and captioners)
dataset            every data and reject shard's bytes, then the version's content digest
stage-manifest     the manifest's content (datasets, digests, rows, probabilities)
raw                the source folder's data files and media listing (``source_digest``)
report             the report's canonical JSON (scores and model digest)
eval-sets          the tables of the evaluation sets a clean step decontaminated against
=================  ==================================================================

Each node is OK (same digest), CHANGED (another digest; the detail names the shard or file
when one can be named) or MISSING (the folder, manifest or shard is gone). Shards are
hashed on a thread pool: hashing releases the GIL, and on S3 the reads overlap.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rzenembed.tracking import (
    DIGEST_TAG,
    LineageNode,
    LineageRef,
    Tracker,
    expand_lineage,
    lineage,
    logged_models_with_digest,
)

OK, CHANGED, MISSING = "OK", "CHANGED", "MISSING"
_BLOCK = 8 << 20


@dataclass
class Check:
    status: str
    digest: str | None = None  # what the files give now (None when they are missing)
    detail: str = ""


@dataclass
class VerifiedNode:
    ref: LineageRef
    check: Check
    step: str | None = None
    seen_before: bool = False
    children: list[VerifiedNode] = field(default_factory=list)

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.ref.kind,
            "name": self.ref.name,
            "uri": self.ref.uri,
            "recorded": self.ref.digest,
            "now": self.check.digest,
            "status": self.check.status,
            "detail": self.check.detail,
            "step": self.step,
            "seen_before": self.seen_before,
            "inputs": [c.to_json() for c in self.children],
        }


@dataclass
class Verification:
    root: VerifiedNode

    @property
    def counts(self) -> dict[str, int]:
        out = {OK: 0, CHANGED: 0, MISSING: 0}
        for node in self.root.walk():
            out[node.check.status] += 1
        return out

    @property
    def ok(self) -> bool:
        return all(node.check.status == OK for node in self.root.walk())

    def failures(self) -> list[VerifiedNode]:
        return [n for n in self.root.walk() if n.check.status != OK and not n.seen_before]


# --------------------------------------------------------------------------- one node


def _sha256_of(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def check_dataset(ref: LineageRef, endpoint_url: str | None, pool: ThreadPoolExecutor) -> Check:
    from rzenembed.data.storage import filesystem, join
    from rzenembed.data.version import DatasetVersion, ShardInfo, VersionNotFoundError
    from rzenembed.data.version import content_digest as version_digest

    try:
        version = DatasetVersion.open(ref.uri, endpoint_url)
    except (VersionNotFoundError, FileNotFoundError):
        return Check(MISSING, detail="no committed manifest")
    manifest = version.manifest
    fs, folder = filesystem(ref.uri, endpoint_url)

    def hashed(info: ShardInfo) -> tuple[ShardInfo, str | None]:
        path = join(folder, info.path)
        try:
            return info, _sha256_of(fs, path)
        except FileNotFoundError:
            return info, None

    results = list(pool.map(hashed, manifest.shards + manifest.reject_shards))
    missing = [info.path for info, now in results if now is None]
    if missing:
        return Check(MISSING, detail=f"shard {missing[0]} is gone" + _more(missing))
    changed = [info.path for info, now in results if now != info.sha256]
    recomputed = [ShardInfo(info.path, info.rows, now or "") for info, now in results]
    count = len(manifest.shards)
    digest = version_digest(recomputed[:count], recomputed[count:])
    if changed:
        return Check(CHANGED, digest, f"shard {changed[0]} changed" + _more(changed))
    if digest != ref.digest:
        return Check(CHANGED, digest, "the manifest lists other shards than were recorded")
    return Check(OK, digest)


def _more(items: list[str]) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def check_stage_manifest(ref: LineageRef, endpoint_url: str | None) -> Check:
    from rzenembed.prep.mixture import StageManifest

    try:
        manifest = StageManifest.load(ref.uri, endpoint_url)
    except FileNotFoundError:
        return Check(MISSING, detail="stage manifest file is gone")
    digest = manifest.content_digest()
    return Check(OK if digest == ref.digest else CHANGED, digest)


def check_folder(ref: LineageRef, folder: str | None, endpoint_url: str | None) -> Check:
    """A model folder's digest recomputed from its files: a local folder in place, a remote
    one downloaded afresh (never the staging cache, which is keyed by the recorded digest)."""
    from rzenembed.data.folders import download_folder
    from rzenembed.data.storage import is_remote
    from rzenembed.modeling.digest import folder_digest, weights_digest

    if not folder or not _folder_present(folder, endpoint_url):
        return Check(MISSING, detail=f"model folder {folder} is gone")
    rule = weights_digest if ref.extra.get("digest_of") == "weights" else folder_digest
    try:
        if is_remote(folder):
            with tempfile.TemporaryDirectory(prefix="rzenembed-verify-") as tmp:
                download_folder(folder, Path(tmp), endpoint_url)
                digest = rule(Path(tmp))
        else:
            digest = rule(folder)
    except (FileNotFoundError, ValueError) as exc:
        return Check(CHANGED, detail=str(exc))
    if digest != ref.digest:
        return Check(CHANGED, digest, "weights or config files differ from the recorded model")
    registered = ref.extra.get("registered_digest")
    if registered and registered != ref.digest:
        return Check(CHANGED, digest, f"the registry records digest {registered[:12]}")
    return Check(OK, digest)


def _folder_present(folder: str, endpoint_url: str | None) -> bool:
    from rzenembed.data.folders import exists
    from rzenembed.data.storage import is_remote, join

    if not is_remote(folder):
        return Path(folder).is_dir()
    return any(
        exists(join(folder, name), endpoint_url) for name in ("config.json", "adapter_config.json")
    )


def check_raw(ref: LineageRef, endpoint_url: str | None) -> Check:
    from rzenembed.data.importers import SourceError, source_digest

    try:
        digest = source_digest(ref.uri, endpoint_url)
    except (SourceError, FileNotFoundError) as exc:
        return Check(MISSING, detail=str(exc))
    detail = "" if digest == ref.digest else "data files or media listing changed since ingest"
    return Check(OK if digest == ref.digest else CHANGED, digest, detail)


def check_report(ref: LineageRef, endpoint_url: str | None) -> Check:
    from rzenembed.data.folders import exists, read_text
    from rzenembed.identity import json_digest

    if not exists(ref.uri, endpoint_url):
        return Check(MISSING, detail="report file is gone")
    digest = json_digest(json.loads(read_text(ref.uri, endpoint_url)))
    return Check(OK if digest == ref.digest else CHANGED, digest)


def check_eval_sets(ref: LineageRef, endpoint_url: str | None) -> Check:
    """The evaluation sets a clean step decontaminated against, from their tables."""
    from rzenembed.data.storage import filesystem
    from rzenembed.prep.decontaminate import EvalSetRef, eval_keys_digest

    uris = list(ref.extra.get("sets", []))
    gone = [u for u in uris if not _exists(filesystem(u, endpoint_url))]
    if gone:
        return Check(MISSING, detail=f"evaluation set folders gone: {', '.join(gone)}")
    refs = [EvalSetRef(u.rstrip("/").rsplit("/", 1)[-1], u) for u in uris]
    digest = eval_keys_digest(refs, endpoint_url)
    return Check(OK if digest == ref.digest else CHANGED, digest)


def _exists(fs_and_path) -> bool:
    fs, path = fs_and_path
    return fs.exists(path)


def check_ref(ref: LineageRef, endpoint_url: str | None, pool: ThreadPoolExecutor) -> Check:
    """Recompute one node's digest from its files."""
    if ref.kind == "dataset":
        return check_dataset(ref, endpoint_url, pool)
    if ref.kind == "stage-manifest":
        return check_stage_manifest(ref, endpoint_url)
    if ref.kind == "registered-model":
        return check_folder(ref, ref.extra.get("folder"), endpoint_url)
    if ref.kind in ("model", "adapter"):
        return check_folder(ref, ref.uri, endpoint_url)
    if ref.kind == "raw":
        return check_raw(ref, endpoint_url)
    if ref.kind == "report":
        return check_report(ref, endpoint_url)
    if ref.kind == "eval-sets":
        return check_eval_sets(ref, endpoint_url)
    return Check(CHANGED, detail=f"unknown lineage kind {ref.kind!r}")


# --------------------------------------------------------------------------- the walk


def root_of(tracker: Tracker, target: str) -> LineageNode:
    """The lineage tree of a registered model URI or of a model folder (found in MLflow by
    its content digest)."""
    if target.startswith("models:/"):
        return lineage(tracker, target)
    from rzenembed.modeling.digest import folder_digest

    folder = Path(target)
    if not folder.is_dir():
        raise FileNotFoundError(f"{target}: neither a models:/ URI nor a local model folder")
    digest = folder_digest(folder)
    found = logged_models_with_digest(tracker, digest)
    if not found:
        raise ValueError(
            f"{target}: no model with digest {digest[:12]} is recorded in "
            f"{tracker.cfg.tracking_uri}; nothing to verify it against"
        )
    model = found[0]
    ref = LineageRef(
        kind="model",
        name=model.name,
        uri=str(folder.resolve()),
        digest=model.tags.get(DIGEST_TAG, ""),
        run_id=model.source_run_id,
        model_id=model.model_id,
    )
    return expand_lineage(tracker, ref)


def verify(
    tracker: Tracker,
    target: str,
    endpoint_url: str | None = None,
    jobs: int = 8,
    on_node: Callable[[LineageRef, Check], None] | None = None,
) -> Verification:
    """Recompute every digest on ``target``'s lineage; each distinct node is checked once."""
    tree = root_of(tracker, target)
    refs: dict[tuple, LineageRef] = {}
    stack = [tree]
    while stack:
        node = stack.pop()
        refs.setdefault(_key(node.ref), node.ref)
        stack.extend(node.children)
    checks: dict[tuple, Check] = {}
    with (
        ThreadPoolExecutor(max_workers=max(1, jobs)) as shards,
        ThreadPoolExecutor(max_workers=max(1, min(jobs, 4))) as nodes,
    ):
        futures = {k: nodes.submit(check_ref, r, endpoint_url, shards) for k, r in refs.items()}
        for key, future in futures.items():
            checks[key] = future.result()
            if on_node is not None:
                on_node(refs[key], checks[key])
    return Verification(_verified(tree, checks))


def _key(ref: LineageRef) -> tuple:
    return (ref.kind, ref.uri, ref.digest, json.dumps(ref.extra.get("digest_of")))


def _verified(node: LineageNode, checks: dict[tuple, Check]) -> VerifiedNode:
    return VerifiedNode(
        node.ref,
        checks[_key(node.ref)],
        node.step,
        node.seen_before,
        [_verified(c, checks) for c in node.children],
    )


def render(node: VerifiedNode, prefix: str = "", last: bool = True, top: bool = True) -> str:
    """A text tree: status, kind, name, recorded digest (12 chars), URI, and what differs."""
    ref, check = node.ref, node.check
    line = f"[{check.status}] {ref.kind} {ref.name} [{ref.digest[:12]}] {ref.uri}"
    if check.status != OK:
        now = f"now {check.digest[:12]}" if check.digest else "no digest"
        line += f"  <- {check.detail or 'digest differs'} ({now})"
    if node.seen_before:
        line += " (as above)"
    out = [line if top else f"{prefix}{'└─ ' if last else '├─ '}{line}"]
    inner = prefix if top else prefix + ("   " if last else "│  ")
    for i, child in enumerate(node.children):
        out.append(render(child, inner, i == len(node.children) - 1, top=False))
    return "\n".join(out)
