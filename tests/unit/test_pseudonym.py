"""Keyed pseudonyms: stable, key-dependent, normalised, and never revealing the input."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.pseudonym import Pseudonymizer, normalize, normalize_card, normalize_plate

KEY = bytes(range(32))


def reference(key: bytes, kind: str, normalised: str) -> str:
    """The documented construction, computed independently with hmac.new."""
    return hmac.new(key, f"{kind}\x00{normalised}".encode(), hashlib.sha256).hexdigest()[:32]


def test_matches_the_documented_construction() -> None:
    pseudo = Pseudonymizer(KEY)
    assert pseudo("plate", "京A12345") == reference(KEY, "plate", "京A12345")
    assert pseudo("card", "0004521987") == reference(KEY, "card", "4521987")
    value = pseudo("plate", "ABC123")
    assert len(value) == 32 and int(value, 16) >= 0 and value == value.lower()


def test_stable_across_instances() -> None:
    assert Pseudonymizer(KEY)("plate", "沪B88888") == Pseudonymizer(bytes(KEY))("plate", "沪B88888")


def test_depends_on_the_key() -> None:
    other = bytes(reversed(KEY))
    assert Pseudonymizer(KEY)("plate", "沪B88888") != Pseudonymizer(other)("plate", "沪B88888")
    assert Pseudonymizer(KEY)("plate", "沪B88888") != reference(other, "plate", "沪B88888")


def test_kind_separates_namespaces() -> None:
    pseudo = Pseudonymizer(KEY)
    assert pseudo("plate", "12345678") != pseudo("card", "12345678")
    # The NUL separator: ("ab", "c") and ("a", "bc") must not collide.
    assert pseudo("ab", "c") != pseudo("a", "bc")


def test_not_a_plain_hash() -> None:
    plain = hashlib.sha256(b"plate\x00ABC123").hexdigest()[:32]
    assert Pseudonymizer(KEY)("plate", "ABC123") != plain


@pytest.mark.parametrize("spelling", [
    "京A12345", "京a12345", "京A·12345", "京A 12345", "京A-12345", " 京A12345\t",
    "京\uff21\uff11\uff12\uff13\uff14\uff15",  # full-width
    "京A\u30fb12345", "京A.12345",
])
def test_plate_spellings_share_a_pseudonym(spelling: str) -> None:
    pseudo = Pseudonymizer(KEY)
    assert normalize_plate(spelling) == "京A12345"
    assert pseudo("plate", spelling) == pseudo("plate", "京A12345")


@pytest.mark.parametrize(("spelling", "normalised"), [
    ("0004521987", "4521987"), ("4521987", "4521987"), (" 45 21987 ", "4521987"),
    ("04a1b2c3", "4A1B2C3"), ("000", "0"), ("0", "0"),
    ("\uff11\uff12\uff13", "123"),  # full-width digits
])
def test_card_normalisation(spelling: str, normalised: str) -> None:
    assert normalize_card(spelling) == normalised
    assert Pseudonymizer(KEY)("card", spelling) == reference(KEY, "card", normalised)


def test_distinct_plates_differ() -> None:
    pseudo = Pseudonymizer(KEY)
    assert pseudo("plate", "京A12345") != pseudo("plate", "京A12346")
    assert pseudo("plate", "京A12345") != pseudo("plate", "津A12345")


def test_other_kinds_are_trimmed_only() -> None:
    assert normalize("phone", "  138 0000 0000 ") == "138 0000 0000"


@pytest.mark.parametrize("key", [b"", b"short", b"x" * 15])
def test_short_keys_are_refused(key: bytes) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        Pseudonymizer(key)


def test_key_must_be_bytes() -> None:
    with pytest.raises(TypeError):
        Pseudonymizer("a text key of enough length")  # type: ignore[arg-type]


def test_minimum_key_length_is_accepted() -> None:
    assert len(Pseudonymizer(b"x" * 16)("card", "1")) == 32


def test_repr_hides_the_key() -> None:
    key = b"super-secret-key-0123456789"
    text = repr(Pseudonymizer(key))
    assert "super-secret" not in text and key.hex() not in text


@pytest.mark.parametrize(("kind", "value"), [
    ("plate", ""), ("plate", " - "), ("card", "   "), ("", "ABC123"), ("pla\x00te", "ABC123"),
])
def test_refuses_empty_input_without_echoing_it(kind: str, value: str) -> None:
    with pytest.raises(ValueError) as info:
        Pseudonymizer(KEY)(kind, value)
    assert "ABC123" not in str(info.value)


@given(st.text(min_size=1, max_size=20))
def test_normalisation_is_idempotent(value: str) -> None:
    for norm in (normalize_plate, normalize_card):
        once = norm(value)
        assert norm(once) == once


@given(st.text(min_size=1, max_size=20), st.binary(min_size=16, max_size=64))
def test_pseudonym_of_normalised_value_is_the_same(value: str, key: bytes) -> None:
    pseudo = Pseudonymizer(key)
    for kind in ("plate", "card"):
        normalised = normalize(kind, value)
        if not normalised:
            continue
        assert pseudo(kind, value) == pseudo(kind, normalised)
        result = pseudo(kind, value)
        assert len(result) == 32 and set(result) <= set("0123456789abcdef")
