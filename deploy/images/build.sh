#!/usr/bin/env bash
# Build the Trace sandbox runtime images.
#
#   deploy/images/build.sh [python|node|all]     (default: all)
#   deploy/images/build.sh --hash KIND           print the content hash the image must carry
#
# trace-runtime-python : Debian bookworm + python3 (3.11)
# trace-runtime-node   : Debian bookworm + nodejs (18) + python3 (bootstrap.py, which the fargate backend starts)
# both                 : the project's workers/runtime/ at /opt/trace/runtime/, user sbx (10001),
#                        /var/task, /tmp, /run/trace; USER 10001, WORKDIR /var/task,
#                        CMD ["/usr/bin/python3", "/opt/trace/runtime/bootstrap.py"].
# python, also         : python-libraries.txt's wheels in /usr/local/lib/python3.11/dist-packages
# node, also           : node-libraries.txt's packages in /opt/trace/node_modules;
#                        /opt/trace/runtime/node_bootstrap.blob, a Node startup snapshot of the Node
#                        wrapper made by the image's own node (see bake_node_snapshot).
#
# Up to date = trace-runtime-<kind>:latest exists and its label org.trace.runtime-hash equals
# the sha256 of workers/runtime/ + this directory's build files; then nothing is done.
#
# Two ways to build:
#   dockerfile : `docker build` from Dockerfile.<kind>, only when a registry answers
#                (debian:bookworm-slim can be pulled within 20 s).
#   debootstrap: `debootstrap --variant=minbase` from the machine's own apt sources (the first
#                URI serving bookworm main), upgraded from the -updates/-security sources found
#                there too, slimmed, cached as a tarball under $TRACE_IMAGE_CACHE; then the
#                runtime files are appended and the lot goes through `docker import`. A change
#                in workers/runtime/ only redoes the import (seconds). Needs root the first
#                time (debootstrap); later imports only need the Docker engine.
#
# Environment:
#   TRACE_IMAGE_CACHE   cache dir for base rootfs tarballs (/var/cache/trace-images, or
#                       ~/.cache/trace-images when that is not writable)
#   TRACE_IMAGE_BUILD   auto (default) | dockerfile | debootstrap
#   TRACE_IMAGE_UPGRADE 1 (default) apply bookworm-updates/-security in the debootstrap path; 0 = no
#   TRACE_DEBIAN_MIRROR override the mirror taken from the apt sources
#   TRACE_RUNTIME_SRC   override the runtime source dir (default: <repo>/workers/runtime)
#   TRACE_IMAGE_FORCE   1 = rebuild even when up to date
#   TRACE_PIP           the host's pip that fetches the vetted wheels (default: python3 -m pip)
#   TRACE_NPM           the host's npm that fetches the vetted Node packages (default: npm)
#
# The vetted libraries (python-libraries.txt, node-libraries.txt, part of the hash): fetched at build
# with the host's pip (manylinux wheels for cp311, --no-deps, every dependency pinned in the list) and
# npm, installed into /usr/local/lib/python3.11/dist-packages (byte-compiled, unchecked-hash: the root
# is read-only and never changes) and /opt/trace/node_modules. Neither pip nor npm is in the image.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
RUNTIME_SRC="${TRACE_RUNTIME_SRC:-$REPO/workers/runtime}"
SUITE=bookworm
PREFIX="trace-runtime"
BUILD_MODE="${TRACE_IMAGE_BUILD:-auto}"
UPGRADE="${TRACE_IMAGE_UPGRADE:-1}"
LABEL_KEY="org.trace.runtime-hash"
BASE_RECIPE=3   # bump when the base rootfs recipe below changes in a way the hash cannot see
ENV_PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CMD_JSON='["/usr/bin/python3", "/opt/trace/runtime/bootstrap.py"]'

CLEANUP=()
IMPORT_NOTE=""
cleanup() { local d; for d in "${CLEANUP[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT

log() { echo "build.sh: $*" >&2; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

packages_for() {
    case "$1" in
        python) echo "python3-minimal,libpython3.11-stdlib" ;;
        node) echo "python3-minimal,libpython3.11-stdlib,nodejs" ;;
        *) die "unknown image kind '$1' (python|node|all)" ;;
    esac
}

