#!/usr/bin/env bash
# The one test command (the README and .ci/run call it): formatting, lints, unit tests, the
# openraft storage conformance suite, and the end-to-end tests that run real `hashq`
# processes on loopback. Fails loudly on the first problem.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
export RUST_BACKTRACE=1
locked=()
[[ -f Cargo.lock ]] && locked=(--locked)

step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }

command -v cargo >/dev/null || { echo "test.sh: cargo is not installed" >&2; exit 1; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "clippy -D warnings"
cargo clippy --workspace --all-targets "${locked[@]}" -- -D warnings

step "unit tests and storage conformance"
cargo test --workspace --lib "${locked[@]}"

step "end-to-end tests (real hashq processes on loopback, one test at a time)"
cargo test --test '*' "${locked[@]}" -- --test-threads=1

step "all tests passed"
