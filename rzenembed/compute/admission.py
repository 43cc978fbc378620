"""Admission: what a step asks for, checked against what the cluster has *free* before
the step waits for it.

Ray queues a request it cannot place and waits, saying nothing: a Ray Train run asking
for 16 one-GPU workers while the champion's endpoint holds one of 16 GPUs, or an actor
pool larger than the GPUs, would wait forever. Before such a request, ``admit`` packs its
bundles (one per worker, actor or task: ``{"GPU": 1, "CPU": 8}``) onto the nodes:

- it fits what the nodes have free now: go on;
- it can never fit, even on an idle cluster grown by everything the autoscaler may add
  (``compute.autoscale``): fail at once, naming what was asked and what there is;
- otherwise wait, a progress line every 30 s naming who holds the resources (a Serve
  replica, another run's placement group, running tasks), and fail after
  ``compute.wait_timeout_s`` with that list. While it waits with ``compute.autoscale``
  set, the request is handed to Ray's autoscaler (``request_resources``): nothing has been
  submitted yet, so the autoscaler would otherwise see no demand to grow for.

Packing is first-fit over the bundles in decreasing size, node by node: a bundle never
spans nodes, as in Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

Resources = dict[str, float]
# Resources Ray reports per node that no request of ours asks for.
_IGNORED = ("memory", "object_store_memory")
# The first look after a request did not fit; each later one waits twice as long, up to
# ``admit``'s ``poll_s``.
FIRST_POLL_S = 0.1


class InfeasibleRequest(RuntimeError):
    """A request the cluster cannot meet: never, or not within ``compute.wait_timeout_s``."""


@dataclass(frozen=True)
class ResourceRequest:
    """What one step asks for: a name for messages and one bundle per worker/actor/task."""

    what: str
    bundles: tuple[Resources, ...]

    @classmethod
    def of(cls, what: str, count: int, bundle: Resources) -> ResourceRequest:
        clean = {k: float(v) for k, v in bundle.items() if v}
        return cls(what, tuple(dict(clean) for _ in range(count)))

    def describe(self) -> str:
        shapes: dict[str, int] = {}
        for bundle in self.bundles:
            key = fmt(bundle) or "no resources"
            shapes[key] = shapes.get(key, 0) + 1
        return ", ".join(f"{n} x {{{k}}}" for k, n in shapes.items())

    def kinds(self) -> set[str]:
        return {k for bundle in self.bundles for k in bundle}


def fmt(resources: Resources) -> str:
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if v)


def pack(bundles: Sequence[Resources], nodes: Sequence[Resources]) -> list[Resources] | None:
    """The bundles placed on the nodes (first fit, largest bundles first): the resources
    left on each node, or None when some bundle fits nowhere."""
    left = [dict(n) for n in nodes]
    for bundle in sorted(bundles, key=lambda b: sorted(b.items(), reverse=True), reverse=True):
        for node in left:
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return None
    return left


def totals(nodes: Sequence[Resources]) -> Resources:
    out: Resources = {}
    for node in nodes:
        for k, v in node.items():
            if k not in _IGNORED and ":" not in k and "_group_" not in k:
                out[k] = out.get(k, 0.0) + v
    return out


def live_nodes() -> list[Resources]:
    """Every live node's total resources, as Ray reports them."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def free_nodes() -> list[Resources]:
    """What every live node has free now (total less what actors, tasks and placement
    groups hold)."""
    import ray._private.state as state

    return [dict(free) for free in state.available_resources_per_node().values()]


def grown(
    nodes: Sequence[Resources], autoscale: Sequence[tuple[Resources, int]]
) -> list[Resources]:
    """The nodes the cluster has plus every node the autoscaler may add."""
    return [*nodes, *(dict(shape) for shape, count in autoscale for _ in range(count))]


def how_many_fit(bundle: Resources, limit: int, nodes: Sequence[Resources]) -> int:
    """How many copies of ``bundle`` (at most ``limit``) the nodes hold at once."""
    fitted = 0
    while fitted < limit and pack([bundle] * (fitted + 1), nodes) is not None:
        fitted += 1
    return fitted


def shortfall(request: ResourceRequest, nodes: Sequence[Resources], state: str = "") -> str:
    """Why the request does not fit: asked against what there is, in words."""
    asked, have = totals([dict(b) for b in request.bundles]), totals(nodes)
    return (
        f"{request.what} asks for {request.describe()} (in all {{{fmt(asked)}}}); the "
        f"cluster has {len(nodes)} node(s) with {{{fmt(have)}}}{state} in all"
    )


def resource_holders(kinds: Iterable[str] | None = None) -> list[str]:
    """Who holds resources now, one line each, largest first: live actors (a Serve
    replica is named as one), placement groups (a Ray Train run's workers), and what
    running tasks hold besides. Only holders of ``kinds`` (e.g. ``{"GPU"}``) are listed.
    Read from the GCS; an empty list when it cannot be read (a Ray Client)."""
    try:
        actors, groups = _actor_holdings(), _group_holdings()
        held = totals(live_nodes())
        for key, free in totals(free_nodes()).items():
            held[key] = held.get(key, 0.0) - free
    except Exception:  # private GCS tables: naming holders is a courtesy
        logger.debug("could not read who holds the cluster's resources", exc_info=True)
        return []
    wanted = set(kinds) if kinds is not None else None
    lines: list[tuple[float, str]] = []
    for name, resources in [*actors, *groups]:
        for key, value in resources.items():
            held[key] = held.get(key, 0.0) - value
        shown = {k: v for k, v in resources.items() if wanted is None or k in wanted}
        if shown:
            lines.append((sum(shown.values()), f"{name} holds {{{fmt(shown)}}}"))
    rest = {k: v for k, v in held.items() if v > 1e-9 and (wanted is None or k in wanted)}
    if rest:
        lines.append((0.0, f"running tasks hold {{{fmt(rest)}}}"))
    return [line for _, line in sorted(lines, key=lambda item: -item[0])]


