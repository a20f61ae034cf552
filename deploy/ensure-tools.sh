#!/usr/bin/env bash
# The Debian tools the test suite drives for real, installed as root when missing:
#   docker-compose  checks docker-compose.yml with `config` (when `docker compose` is absent)
#   bubblewrap      the `process` sandbox backend (TRACE_SANDBOX=process)
set -euo pipefail
need=()
if ! docker compose version >/dev/null 2>&1 && ! docker-compose version >/dev/null 2>&1; then
    need+=(docker-compose)
fi
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
if [ ${#need[@]} -eq 0 ]; then
    echo "ensure-tools: compose and bubblewrap already here"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-tools: missing ${need[*]} and not root: install them (apt-get install ${need[*]})" >&2
    exit 1
fi
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2; then
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
echo "ensure-tools: installed ${need[*]}"
