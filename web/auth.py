"""Bearer-token authentication for /v1 and the org scoping every handler relies on."""

from __future__ import annotations

from flask import g, request

from tracecore.exceptions import PermissionDenied, Unauthenticated
from tracecore.settings import current_settings
from tracecore.tenancy.orgs import Principal, Role, authenticate

PUBLIC_ENDPOINTS = {"health.healthz", "api-docs.openapi_json", "static"}


def load_principal() -> None:
    """Resolve the caller before any /v1 handler runs; handlers read ``current()``."""
    if request.endpoint in PUBLIC_ENDPOINTS or not request.path.startswith("/v1/"):
        return
    if request.path.startswith("/v1/hooks/") or request.path.startswith("/v1/task/"):
        return  # authenticated by their own schemes (signatures, capability tokens)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("send Authorization: Bearer <api token>")
    g.principal = authenticate(token.strip(), trust_for=current_settings().token_trust_seconds)


def current(role: Role = Role.reader) -> Principal:
    principal: Principal | None = g.get("principal")
    if principal is None:
        raise Unauthenticated("send Authorization: Bearer <api token>")
    principal.require(role)
    return principal


def installation_admin() -> Principal:
    principal = current()
    if not principal.is_installation_admin:
        raise PermissionDenied("only an installation admin can do this")
    return principal
