"""Keep the endpoint on whatever a registry alias names.

``RegistryFollower`` resolves the served URI every ``serve.poll_interval_s``; when a
``models:/NAME@ALIAS`` points at another version (a promotion, or a rollback: moving the
alias back), it deploys that version (``app.deploy``: new replicas first, traffic switches
once they are healthy, old replicas drain). A registry that cannot be reached leaves the
endpoint serving what it serves, and is retried at the next poll.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from rzenembed.config import PipelineConfig
from rzenembed.serving.source import ServedModel, resolve_served_model

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One deployment the follower made: which version, when it was seen, how long the
    new replicas took to serve."""

    version: str | None
    digest: str
    seen_at: float  # time.time() when the alias was found on this version
    deploy_s: float | None = None  # None while the rollout runs
    error: str | None = None  # why it did not serve (the previous version serves on)


@dataclass
class RegistryFollower:
    cfg: PipelineConfig
    uri: str
    served: ServedModel | None = None
    rollouts: list[Rollout] = field(default_factory=list)
    failed: str | None = None  # the digest whose rollout failed (not retried while named)

    def resolve(self) -> ServedModel:
        return resolve_served_model(self.uri, self.cfg)

    def deploy(self, served: ServedModel) -> Rollout:
        """Roll to ``served``. A failed or timed-out rollout is recorded and logged, not
        raised: Serve keeps the old replicas while new ones are not healthy, and the last
        good version is deployed again at once, so that Serve's target is never the broken
        one (a replica restarted later would start it). The failed version is not tried
        again until the alias names another one. Raised for the first deployment."""
        from rzenembed.serving.app import RolloutError, deploy

        rollout = Rollout(served.version, served.digest, time.time())
        self.rollouts.append(rollout)
        log.info("deploying %s (digest %s) from %s", served.label, served.digest[:12], self.uri)
        previous, self.served = self.served, served
        try:
            seconds = deploy(self.cfg, served)
        except RolloutError as exc:
            rollout.error = str(exc)
            if previous is None:
                raise
            self.failed, self.served = served.digest, previous
            try:
                deploy(self.cfg, previous)
                rollout.error += f"; rolled back to {previous.label}"
            except RolloutError as again:
                rollout.error += f"; rolling back to {previous.label} failed too: {again}"
            log.error("rollout of %s failed: %s", served.label, rollout.error)
            return rollout
        rollout.deploy_s = round(seconds, 3)
        log.info(
            "now serving %s (digest %s); rollout took %.1f s",
            served.label,
            served.digest[:12],
            seconds,
        )
        return rollout

    def start(self) -> Rollout:
        """Deploy what the URI names now."""
        return self.deploy(self.resolve())

    def poll(self) -> Rollout | None:
        """Look the URI up once; roll to it when it names another model. Errors reaching the
        registry are logged, never raised: the endpoint keeps serving."""
        try:
            current = self.resolve()
        except Exception as exc:
            log.warning(
                "could not resolve %s (still serving %s): %s", self.uri, _label(self.served), exc
            )
            return None
        if current.digest == self.failed:
            return None
        if self.served is not None and (current.digest, current.version) == (
            self.served.digest,
            self.served.version,
        ):
            return None
        # Another version of the same content is deployed too: Serve renames the running
        # replicas in place (app.build_app), so that responses and pinned requests name it.
        return self.deploy(current)

    def follow(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set (a plain folder never moves: deploy once and wait)."""
        if self.served is None:
            self.start()
        while not stop.wait(self.cfg.serve.poll_interval_s):
            if self.uri.startswith("models:/"):
                self.poll()


def _label(served: ServedModel | None) -> str:
    return "nothing" if served is None else served.label
