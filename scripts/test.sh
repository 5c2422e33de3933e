#!/usr/bin/env bash
# The test command (README.md): installs what the tests need, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo test --no-fail-fast "$@"
