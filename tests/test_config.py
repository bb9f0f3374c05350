"""Tests of forwarder.config: defaults, the TOML file, the environment, tokens and validation."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from forwarder.config import (
    DEFAULT_CONFIG_PATH,
    ApiConfig,
    Config,
    ConfigError,
    MetricsConfig,
    SiteConfig,
    check_config,
    load_config,
)

EXAMPLE_PATH = Path(__file__).resolve().parents[1] / "config" / "forwarder.toml"

# Token values that the tests search for in messages, reprs and public output.
SECRET = "tok-5f2d9c81e7a4"
SITE_SECRET = "tok-site-a93e04b6"

# Every default of the contract, written out so that a changed default fails here.
DEFAULTS = {
    ("redis", "url"): "redis://127.0.0.1:6379/0",
    ("redis", "key_prefix"): "jirafe",
    ("redis", "socket_timeout_s"): 5.0,
    ("redis", "connect_timeout_s"): 5.0,
    ("redis", "health_check_interval_s"): 10.0,
    ("redis", "block_timeout_s"): 1.0,
    ("api", "base_url"): "https://event.jirafe.com/v2",
    ("api", "token"): None,
    ("api", "token_file"): None,
    ("api", "max_batch_bytes"): 10_000_000,
    ("api", "timeout_s"): 30.0,
    ("api", "connect_timeout_s"): 5.0,
    ("api", "read_timeout_s"): 15.0,
    ("api", "max_concurrency"): 8,
    ("batch", "linger_ms"): 500,
    ("batch", "max_events"): 1000,
    ("batch", "intake_chunk_events"): 5000,
    ("batch", "validate_events"): False,
    ("retry", "base_s"): 0.5,
    ("retry", "cap_s"): 300.0,
    ("retry", "max_attempts"): 5,
    ("retry", "max_outage_s"): 259_200.0,
    ("retry", "max_retry_after_s"): 3600.0,
    ("retry", "pause_base_s"): 30.0,
    ("retry", "pause_cap_s"): 900.0,
    ("dead_letter", "max_entries"): 100_000,
    ("dead_letter", "max_bytes"): 1_073_741_824,
    ("dead_letter", "excerpt_bytes"): 2000,
    ("lease", "ttl_s"): 15.0,
    ("lease", "renew_interval_s"): 5.0,
    ("shutdown", "grace_s"): 10.0,
    ("shutdown", "hard_deadline_s"): 25.0,
    ("metrics", "listen"): "127.0.0.1:9187",
    ("log", "level"): "info",
    ("log", "format"): "auto",
}

# (section, key, TOML literal, environment value, expected value). Each expected value
# differs from the default, so a setting that is not read fails its test.
# Tokens are covered by the token tests below.
SETTINGS = [
    ("redis", "url", '"rediss://cache.internal:6380/2"', "rediss://cache.internal:6380/2",
     "rediss://cache.internal:6380/2"),
    ("redis", "key_prefix", '"{shop}"', "{shop}", "{shop}"),
    ("redis", "socket_timeout_s", "7.5", "7.5", 7.5),
    ("redis", "connect_timeout_s", "2", "2", 2.0),
    ("redis", "health_check_interval_s", "0", "0", 0.0),
    ("redis", "block_timeout_s", "2.5", "2.5", 2.5),
    ("api", "base_url", '"http://127.0.0.1:8080/v2/"', "http://127.0.0.1:8080/v2/",
     "http://127.0.0.1:8080/v2"),
    ("api", "max_batch_bytes", "1024", "1024", 1024),
    ("api", "timeout_s", "45", "45", 45.0),
    ("api", "connect_timeout_s", "2.5", "2.5", 2.5),
    ("api", "read_timeout_s", "20.0", "20.0", 20.0),
    ("api", "max_concurrency", "2", "2", 2),
    ("batch", "linger_ms", "0", "0", 0),
    ("batch", "max_events", "50", "50", 50),
    ("batch", "intake_chunk_events", "100", "100", 100),
    ("batch", "validate_events", "true", "yes", True),
    ("retry", "base_s", "1.5", "1.5", 1.5),
    ("retry", "cap_s", "120", "120", 120.0),
    ("retry", "max_attempts", "9", "9", 9),
    ("retry", "max_outage_s", "3600.0", "3600.0", 3600.0),
    ("retry", "max_retry_after_s", "600", "600", 600.0),
    ("retry", "pause_base_s", "60.0", "60.0", 60.0),
    ("retry", "pause_cap_s", "1800", "1800", 1800.0),
    ("dead_letter", "max_entries", "5000", "5000", 5000),
    ("dead_letter", "max_bytes", "2048", "2048", 2048),
    ("dead_letter", "excerpt_bytes", "0", "0", 0),
    ("lease", "ttl_s", "30", "30", 30.0),
    ("lease", "renew_interval_s", "2.5", "2.5", 2.5),
    ("shutdown", "grace_s", "5", "5", 5.0),
    ("shutdown", "hard_deadline_s", "20.0", "20.0", 20.0),
    ("metrics", "listen", '"[::1]:0"', "[::1]:0", "[::1]:0"),
    ("log", "level", '"debug"', "DEBUG", "debug"),
    ("log", "format", '"json"', "json", "json"),
]  # fmt: skip


def env_name(section: str, key: str) -> str:
    return f"JIRAFE_FORWARDER_{section}_{key}".upper()


def write_config(tmp_path: Path, text: str, name: str = "forwarder.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_for(path: Path | None, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, env or {})
    return caught.value.problems


def setting(config: Config, section: str, key: str) -> object:
    return getattr(getattr(config, section), key)


# Defaults


def test_defaults_match_contract() -> None:
    config = load_config(None, {})

    for (section, key), expected in DEFAULTS.items():
        assert setting(config, section, key) == expected, f"{section}.{key}"
    assert config.sites == {}
    assert config.source_path is None
    assert config == Config()


def test_defaults_table_covers_every_field() -> None:
    fields = {
        (section.name, item.name)
        for section in dataclasses.fields(Config)
        if section.name not in ("sites", "source_path")
        for item in dataclasses.fields(section.default_factory())
    }

    assert set(DEFAULTS) == fields
    tested = {(section, key) for section, key, *_ in SETTINGS}
    assert tested | {("api", "token"), ("api", "token_file")} == fields


def test_default_config_path() -> None:
    assert DEFAULT_CONFIG_PATH == "/etc/jirafe-forwarder/forwarder.toml"


# Each setting from TOML and from the environment


@pytest.mark.parametrize(("section", "key", "literal", "raw", "expected"), SETTINGS)
def test_setting_from_toml(
    tmp_path: Path, section: str, key: str, literal: str, raw: str, expected: object
) -> None:
    path = write_config(tmp_path, f"[{section}]\n{key} = {literal}\n")

    config = load_config(path, {})

    assert expected != DEFAULTS[section, key]
    assert setting(config, section, key) == expected
    assert type(setting(config, section, key)) is type(expected)


@pytest.mark.parametrize(("section", "key", "literal", "raw", "expected"), SETTINGS)
def test_setting_from_env(section: str, key: str, literal: str, raw: str, expected: object) -> None:
    config = load_config(None, {env_name(section, key): raw})

    assert setting(config, section, key) == expected
    assert type(setting(config, section, key)) is type(expected)


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, "[batch]\nlinger_ms = 100\nmax_events = 20\n[dead_letter]\nmax_entries = 7\n"
    )
    env = {
        "JIRAFE_FORWARDER_BATCH_LINGER_MS": "200",
        "JIRAFE_FORWARDER_DEAD_LETTER_MAX_ENTRIES": "9",
    }

    config = load_config(path, env)

    assert config.batch.linger_ms == 200
    assert config.batch.max_events == 20
    assert config.dead_letter.max_entries == 9


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("1", True), ("Yes", True), ("false", False), ("0", False), ("NO", False)],
)
def test_env_boolean_words(raw: str, expected: bool) -> None:
    config = load_config(None, {"JIRAFE_FORWARDER_BATCH_VALIDATE_EVENTS": raw})

    assert config.batch.validate_events is expected


def test_env_ignores_other_variables() -> None:
    config = load_config(None, {"PATH": "/usr/bin", "JIRAFE_OTHER": "1", "jirafe_forwarder_x": "1"})

    assert config == Config()


def test_metrics_listen_empty_turns_off(tmp_path: Path) -> None:
    from_file = load_config(write_config(tmp_path, '[metrics]\nlisten = ""\n'), {})
    from_env = load_config(None, {"JIRAFE_FORWARDER_METRICS_LISTEN": ""})

    assert from_file.metrics.listen is None
    assert from_env.metrics.listen is None
    assert from_file.metrics.address is None


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:9187", ("127.0.0.1", 9187)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("metrics.example.internal:80", ("metrics.example.internal", 80)),
    ],
)
def test_metrics_address_splits_host_and_port(listen: str, address: tuple[str, int]) -> None:
    config = load_config(None, {"JIRAFE_FORWARDER_METRICS_LISTEN": listen})

    assert config.metrics.listen == listen
    assert config.metrics.address == address


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1", "redis://user:pw@localhost:6379/15", "unix:///run/redis/redis.sock"],
)
def test_redis_url_accepted(url: str) -> None:
    assert load_config(None, {"JIRAFE_FORWARDER_REDIS_URL": url}).redis.url == url


def test_source_path_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path, "")
    monkeypatch.chdir(tmp_path)

    config = load_config("forwarder.toml", {})

    assert config.source_path == str(tmp_path / "forwarder.toml")


def test_config_is_frozen_with_slots() -> None:
    config = load_config(None, {})

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch.linger_ms = 1  # type: ignore[misc]
    assert not hasattr(config.batch, "__dict__")
    assert not hasattr(config, "__dict__")


# Tokens


def test_api_token_inline_from_toml_and_env(tmp_path: Path) -> None:
    from_file = load_config(write_config(tmp_path, f'[api]\ntoken = "{SECRET}"\n'), {})
    from_env = load_config(None, {"JIRAFE_FORWARDER_API_TOKEN": SECRET})

    assert from_file.api.token == SECRET
    assert from_file.api.token_file is None
    assert from_env.api.token == SECRET


def test_api_token_file_relative_to_config_dir(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(SECRET + "\n")
    path = write_config(tmp_path, '[api]\ntoken_file = "token"\n')

    config = load_config(path, {})

    assert config.api.token == SECRET
    assert config.api.token_file == str(tmp_path / "token")


def test_api_token_file_from_env(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(SECRET + "\r\n")

    config = load_config(None, {"JIRAFE_FORWARDER_API_TOKEN_FILE": str(tmp_path / "token")})

    assert config.api.token == SECRET
    assert config.api.token_file == str(tmp_path / "token")


def test_token_file_relative_to_credentials_dir(tmp_path: Path) -> None:
    config_dir = tmp_path / "etc"
    credentials_dir = tmp_path / "credentials"
    config_dir.mkdir()
    credentials_dir.mkdir()
    (config_dir / "jirafe-token").write_text("tok-from-config-dir\n")
    (credentials_dir / "jirafe-token").write_text(SECRET + "\n")
    (credentials_dir / "site-token").write_text(SITE_SECRET)
    path = write_config(
        config_dir,
        '[api]\ntoken_file = "jirafe-token"\n[sites."1234"]\ntoken_file = "site-token"\n',
    )

    config = load_config(path, {"CREDENTIALS_DIRECTORY": str(credentials_dir)})

    assert config.api.token == SECRET
    assert config.api.token_file == str(credentials_dir / "jirafe-token")
    assert config.sites["1234"].token == SITE_SECRET
    assert config.sites["1234"].token_file == str(credentials_dir / "site-token")


def test_token_file_without_config_uses_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text(SECRET)
    monkeypatch.chdir(tmp_path)

    config = load_config(None, {"JIRAFE_FORWARDER_API_TOKEN_FILE": "token"})

    assert config.api.token == SECRET
    assert config.api.token_file == str(tmp_path / "token")


def test_site_tokens_from_toml(tmp_path: Path) -> None:
    (tmp_path / "site-5678").write_text(SITE_SECRET + "\n")
    path = write_config(
        tmp_path,
        f'[sites."1234"]\ntoken = "{SECRET}"\n[sites.5678]\ntoken_file = "site-5678"\n',
    )

    config = load_config(path, {})

    assert sorted(config.sites) == ["1234", "5678"]
    assert config.sites["1234"] == SiteConfig(token=SECRET)
    assert config.sites["5678"].token == SITE_SECRET
    assert config.sites["5678"].token_file == str(tmp_path / "site-5678")


def test_site_tokens_from_env(tmp_path: Path) -> None:
    (tmp_path / "site-5678").write_text(SITE_SECRET)
    env = {
        "JIRAFE_FORWARDER_SITES_1234_TOKEN": SECRET,
        "JIRAFE_FORWARDER_SITES_5678_TOKEN_FILE": str(tmp_path / "site-5678"),
    }

    config = load_config(None, env)

    assert config.sites["1234"].token == SECRET
    assert config.sites["1234"].token_file is None
    assert config.sites["5678"].token == SITE_SECRET
    assert config.sites["5678"].token_file == str(tmp_path / "site-5678")


def test_env_token_replaces_file_token_source(tmp_path: Path) -> None:
    # The file's token file does not exist. The environment's token replaces it, so it
    # is not read and no problem is reported.
    path = write_config(
        tmp_path,
        '[api]\ntoken_file = "missing"\n[sites."1234"]\ntoken = "tok-file-site"\n',
    )
    (tmp_path / "env-site-token").write_text(SITE_SECRET)
    env = {
        "JIRAFE_FORWARDER_API_TOKEN": SECRET,
        "JIRAFE_FORWARDER_SITES_1234_TOKEN_FILE": str(tmp_path / "env-site-token"),
    }

    config = load_config(path, env)

    assert config.api.token == SECRET
    assert config.api.token_file is None
    assert config.sites["1234"].token == SITE_SECRET


def test_token_for_prefers_site_token() -> None:
    config = Config(api=ApiConfig(token=SECRET), sites={"1234": SiteConfig(token=SITE_SECRET)})

    assert config.token_for("1234") == SITE_SECRET
    assert config.token_for("999") == SECRET
    assert Config(sites={"1234": SiteConfig(token=SITE_SECRET)}).token_for("999") is None


def test_all_tokens_lists_each_secret_once() -> None:
    config = load_config(
        None,
        {
            "JIRAFE_FORWARDER_API_TOKEN": SECRET,
            "JIRAFE_FORWARDER_SITES_1_TOKEN": SITE_SECRET,
            "JIRAFE_FORWARDER_SITES_2_TOKEN": SECRET,
            "JIRAFE_FORWARDER_REDIS_URL": "redis://forwarder:p%40ss@127.0.0.1:6379/0",
        },
    )

    assert sorted(config.all_tokens()) == sorted([SECRET, SITE_SECRET, "p%40ss", "p@ss"])
    assert Config().all_tokens() == []


# Public output and repr


def test_to_public_dict_masks_tokens(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(SITE_SECRET)
    path = write_config(tmp_path, '[sites."1234"]\ntoken_file = "token"\n')
    env = {
        "JIRAFE_FORWARDER_API_TOKEN": SECRET,
        "JIRAFE_FORWARDER_REDIS_URL": "redis://:hunter2-pw@127.0.0.1:6379/0",
    }

    public = load_config(path, env).to_public_dict()
    text = json.dumps(public)

    assert public["api"]["token"] == "***"
    assert public["sites"] == {"1234": {"token": "***", "token_file": str(tmp_path / "token")}}
    assert public["redis"]["url"] == "redis://:***@127.0.0.1:6379/0"
    assert public["batch"] == {
        "linger_ms": 500,
        "max_events": 1000,
        "intake_chunk_events": 5000,
        "validate_events": False,
    }
    assert public["source_path"] == str(path)
    assert SECRET not in text
    assert SITE_SECRET not in text
    assert "hunter2-pw" not in text


def test_to_public_dict_without_token() -> None:
    public = Config().to_public_dict()

    assert public["api"]["token"] is None
    assert public["metrics"] == {"listen": "127.0.0.1:9187"}
    assert set(public) == {
        "source_path", "redis", "api", "batch", "retry", "dead_letter",
        "lease", "shutdown", "metrics", "log", "sites",
    }  # fmt: skip


def test_repr_masks_tokens() -> None:
    config = load_config(
        None,
        {
            "JIRAFE_FORWARDER_API_TOKEN": SECRET,
            "JIRAFE_FORWARDER_SITES_1234_TOKEN": SITE_SECRET,
            "JIRAFE_FORWARDER_REDIS_URL": "redis://:hunter2-pw@127.0.0.1:6379/0",
        },
    )

    for text in (repr(config), str(config), repr(config.api), repr(config.sites)):
        assert SECRET not in text
        assert SITE_SECRET not in text
        assert "hunter2-pw" not in text
    assert "token='***'" in repr(config.api)
    assert repr(config.sites["1234"]) == "SiteConfig(token='***', token_file=None)"
    assert "url='redis://:***@127.0.0.1:6379/0'" in repr(config.redis)


# Rejected values: (config file text, environment, expected problems).
# "{dir}" stands for the directory of the config file.
MALFORMED = [
    pytest.param('[api]\nmax_batch_bytes = "10MB"\n', {},
                 ["api.max_batch_bytes: invalid value '10MB': expected an integer from 1024 to 100000000"],
                 id="string-for-int"),
    pytest.param("[batch]\nmax_events = true\n", {},
                 ["batch.max_events: invalid value true: expected an integer from 1 to 1000000"],
                 id="bool-for-int"),
    pytest.param("[batch]\nlinger_ms = 1.5\n", {},
                 ["batch.linger_ms: invalid value 1.5: expected an integer from 0 to 60000"],
                 id="float-for-int"),
    pytest.param("[batch]\nvalidate_events = 1\n", {},
                 ["batch.validate_events: invalid value 1: expected a boolean (true or false)"],
                 id="int-for-bool"),
    pytest.param('[api]\ntimeout_s = "30"\n', {},
                 ["api.timeout_s: invalid value '30': expected a number of seconds > 0"],
                 id="string-for-float"),
    pytest.param("[retry]\nbase_s = false\n", {},
                 ["retry.base_s: invalid value false: expected a number of seconds > 0"],
                 id="bool-for-float"),
    pytest.param("[log]\nlevel = 10\n", {},
                 ["log.level: invalid value 10: expected one of debug, info, warning, error"],
                 id="int-for-string"),
    pytest.param("[api]\nmax_batch_bytes = -5\n", {},
                 ["api.max_batch_bytes: invalid value -5: expected an integer from 1024 to 100000000"],
                 id="size-negative"),
    pytest.param("[api]\nmax_batch_bytes = 1023\n", {},
                 ["api.max_batch_bytes: invalid value 1023: expected an integer from 1024 to 100000000"],
                 id="size-below-minimum"),
    pytest.param("[api]\nmax_batch_bytes = 100_000_001\n", {},
                 ["api.max_batch_bytes: invalid value 100000001: expected an integer from 1024 to 100000000"],
                 id="size-above-maximum"),
    pytest.param("[api]\nmax_concurrency = 0\n", {},
                 ["api.max_concurrency: invalid value 0: expected an integer from 1 to 1024"],
                 id="concurrency-zero"),
    pytest.param("[batch]\nlinger_ms = -1\n", {},
                 ["batch.linger_ms: invalid value -1: expected an integer from 0 to 60000"],
                 id="linger-negative"),
    pytest.param("[batch]\nlinger_ms = 60001\n", {},
                 ["batch.linger_ms: invalid value 60001: expected an integer from 0 to 60000"],
                 id="linger-above-maximum"),
    pytest.param("[batch]\nintake_chunk_events = 0\n", {},
                 ["batch.intake_chunk_events: invalid value 0: expected an integer from 1 to 100000"],
                 id="chunk-zero"),
    pytest.param("[retry]\nmax_attempts = 0\n", {},
                 ["retry.max_attempts: invalid value 0: expected an integer from 1 to 1000"],
                 id="attempts-zero"),
    pytest.param("[dead_letter]\nmax_entries = 0\n", {},
                 ["dead_letter.max_entries: invalid value 0: expected an integer >= 1"],
                 id="entries-zero"),
    pytest.param("[dead_letter]\nmax_bytes = 1000\n", {},
                 ["dead_letter.max_bytes: invalid value 1000: expected an integer >= 1024"],
                 id="store-below-minimum"),
    pytest.param("[dead_letter]\nexcerpt_bytes = -1\n", {},
                 ["dead_letter.excerpt_bytes: invalid value -1: expected an integer from 0 to 1048576"],
                 id="excerpt-negative"),
    pytest.param("[api]\ntimeout_s = 0\n", {},
                 ["api.timeout_s: invalid value 0.0: expected a number of seconds > 0"],
                 id="timeout-zero"),
    pytest.param("[redis]\nconnect_timeout_s = -0.5\n", {},
                 ["redis.connect_timeout_s: invalid value -0.5: expected a number of seconds > 0"],
                 id="timeout-negative"),
    pytest.param("[retry]\nmax_outage_s = inf\n", {},
                 ["retry.max_outage_s: invalid value inf: expected a number of seconds > 0"],
                 id="infinite"),
    pytest.param("[retry]\nmax_retry_after_s = nan\n", {},
                 ["retry.max_retry_after_s: invalid value nan: expected a number of seconds > 0"],
                 id="not-a-number"),
    pytest.param("[redis]\nhealth_check_interval_s = -1\n", {},
                 ["redis.health_check_interval_s: invalid value -1.0: expected a number of seconds >= 0"],
                 id="interval-negative"),
    pytest.param("[shutdown]\ngrace_s = -1\n", {},
                 ["shutdown.grace_s: invalid value -1.0: expected a number of seconds >= 0"],
                 id="grace-negative"),
    pytest.param("[lease]\nttl_s = 0.5\n", {},
                 ["lease.ttl_s: invalid value 0.5: expected a number of seconds >= 1"],
                 id="lease-below-one-second"),
    pytest.param('[redis]\nkey_prefix = ""\n', {},
                 ["redis.key_prefix: invalid value '': expected a non-empty string without whitespace"],
                 id="prefix-empty"),
    pytest.param('[redis]\nkey_prefix = "my shop"\n', {},
                 ["redis.key_prefix: invalid value 'my shop': expected a non-empty string without whitespace"],
                 id="prefix-with-space"),
    pytest.param('[log]\nlevel = "verbose"\n', {},
                 ["log.level: invalid value 'verbose': expected one of debug, info, warning, error"],
                 id="log-level"),
    pytest.param('[log]\nformat = "text"\n', {},
                 ["log.format: invalid value 'text': expected one of auto, json, console"],
                 id="log-format"),
    # URLs
    pytest.param('[api]\nbase_url = "ftp://event.jirafe.com/v2"\n', {},
                 ["api.base_url: invalid value 'ftp://event.jirafe.com/v2': expected an http:// or https:// URL with a host"],
                 id="base-url-scheme"),
    pytest.param('[api]\nbase_url = "https:///v2"\n', {},
                 ["api.base_url: invalid value 'https:///v2': expected an http:// or https:// URL with a host"],
                 id="base-url-no-host"),
    pytest.param('[api]\nbase_url = "event.jirafe.com/v2"\n', {},
                 ["api.base_url: invalid value 'event.jirafe.com/v2': expected an http:// or https:// URL with a host"],
                 id="base-url-no-scheme"),
    pytest.param('[api]\nbase_url = "https://event.jirafe.com/v2?debug=1"\n', {},
                 ["api.base_url: invalid value 'https://event.jirafe.com/v2?debug=1': expected a URL without query or fragment"],
                 id="base-url-query"),
    pytest.param('[api]\nbase_url = "https://user:hunter2@event.jirafe.com"\n', {},
                 ["api.base_url: invalid value 'https://user:***@event.jirafe.com': expected a URL without user or password (set api.token instead)"],
                 id="base-url-password-masked"),
    pytest.param('[api]\nbase_url = "https://event.jirafe.com:99999/v2"\n', {},
                 ["api.base_url: invalid value 'https://event.jirafe.com:99999/v2': expected an http:// or https:// URL (Port out of range 0-65535)"],
                 id="base-url-port"),
    pytest.param('[redis]\nurl = "http://127.0.0.1:6379"\n', {},
                 ["redis.url: invalid value 'http://127.0.0.1:6379': expected a redis://, rediss://, unix:// or redis+sentinel:// URL"],
                 id="redis-url-scheme"),
    pytest.param('[redis]\nurl = "redis://:6379/0"\n', {},
                 ["redis.url: invalid value 'redis://:6379/0': expected a redis:// or rediss:// URL with a host"],
                 id="redis-url-no-host"),
    pytest.param('[redis]\nurl = "redis://127.0.0.1:6379/db"\n', {},
                 ["redis.url: invalid value 'redis://127.0.0.1:6379/db': expected a database number as the URL path, such as /0"],
                 id="redis-url-database"),
    pytest.param('[redis]\nurl = "unix://"\n', {},
                 ["redis.url: invalid value 'unix://': expected a unix:// URL with a socket path, such as unix:///run/redis.sock"],
                 id="redis-url-unix-no-path"),
    # Listen addresses
    pytest.param('[metrics]\nlisten = "9187"\n', {},
                 ["metrics.listen: invalid value '9187': expected HOST:PORT, or an empty string to turn metrics off"],
                 id="listen-no-host"),
    pytest.param('[metrics]\nlisten = ":9187"\n', {},
                 ["metrics.listen: invalid value ':9187': expected HOST:PORT, or an empty string to turn metrics off"],
                 id="listen-empty-host"),
    pytest.param('[metrics]\nlisten = "127.0.0.1:65536"\n', {},
                 ["metrics.listen: invalid value '127.0.0.1:65536': expected a port from 0 to 65535, not '65536'"],
                 id="listen-port-too-large"),
    pytest.param('[metrics]\nlisten = "127.0.0.1:http"\n', {},
                 ["metrics.listen: invalid value '127.0.0.1:http': expected a port from 0 to 65535, not 'http'"],
                 id="listen-port-name"),
    pytest.param('[metrics]\nlisten = "::1:9187"\n', {},
                 ["metrics.listen: invalid value '::1:9187': expected HOST:PORT with the IPv6 address in brackets, such as [::1]:9187"],
                 id="listen-ipv6-no-brackets"),
    pytest.param('[metrics]\nlisten = "[::1]9187"\n', {},
                 ["metrics.listen: invalid value '[::1]9187': expected HOST:PORT with the IPv6 address in brackets, such as [::1]:9187"],
                 id="listen-ipv6-no-colon"),
    pytest.param('[metrics]\nlisten = "[::g]:9187"\n', {},
                 ["metrics.listen: invalid value '[::g]:9187': expected a valid IPv6 address in brackets, not '::g'"],
                 id="listen-bad-ipv6"),
    pytest.param('[metrics]\nlisten = "300.0.0.1:9187"\n', {},
                 ["metrics.listen: invalid value '300.0.0.1:9187': expected a valid IPv4 address, not '300.0.0.1'"],
                 id="listen-bad-ipv4"),
    pytest.param('[metrics]\nlisten = "metrics_host!:9187"\n', {},
                 ["metrics.listen: invalid value 'metrics_host!:9187': expected a valid host name or IP address, not 'metrics_host!'"],
                 id="listen-bad-hostname"),
    # Unknown names
    pytest.param("[batch]\nlinger = 5\n", {},
                 ["batch.linger: unknown key: did you mean linger_ms?"],
                 id="unknown-key-suggestion"),
    pytest.param("[log]\ncolour = true\n", {},
                 ["log.colour: unknown key: expected one of level, format"],
                 id="unknown-key-list"),
    pytest.param("[reddis]\nurl = 'redis://127.0.0.1'\n", {},
                 ["reddis: unknown section: did you mean redis?"],
                 id="unknown-section-suggestion"),
    pytest.param("[telemetry]\n", {},
                 ["telemetry: unknown section: expected one of redis, api, batch, retry, "
                  "dead_letter, lease, shutdown, metrics, log, sites"],
                 id="unknown-section-list"),
    pytest.param("linger_ms = 5\n", {},
                 ["linger_ms: unknown key: did you mean batch.linger_ms?"],
                 id="key-outside-section"),
    pytest.param('api = "https://event.jirafe.com/v2"\n', {},
                 ["api: expected a table [api], found a string"],
                 id="section-not-table"),
    # Sites
    pytest.param('[sites.shop1]\ntoken = "tok-a"\n', {},
                 ["sites.shop1: invalid site id 'shop1': expected digits, such as \"1234\""],
                 id="site-id-not-digits"),
    pytest.param('[sites."12 34"]\ntoken = "tok-a"\n', {},
                 ["sites.'12 34': invalid site id '12 34': expected digits, such as \"1234\""],
                 id="site-id-with-space"),
    pytest.param('[sites]\n"1234" = "tok-a"\n', {},
                 ["sites.1234: expected a table with token or token_file, found a string"],
                 id="site-not-table"),
    pytest.param('[sites."1234"]\ntokn = "tok-a"\n', {},
                 ["sites.1234.tokn: unknown key: did you mean token?",
                  "sites.1234: missing token: set token or token_file"],
                 id="site-unknown-key"),
    pytest.param('[sites."1234"]\n', {},
                 ["sites.1234: missing token: set token or token_file"],
                 id="site-without-token"),
    pytest.param('[sites."1234"]\ntoken = 1234\n', {},
                 ["sites.1234.token: invalid value (not shown): expected a non-empty string of visible ASCII characters"],
                 id="site-token-not-string"),
    # Tokens and token files
    pytest.param('[api]\ntoken = "tok-a"\ntoken_file = "token"\n', {},
                 ["api.token and api.token_file are both set: set only one of them"],
                 id="token-and-token-file"),
    pytest.param('[sites."1234"]\ntoken = "tok-a"\ntoken_file = "token"\n', {},
                 ["sites.1234.token and sites.1234.token_file are both set: set only one of them"],
                 id="site-token-and-token-file"),
    pytest.param('[api]\ntoken_file = "missing-token"\n', {},
                 ["api.token_file: cannot read token file {dir}/missing-token: No such file or directory"],
                 id="token-file-missing"),
    pytest.param('[api]\ntoken_file = "."\n', {},
                 ["api.token_file: cannot read token file {dir}: Is a directory"],
                 id="token-file-directory"),
    pytest.param('[api]\ntoken_file = "empty-token"\n', {},
                 ["api.token_file: token file {dir}/empty-token is empty: expected the token"],
                 id="token-file-empty"),
    pytest.param('[api]\ntoken_file = "spaced-token"\n', {},
                 ["api.token_file: token in file {dir}/spaced-token is invalid: expected a non-empty string of visible ASCII characters"],
                 id="token-file-invalid-token"),
    pytest.param('[api]\ntoken_file = "binary-token"\n', {},
                 ["api.token_file: token file {dir}/binary-token is not UTF-8 text"],
                 id="token-file-not-text"),
    pytest.param('[api]\ntoken_file = "huge-token"\n', {},
                 ["api.token_file: token file {dir}/huge-token is larger than 65536 bytes: expected a file that contains only the token"],
                 id="token-file-too-large"),
    pytest.param('[api]\ntoken_file = ""\n', {},
                 ["api.token_file: invalid value '': expected a non-empty file path"],
                 id="token-file-empty-path"),
    pytest.param('[api]\ntoken = ""\n', {},
                 ["api.token: invalid value (not shown): expected a non-empty string of visible ASCII characters"],
                 id="token-empty"),
    # Settings that constrain each other
    pytest.param("[redis]\nblock_timeout_s = 5\n", {},
                 ["redis.block_timeout_s: invalid value 5.0: expected less than redis.socket_timeout_s (5.0)"],
                 id="block-timeout-not-below-socket-timeout"),
    pytest.param("[redis]\nsocket_timeout_s = 0.5\n", {},
                 ["redis.block_timeout_s: invalid value 1.0: expected less than redis.socket_timeout_s (0.5)"],
                 id="socket-timeout-below-default-block-timeout"),
    pytest.param("[api]\nconnect_timeout_s = 31\n", {},
                 ["api.connect_timeout_s: invalid value 31.0: expected at most api.timeout_s (30.0)"],
                 id="connect-timeout-above-total"),
    pytest.param("[api]\nread_timeout_s = 40\n", {},
                 ["api.read_timeout_s: invalid value 40.0: expected at most api.timeout_s (30.0)"],
                 id="read-timeout-above-total"),
    pytest.param("[retry]\ncap_s = 0.25\n", {},
                 ["retry.cap_s: invalid value 0.25: expected at least retry.base_s (0.5)"],
                 id="cap-below-base"),
    pytest.param("[retry]\npause_cap_s = 10\n", {},
                 ["retry.pause_cap_s: invalid value 10.0: expected at least retry.pause_base_s (30.0)"],
                 id="pause-cap-below-base"),
    pytest.param("[lease]\nrenew_interval_s = 5.5\n", {},
                 ["lease.renew_interval_s: invalid value 5.5: expected at most a third of lease.ttl_s (15.0)"],
                 id="renewal-above-third-of-ttl"),
    pytest.param("[lease]\nttl_s = 14.9\n", {},
                 ["lease.renew_interval_s: invalid value 5.0: expected at most a third of lease.ttl_s (14.9)"],
                 id="ttl-below-three-renewals"),
    pytest.param("[shutdown]\nhard_deadline_s = 10\n", {},
                 ["shutdown.hard_deadline_s: invalid value 10.0: expected greater than shutdown.grace_s (10.0)"],
                 id="deadline-not-after-grace"),
    pytest.param("[shutdown]\nhard_deadline_s = 30\n", {},
                 ["shutdown.hard_deadline_s: invalid value 30.0: expected less than 30, the TimeoutStopSec of the systemd unit"],
                 id="deadline-beyond-systemd-timeout"),
    pytest.param("[redis]\nsocket_timeout_s = -1\nblock_timeout_s = 6\n", {},
                 ["redis.socket_timeout_s: invalid value -1.0: expected a number of seconds > 0"],
                 id="relation-skipped-for-rejected-value"),
    pytest.param("[batch]\nlinger_ms = 100\n", {"JIRAFE_FORWARDER_REDIS_BLOCK_TIMEOUT_S": "9"},
                 ["JIRAFE_FORWARDER_REDIS_BLOCK_TIMEOUT_S: invalid value 9.0: expected less than redis.socket_timeout_s (5.0)"],
                 id="relation-names-env-variable"),
    # Environment
    pytest.param("", {"JIRAFE_FORWARDER_BATCH_LINGER_MS": "abc"},
                 ["JIRAFE_FORWARDER_BATCH_LINGER_MS: invalid value 'abc': expected an integer from 0 to 60000"],
                 id="env-not-int"),
    pytest.param("", {"JIRAFE_FORWARDER_BATCH_MAX_EVENTS": "1.5"},
                 ["JIRAFE_FORWARDER_BATCH_MAX_EVENTS: invalid value '1.5': expected an integer from 1 to 1000000"],
                 id="env-float-for-int"),
    pytest.param("", {"JIRAFE_FORWARDER_API_MAX_BATCH_BYTES": "-5"},
                 ["JIRAFE_FORWARDER_API_MAX_BATCH_BYTES: invalid value '-5': expected an integer from 1024 to 100000000"],
                 id="env-out-of-range"),
    pytest.param("", {"JIRAFE_FORWARDER_API_TIMEOUT_S": "fast"},
                 ["JIRAFE_FORWARDER_API_TIMEOUT_S: invalid value 'fast': expected a number of seconds > 0"],
                 id="env-not-float"),
    pytest.param("", {"JIRAFE_FORWARDER_RETRY_CAP_S": "inf"},
                 ["JIRAFE_FORWARDER_RETRY_CAP_S: invalid value 'inf': expected a number of seconds > 0"],
                 id="env-infinite"),
    pytest.param("", {"JIRAFE_FORWARDER_BATCH_VALIDATE_EVENTS": "maybe"},
                 ["JIRAFE_FORWARDER_BATCH_VALIDATE_EVENTS: invalid value 'maybe': expected true, false, 1, 0, yes or no"],
                 id="env-not-bool"),
    pytest.param("", {"JIRAFE_FORWARDER_LOG_LEVEL": "trace"},
                 ["JIRAFE_FORWARDER_LOG_LEVEL: invalid value 'trace': expected one of debug, info, warning, error"],
                 id="env-bad-choice"),
    pytest.param("", {"JIRAFE_FORWARDER_METRICS_LISTEN": "localhost"},
                 ["JIRAFE_FORWARDER_METRICS_LISTEN: invalid value 'localhost': expected HOST:PORT, or an empty string to turn metrics off"],
                 id="env-bad-listen"),
    pytest.param("", {"JIRAFE_FORWARDER_BATCH_LINGER": "5"},
                 ["JIRAFE_FORWARDER_BATCH_LINGER: unknown environment variable: did you mean JIRAFE_FORWARDER_BATCH_LINGER_MS?"],
                 id="env-unknown-suggestion"),
    pytest.param("", {"JIRAFE_FORWARDER_TOKEN": "tok-a"},
                 ["JIRAFE_FORWARDER_TOKEN: unknown environment variable: did you mean JIRAFE_FORWARDER_API_TOKEN?"],
                 id="env-unknown-token-suggestion"),
    pytest.param("", {"JIRAFE_FORWARDER_COLOUR": "1"},
                 ["JIRAFE_FORWARDER_COLOUR: unknown environment variable: expected "
                  "JIRAFE_FORWARDER_<SECTION>_<KEY> for a key of the config file, "
                  "or JIRAFE_FORWARDER_SITES_<ID>_TOKEN or _TOKEN_FILE"],
                 id="env-unknown-variable"),
    pytest.param("", {"JIRAFE_FORWARDER_SITES_SHOP_TOKEN": "tok-a"},
                 ["JIRAFE_FORWARDER_SITES_SHOP_TOKEN: invalid site id 'SHOP': expected digits, "
                  "such as JIRAFE_FORWARDER_SITES_1234_TOKEN"],
                 id="env-site-id-not-digits"),
    pytest.param("", {"JIRAFE_FORWARDER_SITES_1234_TOKEN": ""},
                 ["JIRAFE_FORWARDER_SITES_1234_TOKEN: invalid value (not shown): expected a non-empty string of visible ASCII characters"],
                 id="env-site-token-empty"),
    pytest.param("", {"JIRAFE_FORWARDER_API_TOKEN": "tok-a", "JIRAFE_FORWARDER_API_TOKEN_FILE": "token"},
                 ["JIRAFE_FORWARDER_API_TOKEN and JIRAFE_FORWARDER_API_TOKEN_FILE are both set: set only one of them"],
                 id="env-token-and-token-file"),
    pytest.param("", {"JIRAFE_FORWARDER_SITES_1234_TOKEN_FILE": "missing-token", "CREDENTIALS_DIRECTORY": "{dir}"},
                 ["JIRAFE_FORWARDER_SITES_1234_TOKEN_FILE: cannot read token file {dir}/missing-token: No such file or directory"],
                 id="env-site-token-file-missing"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "env", "expected"), MALFORMED)
def test_rejects_malformed(
    tmp_path: Path, text: str, env: dict[str, str], expected: list[str]
) -> None:
    (tmp_path / "token").write_text("tok-in-file\n")
    (tmp_path / "empty-token").write_text("\n")
    (tmp_path / "spaced-token").write_text("tok in file\n")
    (tmp_path / "binary-token").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "huge-token").write_text("x" * 65537)
    path = write_config(tmp_path, text)
    env = {name: value.format(dir=tmp_path) for name, value in env.items()}

    problems = problems_for(path, env)

    assert problems == [message.format(dir=tmp_path) for message in expected]
    assert check_config(path, env) == problems


def test_rejects_invalid_toml_with_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[api]\nbase_url = "https://event.jirafe.com/v2"\ntimeout_s =\n')

    problems = problems_for(path)

    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: invalid TOML: ")
    assert "line 3" in problems[0]


def test_rejects_config_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "forwarder.toml"
    path.write_bytes(b'[log]\nlevel = "\xe9"\n')

    assert problems_for(path) == [f"{path}: invalid TOML: not UTF-8 at byte 15"]


def test_rejects_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    assert problems_for(path) == [f"{path}: cannot read config file: No such file or directory"]


def test_rejects_config_path_that_is_directory(tmp_path: Path) -> None:
    assert problems_for(tmp_path) == [f"{tmp_path}: cannot read config file: Is a directory"]


def test_unreadable_config_still_checks_env(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    problems = problems_for(path, {"JIRAFE_FORWARDER_BATCH_LINGER_MS": "-1"})

    assert problems == [
        f"{path}: cannot read config file: No such file or directory",
        "JIRAFE_FORWARDER_BATCH_LINGER_MS: invalid value '-1': expected an integer from 0 to 60000",
    ]


def test_reports_every_problem_at_once(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "[api]\n"
        "max_batch_bytes = -5\n"
        'base_url = "ftp://x"\n'
        "[batch]\n"
        "lingr_ms = 5\n"
        "[reddis]\n"
        "[sites.abc]\n"
        'token = "tok-a"\n'
        "[shutdown]\n"
        "hard_deadline_s = 5\n",
    )
    env = {
        "JIRAFE_FORWARDER_RETRY_MAX_ATTEMPTS": "many",
        "JIRAFE_FORWARDER_LOG_LEVL": "debug",
    }

    with pytest.raises(ConfigError) as caught:
        load_config(path, env)
    problems = caught.value.problems

    # File problems come first, then the environment's, then settings that constrain
    # each other.
    assert len(problems) == 8
    assert problems[0] == (
        "api.max_batch_bytes: invalid value -5: expected an integer from 1024 to 100000000"
    )
    assert problems[1] == (
        "api.base_url: invalid value 'ftp://x': expected an http:// or https:// URL with a host"
    )
    assert problems[2] == "batch.lingr_ms: unknown key: did you mean linger_ms?"
    assert problems[3] == "reddis: unknown section: did you mean redis?"
    assert problems[4] == "sites.abc: invalid site id 'abc': expected digits, such as \"1234\""
    assert problems[5] == (
        "JIRAFE_FORWARDER_LOG_LEVL: unknown environment variable: "
        "did you mean JIRAFE_FORWARDER_LOG_LEVEL?"
    )
    assert problems[6] == (
        "JIRAFE_FORWARDER_RETRY_MAX_ATTEMPTS: invalid value 'many': "
        "expected an integer from 1 to 1000"
    )
    assert problems[7] == (
        "shutdown.hard_deadline_s: invalid value 5.0: expected greater than shutdown.grace_s (10.0)"
    )
    assert str(caught.value) == "\n".join(problems)
    assert check_config(path, env) == problems


def test_check_config_returns_empty_list_when_valid(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[batch]\nlinger_ms = 20\n")

    assert check_config(path, {}) == []
    assert check_config(None, {}) == []


def test_tokens_never_in_problems(tmp_path: Path) -> None:
    # Each line puts a secret where a problem is reported about it or next to it.
    path = write_config(
        tmp_path,
        "[api]\n"
        f'token = "{SECRET}"\n'
        'token_file = "missing"\n'
        f'tokn = "{SECRET}"\n'
        "[sites]\n"
        f'"1234" = "{SITE_SECRET}"\n'
        f'"5678" = {{ token = "{SITE_SECRET} with space" }}\n'
        f'"9012" = {{ token = ["{SITE_SECRET}"] }}\n'
        '[redis]\nurl = "http://:hunter2-pw@127.0.0.1"\n',
    )
    env = {
        "JIRAFE_FORWARDER_API_TOKN": SECRET,
        "JIRAFE_FORWARDER_SITES_77_TOKEN": f"{SECRET}\n",
        "JIRAFE_FORWARDER_SITES_X1_TOKEN": SECRET,
        "JIRAFE_FORWARDER_SITES_88_TOKEN": SECRET,
        "JIRAFE_FORWARDER_SITES_88_TOKEN_FILE": "missing",
    }

    with pytest.raises(ConfigError) as caught:
        load_config(path, env)
    text = "\n".join([*caught.value.problems, str(caught.value), repr(caught.value)])

    assert len(caught.value.problems) == 12
    assert SECRET not in text
    assert SITE_SECRET not in text
    assert "hunter2-pw" not in text


def test_token_from_file_never_in_problems(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(f"{SECRET} {SITE_SECRET}\n")
    path = write_config(tmp_path, '[api]\ntoken_file = "token"\n')

    problems = problems_for(path)

    assert problems == [
        f"api.token_file: token in file {tmp_path}/token is invalid: "
        "expected a non-empty string of visible ASCII characters"
    ]
    assert SECRET not in problems[0]


def test_config_error_str_one_problem_per_line() -> None:
    error = ConfigError(["a.b: first", "c.d: second"])

    assert error.problems == ["a.b: first", "c.d: second"]
    assert str(error) == "a.b: first\nc.d: second"


def test_metrics_config_default_address() -> None:
    assert MetricsConfig().address == ("127.0.0.1", 9187)


# The shipped example


def test_example_config_loads_with_defaults(tmp_path: Path) -> None:
    (tmp_path / "jirafe-token").write_text(SECRET + "\n")

    config = load_config(EXAMPLE_PATH, {"CREDENTIALS_DIRECTORY": str(tmp_path)})

    assert config.api.token == SECRET
    assert config.api.token_file == str(tmp_path / "jirafe-token")
    assert config.sites == {}
    expected = Config(
        api=ApiConfig(token=SECRET, token_file=str(tmp_path / "jirafe-token")),
        source_path=str(EXAMPLE_PATH),
    )
    assert config == expected


def test_example_config_lists_every_key() -> None:
    text = EXAMPLE_PATH.read_text()
    data = tomllib.loads(text)

    for section in dataclasses.fields(Config):
        if section.name in ("sites", "source_path"):
            continue
        keys = {item.name for item in dataclasses.fields(section.default_factory())}
        if section.name == "api":
            # The inline token is commented out, so that the example contains no secret.
            keys.discard("token")
            assert "\n# token = " in text
        assert set(data[section.name]) == keys, section.name
    assert '\n# [sites."1234"]\n# token_file = ' in text


def test_example_config_contains_no_secret() -> None:
    data = tomllib.loads(EXAMPLE_PATH.read_text())

    assert "token" not in data["api"]
    assert data["api"]["token_file"] == "jirafe-token"
    assert "sites" not in data
    assert "@" not in data["redis"]["url"]
