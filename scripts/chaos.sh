#!/usr/bin/env bash
# Long chaos runs against a real cluster (the same test as the bounded profile in
# scripts/test.sh, tests/chaos.rs, built in release mode):
#
#   scripts/chaos.sh [--duration 30m] [--nodes 3|5] [--seed S] [--min-faults N] [--clients C]
#                    [--witness]   (two endpoints and a witness: 3 nodes, the last a witness)
#
# Prints every fault as it is injected and ends with one line
#   CHAOS SUMMARY {"faults":..,"requests":..,"ok":..,"lost":0,"duplicated":0,"wrong":0,...}
# and a non-zero exit status if anything acknowledged was lost, duplicated or wrong, a cut-off
# node acknowledged a write, or the worker budget was exceeded. Re-run a failure with its seed.
set -euo pipefail
cd "$(dirname "$0")/.."
witness=0

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --duration) export HASHQ_CHAOS_DURATION=$2; shift 2 ;;
    --nodes) export HASHQ_CHAOS_NODES=$2; shift 2 ;;
    --seed) export HASHQ_CHAOS_SEED=$2; shift 2 ;;
    --min-faults) export HASHQ_CHAOS_MIN_FAULTS=$2; shift 2 ;;
    --clients) export HASHQ_CHAOS_CLIENTS=$2; shift 2 ;;
    --witness) witness=1; shift ;;
    -h|--help) usage ;;
    *) echo "chaos.sh: unknown argument $1" >&2; usage ;;
  esac
done
[[ ${HASHQ_CHAOS_NODES:-3} =~ ^[0-9]+$ && ${HASHQ_CHAOS_NODES:-3} -ge 3 ]] || { echo "chaos.sh: --nodes must be 3 or more" >&2; exit 2; }
if [[ $witness == 1 ]]; then
  [[ ${HASHQ_CHAOS_NODES:-3} == 3 ]] || { echo "chaos.sh: --witness runs 3 nodes" >&2; exit 2; }
  [[ -n ${HASHQ_CHAOS_DURATION:-} ]] && export HASHQ_CHAOS_WITNESS_DURATION=$HASHQ_CHAOS_DURATION
  [[ -n ${HASHQ_CHAOS_MIN_FAULTS:-} ]] && export HASHQ_CHAOS_WITNESS_MIN_FAULTS=$HASHQ_CHAOS_MIN_FAULTS
  exec cargo test --release --test chaos -- --nocapture chaos_with_a_witness
fi
exec cargo test --release --test chaos -- --nocapture chaos_nothing
