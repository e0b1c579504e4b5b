#!/usr/bin/env python3
"""bench-table.py RESULTS.jsonl — median (min-max) per system, scenario and value size, and the
waxos/etcd ratios checked against the targets of the performance issue, at every value size."""
import json
import statistics
import sys
from collections import defaultdict

runs = defaultdict(list)
for line in open(sys.argv[1]):
    if line.strip():
        r = json.loads(line)
        runs[(r["system"], r["scenario"], r.get("value_bytes", 100))].append(r)

order = ["put_c1", "put_c64", "get_lin_c1", "get_lin_c64", "get_lin_c64_spread", "get_ser_c64", "rw50_c64",
         "put_c64_fsync_every_record"]
sizes = sorted({k[2] for k in runs})


def human(n):
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def med(rs, field):
    return statistics.median(r[field] for r in rs)


def cell(rs, field, fmt):
    vals = [r[field] for r in rs]
    return f"{fmt.format(statistics.median(vals))} ({fmt.format(min(vals))}-{fmt.format(max(vals))})"


print("| scenario | value | system | n | ops/s | p50 ms | p99 ms | errors | RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|")
for size in sizes:
    for s in order:
        for system in ("waxos", "etcd"):
            rs = runs.get((system, s, size))
            if rs:
                print(f"| {s} | {human(size)} | {system} | {len(rs)} | {cell(rs, 'ops_per_s', '{:.0f}')} "
                      f"| {cell(rs, 'p50_ms', '{:.2f}')} | {cell(rs, 'p99_ms', '{:.2f}')} "
                      f"| {sum(r['errors'] for r in rs)} | {max(r['rss_mb'] for r in rs)} |")

print()
print("| target | value | waxos | other | ratio | met |")
print("|---|---|---|---|---|---|")


def target(label, size, field, goal, a, b, higher_is_better=True):
    w, e = runs.get(a), runs.get(b)
    if not w or not e:
        return
    wv, ev = med(w, field), med(e, field)
    ratio = wv / ev if ev else float("inf")
    met = ratio >= goal if higher_is_better else ratio <= goal
    print(f"| {label} | {human(size)} | {wv:.2f} | {ev:.2f} | {ratio:.2f} | {'yes' if met else 'NO'} |")


for size in sizes:
    w = lambda s: ("waxos", s, size)  # noqa: E731
    e = lambda s: ("etcd", s, size)  # noqa: E731
    target("PUT@64 ops/s >= 2x etcd", size, "ops_per_s", 2.0, w("put_c64"), e("put_c64"))
    target("linearizable GET@64 ops/s >= 3x etcd", size, "ops_per_s", 3.0, w("get_lin_c64"), e("get_lin_c64"))
    target("PUT@1 p50 <= etcd", size, "p50_ms", 1.0, w("put_c1"), e("put_c1"), higher_is_better=False)
    target("GET@1 p50 <= etcd", size, "p50_ms", 1.0, w("get_lin_c1"), e("get_lin_c1"), higher_is_better=False)
    target("GET@64 spread >= GET@64 leader (waxos vs itself)", size, "ops_per_s", 1.0, w("get_lin_c64_spread"),
           w("get_lin_c64"))
