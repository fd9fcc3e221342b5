"""Settings: defaults, parsing, and a ConfigError naming the variable for every malformed value."""

from __future__ import annotations

import dataclasses

import pytest

from shared.errors import ConfigError
from shared.settings import PROJECT_ROOT, Settings


def test_defaults_from_an_empty_environment() -> None:
    settings = Settings.from_env({})
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.server_workers >= 1
    assert settings.artifact_store == str(PROJECT_ROOT / "var" / "artifacts")
    assert settings.database_url == str(PROJECT_ROOT / "var" / "skills.sqlite3")
    assert settings.skill_catalog == PROJECT_ROOT / "models" / "catalog.json"
    assert settings.model_refresh_seconds == 30.0
    assert settings.max_request_bytes == 1 << 20
    assert settings.max_batch_request_bytes == 32 << 20
    assert settings.max_batch_items == 10_000
    assert settings.onnx_threads == 1
    assert settings.batch_threads >= 1
    assert settings.log_level == "INFO"
    assert settings.task_queue == "local"
    assert settings.worker_url == "http://127.0.0.1:8080/tasks/batch-worker"
    assert settings.batch_chunk_size == 200
    assert settings.task_max_attempts == 3
    assert settings.task_min_backoff_seconds == 1.0
    assert settings.store_contributions is False
    assert settings.chaos_fail_chunks == frozenset()


def test_blank_values_mean_the_default() -> None:
    assert Settings.from_env({"PORT": "  ", "LOG_LEVEL": ""}) == Settings.from_env({})


def test_values_are_parsed_to_their_types() -> None:
    settings = Settings.from_env(
        {
            "HOST": "0.0.0.0",
            "PORT": " 9090 ",
            "MODEL_REFRESH_SECONDS": "0.25",
            "LOG_LEVEL": "debug",
            "STORE_CONTRIBUTIONS": "Yes",
            "SKILL_CATALOG": "/tmp/catalog.json",
        }
    )
    assert settings.port == 9090
    assert settings.model_refresh_seconds == 0.25
    assert settings.log_level == "DEBUG"
    assert settings.store_contributions is True
    assert settings.skill_catalog.as_posix() == "/tmp/catalog.json"
    # The worker URL follows the host and port unless set.
    assert settings.worker_url == "http://0.0.0.0:9090/tasks/batch-worker"


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("no", False), ("off", False)])
def test_flag_spellings(raw: str, expected: bool) -> None:
    assert Settings.from_env({"STORE_CONTRIBUTIONS": raw}).store_contributions is expected


def test_model_refresh_zero_is_allowed() -> None:
    assert Settings.from_env({"MODEL_REFRESH_SECONDS": "0"}).model_refresh_seconds == 0.0


@pytest.mark.parametrize(
    "name, value",
    [
        ("PORT", "abc"),
        ("PORT", "0"),
        ("PORT", "65536"),
        ("PORT", "80.5"),
        ("MODEL_REFRESH_SECONDS", "-1"),
        ("MODEL_REFRESH_SECONDS", "soon"),
        ("LOG_LEVEL", "LOUD"),
        ("STORE_CONTRIBUTIONS", "maybe"),
        ("SERVER_WORKERS", "0"),
        ("MAX_REQUEST_BYTES", "10"),
        ("BATCH_CHUNK_SIZE", "10001"),
        ("WORKER_URL", "file:///etc/passwd"),
    ],
)
def test_a_malformed_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})
    assert name in str(caught.value)
    assert value.strip().lower() in str(caught.value).lower()


@pytest.mark.parametrize("name", ["MODEL_REFRESH_SECONDS", "TASK_MIN_BACKOFF_SECONDS"])
def test_nan_is_not_a_number_of_seconds(name: str) -> None:
    # float("nan") parses, and NaN passes every `value < minimum` check; a refresh interval of NaN
    # would make every request re-read the registry. It must fail at start like any malformed value.
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: "nan"})


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