sha() { sha256sum | cut -d' ' -f1; }

# The content hash: runtime tree (paths, exec bit, contents, symlink targets) + build files.
runtime_hash() {
    local kind="$1" f
    {
        echo "kind=$kind suite=$SUITE packages=$(packages_for "$kind") recipe=$BASE_RECIPE"
        for f in build.sh slim-rootfs.sh "Dockerfile.$kind" "$kind-libraries.txt"; do
            [ -f "$HERE/$f" ] && echo "$f $(sha <"$HERE/$f")"
        done
        if [ -d "$RUNTIME_SRC" ]; then
            (cd "$RUNTIME_SRC" && find . \( -name __pycache__ -o -name '*.pyc' -o -name .git \) -prune \
                    -o \( -type f -o -type l \) -print0 | LC_ALL=C sort -z |
                while IFS= read -r -d '' f; do
                    if [ -L "$f" ]; then
                        echo "L $f $(readlink "$f")"
                    else
                        local x=-
                        [ -x "$f" ] && x=x
                        echo "F $f $x $(sha <"$f")"
                    fi
                done)
        fi
    } | sha
}

image_label() {
    docker image inspect --format "{{ index .Config.Labels \"$LABEL_KEY\" }}" "$1" 2>/dev/null || true
}

image_size_mb() {  # MiB, and MB as `docker images` shows it
    local b
    b="$(docker image inspect --format '{{.Size}}' "$1")"
    echo "$(( (b + 524288) / 1048576 )) MiB ($(( (b + 500000) / 1000000 )) MB)"
}

# --- the machine's own apt sources ------------------------------------------------------

# Print "URI SUITE" for every enabled deb source offering component main, in apt's order.
apt_sources() {
    local f files=()
    [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    for f in "${files[@]}"; do
        case "$f" in
            *.list)
                # deb [opt=val ...] URI SUITE COMPONENT...
                sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk '
                    $1 == "deb" && NF >= 4 {
                        for (i = 4; i <= NF; i++) if ($i == "main") { print $2, $3; break }
                    }'
                ;;
            *.sources)
                # deb822 stanzas: Types, URIs, Suites, Components, Enabled (continuation lines
                # start with white space; stanzas are separated by blank lines).
                awk '
                    function flush(   nu, ns, u, s, i, types, okmain) {
                        if (enabled != "no" && (" " T " ") ~ / deb / && (" " C " ") ~ / main /) {
                            nu = split(U, uu, " "); ns = split(S, ss, " ")
                            for (u = 1; u <= nu; u++) for (s = 1; s <= ns; s++) print uu[u], ss[s]
                        }
                        T = U = S = C = key = ""; enabled = "yes"
                    }
                    BEGIN { enabled = "yes" }
                    /^[ \t]*#/ { next }
                    /^[ \t]*$/ { flush(); next }
                    /^[ \t]/ { val = $0; sub(/^[ \t]+/, "", val)
                               if (key == "t") T = T " " val; else if (key == "u") U = U " " val
                               else if (key == "s") S = S " " val; else if (key == "c") C = C " " val
                               next }
                    {
                        k = tolower($0); sub(/:.*/, "", k); val = $0; sub(/^[^:]*:[ \t]*/, "", val)
                        key = ""
                        if (k == "types") { T = val; key = "t" }
                        else if (k == "uris") { U = val; key = "u" }
                        else if (k == "suites") { S = val; key = "s" }
                        else if (k == "components") { C = val; key = "c" }
                        else if (k == "enabled") { enabled = tolower(val) }
                    }
                    END { flush() }' "$f"
                ;;
        esac
    done
}

