"""A simple simulated MQTT publisher: environmental sensors spread over sites and zones.

Enough for the README demo, the tests and the benchmark (the full simulated community with
parking, doors and scenarios is a later piece of work). Uses paho-mqtt, the reference client,
so tests check our intake against an independent implementation.

Topic ``community/<site>/<zone>/<device>``; payload
``{"ts": <ms>, "seq": <n>, "temperature": .., "humidity": .., "pm25": ..}`` with ``ts`` unique
per device (so every message is a distinct point) and a slow diurnal curve plus noise.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


@dataclass(frozen=True, slots=True)
class Sensor:
    site: str
    zone: str
    device: str
    prefix: str = "community"

    @property
    def topic(self) -> str:
        return f"{self.prefix}/{self.site}/{self.zone}/{self.device}"


def community(
    sensors: int = 20, sites: int = 2, zones_per_site: int = 3, prefix: str = "community"
) -> list[Sensor]:
    """``sensors`` air sensors spread round-robin over sites and zones."""
    out = []
    for i in range(sensors):
        site = f"site-{i % sites + 1}"
        zone = f"zone-{i // sites % zones_per_site + 1}"
        out.append(Sensor(site, zone, f"air-{i + 1:04d}", prefix))
    return out


def payload(sensor_index: int, seq: int, ts_ms: int, rng: random.Random) -> bytes:
    """One reading: a diurnal temperature curve, humidity against it, PM2.5 with spikes."""
    day = (ts_ms / 86_400_000) % 1.0
    temp = 22.0 + 4.0 * math.sin(2 * math.pi * (day - 0.375)) + rng.gauss(0, 0.2)
    hum = 55.0 - 8.0 * math.sin(2 * math.pi * (day - 0.375)) + rng.gauss(0, 1.0)
    pm25 = max(0.0, 18.0 + rng.gauss(0, 4.0) + (60.0 if rng.random() < 0.01 else 0.0))
    return (
        b'{"ts":%d,"seq":%d,"temperature":%.2f,"humidity":%.1f,"pm25":%.1f}'
        % (ts_ms, seq, temp, hum, pm25)
    )


def messages(
    sensors: list[Sensor], count: int, start_ms: int, seed: int = 1, live: bool = False
) -> Iterator[tuple[str, bytes]]:
    """``count`` (topic, payload) pairs, round-robin over sensors.

    Point times are ``start_ms`` + 1 ms per round, or with ``live`` the wall clock (kept
    strictly increasing per device), so every message is a distinct point.
    """
    rng = random.Random(seed)
    n = len(sensors)
    last = [0] * n
    for i in range(count):
        k = i % n
        ts = max(int(time.time() * 1000), last[k] + 1) if live else start_ms + i // n
        last[k] = ts
        yield sensors[k].topic, payload(k, i // n, ts, rng)


class Publisher:
    """Publishes with QoS 1 and waits until the broker acknowledged everything."""

    def __init__(self, host: str, port: int, client_id: str = "", max_inflight: int = 1000,
                 username: str | None = None, password: str | None = None):
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=mqtt.MQTTv5)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(0)
        self._lock = threading.Condition()
        self._unacked = 0
        self._client.on_publish = self._on_publish
        self._client.connect(host, port)
        self._client.loop_start()

    def _on_publish(self, *args: object) -> None:
        with self._lock:
            self._unacked -= 1
            self._lock.notify_all()

    def publish(self, topic: str, data: bytes, qos: int = 1, window: int = 5000) -> None:
        with self._lock:
            while self._unacked >= window:
                self._lock.wait(1.0)
            self._unacked += 1
        self._client.publish(topic, data, qos=qos)

    def flush(self, timeout: float = 120.0) -> None:
        """Wait until every publish was acknowledged by the broker."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._unacked > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._unacked} publishes not acknowledged")
                self._lock.wait(min(left, 1.0))

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run(host: str, port: int, rate: float, count: int | None, sensors: int, sites: int,
        progress: bool = True) -> int:
    """Publish at ``rate`` msg/s (0 = as fast as possible); returns how many were sent."""
    fleet = community(sensors, sites)
    start_ms = int(time.time() * 1000)
    sent = 0
    t0 = time.monotonic()
    last = t0
    with Publisher(host, port) as pub:
        total = count if count is not None else 1 << 62
        for topic, data in messages(fleet, total, start_ms, live=rate > 0):
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            pub.publish(topic, data)
            sent += 1
            now = time.monotonic()
            if progress and now - last >= 5:
                print(f"simulate: {sent} messages published ({sent / (now - t0):.0f} msg/s)",
                      flush=True)
                last = now
        pub.flush()
    return sent
