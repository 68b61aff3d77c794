"""End-to-end benchmark on real servers: mosquitto -> edgegw (a process) -> InfluxDB 1.6.

Workload (the one of ../shared/notes.md, so numbers compare with its Node-RED bar): QoS 1,
1,000 sensors over 10 sites, topic ``community/<site>/env/<sensor>``, ~70-byte JSON
``{"ts": <ms>, "temperature": .., "humidity": .., "pm25": ..}``, point time = ``ts``.

Scenarios, each run ``--runs`` times (medians reported):

* ``drain``: N messages are queued at the broker for the gateway's persistent session while it
  is stopped; then it starts. Stored msg/s = N / (time from start until all N are queryable in
  InfluxDB). This is the gateway's own capacity: the publisher is out of the picture.
* ``burst``: the gateway runs while ``--publishers`` processes publish N messages as fast as they
  can. Stored msg/s = N / (first publish -> all N queryable).
* ``steady``: 1,000 msg/s for ``--steady-secs``; gateway CPU seconds per 1,000 messages (from
  /proc: user+system of all its threads), RSS (VmRSS at the end, VmHWM peak), and latency from
  publish to queryable in InfluxDB, sampled by probe messages polled every 5 ms.

Loss = published - stored, always checked. Run: ``.venv/bin/python -m bench.e2e``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from edge.sim.publisher import Publisher
from tests.gateway import GatewayProcess, count_points, new_database, wait_for
from tests.servers import Server, influx_query, start_influxd, start_mosquitto

SITES = 10
SENSORS = 1000
TICK = os.sysconf("SC_CLK_TCK")


def topic(i: int) -> str:
    return f"community/site-{i % SITES:02d}/env/sensor-{i % SENSORS:04d}"


def payload(i: int, ts_ms: int) -> bytes:
    return b'{"ts": %d, "temperature": %.1f, "humidity": %.1f, "pm25": %.1f}' % (
        ts_ms, 20 + (i % 100) / 10, 40 + (i % 50) / 5, 10 + (i % 70) / 7)


def publish_range(port: int, start: int, stop: int, base_ms: int, name: str) -> None:
    with Publisher("127.0.0.1", port, client_id=name) as pub:
        for i in range(start, stop):
            # Unique time per sensor and message: message i is round i // SENSORS.
            pub.publish(topic(i), payload(i, base_ms + i // SENSORS))
        pub.flush(600)


def cpu_secs(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def mem_mb(pid: int) -> tuple[float, float]:
    rss = hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return rss, hwm


TUNING: dict[str, dict[str, Any]] = {"spool": {}, "influxdb": {}}


def gateway(tmp: Path, mqtt: Server, influx: Server, db: str, tag: str) -> GatewayProcess:
    config: dict[str, Any] = {
        "gateway": {"site": "bench", "data_dir": str(tmp / "data"),
                    "credentials_dir": str(tmp / "credentials"), "log_level": "warning"},
        "spool": dict(TUNING["spool"]),
        "influxdb": {"url": influx.url, "api": "v1", "database": db, **TUNING["influxdb"]},
        "sources.mqtt": {"host": "127.0.0.1", "port": mqtt.port,
                         "client_id": f"edgegw-bench-{tag}"},
        "sources.mqtt.topics": [{"template": "community/{site}/env/{device}", "decoder": "json",
                                 "measurement": "environment", "kind": "air"}],
    }
    return GatewayProcess(tmp, config)


def run_drain(mqtt: Server, influx: Server, n: int, run: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        db = new_database(influx)
        gw = gateway(tmp, mqtt, influx, db, f"drain{run}-{time.time_ns()}")
        gw.start()
        gw.terminate()
        port = mqtt.port
        publish_range(port, 0, n, 1_700_000_000_000, f"pub-drain-{run}")
        t0 = time.monotonic()
        gw.start(timeout=60)
        assert gw.proc is not None
        pid = gw.proc.pid
        wait_for(lambda: count_points(influx, db) >= n, 600, "drain", interval=0.05)
        elapsed = time.monotonic() - t0
        cpu = cpu_secs(pid)
        _, hwm = mem_mb(pid)
        stored = count_points(influx, db)
        gw.terminate()
        return {"stored_msg_per_s": n / elapsed, "loss": n - stored,
                "cpu_s_per_1k": cpu / n * 1000, "peak_rss_mb": hwm}


def run_burst(mqtt: Server, influx: Server, n: int, publishers: int, run: int
              ) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        db = new_database(influx)
        gw = gateway(tmp, mqtt, influx, db, f"burst{run}-{time.time_ns()}")
        gw.start()
        assert gw.proc is not None
        pid = gw.proc.pid
        cpu0 = cpu_secs(pid)
        port = mqtt.port
        step = n // publishers
        procs = [multiprocessing.Process(
            target=publish_range,
            args=(port, k * step, (k + 1) * step, 1_710_000_000_000, f"pub-burst-{run}-{k}"))
            for k in range(publishers)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        wait_for(lambda: count_points(influx, db) >= step * publishers, 600, "burst", interval=0.05)
        elapsed = time.monotonic() - t0
        for p in procs:
            p.join()
        cpu = cpu_secs(pid) - cpu0
        _, hwm = mem_mb(pid)
        stored = count_points(influx, db)
        gw.terminate()
        total = step * publishers
        return {"stored_msg_per_s": total / elapsed, "loss": total - stored,
                "cpu_s_per_1k": cpu / total * 1000, "peak_rss_mb": hwm}


def run_steady(mqtt: Server, influx: Server, rate: int, secs: float, run: int
               ) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        db = new_database(influx)
        gw = gateway(tmp, mqtt, influx, db, f"steady{run}-{time.time_ns()}")
        gw.start()
        assert gw.proc is not None
        pid = gw.proc.pid
        port = mqtt.port
        latencies: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            # Every second: one probe point with the current time; poll InfluxDB until seen.
            with Publisher("127.0.0.1", port, client_id=f"probe-{run}") as pub:
                while not stop.is_set():
                    ts = int(time.time() * 1000)
                    t0 = time.monotonic()
                    pub.publish("community/probe/env/probe-0", payload(0, ts))
                    deadline = t0 + 10
                    while time.monotonic() < deadline:
                        rows = influx_query(influx, db, "SELECT count(temperature) FROM "
                                            f"environment WHERE time = {ts}ms")
                        if rows:
                            latencies.append(time.monotonic() - t0)
                            break
                        time.sleep(0.005)
                    stop.wait(max(0.0, 1 - (time.monotonic() - t0)))

        sent = 0
        with Publisher("127.0.0.1", port, client_id=f"pub-steady-{run}") as pub:
            # Warm up 2 s, then measure.
            warm = 2 * rate
            prober = threading.Thread(target=probe, name="probe")
            t_start = time.monotonic()
            base_ms = int(time.time() * 1000)
            cpu0 = 0.0
            total = warm + int(rate * secs)
            for i in range(total):
                if i == warm:
                    cpu0 = cpu_secs(pid)
                    prober.start()
                ahead = i / rate - (time.monotonic() - t_start)
                if ahead > 0:
                    time.sleep(ahead)
                pub.publish(topic(i), payload(i, base_ms + i // SENSORS * 1000 + i % SENSORS))
                sent += 1
            pub.flush()
        cpu = cpu_secs(pid) - cpu0
        rss, hwm = mem_mb(pid)
        stop.set()
        prober.join()
        probes = len(latencies)
        wait_for(lambda: count_points(influx, db) >= sent + probes, 60, "steady data", interval=0.1)
        stored = count_points(influx, db) - probes
        gw.terminate()
        latencies.sort()
        return {"cpu_s_per_1k": cpu / (total - warm) * 1000, "rss_mb": rss, "peak_rss_mb": hwm,
                "latency_p50_ms": 1000 * statistics.median(latencies),
                "latency_p99_ms": 1000 * latencies[min(len(latencies) - 1,
                                                        int(len(latencies) * 0.99))],
                "loss": sent - stored}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--n", type=int, default=200_000, help="messages per drain/burst run")
    ap.add_argument("--publishers", type=int, default=2)
    ap.add_argument("--steady-secs", type=float, default=30.0)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--only", choices=["drain", "burst", "steady"], action="append")
    ap.add_argument("--json", type=Path, help="also write all results here")
    ap.add_argument("--commit-interval-ms", type=int, help="spool.commit_interval_ms")
    ap.add_argument("--flush-interval-ms", type=int, help="influxdb.flush_interval_ms")
    args = ap.parse_args()
    if args.commit_interval_ms is not None:
        TUNING["spool"]["commit_interval_ms"] = args.commit_interval_ms
    if args.flush_interval_ms is not None:
        TUNING["influxdb"]["flush_interval_ms"] = args.flush_interval_ms
    scenarios = args.only or ["drain", "burst", "steady"]
    results: dict[str, list[dict[str, float]]] = {s: [] for s in scenarios}
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as d:
        base = Path(d)
        mqtt = start_mosquitto(base / "mqtt")
        influx = start_influxd(base / "influx")
        try:
            for run in range(args.runs):
                for s in scenarios:
                    if s == "drain":
                        r = run_drain(mqtt, influx, args.n, run)
                    elif s == "burst":
                        r = run_burst(mqtt, influx, args.n, args.publishers, run)
                    else:
                        r = run_steady(mqtt, influx, args.rate, args.steady_secs, run)
                    results[s].append(r)
                    print(f"run {run + 1} {s}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()),
                          flush=True)
        finally:
            mqtt.stop()
            influx.stop()
    print("\nmedians:")
    for s, rows in results.items():
        keys = rows[0].keys()
        med = {k: statistics.median(r[k] for r in rows) for k in keys}
        print(f"  {s}: " + ", ".join(f"{k}={v:.4g}" for k, v in med.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
