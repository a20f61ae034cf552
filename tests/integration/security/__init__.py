"""The hostile suite: one parametrised module per class of attack (issue 11).

Each module tries many instances of one class as a tenant or a sandbox would, against
real services, and asserts that the platform held. ``docs/security.md`` lists the counts.
"""
