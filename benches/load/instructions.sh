#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind. Wall-clock CPU per request drifts by
# up to 25% here with the machine's phases; instruction counts repeat to about 0.1% back to
# back (0.4% an hour apart), so they show a change of a few percent that alternating load
# runs cannot resolve. (They do not
# show cache misses or system calls: check a change with run.sh or alternating runs too.)
#
# Usage: benches/load/instructions.sh WORKDIR [PROXY...]
#   WORKDIR  the directory run.sh keeps with KEEP_WORK=1 (certificates and configs), e.g.
#            KEEP_WORK=1 ROUNDS=1 IDLE_N=100 benches/load/run.sh 1
#   PROXY    logon-gate, haproxy or nginx (default: logon-gate haproxy)
#   LOAD=h1  HTTP/1.1 keep-alive (h2load --h1 -c50) instead of HTTP/2 (h2load -c50 -m10)
#   LGBIN=   the gateway binary to count (default: target/release/logon-gate), to compare builds
#   LOCKED=1 also count locked instructions per request: those with a `lock` prefix, and
#            `xchg` with memory, which is locked without one (atomic read-modify-writes).
#            Each takes several cycles or more and orders the core's memory accesses
#            around it, a cost instruction counts do not show. Found by address in objdump's disassembly
#            of each object, so every object must still be the file that ran.
#
# Each proxy runs under valgrind twice, for 2,000 and for 22,000 requests; the difference of
# the two totals over 20,000 is the count per request, with start-up and the 50 handshakes
# taken out. nginx runs as one process (master_process off): its workers, under valgrind,
# leave no files here. The callgrind files stay in WORKDIR/callgrind/ for callgrind_annotate.
set -euo pipefail
WORK=$(cd "${1:?usage: instructions.sh WORKDIR [PROXY...]}" && pwd)
shift
PROXIES=("$@")
[ ${#PROXIES[@]} -eq 0 ] && PROXIES=(logon-gate haproxy)
LOAD=${LOAD:-h2}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN="${LGBIN:-$ROOT/target/release/logon-gate}"
OUT="$WORK/callgrind"
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "instructions.sh: $BIN is missing; run cargo build --release first" >&2; exit 1; }
for f in backend/nginx.conf gate/config/gateway.toml haproxy/haproxy.cfg proxy/nginx.conf; do
  [ -f "$WORK/$f" ] || { echo "instructions.sh: $WORK/$f is missing; is $WORK a kept run.sh directory?" >&2; exit 1; }
done
command -v valgrind >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  sed -i '/# logon-gate-instructions$/d' /etc/hosts
}
trap cleanup EXIT
echo "127.0.0.1 webmail.example.net # logon-gate-instructions" >> /etc/hosts
ulimit -n "$(ulimit -Hn)"

nginx -c "$WORK/backend/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

wait_port() { # port
  for _ in $(seq 1 300); do
    ss -ltn | grep -q "127.0.0.1:$1 " && return 0
    sleep 0.1
  done
  echo "instructions.sh: nothing listens on $1" >&2
  return 1
}

# Total instructions of one proxy serving n requests (all its processes' files summed).
count() { # proxy n
  local proxy=$1 n=$2 port pid
  rm -f "$OUT/$proxy-$LOAD-$n".*.out
  local vg=(valgrind --tool=callgrind --trace-children=yes "--callgrind-out-file=$OUT/$proxy-$LOAD-$n.%p.out")
  [ "${LOCKED:-0}" = 1 ] && vg+=(--dump-instr=yes --compress-strings=no --compress-pos=no)
  case $proxy in
    logon-gate) "${vg[@]}" "$BIN" serve -c "$WORK/gate/config/gateway.toml" --log-level warn >/dev/null 2>&1 & port=18443 ;;
    haproxy) "${vg[@]}" haproxy -f "$WORK/haproxy/haproxy.cfg" -db >/dev/null 2>&1 & port=38443 ;;
    nginx) "${vg[@]}" nginx -c "$WORK/proxy/nginx.conf" -g 'daemon off; master_process off;' >/dev/null 2>&1 & port=28443 ;;
    *) echo "instructions.sh: unknown proxy $proxy" >&2; exit 2 ;;
  esac
  pid=$!
  PIDS+=($pid)
  wait_port $port
  local args=(-t1 -c50 -m10)
  [ "$LOAD" = h1 ] && args=(--h1 -t1 -c50 -m1)
  local ok
  ok=$(h2load "${args[@]}" -n "$n" "https://webmail.example.net:$port/" | awk '/^status codes:/ {print $3}')
  [ "$ok" = "$n" ] || { echo "instructions.sh: $proxy answered $ok of $n requests with 2xx" >&2; exit 1; }
  kill -TERM $pid
  # nginx's master stops its worker; wait for every process's file to be written.
  wait $pid 2>/dev/null || true
  sleep 1
  local total=0 locks=0 f t j
  for f in "$OUT/$proxy-$LOAD-$n".*.out; do
    t=$(awk '/^totals:/ {print $2}' "$f")
    # aws-lc seeds its generators from CPU-jitter entropy at start-up; under valgrind that
    # takes a varying number of rounds (400 million instructions, give or take a few
    # million), which would not cancel out between the two runs. Its functions' own
    # instructions are left out (none in HAProxy or nginx).
    j=$(callgrind_annotate --threshold=100 "$f" 2>/dev/null |
      awk '/jent|keccak|xoshiro|rol64/ {gsub(",", "", $1); s += $1} END {print s + 0}')
    total=$((total + t - j))
    [ "${LOCKED:-0}" = 1 ] && locks=$((locks + $(locked "$f")))
  done
  echo "$total $locks"
}

# Executions of locked instructions in one callgrind file (written with --dump-instr=yes,
# --compress-strings=no and --compress-pos=no, so that every cost line has its address and
# every object its path). The line after `calls=` is the callee's inclusive cost: skipped.
locked() { # file
  local f=$1 obj
  : >"$OUT/locked.addr"
  for obj in $(awk '/^ob=\// {print substr($0, 4)}' "$f" | sort -u); do
    objdump -d --no-show-raw-insn "$obj" 2>/dev/null |
      awk -v o="$obj" '$2 == "lock" || ($2 ~ /^xchg/ && /\(/) {a = $1; sub(":", "", a); print o, a}' \
        >>"$OUT/locked.addr"
  done
  awk 'NR == FNR {lk[$1 " " $2] = 1; next}
       /^ob=/ {ob = substr($0, 4); next}
       /^calls=/ {skip = 1; next}
       /^0x/ {if (skip) {skip = 0; next} if ((ob " " substr($1, 3)) in lk) s += $3}
       END {print s + 0}' "$OUT/locked.addr" "$f"
}

if [ "${LOCKED:-0}" = 1 ]; then
  command -v objdump >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binutils >/dev/null
  printf '%-11s %-4s %14s %15s\n' proxy load "instr/request" "locked/request"
else
  printf '%-11s %-4s %14s\n' proxy load "instr/request"
fi
per() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.0f", (b - a) / 20000}'; }
for p in "${PROXIES[@]}"; do
  small=$(count "$p" 2000)
  large=$(count "$p" 22000)
  small_locks=${small#* } small=${small% *}
  large_locks=${large#* } large=${large% *}
  if [ "${LOCKED:-0}" = 1 ]; then
    printf '%-11s %-4s %14s %15s\n' "$p" "$LOAD" "$(per "$small" "$large")" "$(per "$small_locks" "$large_locks")"
  else
    printf '%-11s %-4s %14s\n' "$p" "$LOAD" "$(per "$small" "$large")"
  fi
done
