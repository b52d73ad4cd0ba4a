"""Configuration: defaults, precedence, validation and the token's secrecy."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pytest

from vmtelemetryd import config as config_module
from vmtelemetryd.config import Config, ConfigError, Secret, describe, load_config

TOKEN = "apiv3_s3cr3t-T0KEN_value"
REQUIRED = {"INFLUX_URL": "http://127.0.0.1:8181", "INFLUX_DB": "vms", "INFLUX_TOKEN": TOKEN}
REQUIRED_FILE = "INFLUX_URL=http://127.0.0.1:8181\nINFLUX_DB=vms\n"


def write_env(tmp_path: Path, text: str, name: str = "vmtelemetryd.env") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, environ: Mapping[str, str], file_text: str = "") -> Config:
    return load_config(write_env(tmp_path, file_text), environ)


def problems(tmp_path: Path, environ: Mapping[str, str], file_text: str = "") -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, environ, file_text)
    return caught.value


def test_defaults(tmp_path: Path) -> None:
    path = write_env(tmp_path, "")
    assert load_config(path, REQUIRED) == Config(
        libvirt_uris=("qemu:///system",),
        influx_url="http://127.0.0.1:8181",
        influx_db="vms",
        influx_token=Secret(TOKEN),
        influx_write_api="v3",
        poll_interval=1.0,
        batch_max_lines=2000,
        batch_max_sec=1.0,
        device_cache_ttl=300.0,
        libvirt_timeout=30.0,
        spool_dir=Path("/var/lib/vmtelemetryd/spool"),
        spool_max_bytes=1073741824,
        domains_include=(),
        domains_exclude=(),
        feature_window=5,
        host_tag=None,
        log_level="info",
        source=path,
    )


def test_every_variable_read_from_file(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {},
        """
        # a comment
        LIBVIRT_URI=qemu+ssh://root@hv1/system
        INFLUX_URL=https://influx.example:8443/prefix/
        INFLUX_DB=telemetry
        INFLUX_TOKEN="from-file"
        INFLUX_WRITE_API=V2
        POLL_INTERVAL=2.5
        BATCH_MAX_LINES=500
        BATCH_MAX_SEC=0.5
        DEVICE_CACHE_TTL=0
        LIBVIRT_TIMEOUT=5
        SPOOL_DIR=/srv/spool
        SPOOL_MAX_BYTES=1048576
        DOMAINS_INCLUDE= web-* , ,db-?
        DOMAINS_EXCLUDE=web-test
        FEATURE_WINDOW=2
        HOST_TAG=hv1.example
        LOG_LEVEL=DEBUG
        """,
    )
    assert (config.libvirt_uris[0], config.influx_url) == (
        "qemu+ssh://root@hv1/system",
        "https://influx.example:8443/prefix",
    )
    assert (config.influx_db, config.influx_token.reveal()) == ("telemetry", "from-file")
    assert config.influx_write_api == "v2"
    assert (config.poll_interval, config.batch_max_lines, config.batch_max_sec) == (2.5, 500, 0.5)
    assert (config.device_cache_ttl, config.libvirt_timeout) == (0.0, 5.0)
    assert (config.spool_dir, config.spool_max_bytes) == (Path("/srv/spool"), 1048576)
    assert config.domains_include == ("web-*", "db-?")
    assert config.domains_exclude == ("web-test",)
    assert (config.feature_window, config.host_tag, config.log_level) == (2, "hv1.example", "debug")


def test_environ_beats_file(tmp_path: Path) -> None:
    file_text = "POLL_INTERVAL=5\nINFLUX_DB=from-file\nHOST_TAG=file-host\n"
    config = load(tmp_path, {**REQUIRED, "POLL_INTERVAL": "0.25"}, file_text)
    assert config.poll_interval == 0.25
    assert config.influx_db == "vms"
    assert config.host_tag == "file-host"


def test_empty_host_tag_means_libvirts_hostname(tmp_path: Path) -> None:
    assert load(tmp_path, {**REQUIRED, "HOST_TAG": ""}).host_tag is None


def test_no_interpolation(tmp_path: Path) -> None:
    config = load(tmp_path, {"HOME": "/root"}, REQUIRED_FILE + "INFLUX_TOKEN=ab$HOME${HOME}cd\n")
    assert config.influx_token.reveal() == "ab$HOME${HOME}cd"


def test_default_path_may_be_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_PATH", tmp_path / "absent.env")
    config = load_config(None, REQUIRED)
    assert config.source is None
    assert config.influx_db == "vms"


def test_default_path_read_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_env(tmp_path, REQUIRED_FILE + f"INFLUX_TOKEN={TOKEN}\n")
    monkeypatch.setattr(config_module, "DEFAULT_PATH", path)
    config = load_config(None, {})
    assert (config.source, config.influx_db) == (path, "vms")


def test_explicit_missing_path_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.env"
    with pytest.raises(ConfigError) as caught:
        load_config(missing, REQUIRED)
    assert caught.value.variable == str(missing)
    assert str(missing) in str(caught.value)


def test_unreadable_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as caught:
        load_config(tmp_path, REQUIRED)  # a directory
    assert caught.value.variable == str(tmp_path)


def test_unparsable_line_is_reported_without_its_content(tmp_path: Path) -> None:
    error = problems(tmp_path, {}, f'INFLUX_DB=vms\nINFLUX_TOKEN="{TOKEN}\n')
    assert "line 2" in str(error)
    assert TOKEN not in str(error)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LIBVIRT_URI", ""),
        ("LIBVIRT_URI", "   "),
        ("INFLUX_URL", ""),
        ("INFLUX_URL", "127.0.0.1:8181"),
        ("INFLUX_URL", "localhost:8181"),
        ("INFLUX_URL", "http://127.0.0.1"),
        ("INFLUX_URL", "ftp://127.0.0.1:21"),
        ("INFLUX_URL", "http://:8181"),
        ("INFLUX_URL", "http://host:0"),
        ("INFLUX_URL", "http://host:99999"),
        ("INFLUX_URL", "http://host:port"),
        ("INFLUX_URL", "http://[::1:8181"),
        ("INFLUX_URL", "http://host:8181/?db=x"),
        ("INFLUX_DB", ""),
        ("INFLUX_WRITE_API", "v1"),
        ("INFLUX_WRITE_API", ""),
        ("POLL_INTERVAL", "abc"),
        ("POLL_INTERVAL", ""),
        ("POLL_INTERVAL", "0"),
        ("POLL_INTERVAL", "-1"),
        ("POLL_INTERVAL", "nan"),
        ("POLL_INTERVAL", "inf"),
        ("POLL_INTERVAL", "1s"),
        ("BATCH_MAX_LINES", "0"),
        ("BATCH_MAX_LINES", "1.5"),
        ("BATCH_MAX_LINES", "many"),
        ("BATCH_MAX_SEC", "0"),
        ("BATCH_MAX_SEC", "-inf"),
        ("DEVICE_CACHE_TTL", "-1"),
        ("DEVICE_CACHE_TTL", "nan"),
        ("LIBVIRT_TIMEOUT", "0"),
        ("LIBVIRT_TIMEOUT", "forever"),
        ("SPOOL_DIR", "spool"),
        ("SPOOL_DIR", ""),
        ("SPOOL_MAX_BYTES", "0"),
        ("SPOOL_MAX_BYTES", "1G"),
        ("FEATURE_WINDOW", "1"),
        ("FEATURE_WINDOW", "5.0"),
        ("LOG_LEVEL", "verbose"),
        ("LOG_LEVEL", "critical"),
    ],
)
def test_bad_value_names_its_variable(tmp_path: Path, variable: str, value: str) -> None:
    error = problems(tmp_path, {**REQUIRED, variable: value})
    assert error.variable == variable
    assert list(error.problems) == [variable]
    assert str(error).startswith(f"{variable}: expected ")
    assert repr(value.strip()) in str(error)


@pytest.mark.parametrize(
    ("variable", "value", "attribute", "expected"),
    [
        ("INFLUX_URL", "http://[::1]:8181/", "influx_url", "http://[::1]:8181"),
        ("INFLUX_URL", "HTTPS://influx:443", "influx_url", "HTTPS://influx:443"),
        ("DEVICE_CACHE_TTL", "0", "device_cache_ttl", 0.0),
        ("POLL_INTERVAL", " 0.1 ", "poll_interval", 0.1),
        ("POLL_INTERVAL", "1e-3", "poll_interval", 0.001),
        ("LOG_LEVEL", "Warning", "log_level", "warning"),
        ("LIBVIRT_URI", "test:///default", "libvirt_uris", ("test:///default",)),
        (
            "LIBVIRT_URI",
            " qemu:///system , qemu+ssh://a@hv2/system?keyfile=/k%2Cx&no_tty=1",
            "libvirt_uris",
            ("qemu:///system", "qemu+ssh://a@hv2/system?keyfile=/k,x&no_tty=1"),
        ),
        ("STATS_SHARDS", "auto", "stats_shards", "auto"),
        ("STATS_SHARDS", "AUTO", "stats_shards", "auto"),
        ("STATS_SHARDS", "4", "stats_shards", 4),
        ("DOMAINS_EXCLUDE", " , ", "domains_exclude", ()),
    ],
)
def test_good_value(
    tmp_path: Path, variable: str, value: str, attribute: str, expected: object
) -> None:
    assert getattr(load(tmp_path, {**REQUIRED, variable: value}), attribute) == expected


def test_url_with_credentials_is_rejected_without_echoing_them(tmp_path: Path) -> None:
    error = problems(tmp_path, {**REQUIRED, "INFLUX_URL": "http://admin:hunter2@influx:8181"})
    assert error.variable == "INFLUX_URL"
    assert "hunter2" not in str(error)


def test_every_problem_is_reported_at_once_in_design_order(tmp_path: Path) -> None:
    error = problems(
        tmp_path,
        {"LOG_LEVEL": "loud", "POLL_INTERVAL": "abc", "FEATURE_WINDOW": "1"},
        "INFLUX_URL=http://influx\nBATCH_MAX_LINES=0\n",
    )
    assert list(error.problems) == [
        "INFLUX_URL",
        "INFLUX_DB",
        "INFLUX_TOKEN",
        "POLL_INTERVAL",
        "BATCH_MAX_LINES",
        "FEATURE_WINDOW",
        "LOG_LEVEL",
    ]
    assert error.variable == "INFLUX_URL"
    assert "\n" not in str(error)  # fit for one STATUS= or journal line
    for variable in error.problems:
        assert f"{variable}: " in str(error)


class TestToken:
    def credentials(self, tmp_path: Path, token: str | None) -> Path:
        directory = tmp_path / "credentials"
        directory.mkdir()
        (directory / "other-credential").write_text("unrelated\n")
        if token is not None:
            (directory / "influx-token").write_text(token)
        return directory

    def test_credential_beats_file_beats_variable(self, tmp_path: Path) -> None:
        token_file = write_env(tmp_path, "from-file\n", name="token")
        environ = {
            **REQUIRED,
            "INFLUX_TOKEN": "from-variable",
            "INFLUX_TOKEN_FILE": str(token_file),
            "CREDENTIALS_DIRECTORY": str(self.credentials(tmp_path, "from-credential\n")),
        }
        assert load(tmp_path, environ).influx_token.reveal() == "from-credential"
        del environ["CREDENTIALS_DIRECTORY"]
        assert load(tmp_path, environ).influx_token.reveal() == "from-file"
        del environ["INFLUX_TOKEN_FILE"]
        assert load(tmp_path, environ).influx_token.reveal() == "from-variable"

    def test_credentials_without_ours_fall_through(self, tmp_path: Path) -> None:
        environ = {**REQUIRED, "CREDENTIALS_DIRECTORY": str(self.credentials(tmp_path, None))}
        assert load(tmp_path, environ).influx_token.reveal() == TOKEN

    def test_token_file_named_in_the_config_file(self, tmp_path: Path) -> None:
        token_file = write_env(tmp_path, f"{TOKEN}\r\n", name="token")
        file_text = REQUIRED_FILE + f"INFLUX_TOKEN_FILE={token_file}\n"
        assert load(tmp_path, {}, file_text).influx_token.reveal() == TOKEN

    def test_empty_credential_is_an_error(self, tmp_path: Path) -> None:
        directory = self.credentials(tmp_path, "\n")
        environ = {**REQUIRED, "CREDENTIALS_DIRECTORY": str(directory)}
        error = problems(tmp_path, environ)
        assert error.variable == "CREDENTIALS_DIRECTORY"
        assert str(directory / "influx-token") in str(error)

    @pytest.mark.parametrize("content", [None, "", "\n", b"\xff\xfe"])
    def test_bad_token_file_is_an_error_naming_it(
        self, tmp_path: Path, content: str | bytes | None
    ) -> None:
        token_file = tmp_path / "token"
        if isinstance(content, bytes):
            token_file.write_bytes(content)
        elif content is not None:
            token_file.write_text(content)
        error = problems(tmp_path, {**REQUIRED, "INFLUX_TOKEN_FILE": str(token_file)})
        assert error.variable == "INFLUX_TOKEN_FILE"
        assert str(token_file) in str(error)

    def test_token_file_that_is_a_directory(self, tmp_path: Path) -> None:
        error = problems(tmp_path, {**REQUIRED, "INFLUX_TOKEN_FILE": str(tmp_path)})
        assert error.problems == {"INFLUX_TOKEN_FILE": f"cannot read {tmp_path}: Is a directory"}

    @pytest.mark.parametrize("value", [None, "", "  "])
    def test_token_required(self, tmp_path: Path, value: str | None) -> None:
        environ = {k: v for k, v in REQUIRED.items() if k != "INFLUX_TOKEN"}
        if value is not None:
            environ["INFLUX_TOKEN"] = value
        assert problems(tmp_path, environ).variable == "INFLUX_TOKEN"


class TestSecrecy:
    def test_secret_shows_masked(self) -> None:
        secret = Secret(TOKEN)
        assert (repr(secret), str(secret), f"{secret}", f"{secret!r}") == ("***",) * 4
        assert secret.reveal() == TOKEN

    def test_token_not_in_repr_or_describe(self, tmp_path: Path) -> None:
        config = load(tmp_path, REQUIRED)
        assert TOKEN not in repr(config)
        assert TOKEN not in str(config)
        assert TOKEN not in repr(describe(config))
        assert ("INFLUX_TOKEN", "***") in describe(config)

    def test_token_not_in_config_error(self, tmp_path: Path) -> None:
        error = problems(tmp_path, {**REQUIRED, "POLL_INTERVAL": "x", "INFLUX_DB": ""})
        assert TOKEN not in str(error)
        assert TOKEN not in repr(error)


def test_describe_follows_design_order_and_loads_back(tmp_path: Path) -> None:
    environ = {
        **REQUIRED,
        "DOMAINS_INCLUDE": "web-*,db-?",
        "HOST_TAG": "hv1",
        "POLL_INTERVAL": "0.5",
        "METADATA_TAGS": "one_name, nova_project",
    }
    config = load(tmp_path, environ)
    pairs = describe(config)
    assert [name for name, _ in pairs] == [
        "LIBVIRT_URI",
        "INFLUX_URL",
        "INFLUX_DB",
        "INFLUX_TOKEN",
        "INFLUX_WRITE_API",
        "INFLUX_TOKEN_FILE",
        "POLL_INTERVAL",
        "BATCH_MAX_LINES",
        "BATCH_MAX_SEC",
        "DEVICE_CACHE_TTL",
        "METADATA_TAGS",
        "STATS_SHARDS",
        "LIBVIRT_TIMEOUT",
        "SPOOL_DIR",
        "SPOOL_MAX_BYTES",
        "DOMAINS_INCLUDE",
        "DOMAINS_EXCLUDE",
        "FEATURE_WINDOW",
        "HOST_TAG",
        "LOG_LEVEL",
    ]
    shown = {name: value for name, value in pairs if name != "INFLUX_TOKEN"}
    assert shown["DOMAINS_INCLUDE"] == "web-*,db-?"
    assert load(tmp_path, {**shown, "INFLUX_TOKEN": TOKEN}) == config


class TestUnknownVariables:
    def test_file_typo_warns_and_is_ignored(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.WARNING, logger="vmtelemetryd.config"):
            config = load(tmp_path, REQUIRED, "POLL_INTERVALL=5\nCOLOUR=blue\n")
        assert config.poll_interval == 1.0
        messages = [r.getMessage() for r in caplog.records]
        assert any("POLL_INTERVALL" in m and "did you mean POLL_INTERVAL" in m for m in messages)
        assert any("COLOUR" in m for m in messages)

    def test_environment_warns_only_about_likely_typos(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        environ = {**REQUIRED, "LOG_LEVLE": "debug", "PATH": "/usr/bin", "INFLUX_ORG": "x"}
        with caplog.at_level(logging.WARNING, logger="vmtelemetryd.config"):
            load(tmp_path, environ)
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1
        assert "LOG_LEVLE" in messages[0] and "did you mean LOG_LEVEL" in messages[0]


@pytest.mark.parametrize(
    ("include", "exclude", "name", "wanted"),
    [
        ((), (), "anything", True),
        (("web-*",), (), "web-01", True),
        (("web-*",), (), "db-01", False),
        (("web-*", "db-?"), (), "db-1", True),
        (("web-*", "db-?"), (), "db-10", False),
        ((), ("test-*",), "test-a", False),
        ((), ("test-*",), "prod-a", True),
        (("web-*",), ("web-test*",), "web-test1", False),
        (("Web-*",), (), "web-01", False),  # case matters, as in libvirt
        (("web-[0-9]",), (), "web-7", True),
    ],
)
def test_wants_domain(
    include: tuple[str, ...], exclude: tuple[str, ...], name: str, wanted: bool
) -> None:
    config = Config(
        influx_url="http://h:1",
        influx_db="d",
        influx_token=Secret("t"),
        domains_include=include,
        domains_exclude=exclude,
    )
    assert config.wants_domain(name) is wanted


def test_verbs_that_never_write_need_no_database_configured(tmp_path: Path) -> None:
    path = write_env(tmp_path, "POLL_INTERVAL=2\n")
    config = load_config(path, {}, database=False)
    assert (config.influx_url, config.influx_db, config.influx_token.reveal()) == ("", "", "")
    assert config.poll_interval == 2.0
    with pytest.raises(ConfigError) as raised:
        load_config(path, {})
    assert set(raised.value.problems) == {"INFLUX_URL", "INFLUX_DB", "INFLUX_TOKEN"}
    with pytest.raises(ConfigError) as raised:
        load_config(write_env(tmp_path, "POLL_INTERVAL=soon\n"), {}, database=False)
    assert set(raised.value.problems) == {"POLL_INTERVAL"}


def test_metadata_tags_must_be_vm_info_keys(tmp_path: Path) -> None:
    assert load(tmp_path, {**REQUIRED, "METADATA_TAGS": "one_name,title"}).metadata_tags == (
        "one_name",
        "title",
    )
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, {**REQUIRED, "METADATA_TAGS": "one_name,owner,vm"})
    assert raised.value.variable == "METADATA_TAGS"
    assert "'owner,vm'" in str(raised.value) and "one_owner" in str(raised.value)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("LIBVIRT_URI", "qemu:///system,"),
        ("LIBVIRT_URI", "qemu:///system,qemu:///system"),
        ("STATS_SHARDS", "0"),
        ("STATS_SHARDS", "65"),
        ("STATS_SHARDS", "some"),
    ],
)
def test_bad_hosts_and_shards(tmp_path: Path, name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, {**REQUIRED, name: raw})
    assert set(raised.value.problems) == {name} and repr(raw) in str(raised.value)


def test_host_tag_goes_with_a_single_host_only(tmp_path: Path) -> None:
    two = {**REQUIRED, "LIBVIRT_URI": "qemu:///system,qemu+ssh://hv2/system"}
    assert load(tmp_path, two).libvirt_uris == ("qemu:///system", "qemu+ssh://hv2/system")
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, {**two, "HOST_TAG": "hv1"})
    assert set(raised.value.problems) == {"HOST_TAG"} and "single LIBVIRT_URI" in str(raised.value)


def test_a_comma_inside_a_uri_shows_as_written_and_loads_back(tmp_path: Path) -> None:
    environ = {**REQUIRED, "LIBVIRT_URI": "qemu+ssh://h/system?keyfile=/a%2Cb,qemu:///system"}
    shown = dict(describe(load(tmp_path, environ)))
    assert shown["LIBVIRT_URI"] == environ["LIBVIRT_URI"]
