#!/usr/bin/env bash
# Make sure a Compose implementation answers (`docker compose` or `docker-compose`), so the
# tests can check docker-compose.yml with `config`. As root with neither: Debian's docker-compose.
set -euo pipefail
if docker compose version >/dev/null 2>&1 || docker-compose version >/dev/null 2>&1; then
    echo "ensure-compose: compose already answers"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-compose: no docker compose / docker-compose and not root: install one" >&2
    exit 1
fi
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose >&2; then
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose >&2
fi
echo "ensure-compose: installed Debian's docker-compose"
