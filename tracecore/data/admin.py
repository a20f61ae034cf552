"""Privileged operations on datasets: redaction of personal rows and cross-org / PII grants.

Each is an admin action of the owning org and each is audited (the API records grants; a
redaction records itself, because deleting personal data must never happen unlogged,
whoever calls it). Kept apart from ``tracecore.data.datasets`` so that module stays about what a
dataset is and how it is versioned and read.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DataError

from tracecore.data import sql
from tracecore.data.datasets import DatasetGrant, PiiGrant, ensure_hot_table, get_dataset
from tracecore.data.schema import pg_column_type
from tracecore.db.engine import db
from tracecore.exceptions import Conflict, NotFound, ValidationError
from tracecore.tenancy import audit
from tracecore.tenancy.orgs import Membership, Org, User

# -- redaction -------------------------------------------------------------------


def redact_rows(org_id: uuid.UUID, name: str, key_filter: Mapping[str, Any], *, actor: uuid.UUID | None) -> int:
    """Delete the hot rows of a buffered dataset whose unique key equals ``key_filter``;
    answers how many. Audited as ``dataset.redact`` in the same transaction.

    The filter must name exactly the unique-key columns, each with a JSON scalar (it is cast
    to the column's type by PostgreSQL: a value that does not fit is ``invalid_key_filter``).
    The audit row keeps the SHA-256 of the filter, not the filter: the key may itself be
    the personal data being removed. Derived and raw datasets answer 409 ``not_redactable``
    (module docstring).
    """
    dataset = get_dataset(org_id, name)
    if dataset.kind != "buffered":
        raise Conflict(f"dataset {name!r} is {dataset.kind}: its Parquet versions are immutable; re-run its job to "
                       "write a version without the rows", code="not_redactable")
    keys = list(dataset.unique_key)
    if not keys or not isinstance(key_filter, Mapping) or set(key_filter) != set(keys):
        raise ValidationError(f"the key filter must name exactly the unique key columns {keys}", path="key",
                              code="invalid_key_filter", details={"unique_key": keys})
    table = ensure_hot_table(dataset)
    types = {column["name"]: pg_column_type(column["type"]) for column in dataset.schema or ()}
    params: dict[str, Any] = {"org": org_id}
    for index, key in enumerate(keys):
        value = key_filter[key]
        if value is None or isinstance(value, (dict, list)):
            raise ValidationError(f"key {key!r} needs a scalar value", path=f"key.{key}", code="invalid_key_filter")
        params[f"k{index}"] = value if isinstance(value, str) else json.dumps(value)
    delete = sql.delete_by_key(table, [(key, types[key]) for key in keys])
    try:
        with db.session.begin_nested():
            deleted = db.session.execute(delete, params).rowcount  # type: ignore[attr-defined]
    except DataError:
        raise ValidationError("a key value does not fit its column's type", path="key",
                              code="invalid_key_filter") from None
    digest = hashlib.sha256(json.dumps(dict(key_filter), sort_keys=True, default=str).encode()).hexdigest()
    audit.record(org_id=org_id, actor_id=actor, action="dataset.redact", object_type="dataset", object_id=dataset.id,
                 name=name, key_columns=keys, key_sha256=digest, rows=deleted)
    return deleted


# -- grants ----------------------------------------------------------------------


def grant_dataset(org_id: uuid.UUID, name: str, grantee_org: str, *, granted_by: uuid.UUID | None) -> DatasetGrant:
    """Let the org named ``grantee_org`` read the dataset; idempotent (``is_new`` tells).
    NotFound for an unknown dataset or org; a grant to the owner itself is invalid."""
    dataset = get_dataset(org_id, name)
    grantee = db.session.scalar(select(Org).where(Org.name == grantee_org))
    if grantee is None:
        raise NotFound(f"no org named {grantee_org!r}")
    if grantee.id == org_id:
        raise ValidationError("an org already reads its own datasets", path="org", code="invalid_value")
    inserted = db.session.scalar(insert(DatasetGrant).values(
        id=uuid.uuid4(), dataset_id=dataset.id, org_id=org_id, grantee_org_id=grantee.id, granted_by=granted_by)
        .on_conflict_do_nothing(index_elements=["dataset_id", "grantee_org_id"]).returning(DatasetGrant.id))
    grant = db.session.scalar(select(DatasetGrant).where(DatasetGrant.dataset_id == dataset.id,
                                                         DatasetGrant.grantee_org_id == grantee.id))
    assert grant is not None
    grant.is_new = inserted is not None
    return grant


def grant_pii(org_id: uuid.UUID, name: str, email: str, *, granted_by: uuid.UUID | None) -> PiiGrant:
    """Let one user read a PII dataset of ``org_id``. The user must be a member of the owning
    org or of an org the dataset is granted to; anyone else is NotFound (no user directory
    leaks through this call). Idempotent (``is_new`` tells)."""
    dataset = get_dataset(org_id, name)
    readers = select(DatasetGrant.grantee_org_id).where(DatasetGrant.dataset_id == dataset.id)
    user = db.session.scalar(select(User).join(Membership, Membership.user_id == User.id)
                             .where(User.email == email, or_(Membership.org_id == org_id,
                                                             Membership.org_id.in_(readers))).limit(1))
    if user is None:
        raise NotFound(f"no user {email!r} in an org that can read {name!r}")
    inserted = db.session.scalar(insert(PiiGrant).values(
        id=uuid.uuid4(), dataset_id=dataset.id, org_id=org_id, user_id=user.id, granted_by=granted_by)
        .on_conflict_do_nothing(index_elements=["dataset_id", "user_id"]).returning(PiiGrant.id))
    grant = db.session.scalar(select(PiiGrant).where(PiiGrant.dataset_id == dataset.id, PiiGrant.user_id == user.id))
    assert grant is not None
    grant.is_new = inserted is not None
    return grant
