"""A `backout worker` running the e2e saga under names of its own.

The e2e stacks (tests/e2e/stack.py) and the reliability targets
(tests/support/nasty.py) both start workers of `tests.support.e2e_saga`.
Every name such a worker uses derives from one unique tag: app id (consumer
groups), topic prefix, tracked event topics and command topics, so workers
on the shared session broker never see each other's data.
"""

from __future__ import annotations

from collections.abc import Mapping

from tests.support import e2e_saga

SERVICES = e2e_saga.SERVICES


def backout_prefix(tag: str) -> str:
    """`BACKOUT_TOPIC_PREFIX` of the worker of `tag`."""
    return f"{tag}.backout."


def service_topics(tag: str) -> list[str]:
    """The tracked event and the command topic of every service.

    Created before the worker starts: tracked topics exist before it
    subscribes, command topics before anyone reads them, so nothing depends
    on auto-creation timing.
    """
    return [f"{tag}.{s}.{kind}" for s in SERVICES for kind in ("events", "commands")]


def worker_env(
    bootstrap: str, tag: str, database_url: str, extra: Mapping[str, str]
) -> dict[str, str]:
    """The worker's (and its CLI's) settings, then `extra`.

    A 2 s session timeout and short heartbeat, commit and poll intervals let
    groups join and rebalance fast (BROKER.md), which tests wait on.
    """
    return {
        "BACKOUT_BROKER": f"kafka://{bootstrap}",
        "BACKOUT_DATABASE_URL": database_url,
        "BACKOUT_SAGAS": "tests.support.e2e_saga",
        "BACKOUT_APP_ID": tag,
        "BACKOUT_TOPIC_PREFIX": backout_prefix(tag),
        "BACKOUT_EVENT_TOPICS": ",".join(f"{tag}.{s}.events" for s in SERVICES),
        "BACKOUT_SESSION_TIMEOUT": "2",
        "BACKOUT_HEARTBEAT_INTERVAL": "0.5",
        "BACKOUT_COMMIT_INTERVAL": "0.5",
        "BACKOUT_POLL_INTERVAL": "0.2",
        e2e_saga.COMMAND_PREFIX_ENV: f"{tag}.",
        **extra,
    }


class WorkerTopics:
    """The topic names of the worker of `tag` (a base of the classes that hold one)."""

    tag: str

    def events_topic(self, service: str) -> str:
        """The tracked event topic of `service` (orders, payments, stock)."""
        return f"{self.tag}.{service}.events"

    def command_topic(self, service: str) -> str:
        """Where the e2e saga sends `service`'s commands."""
        return e2e_saga.command_topic(service, prefix=f"{self.tag}.")

    @property
    def signals_topic(self) -> str:
        """`<prefix>rollbacks`."""
        return f"{backout_prefix(self.tag)}rollbacks"

    @property
    def status_topic(self) -> str:
        """`<prefix>status`."""
        return f"{backout_prefix(self.tag)}status"

    @property
    def dlq_topic(self) -> str:
        """`<prefix>dlq`."""
        return f"{backout_prefix(self.tag)}dlq"
