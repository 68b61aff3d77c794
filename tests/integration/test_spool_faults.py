"""Spool faults with the real gateway process, the real broker and a real filesystem.

* **Quota reached**: a tiny ``spool.max_mb``; the oldest telemetry is dropped, counted exactly
  in ``points_dropped:quota``, the newest data is what remains, and the gateway keeps receiving
  and acknowledging.
* **Disk full**: the spool lives on a 2 MB tmpfs. When SQLite gets ENOSPC the gateway stops
  acknowledging (the broker keeps the messages in our persistent session) without crashing;
  after the tmpfs is remounted larger every published message arrives, exactly once, and the
  books balance. Needs root for ``mount``; skipped with the reason otherwise.

Both run in embedded mode (no ``[influxdb]``), so everything received stays in the spool and
``messages_received`` counts what the gateway committed.

Known limitation (reported, not tested here): a single group commit whose telemetry alone is
larger than the whole quota is refused with SpoolFull on every retry, so intake stalls for good.
The quota test therefore uses a quota above one commit (at most ``receive_maximum`` messages).

Note: a QoS 1 publisher is acknowledged by the broker, not by the gateway, so "the gateway stops
acknowledging" shows as messages waiting at the broker (``messages_received`` stalls below what
was published, then catches up), never as a publisher whose flush hangs.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from edge.sim.publisher import Publisher, community, messages
from ingest.spool import open_readonly
from tests.gateway import GatewayProcess, accounting_holds, mqtt_config, wait_for
from tests.servers import Server

START_MS = 1_760_000_000_000
FAILED = "spool commit failed"
RECOVERED = "spool commits work again"




def _received(gw: GatewayProcess) -> int:
    return gw.status().counters.get("messages_received", 0)


def _published_ids(msgs: list[tuple[str, bytes]]) -> list[tuple[str, int]]:
    """(device, point time in ns) of each published message, in publishing order."""
    return [(topic.rsplit("/", 1)[1], orjson.loads(data)["ts"] * 1_000_000)
            for topic, data in msgs]


def _spooled_ids(gw: GatewayProcess, n: int) -> list[tuple[str, int]]:
    """(device, point time in ns) of the ``n`` newest queued lines, oldest first."""
    spool = open_readonly(gw.spool_path)
    try:
        lines = spool.tail(n)
    finally:
        spool.close()
    out = []
    for line in lines:
        text = line.decode()
        tags = dict(kv.split("=", 1) for kv in text.split(" ", 1)[0].split(",")[1:])
        out.append((tags["device"], int(text.rsplit(" ", 1)[1])))
    return out


def _publish(pub: Publisher, msgs: list[tuple[str, bytes]]) -> None:
    for topic, data in msgs:
        pub.publish(topic, data)
    pub.flush(60)  # acknowledged by the broker, which now holds them for our session


def _committed_or_failed(gw: GatewayProcess, n: int) -> bool:
    return FAILED in gw.log_tail(1_000_000) or _received(gw) == n


def _assert_books_balance(gw: GatewayProcess) -> None:
    ok, why = accounting_holds(gw.status())
    assert ok, why


def test_quota_reached_drops_the_oldest_telemetry_counted_exactly(
    mosquitto: Server, tmp_path: Path
) -> None:
    prefix = "quota" + uuid.uuid4().hex[:8]
    # Small, but above one group commit (up to receive_maximum = 1000 held messages, ~130 KB):
    # a single commit larger than the whole quota can never be stored (module docstring).
    max_mb = 0.5
    quota = int(max_mb * 1024 * 1024)  # as the gateway computes it: ~4,000 lines
    gw = GatewayProcess(tmp_path, mqtt_config(
        tmp_path, mosquitto.port, prefix, spool={"max_mb": max_mb}))
    msgs = list(messages(community(20, sites=2, prefix=prefix), 15_000, START_MS))
    first, second = msgs[:10_000], msgs[10_000:]
    gw.start()
    try:
        with Publisher("127.0.0.1", mosquitto.port, client_id=f"pub-{prefix}") as pub:
            _publish(pub, first)
            wait_for(lambda: _received(gw) == len(first), 30, "every message received")
            assert gw.running()
            st = gw.status()
            c = st.counters
            assert c["points_spooled"] == len(first)
            assert 0 < st.points_queued < len(first)
            assert st.bytes_queued <= quota
            # Exactly what is gone was counted, and only under the quota reason.
            assert c["points_dropped:quota"] == len(first) - st.points_queued
            assert [k for k in c if k.startswith("points_dropped:")] == ["points_dropped:quota"]
            # Oldest first: what is left is the newest data, in arrival order.
            assert _spooled_ids(gw, st.points_queued) == (
                _published_ids(first)[-st.points_queued:])
            _assert_books_balance(gw)

            # At the quota the gateway keeps acknowledging: the broker sends everything more.
            _publish(pub, second)
            wait_for(lambda: _received(gw) == len(msgs), 30, "the second round received")
        st = gw.status()
        assert st.counters["points_dropped:quota"] == len(msgs) - st.points_queued
        assert _spooled_ids(gw, st.points_queued) == _published_ids(msgs)[-st.points_queued:]
        assert st.bytes_queued <= quota
        _assert_books_balance(gw)
    finally:
        assert gw.terminate() == 0


@dataclass
class Tmpfs:
    path: Path

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True,
                       capture_output=True)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    """A 2 MB tmpfs of this test's own, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount are not installed")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield Tmpfs(mnt)
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)  # still busy: detach


