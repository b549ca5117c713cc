#!/usr/bin/env bash
# Queue throughput, side by side in one run: recording-relay's worker, then
# graphile-worker 0.17.3 (batched and unbatched) and pg-boss 12, each on a
# fresh database with VACUUM ANALYZE before it starts, then PostgreSQL's
# floor for our table. Prints each figure and the TABLE| rows with ratios.
#
# bench/queue.sh [JOBS]      (default 200000)
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-200000}
SERVER=${BENCH_SERVER_URL:-postgres://postgres@127.0.0.1:5432}
BENCH=target/release/bench
PEERS=bench/peers
NODE22=$PEERS/node_modules/node/bin/node

[ -x "$BENCH" ] && [ -x target/release/recording-relay ] || cargo build --release --workspace --bins
[ -x "$NODE22" ] || bench/install-peers.sh

results=$(mktemp)
trap 'rm -f "$results"' EXIT
run() { "$@" | tee -a "$results"; }

# Ours, tuned: 2 processes x 250 jobs in flight (claims of up to 250 rows).
run "$BENCH" queue --jobs "$JOBS" --processes 2 --concurrency 250
# Ours in graphile-worker's perf-test shape: 4 processes x 24.
"$BENCH" queue --jobs "$JOBS" --processes 4 --concurrency 24 | sed 's/^RESULT queue recording-relay /RESULT queue recording-relay-4x24 /' | tee -a "$results"
run "$NODE22" $PEERS/graphile.mjs "$SERVER" "$JOBS" 4 24 batched
run "$NODE22" $PEERS/graphile.mjs "$SERVER" "$JOBS" 4 24 unbatched
run "$NODE22" $PEERS/pgboss.mjs "$SERVER" "$JOBS" 4 24
# PostgreSQL's floor for our table: the same row changes, set-wise.
run "$BENCH" queue --jobs "$JOBS" --floor

awk '
  /^RESULT queue / { rate[$3] = $4 }
  END {
    ours = rate["recording-relay"]; shape = rate["recording-relay-4x24"]
    split("graphile-worker-batched graphile-worker-unbatched pg-boss", peers, " ")
    for (i = 1; i <= 3; i++) {
      p = peers[i]; if (!(p in rate)) continue
      target = (p == "graphile-worker-batched") ? ">= 1.00" : "-"
      printf "TABLE|queue|jobs/s, ours 2x250 vs %s 4x24|%d|%d|%.2f|%s\n", p, ours, rate[p], ours / rate[p], target
    }
    for (i = 1; i <= 3; i++) {
      p = peers[i]; if (!(p in rate)) continue
      printf "TABLE|queue|jobs/s, ours 4x24 vs %s 4x24|%d|%d|%.2f|-\n", p, shape, rate[p], shape / rate[p]
    }
    if ("sql-floor" in rate)
      printf "TABLE|queue|jobs/s, ours 2x250 vs SQL floor (same row changes as 2 set-wise UPDATEs)|%d|%d|%.2f|>= 0.80\n", ours, rate["sql-floor"], ours / rate["sql-floor"]
  }' "$results"
