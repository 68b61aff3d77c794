"""Which MQTT client can receive fast enough? Receive-only drain of a queued persistent session.

For each client: subscribe once (creating a persistent session), stop, queue N QoS 1 messages
(the workload of bench/e2e.py), then connect and receive them all, parsing each payload with
orjson and acknowledging in batches. Reports msg/s and the receiver's CPU seconds per 1,000
messages (getrusage: user + system, all threads). Medians of ``--runs``.

  paho-manual   paho-mqtt 2.x, own network thread, manual_ack, ack every 100 messages
  gmqtt-opt     gmqtt, PUBACK before the callback (optimistic: NOT acceptable for us)
  gmqtt-await   gmqtt, async callback, PUBACK after it returns (ack after a shared future)

Run: ``.venv/bin/python -m bench.mqtt_clients``.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from gmqtt import Client as GClient
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.e2e import publish_range
from tests.servers import start_mosquitto


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def paho_manual(port: int, n: int, client_id: str, subscribe_only: bool) -> tuple[float, float]:
    got = 0
    pending: list[int] = []
    done = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                    manual_ack=True)

    def on_message(cl: Any, ud: Any, msg: Any) -> None:
        nonlocal got
        orjson.loads(msg.payload)
        pending.append(msg.mid)
        got += 1
        if len(pending) >= 100 or got >= n:
            for m in pending:
                cl.ack(m, 1)
            pending.clear()
        if got >= n:
            done.set()

    c.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = 1000
    t0, c0 = time.monotonic(), _cpu()
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.subscribe("community/#", qos=1)
    c.loop_start()
    if subscribe_only:
        time.sleep(0.5)
    else:
        done.wait(300)
    elapsed, cpu = time.monotonic() - t0, _cpu() - c0
    c.disconnect()
    c.loop_stop()
    return n / elapsed, cpu / n * 1000


def gmqtt_run(port: int, n: int, client_id: str, subscribe_only: bool, optimistic: bool
              ) -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        got = 0
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        shared: list[asyncio.Future[None]] = [loop.create_future()]

        async def release() -> None:
            while True:
                await asyncio.sleep(0.01)
                fut, shared[0] = shared[0], loop.create_future()
                fut.set_result(None)

        async def on_message(client: Any, topic: str, data: bytes, qos: int, props: Any) -> int:
            nonlocal got
            orjson.loads(data)
            got += 1
            if got >= n:
                done.set()
            if not optimistic:
                await shared[0]
            return 0

        c = GClient(client_id, clean_session=False, session_expiry_interval=3600,
                    receive_maximum=1000, optimistic_acknowledgement=optimistic)
        c.on_message = on_message
        t0, c0 = time.monotonic(), _cpu()
        await c.connect("127.0.0.1", port)
        c.subscribe("community/#", qos=1)
        releaser = asyncio.create_task(release())
        if subscribe_only:
            await asyncio.sleep(0.5)
        else:
            await asyncio.wait_for(done.wait(), 300)
        elapsed, cpu = time.monotonic() - t0, _cpu() - c0
        releaser.cancel()
        await c.disconnect()
        return n / elapsed, cpu / n * 1000

    return asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    clients = {
        "paho-manual": lambda p, n, cid, sub: paho_manual(p, n, cid, sub),
        "gmqtt-opt": lambda p, n, cid, sub: gmqtt_run(p, n, cid, sub, True),
        "gmqtt-await": lambda p, n, cid, sub: gmqtt_run(p, n, cid, sub, False),
    }
    with tempfile.TemporaryDirectory() as d:
        mqtt = start_mosquitto(Path(d))
        port = mqtt.port
        try:
            for name, fn in clients.items():
                rows = []
                for run in range(args.runs):
                    cid = f"bench-{name}-{run}-{time.time_ns()}"
                    fn(port, 1, cid, True)
                    publish_range(port, 0, args.n, 1_700_000_000_000 + run, f"pub-{cid}")
                    rows.append(fn(port, args.n, cid, False))
                rate = statistics.median(r[0] for r in rows)
                cpu = statistics.median(r[1] for r in rows)
                print(f"{name:12s} {rate:8.0f} msg/s  {cpu:.4f} CPU-s per 1k msgs", flush=True)
        finally:
            mqtt.stop()


if __name__ == "__main__":
    main()
