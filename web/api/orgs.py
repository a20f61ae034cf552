"""Orgs, members, tokens and the caller: /v1/orgs, /v1/members, /v1/tokens, /v1/me.

An org admin acts inside its own org only: it changes memberships of that org and mints
tokens for the users the org manages (``tracecore.tenancy.orgs.is_managed_by``). Installation power
is never granted here: ``POST /v1/orgs`` needs a token that already holds it.
"""

from __future__ import annotations

import uuid

from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields, validate

from tracecore.db.engine import db
from tracecore.exceptions import NotFound, PermissionDenied, ValidationError
from tracecore.tenancy import audit, orgs
from tracecore.tenancy.orgs import Principal, Role

from ..auth import current, installation_admin
from . import Blueprint

blp = Blueprint("orgs", __name__, url_prefix="/v1", description="Tenancy: orgs, members and API tokens")

ORG_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"
ROLES = validate.OneOf([role.name for role in Role])


def _email(**kwargs: object) -> fields.Email:
    return fields.Email(validate=validate.Length(max=254), **kwargs)  # type: ignore[arg-type]


class OrgCreate(Schema):
    name = fields.String(required=True, validate=validate.Regexp(ORG_NAME))
    admin_email = _email(load_default=None, metadata={"description": "First admin; gets a token"})


class OrgOut(Schema):
    id = fields.UUID()
    name = fields.String()
    admin_token = fields.String(metadata={"description": "Shown once"})


class TokenCreate(Schema):
    name = fields.String(load_default="", validate=validate.Length(max=128))
    email = _email(load_default=None, metadata={
        "description": "Admins only: issue for this user, adding them as a member if needed. Only for users "
                       "the org manages (members of no other org); others mint their own tokens"})
    role = fields.String(load_default=None, validate=ROLES, metadata={
        "description": "Admins only: the member's role in this org (a new member defaults to reader)"})
    org = fields.String(load_default=None, validate=validate.Regexp(ORG_NAME), metadata={
        "description": "Your own token for another org you are a member of (not with email or role)"})


class TokenOut(Schema):
    id = fields.UUID()
    token = fields.String(metadata={"description": "Shown once; only its hash is stored"})
    email = fields.String()
    role = fields.String()
    org = fields.String()


class TokenInfo(Schema):
    id = fields.UUID()
    name = fields.String()
    email = fields.String()
    prefix = fields.String(metadata={"description": "The token's first characters, to recognise it"})
    created_at = fields.DateTime()
    expires_at = fields.DateTime(allow_none=True)


class MemberCreate(Schema):
    email = _email(required=True)
    role = fields.String(load_default=Role.reader.name, validate=ROLES)


class MemberPatch(Schema):
    role = fields.String(required=True, validate=ROLES)


class MemberOut(Schema):
    email = fields.String()
    role = fields.String()
    since = fields.DateTime()


class MeOut(Schema):
    user = fields.Dict()
    org = fields.Dict()
    role = fields.String()


@blp.route("/orgs", methods=["POST"])
@blp.arguments(OrgCreate)
@blp.response(201, OrgOut)
def create_org(body: dict) -> ResponseReturnValue:
    principal = installation_admin()
    org = orgs.create_org(body["name"])
    out = {"id": org.id, "name": org.name}
    if body["admin_email"]:
        user = orgs.get_or_create_user(body["admin_email"])
        orgs.add_member(org, user, Role.admin)
        _, out["admin_token"] = orgs.issue_token(org.id, user.id, name="first admin")
    audit.record(org_id=org.id, actor_id=principal.user_id, action="org.create", object_type="org",
                 object_id=org.id)
    db.session.commit()
    return out


@blp.route("/tokens", methods=["POST"])
@blp.arguments(TokenCreate)
@blp.response(201, TokenOut)
def create_token(body: dict) -> ResponseReturnValue:
    principal = current()
    if body["org"] is not None:
        if body["email"] is not None or body["role"] is not None:
            raise ValidationError("'org' mints your own token; it does not go with 'email' or 'role'", path="org")
        return _own_token_elsewhere(principal, body["org"], body["name"])
    org = orgs.get_org(principal.org_id)
    if body["email"] is None and body["role"] is None:
        user = orgs.get_user(principal.user_id)
        role = principal.role
    else:
        current(Role.admin)
        user = _managed_user(principal, body["email"]) if body["email"] else orgs.get_user(principal.user_id)
        membership = db.session.get(orgs.Membership, (org.id, user.id))
        role = Role.parse(body["role"]) if body["role"] else (Role[membership.role] if membership else Role.reader)
        orgs.add_member(org, user, role)
    token, clear = orgs.issue_token(principal.org_id, user.id, name=body["name"])
    audit.record(org_id=principal.org_id, actor_id=principal.user_id, action="token.create",
                 object_type="api_token", object_id=token.id, for_user=user.email, role=role.name)
    db.session.commit()
    return {"id": token.id, "token": clear, "email": user.email, "role": role.name, "org": org.name}