def test_replace_changes_named_settings_only() -> None:
    settings = Settings.from_env({})
    changed = settings.replace(port=9999, log_level="ERROR")
    assert (changed.port, changed.log_level) == (9999, "ERROR")
    assert changed.replace(port=settings.port, log_level=settings.log_level) == settings
    assert settings.port == 8080


def test_replace_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="prot"):
        Settings.from_env({}).replace(prot=9090)


@pytest.mark.parametrize(
    ("name", "value"),
    [("DATABASE_URL", "postgres://db/skills"), ("ARTIFACT_STORE", "s3://bucket/models"), ("TASK_QUEUE", "cloud")],
)
def test_an_unknown_backend_stops_the_start_naming_its_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_relative_paths_resolve_against_the_project_not_the_working_directory(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({"DATABASE_URL": "var/x.sqlite3", "ARTIFACT_STORE": "var/a", "SKILL_CATALOG": "models/catalog.json"})
    assert settings.database_url == str(PROJECT_ROOT / "var" / "x.sqlite3")
    assert settings.artifact_store == str(PROJECT_ROOT / "var" / "a")
    assert settings.skill_catalog == PROJECT_ROOT / "models" / "catalog.json"
    assert Settings.from_env({"DATABASE_URL": "sqlite:////tmp/x.sqlite3"}).database_url == "sqlite:////tmp/x.sqlite3"


def test_task_authentication_is_off_by_default_and_oidc_needs_its_audience_and_accounts() -> None:
    settings = Settings.from_env({})
    assert (settings.tasks_auth, settings.tasks_auth_audience, settings.tasks_auth_allowed_emails) == ("off", "", frozenset())
    assert settings.tasks_auth_certs_url == "https://www.googleapis.com/oauth2/v1/certs"
    with pytest.raises(ConfigError, match="'TASKS_AUTH_AUDIENCE' is missing, and TASKS_AUTH=oidc needs it"):
        Settings.from_env({"TASKS_AUTH": "oidc", "TASKS_AUTH_ALLOWED_EMAILS": "a@p.iam.gserviceaccount.com"})
    with pytest.raises(ConfigError, match="'TASKS_AUTH_ALLOWED_EMAILS' is missing"):
        Settings.from_env({"TASKS_AUTH": "oidc", "TASKS_AUTH_AUDIENCE": "https://x.run.app"})
    with pytest.raises(ConfigError, match="'TASKS_AUTH_ALLOWED_EMAILS' must be comma-separated email addresses"):
        Settings.from_env({"TASKS_AUTH_ALLOWED_EMAILS": "a@p.iam.gserviceaccount.com,not-an-email"})
    with pytest.raises(ConfigError, match="'TASKS_AUTH'"):
        Settings.from_env({"TASKS_AUTH": "iap"})
    with pytest.raises(ConfigError, match="'TASKS_AUTH_CERTS_URL'"):
        Settings.from_env({"TASKS_AUTH_CERTS_URL": "ftp://certs"})
    on = Settings.from_env(
        {"TASKS_AUTH": "OIDC", "TASKS_AUTH_AUDIENCE": "https://x.run.app", "TASKS_AUTH_ALLOWED_EMAILS": " A@p.iam.gserviceaccount.com , b@p.iam.gserviceaccount.com"}
    )
    assert on.tasks_auth == "oidc"
    assert on.tasks_auth_allowed_emails == frozenset({"a@p.iam.gserviceaccount.com", "b@p.iam.gserviceaccount.com"})


@pytest.mark.parametrize(
    "name, value, expected",
    [("PORT", "80.5", "must be an integer"), ("MODEL_REFRESH_SECONDS", "soon", "must be a number")],
)
def test_a_malformed_number_is_named_in_a_sentence(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})
    assert expected in str(caught.value)
    assert "must be a int" not in str(caught.value) and "must be a float" not in str(caught.value)
