#!/usr/bin/env bash
# Builds an ordinary, impolite test task: busybox httpd in a FROM scratch image, from
# Debian's busybox-static (scripts/setup.sh installs it). No registry is needed.
#
# Usage: deploy/busybox/build-image.sh TAG BODY [CMD...]
#   TAG   the image tag, e.g. meshbb:v1
#   BODY  what GET / answers (the file /www/index.html), e.g. v1
#   CMD   the command (default: httpd -f -p 80 -h /www); `false` makes a release that
#         exits at once
#
# What the task does, as users run it: `httpd -f` serves each connection in a forked
# child, listens with a small backlog and closes after each response. As PID 1 it ignores
# SIGTERM (no handler; PID 1 gets no default action), so Swarm kills it after the stop
# grace period; with `--init` (tini as PID 1) SIGTERM ends it at once.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 TAG BODY [CMD...]" >&2; exit 2; }
tag=$1 body=$2
shift 2
bb=/bin/busybox
if ! [ -x "$bb" ] || readelf -l "$bb" 2>/dev/null | grep -q 'program interpreter'; then
  echo "busybox-image: $bb is missing or not static: install busybox-static (scripts/setup.sh)" >&2
  exit 1
fi
cmd='["httpd", "-f", "-p", "80", "-h", "/www"]'
if [ $# -gt 0 ]; then
  cmd=$(printf '"%s", ' "$@")
  cmd="[${cmd%, }]"
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/www"
cp "$bb" "$ctx/busybox"
printf '%s\n' "$body" > "$ctx/www/index.html"
# No `# syntax=` line: BuildKit would pull a frontend image.
cat > "$ctx/Dockerfile" <<DOCKERFILE
FROM scratch
COPY busybox /bin/busybox
COPY www /www
ENTRYPOINT ["/bin/busybox"]
CMD $cmd
DOCKERFILE
docker build --quiet -t "$tag" "$ctx" >/dev/null
echo "busybox-image: built $tag (busybox $("$bb" | head -1 | awk '{print $2}'), GET / answers \"$body\")"
