#!/bin/bash
# Slim a Debian root file system in place, for the Trace runtime images.
#
#   slim-rootfs.sh ROOT        (ROOT = / inside a Dockerfile RUN, or a debootstrap target)
#
# Used by both build paths (Dockerfile.* and build.sh's debootstrap + docker import), so the
# two produce the same file set. Must run in the same layer as the package installation:
# deleting in a later layer would not shrink the image.
#
# Kept on purpose: /usr/share/doc/*/copyright and /usr/share/common-licenses (small, and
# the licences of what we ship), the stdlib's __pycache__ (a read-only root cannot write
# bytecode, so without it every sandbox start would recompile), C.UTF-8 (in libc-bin),
# ICU data (node needs it), dpkg's database (so `dpkg -l` still tells what
# is inside).
set -euo pipefail

root="${1:?usage: slim-rootfs.sh ROOT}"
root="${root%/}"
[ -d "$root/usr" ] && [ -d "$root/etc" ] || { echo "slim-rootfs: $root does not look like a root fs" >&2; exit 1; }

# Documentation, manuals, translations.
if [ -d "$root/usr/share/doc" ]; then
    find "$root/usr/share/doc" -mindepth 1 \( -type f -o -type l \) ! -name copyright -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
fi
rm -rf "$root/usr/share/man" "$root/usr/share/info" "$root/usr/share/lintian" \
       "$root/usr/share/linda" "$root/usr/share/groff" "$root/usr/share/bug" \
       "$root/usr/share/menu" "$root/usr/share/bash-completion" \
       "$root/usr/share/zsh" "$root/usr/share/fish"
if [ -d "$root/usr/share/locale" ]; then
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
fi
rm -rf "$root/usr/share/i18n/locales"  # only with the `locales` package; C.UTF-8 is built in

# Package manager state and caches (no apt inside a sandbox).
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
       "$root"/var/lib/dpkg/*-old "$root"/var/cache/ldconfig/aux-cache \
       "$root"/var/cache/man 2>/dev/null || true
find "$root/var/log" -type f -delete 2>/dev/null || true
rm -f "$root/debootstrap/debootstrap.log"
rm -rf "$root/debootstrap"

# Python: optimised bytecode (never used without -O), test suites, idle, tkinter, 2to3.
if [ -d "$root/usr/lib" ]; then
    find "$root/usr/lib" -path '*/__pycache__/*.opt-[12].pyc' -delete 2>/dev/null || true
    for d in "$root"/usr/lib/python3*/; do
        [ -d "$d" ] || continue
        rm -rf "$d"test "$d"unittest/test "$d"lib2to3/tests "$d"idlelib "$d"tkinter \
               "$d"turtledemo "$d"ensurepip/_bundled "$d"distutils/tests \
               "$d"ctypes/test "$d"sqlite3/test 2>/dev/null || true
    done
fi

# Byte-compile the whole stdlib now: Debian compiles only python3.11-minimal's part, and the
# sandbox's read-only root means anything uncompiled is recompiled at every start
# (`import http.server, json, urllib.request` costs ~90 ms instead of ~30 ms).
for d in "$root"/usr/lib/python3.[0-9]*/; do
    [ -d "$d" ] || continue
    py="/usr/bin/$(basename "$d")"
    [ -x "$root$py" ] || continue
    if [ -z "$root" ]; then
        "$py" -m compileall -q "${d%/}" >/dev/null 2>&1 || true
    else
        chroot "$root" "$py" -m compileall -q "${d#"$root"}" >/dev/null 2>&1 || true
    fi
done

# Node: headers, TypeScript declarations (no compiler here), READMEs.
rm -rf "$root/usr/include/node" "$root/usr/share/nodejs/@types" 2>/dev/null || true
find "$root/usr/share/nodejs" -type f \( -iname 'README*' -o -iname 'CHANGELOG*' -o -iname 'HISTORY*' \) \
    -delete 2>/dev/null || true

# glibc's iconv modules: only C.UTF-8 exists here, and UTF-8 is built into libc; neither
# python (its own codecs) nor node (ICU) loads them. The gconv-modules index stays.
find "$root/usr/lib/x86_64-linux-gnu/gconv" "$root/usr/lib/aarch64-linux-gnu/gconv" \
    -name '*.so' -delete 2>/dev/null || true

# Miscellaneous.
rm -rf "$root"/tmp/* "$root"/var/tmp/* "$root"/root/.cache "$root/usr/share/pixmaps" \
       "$root/usr/share/applications"
exit 0
