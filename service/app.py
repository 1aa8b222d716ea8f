"""The HTTP API (FastAPI): a user's CLV scored by the champion on request, health, metrics.

``GET /users/{user_id}/clv[?as_of=YYYY-MM-DD]`` reads the user's features (Redis; the event log
for a date before the user's latest event), scores them with the champion over
``CLV_HORIZON_DAYS`` and answers with the value, expected purchases, ``p_alive``, churn risk,
segment, model version, features and an explanation (:mod:`service.scoring`). When the
scorer's stored score is exactly that answer (the champion in service, the day asked for, the
same state), it is answered from Redis without a model call
(:meth:`service.scores.ScoreStore.answer`). The process holds no user state: replicas behind a
load balancer answer alike.

Bad input is a 4xx with a JSON body (``{"detail": ...}``): 422 for a malformed user id or date,
404 for a user with no events (by ``as_of``). A server-side gap is a 503 that says which: no
champion model yet, Redis not answering, the event log missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from redis.exceptions import RedisClusterException, RedisError
from starlette.convertors import Convertor, register_url_convertor
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clv.errors import ClvError, ModelError
from clv.lookup import UnknownThen, features_of, locate
from clv.settings import Settings
from feature_store.event_log import EventLogError
from feature_store.events import valid_user_id
from feature_store.features import day_date, iso_date, ms_to_iso, now_iso
from feature_store.redis_client import connect
from feature_store.redis_store import FeatureStore
from service.champion import Champion, NoChampion
from service.scores import ScoreStore, StoredAnswer
from service.scoring import Batcher, Score, Segment, Stopping

log = logging.getLogger(__name__)

#: How often the champion pointer is read (one small file).
RELOAD_POLL_S = 2.0
#: The most users ``/users/top`` lists at once.
MAX_TOP = 1000
#: ``/readyz`` waits this long for Redis before it says not ready.
READY_TIMEOUT_S = 1.0

REQUESTS = Counter("clv_api_requests", "HTTP requests answered", ["route", "status"])
LATENCY = Histogram("clv_api_request_duration_seconds", "time to answer a request", ["route"])


class Effect(BaseModel):
    factor: str = Field(description="what about the customer")
    value: float = Field(description="the factor's value for this customer")
    effect: float = Field(
        description="the forecast value less what it would be had this factor been as for a "
        "customer who just bought, the other features held (currency units)"
    )


class ClvAnswer(BaseModel):
    user_id: str
    as_of: dt.date
    horizon_days: int
    currency: str
    clv: float = Field(description="revenue expected in the horizon after as_of")
    expected_orders: float = Field(description="purchase days expected in the horizon")
    p_alive: float = Field(description="BG/NBD's probability the customer has not dropped out")
    churn_risk: float = Field(description="probability of no purchase in the horizon")
    segment: str = Field(description="prospect, new, active, at_risk or lost")
    model_version: str
    scored_at: str
    score_source: str = Field(
        description="stored: the scorer's score of exactly these features by this model, "
        "answered from Redis; request: scored for this request (new events not scored yet, "
        "a new day or model before the scorer's sweep, a date in the past)"
    )
    features_updated_at: str | None = Field(
        description="when Redis last changed the features; null when they were read from the "
        "event log (an as_of before the user's latest event)"
    )
    features_source: str = Field(description="redis, or event_log for a date in the past")
    features: dict[str, Any]
    explanation: list[Effect]


class RankedUser(BaseModel):
    user_id: str
    clv: float
    expected_orders: float
    p_alive: float
    churn_risk: float
    segment: str
    model_version: str
    as_of: str
    scored_at: str


class TopAnswer(BaseModel):
    segment: str | None
    limit: int
    ranked_users: int = Field(description="users in this ranking")
    users: list[RankedUser]


class _UserIdConvertor(Convertor[str]):
    """A user id in a path: any characters, "/" (sent as %2F) and line feeds too, so that
    every id reaches the check that answers a malformed one with a 422, not a route's 404."""

    regex = r"[\s\S]*?"  # (empty too: "/users//clv" is an empty id, a 422)

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("user_id", _UserIdConvertor())


#: The admin endpoints' key (a dependency, so the schema names it as a security scheme).
_BEARER = HTTPBearer(auto_error=False, description="CLV_API_KEY, when it is set")


class Readiness(BaseModel):
    """``/readyz``'s answer: ready, or not and why (the fields of what is wrong)."""

    status: Literal["ready", "not ready"]
    model_version: str | None = Field(description="the champion loaded, if any")
    redis: str | None = Field(None, description="present when Redis does not answer")
    model: str | None = Field(None, description="present when no model is loaded, and why")
    stopping: str | None = Field(None, description="present while the process shuts down")


class Detail(BaseModel):
    detail: str


