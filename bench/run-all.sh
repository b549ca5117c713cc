#!/usr/bin/env bash
# Every benchmark scenario in sequence on this machine, then the results
# table (markdown). Each scenario makes its own fresh bench_* database and
# runs VACUUM ANALYZE first. Takes about 20 minutes on 2 cores; the full log goes to
# bench/last-run.log.
#
# bench/run-all.sh              everything (see BENCHMARKS.md)
# BENCH_SERVER_URL=postgres://user@host:5432 bench/run-all.sh
# BENCH_KEEP_DATABASES=1 bench/run-all.sh   keeps the bench_* databases
set -euo pipefail
cd "$(dirname "$0")/.."
log=bench/last-run.log
: > "$log"

cargo build --release --locked --workspace --bins
[ -x bench/peers/node_modules/node/bin/node ] || bench/install-peers.sh

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "cores (nproc): $(nproc)"
    echo "memory (free -h): $(free -h | awk '/^Mem:/ {print $2 " total, " $7 " available"}')"
    echo "PostgreSQL: $(psql --version)"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee -a "$log"

step() {
    echo "== $*" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log"
}
step bench/queue.sh
step target/release/bench latency
step target/release/bench ingest
step target/release/bench playable
step target/release/bench relay
step target/release/bench relay --recordings 10 --size-mb 10
step target/release/bench relay --recordings 10 --size-mb 1
step target/release/bench backlog
step target/release/bench backlog --mb-per-second 40
step target/release/bench dbcost
step target/release/bench instructions
step target/release/bench history
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"

# The scenarios' databases, unless asked to keep them for a look.
if [ -z "${BENCH_KEEP_DATABASES:-}" ]; then
    server=${BENCH_SERVER_URL:-postgres://postgres@127.0.0.1:5432}
    for db in $(psql "$server/postgres" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'bench\_%'"); do
        psql "$server/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"
    done
fi

echo
echo "| scenario | measure | recording-relay | reference | ratio | target |"
echo "| --- | --- | --- | --- | --- | --- |"
grep '^TABLE|' "$log" | awk -F'|' '{printf "| %s | %s | %s | %s | %s | %s |\n", $2, $3, $4, $5, $6, $7}'
