#!/usr/bin/env bash
# The one test command (the README and .ci/run call it): formatting, lints, unit tests, the
# openraft storage conformance suite, and the end-to-end tests that run real `hashq`
# processes on loopback. Fails loudly on the first problem.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
export RUST_BACKTRACE=1
# A clean clone (CI) gains nothing from incremental compilation, and its caches took 2 of the
# 7 GB a run left in target/; CI once ran out of disk while linking.
if [[ ${CI:-} == true ]]; then export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}; fi
step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }
locked=()
[[ -f Cargo.lock ]] && locked=(--locked)
# Everything is built and tested with the EC2 launcher (the `ec2` feature); the build without
# it, which `scripts/cluster.sh up` makes, is linted and unit-tested on its own below.
ec2=(--features ec2)

die() { echo "test.sh: $*" >&2; exit 1; }
command -v cargo >/dev/null || die "cargo is not installed"

# What the tests need besides Rust, installed here on a fresh machine.
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
have_chromium() { command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null; }
if ! have_chromium; then
  step "installing Debian's chromium (the dashboard test runs in headless Chromium)"
  command -v apt-get >/dev/null || die "no chromium and no apt-get to install it; install Chromium and re-run"
  as_root apt-get update -qq || die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || die "could not install chromium"
  have_chromium || die "chromium is still missing after installing it"
fi

# tests/powercut.rs mounts the nodes' data dirs on hashq-faultfs (FUSE): it needs /dev/fuse
# and, to unmount as a fallback, fusermount3 (Debian's fuse3).
[[ -e /dev/fuse ]] || die "no /dev/fuse: the power-cut tests need FUSE (load the fuse module)"
if ! command -v fusermount3 >/dev/null; then
  step "installing Debian's fuse3 (the power-cut tests mount a FUSE file system)"
  command -v apt-get >/dev/null || die "no fusermount3 and no apt-get to install fuse3"
  as_root apt-get update -qq || die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null || die "could not install fuse3"
fi

# tests/ec2.rs runs the EC2 paths against moto_server (an EC2 API on loopback) and runs
# scripts/deploy-ec2.sh, which needs the AWS CLI. Install them from PyPI when missing.
if ! command -v moto_server >/dev/null || ! command -v aws >/dev/null; then
  step "installing moto[server] and awscli from PyPI"
  python3 -m pip install --quiet 'moto[server]' awscli ||
    { echo "test.sh: cannot install moto[server] and awscli with pip (python3 -m pip)" >&2; exit 1; }
  if command -v pyenv >/dev/null; then pyenv rehash; fi
  hash -r
fi
# tests/schemathesis.rs fuzzes the client API from its OpenAPI document.
if ! command -v schemathesis >/dev/null; then
  step "installing schemathesis from PyPI"
  python3 -m pip install --quiet schemathesis ||
    { echo "test.sh: cannot install schemathesis with pip (python3 -m pip)" >&2; exit 1; }
  if command -v pyenv >/dev/null; then pyenv rehash; fi
  hash -r
fi
for tool in moto_server aws schemathesis; do
  command -v "$tool" >/dev/null ||
    { echo "test.sh: $tool is not on PATH (pip installed it where PATH does not look)" >&2; exit 1; }
done

step "cargo fmt --check"
cargo fmt --all -- --check

step "clippy -D warnings"
cargo clippy --workspace --all-targets "${ec2[@]}" "${locked[@]}" -- -D warnings

step "unit tests and storage conformance"
cargo test --workspace --lib "${ec2[@]}" "${locked[@]}"

step "the build without EC2 (what scripts/cluster.sh up makes): clippy, and unit tests with TLS"
cargo clippy --workspace --lib --bins "${locked[@]}" -- -D warnings
# Its unit tests run with TLS on (what `scripts/cluster.sh up --tls` builds): that test graph
# shares all but a few crates with the EC2 one above (26 s to build here), where the build
# without TLS would compile a second graph (16 minutes). The clippy run above checks the
# build without TLS, whose only own code is hashq-tls's stub.
cargo test --workspace --lib --features tls "${locked[@]}"
if cargo tree -p hashq -e normal "${locked[@]}" | grep -qE 'aws-(sdk|config)'; then
  die "the default build links the AWS SDK: keep it behind the ec2 feature"
fi

step "the power-cut file system's own tests (a real FUSE mount)"
cargo test -p hashq-faultfs --test fuse "${locked[@]}"

step "end-to-end tests (real hashq processes on loopback, one test at a time)"
# The power-cut tests run hashq-faultfs, a binary of its own crate: build it beside hashq.
cargo build -p hashq-faultfs "${locked[@]}"
cargo test --test '*' "${ec2[@]}" "${locked[@]}" --no-run

# tests/rolling.rs upgrades a cluster of the previous release's binary to this one, node by
# node. Releases are git tags; the commit is named too, for a clone made without tags. It is
# built from its own tree into this target dir, after the end-to-end build above and as
# that build is made (its hashq binary with one of its tests, so that its dev-dependencies
# unify the dependencies' features the same way; the same profile settings): every
# dependency but the two whose features changed is shared, and only our crates compile
# (built alone, its binary recompiled the whole AWS SDK: 13 minutes more in CI). Cargo
# names a path crate's artifacts by its name and version, not by its directory, so the old
# tree's crates get a version of their own ("-previous") or they would take this tree's
# artifacts for theirs. Its uplifted target/debug/hashq replaces this tree's, which is
# put back.
previous_release=v0.3.0 previous_commit=230bcc7dd1290c11f70392908ed26ef0b296d8cc
echo "building the previous release's binary ($previous_release), for the rolling upgrade test"
git rev-parse -q --verify "$previous_commit^{commit}" >/dev/null ||
  die "commit $previous_commit ($previous_release) is not in this clone; clone the whole history (git fetch --unshallow)"
target_dir=$(cargo metadata --format-version 1 --no-deps "${locked[@]}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
previous_src="$target_dir/previous-release/$previous_release"
if [[ ! -f $previous_src/Cargo.toml ]]; then
  mkdir -p "$previous_src"
  git archive "$previous_commit" | tar -x -C "$previous_src"
  sed -i "0,/^version = .*/s//version = \"${previous_release#v}-previous\"/" "$previous_src/Cargo.toml"
fi
# Not --locked: the lock file takes the crates' new version (and nothing else changes).
mv "$target_dir/debug/hashq" "$target_dir/previous-release/hashq-this"
(cd "$previous_src" && CARGO_TARGET_DIR="$target_dir" cargo build --bin hashq --test rolling "${ec2[@]}" \
  --config 'profile.dev.package."*".debug = 0') || die "building $previous_release failed"
rm -f "$target_dir/previous-release/hashq"
mv "$target_dir/debug/hashq" "$target_dir/previous-release/hashq"
mv "$target_dir/previous-release/hashq-this" "$target_dir/debug/hashq"
export HASHQ_PREVIOUS_BIN="$target_dir/previous-release/hashq"
"$HASHQ_PREVIOUS_BIN" --version

cargo test --test '*' "${ec2[@]}" "${locked[@]}" -- --test-threads=1 --skip chaos_

# The chaos profile prints its seed, each fault and its CHAOS SUMMARY line, so a CI log
# shows what was injected and a failure can be replayed (HASHQ_CHAOS_SEED).
step "chaos suite, bounded profile"
cargo test --test chaos "${ec2[@]}" "${locked[@]}" -- --nocapture --test-threads=1

step "all tests passed"
