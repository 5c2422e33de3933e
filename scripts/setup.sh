#!/usr/bin/env bash
# Installs the system packages the tests use, when they are missing (idempotent).
#  - promtool (Debian's prometheus package): checks /metrics output and the alert rules.
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
#  - dnsmasq (dnsmasq-base): the real DNS server tests/dns.rs points DNS discovery at.
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
#  - busybox-static: busybox httpd in a FROM scratch image, the impolite task of
#    tests/docker.rs (deploy/busybox/build-image.sh); replaces Debian's dynamic busybox.
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || need+=(busybox-static)
#  - ab (apache2-utils): the load of tests/docker.rs's busybox phases.
command -v ab >/dev/null 2>&1 || need+=(apache2-utils)
#  - docker-init (tini): `docker service create --init` needs it next to dockerd.
if command -v dockerd >/dev/null 2>&1 && ! command -v docker-init >/dev/null 2>&1; then
  need+=(tini)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "setup: installing ${need[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
#  - prometheus_client (PyPI): a second, independent parser of meshd's /metrics output in
#    tests/observability.rs (checks each metric family's type and label names).
if ! python3 -c 'import prometheus_client' >/dev/null 2>&1; then
  echo "setup: installing prometheus_client (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore prometheus_client
fi
