"""The one settings object every process (API, consumers, trainer) is built from."""

from __future__ import annotations

import ipaddress
import re
import ssl
from itertools import combinations
from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlparse

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.connection import parse_url

from feature_store.redis_client import check_url, cluster_mode, redacted

#: The longest horizon a forecast may ask for (ten years).
MAX_HORIZON_DAYS = 3650
#: Kafka's rule for topic names (``Topic.validate`` in Apache Kafka); the local broker is laxer.
TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
#: One bootstrap server: ``host``, ``host:port``, ``[ipv6]:port`` (a zone allowed) or a bare IPv6
#: address (Kafka's default port), as the Kafka clients read them.
BOOTSTRAP_SERVER = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+(?:%[\w.-]+)?\]|[^\s:,\[\]/%]+)(?::(?P<port>\d{1,5}))?"
)


def _bare_ipv6(text: str) -> bool:
    """``::1`` or ``fe80::1%eth0``: an IPv6 address without brackets (so without a port)."""
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


class Settings(BaseSettings):
    """Read from the environment with the prefix ``CLV_``; built once in an entry point and
    passed inward (nothing builds one at import time)."""

    # `model_dir` is a setting, not pydantic API: older pydantic-settings reserve "model_"
    model_config = SettingsConfigDict(
        env_prefix="CLV_", frozen=True, extra="ignore", protected_namespaces=("settings_",)
    )

    kafka_bootstrap: str = "localhost:9092"
    redis_url: str = Field("redis://localhost:6379/0", repr=False)  # may hold a password
    orders_topic: str = "orders"
    alerts_topic: str = "churn-alerts"
    dlq_topic: str = "orders.dlq"
    consumer_group: str = "clv-features"
    archiver_group: str = "clv-archiver"
    model_dir: Path = Path("./models")
    event_log_dir: Path = Path("./data/events")
    horizon_days: int = Field(365, ge=1, le=MAX_HORIZON_DAYS)
    clock: Literal["wall", "event"] = "wall"
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = Field(None, repr=False)  # a secret: never in a repr or a log
    metrics_port: int | None = Field(None, ge=1, le=65535)  # /metrics of consume/archive/up

    # Kafka's TLS and SASL (the contract: "Kafka SASL ... in their own variables").
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = Field(None, repr=False)
    kafka_ssl_cafile: Path | None = None  # the CA bundle to trust (default: the system's)

    # Ingestion knobs (not in the contract's table; documented in README "Settings").
    max_event_bytes: int = Field(64 * 1024, ge=256)
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")  # ISO 4217
    future_tolerance_seconds: int = Field(86_400, ge=0)
    orders_partitions: int = Field(8, ge=1, le=2**31 - 1)  # Kafka counts them in an int32
    topic_replication: int = Field(1, ge=1, le=2**15 - 1)  # copies of each partition (int16)
    consume_batch: int = Field(5000, ge=1)
    # How long a feature consumer keeps retrying a Redis that is away (down, restarting, not
    # answering, a failover) before it stops; 0 stops it at the first failure, inf never.
    redis_outage_seconds: float = Field(300.0, ge=0)
    archive_flush_events: int = Field(50_000, ge=1)
    archive_flush_seconds: float = Field(5.0, gt=0)
    key_prefix: str = "clv"
    # Scoring and churn-risk alerts (README "Scores and alerts"): an alert when a customer whose
    # value was in the top ``alert_top_share`` of scored users falls by ``alert_drop_pct``.
    alert_drop_pct: float = Field(30.0, gt=0, lt=100)
    alert_top_share: float = Field(0.2, gt=0, le=1)
    score_batch: int = Field(2000, ge=1)
    # Seconds the API keeps serving after SIGTERM with /readyz at 503, so a load balancer takes
    # it out before it stops listening (0: stop at once).
    api_drain_seconds: float = Field(0.0, ge=0, le=300)
    model_keep: int = Field(20, ge=1)  # the newest model versions kept, and the champion

    @field_validator("model_dir", "event_log_dir", mode="before")
    @classmethod
    def _not_empty(cls, v: object) -> object:
        """An empty variable is a mistake, not the current directory."""
        if isinstance(v, str) and not v.strip():
            raise ValueError("must be a directory path, not empty")
        return v

    @field_validator("api_key", mode="before")
    @classmethod
    def _api_key(cls, v: object) -> object:
        """An empty ``CLV_API_KEY`` (compose's ``${CLV_API_KEY:-}``) is no key: unset, as the
        contract's default. A key with spaces around it is a pasting mistake: no HTTP header
        could carry it (they are trimmed), so every admin call would be refused."""
        if isinstance(v, str):
            if not v:
                return None
            if v != v.strip():
                raise ValueError("has spaces or line breaks around it; no request could send it")
        return v

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        """Checked here, so a typo is one line at startup, not a traceback from the client."""
        for server in (s.strip() for s in v.split(",")):
            if _bare_ipv6(server):
                continue
            m = BOOTSTRAP_SERVER.fullmatch(server)
            if m is None or not 1 <= int(m["port"] or 9092) <= 65535:
                raise ValueError(
                    f"{server!r} is not a server: host:port[,host:port...], port 1 to 65535"
                )
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        """A URL redis-py can use (``redis+cluster://`` is parsed as ``redis://``). A refusal
        quotes it, and the parsers' words, with whatever may be a password masked (the
        contract: no secret in a log)."""
        try:
            _check_redis_url(v)
        except ValueError as exc:
            raise ValueError(f"{redacted(v)!r}{redacted(v, str(exc))}") from None
        return v

    @field_validator("orders_topic", "alerts_topic", "dlq_topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        if not TOPIC_NAME.fullmatch(v) or v in (".", ".."):
            raise ValueError(
                f"{v!r} is not a Kafka topic name (1 to 249 of letters, digits, '.', '_', '-')"
            )
        return v

    @field_validator("consumer_group", "archiver_group", "key_prefix")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("key_prefix")
    @classmethod
    def _no_braces(cls, v: str) -> str:
        # A brace would take the hash tag from the prefix, not the user id: a user's keys
        # would fall in different Redis Cluster slots (the scorer writes them in one step).
        if "{" in v or "}" in v:
            raise ValueError("must not hold { or } (the user id is the Redis Cluster hash tag)")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        """No two of the orders, dead-letter and alerts topics are one topic (rejected events
        would come back as input), nor the two consumer groups one group (they would split the
        partitions between them)."""
        for first, second in combinations(("orders_topic", "dlq_topic", "alerts_topic"), 2):
            if (value := getattr(self, second)) == getattr(self, first):
                raise ValueError(
                    f"CLV_{second.upper()} is {value!r}, the same topic as CLV_{first.upper()}"
                )
        if self.consumer_group == self.archiver_group:
            raise ValueError(
                f"CLV_CONSUMER_GROUP and CLV_ARCHIVER_GROUP are both {self.consumer_group!r}"
            )
        return self

    @property
    def kafka_tls(self) -> bool:
        """The Kafka connections are TLS (``SSL``, ``SASL_SSL``)."""
        return self.kafka_security_protocol.endswith("SSL")

    @property
    def kafka_sasl(self) -> bool:
        """The Kafka connections authenticate with SASL (``SASL_PLAINTEXT``, ``SASL_SSL``)."""
        return self.kafka_security_protocol.startswith("SASL_")

    @model_validator(mode="after")
    def _kafka_security(self) -> Self:
        """SASL needs its user and password, and they mean nothing without it (a protocol
        left at PLAINTEXT would send no credentials, and fail only at the broker); a CA file
        is read when the clients are made, so a wrong path is said at startup."""
        sasl = self.kafka_sasl
        given = self.kafka_sasl_username is not None or self.kafka_sasl_password is not None
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(
                f"CLV_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "CLV_KAFKA_SASL_USERNAME and CLV_KAFKA_SASL_PASSWORD"
            )
        if given and not sasl:
            raise ValueError(
                "CLV_KAFKA_SASL_USERNAME/PASSWORD are set but CLV_KAFKA_SECURITY_PROTOCOL is "
                f"{self.kafka_security_protocol}: set it to SASL_SSL or SASL_PLAINTEXT"
            )
        cafile = self.kafka_ssl_cafile
        if cafile is not None:
            if not self.kafka_tls:
                raise ValueError(
                    "CLV_KAFKA_SSL_CAFILE is set but CLV_KAFKA_SECURITY_PROTOCOL is "
                    f"{self.kafka_security_protocol}: set it to SSL or SASL_SSL"
                )
            if not cafile.is_file():
                raise ValueError(f"CLV_KAFKA_SSL_CAFILE {str(cafile)!r} is not a file")
            try:  # read as the Kafka clients will read it (a PEM bundle), once, here
                ssl.create_default_context(cafile=str(cafile))
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"CLV_KAFKA_SSL_CAFILE {str(cafile)!r} is no CA bundle (PEM) that can be "
                    f"read: {exc.strerror or exc}"
                ) from None
        return self

    def as_env(self) -> dict[str, str]:
        """These settings as the ``CLV_`` variables that rebuild them in a child process."""
        return {f"CLV_{k.upper()}": str(v) for k, v in self.model_dump().items() if v is not None}


