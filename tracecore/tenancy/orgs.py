"""Tenancy: orgs, users, their memberships (roles) and API tokens.

Every row that belongs to a tenant carries ``org_id``; an API token is bound to one
org and acts with its user's role there. Only a SHA-256 of a token is stored, so a
leaked database does not leak credentials; the token itself is shown once.

Three things are kept apart, because mixing them is how privilege leaks:

- a *membership* gives a user a role in one org; an org's admins change memberships of
  their own org only, and never leave it without an admin (``last_admin``);
- a *token* is a credential for one user in one org. An org admin mints tokens only for
  users the org *manages* (members of no other org, not installation admins): minting one
  for anyone else would let the org act as a person whose standing lies elsewhere;
- *installation power* (creating orgs) is held by a token minted with it on the host
  (``trace up``), and only while its user is an installation admin. No API endpoint grants it.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    String,
    Uuid,
    delete,
    false,
    func,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from tracecore.db.engine import Base, created_at, db, execute_one, uuid_pk
from tracecore.exceptions import Conflict, NotFound, PermissionDenied, Unauthenticated, ValidationError
from tracecore.tenancy import sql

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
    installation_admin: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False,
                                                     server_default=false())


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
    user = find_user(email)
    if user is None:
        user = User(email=email, is_installation_admin=installation_admin)
        db.session.add(user)
        db.session.flush()
    return user


def get_org(org_id: uuid.UUID) -> Org:
    org = db.session.get(Org, org_id)
    if org is None:
        raise NotFound("no such org")
    return org


def get_user(user_id: uuid.UUID) -> User:
    user = db.session.get(User, user_id)
    if user is None:
        raise NotFound("no such user")
    return user


def find_user(email: str) -> User | None:
    return db.session.scalar(select(User).where(User.email == email))


def is_managed_by(org_id: uuid.UUID, user: User) -> bool:
    """Whether ``org_id``'s admins may mint credentials for ``user``: a user that is a member of
    no other org and holds no installation power. Anyone else has standing the org does not own."""
    if user.is_installation_admin:
        return False
    elsewhere = db.session.scalar(select(func.count()).select_from(Membership)
                                  .where(Membership.user_id == user.id, Membership.org_id != org_id))
    return not elsewhere


def add_member(org: Org, user: User, role: Role) -> Membership:
    """Make ``user`` a member of ``org`` with ``role``, or change the role of a member."""
    membership = db.session.get(Membership, (org.id, user.id))
    if membership is None:
        membership = Membership(org_id=org.id, user_id=user.id, role=role.name)
        db.session.add(membership)
        db.session.flush()
    else:
        set_role(org.id, user.id, role)
    forget_tokens()
    return membership


def _lock_memberships(org_id: uuid.UUID) -> None:
    """Serialize changes to an org's memberships on the org's row: two admins demoting each other
    at once take turns, so the second sees that it would leave the org without an admin."""
    db.session.execute(select(Org.id).where(Org.id == org_id).with_for_update())


def _refuse_last_admin(org_id: uuid.UUID, user_id: uuid.UUID, action: str) -> None:
    admins = list(db.session.scalars(select(Membership.user_id).where(Membership.org_id == org_id,
                                                                      Membership.role == Role.admin.name)))
    if admins == [user_id]:
        raise Conflict(f"cannot {action} the last admin of the org: make another member admin first",
                       code="last_admin")


def set_role(org_id: uuid.UUID, user_id: uuid.UUID, role: Role) -> Membership:
    _lock_memberships(org_id)
    membership = db.session.get(Membership, (org_id, user_id), populate_existing=True)
    if membership is None:
        raise NotFound("no such member in this org")
    if membership.role == Role.admin.name and role < Role.admin:
        _refuse_last_admin(org_id, user_id, "demote")
    membership.role = role.name
    db.session.flush()
    forget_tokens()
    return membership


def remove_member(org_id: uuid.UUID, user_id: uuid.UUID) -> None:
    """End a membership and revoke the member's tokens of this org (so re-adding them later
    does not bring old credentials back)."""
    _lock_memberships(org_id)
    membership = db.session.get(Membership, (org_id, user_id), populate_existing=True)
    if membership is None:
        raise NotFound("no such member in this org")
    if membership.role == Role.admin.name:
        _refuse_last_admin(org_id, user_id, "remove")
    db.session.execute(update(ApiToken).where(ApiToken.org_id == org_id, ApiToken.user_id == user_id,
                                              ApiToken.revoked_at.is_(None)).values(revoked_at=func.now()))
    db.session.execute(delete(Membership).where(Membership.org_id == org_id, Membership.user_id == user_id))
    db.session.flush()
    forget_tokens()


def members(org_id: uuid.UUID) -> list[tuple[User, Membership]]:
    return [(user, membership) for user, membership in db.session.execute(
        select(User, Membership).join(Membership, Membership.user_id == User.id)
        .where(Membership.org_id == org_id).order_by(User.email))]


def issue_token(org_id: uuid.UUID, user_id: uuid.UUID, name: str = "", *,
                installation_admin: bool = False) -> tuple[ApiToken, str]:
    """Create a token; the clear text is returned here and never again.

    ``installation_admin`` is for the host's bootstrap only (``trace up``); the power also needs
    the user to be an installation admin when the token is used."""
    if db.session.get(Membership, (org_id, user_id)) is None:
        raise NotFound("no such member in this org")
    if len(name) > 128:
        raise ValidationError("a token name is at most 128 characters", path="name", code="too_long")
    clear = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(org_id=org_id, user_id=user_id, name=name, token_hash=hash_token(clear),
                     display_prefix=clear[:10], installation_admin=installation_admin)
    db.session.add(token)
    db.session.flush()
    return token, clear


def tokens_of(org_id: uuid.UUID, user_id: uuid.UUID | None = None) -> list[tuple[ApiToken, str]]:
    """Live tokens of the org (or of one of its members) with their users' emails; no secrets."""
    query = (select(ApiToken, User.email).join(User, User.id == ApiToken.user_id)
             .where(ApiToken.org_id == org_id, ApiToken.revoked_at.is_(None)).order_by(ApiToken.created_at))
    if user_id is not None:
        query = query.where(ApiToken.user_id == user_id)
    return [(token, email) for token, email in db.session.execute(query)]


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
    row = execute_one(sql.AUTHENTICATE, {"token_hash": token_hash})
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


def revoke_token(org_id: uuid.UUID, token_id: uuid.UUID, *, user_id: uuid.UUID | None = None) -> None:
    """Revoke a token of the org (of one member only when ``user_id`` is given)."""
    query = update(ApiToken).where(ApiToken.id == token_id, ApiToken.org_id == org_id, ApiToken.revoked_at.is_(None))
    if user_id is not None:
        query = query.where(ApiToken.user_id == user_id)
    result = db.session.execute(query.values(revoked_at=func.now()))
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise NotFound("no such token")
    forget_tokens()
