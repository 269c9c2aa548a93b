#!/usr/bin/env bash
# Load comparison: logon-gate vs nginx vs HAProxy doing the same job on this machine.
#
# The job: TLS termination with ECDSA P-256 certificates for two SNI hosts, forward the allowed
# Host to a keep-alive backend that answers ~200 bytes, refuse unknown hosts. Three loads, each
# bounded in time and aimed at 127.0.0.1 only:
#   h2     HTTP/2, 1 thread, 50 connections, 10 streams each (h2load -m10)
#   h1     HTTP/1.1 keep-alive, 1 thread, 50 connections (wrk)
#   new    a new TLS connection per request (wrk, Connection: close)
# Prints one table: req/s, p50, p99, errors, proxy CPU seconds per request (/proc/PID/stat),
# peak RSS, and the ratio to nginx. Every process it starts is stopped by PID.
#
# Usage: benches/load/run.sh [SECONDS]   (default 8; run as root: it installs packages with apt
# and maps the two test host names to 127.0.0.1 in /etc/hosts for wrk, removing them after)
# BASE_BIN=PATH adds a second logon-gate (e.g. the commit before a change, built elsewhere) as
# the proxy "base", taking its turns in the same rounds; EXTRA_BINS="name=PATH ..." adds more
# (variants of one change), each under its name.
set -euo pipefail

DUR=${1:-8}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/logon-gate-load.XXXXXX)
HOSTS=(webmail.example.net mail.provider.test)
BACKEND_PORT=18080 GATE_PORT=18443 NGINX_PORT=28443 HAPROXY_PORT=38443 BASE_PORT=48443
PIDS=()

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need haproxy || ! need wrk || ! need h2load; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light haproxy wrk nghttp2-client >/dev/null
fi

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 0.3
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  sed -i '/# logon-gate-load$/d' /etc/hosts
  [ -n "${KEEP_WORK:-}" ] && { echo "kept $WORK" >&2; return; }
  rm -rf "$WORK"
}
trap cleanup EXIT
for h in "${HOSTS[@]}"; do echo "127.0.0.1 $h # logon-gate-load" >> /etc/hosts; done
ulimit -n "$(ulimit -Hn)"

# GATE_BIN=PATH runs a logon-gate built elsewhere instead of building this tree's.
if [ -n "${GATE_BIN:-}" ]; then
  BIN=$GATE_BIN
else
  echo "building logon-gate (release)..." >&2
  (cd "$ROOT" && cargo build --release --locked -q)
  BIN="$ROOT/target/release/logon-gate"
fi

# ---- certificates: a CA and one ECDSA P-256 leaf per host
cd "$WORK"
openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
openssl req -x509 -new -key ca.key -subj /CN=load-ca -days 2 -out ca.pem 2>/dev/null
for h in "${HOSTS[@]}"; do
  openssl ecparam -name prime256v1 -genkey -noout -out "$h.key" 2>/dev/null
  openssl req -new -key "$h.key" -subj "/CN=$h" -out "$h.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s\n' "$h" > "$h.ext"
  openssl x509 -req -in "$h.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile "$h.ext" -out "$h.crt" 2>/dev/null
  cat "$h.crt" "$h.key" > "$h.pem"
done

# ---- backend: nginx answering 200 with ~200 bytes, keep-alive
BODY=$(printf 'x%.0s' $(seq 1 200))
mkdir -p backend
cat > backend/nginx.conf <<CONF
worker_processes 1;
pid $WORK/backend/nginx.pid;
error_log $WORK/backend/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$BACKEND_PORT;
    location / { return 200 "$BODY"; }
  }
}
CONF
nginx -c "$WORK/backend/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

