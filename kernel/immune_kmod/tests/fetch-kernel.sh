#!/usr/bin/env bash
# Fetch what the kmod tests need besides installed packages, into a cache
# ($IMMUNE_KMOD_CACHE, default /var/cache/immune-kmod):
#   vmlinuz-VERSION   the Debian kernel matching the newest installed
#                     linux-headers-*-amd64 (from linux-image-VERSION-unsigned)
#   checkpatch/       checkpatch.pl and its data files (from linux-source-6.1)
# Needs apt-get (run apt-get update first). Does nothing for what is cached.
set -euo pipefail

cache=${IMMUNE_KMOD_CACHE:-/var/cache/immune-kmod}
headers=$(find /usr/src -maxdepth 1 -regextype posix-extended \
    -regex '.*/linux-headers-[0-9.]+-[0-9]+-amd64' | sort -V | tail -n 1)
if [ -z "$headers" ]; then
    echo "fetch-kernel: no /usr/src/linux-headers-*-amd64 (apt-get install linux-headers-amd64)" >&2
    exit 1
fi
version=${headers#/usr/src/linux-headers-}
mkdir -p "$cache"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ ! -s "$cache/vmlinuz-$version" ]; then
    (cd "$tmp" && apt-get download -q "linux-image-$version-unsigned")
    dpkg-deb --fsys-tarfile "$tmp"/linux-image-*.deb |
        tar -xO "./boot/vmlinuz-$version" >"$cache/vmlinuz-$version.part"
    mv "$cache/vmlinuz-$version.part" "$cache/vmlinuz-$version"
    rm -f "$tmp"/*.deb
fi
echo "fetch-kernel: $cache/vmlinuz-$version"

if [ ! -s "$cache/checkpatch/checkpatch.pl" ]; then
    (cd "$tmp" && apt-get download -q linux-source-6.1)
    mkdir -p "$cache/checkpatch.part"
    dpkg-deb --fsys-tarfile "$tmp"/linux-source-*.deb |
        tar -xO ./usr/src/linux-source-6.1.tar.xz |
        tar -xJ -C "$cache/checkpatch.part" --strip-components=2 \
            --wildcards '*/scripts/checkpatch.pl' '*/scripts/spelling.txt' \
            '*/scripts/const_structs.checkpatch'
    rm -rf "$cache/checkpatch"
    mv "$cache/checkpatch.part" "$cache/checkpatch"
fi
echo "fetch-kernel: $cache/checkpatch/checkpatch.pl"