def test_disk_full_stops_acknowledging_and_everything_arrives_after_more_space(
    mosquitto: Server, small_tmpfs: Tmpfs, tmp_path: Path
) -> None:
    prefix = "full" + uuid.uuid4().hex[:8]
    config = mqtt_config(tmp_path, mosquitto.port, prefix)
    config["gateway"]["data_dir"] = str(small_tmpfs.path)  # the spool lives on the tmpfs
    gw = GatewayProcess(tmp_path, config)
    msgs = list(messages(community(50, sites=2, prefix=prefix), 60_000, START_MS))
    round_size = 2_000
    published: list[tuple[str, bytes]] = []
    gw.start()
    try:
        with Publisher("127.0.0.1", mosquitto.port, client_id=f"pub-{prefix}") as pub:
            # Publish until SQLite meets ENOSPC: each round is either all committed or not.
            for start in range(0, len(msgs), round_size):
                chunk = msgs[start:start + round_size]
                _publish(pub, chunk)
                published += chunk
                wait_for(functools.partial(_committed_or_failed, gw, len(published)),
                         30, "the round committed or a failed commit")
                if FAILED in gw.log_tail(1_000_000):
                    break
            else:
                pytest.fail(f"{len(published)} messages never filled a 2 MB tmpfs")

            # Full: alive, and not acknowledging what it could not commit; one more round
            # waits at the broker too.
            _publish(pub, msgs[len(published):len(published) + round_size])
            published = msgs[:len(published) + round_size]
            assert gw.running(), gw.log_tail()
            stalled = _received(gw)
            assert stalled < len(published)
            _assert_books_balance(gw)

            small_tmpfs.resize("50m")
            wait_for(lambda: _received(gw) == len(published), 60,
                     f"all {len(published)} messages after the disk has room again")
            wait_for(lambda: RECOVERED in gw.log_tail(1_000_000), 10, "the recovery logged")
        assert gw.running()
        st = gw.status()
        # Exactly once: nothing lost while full, nothing committed twice by the retries.
        assert st.counters["messages_accepted"] == len(published)
        assert st.points_queued == st.counters["points_spooled"] == len(published)
        assert sorted(_spooled_ids(gw, len(published) + 1)) == sorted(_published_ids(published))
        _assert_books_balance(gw)
        log = gw.log_tail(1_000_000)
        assert log.count(FAILED) == 1, log[-3_000:]  # logged once for the whole outage
    finally:
        if gw.running():
            assert gw.terminate() == 0
        else:
            gw._cleanup()
