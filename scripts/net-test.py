#!/usr/bin/env python3
"""net-test.py: the clients and the nemesis of `just test-net` (scripts/test-net.sh starts the
five containers, this drives them, waxos-check-history checks what it recorded).

Clients: WORKERS threads of Python grpcio (stubs generated from proto/waxos.proto, as
scripts/probe-grpcio.py does) send single-attempt PUT / linearizable GET / DELETE to random
hosts, at each container's own address, for DURATION seconds. Each operation is recorded, Jepsen's
way, as an `invoke` event and then `ok`, `fail` (certainly without effect: a read that failed, a
write refused as invalid or that never reached a host) or `info` (unknown: a timeout or any other
error of a write, which may still apply); a process that saw `info` continues as a new process.
Keys are used for at most KEY_OPS operations each, then replaced (the checker's per-key limit).

Nemesis (one fault at a time, with quiet gaps, kinds in shuffled rounds so each kind occurs):
partitions made with iptables DROP rules in the DOCKER-USER chain between the containers'
addresses, tagged with the run's comment so they can always be removed: a node isolated both
ways, a 2|3 split, one-way cuts (a node that hears nothing, one whose sends are lost, one directed
link), the leader half the time; `docker kill` of one node or two (then `docker start`); and a
rolling hot swap across the five (`waxos … swap BUILD`, signed), alternating two builds.

At the end: every fault healed, every container started, every host serving; then every key
ever used is read back (a linearizable GET recorded in the history like any other), and the
counts are printed. Exit 1 if a key cannot be read back.
"""
import argparse
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request


