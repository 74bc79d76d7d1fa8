#!/usr/bin/env bash
# Set-up command 1: install, generate the demo plates, analyse them into SQLite, print
# the ranked hits, then serve the dashboard (interactive terminals only; pass
# --no-dashboard to skip it). Extra arguments go to `phenoscreen demo`.
source "$(dirname "$0")/_venv.sh"
serve=1
args=()
for arg in "$@"; do
  if [ "$arg" = "--no-dashboard" ]; then serve=0; else args+=("$arg"); fi
done
phenoscreen demo "${args[@]}"
if [ "$serve" = 1 ] && [ -t 0 ] && [ -t 1 ]; then
  exec phenoscreen dashboard --db "sqlite:///$PWD/demo_output/phenoscreen.db"
fi
