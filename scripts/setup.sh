#!/usr/bin/env bash
# Installs the system packages the tests use, when they are missing (idempotent).
#  - promtool (Debian's prometheus package): checks /metrics output and the alert rules.
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
#  - dnsmasq (dnsmasq-base): the real DNS server tests/dns.rs points DNS discovery at.
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
#  - busybox-static: busybox httpd, a task nobody here wrote (a fork per connection, a small
#    backlog, ignores SIGTERM as PID 1): tests/rude.rs, the demo's rude phase, and the
#    FROM scratch image of tests/docker.rs (deploy/busybox/build-image.sh); it replaces
#    Debian's dynamic busybox.
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || need+=(busybox-static)
#  - nginx-light: nginx with `listen ... backlog=4`, overloaded on purpose (tests/rude.rs),
#    and the TLS backends of tests/sni.rs (`listen ... ssl`; with openssl for their
#    certificates and `s_client`).
#    Only the binary is used: the Debian service must not start (see policy-rc.d below).
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
#  - apache2-utils: ab, the load generator of tests/docker.rs's busybox phases.
command -v ab >/dev/null 2>&1 || need+=(apache2-utils)
#  - haproxy: the PROXY protocol sender (`send-proxy`, `send-proxy-v2`) in front of meshd in
#    tests/proxy_accept.rs. Only the binary is used (policy-rc.d keeps its service stopped).
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
#  - docker-init (tini): `docker service create --init` needs it next to dockerd.
if command -v dockerd >/dev/null 2>&1 && ! command -v docker-init >/dev/null 2>&1; then
  need+=(tini)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "setup: installing ${need[*]}" >&2
  # No package may start a system service (nginx would listen on :80): policy-rc.d exit
  # 101 tells invoke-rc.d not to. Kept if one exists (Docker images ship one), else
  # written for the install and removed after.
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  [ -z "$made_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi
# Belt and braces: a system nginx left running (an older install, or systemd starting it
# despite policy-rc.d) is stopped; the tests run their own nginx on ephemeral ports.
if [ -f /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "setup: stopping the system nginx service" >&2
  $SUDO systemctl stop nginx 2>/dev/null || $SUDO service nginx stop 2>/dev/null ||
    $SUDO kill "$(cat /run/nginx.pid)" 2>/dev/null || true
fi
if [ -d /run/systemd/system ] && systemctl is-enabled nginx >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO systemctl disable --now nginx >/dev/null 2>&1 || true
fi
#  - prometheus_client (PyPI): a second, independent parser of meshd's /metrics output in
#    tests/observability.rs (checks each metric family's type and label names).
if ! python3 -c 'import prometheus_client' >/dev/null 2>&1; then
  echo "setup: installing prometheus_client (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore prometheus_client
fi
# Connection tracking: Docker's iptables rules load nf_conntrack, which then tracks every
# loopback connection too, and keeps a closed one for 120 s (TIME_WAIT). The load tests open
# thousands of connections a second (two entries per proxied connection): within a few
# minutes the table (262,144 here) is full and the kernel drops new SYNs ("nf_conntrack:
# table full, dropping packet"), so connects to meshd, its admin API and the backends time
# out — the machine's limit, not meshd's. A proxy host needs the same tuning
# (docs/swarm.md, "Host tuning"). Raised and shortened only, never the other way.
tune() { # sysctl key, wanted value, "min" (raise to at least) or "max" (lower to at most)
  local f="/proc/sys/${1//.//}" cur
  [ -w "$f" ] || return 0
  cur=$(cat "$f")
  if { [ "$3" = min ] && [ "$cur" -lt "$2" ]; } || { [ "$3" = max ] && [ "$cur" -gt "$2" ]; }; then
    echo "$2" >"$f" && echo "setup: $1 $cur -> $2" >&2
  fi
}
if [ "$(id -u)" -eq 0 ]; then
  tune net.netfilter.nf_conntrack_max 1048576 min
  tune net.netfilter.nf_conntrack_tcp_timeout_time_wait 10 max
fi
