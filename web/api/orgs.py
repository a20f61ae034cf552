"""Orgs, tokens and the caller: POST /v1/orgs, POST /v1/tokens, GET /v1/me."""

from __future__ import annotations

from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields, validate

from tracecore import audit, orgs
from tracecore.db import db
from tracecore.orgs import Role

from ..auth import current, installation_admin
from . import Blueprint

blp = Blueprint("orgs", __name__, url_prefix="/v1", description="Tenancy: orgs, members and API tokens")


class OrgCreate(Schema):
    name = fields.String(required=True, validate=validate.Regexp(r"^[a-z0-9][a-z0-9_-]{0,63}$"))
    admin_email = fields.Email(load_default=None, metadata={"description": "First admin; gets a token"})


class OrgOut(Schema):
    id = fields.UUID()
    name = fields.String()
    admin_token = fields.String(metadata={"description": "Shown once"})


class TokenCreate(Schema):
    name = fields.String(load_default="")
    email = fields.Email(load_default=None,
                         metadata={"description": "Admins only: issue for this member, adding them if needed"})
    role = fields.String(load_default=None, validate=validate.OneOf([role.name for role in Role]))


class TokenOut(Schema):
    id = fields.UUID()
    token = fields.String(metadata={"description": "Shown once; only its hash is stored"})
    email = fields.String()
    role = fields.String()
    org = fields.String()


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
    org = db.session.get(orgs.Org, principal.org_id)
    if body["email"] is None and body["role"] is None:
        user = db.session.get(orgs.User, principal.user_id)
        role = principal.role
    else:
        current(Role.admin)
        user = orgs.get_or_create_user(body["email"]) if body["email"] else db.session.get(orgs.User,
                                                                                          principal.user_id)
        role = Role.parse(body["role"] or "reader")
        orgs.add_member(org, user, role)
    token, clear = orgs.issue_token(principal.org_id, user.id, name=body["name"])
    audit.record(org_id=principal.org_id, actor_id=principal.user_id, action="token.create",
                 object_type="api_token", object_id=token.id, for_user=user.email, role=role.name)
    db.session.commit()
    return {"id": token.id, "token": clear, "email": user.email, "role": role.name, "org": org.name}


@blp.route("/me")
@blp.response(200, MeOut)
def me() -> ResponseReturnValue:
    principal = current()
    user = db.session.get(orgs.User, principal.user_id)
    org = db.session.get(orgs.Org, principal.org_id)
    return {"user": {"id": str(user.id), "email": user.email,
                     "installation_admin": user.is_installation_admin},
            "org": {"id": str(org.id), "name": org.name}, "role": principal.role.name}