def load_stubs():
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("probe_grpcio", os.path.join(here, "probe-grpcio.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe.stubs()


def log(msg):
    print(f"{time.strftime('%H:%M:%S')} net-test: {msg}", file=sys.stderr, flush=True)


class History:
    def __init__(self, path):
        self.f = open(path, "w")
        self.lock = threading.Lock()
        self.counts = {"ok": 0, "fail": 0, "info": 0}
        self.writes_ok = 0

    def event(self, process, kind, f, key, time_ns, value=None, existed=None):
        e = {"process": process, "type": kind, "f": f, "key": key, "time": time_ns}
        if value is not None or (f == "get" and kind == "ok"):
            e["value"] = value
        if existed is not None:
            e["existed"] = existed
        with self.lock:
            self.f.write(json.dumps(e) + "\n")
            if kind in self.counts:
                self.counts[kind] += 1
                if kind == "ok" and f != "get":
                    self.writes_ok += 1

    def close(self):
        self.f.close()


class Cluster:
    def __init__(self, args, pb2, pb2_grpc):
        import grpc

        self.grpc = grpc
        self.pb2 = pb2
        self.args = args
        self.ips = args.ips.split(",")
        self.names = [f"{args.run}-{n + 1}" for n in range(len(self.ips))]
        read = lambda p: open(p, "rb").read()
        pki = args.pki
        creds = grpc.ssl_channel_credentials(read(f"{pki}/ca.pem"), read(f"{pki}/client.key"), read(f"{pki}/client.pem"))
        opts = [
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self.ports = [50051 + i for i in range(len(self.ips))]  # host N serves on 5005N
        self.stubs = [pb2_grpc.KeyValueStub(grpc.secure_channel(f"{ip}:{port}", creds, options=opts))
                      for ip, port in zip(self.ips, self.ports)]
        self.down = set()  # indexes of containers killed by the nemesis
        self.rules = []  # iptables rules in force: (src ip, dst ip)
        self.lock = threading.Lock()

    # --- observation ---
    def metrics(self, i):
        try:
            with urllib.request.urlopen(f"http://{self.ips[i]}:9100/metrics", timeout=1) as r:
                text = r.read().decode()
        except Exception:
            return {}
        out = {}
        for line in text.splitlines():
            m = re.match(r"^(waxos_[a-z_]+) (-?[0-9.e+]+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def leader(self):
        """Index of a container whose guest leads, or None."""
        for i in range(len(self.ips)):
            if i not in self.down and self.metrics(i).get("waxos_is_leader") == 1:
                return i
        return None

    def leaders(self):
        """Containers (1-based) whose guest says it leads, for the log."""
        return [i + 1 for i in range(len(self.ips)) if i not in self.down and self.metrics(i).get("waxos_is_leader") == 1]

    def all_serving(self):
        return all(self.metrics(i).get("waxos_serving") == 1 for i in range(len(self.ips)))

    # --- faults ---
    def drop(self, src, dst):
        rule = ["DOCKER-USER", "-s", self.ips[src], "-d", self.ips[dst], "-m", "comment", "--comment", self.args.run, "-j", "DROP"]
        subprocess.run(["iptables", "-I"] + rule, check=True)
        with self.lock:
            self.rules.append(rule)

    def heal(self):
        with self.lock:
            rules, self.rules = self.rules, []
        for rule in rules:
            subprocess.run(["iptables", "-D"] + rule, check=False, stderr=subprocess.DEVNULL)

    def kill(self, i):
        subprocess.run(["docker", "kill", self.names[i]], check=True, stdout=subprocess.DEVNULL)
        self.down.add(i)

    def start(self, i):
        subprocess.run(["docker", "start", self.names[i]], check=True, stdout=subprocess.DEVNULL)
        self.down.discard(i)

    def swap(self, i, build):
        pki = self.args.pki
        cmd = [self.args.waxos, "--cacert", f"{pki}/ca.pem", "--cert", f"{pki}/operator.pem", "--key", f"{pki}/operator.key",
               "--timeout-ms", "10000", self.ips[i], str(self.ports[i]), "swap", build]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RUST_LOG="warn"))
        return r.returncode == 0, (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]


def worker(wid, cluster, history, keys, stop, args, pids):
    pb2 = cluster.pb2
    grpc = cluster.grpc
    rng = random.Random(args.seed * 1000 + wid)
    process = pids.next()
    seq = 0
    while not stop.is_set():
        key = keys.pick(rng)
        if key is None:
            time.sleep(0.01)
            continue
        r = rng.random()
        f = "put" if r < 0.45 else "get" if r < 0.9 else "delete"
        seq += 1
        value = f"{process}-{seq}" if f == "put" else None
        node = rng.randrange(len(cluster.stubs))
        stub = cluster.stubs[node]
        history.event(process, "invoke", f, key, time.monotonic_ns(), value=value)
        try:
            if f == "put":
                stub.Put(pb2.PutRequest(key=key, value=value.encode(), client_id=process, seq=seq), timeout=args.op_timeout)
                history.event(process, "ok", f, key, time.monotonic_ns(), value=value)
            elif f == "get":
                resp = stub.Get(pb2.GetRequest(key=key, client_id=process, seq=seq), timeout=args.op_timeout)
                history.event(process, "ok", f, key, time.monotonic_ns(), value=resp.value.decode() if resp.found else None)
            else:
                resp = stub.Delete(pb2.DeleteRequest(key=key, client_id=process, seq=seq), timeout=args.op_timeout)
                history.event(process, "ok", f, key, time.monotonic_ns(), existed=resp.existed)
        except grpc.RpcError as e:
            code, details = e.code(), (e.details() or "")
            never_sent = code == grpc.StatusCode.UNAVAILABLE and re.search(
                r"failed to connect|Connection refused|No route to host|DNS resolution failed", details)
            if f == "get" or code == grpc.StatusCode.INVALID_ARGUMENT or never_sent:
                history.event(process, "fail", f, key, time.monotonic_ns())
            else:
                history.event(process, "info", f, key, time.monotonic_ns())
                process = pids.next()
                seq = 0
        time.sleep(args.think)


class Pids:
    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()

    def next(self):
        with self.lock:
            self.n += 1
            return self.n


class Keys:
    """Active keys; each used for at most `limit` operations (one more is kept for the read-back)."""

    def __init__(self, active, limit):
        self.limit = limit
        self.used = {}
        self.active = []
        self.lock = threading.Lock()
        self.made = 0
        for _ in range(active):
            self.active.append(self._fresh())

    def _fresh(self):
        self.made += 1
        key = f"k{self.made}"
        self.used[key] = 0
        return key

    def pick(self, rng):
        with self.lock:
            i = rng.randrange(len(self.active))
            key = self.active[i]
            self.used[key] += 1
            if self.used[key] >= self.limit:
                self.active[i] = self._fresh()
            return key


def nemesis(cluster, stop_at, args, counts, builds):
    rng = random.Random(args.seed)
    n = len(cluster.ips)
    kinds = ["isolate", "split", "one-way-in", "one-way-out", "one-way-link", "kill", "kill-two", "swap-roll"]
    round_ = []
    swap_turn = 0

    def target():
        leader = cluster.leader()
        if leader is not None and rng.random() < 0.5:
            return leader, "leader"
        i = rng.randrange(n)
        return i, "leader" if i == leader else "follower"

    time.sleep(args.quiet)
    while time.time() < stop_at - args.hold - 2:
        if not round_:
            round_ = kinds[:]
            rng.shuffle(round_)
        kind = round_.pop()
        hold = rng.uniform(args.hold * 0.6, args.hold)
        if kind == "isolate":
            i, who = target()
            for j in range(n):
                if j != i:
                    cluster.drop(i, j)
                    cluster.drop(j, i)
            log(f"fault: isolate node {i + 1} ({who}) both ways for {hold:.1f} s")
        elif kind == "split":
            nodes = list(range(n))
            rng.shuffle(nodes)
            a, b = nodes[:2], nodes[2:]
            for i in a:
                for j in b:
                    cluster.drop(i, j)
                    cluster.drop(j, i)
            log(f"fault: split {sorted(x + 1 for x in a)} | {sorted(x + 1 for x in b)} for {hold:.1f} s")
        elif kind == "one-way-in":
            i, who = target()
            for j in range(n):
                if j != i:
                    cluster.drop(j, i)
            log(f"fault: node {i + 1} ({who}) hears nobody (its sends still arrive) for {hold:.1f} s")
        elif kind == "one-way-out":
            i, who = target()
            for j in range(n):
                if j != i:
                    cluster.drop(i, j)
            log(f"fault: node {i + 1} ({who}) is heard by nobody (it still hears) for {hold:.1f} s")
        elif kind == "one-way-link":
            i, who = target()
            j = rng.choice([x for x in range(n) if x != i])
            cluster.drop(i, j)
            log(f"fault: link {i + 1} ({who}) -> {j + 1} cut one way for {hold:.1f} s")
        elif kind == "kill":
            i, who = target()
            cluster.kill(i)
            log(f"fault: kill node {i + 1} ({who}) for {hold:.1f} s")
        elif kind == "kill-two":
            victims = rng.sample(range(n), 2)
            for i in victims:
                cluster.kill(i)
            log(f"fault: kill nodes {sorted(x + 1 for x in victims)} for {hold:.1f} s")
        elif kind == "swap-roll":
            build = builds[swap_turn % len(builds)]
            swap_turn += 1
            t0 = time.time()
            done = 0
            for i in range(n):
                ok, last = cluster.swap(i, build)
                done += ok
                if not ok:
                    log(f"swap at node {i + 1} failed: {last[0]}")
                time.sleep(1)
            counts["swaps"] = counts.get("swaps", 0) + done
            log(f"fault: rolled {os.path.basename(build)} through the five hosts ({done}/5 swapped) in {time.time() - t0:.1f} s")
            counts[kind] = counts.get(kind, 0) + 1
            time.sleep(args.quiet)
            continue
        counts[kind] = counts.get(kind, 0) + 1
        before = cluster.leaders()
        time.sleep(hold)
        during = cluster.leaders()
        if during != before:
            counts["leader moved"] = counts.get("leader moved", 0) + 1
        cluster.heal()
        for i in sorted(cluster.down):
            cluster.start(i)
        log(f"healed (leading: {before or 'none'} at the fault, {during or 'none'} at its end)")
        time.sleep(rng.uniform(args.quiet * 0.6, args.quiet))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="the run's name: containers RUN-1..RUN-5, iptables comment RUN")
    ap.add_argument("--ips", required=True, help="the five containers' addresses, comma-separated")
    ap.add_argument("--pki", required=True, help="the run's PKI directory (ca, client, operator)")
    ap.add_argument("--waxos", default="./target/release/waxos")
    ap.add_argument("--builds", required=True, help="signed guest builds the rolling swap alternates, comma-separated")
    ap.add_argument("--history", required=True, help="where to write the history (JSON lines)")
    ap.add_argument("--duration", type=float, default=150, help="seconds of load and faults")
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--think", type=float, default=0.02, help="seconds each worker waits between operations")
    ap.add_argument("--op-timeout", type=float, default=2.5, help="seconds per operation (then: indeterminate)")
    ap.add_argument("--hold", type=float, default=8, help="longest a fault lasts, seconds")
    ap.add_argument("--quiet", type=float, default=4, help="longest gap between faults, seconds")
    ap.add_argument("--keys", type=int, default=12, help="keys in use at once")
    ap.add_argument("--key-ops", type=int, default=60, help="operations per key before it is replaced")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    pb2, pb2_grpc = load_stubs()
    cluster = Cluster(args, pb2, pb2_grpc)
    history = History(args.history)
    log(f"seed {args.seed}; {args.workers} clients for {args.duration:.0f} s against {args.ips}")
    start = time.time()
    stop_at = start + args.duration
    stop = threading.Event()
    keys = Keys(args.keys, args.key_ops)
    pids = Pids()
    counts = {}
    threads = [threading.Thread(target=worker, args=(w, cluster, history, keys, stop, args, pids), daemon=True)
               for w in range(args.workers)]
    for t in threads:
        t.start()
    try:
        nemesis(cluster, stop_at, args, counts, args.builds.split(","))
        while time.time() < stop_at:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=args.op_timeout + 5)
        cluster.heal()
        for i in sorted(cluster.down):
            cluster.start(i)
    load_seconds = time.time() - start
    # Every host serving again, then every key read back.
    t0 = time.time()
    while not cluster.all_serving() and time.time() - t0 < 60:
        time.sleep(0.5)
    log(f"all five serving {time.time() - t0:.1f} s after the last heal" if cluster.all_serving()
        else "not every host serves 60 s after the last heal (reading back anyway)")
    reader = pids.next()
    unread = []
    rng = random.Random(args.seed)
    for seq, key in enumerate(sorted(keys.used), start=1):
        for attempt in range(20):
            node = rng.randrange(len(cluster.stubs))
            history.event(reader, "invoke", "get", key, time.monotonic_ns())
            try:
                resp = cluster.stubs[node].Get(pb2.GetRequest(key=key, client_id=reader, seq=seq), timeout=5)
                history.event(reader, "ok", "get", key, time.monotonic_ns(), value=resp.value.decode() if resp.found else None)
                break
            except cluster.grpc.RpcError:
                history.event(reader, "fail", "get", key, time.monotonic_ns())
                time.sleep(0.5)
        else:
            unread.append(key)
    history.close()
    total = sum(history.counts.values())
    extra = ("swaps", "leader moved")
    faults = sum(v for k, v in counts.items() if k not in extra)
    print(f"run: {load_seconds:.0f} s of load and faults, {faults} faults: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k not in extra)
          + f" ({counts.get('swaps', 0)} hot swaps in all; the leader moved during {counts.get('leader moved', 0)} faults)")
    print(f"ops: {total} ({history.counts['ok']} ok, {history.counts['fail']} failed, {history.counts['info']} indeterminate; "
          f"{history.writes_ok} acknowledged writes); {len(keys.used) - len(unread)} of {len(keys.used)} keys read back at the end")
    if unread:
        print(f"could not read back {len(unread)} keys: {unread[:10]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
