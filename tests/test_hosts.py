"""SPEC 8's Host allow-list: no web page reads this service through a rebound DNS name."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml  # comes with schemathesis and openapi-spec-validator

from sse_llm.config import Settings
from tests.conftest import RunningServer, start_server

ROOT = Path(__file__).resolve().parent.parent


def get(server: RunningServer, path: str, host: str) -> httpx.Response:
    """GET `path` from the server as if it were reached by the name `host`."""
    return httpx.get(server.url + path, headers={"Host": host})


def test_a_rebound_host_name_is_refused_on_a_loopback_bind(demo_server: RunningServer) -> None:
    port = demo_server.url.rsplit(":", 1)[1]
    for path in ("/history", "/", "/playground", "/metrics", "/static/app.css"):
        response = get(demo_server, path, f"evil.example:{port}")
        assert response.status_code == 400, path
        assert response.json()["error"]["code"] == "invalid_host"
    refused = httpx.post(
        f"{demo_server.url}/stream", json={"prompt": "rebound"}, headers={"Host": "evil.example"}
    )
    assert refused.status_code == 400
    # Probes send an address, whatever name the service is known by.
    for path in ("/healthz", "/readyz"):
        assert get(demo_server, path, "10.1.2.3:8000").status_code == 200


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:1234", "LocalHost:8000", "127.0.0.1", "[::1]:8000", "[::1]"]
)
def test_loopback_names_are_accepted_with_any_port(demo_server: RunningServer, host: str) -> None:
    assert get(demo_server, "/history", host).status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1.evil.example", "localhost.evil.example", ""])
def test_names_that_only_start_like_loopback_are_refused(
    demo_server: RunningServer, host: str
) -> None:
    assert get(demo_server, "/history", host).status_code == 400


def test_v1_refuses_a_foreign_host_in_openai_shape(demo_server: RunningServer) -> None:
    response = httpx.post(
        f"{demo_server.url}/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Host": "evil.example"},
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": response.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_host",
        }
    }
    assert get(demo_server, "/v1/models", "evil.example").status_code == 400


@pytest.fixture(scope="module")
def named_server(base_settings: Settings) -> Iterator[RunningServer]:
    running = start_server(base_settings.with_changes(allowed_hosts=("sse.example.com",)))
    yield running
    running.stop()


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("sse.example.com", 200),
        ("SSE.example.com:443", 200),
        ("localhost:8000", 200),  # loopback names stay usable on the machine itself
        ("other.example.com", 400),
        ("example.com", 400),
        ("x.sse.example.com", 400),
    ],
)
def test_allowed_hosts_name_the_accepted_hosts(
    named_server: RunningServer, host: str, status: int
) -> None:
    assert get(named_server, "/history", host).status_code == status


def test_a_public_bind_accepts_any_host_and_says_so_at_startup(
    base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # start_server always listens on 127.0.0.1; the policy follows settings.host.
    server = start_server(base_settings.with_changes(host="0.0.0.0"))
    try:
        assert get(server, "/history", "box.lan:8000").status_code == 200
    finally:
        server.stop()
    assert any("SSE_LLM_ALLOWED_HOSTS" in r.getMessage() for r in caplog.records)
    caplog.clear()
    server = start_server(base_settings.with_changes(host="0.0.0.0", allowed_hosts=("*",)))
    try:
        assert get(server, "/history", "anything.example").status_code == 200
    finally:
        server.stop()
    assert not any("SSE_LLM_ALLOWED_HOSTS" in r.getMessage() for r in caplog.records)


def compose_environment() -> dict[str, str]:
    """The environment compose.yaml gives the service, defaults filled in, on the image's."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    image = dict(re.findall(r"(SSE_LLM_HOST)=(\S+)", dockerfile))
    service = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["sse-llm"]
    default = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")
    environment = service["environment"].items()
    composed = {name: default.sub(r"\1", str(value)) for name, value in environment}
    return image | {name: value for name, value in composed.items() if value}


def test_compose_accepts_localhost_and_its_health_check_but_no_rebound_name(
    base_settings: Settings,
) -> None:
    environment = compose_environment()
    environment.pop("DATABASE_URL")  # the test database instead of the compose one
    settings = Settings.from_env(environment)
    assert settings.host == "0.0.0.0"
    server = start_server(
        base_settings.with_changes(host=settings.host, allowed_hosts=settings.allowed_hosts)
    )
    try:
        assert get(server, "/history", "localhost:8000").status_code == 200
        assert get(server, "/history", "evil.example:8000").status_code == 400
        # The health check, as compose.yaml runs it inside the container.
        compose = (ROOT / "compose.yaml").read_text()
        check = re.search(r"urlopen\('http://([^/']+)(/[a-z]+)'", compose)
        assert check is not None and check.group(2) in ("/healthz", "/readyz")
        assert get(server, check.group(2), check.group(1)).status_code == 200
        assert get(server, check.group(2), "172.18.0.3:8000").status_code == 200
    finally:
        server.stop()
