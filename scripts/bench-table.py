#!/usr/bin/env python3
"""bench-table.py RESULTS.jsonl — median (min-max) per system and scenario, and waxos/etcd
ratios checked against the targets of the performance issue."""
import json
import statistics
import sys
from collections import defaultdict

runs = defaultdict(list)
for line in open(sys.argv[1]):
    if line.strip():
        r = json.loads(line)
        runs[(r["system"], r["scenario"])].append(r)

order = ["put_c1", "put_c64", "get_lin_c64", "get_ser_c64", "rw50_c64"]


def med(rs, field):
    return statistics.median(r[field] for r in rs)


def cell(rs, field, fmt):
    vals = [r[field] for r in rs]
    return f"{fmt.format(statistics.median(vals))} ({fmt.format(min(vals))}-{fmt.format(max(vals))})"


print(f"| scenario | system | n | ops/s | p50 ms | p99 ms | errors | RSS MiB |")
print("|---|---|---|---|---|---|---|---|")
for s in order:
    for system in ("waxos", "etcd"):
        rs = runs.get((system, s))
        if rs:
            print(f"| {s} | {system} | {len(rs)} | {cell(rs, 'ops_per_s', '{:.0f}')} | {cell(rs, 'p50_ms', '{:.2f}')} "
                  f"| {cell(rs, 'p99_ms', '{:.2f}')} | {sum(r['errors'] for r in rs)} | {max(r['rss_mb'] for r in rs)} |")

print()
print("| target | waxos | etcd | ratio | met |")
print("|---|---|---|---|---|")


def target(label, scenario, field, goal, higher_is_better=True):
    w, e = runs.get(("waxos", scenario)), runs.get(("etcd", scenario))
    if not w or not e:
        return
    wv, ev = med(w, field), med(e, field)
    ratio = wv / ev if ev else float("inf")
    met = ratio >= goal if higher_is_better else ratio <= goal
    print(f"| {label} | {wv:.2f} | {ev:.2f} | {ratio:.2f} | {'yes' if met else 'NO'} |")


target("PUT 64 clients ops/s >= 1.5x", "put_c64", "ops_per_s", 1.5)
target("PUT 64 clients p99 <= etcd", "put_c64", "p99_ms", 1.0, higher_is_better=False)
target("linearizable GET 64 ops/s >= 3x", "get_lin_c64", "ops_per_s", 3.0)
target("PUT 1 client p50 <= etcd", "put_c1", "p50_ms", 1.0, higher_is_better=False)
target("serializable GET 64 ops/s (no target)", "get_ser_c64", "ops_per_s", 0.0)
target("mixed 50/50 64 ops/s (no target)", "rw50_c64", "ops_per_s", 0.0)
