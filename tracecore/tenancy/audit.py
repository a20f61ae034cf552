"""The audit log: who did what to which object (and, later, every read of PII).

Written in the same transaction as the change it records, so an audited change and
its log row commit or roll back together.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Uuid
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from tracecore.db.engine import Base, created_at, db, uuid_pk


class AuditLog(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_org_created", "org_id", "created_at"),)
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"))
    actor_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id"))
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    object_type: Mapped[str] = mapped_column(String(32), nullable=False)
    object_id: Mapped[str] = mapped_column(String(128), nullable=False)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    created_at: Mapped[datetime] = created_at()


def record(*, org_id: uuid.UUID | None, actor_id: uuid.UUID | None, action: str, object_type: str,
           object_id: str | uuid.UUID, **details: Any) -> None:
    db.session.add(AuditLog(org_id=org_id, actor_id=actor_id, action=action, object_type=object_type,
                            object_id=str(object_id), details=details))
