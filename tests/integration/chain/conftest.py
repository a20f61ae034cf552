"""The chain tests' fixtures live in ``tests/anvil.py`` (a plugin of the root conftest, so the
API and end-to-end tests start anvil nodes too); their names are re-exported here for the
modules of this folder."""

from tests.anvil import DEV_ACCOUNTS, EMITTER_TOPIC, AnvilFactory, AnvilNode, ensure_anvil, free_port

__all__ = ["DEV_ACCOUNTS", "EMITTER_TOPIC", "AnvilFactory", "AnvilNode", "ensure_anvil", "free_port"]
