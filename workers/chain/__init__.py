"""Reading chains: the lean JSON-RPC client (HTTP batches and a WebSocket head subscription,
with failover and backoff) and the follower that keeps a chain's hot tables at the tip.

May import ``tracecore`` and ``workers``' own modules; nothing here runs user code.
"""
