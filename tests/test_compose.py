"""docker-compose.yml, read as Compose reads it (Docker does not run here): the addresses the
processes are given reach what they name, and the scaling the file's header shows can start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from clv.settings import Settings

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` by listener name."""
    out = {}
    for item in value.split(","):
        name, address = item.split("://")
        host, port = address.rsplit(":", 1)
        out[name] = (host, int(port))
    return out


def _published(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host part, container port) of each published port."""
    out = []
    for entry in service.get("ports", []):
        host, _, container = str(entry).rpartition(":")
        out.append((host, int(container)))
    return out


def test_kafka_gives_each_client_an_address_it_can_reach(compose: dict[str, Any]) -> None:
    # Fails if the broker advertises only the compose network's name: a client on the host
    # bootstraps at the published port, is sent to kafka:9092, and never produces (clv replay
    # from the host with the default CLV_KAFKA_BOOTSTRAP).
    kafka = compose["services"]["kafka"]["environment"]
    listening = _listeners(kafka["KAFKA_LISTENERS"])
    advertised = _listeners(kafka["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(p.split(":") for p in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listening) <= set(protocols)
    for name, (_, port) in advertised.items():
        assert listening[name][1] == port, name  # each advertised address is listened on
    # the containers: at an advertised address on the compose network
    inside = compose["x-clv-env"]["CLV_KAFKA_BOOTSTRAP"]
    host, port = inside.rsplit(":", 1)
    assert (host, int(port)) in advertised.values()
    # the host: each published port is a listener that advertises localhost at that port
    for _, port in _published(compose["services"]["kafka"]):
        assert ("localhost", port) in advertised.values(), port
    default = Settings.model_fields["kafka_bootstrap"].default
    host, port = default.rsplit(":", 1)
    assert (host, int(port)) in advertised.values()  # the contract's default, from the host


def test_the_api_replicas_the_header_shows_can_each_publish_their_port(
    compose: dict[str, Any],
) -> None:
    # Fails if the API publishes one fixed host port: with `--scale api=3` (the file's header,
    # the README) the second replica cannot bind it and does not start.
    header = COMPOSE.read_text(encoding="utf-8").split("--scale api=")[1]
    replicas = int(header.split()[0])
    for host, container in _published(compose["services"]["api"]):
        assert container == 8000
        if host:  # a range of host ports, one a replica (none: Docker picks them)
            first, _, last = host.rpartition(":")[2].partition("-")
            assert last and int(last) - int(first) + 1 >= replicas, host


def test_every_clv_variable_of_the_file_is_a_setting(compose: dict[str, Any]) -> None:
    # a misspelt variable is silently a default
    fields = set(Settings.model_fields)
    for name, service in compose["services"].items():
        for var in service.get("environment", {}) or {}:
            if var.startswith("CLV_"):
                assert var[4:].lower() in fields, (name, var)
