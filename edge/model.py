"""What flows through the gateway: readings (telemetry) and events.

A leaf module: it imports nothing of ours, so every package may import it.

Both kinds become one InfluxDB point each (see docs/schema.md). Tags are the bounded identity
of a series (site, zone, device, kind); everything else, including pseudonymised identifiers
such as card or plate pseudonyms, lives in ``fields``. Timestamps are integer nanoseconds since
the Unix epoch, always explicit: a replayed point must be identical to the first copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

FieldValue = float | int | bool | str


class Priority(IntEnum):
    """How the spool treats a point when its quota is reached.

    Telemetry may be dropped oldest-first (counted); events (doors, plates, alarms) never are.
    """

    TELEMETRY = 0
    EVENT = 1


@dataclass(slots=True, frozen=True)
class Reading:
    """A periodic measurement from one device, e.g. temperature and humidity of one sensor.

    Attributes:
        measurement: InfluxDB measurement, one of the schema's (``environment``, ``parking``,
            ``access``, ``device``).
        site: community / site id (tag).
        zone: area within the site, e.g. ``building-3`` or ``car-park-b1`` (tag).
        device: stable device id (tag).
        kind: what the device is, e.g. ``air``, ``bay``, ``door`` (tag).
        fields: field name to value; numbers are floats unless the schema says integer.
        ts_ns: point time in nanoseconds since the epoch.
    """

    measurement: str
    site: str
    zone: str
    device: str
    kind: str
    fields: Mapping[str, FieldValue]
    ts_ns: int

    @property
    def priority(self) -> Priority:
        return Priority.TELEMETRY


@dataclass(slots=True, frozen=True)
class Event:
    """Something that happened once: a card presented, a plate read, a door forced.

    Same shape as :class:`Reading`; ``kind`` is the event type (``plate_read``,
    ``access``, ...). Events are never dropped by the spool quota.
    """

    measurement: str
    site: str
    zone: str
    device: str
    kind: str
    fields: Mapping[str, FieldValue]
    ts_ns: int

    @property
    def priority(self) -> Priority:
        return Priority.EVENT


Point = Reading | Event
