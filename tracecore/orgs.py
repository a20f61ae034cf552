"""Tenancy: orgs, users, their memberships (roles) and API tokens.

Every row that belongs to a tenant carries ``org_id``; an API token is bound to one
org and acts with its user's role there. Only a SHA-256 of a token is stored, so a
leaked database does not leak credentials; the token itself is shown once.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Boolean, CheckConstraint, DateTime, ForeignKey, String, Uuid, func, select, text, update
from sqlalchemy.orm import Mapped, mapped_column

from .db import Base, created_at, db, execute_one, uuid_pk
from .exceptions import Conflict, NotFound, PermissionDenied, Unauthenticated, ValidationError

TOKEN_PREFIX = "trc_"


class Role(enum.IntEnum):
    """Ordered: a higher role can do everything a lower one can."""

    reader = 1
    writer = 2
    admin = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name]
        except KeyError:
            raise ValidationError(f"unknown role {name!r}; one of reader, writer, admin",
                                  path="role", code="unknown_role") from None


class Org(Base):
    __tablename__ = "orgs"
    id: Mapped[uuid.UUID] = uuid_pk()
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    created_at: Mapped[datetime] = created_at()


class User(Base):
    __tablename__ = "users"
    id: Mapped[uuid.UUID] = uuid_pk()
    email: Mapped[str] = mapped_column(String(254), unique=True, nullable=False)
    is_installation_admin: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = created_at()


class Membership(Base):
    __tablename__ = "memberships"
    __table_args__ = (CheckConstraint("role IN ('reader', 'writer', 'admin')", name="role"),)
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = created_at()


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(128), nullable=False, default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    display_prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = created_at()
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved once per request from the bearer token."""

    user_id: uuid.UUID
    org_id: uuid.UUID
    role: Role
    is_installation_admin: bool
    token_id: uuid.UUID

    def require(self, role: Role) -> None:
        if self.role < role:
            raise PermissionDenied(f"this needs the {role.name} role; the token has {self.role.name}")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_org(name: str) -> Org:
    if not name or len(name) > 64:
        raise ValidationError("org name must be 1 to 64 characters", path="name")
    if db.session.scalar(select(Org.id).where(Org.name == name)) is not None:
        raise Conflict(f"an org named {name!r} exists", code="org_exists")
    org = Org(name=name)
    db.session.add(org)
    db.session.flush()
    return org


def get_or_create_user(email: str, *, installation_admin: bool = False) -> User:
    user = db.session.scalar(select(User).where(User.email == email))
    if user is None:
        user = User(email=email, is_installation_admin=installation_admin)
        db.session.add(user)
        db.session.flush()
    return user


def add_member(org: Org, user: User, role: Role) -> Membership:
    membership = db.session.get(Membership, (org.id, user.id))
    if membership is None:
        membership = Membership(org_id=org.id, user_id=user.id, role=role.name)
        db.session.add(membership)
    else:
        membership.role = role.name
    db.session.flush()
    forget_tokens()
    return membership


def issue_token(org_id: uuid.UUID, user_id: uuid.UUID, name: str = "") -> tuple[ApiToken, str]:
    """Create a token; the clear text is returned here and never again."""
    if db.session.get(Membership, (org_id, user_id)) is None:
        raise NotFound("no such member in this org")
    clear = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(org_id=org_id, user_id=user_id, name=name, token_hash=hash_token(clear),
                     display_prefix=clear[:10])
    db.session.add(token)
    db.session.flush()
    return token, clear


_AUTHENTICATE = text("""
SELECT api_tokens.id, api_tokens.org_id, api_tokens.user_id, memberships.role, users.is_installation_admin,
       EXTRACT(EPOCH FROM api_tokens.expires_at - now()) AS expires_in
FROM api_tokens
JOIN memberships ON memberships.org_id = api_tokens.org_id AND memberships.user_id = api_tokens.user_id
JOIN users ON users.id = api_tokens.user_id
WHERE api_tokens.token_hash = :token_hash AND api_tokens.revoked_at IS NULL
  AND (api_tokens.expires_at IS NULL OR api_tokens.expires_at > now())
""")

# token hash -> (monotonic deadline, principal): tokens this process authenticated lately.
_recent: dict[str, tuple[float, Principal]] = {}
_RECENT_MAX = 10_000


def authenticate(clear: str, *, trust_for: float = 0.0) -> Principal:
    """Resolve a bearer token in one query; an unknown, revoked or expired token is 401.

    Every API request pays for this: one autocommit statement outside the request's session
    (no pre-ping, BEGIN or ROLLBACK round trips, no ORM compilation). With ``trust_for`` > 0
    (TRACE_TOKEN_TRUST_SECONDS) a token this process resolved within that many seconds is
    not asked about again: a revocation or role change made by another process takes effect
    here within that time (this process's own changes clear it at once: :func:`forget_tokens`).
    """
    token_hash = hash_token(clear)
    if trust_for > 0:
        recent = _recent.get(token_hash)
        if recent is not None and recent[0] > time.monotonic():
            return recent[1]
    row = execute_one(_AUTHENTICATE, {"token_hash": token_hash})
    if row is None:
        _recent.pop(token_hash, None)
        raise Unauthenticated("unknown, revoked or expired token")
    principal = Principal(user_id=row["user_id"], org_id=row["org_id"], role=Role[row["role"]],
                          is_installation_admin=row["is_installation_admin"], token_id=row["id"])
    if trust_for > 0:
        if len(_recent) >= _RECENT_MAX:
            _recent.clear()
        expires_in = row["expires_in"]
        _recent[token_hash] = (time.monotonic() + min(trust_for, float("inf") if expires_in is None
                                                      else float(expires_in)), principal)
    return principal


def forget_tokens() -> None:
    """Drop what :func:`authenticate` trusts: after this process changed a token, role or membership."""
    _recent.clear()


def revoke_token(org_id: uuid.UUID, token_id: uuid.UUID) -> None:
    result = db.session.execute(update(ApiToken).where(ApiToken.id == token_id, ApiToken.org_id == org_id)
                                .values(revoked_at=func.now()))
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise NotFound("no such token")
    forget_tokens()
