#!/usr/bin/env bash
# Installs what building, testing and the demo need on a fresh Debian
# machine, and mounts bpffs. Idempotent and quick when all is present.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs packages and mounts bpffs)" >&2
  exit 1
fi

# command -> Debian package
declare -A need=(
  [clang]=clang          # make generate: compiles bpf/aegis.c
  [llvm-strip]=llvm      # bpf2go strips the object
  [bpftool]=bpftool      # tests and the demo dump pinned maps
  [xdp-filter]=xdp-tools # benchmark baseline
  [nft]=nftables         # benchmark baseline
  [iptables]=iptables    # packet-rate benchmark baseline (raw PREROUTING DROP)
  [ethtool]=ethtool      # packet-rate benchmark: GRO (and so NAPI) on the gateway's veth
  [protoc]=protobuf-compiler # make generate: proto/
  [ip]=iproute2          # network namespaces
  [nsenter]=util-linux   # entering namespaces without remounting /sys
  [setpriv]=util-linux   # least-privilege tests
  [flock]=util-linux     # the loader's lock-wait test
  [systemd-nspawn]=systemd-container # systemd integration test
  [socat]=socat          # the demo's small services and client; a stand-in sshd
  [dnsmasq]=dnsmasq-base # the reply-path test's public resolver
  [/usr/bin/time]=time   # the reaper benchmark's peak RSS
  [systemd-socket-activate]=systemd # control plane socket-activation test
  [promtool]=prometheus  # alert rule tests and the metrics lint (only promtool is used)
  [lintian]=lintian      # make deb-lint and the package test
  [zsh]=zsh              # the generated completions' test
  [fish]=fish
  [/usr/bin/etcd]=etcd-server # the session store's tests run their own etcd members
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "$cmd" ] || missing+=("${need[$cmd]}")
done
# make generate: the well-known types (duration, timestamp) protoc imports.
[ -f /usr/include/google/protobuf/duration.proto ] || missing+=(libprotobuf-dev)
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "setup.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The package also ships a Prometheus server, enabled on install: the
  # tests need promtool only, and the systemd test boots this machine's
  # root in a container, where an enabled server would start too.
  if printf '%s\n' "${missing[@]}" | grep -qx prometheus; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
  # The same for etcd: its package starts a member on 127.0.0.1:2379.
  # Tests run members of their own and must never find this one.
  if printf '%s\n' "${missing[@]}" | grep -qx etcd-server; then
    systemctl disable --now etcd.service >/dev/null 2>&1 || true
  fi
fi

if ! command -v go >/dev/null 2>&1; then
  for d in /usr/local/go/bin /usr/lib/go/bin; do
    [ -x "$d/go" ] && { echo "setup.sh: add $d to PATH" >&2; exit 1; }
  done
  echo "setup.sh: Go is not installed (need 1.26 or later)" >&2
  exit 1
fi

# mode=0711, not bpffs's default 1777: only root may create names at the
# root (no other user can squat the pin directory), and the unprivileged
# daemons may still traverse it to their group's pins, which systemd's
# mode=0700 would forbid. An existing mount is left alone: the loader
# refuses a pin path another user could have made whatever the root's mode.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf -o mode=0711 bpf /sys/fs/bpf
fi
