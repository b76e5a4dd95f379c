#!/usr/bin/env bash
# Builds the Host UI into ui/dist (what qx-node serves from ui.assets_dir): the TypeScript client generated from
# proto/, a type check, the Vite build, and a gzip copy of every text file (the daemon sends it to browsers that
# take gzip). Installs the npm packages from package-lock.json first when they are missing or older than it.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund >&2
fi
npx buf generate
npx tsc --noEmit
npx vite build --logLevel warn
find dist -type f \( -name '*.js' -o -name '*.css' -o -name '*.html' -o -name '*.svg' -o -name '*.map' \) \
    -exec gzip -9 -k -f {} +
# The first page's JavaScript (what index.html loads) and all of it, gzipped (the issue's budget is 300 KiB for the
# first page).
entry=$(grep -o 'assets/[^"]*\.js' dist/index.html | sed 's|^|dist/|; s|$|.gz|')
first=$(cat $entry | wc -c)
all=$(find dist/assets -name '*.js.gz' -exec cat {} + | wc -c)
echo "ui/build.sh: dist ready, JavaScript $((first / 1024)) KiB gzipped for the first page, $((all / 1024)) KiB in all" >&2
