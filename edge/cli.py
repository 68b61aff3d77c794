"""``edgegw``: run, check and inspect the community-edge gateway.

Exit codes: 0 ok; 1 runtime failure; 2 usage; 78 (EX_CONFIG) bad configuration, which the
systemd unit lists in ``RestartPreventExitStatus`` so a broken config is not restarted forever.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

EX_CONFIG = 78
DEFAULT_CONFIG = Path(os.environ.get("EDGEGW_CONFIG", "/etc/edgegw/edgegw.toml"))
DEMO_DIR = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "edgegw-demo"

EPILOG = """\
examples:
  edgegw demo                                  simulated sensors -> gateway -> local spool
  edgegw check-config /etc/edgegw/edgegw.toml  validate a config (exit 78 on errors)
  edgegw run -c /etc/edgegw/edgegw.toml        run the daemon (systemd runs this)
  edgegw status -c /etc/edgegw/edgegw.toml     spool depth, forwarded/dropped counts, last error
  edgegw tail --data-dir ~/.local/state/edgegw-demo -n 20
                                               newest stored readings (line protocol)
  edgegw simulate --port 1883 --rate 100       publish simulated readings to a broker

docs: docs/config-reference.md (every key), docs/edgegw.example.toml (annotated example)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edgegw",
        description="community-edge gateway: reads community sensors, spools them durably, "
        "forwards them to InfluxDB.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the gateway until SIGTERM")
    p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG,
                   help=f"config file (default {DEFAULT_CONFIG}, or $EDGEGW_CONFIG)")

    p = sub.add_parser("check-config", help="validate a config file; exit 78 on problems")
    p.add_argument("config", type=Path)

    for name, text in (("status", "show spool depth, counters and the last forwarding error"),
                       ("tail", "show the newest queued readings (line protocol)")):
        p = sub.add_parser(name, help=text)
        where = p.add_mutually_exclusive_group()
        where.add_argument("-c", "--config", type=Path, help="config file naming the spool")
        where.add_argument("--data-dir", type=Path, help="data dir holding spool.db")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            p.add_argument("-n", type=int, default=20, help="how many lines (default 20)")
            p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")

    p = sub.add_parser("demo", help="run the gateway on simulated sensors, no setup needed",
                       description="Starts a private mosquitto on a free port, the gateway with "
                       "embedded defaults (local spool, no InfluxDB) and simulated air sensors; "
                       "prints progress until Ctrl-C.")
    p.add_argument("--data-dir", type=Path, default=DEMO_DIR, help=f"default {DEMO_DIR}")
    p.add_argument("--rate", type=float, default=20.0, help="messages per second (default 20)")
    p.add_argument("--sensors", type=int, default=12, help="simulated sensors (default 12)")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0 = never)")

    p = sub.add_parser("simulate", help="publish simulated sensor readings to an MQTT broker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--rate", type=float, default=10.0, help="msg/s, 0 = as fast as possible")
    p.add_argument("--count", type=int, default=None, help="stop after N messages")
    p.add_argument("--sensors", type=int, default=20)
    p.add_argument("--sites", type=int, default=2)

    args = parser.parse_args(argv)
    handler = {
        "run": cmd_run, "check-config": cmd_check_config, "status": cmd_status,
        "tail": cmd_tail, "demo": cmd_demo, "simulate": cmd_simulate,
    }[args.command]
    return handler(args)


def _setup_logging(level: str = "info") -> None:
    # No timestamps: journald adds them.
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if level != "debug":
        # gmqtt logs every connection attempt at INFO..ERROR; edge.sources.mqtt reports the
        # connection state itself, once per change.
        logging.getLogger("gmqtt").setLevel(logging.CRITICAL)