# ---- logon-gate
mkdir -p gate/config/tenants gate/certs
cat > gate/config/gateway.toml <<CONF
cname_target = "logon.provider.test"
[listen]
https = "127.0.0.1:$GATE_PORT"
http  = ""
admin = ""
[backend]
url = "http://127.0.0.1:$BACKEND_PORT"
[platform]
hosts = ["mail.provider.test"]
[limits]
max_connections = 15000
CONF
cat > gate/config/tenants/example.net.toml <<CONF
domain = "example.net"
edition = "enterprise"
[[logon]]
host = "webmail.example.net"
cname = "verified"
icp = "filed"
enabled = true
CONF
cp webmail.example.net.pem mail.provider.test.pem gate/certs/
chmod 600 gate/certs/*
GATE_LOG=${GATE_LOG:-warn}
"$BIN" serve -c gate/config/gateway.toml --log-level "$GATE_LOG" > gate/stdout 2> gate/stderr &
GATE_PID=$!
PIDS+=($GATE_PID)
PROXIES=(logon-gate nginx haproxy)
PORTS=($GATE_PORT $NGINX_PORT $HAPROXY_PORT)
EXTRA_PIDS=()
extras=()
[ -n "${BASE_BIN:-}" ] && extras+=("base=$BASE_BIN")
for e in ${EXTRA_BINS:-}; do extras+=("$e"); done
for e in "${extras[@]}"; do
  name=${e%%=*} bin=${e#*=} port=$((BASE_PORT + ${#EXTRA_PIDS[@]}))
  cp -r gate "$name"
  sed -i "s/:$GATE_PORT\"/:$port\"/" "$name/config/gateway.toml"
  "$bin" serve -c "$name/config/gateway.toml" --log-level "$GATE_LOG" > "$name/stdout" 2> "$name/stderr" &
  EXTRA_PIDS+=($!)
  PIDS+=($!)
  PROXIES+=("$name")
  PORTS+=($port)
done

# ---- nginx as the proxy
mkdir -p proxy
cat > proxy/nginx.conf <<CONF
worker_processes auto;
pid $WORK/proxy/nginx.pid;
error_log $WORK/proxy/error.log;
events { worker_connections 9000; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream webmail { server 127.0.0.1:$BACKEND_PORT; keepalive 128; }
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:10m;
  server {
    listen 127.0.0.1:$NGINX_PORT ssl http2 default_server;
    ssl_reject_handshake on;
    location / { return 421 "not a logon address"; }
  }
  server {
    listen 127.0.0.1:$NGINX_PORT ssl http2;
    server_name webmail.example.net;
    ssl_certificate $WORK/webmail.example.net.crt;
    ssl_certificate_key $WORK/webmail.example.net.key;
    location / {
      proxy_pass http://webmail;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto https;
      proxy_set_header X-Logon-Tenant example.net;
    }
  }
  server {
    listen 127.0.0.1:$NGINX_PORT ssl http2;
    server_name mail.provider.test;
    ssl_certificate $WORK/mail.provider.test.crt;
    ssl_certificate_key $WORK/mail.provider.test.key;
    location / {
      proxy_pass http://webmail;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto https;
    }
  }
}
CONF
nginx -c "$WORK/proxy/nginx.conf" -g 'daemon off;' &
NGINX_PID=$!
PIDS+=($NGINX_PID)

# ---- HAProxy as the proxy
mkdir -p haproxy
cat > haproxy/haproxy.cfg <<CONF
global
  nbthread 2
  maxconn 9000
  tune.ssl.default-dh-param 2048
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 60s
frontend fe
  bind 127.0.0.1:$HAPROXY_PORT ssl crt $WORK/webmail.example.net.pem crt $WORK/mail.provider.test.pem strict-sni alpn h2,http/1.1 ssl-min-ver TLSv1.2
  http-request set-var(txn.host) req.hdr(host),field(1,:),lower
  acl enabled var(txn.host) -m str webmail.example.net
  acl platform var(txn.host) -m str mail.provider.test
  http-request return status 421 content-type text/plain string "not a logon address" if !enabled !platform
  http-request del-header X-Logon-Tenant
  http-request set-header X-Logon-Tenant example.net if enabled
  option forwardfor
  http-request set-header X-Forwarded-Proto https
  default_backend webmail
backend webmail
  http-reuse always
  server b1 127.0.0.1:$BACKEND_PORT maxconn 1024
CONF
haproxy -f haproxy/haproxy.cfg -db > haproxy/log 2>&1 &
HAPROXY_PID=$!
PIDS+=($HAPROXY_PID)

wait_port() {
  for _ in $(seq 1 100); do
    (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 did not open" >&2; exit 1
}
for p in $BACKEND_PORT "${PORTS[@]}"; do wait_port "$p"; done

# CPU ticks (user+system) of a process and its children threads; for nginx, master + workers.
ticks() {
  local total=0 pid
  for pid in "$@"; do
    [ -r "/proc/$pid/stat" ] || continue
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$total"
}
family() { echo "$1 $(pgrep -P "$1" | tr '\n' ' ')"; }
peak_rss_kb() {
  local total=0 pid
  for pid in "$@"; do
    [ -r "/proc/$pid/status" ] || continue
    total=$((total + $(awk '/VmHWM/ {print $2}' "/proc/$pid/status")))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)

# Sanity: every proxy serves the enabled host, refuses an unknown one, and sends the tenant.
for port in "${PORTS[@]}"; do
  ok=$(curl -s -o /dev/null -w '%{http_code}' --cacert ca.pem https://webmail.example.net:$port/)
  bad=$(curl -s -o /dev/null -w '%{http_code}' --cacert ca.pem -H 'Host: nobody.example.net' https://webmail.example.net:$port/)
  [ "$ok" = 200 ] && [ "$bad" = 421 ] || { echo "proxy on $port: enabled=$ok unknown=$bad (want 200/421)" >&2; exit 1; }
done

RESULTS=()
# One load against one proxy; appends "load|proxy|rps|p50|p99|errors|cpu|rss" to RESULTS.
run_one() { # load name port pids...
  local load=$1 name=$2 port=$3; shift 3
  local pids=("$@") out before after reqs rps p50 p99 errs cpu
  before=$(ticks "${pids[@]}")
  case $load in
    h2)
      # h2load appends to its log file: without this, each round's percentiles would be
      # those of every HTTP/2 run so far, of all three proxies.
      rm -f "$WORK/h2.log"
      out=$(h2load -t 1 -c 50 -m 10 -D "$DUR" --connect-to=127.0.0.1:$port \
        --log-file="$WORK/h2.log" "https://webmail.example.net:$port/" 2>&1)
      reqs=$(echo "$out" | awk '/^requests:/ {print $8}')
      rps=$(echo "$out" | awk '/^finished in/ {gsub(",",""); print $4}')
      errs=$(echo "$out" | awk '/^requests:/ {print $10 + $12}')
      # Per-request durations (µs, third column) -> p50/p99 in ms.
      read -r p50 p99 < <(awk '{print $3}' "$WORK/h2.log" | sort -n | awk '{a[NR]=$1} END {printf "%.2fms %.2fms\n", a[int(NR*0.5)]/1000, a[int(NR*0.99)]/1000}')
      ;;
    h1|new)
      local hdr=()
      [ "$load" = new ] && hdr=(-H "Connection: close")
      out=$(wrk -t 1 -c 50 -d "${DUR}s" --latency "${hdr[@]}" "https://webmail.example.net:$port/" 2>&1)
      reqs=$(echo "$out" | awk '/requests in/ {print $1}')
      rps=$(echo "$out" | awk '/^Requests\/sec/ {print $2}')
      errs=$(echo "$out" | awk '/Non-2xx/ {n+=$5} /Socket errors/ {gsub(",",""); n+=$4+$6+$8+$10} END {print n+0}')
      p50=$(echo "$out" | awk '$1=="50%" {print $2}')
      p99=$(echo "$out" | awk '$1=="99%" {print $2}')
      ;;
  esac
  after=$(ticks "${pids[@]}")
  cpu=$(awk -v d=$((after - before)) -v hz="$HZ" -v n="$reqs" 'BEGIN {printf "%.1f", n ? d / hz / n * 1e6 : 0}')
  RESULTS+=("$load|$name|$rps|$p50|$p99|$errs|$cpu|$(peak_rss_kb "${pids[@]}")")
  sleep 1
}

# The machine drifts over minutes, so the proxies take turns within each round and the
# reported row is each one's median round (by req/s).
ROUNDS=${ROUNDS:-3}
NGINX_PIDS=$(family $NGINX_PID)
# The order rotates from round to round (logon-gate first, then nginx, then HAProxy): the
# machine's speed can change by half within a minute, and a fixed order would give the
# proxy that always runs last the benefit of a machine speeding up (or the cost of one
# slowing down) in every round.
run_proxy() { # load index
  case $2 in
    0) run_one "$1" logon-gate $GATE_PORT $GATE_PID ;;
    1) run_one "$1" nginx $NGINX_PORT $NGINX_PIDS ;;
    2) run_one "$1" haproxy $HAPROXY_PORT $HAPROXY_PID ;;
    *) run_one "$1" "${PROXIES[$2]}" "${PORTS[$2]}" "${EXTRA_PIDS[$(($2 - 3))]}" ;;
  esac
}
N=${#PROXIES[@]}
for load in h2 h1 new; do
  for r in $(seq 0 $((ROUNDS - 1))); do
    for i in $(seq 0 $((N - 1))); do run_proxy $load $(((r + i) % N)); done
  done
done
median() { # load name -> the median result line
  printf '%s\n' "${RESULTS[@]}" | awk -F'|' -v l="$1" -v n="$2" '$1==l && $2==n' | sort -t'|' -k3 -g | awk -v r="$ROUNDS" 'NR==int((r+1)/2)'
}

# ---- memory with 10,000 idle keep-alive TLS connections (logon-gate and nginx)
IDLE_N=${IDLE_N:-10000}
idle_rss() { # port pids...
  local port=$1; shift
  local fifo="$WORK/idle.out"
  python3 "$ROOT/benches/load/idle.py" "$port" "$IDLE_N" 20 > "$fifo" 2>&1 &
  local py=$!
  PIDS+=($py)
  for _ in $(seq 1 600); do grep -q '^open' "$fifo" && break; sleep 0.1; done
  # Read once the connections are idle, not while the last ones are still being answered.
  sleep "${IDLE_SETTLE:-5}"
  local rss=0 pid
  for pid in "$@"; do
    [ -r "/proc/$pid/status" ] && rss=$((rss + $(awk '/VmRSS/ {print $2}' "/proc/$pid/status")))
  done
  echo "$(cat "$fifo" | head -1) rss $((rss / 1024)) MB"
  kill "$py" 2>/dev/null || true
  wait "$py" 2>/dev/null || true
}
IDLE_GATE=$(idle_rss $GATE_PORT $GATE_PID)
sleep 2
IDLE_NGINX=$(idle_rss $NGINX_PORT $(family $NGINX_PID))

echo
echo "Load comparison, $(date -u +%F), $(nproc) cores, ${DUR}s per run, median of $ROUNDS rounds (1 generator thread, 50 connections)"
printf '%-5s %-11s %10s %9s %9s %7s %12s %10s %9s\n' load proxy "req/s" p50 p99 errors "cpu µs/req" "peak RSS" "vs nginx"
for load in h2 h1 new; do
  nginx_rps=$(median $load nginx | cut -d'|' -f3)
  for name in "${PROXIES[@]}"; do
    IFS='|' read -r l n rps p50 p99 errs cpu rss <<< "$(median $load $name)"
    ratio=$(awk -v a="$rps" -v b="$nginx_rps" 'BEGIN {printf "%.2fx", b ? a / b : 0}')
    printf '%-5s %-11s %10.0f %9s %9s %7s %12s %8d MB %9s\n' "$l" "$n" "$rps" "$p50" "$p99" "$errs" "$cpu" $((rss / 1024)) "$ratio"
  done
done
echo
echo "All rounds (load|proxy|req/s|p50|p99|errors|cpu µs/req|peak RSS kB):"
printf '  %s\n' "${RESULTS[@]}"
echo
echo "RSS with $IDLE_N idle keep-alive TLS connections: logon-gate: $IDLE_GATE; nginx: $IDLE_NGINX"
