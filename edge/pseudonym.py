"""Keyed pseudonyms for card numbers and licence plates.

Card numbers and plates are personal data: only pseudonyms leave the gateway. A pseudonym must be
stable (the same plate always gives the same value, so block lists, anti-passback and dwell times
still work on pseudonyms) and must not be reversible by anyone who lacks the site key.

Why not a plain hash: the input space is tiny. A 26-bit Wiegand card has 2**24 numbers per
facility code; mainland plates are a province character, a letter and five alphanumerics, about
10**9 combinations. SHA-256 of every candidate takes seconds to minutes on a laptop, so a table
from hash back to plate or card is cheap to build and an unkeyed hash is only an encoding.
HMAC-SHA-256 with a secret key of at least 128 bits makes that table impossible to build without
the key; keep the key out of InfluxDB, logs and backups of the data, and rotating it (which
changes every pseudonym) cuts the link to older data.

Values are normalised first so that the camera's or controller's spelling does not split one
person into several pseudonyms (see :func:`normalize`). ``kind`` is part of the MAC input,
separated by NUL, so a card number and a plate with the same characters never share a pseudonym.
"""

from __future__ import annotations

import hmac
import unicodedata
from collections.abc import Callable
from typing import Final

MIN_KEY_BYTES: Final = 16
PSEUDONYM_HEX_CHARS: Final = 32
"""128 bits: collisions are negligible for any community's population of plates and cards."""

# Separators that cameras and people put inside plates ("京A·12345", "AB-123-CD", "粤B 12345").
_PLATE_SEPARATORS: Final = {
    ord(c): None for c in "-\u2010\u2011\u2012\u2013\u2014\u2212\u00b7\u30fb\u2022._"
}


def _fixed_point(step: Callable[[str], str], value: str) -> str:
    # One pass is not always idempotent: removing a separator can join a combining mark to the
    # letter before it ("K" + U+00B8 CEDILLA → NFKC "K", space, U+0327 → without the space NFKC
    # composes U+0136), and upper() can decompose. Repeat until stable so that
    # normalize(normalize(x)) == normalize(x) and a block list built from normalised plates
    # matches the cameras' spellings.
    for _ in range(8):
        nxt = step(value)
        if nxt == value:
            break
        value = nxt
    return value


def _plate_step(value: str) -> str:
    text = unicodedata.normalize("NFKC", value).upper().translate(_PLATE_SEPARATORS)
    return "".join(text.split())


def _card_step(value: str) -> str:
    text = "".join(unicodedata.normalize("NFKC", value).split()).upper()
    return text.lstrip("0") or ("0" if text else "")


def normalize_plate(value: str) -> str:
    """Plate as the pseudonym sees it: NFKC (full-width letters and digits → ASCII), upper
    case, without whitespace, dashes, dots, underscores and middle dots."""
    return _fixed_point(_plate_step, value)


def normalize_card(value: str) -> str:
    """Card number as the pseudonym sees it: NFKC, without whitespace, upper case (hex cards),
    without leading zeros (readers pad to different widths); all zeros stays ``"0"``."""
    return _fixed_point(_card_step, value)


def normalize(kind: str, value: str) -> str:
    """Normalise ``value`` for ``kind``: ``plate`` and ``card`` have their own rules; any other
    kind is NFKC without surrounding whitespace."""
    if kind == "plate":
        return normalize_plate(value)
    if kind == "card":
        return normalize_card(value)
    return _fixed_point(lambda text: unicodedata.normalize("NFKC", text).strip(), value)


class Pseudonymizer:
    """Keyed pseudonyms: ``Pseudonymizer(key)("plate", "京A·12345")``.

    The pseudonym is the first 32 hex characters of HMAC-SHA-256(key, kind + NUL + normalised
    value). The key never appears in ``repr``.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        """Args:
            key: secret of at least 16 bytes (random, per installation).

        Raises:
            TypeError: key is not bytes.
            ValueError: key shorter than 16 bytes.
        """
        if not isinstance(key, bytes | bytearray):
            raise TypeError("pseudonym key must be bytes")
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"pseudonym key must be at least {MIN_KEY_BYTES} bytes")
        self._key = bytes(key)

    def __call__(self, kind: str, value: str) -> str:
        """Pseudonym of ``value`` (a ``plate``, a ``card``, ...).

        Raises:
            ValueError: ``kind`` is empty or contains NUL, or ``value`` is empty after
                normalisation. The message never contains ``value``.
        """
        if not kind or "\x00" in kind:
            raise ValueError("pseudonym kind must be non-empty and without NUL")
        normalized = normalize(kind, value)
        if not normalized:
            raise ValueError(f"empty {kind} after normalisation")
        message = f"{kind}\x00{normalized}".encode("utf-8", "surrogatepass")
        return hmac.digest(self._key, message, "sha256").hex()[:PSEUDONYM_HEX_CHARS]

    def __repr__(self) -> str:
        return "Pseudonymizer(key=<hidden>)"