def _load(path: Path):  # type: ignore[no-untyped-def]
    from edge.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: configuration error(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EX_CONFIG
    mode = f"InfluxDB {config.influxdb.api} at {config.influxdb.url}" if config.influxdb else (
        "embedded mode (no InfluxDB)")
    sources = [n for n in ("mqtt", "http") if getattr(config.sources, n) is not None]
    spool = config.spool.resolved_path(config.gateway)
    print(f"{args.config}: ok ({', '.join(sources)} -> spool {spool} -> {mode})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EX_CONFIG
    _setup_logging(config.gateway.log_level)
    from edge.pipeline import run_until_signalled

    run_until_signalled(config)
    return 0


def _spool_path(args: argparse.Namespace) -> Path | None:
    if args.data_dir is not None:
        return Path(args.data_dir) / "spool.db"
    config = _load(args.config or DEFAULT_CONFIG)
    return None if config is None else Path(config.spool.resolved_path(config.gateway))


def cmd_status(args: argparse.Namespace) -> int:
    from ingest.spool import SpoolError, open_readonly

    path = _spool_path(args)
    if path is None:
        return EX_CONFIG
    try:
        spool = open_readonly(path)
        st = spool.status()
    except (SpoolError, sqlite3.Error) as exc:
        print(f"edgegw status: {exc}", file=sys.stderr)
        return 1
    age = (time.time_ns() - st.oldest_created_ns) / 1e9 if st.oldest_created_ns else 0.0
    if args.json:
        print(json.dumps({
            "spool": str(path), "points_queued": st.points_queued, "bytes_queued":
            st.bytes_queued, "segments": st.segments, "oldest_unsent_age_secs": round(age, 3),
            "counters": st.counters, "quarantine_rows": st.quarantine_rows, "meta": st.meta,
        }, indent=2, sort_keys=True))
        return 0
    c = st.counters
    print(f"spool            {path}")
    print(f"queued           {st.points_queued} points, {st.bytes_queued} bytes "
          f"in {st.segments} segments; oldest unsent {age:.1f} s")
    print(f"messages         received {c.get('messages_received', 0)}, "
          f"accepted {c.get('messages_accepted', 0)}")
    print(f"points           spooled {c.get('points_spooled', 0)}, "
          f"delivered {c.get('points_delivered', 0)}")
    for prefix, label in (("messages_rejected:", "rejected"),
                          ("points_quarantined:", "quarantined"),
                          ("points_dropped:", "dropped")):
        parts = [f"{k[len(prefix):]}={v}" for k, v in sorted(c.items()) if k.startswith(prefix)]
        print(f"{label:<16} {', '.join(parts) if parts else 'none'}")
    err = st.meta.get("forwarder_last_error") or "none"
    print(f"last error       {err}")
    if st.meta.get("last_corrupt"):
        print(f"corrupt spool    moved aside: {st.meta['last_corrupt']}")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from ingest.spool import SpoolError, open_readonly

    path = _spool_path(args)
    if path is None:
        return EX_CONFIG
    try:
        spool = open_readonly(path)
        seen: set[bytes] = set()
        while True:
            lines = spool.tail(args.n)
            for line in lines:
                if line not in seen:
                    print(line.decode("utf-8", "replace"))
            if not args.follow:
                return 0
            seen = set(lines)
            time.sleep(1.0)
    except (SpoolError, sqlite3.Error) as exc:
        print(f"edgegw tail: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from edge.sim.publisher import run

    sent = run(args.host, args.port, args.rate, args.count, args.sensors, args.sites)
    print(f"simulate: published {sent} messages")
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_private_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A throwaway mosquitto on a free loopback port (for the demo)."""
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        raise RuntimeError("mosquitto is not installed (sudo apt-get install mosquitto)")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from edge.config import demo_config
    from edge.pipeline import Gateway
    from edge.sim.publisher import run as simulate
    from ingest.spool import open_readonly

    _setup_logging("warning")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgegw-demo-") as tmp:
        broker, port = start_private_mosquitto(Path(tmp))
        config = demo_config(args.data_dir, port)
        spool_path = config.spool.resolved_path(config.gateway)
        print(f"demo: mosquitto on 127.0.0.1:{port}; gateway spool {spool_path} "
              "(embedded mode: no InfluxDB needed)")
        print(f"demo: {args.sensors} simulated air sensors at {args.rate:g} msg/s; Ctrl-C stops")
        print(f"demo: in another terminal: edgegw tail --data-dir {args.data_dir} -f")

        async def main() -> None:
            import signal

            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            gateway = Gateway(config)
            task = asyncio.create_task(gateway.run(stop, notify=lambda _m: None))
            ready = asyncio.create_task(gateway.ready.wait())
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():  # failed before it was ready (spool not openable, ...)
                ready.cancel()
                await task
                return
            sim = threading.Thread(
                target=simulate, name="simulate", daemon=True,
                args=("127.0.0.1", port, args.rate, None, args.sensors, 2, False))
            sim.start()
            t0 = time.monotonic()
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 5.0)
                reader = open_readonly(spool_path)
                st = reader.status()
                reader.close()
                c = st.counters
                rejected = sum(v for k, v in c.items() if k.startswith("messages_rejected"))
                print(f"demo: {time.monotonic() - t0:5.0f} s  received "
                      f"{c.get('messages_received', 0)}  stored {st.points_queued} points  "
                      f"rejected {rejected}", flush=True)
                if args.seconds and time.monotonic() - t0 >= args.seconds:
                    stop.set()
            await task

        try:
            asyncio.run(main())
        finally:
            broker.terminate()
            broker.wait(10)
    print(f"demo: stopped. Inspect with: edgegw status --data-dir {args.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