def _check_redis_url(v: str) -> None:
    """:meth:`Settings._redis_url`'s checks; each refusal says what follows the URL."""
    try:
        _, plain = cluster_mode(v)  # as the clients read it
    except ValueError as exc:
        raise ValueError(f": {exc}") from None
    try:
        parse_url(plain)
    except ValueError as exc:
        raise ValueError(f": {exc} (or redis+cluster://)") from None
    parsed = urlparse(plain)
    if parsed.scheme in ("redis", "rediss"):
        if not parsed.hostname:
            raise ValueError(" names no host")
        if parsed.port == 0:  # redis-py would take it for no port and use 6379
            raise ValueError(": port 0 is not a port (1 to 65535)")
        db = parsed.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f": the database {db!r} is not a number")
    try:
        check_url(v)  # its options, as redis-py reads them: an unknown one failed late
    except ValueError as exc:
        raise ValueError(f": {exc}") from None


def settings_error(exc: ValidationError) -> str:
    """A bad setting in one line naming its variable: never pydantic's own text, which quotes
    the input (a password in CLV_KAFKA_SASL_PASSWORD or CLV_REDIS_URL included)."""
    first = exc.errors()[0]
    why = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:  # a rule across settings: the message names them
        return f"bad settings: {why}"
    return f"bad setting CLV_{str(first['loc'][0]).upper()}: {why}"