def _managed_user(principal: Principal, email: str) -> orgs.User:
    user = orgs.find_user(email)
    if user is None:
        return orgs.get_or_create_user(email)
    if user.id != principal.user_id and not orgs.is_managed_by(principal.org_id, user):
        raise PermissionDenied("this user has standing outside this org: add them with POST /v1/members and "
                               "they mint their own token (POST /v1/tokens with 'org')", code="foreign_user")
    return user


def _own_token_elsewhere(principal: Principal, org_name: str, name: str) -> ResponseReturnValue:
    org = db.session.scalar(db.select(orgs.Org).where(orgs.Org.name == org_name))
    membership = db.session.get(orgs.Membership, (org.id, principal.user_id)) if org is not None else None
    if org is None or membership is None:
        raise NotFound("you are not a member of an org of that name")
    token, clear = orgs.issue_token(org.id, principal.user_id, name=name)
    user = orgs.get_user(principal.user_id)
    audit.record(org_id=org.id, actor_id=principal.user_id, action="token.create", object_type="api_token",
                 object_id=token.id, for_user=user.email, role=membership.role)
    db.session.commit()
    return {"id": token.id, "token": clear, "email": user.email, "role": membership.role, "org": org.name}


@blp.route("/tokens")
@blp.response(200, TokenInfo(many=True))
def list_tokens() -> ResponseReturnValue:
    """An admin sees every live token of the org; any other member sees their own."""
    principal = current()
    user_id = None if principal.role >= Role.admin else principal.user_id
    return [{"id": token.id, "name": token.name, "email": email, "prefix": token.display_prefix,
             "created_at": token.created_at, "expires_at": token.expires_at}
            for token, email in orgs.tokens_of(principal.org_id, user_id)]


@blp.route("/tokens/<token_id>", methods=["DELETE"])
@blp.response(204)
def revoke_token(token_id: str) -> ResponseReturnValue:
    """Revoke a token: your own, or (admins) any of the org's."""
    principal = current()
    parsed = _uuid(token_id, "no such token")
    orgs.revoke_token(principal.org_id, parsed, user_id=None if principal.role >= Role.admin else principal.user_id)
    audit.record(org_id=principal.org_id, actor_id=principal.user_id, action="token.revoke",
                 object_type="api_token", object_id=parsed)
    db.session.commit()
    return ""


@blp.route("/members")
@blp.response(200, MemberOut(many=True))
def list_members() -> ResponseReturnValue:
    """Every member of the org sees who else is in it, and with which role."""
    principal = current()
    return [{"email": user.email, "role": membership.role, "since": membership.created_at}
            for user, membership in orgs.members(principal.org_id)]


@blp.route("/members", methods=["POST"])
@blp.arguments(MemberCreate)
@blp.response(201, MemberOut)
def add_member(body: dict) -> ResponseReturnValue:
    """Add a user to this org (any user: a membership gives them standing here only; they mint
    their own token for it). An existing member's role is changed with PATCH."""
    principal = current(Role.admin)
    org = orgs.get_org(principal.org_id)
    user = orgs.get_or_create_user(body["email"])
    if db.session.get(orgs.Membership, (org.id, user.id)) is not None:
        raise ValidationError("already a member: change the role with PATCH /v1/members/{email}", path="email",
                              code="already_member")
    membership = orgs.add_member(org, user, Role.parse(body["role"]))
    audit.record(org_id=org.id, actor_id=principal.user_id, action="member.add", object_type="user",
                 object_id=user.id, role=membership.role)
    db.session.commit()
    return {"email": user.email, "role": membership.role, "since": membership.created_at}


@blp.route("/members/<email>", methods=["PATCH"])
@blp.arguments(MemberPatch)
@blp.response(200, MemberOut)
def change_member(body: dict, email: str) -> ResponseReturnValue:
    principal = current(Role.admin)
    user = _member(principal, email)
    membership = orgs.set_role(principal.org_id, user.id, Role.parse(body["role"]))
    audit.record(org_id=principal.org_id, actor_id=principal.user_id, action="member.role", object_type="user",
                 object_id=user.id, role=membership.role)
    db.session.commit()
    return {"email": user.email, "role": membership.role, "since": membership.created_at}


@blp.route("/members/<email>", methods=["DELETE"])
@blp.response(204)
def remove_member(email: str) -> ResponseReturnValue:
    principal = current(Role.admin)
    user = _member(principal, email)
    orgs.remove_member(principal.org_id, user.id)
    audit.record(org_id=principal.org_id, actor_id=principal.user_id, action="member.remove",
                 object_type="user", object_id=user.id)
    db.session.commit()
    return ""


def _member(principal: Principal, email: str) -> orgs.User:
    user = orgs.find_user(email) if len(email) <= 254 else None
    if user is None or db.session.get(orgs.Membership, (principal.org_id, user.id)) is None:
        raise NotFound("no such member in this org")
    return user


def _uuid(text: str, message: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise NotFound(message) from None


@blp.route("/me")
@blp.response(200, MeOut)
def me() -> ResponseReturnValue:
    principal = current()
    user = orgs.get_user(principal.user_id)
    org = orgs.get_org(principal.org_id)
    return {"user": {"id": str(user.id), "email": user.email,
                     "installation_admin": principal.is_installation_admin},
            "org": {"id": str(org.id), "name": org.name}, "role": principal.role.name}