# The dependencies are coroutines: FastAPI runs a plain function in a worker thread, and the
# two hops a request cost a third of the API's samples in a profile under load.
async def _user_id(request: Request, user_id: str) -> str:
    # U+FFFD and lone surrogates: bytes of the path that were no UTF-8 (%FF). A path that ends
    # in a line feed: a route's "$" matches before it, so the id (or "/clv") came without it.
    if (
        not valid_user_id(user_id)
        or "\ufffd" in user_id
        or _surrogates(user_id)
        or request.scope["path"].endswith("\n")
    ):
        raise HTTPException(422, "user id must be 1 to 128 printable characters, no white space")
    return user_id


def _surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


async def _as_of(
    as_of: Annotated[
        str | None,
        Query(description="YYYY-MM-DD (default: now)", json_schema_extra={"format": "date"}),
    ] = None,
) -> dt.date | None:
    if as_of is None:
        return None
    try:
        return iso_date(as_of)
    except ValueError:
        raise HTTPException(422, f"as_of {as_of!r} is not a date (YYYY-MM-DD)") from None


class _Counted:
    """Counts requests by route template and status, and times them (pure ASGI, without
    ``BaseHTTPMiddleware``'s per-request streams; in-process, /healthz through it ran at a bare
    app's rate: 326 against 324 req/s)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]  # what an app that raised answers

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            name = getattr(route, "path_format", "unmatched")  # the template: a series a route
            REQUESTS.labels(name, str(status[0])).inc()
            LATENCY.labels(name).observe(time.perf_counter() - start)


def create_app(
    settings: Settings, *, poll_s: float = RELOAD_POLL_S, stopping: asyncio.Event | None = None
) -> FastAPI:
    """The API for ``settings``; its lifespan opens the Redis client and loads the champion.
    Once ``stopping`` is set, ``/readyz`` answers 503 (a load balancer stops sending)."""
    stopping = stopping or asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(settings.redis_url)
        champion = Champion(settings.model_dir)
        try:
            await champion.refresh()
        except NoChampion as exc:  # served as 503 until `clv train` promotes one
            log.info("no model to serve yet: %s", exc)
        except ModelError as exc:
            log.warning("no model to serve: %s", exc)
        app.state.redis, app.state.champion = redis, champion
        app.state.store = FeatureStore(redis, prefix=settings.key_prefix)
        app.state.scores = scores = ScoreStore(redis, prefix=settings.key_prefix)
        # (bounded: a Redis that accepts and never answers must not hold the start, which no
        # stop can end before it is over)
        with contextlib.suppress(
            RedisError, RedisClusterException, ConnectionError, OSError, TimeoutError
        ):
            recorded = await asyncio.wait_for(scores.recorded_clock(), READY_TIMEOUT_S)
            if recorded is not None and recorded != settings.clock:
                log.warning(
                    "the scores in this Redis follow CLV_CLOCK=%s, this API CLV_CLOCK=%s: a "
                    "request without as_of is answered as of another day than /users/top's",
                    recorded,
                    settings.clock,
                )
        app.state.batcher = Batcher(settings.horizon_days)
        app.state.stopping = stopping
        watch = asyncio.create_task(champion.watch(poll_s))
        try:
            yield
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            await app.state.batcher.close()
            await redis.aclose()

    app = FastAPI(
        title="clv",
        summary="Customer lifetime value, scored from streaming order events.",
        lifespan=lifespan,
    )

    app.add_middleware(_Counted)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """One line, as every other error here (FastAPI's own is a list of objects)."""
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "request"
        given = f" (got {first['input']!r})" if "input" in first else ""
        return JSONResponse({"detail": f"{where}: {first.get('msg')}{given}"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    async def admin(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if settings.api_key is None:
            return
        if credentials is None or not hmac.compare_digest(
            # (a header comes decoded as latin-1: its bytes again, against the key's UTF-8)
            credentials.credentials.strip().encode("latin-1"),
            settings.api_key.encode(),
        ):
            raise HTTPException(
                401,
                "admin endpoint: send Authorization: Bearer <CLV_API_KEY>",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get(
        "/users/{user_id:user_id}/clv",  # (an id may hold "/" as "%2F", even a line feed)
        response_model=ClvAnswer,
        responses={404: {"model": Detail}, 422: {"model": Detail}, 503: {"model": Detail}},
    )
    async def user_clv(
        request: Request,
        user_id: Annotated[str, Depends(_user_id)],
        as_of: Annotated[dt.date | None, Depends(_as_of)],
    ) -> ClvAnswer:
        """The user's lifetime value over the next ``CLV_HORIZON_DAYS`` as of ``as_of``."""
        loaded = request.app.state.champion.loaded
        if loaded is None:
            raise HTTPException(
                503, f"no model to score with: {request.app.state.champion.problem}"
            )
        store, scores = request.app.state.store, request.app.state.scores
        try:
            located = await locate(settings, store, user_id, as_of)
            if located is None:
                raise HTTPException(404, f"unknown user {user_id!r}: no events")
            day = day_date(located.day)
            stored = (
                await scores.answer(
                    user_id,
                    model_version=loaded.version,
                    horizon_days=settings.horizon_days,
                    as_of=day.isoformat(),
                    state=located.stored.digest,
                )
                if located.online
                else None
            )
            found = None if stored is not None else await features_of(settings, located)
        except UnknownThen as exc:
            raise HTTPException(404, str(exc)) from None
        except EventLogError as exc:
            raise HTTPException(503, str(exc)) from None
        except (RedisError, RedisClusterException, ConnectionError) as exc:
            raise HTTPException(503, f"the feature store (Redis) does not answer: {exc}") from None

        def answer(s: Score | StoredAnswer, features: dict[str, Any], **how: Any) -> ClvAnswer:
            return ClvAnswer(
                user_id=user_id,
                as_of=day,
                horizon_days=settings.horizon_days,
                currency=settings.currency,
                clv=s.clv,
                expected_orders=s.expected_orders,
                p_alive=s.p_alive,
                churn_risk=s.churn_risk,
                segment=s.segment,
                model_version=loaded.version,
                features=features,
                explanation=[Effect(**e) for e in s.explanation],
                **how,
            )

        if stored is not None:  # the scorer's score of these features by this model
            return answer(
                stored,
                stored.features,
                scored_at=stored.scored_at,
                score_source="stored",
                features_updated_at=ms_to_iso(located.stored.updated_ms),
                features_source="redis",
            )
        assert found is not None
        try:
            s = await request.app.state.batcher.score(loaded, found.frame)
        except Stopping as exc:
            raise HTTPException(503, str(exc)) from None
        except ClvError as exc:  # a forecast that is not a number: the model's, not the input's
            raise HTTPException(503, f"the model could not score this user: {exc}") from None
        record = found.record()
        return answer(
            s,
            record["features"],  # type: ignore[arg-type]
            scored_at=now_iso(),
            score_source="request",
            features_updated_at=record["features_updated_at"],
            features_source=found.source,
        )

    @app.get(
        "/users/top",
        responses={422: {"model": Detail}, 503: {"model": Detail}},
    )
    async def top_users(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=MAX_TOP, description="how many")] = 10,
        segment: Annotated[Segment | None, Query(description="the segment (default: all)")] = None,
    ) -> TopAnswer:
        """The highest-value users (or a segment's) by their latest stored score (the scorer
        keeps them current: README "Scores and alerts")."""
        try:
            count, users = await request.app.state.scores.top(limit, segment)
        except (RedisError, RedisClusterException, ConnectionError) as exc:
            raise HTTPException(503, f"the feature store (Redis) does not answer: {exc}") from None
        return TopAnswer(segment=segment, limit=limit, ranked_users=count, users=users)

    @app.delete(
        "/users/{user_id:user_id}",
        status_code=204,
        dependencies=[Depends(admin)],
        responses={
            401: {"model": Detail},
            404: {"model": Detail},
            422: {"model": Detail},
            503: {"model": Detail},
        },
    )
    async def erase_user(request: Request, user_id: Annotated[str, Depends(_user_id)]) -> Response:
        """Erase the user from the online store: features, seen event ids, scores, rankings and
        alert state; the user is then unknown. The offline event log is not rewritten
        (README "Scores and alerts")."""
        try:
            known = await request.app.state.store.forget(user_id)
            scored = await request.app.state.scores.forget(user_id)
        except (RedisError, RedisClusterException, ConnectionError) as exc:
            raise HTTPException(503, f"the feature store (Redis) does not answer: {exc}") from None
        if not known and not scored:
            raise HTTPException(404, f"unknown user {user_id!r}: nothing to erase")
        return Response(status_code=204)

    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.head("/readyz", include_in_schema=False)
    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "not ready, and why"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        """Redis answers and a model is loaded."""
        problems = {}
        try:
            await asyncio.wait_for(request.app.state.redis.ping(), READY_TIMEOUT_S)
        except (TimeoutError, RedisError, RedisClusterException, ConnectionError) as exc:
            problems["redis"] = f"does not answer: {exc or 'timed out'}"
        champion = request.app.state.champion
        if champion.loaded is None:
            problems["model"] = str(champion.problem)
        if request.app.state.stopping.is_set():
            problems["stopping"] = "the process is shutting down"
        version = None if champion.loaded is None else champion.loaded.version
        body = {"status": "not ready" if problems else "ready", "model_version": version}
        return JSONResponse({**body, **problems}, status_code=503 if problems else 200)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                "description": "the Prometheus text exposition format",
            }
        },
    )
    async def metrics() -> Response:
        """Prometheus text format: requests, latency, model reloads (and, under ``clv up``, the
        consumers' metrics: one registry per process)."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/admin/reload",
        dependencies=[Depends(admin)],
        responses={401: {"model": Detail}, 503: {"model": Detail}},
    )
    async def reload(request: Request) -> dict[str, object]:
        """Load the registry's champion now (it is also picked up within seconds by itself)."""
        champion = request.app.state.champion
        try:
            changed = await champion.refresh(force=True)
        except ModelError as exc:
            raise HTTPException(503, f"model not reloaded: {exc}") from None
        return {"model_version": champion.loaded.version, "changed": changed}

    return app
