"""Imports every model so that ``Base.metadata`` is complete (Alembic, tests)."""

from .audit import AuditLog
from .bundles import Bundle
from .dags import Dag, DagVersion, Job
from .db import Base
from .orgs import ApiToken, Membership, Org, User
from .runs import Attempt, Run, Task

__all__ = ["ApiToken", "Attempt", "AuditLog", "Base", "Bundle", "Dag", "DagVersion", "Job", "Membership", "Org",
           "Run", "Task", "User"]
