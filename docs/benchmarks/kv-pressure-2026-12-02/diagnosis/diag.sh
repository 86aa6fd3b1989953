#!/bin/bash
# diag.sh POLICY OUT: start the KV-pressure bench's deployment file for POLICY (kv_aware | prefix_affinity;
# block size 32, 96 KV blocks per replica, 2 replicas) with `mistral-ray run`, run the chat level of the
# KV-pressure bench against it, and keep the head's metrics (Ray's exporter) in OUT.metrics.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../../../.."
TMP=$(mktemp -d)
printf 'bench:sk-bench-0000000000000000\n' > "$TMP/api-keys"
sed "s|file: .*api-keys|file: $TMP/api-keys|" "$HERE/ours-$1.yaml" > "$TMP/ours.yaml"
PORT=$(awk '/^http_options/{f=1} f&&/port:/{print $2; exit}' "$TMP/ours.yaml")
MPORT=$(awk '/metrics_export_port:/{print $2; exit}' "$TMP/ours.yaml")
.venv/bin/mistral-ray run "$TMP/ours.yaml" > "$2.run.log" 2>&1 &
PID=$!
for i in $(seq 1 120); do grep -q "mistral-ray ready" "$2.run.log" && break; sleep 2; done
sleep 20  # both replicas in HAProxy's map
.venv/bin/mistral-ray bench "http://127.0.0.1:$PORT" --target "$1" --workload chat --conversations 48 --turns 4 \
    --system-words 30 --user-words 60 --output-len 32 --concurrency 8 --no-progress > "$2.bench.log" 2>&1
sleep 12  # a metrics report interval and more
curl -s "http://127.0.0.1:$MPORT/metrics" > "$2.metrics"
kill -TERM $PID; wait $PID
rm -rf "$TMP"
