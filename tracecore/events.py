"""Domain events: how the domain tells the edges that something happened, without importing them.

The import rule (docs/architecture.md) runs ``web -> scheduler -> workers -> tracecore``: the
domain cannot call the scheduler when a dataset version commits, and the worker's dispatcher
cannot call it when a task succeeds. Each such fact is a blinker signal (blinker comes with
Flask), defined once here; the sender is the Flask app the fact happened in, the keyword
arguments are its data. The scheduler's receivers (``scheduler/hooks.py``) are connected by each
process's composition root (``web.app.create_app``, ``scheduler.worker``).

Every event is sent after its commit and is best effort: a receiver that fails is logged and
never undoes what happened (the beat's sweeps make a lost reaction a delay, not a loss). Send
them with :func:`emit`.
"""

from __future__ import annotations

import logging
from typing import Any

from blinker import NamedSignal, Namespace

log = logging.getLogger(__name__)

_events = Namespace()

#: A dataset got a new version (its transaction committed). Data: ``dataset_id`` (UUID),
#: ``version`` (int). Sent by ``tracecore.data.publish``.
dataset_version_committed: NamedSignal = _events.signal("dataset-version-committed")

#: A task's attempt succeeded and was recorded. Data: ``org_id`` (UUID), ``task_id`` (UUID),
#: ``job_name`` (str), ``named_by_composite`` (bool: a live composite trigger of the org names the
#: job, as the closing statement found; receivers with nothing else to do return at once).
#: Sent by ``workers.dispatcher`` on the hot path: receivers must be cheap when they have no work.
task_succeeded: NamedSignal = _events.signal("task-succeeded")


#: A chain's ingestion stopped: a reorg reached below its finality boundary and nothing was
#: rewritten. Data: ``chain`` (str), ``reason`` (str), ``fork_block`` (int), ``depth`` (int). Sent by
#: ``workers.chain.follower``; the installation's system alerts subscribe (Prometheus reads the same
#: fact from ``chains.state``).
chain_ingestion_stopped: NamedSignal = _events.signal("chain-ingestion-stopped")


def emit(signal: NamedSignal, sender: Any, **data: Any) -> None:
    """Send ``signal`` to each receiver in turn; one that fails is logged, not raised, and the
    others still run (the fact stands either way)."""
    if not signal.receivers:  # nothing connected (a bare test app, a script): free
        return
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **data)
        except Exception:
            log.warning("a receiver of %s failed", signal.name, exc_info=True)
