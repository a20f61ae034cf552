"""The chain follower: keeps each registered chain's hot tables at the node's tip.

One follower process (``trace follow``, started by ``trace up`` and by the worker deployment)
runs a thread per chain; several processes may run, and each chain's lease
(``tracecore.chain.ingest.take_lease``) lets exactly one of them write it, the others waiting to
take over when its lease expires (a SIGKILLed follower is replaced within one lease TTL).

Per chain, the loop waits for a head: ``eth_subscribe("newHeads")`` over WebSocket when the
chain has a ``ws_url`` (the trigger), an ``eth_blockNumber`` poll every
``TRACE_CHAIN_POLL_INTERVAL`` either way (the safety net). Then:

* the head extends the stored tip (its parent is the tip's hash): one batched request
  (``eth_getBlockByHash(h, true)`` + ``eth_getBlockReceipts(h)``) and one commit;
* the head is further ahead: catch up by number in batches of ``TRACE_CHAIN_CATCHUP_BATCH``,
  each batch one request and one commit;
* the parent link breaks anywhere, or the head is below the tip: a reorg. The fork point is
  found by comparing the node's headers with the stored hashes, both fetched for a span of
  heights in one round trip each; the canonical blocks from the fork up are committed in one
  transaction that replaces the orphaned rows (``tracecore.chain.ingest.commit``).

Nothing the node says about reorgs is trusted (anvil sends no ``removed: true``): parent hashes
decide. Alongside, the same thread checks completeness every ``TRACE_CHAIN_CHECK_INTERVAL``
(gaps refetched) and a second thread compacts final chunks to cold Parquet and prunes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from flask import Flask

from tracecore import events
from tracecore.chain import cold, ingest, sql
from tracecore.chain.chains import ChainState, finality_depth, get_chain, list_chains
from tracecore.chain.cryo import MalformedChainData, tables_from_rpc
from tracecore.chain.ingest import Committed, Fenced, Header, Lease
from tracecore.db.engine import db
from tracecore.infra.storage import object_store
from tracecore.settings import Settings, current_settings

from .rpc import HeadSubscription, RpcClient, RpcError

log = logging.getLogger(__name__)

FORK_SEARCH_SPAN = 16  # heights compared per round trip while looking for a fork point


def _hash(value: Any) -> bytes:
    return bytes.fromhex(str(value)[2:])


def header_of(block: dict[str, Any]) -> Header:
    return Header(int(block["number"], 16), _hash(block["hash"]), _hash(block["parentHash"]))


class ChainFollower:
    """One chain's follower thread body (see the module docstring)."""

    def __init__(self, app: Flask, chain: str, owner: str, stop: threading.Event) -> None:
        self.app = app
        self.chain_name = chain
        self.owner = owner
        self.stop = stop
        self.settings: Settings = current_settings(app)
        self.lease: Lease | None = None
        self.lease_at = 0.0
        self.client: RpcClient | None = None
        self.heads: HeadSubscription | None = None
        self.chain_id = 0
        self.depth: int | None = None
        self.finality_tag: str | None = None
        self.start_block = 0
        self.finalized: int | None = None
        self.highest = -1  # the highest block this follower saw (a head, or the stored tip)
        self.next_check = 0.0
        self.next_observe = 0.0
        self.committed: list[Committed] = []  # for tests and benchmarks: what this follower did

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        with self.app.app_context():
            while not self.stop.is_set():
                try:
                    if self._hold_lease():
                        self._follow_once()
                    else:
                        self.stop.wait(self.settings.chain_lease_ttl / 3)
                except Fenced:
                    log.warning("chain %s: lease lost; waiting to take it again", self.chain_name)
                    self._drop()
                except ingest.ChainStopped:
                    self._drop()
                    self.stop.wait(1.0)
                except (RpcError, MalformedChainData, OSError) as exc:
                    log.warning("chain %s: node error: %s", self.chain_name, exc)
                    db.session.rollback()
                    self.stop.wait(self.settings.chain_poll_interval)
                except Exception:
                    log.exception("chain %s: follower step failed", self.chain_name)
                    db.session.rollback()
                    self.stop.wait(1.0)
            self._drop(release=True)

    def _drop(self, release: bool = False) -> None:
        if release and self.lease is not None:
            try:
                ingest.release_lease(self.lease)
            except Exception:
                db.session.rollback()
        self.lease = None
        if self.heads is not None:
            self.heads.close()
            self.heads = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def _hold_lease(self) -> bool:
        now = time.monotonic()
        if self.lease is not None and now - self.lease_at < self.settings.chain_lease_ttl / 3:
            return True
        lease = ingest.take_lease(self.chain_name, self.owner, self.settings.chain_lease_ttl)
        if lease is None:
            self._drop()
            return False
        if self.lease is None or lease.fence != self.lease.fence:
            self._start(lease)
        self.lease, self.lease_at = lease, now
        return True

    def _renew(self) -> None:
        """Renew the lease between the commits of one long step (a catch-up of thousands of blocks
        outlasts the TTL: without this the lease ran out mid-way, every commit after was Fenced and
        the follower restarted its catch-up every TTL). Raises Fenced when another follower took it."""
        assert self.lease is not None
        now = time.monotonic()
        if now - self.lease_at < self.settings.chain_lease_ttl / 3:
            return
        lease = ingest.take_lease(self.chain_name, self.owner, self.settings.chain_lease_ttl)
        if lease is None or lease.fence != self.lease.fence:
            raise Fenced(f"the lease of chain {self.chain_name} moved on (fence {self.lease.fence})")
        self.lease_at = now

    def _start(self, lease: Lease) -> None:
        self._drop()
        chain = get_chain(self.chain_name)
        db.session.rollback()
        if chain.state != ChainState.FOLLOWING:
            raise ingest.ChainStopped(f"chain {self.chain_name} is not following")
        self.chain_id, self.start_block = chain.chain_id, chain.start_block
        self.depth, self.finality_tag = finality_depth(chain), chain.finality.get("tag")
        self.client = RpcClient(list(chain.rpc_urls))
        self.heads = HeadSubscription(chain.ws_url) if chain.ws_url else None
        log.info("chain %s: following (fence %s, %s)", self.chain_name, lease.fence,
                 "newHeads + poll" if self.heads else "poll")

    # -- one step -------------------------------------------------------------------------

    def _follow_once(self) -> None:
        assert self.client is not None
        notified = self.heads.get(self.settings.chain_poll_interval) if self.heads else None
        if notified is None and not self.heads:
            self.stop.wait(self.settings.chain_poll_interval)
        head_at = datetime.now(UTC)
        if notified is not None:
            head = header_of(notified)
        else:
            number = self.client.block_number()
            headers = self.client.headers([number])
            if headers[0] is None:
                return
            head = header_of(headers[0])
        self.advance(head, head_at)
        now = time.monotonic()
        if now >= self.next_observe:
            self._observe(head, head_at)
            self.next_observe = now + 1.0
        if now >= self.next_check:
            self.check()
            self.next_check = now + self.settings.chain_check_interval

    def _observe(self, head: Header, head_at: datetime) -> None:
        assert self.client is not None
        finalized = None
        if self.depth is not None:
            finalized = head.number - self.depth
        elif self.finality_tag:
            block = self.client.call("eth_getBlockByNumber", [self.finality_tag, False])
            finalized = int(block["number"], 16) if isinstance(block, dict) else None
        self.finalized = finalized
        ingest.observe(self.chain_name, head=head.number, head_at=head_at, finalized=finalized,
                       health=self.client.health())

    def finalized_for(self, number: int) -> int | None:
        """The finality boundary: with a depth rule it is counted from the highest block seen, so a
        reorg notified block by block (anvil sends the replacement's first block first) is still
        measured against the chain's real height."""
        self.highest = max(self.highest, number)
        if self.depth is not None:
            return self.highest - self.depth
        return self.finalized

    def advance(self, head: Header, head_at: datetime | None = None) -> None:
        """Bring the hot tables up to ``head`` (see the module docstring)."""
        assert self.client is not None and self.lease is not None
        tip = ingest.stored_tip(self.chain_name)
        db.session.rollback()
        self.highest = max(self.highest, head.number, tip.number if tip is not None else -1)
        if tip is not None and head.number <= tip.number:
            held = ingest.stored_hashes(self.chain_name, [head.number]).get(head.number)
            db.session.rollback()
            if held is not None and held[0] == head.hash:
                # Our tip, a late notification, or a rollback (anvil_rollback) whose replacement
                # blocks have not come yet: the next block's parent link decides.
                return
            self._reorg(head, tip, head_at)
            return
        if tip is not None and head.number == tip.number + 1 and head.parent_hash == tip.hash:
            bundle = self.client.block_bundle("0x" + head.hash.hex())
            if bundle is None:
                return  # orphaned before we read it: the next head says what replaced it
            self._commit([bundle], head_at)
            return
        first = tip.number + 1 if tip is not None else max(self.start_block, self._cold_start())
        while first <= head.number and not self.stop.is_set():
            last = min(head.number, first + self.settings.chain_catchup_batch - 1)
            bundles = self.client.block_bundles(list(range(first, last + 1)))
            present = [b for b in bundles if b is not None]
            if len(present) != len(bundles):
                return  # the node lost blocks meanwhile (a reorg in flight): the next head retries
            headers = [header_of(b[0]) for b in present]
            below = ingest.stored_hashes(self.chain_name, [first - 1]).get(first - 1)
            db.session.rollback()
            if not ingest.linked(headers):
                return  # read across a reorg in flight: the next head retries
            if below is not None and below[0] != headers[0].parent_hash:
                assert tip is not None  # a stored block below means a stored tip
                self._reorg(head, tip, head_at)
                return
            self._commit(present, head_at if last == head.number else None)
            first = last + 1

    def _cold_start(self) -> int:
        row = db.session.execute(sql.CHAIN_STATE, {"chain": self.chain_name}).one()
        db.session.rollback()
        return int(row.cold_boundary) + 1

    def _reorg(self, head: Header, tip: Header, head_at: datetime | None) -> None:
        """Find the fork point and commit the canonical blocks from it up to the head."""
        assert self.client is not None and self.lease is not None
        fork = self.fork_point(min(head.number, tip.number))
        if fork is None:
            return
        last = head.number
        if fork > last:  # a rollback with nothing new yet: wait for the node's next block
            return
        bundles: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        for first in range(fork, last + 1, self.settings.chain_catchup_batch):
            got = self.client.block_bundles(list(range(first, min(last, first + self.settings.chain_catchup_batch - 1)
                                                       + 1)))
            if any(b is None for b in got):
                return
            bundles += [b for b in got if b is not None]
        self._commit(bundles, head_at)

    def fork_point(self, top: int) -> int | None:
        """The lowest height at or below ``top`` whose stored hash differs from the node's, with
        the height below it agreeing (or not stored); searches down in spans, one round trip to
        the node and one to the database per span."""
        assert self.client is not None
        high = top
        floor = self._cold_start()
        while high >= floor:
            low = max(floor, high - FORK_SEARCH_SPAN + 1)
            numbers = list(range(low, high + 1))
            canonical = self.client.headers(numbers)
            stored = ingest.stored_hashes(self.chain_name, numbers)
            db.session.rollback()
            mismatch = [n for n, h in zip(numbers, canonical, strict=True)
                        if n in stored and (h is None or _hash(h["hash"]) != stored[n][0])]
            agree = [n for n, h in zip(numbers, canonical, strict=True)
                     if n in stored and h is not None and _hash(h["hash"]) == stored[n][0]]
            if agree:
                return max(agree) + 1
            if not mismatch:
                return high + 1
            high = low - 1
        return floor  # nothing agrees down to the cold boundary: the commit stops the chain

    def _commit(self, bundles: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]],
                head_at: datetime | None) -> None:
        assert self.lease is not None
        headers = [header_of(block) for block, _ in bundles]
        tables: dict[str, pa.Table] = tables_from_rpc(list(bundles), self.chain_id)
        finalized = self.finalized_for(headers[-1].number)
        self._renew()
        done = ingest.commit(self.lease, headers, tables, finalized=finalized, head_at=head_at)
        self.committed.append(done)
        if done.stopped is not None and done.reorg is not None:
            events.emit(events.chain_ingestion_stopped, self.app, chain=self.chain_name, reason=done.stopped,
                        fork_block=done.reorg["fork_block"], depth=done.reorg["depth"])
        for dataset_id, version in done.versions:
            events.emit(events.dataset_version_committed, self.app, dataset_id=dataset_id, version=version)

    # -- completeness ---------------------------------------------------------------------

    def check(self) -> dict[str, Any]:
        """Run the completeness check, fill hot gaps and re-read broken links; record the result."""
        result = cold.completeness(self.chain_name)
        missing = sorted(set(result["hot_gaps"]) | set(result["broken_links"]))
        if missing and self.client is not None and self.lease is not None:
            first = missing[0]
            tip = ingest.stored_tip(self.chain_name)
            db.session.rollback()
            if tip is not None:
                head = self.client.headers([tip.number])[0]
                if head is not None:
                    self._refill(first, tip.number)
                    result = cold.completeness(self.chain_name)
                    result["filled_from"] = first
        result["checked_at"] = datetime.now(UTC).isoformat()
        db.session.execute(sql.SET_COMPLETENESS, {"chain": self.chain_name, "result": json.dumps(result)})
        db.session.commit()
        return result

    def _refill(self, first: int, last: int) -> None:
        assert self.client is not None
        bundles: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        for start in range(first, last + 1, self.settings.chain_catchup_batch):
            got = self.client.block_bundles(list(range(start, min(last, start + self.settings.chain_catchup_batch - 1)
                                                       + 1)))
            if any(b is None for b in got):
                return
            bundles += [b for b in got if b is not None]
        headers = [header_of(b[0]) for b in bundles]
        if not ingest.linked(headers):
            return
        below = ingest.stored_hashes(self.chain_name, [first - 1]).get(first - 1)
        db.session.rollback()
        if below is not None and below[0] != headers[0].parent_hash:
            fork = self.fork_point(first - 1)
            if fork is not None and fork < first:
                self._refill(fork, last)
            return
        self._commit(bundles, None)


