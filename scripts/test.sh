#!/usr/bin/env bash
# Set-up command 2: install, then run the whole test suite (arguments go to pytest,
# e.g. -m "not slow" for the quick part).
source "$(dirname "$0")/_venv.sh"
exec python -m pytest "$@"
