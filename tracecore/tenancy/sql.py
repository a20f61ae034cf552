"""Tenancy's raw SQL, in one place: the API token lookup every API request makes.

Text rather than ORM because it is sent straight to psycopg on the autocommit connection
(``db.engine.execute_one``): SQLAlchemy's per-execution work would be a large part of it.
``orgs.authenticate`` says what it decides.
"""

from __future__ import annotations

from sqlalchemy import text

# The principal of a live token (not revoked, not expired) by its hash; ``expires_in`` bounds how long
# ``orgs.authenticate`` may trust it without asking again.
AUTHENTICATE = text("""
SELECT api_tokens.id, api_tokens.org_id, api_tokens.user_id, memberships.role,
       api_tokens.installation_admin AND users.is_installation_admin AS is_installation_admin,
       EXTRACT(EPOCH FROM api_tokens.expires_at - now()) AS expires_in
FROM api_tokens
JOIN memberships ON memberships.org_id = api_tokens.org_id AND memberships.user_id = api_tokens.user_id
JOIN users ON users.id = api_tokens.user_id
WHERE api_tokens.token_hash = :token_hash AND api_tokens.revoked_at IS NULL
  AND (api_tokens.expires_at IS NULL OR api_tokens.expires_at > now())
""")
