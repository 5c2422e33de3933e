#!/usr/bin/env bash
# Builds a statically linked meshd and the `meshd:dev` image (deploy/Dockerfile, FROM
# scratch) from it. No registry is needed: the image is built from our own binary.
#
# Usage: deploy/build-image.sh [TAG]            (default TAG: meshd:dev)
# Env:   CARGO_TARGET_DIR  where the static build goes (default: target/static, kept apart
#                          from the normal target dir so the two builds don't invalidate
#                          each other: RUSTFLAGS is part of every crate's fingerprint)
#
# `--target` is passed so that build scripts and proc macros stay dynamically linked; only
# meshd itself is static. glibc's static libc is enough: meshd resolves names without NSS.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:-meshd:dev}
triple=x86_64-unknown-linux-gnu
target_dir=${CARGO_TARGET_DIR:-target/static}

RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$target_dir" \
  cargo build --release --target "$triple" --bin meshd
bin="$target_dir/$triple/release/meshd"

# A dynamically linked binary would start nowhere in a scratch image: refuse it here.
if command -v readelf >/dev/null 2>&1 && readelf -l "$bin" | grep -q 'program interpreter'; then
  echo "build-image: $bin is dynamically linked (needs an ELF interpreter); is glibc's libc.a installed (libc6-dev)?" >&2
  exit 1
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$bin" "$ctx/meshd"
# Debug info is most of the file; the image needs none of it.
strip --strip-debug "$ctx/meshd" 2>/dev/null || true
docker build --quiet -t "$tag" -f deploy/Dockerfile "$ctx" >/dev/null
echo "build-image: built $tag ($(du -h "$ctx/meshd" | cut -f1) static binary)"
