#!/usr/bin/env bash
# The physical reference of the relay scenario: each line of $1 is
# "<download URL> <upload URL>"; every line is copied at the same time by a
# curl download piped into a curl upload (chunked, streamed, nothing
# buffered whole), over loopback, into the same storage simulator the daemon
# writes to. Called by `bench relay`, which times it; SERVICE_KEY is the
# storage simulator's key.
set -euo pipefail
pairs=$1
: "${SERVICE_KEY:?}"
pids=()
while read -r download upload; do
    [ -n "$download" ] || continue
    curl -sSf --no-buffer "$download" \
        | curl -sSf -o /dev/null -X POST -T - \
            -H "authorization: Bearer $SERVICE_KEY" -H "apikey: $SERVICE_KEY" \
            -H "content-type: audio/wav" -H "x-upsert: true" "$upload" &
    pids+=("$!")
done < "$pairs"
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
exit "$status"
