"""Trace's domain: tenancy, DAGs, runs, leases. Imported by web, workers and scheduler; imports none of them."""

__version__ = "0.1.0"
