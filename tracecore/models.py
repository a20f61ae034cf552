"""Imports every model so that ``Base.metadata`` is complete (Alembic, tests)."""


from .audit import AuditLog
from .bundles import Bundle
from .dags import Dag, DagVersion, Job
from .datasets import Dataset, DatasetGrant, DatasetVersion, Partition, PiiGrant
from .db import Base
from .lineage import LineageEdge
from .orgs import ApiToken, Membership, Org, User
from .publish import DeadLetter
from .runs import Attempt, Run, Task
from .saved_queries import Download, SavedQuery
from .triggers import Schedule, ScheduledTick, TriggerFiring, WebhookTrigger

__all__ = ["ApiToken", "Attempt", "AuditLog", "Base", "Bundle", "Dag", "DagVersion", "Dataset", "DatasetGrant",
           "DatasetVersion", "DeadLetter", "Download", "Job", "LineageEdge", "Membership", "Org", "Partition",
           "PiiGrant", "Run", "SavedQuery", "Schedule", "ScheduledTick", "Task", "TriggerFiring", "User",
           "WebhookTrigger"]