uri_answers() {  # $1 = archive URI, $2 = suite
    local u="${1%/}" s="$2"
    case "$u" in
        file:*) [ -f "${u#file:}/dists/$s/Release" ] || [ -f "${u#file:}/dists/$s/InRelease" ] ;;
        http://*|https://*|ftp://*)
            if command -v curl >/dev/null 2>&1; then
                curl -fsS -o /dev/null -r 0-0 --max-time 15 "$u/dists/$s/InRelease" 2>/dev/null \
                    || curl -fsS -o /dev/null -r 0-0 --max-time 15 "$u/dists/$s/Release" 2>/dev/null
            elif command -v wget >/dev/null 2>&1; then
                wget -q -T 15 --spider "$u/dists/$s/InRelease" || wget -q -T 15 --spider "$u/dists/$s/Release"
            else
                return 0  # nothing to check with: trust the sources
            fi ;;
        *) return 1 ;;  # cdrom:, mirror+file:, tor+... : not for debootstrap
    esac
}

first_mirror_for() {  # $1 = suite; prints the first URI whose suite answers
    local suite="$1" uri s
    while read -r uri s; do
        [ "$s" = "$suite" ] || continue
        if uri_answers "$uri" "$suite"; then echo "${uri%/}"; return 0; fi
        log "apt source $uri ($suite) does not answer; trying the next one"
    done < <(apt_sources | awk '!seen[$0]++')
    return 1
}

debian_mirror() {
    if [ -n "${TRACE_DEBIAN_MIRROR:-}" ]; then echo "$TRACE_DEBIAN_MIRROR"; return 0; fi
    first_mirror_for "$SUITE" || die "no apt source in /etc/apt/sources.list{,.d/} serves '$SUITE main' (set TRACE_DEBIAN_MIRROR)"
}

# --- registry probe ----------------------------------------------------------------------

REGISTRY_STATE=""
registry_answers() {
    if [ -z "$REGISTRY_STATE" ]; then
        if timeout 20 docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
            REGISTRY_STATE=yes
        else
            REGISTRY_STATE=no
        fi
    fi
    [ "$REGISTRY_STATE" = yes ]
}

# --- cache ------------------------------------------------------------------------------

CACHE=""
setup_cache() {
    CACHE="${TRACE_IMAGE_CACHE:-/var/cache/trace-images}"
    if ! mkdir -p "$CACHE" 2>/dev/null || [ ! -w "$CACHE" ]; then
        [ -z "${TRACE_IMAGE_CACHE:-}" ] || die "cache dir $CACHE is not writable"
        CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/trace-images"
        mkdir -p "$CACHE"
    fi
}

# Staged copy of the runtime tree, world-readable, with bytecode when a matching python is here.
stage_runtime() {  # $1 = destination dir (becomes /opt/trace/runtime)
    local dest="$1" magic="${2:-}" py
    mkdir -p "$dest"
    if [ -d "$RUNTIME_SRC" ]; then
        (cd "$RUNTIME_SRC" && tar -c --exclude=__pycache__ --exclude='*.pyc' --exclude=.git .) | tar -x -C "$dest"
    else
        log "warning: $RUNTIME_SRC does not exist; the image gets an empty /opt/trace/runtime"
    fi
    chmod -R a+rX,go-w "$dest"
    chmod 0755 "$dest"
    # Pre-compile with a host python of the same bytecode magic: the sandbox root is read-only.
    if [ -n "$magic" ]; then
        for py in /usr/bin/python3.11 /usr/bin/python3 python3; do
            command -v "$py" >/dev/null 2>&1 || continue
            if [ "$("$py" -c 'import importlib.util as u; print(u.MAGIC_NUMBER.hex())' 2>/dev/null)" = "$magic" ]; then
                "$py" -m compileall -q -d /opt/trace/runtime --invalidation-mode checked-hash "$dest" >/dev/null 2>&1 \
                    || log "warning: compileall failed on the runtime tree (a syntax error?); continuing without bytecode"
                chmod -R a+rX,go-w "$dest"
                break
            fi
        done
    fi
}

# The vetted libraries, fetched with the host's pip / npm into a staging dir.
PY_SITE=/usr/local/lib/python3.11/dist-packages
NODE_LIBS=/opt/trace/node_modules
requirements() {  # $1 = list file: its entries without comments and blank lines
    sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^[[:space:]]*$/d' "$1"
}

