"""What the Ray cluster can give a step, checked before the step waits for it.

Ray queues a request it cannot place and waits: a Ray Train run asking for 16 one-GPU
workers on one 8-GPU node, or an actor pool larger than the GPUs, would wait forever with
nothing said. Before such a request, ``ensure_placeable`` packs its bundles (one per
worker, actor or task: ``{"GPU": 1, "CPU": 8}``) onto the cluster's nodes:

- it fits the nodes the cluster has now: go on (Ray may still have to wait for other
  work to finish, which ends);
- it fits only once the autoscaler adds nodes (``compute.autoscale``: the node shapes the
  cluster can grow by, and how many of each): wait for them, a progress line every 30 s,
  and fail after ``compute.wait_timeout_s`` naming what is missing;
- it can never fit: fail at once, naming what was asked and what the cluster has.

Packing is first-fit over the bundles in decreasing size, node by node, on each node's
total resources (not what is free now): a bundle never spans nodes, as in Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

Resources = dict[str, float]
# Resources Ray reports per node that no request of ours asks for.
_IGNORED = ("memory", "object_store_memory")


class InfeasibleRequest(RuntimeError):
    """A request the cluster cannot meet, now or after the autoscaler grows it."""


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
            key = _format(bundle) or "no resources"
            shapes[key] = shapes.get(key, 0) + 1
        return ", ".join(f"{n} x {{{k}}}" for k, n in shapes.items())


def _format(resources: Resources) -> str:
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
            if k not in _IGNORED and ":" not in k:
                out[k] = out.get(k, 0.0) + v
    return out


def live_nodes() -> list[Resources]:
    """Every live node's total resources, as Ray reports them."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def grown(
    nodes: Sequence[Resources], autoscale: Sequence[tuple[Resources, int]]
) -> list[Resources]:
    """The nodes the cluster has plus every node the autoscaler may add."""
    return [*nodes, *(dict(shape) for shape, count in autoscale for _ in range(count))]


def shortfall(request: ResourceRequest, nodes: Sequence[Resources]) -> str:
    """Why the request does not fit: asked against available, in words."""
    asked, have = totals([dict(b) for b in request.bundles]), totals(nodes)
    return (
        f"{request.what} asks for {request.describe()} (in all {{{_format(asked)}}}); the "
        f"cluster has {len(nodes)} node(s) with {{{_format(have)}}} in all"
    )


def ensure_placeable(
    request: ResourceRequest,
    autoscale: Sequence[tuple[Resources, int]] = (),
    wait_timeout_s: float = 600.0,
    nodes: Callable[[], list[Resources]] = live_nodes,
    poll_s: float = 2.0,
    report_every_s: float = 30.0,
) -> None:
    """Return when the request fits the cluster's nodes; wait for the autoscaler when it
    fits only a grown cluster; raise ``InfeasibleRequest`` when it can never fit or the
    wait runs out."""
    current = nodes()
    if pack(request.bundles, current) is not None:
        return
    if not autoscale or pack(request.bundles, grown(current, autoscale)) is None:
        hint = " or what compute.autoscale can add" if autoscale else ""
        raise InfeasibleRequest(
            f"{shortfall(request, current)}: it can never be placed; lower the request or "
            f"grow the cluster (a bundle must fit on one node{hint})"
        )
    started = last_report = time.monotonic()
    logger.info("%s: waiting for the autoscaler (%s)", request.what, shortfall(request, current))
    while time.monotonic() - started < wait_timeout_s:
        time.sleep(poll_s)
        current = nodes()
        if pack(request.bundles, current) is not None:
            return
        if time.monotonic() - last_report >= report_every_s:
            last_report = time.monotonic()
            waited = last_report - started
            logger.info(
                "%s: still waiting after %.0f s (%s)",
                request.what,
                waited,
                shortfall(request, current),
            )
    raise InfeasibleRequest(
        f"{shortfall(request, current)}: the autoscaler did not add the nodes within "
        f"compute.wait_timeout_s = {wait_timeout_s:g} s"
    )


def how_many_fit(bundle: Resources, limit: int, nodes: Sequence[Resources]) -> int:
    """How many copies of ``bundle`` (at most ``limit``) the nodes hold at once."""
    fitted = 0
    while fitted < limit and pack([bundle] * (fitted + 1), nodes) is not None:
        fitted += 1
    return fitted


def autoscale_of(compute) -> list[tuple[Resources, int]]:
    """``compute.autoscale`` as (node resources, how many) pairs."""
    return [(dict(n.resources), n.max_nodes) for n in compute.autoscale]


def ensure_compute_for(compute, what: str, count: int, bundle: Resources) -> None:
    """``ensure_placeable`` for ``count`` bundles with the config's autoscale and timeout."""
    request = ResourceRequest.of(what, count, bundle)
    ensure_placeable(request, autoscale_of(compute), compute.wait_timeout_s)


class StepTimeout(TimeoutError):
    """Ray work that did not finish within its step's ``compute.step_timeout_s``."""


def wait_for(
    refs: Any,
    what: str,
    timeout_s: float | None = None,
    report_every_s: float = 60.0,
) -> Any:
    """``ray.get(refs)`` (one ref or a list) with a progress line every ``report_every_s``
    (how many are done, how long it has been) and, with ``timeout_s``, a ``StepTimeout``
    naming the work when it runs over; the refs are cancelled then."""
    import ray

    many = isinstance(refs, list)
    pending = list(refs) if many else [refs]
    total, started = len(pending), time.monotonic()
    while pending:
        budget = report_every_s
        if timeout_s is not None:
            left = timeout_s - (time.monotonic() - started)
            if left <= 0:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise StepTimeout(
                    f"{what}: {total - len(pending)} of {total} done after {timeout_s:g} s "
                    "(compute.step_timeout_s); cancelled the rest"
                )
            budget = min(budget, left)
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=budget)
        if pending:
            logger.info(
                "%s: %d of %d done after %.0f s",
                what,
                total - len(pending),
                total,
                time.monotonic() - started,
            )
    return ray.get(refs)
