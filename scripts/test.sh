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

# tests/ec2.rs runs the EC2 paths against moto_server (an EC2 API on loopback) and runs
# scripts/deploy-ec2.sh, which needs the AWS CLI. Install them from PyPI when missing.
if ! command -v moto_server >/dev/null || ! command -v aws >/dev/null; then
  step "installing moto[server] and awscli from PyPI"
  python3 -m pip install --quiet 'moto[server]' awscli ||
    { echo "test.sh: cannot install moto[server] and awscli with pip (python3 -m pip)" >&2; exit 1; }
  if command -v pyenv >/dev/null; then pyenv rehash; fi
  hash -r
fi
for tool in moto_server aws; do
  command -v "$tool" >/dev/null ||
    { echo "test.sh: $tool is not on PATH (pip installed it where PATH does not look)" >&2; exit 1; }
done

step "cargo fmt --check"
cargo fmt --all -- --check

step "clippy -D warnings"
cargo clippy --workspace --all-targets "${locked[@]}" -- -D warnings

step "unit tests and storage conformance"
cargo test --workspace --lib "${locked[@]}"

step "end-to-end tests (real hashq processes on loopback, one test at a time)"
cargo test --test '*' "${locked[@]}" -- --test-threads=1

step "all tests passed"
