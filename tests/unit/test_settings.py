"""Server settings (file < TURNOUT_ environment < explicit overrides) and per-model configs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gateway.settings import (
    ModelConfig,
    ServerSettings,
    SettingsError,
    load_model_config,
    load_settings,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("TURNOUT_"):
            monkeypatch.delenv(name)


def write_yaml(path: Path, values: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return path


# -- server settings ------------------------------------------------------------------------


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/var/lib/somewhere")
    settings = load_settings()
    assert settings.model_dump() == {
        "model_repository": Path("models"),
        "host": "127.0.0.1",
        "http_port": 8000,
        "grpc_port": 8001,
        "backend": "ray",
        "ray_address": None,
        "ray_namespace": "turnout",
        "ray_load_timeout_s": 120.0,
        "ray_same_node_channel": True,
        "max_request_bytes": 64 * 1024 * 1024,
        "grpc_max_concurrent_streams": None,
        "grpc_transport": "turnout",
        "grpc_servers": 8,
        "overload_hold_ms": 1000,
        "http_head_timeout_s": 10.0,
        "overload_lag_ms": 3.0,
        "drain_timeout_s": 30.0,
        "state_dir": Path("/var/lib/somewhere/turnout"),
        "admin_tokens": [],
        "require_infer_token": False,
        "rate_limit_rps": None,
        "rate_limit_burst": None,
        "tls_cert_file": None,
        "tls_key_file": None,
        "tls_client_ca_file": None,
        "policy_poll_interval_s": 0.2,
        "policy_store": "auto",
        "metrics_port": None,
        "monitor": True,
        "monitor_address": None,
        "monitor_http": None,
        "monitor_sample_rows_per_s": 10000.0,
        "monitor_queue_size": 65536,
        "model_defaults": {},
        "models": {},
    }


def test_file_then_environment_then_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_yaml(
        tmp_path / "turnout.yaml",
        {
            "host": "0.0.0.0",
            "http_port": 9000,
            "grpc_port": 9001,
            "backend": "ray",
            "drain_timeout_s": 3.5,
            "models": {"x": {"max_batch_size": 4}},
        },
    )
    monkeypatch.setenv("TURNOUT_HTTP_PORT", "9100")
    monkeypatch.setenv("TURNOUT_GRPC_PORT", "9101")
    monkeypatch.setenv("TURNOUT_BACKEND", "local")
    monkeypatch.setenv("TURNOUT_MODEL_REPOSITORY", str(tmp_path / "repo"))
    settings = load_settings(config, http_port=9200, grpc_port=None, model_repository=None)
    assert settings.http_port == 9200  # explicit beats environment beats file
    assert settings.grpc_port == 9101  # None is "not given": the environment stands
    assert settings.backend == "local"
    assert settings.model_repository == tmp_path / "repo"
    assert settings.host == "0.0.0.0"  # only in the file
    assert settings.drain_timeout_s == 3.5
    assert settings.models == {"x": {"max_batch_size": 4}}
    assert settings.ray_namespace == "turnout"  # nowhere: the default


def test_environment_parses_structured_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURNOUT_MODELS", '{"x": {"max_batch_size": 4}}')
    monkeypatch.setenv("TURNOUT_GRPC_MAX_CONCURRENT_STREAMS", "16")
    settings = load_settings()
    assert settings.models == {"x": {"max_batch_size": 4}}
    assert settings.grpc_max_concurrent_streams == 16


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_settings(empty) == ServerSettings()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"http_port": 70000}, "http_port: Input should be less than or equal to 65535"),
        ({"grpc_port": -1}, "grpc_port: Input should be greater than or equal to 0"),
        ({"backend": "k8s"}, "backend: Input should be 'ray' or 'local'"),
        ({"max_request_bytes": 10}, "max_request_bytes: Input should be greater than or equal"),
        ({"htp_port": 1}, "htp_port: Extra inputs are not permitted"),
        ({"models": {"x": 5}}, "models.x: Input should be a valid dictionary"),
        ({"models": []}, "models: Input should be a valid dictionary"),
    ],
)
def test_file_errors_name_the_key(tmp_path: Path, values: dict[str, Any], message: str) -> None:
    config = write_yaml(tmp_path / "turnout.yaml", values)
    with pytest.raises(SettingsError) as caught:
        load_settings(config)
    assert str(caught.value).startswith(f"{config}: ")
    assert message in str(caught.value)


def test_environment_errors_name_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_yaml(tmp_path / "turnout.yaml", {"http_port": 9000})
    monkeypatch.setenv("TURNOUT_HTTP_PORT", "eighty")
    with pytest.raises(SettingsError) as caught:
        load_settings(config)
    # The environment is blamed, not the file that was fine.
    assert str(caught.value).startswith(
        "TURNOUT_* environment: http_port: Input should be a valid integer"
    )


def test_override_errors_name_the_key() -> None:
    with pytest.raises(SettingsError, match="http_port: Input should be less than or equal"):
        load_settings(http_port=65536)


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SettingsError, match=f"{missing}: "):
        load_settings(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("http_port: [1,\n")
    with pytest.raises(SettingsError, match=f"{broken}: "):
        load_settings(broken)
    listing = write_yaml(tmp_path / "list.yaml", [1, 2])
    with pytest.raises(SettingsError, match="expected a mapping at the top level"):
        load_settings(listing)


# -- model configs ----------------------------------------------------------------------------


def test_model_config_defaults() -> None:
    config = ModelConfig()
    assert config.max_batch_size == 64
    assert config.max_queue_delay_us == 500
    assert config.preferred_batch_sizes == []
    assert config.max_queue_size == 1024
    assert config.default_timeout_us == 30_000_000
    assert config.max_inflight_batches is None  # the backend's default
    assert config.device == "cpu"


def test_model_config_merge_order(tmp_path: Path) -> None:
    model_dir = tmp_path / "x"
    write_yaml(model_dir / "config.yaml", {"max_batch_size": 16, "max_queue_delay_us": 200})
    settings = ServerSettings(
        model_defaults={"max_batch_size": 8, "max_queue_delay_us": 100, "max_queue_size": 10},
        models={"x": {"max_batch_size": 32}, "y": {"max_batch_size": 1}},
    )
    config = load_model_config(model_dir, settings)
    assert config.max_batch_size == 32  # models.x beats config.yaml beats model_defaults
    assert config.max_queue_delay_us == 200  # config.yaml beats model_defaults
    assert config.max_queue_size == 10  # model_defaults beats the built-in default
    assert config.max_inflight_batches is None  # built-in default: the backend's


def test_model_config_without_a_file(tmp_path: Path) -> None:
    settings = ServerSettings(model_defaults={"device": "auto"}, models={"x": {"num_replicas": 3}})
    config = load_model_config(tmp_path / "x", settings)
    assert (config.device, config.num_replicas, config.max_batch_size) == ("auto", 3, 64)
    assert load_model_config(tmp_path / "other", ServerSettings()) == ModelConfig()


def test_model_config_errors_name_the_key_where_it_was_set(tmp_path: Path) -> None:
    model_dir = tmp_path / "x"
    config_file = write_yaml(model_dir / "config.yaml", {"max_queue_size": 0})
    with pytest.raises(SettingsError) as caught:
        load_model_config(model_dir, ServerSettings())
    assert f"{config_file}: max_queue_size: Input should be greater than or equal to 1" in str(
        caught.value
    )

    config_file.write_text("max_batch_size: 4\n")
    settings = ServerSettings(models={"x": {"max_batch_size": -1}})
    with pytest.raises(SettingsError, match=r"models\.x\.max_batch_size: Input should be greater"):
        load_model_config(model_dir, settings)

    settings = ServerSettings(model_defaults={"device": "tpu"})
    with pytest.raises(SettingsError, match=r"model_defaults\.device: Input should be 'cpu'"):
        load_model_config(model_dir, settings)


def test_model_config_unknown_key(tmp_path: Path) -> None:
    model_dir = tmp_path / "x"
    write_yaml(model_dir / "config.yaml", {"max_batch": 4})
    with pytest.raises(SettingsError, match="max_batch: Extra inputs are not permitted"):
        load_model_config(model_dir, ServerSettings())
    with pytest.raises(ValidationError, match="max_batch_sise"):
        ModelConfig.model_validate({"max_batch_sise": 4})


@pytest.mark.parametrize("sizes", [[4, 16], [0], [-2]])
def test_preferred_sizes_must_fit_max_batch_size(sizes: list[int]) -> None:
    with pytest.raises(
        ValidationError, match=r"(?s)preferred_batch_sizes.*between 1 and max_batch_size"
    ):
        ModelConfig(max_batch_size=8, preferred_batch_sizes=sizes)


def test_preferred_sizes_within_max_batch_size() -> None:
    config = ModelConfig(max_batch_size=8, preferred_batch_sizes=[2, 8])
    assert config.preferred_batch_sizes == [2, 8]


def test_preferred_sizes_checked_against_the_merged_max(tmp_path: Path) -> None:
    model_dir = tmp_path / "x"
    write_yaml(model_dir / "config.yaml", {"max_batch_size": 128})
    settings = ServerSettings(models={"x": {"preferred_batch_sizes": [100]}})
    assert load_model_config(model_dir, settings).preferred_batch_sizes == [100]
    settings = ServerSettings(models={"x": {"preferred_batch_sizes": [200]}})
    with pytest.raises(SettingsError, match=r"preferred_batch_sizes.*max_batch_size \(128\)"):
        load_model_config(model_dir, settings)


def test_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file go together"):
        ServerSettings(tls_cert_file=tmp_path / "cert.pem")
    with pytest.raises(ValidationError, match="go together"):
        ServerSettings(tls_key_file=tmp_path / "key.pem")
    both = ServerSettings(tls_cert_file=tmp_path / "c.pem", tls_key_file=tmp_path / "k.pem")
    assert both.tls_client_ca_file is None