def _actor_holdings() -> list[tuple[str, Resources]]:
    """Live actors outside placement groups with what they hold (a Serve replica's class
    is ``ServeReplica:<app>:<deployment>``)."""
    import ray._private.state as state
    from ray.core.generated import gcs_pb2

    out = []
    for raw in state.state._connect_and_get_accessor().get_actor_table(None, "ALIVE"):
        actor = gcs_pb2.ActorTableData.FromString(raw)
        resources = {k: float(v) for k, v in actor.required_resources.items()}
        if not resources or any("_group_" in k for k in resources):
            continue  # in a placement group: counted with the group
        cls = actor.class_name
        if cls.startswith("ServeReplica:"):
            label = f"Serve replica {cls.removeprefix('ServeReplica:')}"
        else:
            label = f"actor {cls}" + (f" ({actor.name})" if actor.name else "")
        out.append((f"{label} on node {actor.address.node_id.hex()[:8]}", resources))
    return out


def _group_holdings() -> list[tuple[str, Resources]]:
    import ray

    out = []
    for group_id, group in ray.util.placement_group_table().items():
        if group.get("state") != "CREATED":
            continue
        held: Resources = {}
        for bundle in group.get("bundles", {}).values():
            for key, value in bundle.items():
                held[key] = held.get(key, 0.0) + float(value)
        name = group.get("name") or group_id[:12]
        out.append((f"placement group {name} ({len(group.get('bundles', {}))} bundles)", held))
    return out


def admit(
    request: ResourceRequest,
    autoscale: Sequence[tuple[Resources, int]] = (),
    wait_timeout_s: float = 600.0,
    nodes: Callable[[], list[Resources]] = live_nodes,
    free: Callable[[], list[Resources]] | None = None,
    holders: Callable[[set[str]], list[str]] = resource_holders,
    poll_s: float = 2.0,
    report_every_s: float = 30.0,
) -> None:
    """Return when the request fits what is free; raise ``InfeasibleRequest`` at once when
    it can never fit, or after ``wait_timeout_s`` naming who holds the resources.

    ``free`` defaults to ``nodes`` when ``nodes`` is given (a cluster described by hand,
    every resource free) and to ``free_nodes`` otherwise.

    The first looks come quickly (0.1 s, doubling up to ``poll_s``): the common wait is a
    step that has just finished and whose workers Ray is still releasing, free a moment
    later; a wait on a busy cluster settles at one look every ``poll_s``."""
    free = free or (free_nodes if nodes is live_nodes else nodes)
    if pack(request.bundles, free()) is not None:
        return
    current = nodes()
    if pack(request.bundles, grown(current, autoscale)) is None:
        hint = " or what compute.autoscale can add" if autoscale else ""
        raise InfeasibleRequest(
            f"{shortfall(request, current)}: it can never be placed; lower the request or "
            f"grow the cluster (a bundle must fit on one node{hint})"
        )
    started = last_report = time.monotonic()
    logger.info("%s: waiting for resources (%s)", request.what, _why(request, free, holders))
    # Nothing is asked of Ray yet, so its autoscaler sees no demand: tell it what to add.
    asked = bool(autoscale) and demand(request.bundles)
    try:
        pause = min(FIRST_POLL_S, poll_s)
        while time.monotonic() - started < wait_timeout_s:
            time.sleep(min(pause, max(0.0, wait_timeout_s - (time.monotonic() - started))))
            pause = min(2 * pause, poll_s)
            if pack(request.bundles, free()) is not None:
                return
            if time.monotonic() - last_report >= report_every_s:
                last_report = time.monotonic()
                logger.info(
                    "%s: still waiting after %.0f s (%s)",
                    request.what,
                    last_report - started,
                    _why(request, free, holders),
                )
    finally:
        if asked:
            demand([])
    raise InfeasibleRequest(
        f"{_why(request, free, holders)}; not free within compute.wait_timeout_s = "
        f"{wait_timeout_s:g} s" + ("" if not autoscale else " (nor added by the autoscaler)")
    )


def demand(bundles: Sequence[Resources]) -> bool:
    """Ask Ray's autoscaler to hold room for ``bundles`` (``[]``: clear the ask); whether
    the ask reached it (no cluster, or no autoscaler SDK: nothing to ask)."""
    try:
        import ray
        from ray.autoscaler.sdk import request_resources

        if not ray.is_initialized():
            return False
        request_resources(bundles=[dict(b) for b in bundles])
        return True
    except Exception:  # a cluster without an autoscaler: waiting is all there is
        logger.debug("could not ask the autoscaler for resources", exc_info=True)
        return False


def _why(
    request: ResourceRequest,
    free: Callable[[], list[Resources]],
    holders: Callable[[set[str]], list[str]],
) -> str:
    """What is free against what is asked, and who holds the rest."""
    text = shortfall(request, free(), " free")
    held = holders(request.kinds())
    return f"{text}; {'; '.join(held)}" if held else text


def autoscale_of(compute) -> list[tuple[Resources, int]]:
    """``compute.autoscale`` as (node resources, how many) pairs."""
    return [(dict(n.resources), n.max_nodes) for n in compute.autoscale]


def admit_for(compute, what: str, count: int, bundle: Resources) -> None:
    """``admit`` for ``count`` bundles with the config's autoscale and wait timeout."""
    request = ResourceRequest.of(what, count, bundle)
    admit(request, autoscale_of(compute), compute.wait_timeout_s)
