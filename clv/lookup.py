"""Feature look-up: online state in Redis, the event log for dates before the user's latest
event. ``clv features`` prints it; the API scores it."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass

import pandas as pd

from clv.errors import ClvError
from clv.settings import Settings
from feature_store.event_log import EventLogError, log_dir_problem, read_events
from feature_store.features import RETENTION_DAYS, day_date, day_number, features_record, ms_to_iso
from feature_store.offline import features_at, too_late_mask
from feature_store.redis_client import connect
from feature_store.redis_store import FeatureStore, StoredState, online_features


class UnknownThen(ClvError):
    """The user has no event on or before the date asked for (exit 1, as an unknown user)."""


@dataclass(frozen=True, slots=True)
class FoundFeatures:
    """One user's features as of a day: the one-row frame of ``compute_features``."""

    user_id: str
    day: int
    frame: pd.DataFrame
    source: str  # "redis" or "event_log"
    updated_ms: int | None  # when Redis last changed the state (None: read from the log)

    def record(self) -> dict[str, object]:
        return {
            "user_id": self.user_id,
            "as_of": day_date(self.day).isoformat(),
            "source": self.source,
            # when Redis last changed this state: says nothing of features read from the log
            "features_updated_at": None if self.updated_ms is None else ms_to_iso(self.updated_ms),
            "features": features_record(self.frame, self.user_id),
        }


async def now_day(settings: Settings, store: FeatureStore) -> int:
    """Today (``CLV_CLOCK=wall``) or the largest event time applied (``CLV_CLOCK=event``)."""
    if settings.clock == "event":
        ms = await store.event_clock_ms(settings.consumer_group)
        if ms is not None:
            return ms // 86_400_000
    return day_number(dt.datetime.now(dt.UTC).date())


@dataclass(frozen=True, slots=True)
class Located:
    """A user Redis knows, and the day asked for (or today's: now, or the latest event's day
    when that is later)."""

    user_id: str
    stored: StoredState
    day: int

    @property
    def online(self) -> bool:
        """Whether Redis answers for the day (else the event log: a day before the latest)."""
        return self.day >= int(self.stored.state.latest_day[0])


async def locate(
    settings: Settings, store: FeatureStore, user_id: str, as_of: dt.date | None
) -> Located | None:
    """The user's stored state and the day their features are asked for; ``None`` for a user
    Redis does not know."""
    stored = await store.read_state(user_id)
    if stored is None:
        return None
    latest = int(stored.state.latest_day[0])
    day = day_number(as_of) if as_of else max(await now_day(settings, store), latest)
    return Located(user_id, stored, day)


async def find_features(
    settings: Settings, store: FeatureStore, user_id: str, as_of: dt.date | None
) -> FoundFeatures | None:
    """The user's features as of ``as_of`` (default: now, or the latest event's day when that
    is later), or ``None`` for a user Redis does not know. Dates before the user's latest event
    are replayed from the event log; :class:`UnknownThen` when the user had no event by then."""
    located = await locate(settings, store, user_id, as_of)
    return None if located is None else await features_of(settings, located)


async def features_of(settings: Settings, located: Located) -> FoundFeatures:
    """The features of a located user on the located day (see :func:`find_features`)."""
    user_id, stored, day = located.user_id, located.stored, located.day
    if located.online:
        return FoundFeatures(
            user_id, day, online_features(stored.state, day), "redis", stored.updated_ms
        )
    # Point in time before the latest event: replay the user's log in arrival order.
    latest = int(stored.state.latest_day[0])
    if problem := log_dir_problem(settings.event_log_dir):  # not "no events"
        raise EventLogError(
            f"{problem}; dates before the user's latest event ({day_date(latest)}) are read from it"
        )
    # Every copy: the too-late rule comes before the first-copy-wins dedup, as online, where
    # a copy refused as too late leaves no dedup entry and a corrected re-send of the same id
    # is applied (features_at deduplicates after the rule).
    events = await asyncio.to_thread(
        read_events,
        settings.event_log_dir,
        user_id=user_id,
        arrival_order=True,
        dedupe=False,
    )
    frame = features_at(events, day, late_after_days=RETENTION_DAYS)
    if user_id not in frame.index:  # unknown on that day, as an unknown user: an error
        # (the events Redis took: no copy refused as too late, nor a re-send its dedup ignored)
        firsts = events[~too_late_mask(events, RETENTION_DAYS)].drop_duplicates("event_id")
        first = f", the first on {day_date(int(firsts['day'].min()))}" if len(firsts) else ""
        raise UnknownThen(
            f"user {user_id!r} has no events on or before {day_date(day)} in the event log "
            f"({len(firsts):,} after it{first})"
        )
    return FoundFeatures(user_id, day, frame.loc[[user_id]], "event_log", None)


async def lookup_features(
    settings: Settings, user_id: str, as_of: dt.date | None
) -> dict[str, object] | None:
    """``clv features``: the user's features as JSON-ready values, or ``None`` when unknown."""
    redis = connect(settings.redis_url)
    try:
        found = await find_features(
            settings, FeatureStore(redis, prefix=settings.key_prefix), user_id, as_of
        )
        return None if found is None else found.record()
    finally:
        await redis.aclose()