stage_python_libs() {  # $1 = destination (becomes $PY_SITE), $2 = bytecode magic of the image's python
    local dest="$1" magic="${2:-}" list="$HERE/python-libraries.txt" py t0=$SECONDS
    [ -f "$list" ] || return 0
    mkdir -p "$dest"
    # shellcheck disable=SC2086
    ${TRACE_PIP:-python3 -m pip} install -q --disable-pip-version-check --no-deps --no-compile --target "$dest" \
        --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -r <(requirements "$list") >&2 || die "pip could not install python-libraries.txt"
    # Not needed to import: test suites, C headers and sources, console scripts.
    rm -rf "$dest/bin" "$dest/pyarrow/include" "$dest/pyarrow/src"
    find "$dest" -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
    find "$dest" -type f \( -name '*.pyx' -o -name '*.pxd' \) -delete
    if [ -n "$magic" ]; then
        for py in /usr/bin/python3.11 /usr/bin/python3 python3; do
            command -v "$py" >/dev/null 2>&1 || continue
            if [ "$("$py" -c 'import importlib.util as u; print(u.MAGIC_NUMBER.hex())' 2>/dev/null)" = "$magic" ]; then
                "$py" -m compileall -q -j 0 -d "$PY_SITE" --invalidation-mode unchecked-hash "$dest" >/dev/null 2>&1 \
                    || log "warning: compileall failed on some vetted library files"
                break
            fi
        done
    fi
    chmod -R a+rX,go-w "$dest"
    log "python libraries staged in $((SECONDS - t0)) s ($(du -sm "$dest" | cut -f1) MB)"
}

stage_node_libs() {  # $1 = destination (becomes $NODE_LIBS)
    local dest="$1" list="$HERE/node-libraries.txt" tmp t0=$SECONDS
    [ -f "$list" ] || return 0
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/trace-npm.XXXXXX")"
    CLEANUP+=("$tmp")
    # shellcheck disable=SC2046
    ${TRACE_NPM:-npm} install --prefix "$tmp" --no-save --no-package-lock --omit=dev --ignore-scripts \
        --no-audit --no-fund --loglevel=error $(requirements "$list") >&2 || die "npm could not install node-libraries.txt"
    mkdir -p "$(dirname "$dest")"
    mv "$tmp/node_modules" "$dest"
    chmod -R a+rX,go-w "$dest"
    log "node libraries staged in $((SECONDS - t0)) s ($(du -sm "$dest" | cut -f1) MB)"
}

# --- path 1: Dockerfile -----------------------------------------------------------------

build_dockerfile() {
    local kind="$1" hash="$2" ctx
    ctx="$(mktemp -d "${TMPDIR:-/tmp}/trace-image-ctx.XXXXXX")"
    CLEANUP+=("$ctx")
    cp "$HERE/slim-rootfs.sh" "$ctx/"
    stage_runtime "$ctx/runtime"
    find "$ctx/runtime" -name __pycache__ -prune -exec rm -rf {} +   # the Dockerfile compiles
    mkdir -p "$ctx/libs"
    case "$kind" in
        python) stage_python_libs "$ctx/libs/python" ;;   # the Dockerfile compiles
        node) stage_node_libs "$ctx/libs/node_modules" ;;
    esac
    docker build -q --force-rm -f "$HERE/Dockerfile.$kind" --build-arg "RUNTIME_HASH=$hash" \
        -t "$PREFIX-$kind:latest" "$ctx" >/dev/null
}

# --- path 2: debootstrap + docker import --------------------------------------------------