class Compactor:
    """The second thread per chain: final chunks to cold Parquet, then pruning (``cold``)."""

    def __init__(self, app: Flask, follower: ChainFollower, stop: threading.Event) -> None:
        self.app, self.follower, self.stop = app, follower, stop

    def run(self) -> None:
        settings = current_settings(self.app)
        with self.app.app_context():
            store = object_store(settings)
            while not self.stop.wait(1.0):
                lease = self.follower.lease
                if lease is None:
                    continue
                try:
                    while cold.compact_next(lease, store, chain_id=self.follower.chain_id,
                                            finalized=self.follower.finalized) is not None:
                        if self.stop.is_set():
                            break
                    cold.prune(lease.chain, grace_s=settings.chain_prune_grace)
                except (Fenced, ingest.ChainStopped):
                    db.session.rollback()
                except Exception:
                    db.session.rollback()
                    log.exception("chain %s: compaction failed; retrying", lease.chain)


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run(app: Flask, stop: threading.Event | None = None) -> None:
    """Follow every registered chain until ``stop`` (new chains are picked up as they appear)."""
    stop = stop or threading.Event()
    owner = owner_name()
    threads: dict[str, list[threading.Thread]] = {}
    with app.app_context():
        while not stop.is_set():
            try:
                names = [chain.name for chain in list_chains()]
                db.session.rollback()
            except Exception:
                db.session.rollback()
                log.exception("listing chains failed")
                names = []
            for name in names:
                if name in threads and all(t.is_alive() for t in threads[name]):
                    continue
                follower = ChainFollower(app, name, owner, stop)
                compactor = Compactor(app, follower, stop)
                started = [threading.Thread(target=follower.run, name=f"follow-{name}", daemon=True),
                           threading.Thread(target=compactor.run, name=f"compact-{name}", daemon=True)]
                for thread in started:
                    thread.start()
                threads[name] = started
            stop.wait(2.0)
    for started in threads.values():
        for thread in started:
            thread.join(timeout=5)
