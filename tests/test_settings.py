"""Settings are declared once (`common.config`), and docs/operations.md shows those declarations.

Each settings table of docs/operations.md is a class's own declarations rendered by
`common.config.markdown`; after adding or changing a setting, regenerate them with the command in
`REGENERATE` (it rewrites the tables in place). Pure tests: no network, no processes.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from agent_worker.settings import WorkerSettings
from common.config import SettingError, SharedSettings, declared, markdown
from ws_node.settings import NodeSettings

OPERATIONS_DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
# A heading under *Settings* in docs/operations.md -> the class whose own declarations its table shows.
SECTIONS: dict[str, type[Any]] = {
    "Both components": SharedSettings,
    "ws node": NodeSettings,
    "agent worker": WorkerSettings,
}
REGENERATE = "python -m common.config --write docs/operations.md " + " ".join(
    f'"{heading}={c.__module__}:{c.__name__}"' for heading, c in SECTIONS.items())
PROCESSES: list[type[Any]] = [NodeSettings, WorkerSettings]
BASE_ENV = {"REDIS_URL": "redis://127.0.0.1:1/0", "DATABASE_URL": "postgresql://u@127.0.0.1:1/x",
            "AUTH_JWT_SECRET": "s" * 32}


def doc_tables() -> dict[str, list[str]]:
    """Heading -> the lines of the table under it, in the *Settings* section of docs/operations.md."""
    section = OPERATIONS_DOC.read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    tables = {}
    for block in section.split("\n### ")[1:]:
        heading, _, body = block.partition("\n")
        tables[heading.strip()] = [line for line in body.splitlines() if line.startswith("|")]
    return tables


def defaults(table: list[str]) -> dict[str, str]:
    """Variable -> its default cell, from a table's rows."""
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    return {row[0].strip("`"): row[1] for row in cells}


def test_docs_have_one_table_per_section() -> None:
    assert list(doc_tables()) == list(SECTIONS)


@pytest.mark.parametrize("heading", SECTIONS)
def test_docs_table_is_the_declarations(heading: str) -> None:
    own = declared(SECTIONS[heading], inherited=False).values()
    table = doc_tables()[heading]
    documented, expected = defaults(table), {spec.variable: spec.shown for spec in own}
    assert sorted(documented.keys() - expected.keys()) == [], f"documented under {heading!r}, never declared"
    assert sorted(expected.keys() - documented.keys()) == [], f"declared, not documented under {heading!r}"
    assert documented == expected, f"defaults differ; regenerate with: {REGENERATE}"
    assert "\n".join(table) == markdown(own), f"the table under {heading!r} is stale; regenerate with: {REGENERATE}"


@pytest.mark.parametrize("cls", PROCESSES)
def test_a_process_reads_each_variable_once_shared_ones_first(cls: type[Any]) -> None:
    variables = [spec.variable for spec in declared(cls).values()]
    assert len(variables) == len(set(variables))
    shared = [spec.variable for spec in declared(SharedSettings).values()]
    assert variables[: len(shared)] == shared
    assert variables[len(shared):] == [spec.variable for spec in declared(cls, inherited=False).values()]


@pytest.mark.parametrize("cls", PROCESSES)
def test_unset_variables_take_the_declared_default(cls: type[Any]) -> None:
    settings = cls.from_env(BASE_ENV)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for name, spec in declared(cls).items():
        if spec.variable in BASE_ENV:
            continue
        if fields[name].default is dataclasses.MISSING:  # computed by from_env
            assert getattr(settings, name) is not None, name
            continue
        # The dataclass default is the declaration's, parsed: written once.
        assert fields[name].default == spec.default, name
        assert getattr(settings, name) == spec.default, name


def test_computed_defaults_and_conversions() -> None:
    node = NodeSettings.from_env(BASE_ENV)
    assert (node.node_id, node.internal_port, node.jwt_algorithms) == (socket.gethostname(), None, ("HS256",))
    worker = WorkerSettings.from_env({**BASE_ENV, "TOKEN_COALESCE_MS": "45", "LLM_RETRY_BASE_MS": "300",
                                      "LLM_RETRY_CAP_MS": "300", "INTERNAL_PORT": "9091", "NODE_ID": " w-1 "})
    assert worker.worker_id == "w-1" and worker.internal_port == 9091
    assert (worker.coalesce_s, worker.retry_base_s, worker.retry_cap_s) == (0.045, 0.3, 0.3)
    assert WorkerSettings.from_env(BASE_ENV).worker_id == f"{socket.gethostname()}-{os.getpid()}"


@pytest.mark.parametrize(
    ("cls", "env", "message"),
    [
        (NodeSettings, {"PORT": "eighty"}, "PORT: expected an integer, got 'eighty'"),
        (NodeSettings, {"PORT": "0"}, "PORT: must be between 1 and 65535, got 0"),
        (NodeSettings, {"DRAIN_SECONDS": "-1"}, "DRAIN_SECONDS: must be at least 0.0, got -1.0"),
        (NodeSettings, {"DRAIN_SECONDS": "soon"}, "DRAIN_SECONDS: expected a number, got 'soon'"),
        (NodeSettings, {"CHORUS_DEV": "Maybe"}, "CHORUS_DEV: expected true or false, got 'maybe'"),
        (NodeSettings, {"REDIS_URL": " "}, "REDIS_URL: required but not set"),
        (NodeSettings, {"REDIS_URL": "http://x"},
         "REDIS_URL: expected a URL starting with redis:// or rediss:// or unix://"),
        (NodeSettings, {"AUTH_JWT_SECRET": "short"}, "AUTH_JWT_SECRET: must be at least 16 characters"),
        (NodeSettings, {"AUTH_JWT_ALGORITHMS": " , "}, "AUTH_JWT_ALGORITHMS: lists no algorithm"),
        (WorkerSettings, {"LLM_RETRY_BASE_MS": "300", "LLM_RETRY_CAP_MS": "200"},
         "LLM_RETRY_CAP_MS: must be at least LLM_RETRY_BASE_MS"),
        (WorkerSettings, {"TOKEN_COALESCE_MS": "1001"}, "TOKEN_COALESCE_MS: must be between 0 and 1000, got 1001"),
        (WorkerSettings, {"LLM_FALLBACK_BASE_URL": "x"}, "LLM_FALLBACK_BASE_URL: expected an http:// or https:// URL"),
        (WorkerSettings, {"INTERNAL_PORT": "65536"}, "INTERNAL_PORT: must be between 0 and 65535, got 65536"),
    ],
)
def test_errors_name_the_variable(cls: type[Any], env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingError) as caught:
        cls.from_env({**BASE_ENV, **env})
    assert str(caught.value) == message


def test_a_logged_worker_settings_object_shows_no_key_or_password() -> None:
    settings = WorkerSettings.from_env({
        "REDIS_URL": "redis://:redis-pass@127.0.0.1:1/0", "DATABASE_URL": "postgresql://u:pg-pass@127.0.0.1/x",
        "LLM_API_KEY": "sk-primary-key", "LLM_FALLBACK_BASE_URL": "https://fallback.example/v1",
        "LLM_FALLBACK_API_KEY": "sk-fallback-key",
    })
    text = repr(settings)
    for secret in ("redis-pass", "pg-pass", "sk-primary-key", "sk-fallback-key"):
        assert secret not in text
    assert "llm_api_key='***'" in text and "fallback_api_key='***'" in text
    assert "llm_model='gpt-4o-mini'" in text, "what is not secret is still shown"
