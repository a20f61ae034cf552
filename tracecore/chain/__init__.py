"""Chain data: registered chains, their hot tables, reorgs, the cold Parquet chunks written as
cryo 0.3.2 writes them, backfills and the completeness check.

What lives here is the domain (what a chain's data is and how it changes); the RPC client and
the follower that reads a node live in ``workers/chain/``. May import ``db``, ``data``,
``tenancy``, ``infra``, ``settings``, ``exceptions``, ``events``.
"""
