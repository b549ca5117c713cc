#!/usr/bin/env bash
# One physical reference of the relay and backlog scenarios: each line of $1
# is "<download URL> <upload URL>"; each line is copied by a curl download
# piped into a curl upload (chunked, streamed, nothing buffered whole), over
# loopback (or the bench's paced links, when the URLs name them), into the
# same storage simulator the daemon writes to. $2, when given, is how many
# copies run at a time (the daemon's concurrency); without it, or 0, every
# line runs at once (xargs -P 0). Called by `bench relay` and `bench
# backlog`, which time it; SERVICE_KEY is the storage simulator's key.
set -euo pipefail
pairs=$1
parallel=${2:-0}
: "${SERVICE_KEY:?}"
export SERVICE_KEY
copy='curl -sSf --no-buffer "$0" | curl -sSf -o /dev/null -X POST -T - -H "authorization: Bearer $SERVICE_KEY" -H "apikey: $SERVICE_KEY" -H "content-type: audio/wav" -H "x-upsert: true" "$1"'
# xargs runs `bash -c "$copy" DOWNLOAD UPLOAD` per line, $parallel at once,
# and exits non-zero if any copy failed.
xargs -P "$parallel" -L 1 bash -o pipefail -c "$copy" < "$pairs"