unmount_under() {  # lazily unmount anything mounted below $1 (deepest first)
    local root mounts
    root="$(readlink -f "$1")"
    mounts="$(awk -v r="$root" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/mounts | sort -r)"
    [ -z "$mounts" ] || echo "$mounts" | while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

safe_rm_rootfs() {
    [ -e "$1" ] || return 0
    unmount_under "$1"
    rm -rf --one-file-system "$1"
}

# Apply bookworm-updates and bookworm-security from the machine's apt sources (best effort).
upgrade_rootfs() {
    local rootfs="$1" kind="$2" list="$1/etc/apt/sources.list.d/trace-build.list" s uri n=0
    : >"$list"
    for s in "$SUITE-updates" "$SUITE-security"; do
        if uri="$(first_mirror_for "$s")"; then
            echo "deb $uri $s main" >>"$list"; n=$((n + 1))
        fi
    done
    if [ "$n" = 0 ]; then rm -f "$list"; log "no $SUITE-updates/-security source here; base stays at the point release"; return 0; fi
    cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf" 2>/dev/null || true
    if chroot "$rootfs" /usr/bin/env -i PATH="$ENV_PATH" DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 \
            sh -c 'apt-get -q update && apt-get -q -y -o Dpkg::Options::=--force-confold upgrade' \
            >>"$CACHE/debootstrap-$kind.log" 2>&1 </dev/null; then
        log "applied $SUITE-updates/-security ($n source(s)): $(grep -Eo '^[0-9]+ upgraded' "$CACHE/debootstrap-$kind.log" | tail -n 1 || echo '?')"
    else
        log "warning: upgrade from $SUITE-updates/-security failed (see $CACHE/debootstrap-$kind.log); base stays at the point release"
    fi
    rm -f "$list"
    chroot "$rootfs" apt-get clean >/dev/null 2>&1 || true
}

make_base() {  # $1 = kind, $2 = output tarball; writes "$2.pymagic" too
    local kind="$1" out="$2" mirror rootfs pkgs magicfile
    [ "$(id -u)" = 0 ] || die "building the base rootfs needs root (debootstrap); run once as root, later imports do not"
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2 \
            || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2; }
    fi
    mirror="$(debian_mirror)"
    pkgs="$(packages_for "$kind")"
    rootfs="$CACHE/rootfs-$kind"
    safe_rm_rootfs "$rootfs"
    log "debootstrap --variant=minbase --include=$pkgs $SUITE $rootfs $mirror"
    local t0=$SECONDS
    if ! debootstrap --variant=minbase --components=main --include="$pkgs" \
            "$SUITE" "$rootfs" "$mirror" >"$CACHE/debootstrap-$kind.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap-$kind.log" >&2
        unmount_under "$rootfs"
        die "debootstrap failed (full log: $CACHE/debootstrap-$kind.log)"
    fi
    log "debootstrap done in $((SECONDS - t0)) s"
    unmount_under "$rootfs"
    [ "$UPGRADE" = 0 ] || upgrade_rootfs "$rootfs" "$kind"
    unmount_under "$rootfs"

    # User sbx (10001), directories, neutral host files (Docker supplies its own at run time).
    grep -q '^sbx:' "$rootfs/etc/group" || echo 'sbx:x:10001:' >>"$rootfs/etc/group"
    grep -q '^sbx:' "$rootfs/etc/gshadow" 2>/dev/null || echo 'sbx:!::' >>"$rootfs/etc/gshadow"
    grep -q '^sbx:' "$rootfs/etc/passwd" || echo 'sbx:x:10001:10001::/tmp:/usr/sbin/nologin' >>"$rootfs/etc/passwd"
    grep -q '^sbx:' "$rootfs/etc/shadow" || echo 'sbx:!:19000:0:99999:7:::' >>"$rootfs/etc/shadow"
    mkdir -p "$rootfs/var/task" "$rootfs/run/trace" "$rootfs/opt/trace/runtime" "$rootfs/tmp"
    chmod 0755 "$rootfs/var/task" "$rootfs/run/trace" "$rootfs/opt/trace" "$rootfs/opt/trace/runtime"
    chmod 1777 "$rootfs/tmp"
    : >"$rootfs/etc/hostname"
    : >"$rootfs/etc/resolv.conf"
    rm -f "$rootfs/etc/apt/sources.list.d/trace-build.list"

    bash "$HERE/slim-rootfs.sh" "$rootfs"

    magicfile="$(find "$rootfs/usr/lib/python3.11/__pycache__" -name 'os.cpython-*.pyc' 2>/dev/null | head -n 1)"
    if [ -n "$magicfile" ]; then head -c 4 "$magicfile" | od -An -tx1 | tr -d ' \n' >"$out.pymagic.tmp"; else : >"$out.pymagic.tmp"; fi

    # ./dev, ./proc, ./sys stay as empty dirs: Docker mounts its own.
    tar -C "$rootfs" --numeric-owner --one-file-system \
        --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
        -cf "$out.tmp" .
    mv "$out.pymagic.tmp" "$out.pymagic"
    mv "$out.tmp" "$out"
    safe_rm_rootfs "$rootfs"
    log "base rootfs for $kind cached: $out ($(du -m "$out" | cut -f1) MB)"
}

