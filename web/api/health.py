"""GET /healthz: 200 when the database and the broker answer, 503 otherwise."""

from __future__ import annotations

import redis
from flask.typing import ResponseReturnValue
from sqlalchemy import text

from tracecore.db.engine import db
from tracecore.settings import current_settings

from . import Blueprint

blp = Blueprint("health", __name__, description="Liveness of the API and what it depends on")

_clients: dict[str, redis.Redis] = {}


def _broker_ok(url: str | None) -> bool:
    if url is None:  # no broker configured is no broker to reach (a 503, not a 500)
        return False
    client = _clients.get(url)
    if client is None:
        client = _clients[url] = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@blp.route("/healthz")
@blp.doc(security=[])
def healthz() -> ResponseReturnValue:
    checks = {"database": False, "broker": False}
    try:
        checks["database"] = db.session.execute(text("SELECT 1")).scalar() == 1
    except Exception:  # any failure of the database is a failed check, not a crash
        db.session.rollback()
    checks["broker"] = _broker_ok(current_settings().broker_url)
    ok = all(checks.values())
    return {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503
