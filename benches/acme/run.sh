#!/usr/bin/env bash
# ACME at scale: N logon addresses (default 1,000) enabled at once, one gateway, Debian's
# Pebble as the CA and dnsmasq as the DNS both resolve through. Measures the time from the
# gateway's start to its first and to its N-th issued certificate, the orders in flight
# (sampled every 100 ms from the per-host locks in storage), failed orders, and the CPU
# seconds of the gateway and of Pebble. Everything listens on 127.0.0.1; every process it
# starts is stopped by PID; the run gives up after LIMIT seconds.
#
# Usage: benches/acme/run.sh [N] [ORDERS_IN_FLIGHT]   (defaults 1000 and 8; run as root: it
# installs pebble and dnsmasq-base with apt if missing). GATE_BIN=PATH runs a logon-gate built
# elsewhere; LIMIT=SECONDS bounds the run (default 900).
set -euo pipefail

N=${1:-1000}
FLIGHT=${2:-8}
LIMIT=${LIMIT:-900}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/logon-gate-acme.XXXXXX)
DNS_PORT=25353 ACME_PORT=24000 MGMT_PORT=24001 HTTP_PORT=20080 HTTPS_PORT=20443 ADMIN_PORT=29901
PIDS=()

need() { command -v "$1" >/dev/null 2>&1; }
if ! need pebble || ! need dnsmasq; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pebble dnsmasq-base >/dev/null
fi
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 0.3
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  [ -n "${KEEP_WORK:-}" ] && { echo "kept $WORK" >&2; return; }
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ -n "${GATE_BIN:-}" ]; then
  BIN=$GATE_BIN
else
  echo "building logon-gate (release)..." >&2
  (cd "$ROOT" && cargo build --release --locked -q)
  BIN="$ROOT/target/release/logon-gate"
fi

cd "$WORK"
# ---- Pebble's listener certificate (localhost), from a throwaway CA
openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
openssl req -x509 -new -key ca.key -subj /CN=acme-bench-ca -days 2 -out ca.pem 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out pebble.key 2>/dev/null
openssl req -new -key pebble.key -subj /CN=localhost -out pebble.csr 2>/dev/null
printf 'subjectAltName=DNS:localhost\n' > san.ext
openssl x509 -req -in pebble.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
  -extfile san.ext -out pebble.pem 2>/dev/null
cat > pebble.json <<EOF
{"pebble": {"listenAddress": "127.0.0.1:$ACME_PORT", "managementListenAddress": "127.0.0.1:$MGMT_PORT",
  "certificate": "$WORK/pebble.pem", "privateKey": "$WORK/pebble.key",
  "httpPort": $HTTP_PORT, "tlsPort": $HTTPS_PORT, "ocspResponderURL": "",
  "externalAccountBindingRequired": false}}
EOF

# ---- the zone: each address a CNAME to the provider's target, which is 127.0.0.1
mkdir -p config/tenants certs acme
{
  echo "host-record=logon.provider.test,127.0.0.1"
  for i in $(seq -f '%05g' 1 "$N"); do echo "cname=webmail.t$i.bench.test,logon.provider.test"; done
} > dnsmasq.conf
dnsmasq --no-daemon --keep-in-foreground --conf-file="$WORK/dnsmasq.conf" --no-resolv --no-hosts \
  --listen-address=127.0.0.1 --bind-interfaces --port=$DNS_PORT --log-facility=- -q \
  > dnsmasq.log 2>&1 &
PIDS+=($!)

for i in $(seq -f '%05g' 1 "$N"); do
  cat > "config/tenants/t$i.bench.test.toml" <<EOF
