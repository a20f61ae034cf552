#!/usr/bin/env bash
# A local chain node for the chain tests and benchmarks: anvil, from the npm package
# @foundry-rs/anvil-linux-amd64 (the registry this machine reaches), installed under
# $TRACE_TOOLS (default .trace/tools) and linked as $TRACE_TOOLS/bin/anvil.
#
#   deploy/ensure-anvil.sh        prints one line: where anvil is
#
# Already there and answering `--version`: nothing to do. The version is pinned here.
set -euo pipefail
VERSION="${TRACE_ANVIL_VERSION:-1.7.1}"
TOOLS="${TRACE_TOOLS:-$(cd "$(dirname "$0")/.." && pwd)/.trace/tools}"
BIN="$TOOLS/bin/anvil"
if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
    echo "ensure-anvil: $BIN"
    exit 0
fi
command -v npm >/dev/null 2>&1 || {
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm >&2 \
            || { apt-get update -q >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm >&2; }
    else
        echo "ensure-anvil: npm is missing and we are not root" >&2; exit 1
    fi
}
mkdir -p "$TOOLS/anvil" "$TOOLS/bin"
npm install --silent --no-audit --no-fund --prefix "$TOOLS/anvil" "@foundry-rs/anvil-linux-amd64@$VERSION" >&2
found="$(find "$TOOLS/anvil/node_modules/@foundry-rs" -type f -name anvil | head -1)"
[ -n "$found" ] || { echo "ensure-anvil: the package holds no anvil binary" >&2; exit 1; }
chmod +x "$found"
ln -sf "$found" "$BIN"
"$BIN" --version >&2
echo "ensure-anvil: $BIN"
