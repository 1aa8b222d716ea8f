"""Event validation: every contract rule, with its machine-readable reason."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import numpy as np
import pytest

from clv.errors import InvalidEvent
from feature_store.events import amounts_in_range, valid_event_id, valid_user_id, validate
from feature_store.features import day_number
from tests.feature_store.streams import BAD, GOOD

NOW_MS = 1_767_225_600_000  # 2026-01-01


@pytest.mark.parametrize(("raw", "reason"), BAD, ids=[f"{i}-{r}" for i, (_, r) in enumerate(BAD)])
def test_bad_messages_are_rejected_with_their_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent) as err:
        validate(raw, now_ms=NOW_MS)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("ts", "ms"),
    [
        ("2024-01-01T00:00:00Z", 1_704_067_200_000),
        ("2024-01-01", 1_704_067_200_000),  # a bare date is midnight UTC
        ("2024-01-01T02:00:00+02:00", 1_704_067_200_000),
        ("2024-01-01T00:00:00.250Z", 1_704_067_200_250),
        ("2023-12-31T19:00:00-05:00", 1_704_067_200_000),
    ],
)
def test_timestamps_with_a_zone_or_a_bare_date(ts: str, ms: int) -> None:
    ev = validate(json.dumps({**GOOD, "ts": ts}).encode(), now_ms=NOW_MS)
    assert ev.ts_ms == ms and ev.day == ms // 86_400_000


@pytest.mark.parametrize("uid", ["ü-42/名", "a{b}c", "x" * 128, "e-mail@example.com"])
def test_unicode_and_odd_but_printable_ids_are_accepted(uid: str) -> None:
    assert validate(json.dumps({**GOOD, "user_id": uid}).encode(), now_ms=NOW_MS).user_id == uid


TRICKY_IDS = [
    "u42",
    "ü-42/名",
    "a b",
    "a\tb",
    "a\u00a0b",
    "\u200b",
    "a\nb",
    "",
    "x" * 128,
    "x" * 129,
]


@pytest.mark.parametrize("text", TRICKY_IDS)
def test_the_shared_id_rules_are_the_consumers(text: str) -> None:
    """validate() writes the rules out for speed; the file loader calls the predicates."""

    def accepted(**field: str) -> bool:
        try:
            validate(json.dumps({**GOOD, **field}).encode(), now_ms=NOW_MS)
        except InvalidEvent:
            return False
        return True

    assert valid_user_id(text) == accepted(user_id=text)
    assert valid_event_id(text) == accepted(event_id=text)


def test_refunds_are_negative_cents_and_amounts_round_half_even() -> None:
    ev = validate(json.dumps({**GOOD, "type": "refund", "amount": 35.1}).encode(), now_ms=NOW_MS)
    assert ev.cents == -3510
    assert validate(json.dumps({**GOOD, "amount": 0.125}).encode(), now_ms=NOW_MS).cents == 12


def test_a_day_of_clock_skew_is_tolerated_but_not_more() -> None:
    ahead = json.dumps({**GOOD, "ts": "2026-01-01T23:00:00Z"}).encode()
    assert validate(ahead, now_ms=NOW_MS).ts_ms > NOW_MS
    with pytest.raises(InvalidEvent, match="future"):
        validate(json.dumps({**GOOD, "ts": "2026-01-02T01:00:00Z"}).encode(), now_ms=NOW_MS)


def test_the_size_cap_is_a_setting() -> None:
    raw = json.dumps({**GOOD, "pad": "x" * 500}).encode()
    assert validate(raw, now_ms=NOW_MS, max_bytes=1024)
    with pytest.raises(InvalidEvent) as err:
        validate(raw, now_ms=NOW_MS, max_bytes=256)
    assert err.value.reason == "too_large"


def test_milliseconds_are_exact() -> None:
    """Float seconds would store 23:41:18.915 for .916."""
    raw = json.dumps({**GOOD, "ts": "2004-10-28T23:41:18.916Z"}).encode()
    assert validate(raw, now_ms=NOW_MS).ts_ms % 1000 == 916


def test_the_deployment_currency_is_an_iso_4217_code() -> None:
    from pydantic import ValidationError

    from clv.settings import Settings
    from feature_store.events import valid_currency

    assert valid_currency("USD") and valid_currency("EUR")
    for bad in ("usd", "dollars", "US", "", "U$D"):
        assert not valid_currency(bad)
        with pytest.raises(ValidationError):
            Settings(currency=bad)


ODD_TIMES = [
    "2024-01-01T00:00:00Z",
    "2024-01-01t00:00:00z",
    "2024-01-01 00:00:00.5+01:00",
    "2024-01-01",
    "2024-01-01T00:00:00.123456789Z",
    "2024-01-01T00:00:00.1239999999999Z",  # RFC 3339 sets no limit on fraction digits
    "2024-01-01T00:00:00+23:59",  # the largest offset
    "2024-01-01T00:00:00-00:00",  # (RFC 3339: UTC, the local offset unknown)
    "2024-01-01T00:00:00+0100",  # no colon in the offset: msgspec's datetime takes it
    "2024-01-01T00:00Z",
    "2024-01-01T00:00:00",
    "2024-02-30T00:00:00Z",
    "2024-01-01T24:00:00Z",
    "\uff12\uff10\uff12\uff14-01-01T00:00:00Z",  # full-width digits
    "20240101T000000Z",
    # Fails if the offset's minute or hour is not checked: Python reads "+05:60" as +06:00
    # and the consumer applied it an hour off, where the file readers refuse it
    "2024-01-01T00:00:00+05:60",
    "2024-01-01T00:00:00+05:99",
    "2024-01-01T00:00:00+24:00",
]


@pytest.mark.parametrize("ts", ODD_TIMES)
def test_the_consumer_and_the_file_loaders_accept_the_same_times(ts: str) -> None:
    """An event the consumer applies must be one the event log and `clv backtest` read."""
    import pandas as pd

    from clv.errors import ClvError
    from training.datasets import _csv_timestamps

    try:
        online: int | None = validate(json.dumps({**GOOD, "ts": ts}).encode(), now_ms=NOW_MS).ts_ms
    except InvalidEvent as exc:
        assert exc.reason == "bad_timestamp"
        online = None
    try:
        parsed = _csv_timestamps(pd.DataFrame({"ts": [ts]}))
        offline: int | None = int(parsed.iloc[0].value // 1_000_000)
    except ClvError:
        offline = None
    assert online == offline
    assert ts not in ODD_TIMES[8:] or online is None  # every form after the eighth is refused
    assert ts not in ODD_TIMES[:8] or online is not None  # and the eight before it are not


def test_the_future_tolerance_edge_is_inclusive_to_the_millisecond() -> None:
    at_edge = NOW_MS + 86_400_000  # the default tolerance, a day
    ev = json.dumps({**GOOD, "ts": "2026-01-02T00:00:00Z"}).encode()
    assert validate(ev, now_ms=NOW_MS).ts_ms == at_edge
    with pytest.raises(InvalidEvent) as err:
        validate(ev, now_ms=NOW_MS - 1)
    assert err.value.reason == "future_timestamp"


def test_the_clock_is_the_record_timestamp_capped_by_the_wall_clock() -> None:
    from feature_store.events import event_clock

    assert event_clock(1_000, 5_000) == 1_000  # a record read long after it was written
    assert event_clock(9_000, 5_000) == 5_000  # a producer clock ahead of ours
    assert event_clock(None, 5_000) == event_clock(0, 5_000) == event_clock(-1, 5_000) == 5_000


def test_a_record_is_judged_by_its_own_timestamp_not_the_time_it_is_read() -> None:
    """A rebuild a week later must refuse what the live consumer refused."""
    from aiokafka.structs import ConsumerRecord

    from clv.settings import Settings
    from consumers.kafka import validate_record

    day = 86_400_000
    value = json.dumps({**GOOD, "ts": "2026-01-03T00:00:00Z"}).encode()  # NOW + 2 days
    rec = ConsumerRecord("orders", 0, 7, NOW_MS, 0, b"u", value, None, 1, len(value), ())
    with pytest.raises(InvalidEvent) as err:
        validate_record(rec, Settings(), wall_ms=NOW_MS + 10 * day)
    assert err.value.reason == "future_timestamp"
    written_later = dataclasses.replace(rec, timestamp=NOW_MS + 2 * day)
    assert validate_record(written_later, Settings(), wall_ms=NOW_MS + 10 * day).ts_ms > NOW_MS


# Fails if amounts_in_range takes amount < MAX_AMOUNT, or the decoder gt=0 or lt=1e9.
def test_amounts_of_zero_and_of_exactly_a_billion_are_accepted_online_and_by_the_file_rules() -> (
    None
):
    for amount, cents in ((0, 0), (0.0, 0), (1e9, 100_000_000_000)):
        assert (
            validate(json.dumps({**GOOD, "amount": amount}).encode(), now_ms=NOW_MS).cents == cents
        )
    assert amounts_in_range(np.array([0.0, 1e9])).all()
    just_over = float(np.nextafter(1e9, np.inf))
    assert not amounts_in_range(np.array([just_over])).any()
    with pytest.raises(InvalidEvent) as err:
        validate(json.dumps({**GOOD, "amount": just_over}).encode(), now_ms=NOW_MS)
    assert err.value.reason == "invalid_value"


# Fails if _epoch_ms refuses t <= _EPOCH: the first instant of 1970 is a valid time.
def test_the_first_instant_of_1970_is_accepted() -> None:
    for ts in ("1970-01-01T00:00:00Z", "1970-01-01", "1970-01-01T01:00:00+01:00"):
        ev = validate(json.dumps({**GOOD, "ts": ts}).encode(), now_ms=NOW_MS)
        assert (ev.ts_ms, ev.day) == (0, 0)


# Fails if the currency is compared case-insensitively: "usd" is not an ISO 4217 code.
def test_a_lower_case_currency_code_is_not_the_deployments_currency() -> None:
    with pytest.raises(InvalidEvent) as err:
        validate(json.dumps({**GOOD, "currency": "usd"}).encode(), now_ms=NOW_MS)
    assert err.value.reason == "invalid_value"
    assert (
        validate(json.dumps({**GOOD, "currency": "USD"}).encode(), now_ms=NOW_MS).currency == "USD"
    )


# Fails if day is ts rounded to the nearest day instead of its UTC date.
@pytest.mark.parametrize(
    ("ts", "date"),
    [
        ("2024-01-01T23:59:59.999Z", dt.date(2024, 1, 1)),
        ("2024-01-01T12:00:00Z", dt.date(2024, 1, 1)),
        ("2024-01-01T20:00:00-05:00", dt.date(2024, 1, 2)),  # 01:00 UTC the next day
        ("2024-01-02T01:00:00+02:00", dt.date(2024, 1, 1)),  # 23:00 UTC the day before
    ],
)
def test_an_events_day_is_its_utc_date_late_in_the_day_and_across_an_offset(
    ts: str, date: dt.date
) -> None:
    assert validate(json.dumps({**GOOD, "ts": ts}).encode(), now_ms=NOW_MS).day == day_number(date)


# Fails if too_large is raised when len(raw) >= max_bytes: the cap itself is allowed.
def test_a_message_of_exactly_the_size_cap_is_accepted_and_one_byte_more_is_not() -> None:
    base = json.dumps({**GOOD, "pad": ""}).encode()
    raw = json.dumps({**GOOD, "pad": "x" * (1024 - len(base))}).encode()
    assert len(raw) == 1024
    assert validate(raw, now_ms=NOW_MS, max_bytes=1024).event_id == "e"
    with pytest.raises(InvalidEvent) as err:
        validate(raw, now_ms=NOW_MS, max_bytes=1023)
    assert err.value.reason == "too_large"


def test_json_nested_thousands_deep_is_an_invalid_event_not_a_recursion_error() -> None:
    # Fails if msgspec's RecursionError escapes validate (the consumer's safety net then
    # logged a traceback for each such message).
    raw = json.dumps(GOOD)[:-1] + ', "extra": ' + "[" * 30_000 + "]" * 30_000 + "}"
    with pytest.raises(InvalidEvent) as err:
        validate(raw.encode(), max_bytes=1 << 20, now_ms=NOW_MS)
    assert (err.value.reason, err.value.detail) == ("invalid_value", "JSON nested too deeply")