domain = "t$i.bench.test"
edition = "standard"
[[logon]]
host = "webmail.t$i.bench.test"
cname = "verified"
icp = "filed"
enabled = true
EOF
done
cat > config/gateway.toml <<EOF
cname_target = "logon.provider.test"
require_icp = true
[listen]
https = "127.0.0.1:$HTTPS_PORT"
http = "127.0.0.1:$HTTP_PORT"
admin = "127.0.0.1:$ADMIN_PORT"
[backend]
url = "http://127.0.0.1:9"
[platform]
hosts = []
[paths]
tenants = "tenants"
certs = "../certs"
[acme]
directory = "https://localhost:$ACME_PORT/dir"
contact = ["mailto:ops@provider.test"]
storage = "../acme"
directory_ca = "../ca.pem"
nameserver = "127.0.0.1:$DNS_PORT"
orders_in_flight = $FLIGHT
EOF

# PEBBLE_AUTHZREUSE=0: Pebble 2.4's in-memory store deadlocks when it reuses authorizations
# under concurrent new orders (a goroutine dump shows FindValidAuthorization waiting on
# AddAuthorization's lock, and every request after it hangs); see docs/performance.md.
PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 PEBBLE_AUTHZREUSE=0 pebble -config pebble.json \
  -dnsserver 127.0.0.1:$DNS_PORT > pebble.log 2>&1 &
PEBBLE=$!
PIDS+=($PEBBLE)
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$ACME_PORT) 2>/dev/null && break; sleep 0.1; done

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
PEBBLE_CPU0=$(cpu "$PEBBLE")
START=$(date +%s.%N)
"$BIN" serve -c config/gateway.toml > gateway.log 2>&1 &
GATE=$!
PIDS+=($GATE)

issued() { { find acme/certs -maxdepth 1 -name '*.pem' 2>/dev/null || true; } | wc -l; }
FIRST="" MAX_FLIGHT=0 SUM_FLIGHT=0 SAMPLES=0
while :; do
  now=$(date +%s.%N)
  elapsed=$(echo "$now - $START" | bc)
  got=$(issued)
  [ -z "$FIRST" ] && [ "$got" -ge 1 ] && FIRST=$elapsed
  [ "$got" -ge "$N" ] && break
  if [ "$(echo "$elapsed > $LIMIT" | bc)" = 1 ]; then
    echo "gave up after ${LIMIT}s with $got of $N certificates" >&2
    break
  fi
  kill -0 "$GATE" 2>/dev/null || { echo "the gateway exited:" >&2; tail -5 gateway.log >&2; exit 1; }
  flight=$({ find acme/locks -maxdepth 1 -type f 2>/dev/null || true; } | wc -l)
  [ "$flight" -gt "$MAX_FLIGHT" ] && MAX_FLIGHT=$flight
  SUM_FLIGHT=$((SUM_FLIGHT + flight)) SAMPLES=$((SAMPLES + 1))
  sleep 0.1
done
END=$(echo "$(date +%s.%N) - $START" | bc)
GATE_CPU=$(echo "scale=2; $(cpu "$GATE") / $TICK" | bc)
PEBBLE_CPU=$(echo "scale=2; ($(cpu "$PEBBLE") - $PEBBLE_CPU0) / $TICK" | bc)
METRICS=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" || true)
count() { echo "$METRICS" | awk -v k="logon_gate_acme_orders_total{result=\"$1\"}" '$1 == k {print $2}'; }
RSS=$(awk '/VmHWM/ {printf "%.0f MB", $2 / 1024}' "/proc/$GATE/status")

printf '| addresses | orders in flight (bound / max seen / mean) | first certificate | %s-th certificate | orders ok / failed | gateway CPU | Pebble CPU | gateway peak RSS |\n' "$N"
printf '| --- | --- | --- | --- | --- | --- | --- | --- |\n'
printf '| %s | %s / %s / %s | %.1f s | %.1f s (%s issued) | %s / %s | %s s | %s s | %s |\n' \
  "$N" "$FLIGHT" "$MAX_FLIGHT" "$( [ "$SAMPLES" -gt 0 ] && echo "scale=1; $SUM_FLIGHT / $SAMPLES" | bc || echo 0)" \
  "${FIRST:-0}" "$END" "$(issued)" "$(count ok)" "$(count failed)" "$GATE_CPU" "$PEBBLE_CPU" "$RSS"