build_import() {
    local kind="$1" hash="$2" basekey base work old new magic
    basekey="$( { echo "$SUITE $(packages_for "$kind") recipe=$BASE_RECIPE upgrade=$UPGRADE"; sha <"$HERE/slim-rootfs.sh"; } | sha | cut -c1-16)"
    base="$CACHE/base-$kind-$basekey.tar"
    # A user without write access to the system cache can still import from it.
    if [ ! -f "$base" ] && [ -f "/var/cache/trace-images/base-$kind-$basekey.tar" ]; then
        base="/var/cache/trace-images/base-$kind-$basekey.tar"
    fi
    if [ -f "$base" ]; then
        log "reusing cached base rootfs $base"
        IMPORT_NOTE="cached base + docker import"
    else
        IMPORT_NOTE="debootstrap + docker import"
        make_base "$kind" "$base"
        # Drop superseded bases of this kind.
        find "$CACHE" -maxdepth 1 -name "base-$kind-*.tar*" ! -name "base-$kind-$basekey.tar*" -delete
    fi
    magic="$(cat "$base.pymagic" 2>/dev/null || true)"

    work="$(mktemp -d "${TMPDIR:-/tmp}/trace-image-import.XXXXXX")"
    CLEANUP+=("$work")
    cp "$base" "$work/image.tar"
    stage_runtime "$work/stage/opt/trace/runtime" "$magic"
    # Append the runtime files (not the directory itself: it is in the base already, and
    # `docker import` refuses duplicate paths), and the vetted libraries.
    (cd "$work/stage" && find ./opt/trace/runtime -mindepth 1 | LC_ALL=C sort) >"$work/files"
    case "$kind" in
        python)
            stage_python_libs "$work/stage$PY_SITE" "$magic"   # the dir is in the base (Debian's python3)
            (cd "$work/stage" && find ".$PY_SITE" -mindepth 1 | LC_ALL=C sort) >>"$work/files" ;;
        node)
            stage_node_libs "$work/stage$NODE_LIBS"
            (cd "$work/stage" && find ".$NODE_LIBS" | LC_ALL=C sort) >>"$work/files" ;;
    esac
    if [ -s "$work/files" ]; then
        tar -C "$work/stage" --numeric-owner --owner=0 --group=0 --no-recursion \
            -rf "$work/image.tar" -T "$work/files"
    fi

    docker import \
        --change "LABEL $LABEL_KEY=$hash org.trace.runtime-kind=$kind" \
        --change "ENV LANG=C.UTF-8 TZ=UTC PATH=$ENV_PATH PYTHONDONTWRITEBYTECODE=1" \
        --change "USER 10001" \
        --change "WORKDIR /var/task" \
        --change "CMD $CMD_JSON" \
        "$work/image.tar" "$PREFIX-$kind:latest" >/dev/null
    if [ "$kind" = node ]; then
        bake_node_snapshot "$PREFIX-$kind:latest"
    fi
}

