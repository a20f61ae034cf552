"""Imports every model so that ``Base.metadata`` is complete (Alembic, tests)."""


from tracecore.chain.backfills import Backfill, BackfillChunk
from tracecore.chain.chains import Chain
from tracecore.chain.hot import ChainBlock, ChainChunk, ChainLog, ChainReorg, ChainTransaction
from tracecore.dags.catalog import Dag, DagVersion, Job
from tracecore.dags.triggers import Schedule, ScheduledTick, TriggerFiring, WebhookTrigger
from tracecore.data.datasets import Dataset, DatasetGrant, DatasetVersion, Partition, PiiGrant
from tracecore.data.lineage import LineageEdge
from tracecore.data.publish import DeadLetter
from tracecore.db.engine import Base
from tracecore.execution.bundles import Bundle
from tracecore.execution.counters import JobRunning, OrgRunning, OrgRunRate
from tracecore.execution.runs import Attempt, Run, Task
from tracecore.query.saved import Download, SavedQuery
from tracecore.tenancy.audit import AuditLog
from tracecore.tenancy.orgs import ApiToken, Membership, Org, User

__all__ = [
           "ApiToken",
           "Attempt",
           "AuditLog",
           "Backfill",
           "BackfillChunk",
           "Base",
           "Bundle",
           "Chain",
           "ChainBlock",
           "ChainChunk",
           "ChainLog",
           "ChainReorg",
           "ChainTransaction",
           "Dag",
           "DagVersion",
           "Dataset",
           "DatasetGrant",
           "DatasetVersion",
           "DeadLetter",
           "Download",
           "Job",
           "JobRunning",
           "LineageEdge",
           "Membership",
           "Org",
           "OrgRunRate",
           "OrgRunning",
           "Partition",
           "PiiGrant",
           "Run",
           "SavedQuery",
           "Schedule",
           "ScheduledTick",
           "Task",
           "TriggerFiring",
           "User",
           "WebhookTrigger",
]
