"""The HTTP API against a real Redis and a real champion, served over HTTP on a free port."""

from __future__ import annotations

import asyncio
import datetime as dt

import httpx
import pytest

from clv.settings import Settings
from feature_store.event_log import write_events
from feature_store.events import ValidEvent
from feature_store.features import day_number
from feature_store.offline import features_at
from feature_store.redis_store import FeatureStore
from service.scores import ScoreStore
from tests.feature_store.streams import MS_PER_DAY, _ev, as_frame
from tests.service.conftest import CUTOFF, register, serving, start_api
from training.models.naive import HistoricalRate
from training.registry import load_champion

pytestmark = pytest.mark.integration


def purchases(user: str, days: list[int], cents: int = 2500) -> list[ValidEvent]:
    return [
        _ev(f"{user}-e{i}", "purchase", user, f"{user}-o{i}", cents + 100 * i, d * MS_PER_DAY)
        for i, d in enumerate(days)
    ]


async def apply(store: FeatureStore, events: list[ValidEvent]) -> None:
    await store.apply(events, group="g", progress={"orders:0": len(events)}, now_ms=0)


REGULAR = [CUTOFF - 200 + 30 * i for i in range(5)]  # five purchases a month apart


async def test_a_users_clv_is_the_champions_forecast_over_the_settings_horizon(
    api: httpx.AsyncClient, store: FeatureStore, api_settings: Settings
) -> None:
    events = purchases("u1", REGULAR)
    await apply(store, events)
    answer = await api.get("/users/u1/clv", params={"as_of": "1997-09-30"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    champion = load_champion(api_settings.model_dir)
    features = features_at(as_frame(events), CUTOFF)
    expected = champion.model.predict(features, 365).loc["u1"]
    assert body["user_id"] == "u1" and body["as_of"] == "1997-09-30"
    assert body["horizon_days"] == 365 and body["model_version"] == champion.version
    assert body["clv"] == pytest.approx(expected["predicted_value"], abs=0.005)
    assert body["expected_orders"] == pytest.approx(expected["expected_orders"], abs=1e-4)
    assert body["p_alive"] == pytest.approx(expected["p_alive"], abs=1e-4)
    assert body["features"]["orders_total"] == 5 and body["features"]["frequency"] == 4
    assert body["features_source"] == "redis"
    # churn risk: no purchase in the horizon, from p_alive and the purchases expected
    p, e = expected["p_alive"], expected["expected_orders"]
    assert body["churn_risk"] == pytest.approx((1 - p) + p * 2.718281828 ** (-e / p), abs=1e-3)
    factors = {x["factor"]: x for x in body["explanation"]}
    assert factors["days_since_last_order"]["value"] == CUTOFF - REGULAR[-1]
    # had they bought on the as-of day, they would be worth more: inactivity costs value
    assert factors["days_since_last_order"]["effect"] < 0
    assert factors["repeat_purchase_days"]["value"] == 4


async def test_value_falls_and_churn_risk_rises_as_time_passes_without_purchases(
    api: httpx.AsyncClient, store: FeatureStore
) -> None:
    await apply(store, purchases("u1", REGULAR))
    seen = []
    for as_of in ("1997-09-30", "1998-03-31", "1998-12-31", "2000-12-31"):
        body = (await api.get("/users/u1/clv", params={"as_of": as_of})).json()
        seen.append((body["clv"], body["churn_risk"], body["segment"]))
    values, risks, segments = zip(*seen, strict=True)
    assert list(values) == sorted(values, reverse=True) and values[0] > 2 * values[-1]
    assert list(risks) == sorted(risks) and risks[0] < 0.6 <= risks[-1]
    assert segments[0] == "active" and segments[-1] == "lost"


async def test_a_one_time_buyer_slips_away_though_p_alive_stays_one(
    api: httpx.AsyncClient, store: FeatureStore
) -> None:
    # BG/NBD gives a one-time buyer p_alive 1 forever: 1 - p_alive would never call them at risk
    await apply(store, purchases("once", [CUTOFF - 10]))
    early = (await api.get("/users/once/clv", params={"as_of": "1997-09-30"})).json()
    late = (await api.get("/users/once/clv", params={"as_of": "1999-09-30"})).json()
    assert early["segment"] == "new" and early["p_alive"] == late["p_alive"] == 1.0
    assert late["churn_risk"] > early["churn_risk"] and late["clv"] < early["clv"]


async def test_a_date_before_the_latest_event_is_read_from_the_event_log(
    api: httpx.AsyncClient, store: FeatureStore, api_settings: Settings
) -> None:
    events = purchases("u1", REGULAR)
    await apply(store, events)
    write_events(api_settings.event_log_dir, as_frame(events))
    body = (await api.get("/users/u1/clv", params={"as_of": "1997-05-01"})).json()
    assert body["features_source"] == "event_log"
    assert body["features_updated_at"] is None  # no Redis write made them (README)
    assert body["features"]["orders_total"] == sum(
        d <= day_number(dt.date(1997, 5, 1)) for d in REGULAR
    )
    before = await api.get("/users/u1/clv", params={"as_of": "1997-01-01"})
    assert (
        before.status_code == 404 and "no events on or before 1997-01-01" in before.json()["detail"]
    )


@pytest.mark.parametrize(
    ("path", "status", "detail"),
    [
        ("/users/nobody/clv", 404, "unknown user 'nobody'"),
        ("/users/a%20b/clv", 422, "user id must be"),
        ("/users/" + "x" * 129 + "/clv", 422, "user id must be"),
        ("/users/u1/clv?as_of=1997-13-01", 422, "as_of '1997-13-01' is not a date"),
        ("/users/u1/clv?as_of=19970101", 422, "is not a date (YYYY-MM-DD)"),
        ("/users/top?limit=0", 422, None),
        ("/users/top?limit=abc", 422, None),
        ("/users/top?segment=vip", 422, "segment: Input should be 'prospect', 'new'"),
        ("/users/top?limit=abc", 422, "limit: Input should be a valid integer"),
        ("/users/a%0Ab/clv", 422, "user id must be"),  # a line feed: the id's 422, no 404
        ("/users//clv", 422, "user id must be"),  # an empty id: no 405 of DELETE /users/{id}
        ("/no/such/path", 404, "Not Found"),
    ],
)
async def test_bad_input_is_a_4xx_with_a_json_body(
    api: httpx.AsyncClient, store: FeatureStore, path: str, status: int, detail: str | None
) -> None:
    await apply(store, purchases("u1", REGULAR))
    answer = await api.get(path)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert isinstance(answer.json()["detail"], str)  # one line, as the schema says
    if detail is not None:
        assert detail in answer.json()["detail"]


async def test_no_champion_is_a_503_until_one_is_promoted_then_served_without_a_restart(
    api_settings: Settings, store: FeatureStore, tmp_path: pytest.TempPathFactory
) -> None:
    settings = api_settings.model_copy(
        update={"model_dir": api_settings.model_dir.parent / "empty"}
    )
    await apply(store, purchases("u1", REGULAR))
    async with serving(settings) as api:
        answer = await api.get("/users/u1/clv", params={"as_of": "1997-09-30"})
        assert answer.status_code == 503 and "no champion model" in answer.json()["detail"]
        ready = await api.get("/readyz")
        assert ready.status_code == 503 and "no champion model" in ready.json()["model"]
        version = register(settings.model_dir, HistoricalRate())
        for _ in range(150):  # the pointer is polled every 2 s
            answer = await api.get("/users/u1/clv", params={"as_of": "1997-09-30"})
            if answer.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert answer.status_code == 200 and answer.json()["model_version"] == version
        assert (await api.get("/readyz")).json() == {
            "status": "ready",
            "model_version": version,
        }


async def test_a_new_champion_is_picked_up_and_admin_reload_needs_the_key(
    api_settings: Settings, store: FeatureStore
) -> None:
    settings = api_settings.model_copy(update={"api_key": "s3cret"})
    await apply(store, purchases("u1", REGULAR))
    async with serving(settings) as api:
        before = (await api.get("/users/u1/clv", params={"as_of": "1997-09-30"})).json()
        version = register(settings.model_dir, HistoricalRate())
        refused = await api.post("/admin/reload")
        assert refused.status_code == 401 and "Bearer" in refused.json()["detail"]
        wrong = await api.post("/admin/reload", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = await api.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["model_version"] == version
        after = (await api.get("/users/u1/clv", params={"as_of": "1997-09-30"})).json()
        assert after["model_version"] == version != before["model_version"]
        # the naive rate: revenue / age * horizon
        assert after["clv"] == pytest.approx(
            sum(2500 + 100 * i for i in range(5)) / 100 / 201 * 365, abs=0.01
        )


async def test_a_key_beyond_ascii_is_the_one_a_client_sends_in_utf8(
    api_settings: Settings,
) -> None:
    # Fails if (service/app.py) the header, which comes decoded as latin-1, is compared as UTF-8:
    # a key "clé" sent as UTF-8 bytes (curl, browsers) was refused, and no client could send
    # a key beyond latin-1 at all.
    settings = api_settings.model_copy(
        update={"api_key": "clé-\u03ba\u03bb\u03b5\u03b9\u03b4\u03af"}
    )

    async def status(credentials: bytes) -> int:
        answer = await api.post(
            "/admin/reload", headers={b"Authorization": b"Bearer " + credentials}
        )
        return answer.status_code

    async with serving(settings) as api:
        assert await status(settings.api_key.encode()) != 401  # type: ignore[union-attr]
        assert await status("clé-\u03ba\u03bb\u03b5\u03b9\u03b4".encode()) == 401
        assert await status("clé".encode("latin-1")) == 401  # not the key's bytes


async def test_a_broken_champion_leaves_the_model_in_service(
    api: httpx.AsyncClient, api_settings: Settings, store: FeatureStore
) -> None:
    await apply(store, purchases("u1", REGULAR))
    version = register(api_settings.model_dir, HistoricalRate())
    (api_settings.model_dir / version / "model.pkl").write_bytes(b"tampered")
    answer = await api.post("/admin/reload")
    assert answer.status_code == 503 and "model not reloaded" in answer.json()["detail"]
    body = (await api.get("/users/u1/clv", params={"as_of": "1997-09-30"})).json()
    assert body["model_version"] != version and body["clv"] > 0


async def test_redis_away_is_a_503_and_not_ready(api_settings: Settings) -> None:
    from clv.local_stack import free_port

    settings = api_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    async with serving(settings) as api:
        answer = await api.get("/users/u1/clv")
        assert answer.status_code == 503 and "Redis" in answer.json()["detail"]
        ready = await api.get("/readyz")
        assert ready.status_code == 503 and "redis" in ready.json()
        assert (await api.get("/healthz")).status_code == 200  # alive all the same


async def test_erasure_removes_features_and_scores_and_the_user_is_then_unknown(
    api: httpx.AsyncClient, store: FeatureStore, api_settings: Settings
) -> None:
    await apply(store, purchases("u1", REGULAR))
    scores = ScoreStore(store._redis, prefix=api_settings.key_prefix)
    await scores.write([("u1", {"clv": "10.00", "segment": "active", "model_version": "v"})])
    await store._redis.set(scores.answer_key("u1"), b"an answer")
    rankings = (scores.top_key(), scores.top_key("active"))
    assert [await store._redis.zcard(k) for k in rankings] == [1, 1]
    assert (await api.delete("/users/u1")).status_code == 204
    assert (await api.get("/users/u1/clv")).status_code == 404
    assert await store.read_state("u1") is None
    assert (await scores.read(["u1"])) == [None]
    assert not await store._redis.exists(scores.answer_key("u1"))
    assert [await store._redis.zcard(k) for k in rankings] == [0, 0]
    again = await api.delete("/users/u1")
    assert again.status_code == 404 and "nothing to erase" in again.json()["detail"]


async def test_metrics_count_requests_by_route_and_the_schema_describes_the_api(
    api: httpx.AsyncClient, store: FeatureStore
) -> None:
    await apply(store, purchases("u1", REGULAR))
    await api.get("/users/u1/clv", params={"as_of": "1997-09-30"})
    await api.get("/users/u-unknown/clv")
    text = (await api.get("/metrics")).text
    assert 'clv_api_requests_total{route="/users/{user_id}/clv",status="200"}' in text
    assert 'clv_api_requests_total{route="/users/{user_id}/clv",status="404"}' in text
    schema = (await api.get("/openapi.json")).json()
    for path in (
        "/users/{user_id}/clv",
        "/users/top",
        "/users/{user_id}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/admin/reload",
    ):
        assert path in schema["paths"], path
    assert "churn_risk" in schema["components"]["schemas"]["ClvAnswer"]["properties"]
    # the admin key is a bearer scheme, not a header parameter that could fail validation:
    # no 422 listed where none can be sent (FastAPI's is a list, not this API's one line)
    reload = schema["paths"]["/admin/reload"]["post"]
    assert "422" not in reload["responses"] and reload["security"] == [{"HTTPBearer": []}]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    # what /readyz and /metrics answer is described too
    ready = schema["paths"]["/readyz"]["get"]["responses"]
    for status in ("200", "503"):
        assert ready[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Readiness"
        }
    assert {"status", "model_version", "redis", "model", "stopping"} <= set(
        schema["components"]["schemas"]["Readiness"]["properties"]
    )
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


async def test_an_id_with_a_slash_is_read_and_erased_and_bad_utf8_is_a_422(
    api: httpx.AsyncClient, store: FeatureStore
) -> None:
    # Fails if {user_id} stops at the "/": the contract's ids may hold one, sent as %2F.
    await apply(store, purchases("a/b", REGULAR))
    answer = await api.get("/users/a%2Fb/clv", params={"as_of": "1997-09-30"})
    assert answer.status_code == 200 and answer.json()["user_id"] == "a/b"
    assert (await api.delete("/users/a%2Fb")).status_code == 204
    assert await store.read_state("a/b") is None
    for path in ("/users/%FF/clv", "/users/%ED%A0%80/clv"):
        bad = await api.get(path)
        assert bad.status_code == 422 and "user id must be" in bad.json()["detail"]


async def test_a_model_that_fails_on_a_user_is_a_503_with_json(
    api: httpx.AsyncClient, store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clv.errors import ModelError
    from training.models.btyd import BGNBDGammaGamma

    def broken(self: object, features: object, horizon_days: int) -> object:
        raise ModelError("predicted_value is not finite for 1 of 1 customers")

    await apply(store, purchases("u1", REGULAR))
    monkeypatch.setattr(BGNBDGammaGamma, "predict", broken)
    answer = await api.get("/users/u1/clv", params={"as_of": "1997-09-30"})
    assert answer.status_code == 503
    assert answer.json()["detail"].startswith("the model could not score this user:")


async def test_readyz_says_not_ready_while_the_api_drains_after_a_stop(
    api_settings: Settings,
) -> None:
    settings = api_settings.model_copy(update={"api_drain_seconds": 30})
    stop = asyncio.Event()
    task = await start_api(settings, stop)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.api_port}") as api:
            assert (await api.get("/readyz")).status_code == 200
            stop.set()
            for _ in range(100):  # a bound, not a timing
                ready = await api.get("/readyz")
                if ready.status_code == 503:
                    break
                await asyncio.sleep(0.05)
            assert ready.status_code == 503 and "shutting down" in ready.json()["stopping"]
            assert (await api.get("/healthz")).status_code == 200  # still answering
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_the_schema_gives_the_segments_and_the_date_and_health_answers_head(
    api: httpx.AsyncClient,
) -> None:
    schema = (await api.get("/openapi.json")).json()
    params = {p["name"]: p for p in schema["paths"]["/users/top"]["get"]["parameters"]}
    segment = params["segment"]["schema"]["anyOf"][0]
    from service.scoring import SEGMENTS

    assert segment["enum"] == list(SEGMENTS)
    clv = {p["name"]: p for p in schema["paths"]["/users/{user_id}/clv"]["get"]["parameters"]}
    assert clv["as_of"]["schema"]["format"] == "date"
    assert "422" not in schema["paths"]["/healthz"]["get"]["responses"]
    assert (await api.head("/healthz")).status_code == 200


async def test_a_path_ending_in_a_line_feed_is_a_422_and_erases_nobody(
    api: httpx.AsyncClient, store: FeatureStore
) -> None:
    # Fails if the route's "$" drops the line feed: DELETE /users/x%0A erased user x.
    await apply(store, purchases("x", REGULAR))
    for method, path in (("DELETE", "/users/x%0A"), ("GET", "/users/x/clv%0A")):
        answer = await api.request(method, path)
        assert answer.status_code == 422, (method, path, answer.text)
    assert await store.read_state("x") is not None
