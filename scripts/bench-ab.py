#!/usr/bin/env python3
"""Alternating pairs of `hashq bench --enqueue-only`: two builds (or two settings of one
build) take turns, ABBA, so that the machine's drift falls on both.

    scripts/bench-ab.py OUT PAIRS RUNS LABEL=BIN[:ENV=VALUE,...] LABEL=BIN[:ENV=VALUE,...]

For example, two batches in flight against four, four pairs:

    scripts/bench-ab.py ab.txt 4 1:1024,64:1024 \\
        four=target/release/hashq:HASHQ_PROPOSALS_IN_FLIGHT=4 \\
        two=target/release/hashq:HASHQ_PROPOSALS_IN_FLIGHT=2

Each run appends one line to OUT: per enqueue run, the rate, the p50 and the node CPU per
request (the three nodes' CPU percentages over the rate) and the machine's idle and stolen
CPU shares (a pair whose runs differ in steal says more about the hypervisor than about the
builds). The nodes inherit the environment, so any `HASHQ_*` setting reaches them.
"""
import json
import os
import subprocess
import sys


def main() -> None:
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    out, pairs, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    variants = []
    for arg in sys.argv[4:]:
        label, spec = arg.split("=", 1)
        binary, _, settings = spec.partition(":")
        env = dict(os.environ)
        for kv in filter(None, settings.split(",")):
            k, v = kv.split("=", 1)
            env[k] = v
        variants.append((label, binary, env))
    with open(out, "a") as f:
        for p in range(pairs):
            for label, binary, env in variants if p % 2 == 0 else variants[::-1]:
                r = subprocess.run(
                    [binary, "bench", "--enqueue-only", "--seconds", "10", "--runs", runs],
                    env=env, capture_output=True, text=True,
                )
                try:
                    figures = json.loads(r.stdout)["enqueue"]
                except (ValueError, KeyError):
                    f.write(f"{label} FAILED {r.stderr[-500:]}\n")
                    f.flush()
                    continue
                parts = []
                for e in figures:
                    rate = e["per_second"]
                    cpu = sum(e["resources"]["cpu_percent_by_node"])
                    per_req = cpu * 1e4 / rate if rate else 0
                    machine = e["resources"].get("machine_cpu_percent") or {}
                    parts.append(
                        f"{e['clients']}x{e['payload_bytes']}: {rate}/s "
                        f"p50 {e['latency_ms']['p50']:.2f} ms, {per_req:.0f} us CPU/req, "
                        f"idle {machine.get('idle', '?')}% steal {machine.get('steal', '?')}%"
                    )
                f.write(f"{label} " + " | ".join(parts) + "\n")
                f.flush()


if __name__ == "__main__":
    main()
