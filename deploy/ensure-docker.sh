#!/usr/bin/env bash
# Make sure a Docker engine answers (`docker info` succeeds).
#
#   deploy/ensure-docker.sh
#
# - An engine already answers: do nothing, exit 0.
# - None answers and we are root: install Debian's `docker.io` with apt-get if `dockerd`
#   is missing (a bare `docker` client in /usr/local/bin is not an engine), then start
#   `dockerd` in the background and wait up to $TRACE_DOCKERD_WAIT seconds (60) for it.
#   Inside a container / microVM the defaults may fail (storage driver, iptables), so a
#   list of flag sets is tried in order; the first that works is remembered in
#   $TRACE_DOCKERD_FLAGS_FILE and used first next time.
# - None answers and we are not root: say so, exit 1.
#
# Prints exactly one line on stdout saying what it did. Details go to stderr and
# to the dockerd log ($TRACE_DOCKERD_LOG, default /var/log/trace-dockerd.log).
set -euo pipefail

LOG="${TRACE_DOCKERD_LOG:-/var/log/trace-dockerd.log}"
FLAGS_FILE="${TRACE_DOCKERD_FLAGS_FILE:-/var/lib/trace/dockerd.flags}"
WAIT="${TRACE_DOCKERD_WAIT:-60}"

say() { echo "ensure-docker: $*"; }
note() { echo "ensure-docker: $*" >&2; }

engine_up() {
    command -v docker >/dev/null 2>&1 || return 1
    timeout 15 docker info >/dev/null 2>&1
}

if engine_up; then
    say "engine already answers ($(docker info --format '{{.ServerVersion}} {{.Driver}}' 2>/dev/null || echo '?')); nothing to do"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    say "no Docker engine answers and we are not root: start one (or run this script as root, or add yourself to the 'docker' group and re-login)" >&2
    exit 1
fi

# A DOCKER_HOST pointing elsewhere would make us start an engine nobody talks to.
if [ -n "${DOCKER_HOST:-}" ] && [ "${DOCKER_HOST#unix:///var/run/docker.sock}" = "$DOCKER_HOST" ] \
        && [ "${DOCKER_HOST#unix:///run/docker.sock}" = "$DOCKER_HOST" ]; then
    say "DOCKER_HOST=$DOCKER_HOST does not answer; not starting a local engine for it" >&2
    exit 1
fi

did_install=""
if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    note "installing Debian's docker.io (dockerd missing)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends docker.io >&2; then
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends docker.io >&2
    fi
    hash -r
    did_install="installed docker.io, "
    command -v dockerd >/dev/null 2>&1 || { say "docker.io installed but dockerd still missing" >&2; exit 1; }
fi

# The package's postinst may have started it through an init system (not in a
# container without one, but on a real host it would).
if engine_up; then
    say "${did_install}engine answers (started by the package's service)"
    exit 0
fi

mkdir -p "$(dirname "$LOG")" "$(dirname "$FLAGS_FILE")"

DOCKERD_PID=""
stop_ours() {
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        kill "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$DOCKERD_PID" 2>/dev/null || true
    fi
    DOCKERD_PID=""
}

# A dockerd already running but not answering (still starting, or wedged)?
if pid="$(cat /var/run/docker.pid 2>/dev/null)" && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    note "dockerd (pid $pid) is running but not answering; waiting for it"
    for _ in $(seq 1 "$WAIT"); do
        if engine_up; then say "${did_install}engine answers (dockerd pid $pid was still starting)"; exit 0; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    say "dockerd pid $pid is running but does not answer after ${WAIT}s; see $LOG (not killing a daemon we did not start)" >&2
    exit 1
fi

try_start() {  # $@ = extra dockerd flags; 0 when the engine answers
    note "starting dockerd ${*:-(default flags)}"
    echo "=== $(date -u +%FT%TZ) ensure-docker: dockerd $*" >>"$LOG"
    # setsid + nohup: the daemon must outlive this script and its caller's process group.
    setsid nohup dockerd "$@" >>"$LOG" 2>&1 </dev/null &
    DOCKERD_PID=$!
    local i
    for i in $(seq 1 "$WAIT"); do
        if engine_up; then return 0; fi
        if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
            note "dockerd ${*:-} exited after ${i}s: $(tail -n 3 "$LOG" | tr '\n' ' ' | cut -c1-400)"
            DOCKERD_PID=""
            return 1
        fi
        sleep 1
    done
    note "dockerd ${*:-} did not answer within ${WAIT}s"
    stop_ours
    return 1
}

# Candidate flag sets, in order. Only network_mode=none containers are needed, so
# the bridge/iptables setup is dispensable; vfs is the storage driver of last resort.
candidates=()
if [ -s "$FLAGS_FILE" ]; then candidates+=("$(cat "$FLAGS_FILE")"); fi
candidates+=(
    ""
    "--iptables=false --ip6tables=false"
    "--iptables=false --ip6tables=false --bridge=none"
    "--storage-driver=overlay2 --iptables=false --ip6tables=false --bridge=none"
    "--storage-driver=fuse-overlayfs --iptables=false --ip6tables=false --bridge=none"
    "--storage-driver=vfs --iptables=false --ip6tables=false --bridge=none"
)

declare -A seen=()
tried=()
for flags in "${candidates[@]}"; do
    [ -z "${seen["x$flags"]:-}" ] || continue
    seen["x$flags"]=1
    tried+=("[${flags:-default}]")
    if [[ "$flags" == *fuse-overlayfs* ]] && ! command -v fuse-overlayfs >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends fuse-overlayfs >&2 || continue
    fi
    # shellcheck disable=SC2086  # flags are word-split on purpose
    if try_start $flags; then
        printf '%s\n' "$flags" >"$FLAGS_FILE"
        say "${did_install}started dockerd (pid $DOCKERD_PID) with flags '${flags:-<default>}'; log $LOG"
        exit 0
    fi
done

say "could not start a Docker engine (tried: ${tried[*]}); see $LOG" >&2
exit 1