# The Node wrapper's startup snapshot (workers/runtime/node_bootstrap.js says why: this Node has no
# built-in snapshot, `node -e 0` alone costs ~78 ms of CPU, a start from the blob ~45 ms). A blob loads
# only into the binary that made it, so the image's own node makes it, in a container committed as a
# layer over the import. Dockerfile.node does the same in a RUN. Without a blob (a failure here is only a
# warning) the Docker backend starts node_bootstrap.js as a script.
NODE_SNAPSHOT=/opt/trace/runtime/node_bootstrap.blob
bake_node_snapshot() {  # $1 = image
    local image="$1" name="trace-node-snapshot-$$" err
    err="$(mktemp "${TMPDIR:-/tmp}/trace-node-snapshot.XXXXXX")"
    CLEANUP+=("$err")
    docker rm -f "$name" >/dev/null 2>&1 || true
    if ! docker run --name "$name" --user 0 --network none --workdir /tmp "$image" \
            /usr/bin/node --snapshot-blob "$NODE_SNAPSHOT" --build-snapshot /opt/trace/runtime/node_bootstrap.js \
            >"$err" 2>&1; then
        log "warning: no Node startup snapshot: $(tail -n 1 "$err"); nodejs sandboxes start as a script"
        docker rm -f "$name" >/dev/null 2>&1 || true
        return 0
    fi
    docker commit --change "USER 10001" --change "WORKDIR /var/task" --change "CMD $CMD_JSON" \
        "$name" "$image" >/dev/null
    docker rm -f "$name" >/dev/null
}

# --- main -------------------------------------------------------------------------------

build_one() {
    local kind="$1" hash image t0=$SECONDS path old new
    hash="$(runtime_hash "$kind")"
    image="$PREFIX-$kind:latest"
    if [ "${TRACE_IMAGE_FORCE:-0}" != 1 ] && [ "$(image_label "$image")" = "$hash" ]; then
        echo "build.sh: $image up to date (hash ${hash:0:12}), skipped; size $(image_size_mb "$image")"
        return 0
    fi
    case "$BUILD_MODE" in
        dockerfile) path=dockerfile ;;
        debootstrap) path=debootstrap ;;
        auto) if registry_answers; then path=dockerfile; else path=debootstrap; fi ;;
        *) die "TRACE_IMAGE_BUILD must be auto, dockerfile or debootstrap" ;;
    esac
    log "building $image via $path (hash ${hash:0:12})"
    old="$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
    if [ "$path" = dockerfile ]; then
        if build_dockerfile "$kind" "$hash"; then
            path="docker build from Dockerfile.$kind"
        elif [ "$BUILD_MODE" = auto ]; then
            log "docker build failed although the registry answers; falling back to debootstrap"
            path=debootstrap
        else
            die "docker build from Dockerfile.$kind failed"
        fi
    fi
    if [ "$path" = debootstrap ]; then
        build_import "$kind" "$hash"
        path="$IMPORT_NOTE"
    fi
    [ "$(image_label "$image")" = "$hash" ] || die "$image was built but does not carry the expected label"
    new="$(docker image inspect --format '{{.Id}}' "$image")"
    if [ -n "$old" ] && [ "$old" != "$new" ]; then
        # The superseded image is untagged now; drop it (fails harmlessly while a container uses it).
        docker rmi "$old" >/dev/null 2>&1 || true
    fi
    echo "build.sh: built $image via $path in $((SECONDS - t0)) s; size $(image_size_mb "$image")"
}

main() {
    if [ "${1:-}" = "--hash" ]; then
        runtime_hash "${2:?usage: build.sh --hash python|node}"
        return 0
    fi
    local what="${1:-all}" kinds=() k
    case "$what" in
        all) kinds=(python node) ;;
        python|node) kinds=("$what") ;;
        -h|--help) sed -n '2,33p' "$0"; return 0 ;;
        *) die "usage: build.sh [python|node|all] | --hash KIND" ;;
    esac
    command -v docker >/dev/null 2>&1 || die "no docker client; run deploy/ensure-docker.sh first"
    timeout 15 docker info >/dev/null 2>&1 || die "no Docker engine answers; run deploy/ensure-docker.sh first"
    setup_cache
    # One build at a time per cache (make images and the test suite may race).
    exec 9>"$CACHE/.lock"
    if command -v flock >/dev/null 2>&1; then flock 9; fi
    for k in "${kinds[@]}"; do build_one "$k"; done
}

main "$@"
