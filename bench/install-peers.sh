#!/usr/bin/env bash
# Installs the peer job queues (graphile-worker 0.17.3, pg-boss 12) and the
# Node 22 that pg-boss 12 needs (the `node` npm package) from npm, as pinned
# in bench/peers/package-lock.json.
set -euo pipefail
cd "$(dirname "$0")/peers"
npm ci --no-audit --no-fund
# The node package fetches its platform binary in a preinstall script.
[ -x node_modules/node/bin/node ] && node_modules/node/bin/node --version >/dev/null 2>&1 || npm rebuild node
node_modules/node/bin/node --version
