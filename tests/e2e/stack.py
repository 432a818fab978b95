"""A `Stack`: one `backout worker` subprocess and the names it works with.

Each stack has names of its own: app id (consumer groups), topic prefix (its
`rollbacks`, `status` and `dlq` topics), tracked event topics and command
topics, so stacks on the shared session broker never see each other's data.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.e2e_worker import SERVICES, WorkerTopics, service_topics, worker_env
from tests.support.kafka import CommandCollector, Confirmation, ensure_topics
from tests.support.names import unique_name
from tests.support.sync import run_sync
from tests.support.worker import WorkerProcess, run_cli

# What the fake services answer: command topic suffix → confirmation event type.
CONFIRMATIONS = {"orders": "ItemCancelled", "payments": "Refunded"}


@dataclass
class Stack(WorkerTopics):
    """One worker and the names it works with.

    Attributes:
        bootstrap: the broker's `host:port`.
        tag: unique name of this stack (app id; prefix of all its topics).
        worker: the `backout worker` subprocess.
        env: its settings; the CLI is run with the same ones.
    """

    bootstrap: str
    tag: str
    worker: WorkerProcess
    env: dict[str, str] = field(default_factory=dict)

    def collector(self, rollback_ids: set[str] | None = None) -> CommandCollector:
        """A fake orders/payments/stock service on this stack's command topics.

        It confirms Cancel with ItemCancelled and Refund with Refunded on the
        service's own (tracked) event topic; Release needs no confirmation.
        """
        return CommandCollector(
            self.bootstrap,
            [self.command_topic(s) for s in SERVICES],
            confirmations={
                self.command_topic(service): Confirmation(
                    event_type, self.events_topic(service), service=f"{service}-svc"
                )
                for service, event_type in CONFIRMATIONS.items()
            },
            rollback_ids=rollback_ids,
        )

    async def rollback(
        self, deployment: str, *args: str, signal_id: str | None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """`backout rollback --deployment <deployment> [--signal-id ID] <args>`."""
        chosen = ["--signal-id", signal_id] if signal_id else []
        return await self.cli(
            "rollback",
            "--deployment",
            deployment,
            *chosen,
            *args,
            "--timeout",
            str(timeout),
            timeout=timeout + 15,
        )

    async def cli(
        self, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `backout <args>` with this stack's settings (plus `env`)."""
        return await run_cli(*args, env={**self.env, **(env or {})}, timeout=timeout)


def stack_env(
    bootstrap: str, tag: str, database_url: str, log_dir: Path, extra: dict[str, str]
) -> dict[str, str]:
    """The worker's (and the CLI's) environment, with real spans to a file."""
    return worker_env(
        bootstrap,
        tag,
        database_url,
        {
            # Real spans (to a JSON-lines file), so commands carry trace context.
            "OTEL_TRACES_EXPORTER": "console",
            "BACKOUT_TRACE_FILE": str(log_dir / f"{tag}.traces.jsonl"),
            **extra,
        },
    )


def new_stack(
    bootstrap: str, database_url: str, log_dir: Path, extra: dict[str, str] | None = None
) -> Stack:
    """A stack with fresh names, its topics created, its worker not yet started."""
    tag = unique_name("e2e")
    env = stack_env(bootstrap, tag, database_url, log_dir, extra or {})
    run_sync(ensure_topics(bootstrap, service_topics(tag)))
    worker = WorkerProcess(env, log_path=log_dir / f"{tag}.log")
    return Stack(bootstrap=bootstrap, tag=tag, worker=worker, env=worker.env)


def stop_stack(stack: Stack) -> None:
    """SIGTERM the worker; it must exit 0 (unless a test already killed it)."""
    if not stack.worker.running:  # never started, or a test killed it on purpose
        stack.worker.stop_sync()
        return
    code = stack.worker.stop_sync()
    # A worker must shut down cleanly on SIGTERM (how orchestrators stop it).
    assert code == 0, f"worker exited with {code} on SIGTERM\n{stack.worker.log_tail()}"
