#!/usr/bin/env bash
# A cross-check of benches/load.rs with a third-party client and no pinning: the deployment as
# shipped. wrk (2 threads, 64 connections, a 101-byte JSON-RPC POST) drives, in turn, nginx as
# the peer proxy (`worker_processes auto` and `1`, `keepalive 64`, proxy_ssl_verify on,
# proxy_ssl_session_reuse on) and the release sprint-sidecar with its default configuration
# (runtime.worker_threads 1) and with `worker_threads = 0` (one per core). All of them, wrk and
# an nginx TLS relay (h2, fixed answer, nginx's default rotation of a client connection after
# 1000 requests) share the machine's cores as the scheduler places them.
# Prints each window, then per proxy the mean req/s, p99 and CPU seconds per 10 000 requests
# (utime+stime of the proxy's processes from /proc) over the rounds, the relay's CPU per
# 10 000 requests while it served that proxy (h2 from the sidecar costs nginx more than
# HTTP/1.1 from nginx; on one machine that CPU is taken from everyone), the relay's read and
# write system calls per request (/proc/PID/io), how often the proxy was preempted per request
# (involuntary context switches), how much of the machine stayed idle during its windows
# (/proc/stat), wrk's own CPU per 10 000 requests (the shell's `times` for its child), the
# total of proxy, relay and wrk (all the work one request costs on this machine), the
# ratios, and per sidecar what the relay's rotations cost it (requests refused and sent again,
# reconnects, the request limit it learned).
#
# Run: benches/wrk-side-by-side.sh  (needs Debian nginx, wrk, openssl, python3 and
# `cargo build --release` first). Environment: SECONDS_PER_WINDOW (8), ROUNDS (4),
# CONNECTIONS (64), SIDECAR_BIN (target/release/sprint-sidecar), PORT_BASE (18000), POOL_SIZES
# (empty; e.g. "1 2 8": one more default sidecar per size, named sidecar-pool-N, whose
# `pool.size` is N instead of 4),
# BUSY_POLL_OFF (1: one more default sidecar, sidecar-no-busy-poll, with `runtime.busy_poll =
# "0s"`, to show what busy polling brings; 0: leave it out; where the default sidecar's
# priority is raised, busy polling stands down, so this peer runs as the default does),
# NICE_ZERO (1: one more default sidecar, sidecar-nice-0, with `runtime.nice = 0` instead of -5,
# to show what the scheduling priority brings where it applies (root or CAP_SYS_NICE); 0: leave
# it out), NGINX_PRIORITY (1: one more nginx `1`, nginx-1-prio, with `worker_priority -5`, the
# same priority for the peer; 0: leave it out),
# ALT_BIN (empty; a path: one more default sidecar, sidecar-alt, run from that binary, e.g. a
# build before a change; ALT_NICE: its runtime.nice instead of -5), RELAY_KEEPALIVE_REQUESTS (1000, nginx's default), PIN (0; 1: like benches/load.rs, every
# proxy on core 0, the relay and a one-thread wrk on core 1, so each proxy has one core to
# itself and the relay's cost shows as the load core's limit; needs taskset and 2+ cores),
# HAPROXY (0; 1: two more peers, Debian's HAProxy with `nbthread 1`, `http-reuse always` and
# `ssl verify required`, speaking to the relay over h2 (`haproxy-h2`, `alpn h2`) and over
# HTTP/1.1 (`haproxy-h1`), to tell what the relay's protocol costs from what a proxy costs),
# CLIENT (wrk; h2load: nghttp2's h2load drives instead, one h2c connection per client with one
# stream at a time, `-m1`, so the proxies answer HTTP/2 without TLS, nginx with `listen ... http2`;
# p99 comes from h2load's per-request log).
set -euo pipefail
cd "$(dirname "$0")/.."
window=${SECONDS_PER_WINDOW:-8}
rounds=${ROUNDS:-4}
connections=${CONNECTIONS:-64}
bin=$(realpath "${SIDECAR_BIN:-target/release/sprint-sidecar}")
base=${PORT_BASE:-18000}
# Requests per client connection before the relay rotates it (HTTP/2 GOAWAY, HTTP/1.1 close):
# nginx's default is 1000, and the proxies must cope with that.
relay_keepalive_requests=${RELAY_KEEPALIVE_REQUESTS:-1000}
nginx=${NGINX:-/usr/sbin/nginx}
haproxy=${HAPROXY_BIN:-/usr/sbin/haproxy}
# CLIENT=h2load: the clients speak h2c (prior knowledge), so nginx peers listen with http2.
client=${CLIENT:-wrk}
case $client in
wrk) listen_h2c="" curl_h2c=() ;;
h2load) listen_h2c=" http2" curl_h2c=(--http2-prior-knowledge) ;;
*) echo "wrk-side-by-side: CLIENT must be wrk or h2load" >&2; exit 2 ;;
esac
tools=("$nginx" "$client" openssl python3 "$bin")
[ "${HAPROXY:-0}" = 1 ] && tools+=("$haproxy")
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null || { echo "wrk-side-by-side: $tool not found" >&2; exit 2; }
done
dir=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for conf in "$dir"/*/nginx.conf; do "$nginx" -c "$conf" -s stop 2>/dev/null || true; done
    sleep 0.5
    rm -rf "$dir"
}
trap cleanup EXIT

# A test CA and the relay's certificate for relay.test.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=relay.test" \
    -keyout "$dir/relay.key" -out "$dir/relay.csr" 2>/dev/null
openssl x509 -req -in "$dir/relay.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile <(printf 'subjectAltName=DNS:relay.test\n') -out "$dir/relay.pem" 2>/dev/null
token="Bearer 3f9a1c7e5b2d4f6a8c0e1b3d5f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d1f3a"
(umask 077 && printf '%s' "$token" >"$dir/token")
answer='{"jsonrpc":"2.0","id":1,"result":"00000000000000000002a7c4c1e48d76c5a37902165a270156b7a8d72728a054"}'
user=""
[ "$(id -u)" = 0 ] && user="user root;"

# nginx_conf NAME WORKERS BODY: an nginx instance under $dir/NAME.
nginx_conf() {
    mkdir -p "$dir/$1"
    cat >"$dir/$1/nginx.conf" <<EOF
$user
worker_processes $2;
pid $dir/$1/nginx.pid;
error_log $dir/$1/error.log error;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/$1/body; proxy_temp_path $dir/$1/proxy;
    fastcgi_temp_path $dir/$1/fcgi; uwsgi_temp_path $dir/$1/uwsgi; scgi_temp_path $dir/$1/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
$3
}
EOF
    "$nginx" -c "$dir/$1/nginx.conf"
}
relay_port=$base
nginx_conf relay 1 "    server {
        listen 127.0.0.1:$relay_port ssl http2;
        keepalive_requests $relay_keepalive_requests;
        ssl_certificate $dir/relay.pem; ssl_certificate_key $dir/relay.key;
        location / { default_type application/json; return 200 '$answer'; }
    }"
peer() { # NAME WORKERS PORT
    nginx_conf "$1" "$2" "    upstream relay { server 127.0.0.1:$relay_port; keepalive 64; keepalive_requests 10000000; }
    server {
        listen 127.0.0.1:$3$listen_h2c;
        location / {
            proxy_pass https://relay;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host relay.test;
            proxy_set_header Authorization \"$token\";
            proxy_ssl_verify on; proxy_ssl_trusted_certificate $dir/ca.pem;
            proxy_ssl_name relay.test; proxy_ssl_server_name on;
            proxy_ssl_session_reuse on; proxy_ssl_protocols TLSv1.2 TLSv1.3;
        }
    }"
}
sidecar() { # NAME WORKER_THREADS PORT [POOL_SIZE [BUSY_POLL [NICE]]] (BUSY_POLL "": the default)
    mkdir -p "$dir/$1"
    local busy_poll=""
    [ -n "${5:-}" ] && busy_poll="busy_poll = \"$5\""
    cat >"$dir/$1/sidecar.toml" <<EOF
[listener]
address = "127.0.0.1:$3"
[admin]
address = "127.0.0.1:$(($3 + 1))"
[upstream]
endpoint = "127.0.0.1:$relay_port"
server_name = "relay.test"
ca_file = "$dir/ca.pem"
auth_token_file = "$dir/token"
[pool]
size = ${4:-4}
[runtime]
worker_threads = $2
nice = ${6:--5}
$busy_poll
EOF
    "${sidecar_bin:-$bin}" --config "$dir/$1/sidecar.toml" run >"$dir/$1/log" 2>&1 &
    pids+=($!)
    echo $! >"$dir/$1/pid"
}
names=(nginx-auto nginx-1 sidecar sidecar-per-core)
peer nginx-auto auto $((base + 10))
peer nginx-1 1 $((base + 20))
sidecar sidecar 1 $((base + 30))
sidecar sidecar-per-core 0 $((base + 40))
declare -A port=([nginx-auto]=$((base + 10)) [nginx-1]=$((base + 20)) [sidecar]=$((base + 30))
    [sidecar-per-core]=$((base + 40)))
offset=50
if [ "${BUSY_POLL_OFF:-1}" = 1 ]; then
    names+=(sidecar-no-busy-poll)
    port[sidecar-no-busy-poll]=$((base + offset))
    sidecar sidecar-no-busy-poll 1 $((base + offset)) 4 0s
    offset=$((offset + 10))
fi
if [ "${NICE_ZERO:-1}" = 1 ]; then
    names+=(sidecar-nice-0)
    port[sidecar-nice-0]=$((base + offset))
    sidecar sidecar-nice-0 1 $((base + offset)) 4 "" 0
    offset=$((offset + 10))
fi
if [ "${NGINX_PRIORITY:-1}" = 1 ]; then
    names+=(nginx-1-prio)
    port[nginx-1-prio]=$((base + offset))
    peer nginx-1-prio "1; worker_priority -5" $((base + offset))
    offset=$((offset + 10))
fi
if [ -n "${ALT_BIN:-}" ]; then
    names+=(sidecar-alt)
    port[sidecar-alt]=$((base + offset))
    sidecar_bin=$(realpath "$ALT_BIN") sidecar sidecar-alt 1 $((base + offset)) 4 "" "${ALT_NICE:--5}"
    offset=$((offset + 10))
fi
for size in ${POOL_SIZES:-}; do
    [[ $size =~ ^[1-9][0-9]*$ ]] || { echo "wrk-side-by-side: POOL_SIZES: $size is not a pool size" >&2; exit 2; }
    names+=("sidecar-pool-$size")
    port[sidecar-pool-$size]=$((base + offset))
    sidecar "sidecar-pool-$size" 1 $((base + offset)) "$size"
    offset=$((offset + 10))
done
haproxy_peer() { # NAME PORT ALPN: HAProxy in the foreground, one thread
    mkdir -p "$dir/$1"
    cat >"$dir/$1/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 3s
    timeout client 300s
    timeout server 30s
    http-reuse always
frontend data
    bind 127.0.0.1:$2
    default_backend relay
backend relay
    http-request set-header Host relay.test
    http-request set-header Authorization "$token"
    server relay 127.0.0.1:$relay_port ssl verify required ca-file $dir/ca.pem sni str(relay.test) verifyhost relay.test alpn $3
EOF
    "$haproxy" -f "$dir/$1/haproxy.cfg" -db >"$dir/$1/log" 2>&1 &
    pids+=($!)
    echo $! >"$dir/$1/pid"
    names+=("$1")
    port[$1]=$2
}
if [ "${HAPROXY:-0}" = 1 ]; then
    haproxy_peer haproxy-h2 $((base + offset)) h2
    haproxy_peer haproxy-h1 $((base + offset + 10)) http/1.1
fi
procs() { # the pids whose CPU counts: nginx master and workers, or the sidecar or HAProxy
    case $1 in
    nginx* | relay) local master; master=$(cat "$dir/$1/nginx.pid"); echo "$master $(pgrep -P "$master" | tr '\n' ' ')" ;;
    *) cat "$dir/$1/pid" ;;
    esac
}
ticks() { local t=0 p; for p in $1; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
# Read and write system calls (/proc/PID/io syscr, syscw) of the given pids, as "reads writes".
# Involuntary context switches (preemptions) of all threads of the given pids.
preempted() { local p; for p in $1; do cat /proc/"$p"/task/*/status; done | awk '/^nonvoluntary_ctxt_switches/ {n += $2} END {print n + 0}'; }
# The machine's idle and total CPU ticks (/proc/stat), as "idle total".
machine() { awk '/^cpu / {print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }
syscalls() { local r=0 w=0 p; for p in $1; do
    r=$((r + $(awk '/^syscr/ {print $2}' "/proc/$p/io"))); w=$((w + $(awk '/^syscw/ {print $2}' "/proc/$p/io")))
    done; echo "$r $w"; }
cat >"$dir/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"jsonrpc":"2.0","id":1,"method":"getblockhash","params":[840000]}                                  '
wrk.headers["Content-Type"] = "application/json"
EOF
printf '%s' '{"jsonrpc":"2.0","id":1,"method":"getblockhash","params":[840000]}                                  ' >"$dir/body.json"
for name in "${names[@]}"; do # every proxy answers before the windows start
    for _ in $(seq 50); do
        code=$(curl "${curl_h2c[@]}" -s -o /dev/null -w '%{http_code}' -X POST -d '{}' "http://127.0.0.1:${port[$name]}/" || true)
        [ "$code" = 200 ] && break
        sleep 0.2
    done
    [ "$code" = 200 ] || { echo "wrk-side-by-side: $name does not answer 200 (got $code)" >&2; exit 1; }
done
hz=$(getconf CLK_TCK)
wrk_threads=2
wrk_cmd=(wrk)
pinning="no pinning"
if [ "${PIN:-0}" = 1 ]; then
    command -v taskset >/dev/null || { echo "wrk-side-by-side: PIN=1 needs taskset" >&2; exit 2; }
    for name in "${names[@]}"; do for p in $(procs "$name"); do taskset -apc 0 "$p" >/dev/null; done; done
    for p in $(procs relay); do taskset -apc 1 "$p" >/dev/null; done
    wrk_threads=1
    wrk_cmd=(taskset -c 1 wrk)
    pinning="proxies pinned to core 0, relay and wrk to core 1"
fi
echo "$client -t$wrk_threads -c$connections, $rounds rounds of ${window} s per proxy, interleaved; $(nproc) cores, $pinning"
results="$dir/results"
for round in $(seq "$rounds"); do
    for name in "${names[@]}"; do
        p=$(procs "$name")
        r=$(procs relay)
        before=$(ticks "$p")
        relay_before=$(ticks "$r")
        read -r relay_r0 relay_w0 <<<"$(syscalls "$r")"
        preempted_before=$(preempted "$p")
        read -r idle0 total0 <<<"$(machine)"
        # `times` in the same subshell: its second line is wrk's user and system time.
        if [ "$client" = h2load ]; then
            # One stream per connection, like wrk's one request per connection; p99 from the
            # per-request log (third column: microseconds).
            rm -f "$dir/latency.log"
            out=$("${wrk_cmd[@]/#wrk/h2load}" -t"$wrk_threads" -c"$connections" -m1 -D "$window" --warm-up-time=1 -d "$dir/body.json" -H 'content-type: application/json' --log-file="$dir/latency.log" "http://127.0.0.1:${port[$name]}/"; times)
        else
            out=$("${wrk_cmd[@]}" -t"$wrk_threads" -c"$connections" -d"${window}s" --latency -s "$dir/post.lua" "http://127.0.0.1:${port[$name]}/"; times)
        fi
        wrk_ms=$(tail -n 1 <<<"$out" | awk '{t = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); sub("s", "", a[2]); t += a[1] * 60 + a[2] } printf "%d", t * 1000}')
        after=$(ticks "$p")
        relay_after=$(ticks "$r")
        read -r relay_r1 relay_w1 <<<"$(syscalls "$r")"
        preempted_after=$(preempted "$p")
        read -r idle1 total1 <<<"$(machine)"
        if [ "$client" = h2load ]; then
            requests=$(awk '/^requests:/ {print $8}' <<<"$out")
            rps=$(awk '/^finished in/ {print $4}' <<<"$out")
            p99=$(awk '{print $3}' "$dir/latency.log" | sort -n | awk '{v[NR] = $1} END {printf "%dus", v[int(NR * 0.99)]}')
            errors=$(awk '/^requests:/ {print $10 + $12 + $14}' <<<"$out")
            errors=$((errors + $(awk '/^status codes:/ {print $5 + $7 + $9}' <<<"$out")))
        else
            requests=$(awk '/requests in/ {print $1}' <<<"$out")
            rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
            p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
            errors=$(grep -cE 'Non-2xx|Socket errors' <<<"$out" || true)
        fi
        rss=$(for q in $p; do awk '/VmHWM/ {print $2}' "/proc/$q/status"; done | awk '{s += $1} END {print s}')
        echo "$round $name $rps $p99 $((after - before)) $requests $errors $rss $((relay_after - relay_before)) $((relay_r1 - relay_r0)) $((relay_w1 - relay_w0)) $((preempted_after - preempted_before)) $((idle1 - idle0)) $((total1 - total0)) $wrk_ms" |
            tee -a "$results"
    done
done
python3 - "$results" "$hz" <<'EOF'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
hz = float(sys.argv[2])
def ms(v):
    return float(v[:-2]) if v.endswith("ms") else float(v[:-2]) / 1000 if v.endswith("us") else float(v[:-1]) * 1000
agg = {}
for _, name, rps, p99, ticks, requests, errors, rss, relay_ticks, relay_reads, relay_writes, preempted, idle, total, wrk_ms in rows:
    a = agg.setdefault(name, {"rps": [], "p99": [], "cpu": [], "relay": [], "rr": [], "rw": [], "pre": [], "idle": [], "wrk": [], "all": [], "errors": 0, "rss": 0})
    a["pre"].append(int(preempted) / int(requests)); a["idle"].append(100 * int(idle) / max(int(total), 1))
    a["rr"].append(int(relay_reads) / int(requests)); a["rw"].append(int(relay_writes) / int(requests))
    a["rps"].append(float(rps)); a["p99"].append(ms(p99))
    a["cpu"].append(int(ticks) / hz / int(requests) * 10000)
    a["relay"].append(int(relay_ticks) / hz / int(requests) * 10000)
    a["wrk"].append(int(wrk_ms) / 1000 / int(requests) * 10000)
    a["all"].append(a["cpu"][-1] + a["relay"][-1] + a["wrk"][-1])
    a["errors"] += int(errors); a["rss"] = max(a["rss"], int(rss))
print(f"\n{'proxy':18} {'req/s':>8} {'p99 ms':>7} {'CPU s/10k':>9} {'peak RSS':>9} errors {'relay CPU s/10k':>15} {'relay reads/req':>15} {'relay writes/req':>16} {'preempted/req':>13} {'idle %':>6} {'wrk CPU s/10k':>13} {'all CPU s/10k':>13}")
mean = {k: {m: statistics.mean(v[m]) for m in ("rps", "p99", "cpu", "relay", "rr", "rw", "pre", "idle", "wrk", "all")} for k, v in agg.items()}
for k, v in agg.items():
    print(f"{k:18} {mean[k]['rps']:8.0f} {mean[k]['p99']:7.2f} {mean[k]['cpu']:9.3f} {v['rss']/1024:7.1f}Mi {v['errors']:6} {mean[k]['relay']:15.3f} {mean[k]['rr']:15.2f} {mean[k]['rw']:16.2f} {mean[k]['pre']:13.3f} {mean[k]['idle']:6.1f} {mean[k]['wrk']:13.3f} {mean[k]['all']:13.3f}")
print("\nratios (mean over rounds)")
for s in [k for k in mean if k.startswith("sidecar")]:
    for n in [n for n in ("nginx-auto", "nginx-1", "nginx-1-prio") if n in mean]:
        r = {m: mean[s][m] / mean[n][m] for m in ("rps", "p99", "cpu")}
        print(f"  {s} / {n:10}  req/s {r['rps']:.2f}  p99 {r['p99']:.2f}  CPU/request {r['cpu']:.2f}")
EOF
# What the relay's connection rotations cost each sidecar over the whole run (the relay rotates
# every RELAY_KEEPALIVE_REQUESTS; once the pool has learned that limit it rotates first).
echo
echo "relay rotations (whole run)"
for name in "${names[@]}"; do
    [[ $name == sidecar* ]] || continue
    curl -s "http://127.0.0.1:$((port[$name] + 1))/metrics" | awk -v n="$name" '
        /^sprint_sidecar_requests_total/ { q += $2 }
        /^sprint_sidecar_upstream_retries_total\{reason="refused"\}/ { r = $2 }
        /^sprint_sidecar_upstream_reconnects_total / { c = $2 }
        /^sprint_sidecar_upstream_relay_request_limit / { l = $2 }
        END { printf "  %-18s %d requests, %d refused by the relay and sent again, %d reconnects, learned limit %d\n", n, q, r, c, l }'
done
