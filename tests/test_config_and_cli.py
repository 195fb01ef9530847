"""Settings from the environment, the `sse-llm` command, and what the package ships."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import psycopg
import pytest

from sse_llm.config import ConfigError, Settings
from tests.conftest import with_database
from tests.processes import spawn_server
from tests.support import wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_spec() -> None:
    settings = Settings.from_env({})
    assert settings.database_url is None
    assert settings.data_dir == Path(".sse-llm")
    assert settings.provider == "demo"
    assert settings.openai_base_url == "https://api.openai.com/v1"
    assert (settings.first_chunk_timeout, settings.chunk_timeout) == (30, 30)
    assert settings.total_timeout == 600
    assert settings.max_prompt_chars == 32000
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert (settings.demo_tokens_per_second, settings.demo_tokens) == (20, 60)


def test_environment_is_read() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u:p@db/x",
            "LLM_PROVIDER": "openai",
            "OPENAI_BASE_URL": "http://localhost:11434/v1",
            "LLM_MODEL": "llama3",
            "LLM_CHUNK_TIMEOUT": "2.5",
            "SSE_LLM_PORT": "9000",
            "SSE_LLM_OVERLOAD_LAG": "0",
            "SSE_LLM_QUEUE_TIMEOUT": "5",
        }
    )
    assert (settings.overload_lag, settings.queue_timeout) == (0, 5)
    assert settings.provider == "openai"
    assert settings.model == "llama3"
    assert settings.chunk_timeout == 2.5
    assert settings.port == 9000


@pytest.mark.parametrize(
    ("name", "value", "mentions"),
    [
        ("LLM_PROVIDER", "gpt", "LLM_PROVIDER"),
        ("LLM_CHUNK_TIMEOUT", "soon", "LLM_CHUNK_TIMEOUT"),
        ("LLM_TOTAL_TIMEOUT", "0", "LLM_TOTAL_TIMEOUT"),
        ("LLM_FIRST_CHUNK_TIMEOUT", "nan", "LLM_FIRST_CHUNK_TIMEOUT"),
        ("SSE_LLM_PORT", "99999", "SSE_LLM_PORT"),
        ("SSE_LLM_MAX_PROMPT_CHARS", "-5", "SSE_LLM_MAX_PROMPT_CHARS"),
        ("DATABASE_URL", "mysql://x", "DATABASE_URL"),
        ("OPENAI_BASE_URL", "localhost:8080", "OPENAI_BASE_URL"),
        ("SSE_LLM_OVERLOAD_LAG", "-0.1", "SSE_LLM_OVERLOAD_LAG"),
        ("SSE_LLM_QUEUE_TIMEOUT", "0", "SSE_LLM_QUEUE_TIMEOUT"),
        ("SSE_LLM_ALLOWED_HOSTS", "https://sse.example.com", "SSE_LLM_ALLOWED_HOSTS"),
        ("SSE_LLM_ALLOWED_HOSTS", "sse.example.com:8000", "SSE_LLM_ALLOWED_HOSTS"),
        ("SSE_LLM_ALLOWED_HOSTS", "a.example b.example", "SSE_LLM_ALLOWED_HOSTS"),
    ],
)
def test_bad_value_is_refused_with_its_name(name: str, value: str, mentions: str) -> None:
    with pytest.raises(ConfigError, match=mentions):
        Settings.from_env({name: value})


def test_allowed_hosts_are_read_as_host_names() -> None:
    settings = Settings.from_env({"SSE_LLM_ALLOWED_HOSTS": " SSE.example.com, 10.0.0.5,::1,"})
    assert settings.allowed_hosts == ("sse.example.com", "10.0.0.5", "[::1]")
    assert Settings.from_env({"SSE_LLM_ALLOWED_HOSTS": "*"}).allowed_hosts == ("*",)
    assert Settings.from_env({}).allowed_hosts is None


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sse_llm.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_refuses_a_bad_setting_clearly() -> None:
    result = run_cli("serve", LLM_PROVIDER="nope")
    assert result.returncode == 2
    assert "LLM_PROVIDER" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_serve_with_workers_keeps_the_host_it_was_told(database_url: str) -> None:
    # Each worker reads its settings from the environment: --host must reach them, or a
    # worker on 0.0.0.0 would believe it listens on 127.0.0.1 and refuse every LAN name.
    server = spawn_server(database_url, "--workers", "2", "--host", "0.0.0.0")
    try:
        port = server.url.rsplit(":", 1)[1]
        for _ in range(4):  # whichever worker answers
            response = httpx.get(f"{server.url}/history", headers={"Host": f"box.lan:{port}"})
            assert response.status_code == 200
    finally:
        server.stop()
    assert "any Host name is accepted" in server.log()


def test_migrate_applies_migrations_alone(database_url: str) -> None:
    fresh = with_database(database_url, "postgres")
    with psycopg.connect(fresh, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS sse_llm_migrate_test")
        conn.execute("CREATE DATABASE sse_llm_migrate_test")
    target = with_database(database_url, "sse_llm_migrate_test")
    try:
        first = run_cli("migrate", DATABASE_URL=target)
        second = run_cli("migrate", DATABASE_URL=target)
        with psycopg.connect(target) as conn:
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables")}
    finally:
        with psycopg.connect(fresh, autocommit=True) as conn:
            conn.execute("DROP DATABASE sse_llm_migrate_test WITH (FORCE)")
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stdout
    assert second.stdout.strip() == "nothing to migrate"
    assert {"conversations", "chunks"} <= tables


@pytest.mark.slow
def test_wheel_ships_migrations_templates_and_static(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("sse_llm-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert "sse_llm/migrations/0001.conversations-and-chunks.sql" in names
    assert any(name.startswith("sse_llm/templates/") for name in names)
    assert any(name.startswith("sse_llm/static/") for name in names)
    # Installed (not from a checkout), the package finds its own folders.
    probe = (
        "import sse_llm.resources as r; "
        "print(r.resource_dir('migrations')); print(r.resource_dir('templates'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    for line in result.stdout.splitlines():
        assert line.startswith(str(tmp_path / "site" / "sse_llm")), line


@pytest.mark.slow
def test_an_embedded_server_made_before_gets_the_default_naptime_back(tmp_path: Path) -> None:
    # Data folders made before 2026-12-02 had autovacuum look every 10 s; the compactor
    # vacuums `chunks` itself now, and the embedded server is put back to PostgreSQL's 60 s.
    from sse_llm.database import EmbeddedPostgres

    def naptime(server: EmbeddedPostgres) -> str:
        with psycopg.connect(server.url) as conn:
            row = conn.execute("SHOW autovacuum_naptime").fetchone()
        assert row is not None
        return str(row[0])

    with EmbeddedPostgres(tmp_path) as server, psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET autovacuum_naptime = 10")
        conn.execute("SELECT pg_reload_conf()")
        wait_until(lambda: naptime(server) == "10s", 10)
    with EmbeddedPostgres(tmp_path) as server:
        assert naptime(server) == "1min"
