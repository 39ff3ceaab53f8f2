#!/usr/bin/env bash
# The Aegis Agent demo: a gateway built from three network namespaces, the
# real binaries, a user who is blocked, logs in, passes, goes idle and is
# blocked again. Every step checks what it shows and the script exits
# non-zero on any surprise. It removes everything it made (namespaces,
# pins, processes, files), also when interrupted.
#
#   client ns            gateway ns                        private ns
#   cli0  ───────────  pub0 [XDP]      priv0  ──────────── srv0
#   192.0.2.10           192.0.2.1      198.51.100.1        198.51.100.5   controller (login page :443)
#                                                           198.51.100.10  service A :8080
#                                                           198.51.100.20  service B :8080
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$PWD/bin
ID=aegis-demo-$$
NS_C=$ID-client NS_G=$ID-gw NS_P=$ID-private
PIN=/sys/fs/bpf/$ID
WORK=$(mktemp -d "${TMPDIR:-/tmp}/$ID.XXXXXX")
IDLE=4s        # the session's idle timeout
SWEEP=10s      # the reaper's interval: long, to show the data path does not wait for it
DAEMON_UID=65534 # nobody: the daemons run unprivileged but for CAP_BPF
PIDS=()

if [ -t 1 ]; then B=$'\e[1m' G=$'\e[32m' R=$'\e[31m' D=$'\e[2m' N=$'\e[0m'; else B= G= R= D= N=; fi
say()  { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
ok()   { printf '    %s✔ %s%s\n' "$G" "$*" "$N"; }
show() { sed 's/^/    /'; }
fail() {
  printf '    %s✘ %s%s\n' "$R" "$*" "$N" >&2
  for log in "$WORK"/*.log; do
    [ -s "$log" ] && { printf '%s--- %s%s\n' "$D" "$(basename "$log")" "$N" >&2; tail -n 15 "$log" >&2; }
  done
  exit 1
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  done
  if [ -d "$PIN" ]; then
    nsenter --net="/run/netns/$NS_G" "$BIN/aegis-loader" unload --pin-path "$PIN" >/dev/null 2>&1 || rm -rf "$PIN"
  fi
  for ns in "$NS_C" "$NS_G" "$NS_P"; do ip netns delete "$ns" 2>/dev/null || true; done
  rm -rf "$WORK"
  [ $rc -eq 0 ] && printf '\n%sCleaned up: namespaces, pins and processes are gone.%s\n' "$D" "$N"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@"; }
client() { in_ns "$NS_C" "$@"; }
gateway() { in_ns "$NS_G" "$@"; }
private() { in_ns "$NS_P" "$@"; }

# start NAME NS CMD...: a background process whose output goes to NAME.log.
# nsenter execs the command, so $! is the process itself.
start() {
  local name=$1 ns=$2; shift 2
  nsenter --net="/run/netns/$ns" "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
}

# probe ADDR PORT: connect from the client and print the service's greeting.
probe() {
  client socat -u -T2 "TCP:$1:$2,bind=192.0.2.10,connect-timeout=1" STDOUT 2>/dev/null
}
expect_pass() {
  local out
  out=$(probe "$1" "$2") || fail "$3: blocked, expected it to pass"
  [ -n "$out" ] || fail "$3: connected but got no answer"
  ok "$3: passes ($out)"
}
expect_blocked() {
  if out=$(probe "$1" "$2"); then fail "$3: passed ($out), expected it blocked"; fi
  ok "$3: blocked"
}

# The controller's aegisctl takes its connection from a profile (written
# below, once the certificates exist).
aegisctl_as_controller() {
  private "$BIN/aegisctl" "$@" --config "$WORK/aegisctl.toml"
}
counter() { # counter REASON: packets the data path counted for it
  "$BIN/aegisctl" local stats --pin-path "$PIN" | awk -v r="$1" '$2 == r { print $3 }'
}

for b in aegis-loader aegis-controlplane aegis-reaper aegisctl; do
  [ -x "$BIN/$b" ] || { echo "demo: $BIN/$b missing: run make demo (it builds first)" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (network namespaces, XDP, bpffs)" >&2; exit 1; }

say "Building a gateway from three network namespaces"
for ns in "$NS_C" "$NS_G" "$NS_P"; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
ip -n "$NS_G" link add pub0 type veth peer name cli0 netns "$NS_C"
ip -n "$NS_G" link add priv0 type veth peer name srv0 netns "$NS_P"
ip -n "$NS_C" addr add 192.0.2.10/24 dev cli0
ip -n "$NS_G" addr add 192.0.2.1/24 dev pub0
ip -n "$NS_G" addr add 198.51.100.1/24 dev priv0
for a in 5 10 20; do ip -n "$NS_P" addr add "198.51.100.$a/24" dev srv0; done
for pair in "$NS_C cli0" "$NS_G pub0" "$NS_G priv0" "$NS_P srv0"; do set -- $pair; ip -n "$1" link set "$2" up; done
ip -n "$NS_C" route add default via 192.0.2.1
ip -n "$NS_P" route add default via 198.51.100.1
gateway sysctl -qw net.ipv4.ip_forward=1
start svc-a "$NS_P" socat TCP-LISTEN:8080,bind=198.51.100.10,reuseaddr,fork SYSTEM:'echo hello from service A'
start svc-b "$NS_P" socat TCP-LISTEN:8080,bind=198.51.100.20,reuseaddr,fork SYSTEM:'echo hello from service B'
start login "$NS_P" socat TCP-LISTEN:443,bind=198.51.100.5,reuseaddr,fork SYSTEM:'echo Aegis controller login page'
sleep 0.3
ok "client 192.0.2.10 | gateway pub0 192.0.2.1, priv0 198.51.100.1 | controller 198.51.100.5, services A 198.51.100.10 and B 198.51.100.20"
expect_pass 198.51.100.10 8080 "without the agent, client → service A"

say "Loading the data path: XDP on the gateway's public interface, default drop"
gateway "$BIN/aegis-loader" load --pin-path "$PIN" -i pub0 -c 198.51.100.5 -p 443 \
  --group "$DAEMON_UID" --log-format json 2>"$WORK/loader.log" | show
gateway "$BIN/aegis-loader" status --pin-path "$PIN" | sed -n '3,4p' | show

say "Certificates for mutual TLS (aegisctl certs init, server, client, list)"
{
  "$BIN/aegisctl" certs --dir "$WORK/tls" init
  "$BIN/aegisctl" certs --dir "$WORK/tls" server --ip 198.51.100.1
  "$BIN/aegisctl" certs --dir "$WORK/tls" client aegis-controller
  "$BIN/aegisctl" certs --dir "$WORK/tls" list
} 2>&1 | sed "s|$WORK/||g" | show
cat >"$WORK/aegisctl.toml" <<EOF
default-profile = "demo"

[profile.demo]
address = "198.51.100.1"   # port 50001 when none is given
tls-cert = "tls/aegis-controller.crt"
tls-key = "tls/aegis-controller.key"
tls-ca = "tls/ca.crt"
EOF
chmod 0600 "$WORK/aegisctl.toml"
# The control plane runs as $DAEMON_UID and reads its own certificate.
chown "$DAEMON_UID:$DAEMON_UID" "$WORK/tls/server.crt" "$WORK/tls/server.key" "$WORK/tls/ca.crt"
chmod 0711 "$WORK" "$WORK/tls"

say "Starting the control plane and the reaper as uid $DAEMON_UID with CAP_BPF only"
unpriv=(setpriv --reuid="$DAEMON_UID" --regid="$DAEMON_UID" --clear-groups --inh-caps=-all,+bpf --ambient-caps=-all,+bpf)
start controlplane "$NS_G" "${unpriv[@]}" "$BIN/aegis-controlplane" --pin-path "$PIN" \
  --listen-address 198.51.100.1 -g 50001 --tls-cert "$WORK/tls/server.crt" --tls-key "$WORK/tls/server.key" \
  --tls-client-ca "$WORK/tls/ca.crt" --allowed-client-name aegis-controller --log-format json
start reaper "$NS_G" "${unpriv[@]}" "$BIN/aegis-reaper" --pin-path "$PIN" --cleanup-interval "$SWEEP" --log-format json
for _ in $(seq 50); do aegisctl_as_controller stats >/dev/null 2>&1 && break; sleep 0.1; done
aegisctl_as_controller stats >/dev/null 2>&1 || fail "the control plane does not answer"
for pid in "${PIDS[@]: -2}"; do
  st=/proc/$pid/status
  [ "$(awk '/^Uid:/{print $2}' "$st")" = "$DAEMON_UID" ] || fail "$(cat /proc/"$pid"/comm) does not run as uid $DAEMON_UID"
  [ "$(awk '/^CapEff:/{print $2}' "$st")" = 0000008000000000 ] || fail "$(cat /proc/"$pid"/comm) has more than CAP_BPF"
  printf '    %-16s uid %s, effective capabilities %s (CAP_BPF)\n' "$(cat /proc/"$pid"/comm)" \
    "$(awk '/^Uid:/{print $2}' "$st")" "$(awk '/^CapEff:/{print $2}' "$st")"
done
ok "control plane on 198.51.100.1:50001 (mTLS), reaper sweeping every $SWEEP"

say "Before login"
expect_blocked 198.51.100.10 8080 "client → service A"
expect_pass 198.51.100.5 443 "client → controller login page"

say "The user logs in: the controller grants client → service A (aegisctl login, over mTLS)"
aegisctl_as_controller login --user alice --src 192.0.2.10 --dst 198.51.100.10 --port 8080 --idle-timeout "$IDLE" | show
expect_pass 198.51.100.10 8080 "client → service A"
expect_blocked 198.51.100.20 8080 "client → service B (no session for it)"

say "What the operator sees"
aegisctl_as_controller sessions | show
printf '    %s$ bpftool map dump pinned %s/sessions_v4%s\n' "$D" "$PIN" "$N"
dump=$(bpftool map dump pinned "$PIN/sessions_v4")
show <<<"$dump"
grep -q '"user": "alice"' <<<"$dump" || fail "bpftool does not show alice's session"

say "alice stops using service A; her session idles out after $IDLE"
expired_before=$(counter expired)
sleep "${IDLE%s}.5"
expect_blocked 198.51.100.10 8080 "client → service A after $IDLE idle"
[ "$(counter expired)" -gt "$expired_before" ] || fail "the data path did not count the drop as expired"
ok "the data path refused it as expired, before the reaper ran"

say "The reaper deletes the expired session at its next sweep"
for _ in $(seq 120); do
  table=$(aegisctl_as_controller sessions)
  grep -q '^0 session(s)$' <<<"$table" && break
  sleep 0.1
done
show <<<"$table"
grep -q '^0 session(s)$' <<<"$table" || fail "the reaper did not remove the session"
[ "$(bpftool -j map dump pinned "$PIN/sessions_v4")" = "[]" ] || fail "bpftool still lists a session"
grep -h '"reaped session"' "$WORK/reaper.log" | head -1 | show
ok "sessions_v4 is empty"

say "Counters"
"$BIN/aegisctl" local stats --pin-path "$PIN" | awk 'NR == 1 || $3 > 0' | show

printf '\n%sDemo complete.%s\n' "$B$G" "$N"
