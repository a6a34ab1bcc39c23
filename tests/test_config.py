"""Config loading: defaults, the example file, and errors that name the key."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from mqd.config import Config, load_config
from mqd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_no_config_gives_the_documented_defaults():
    config = load_config()
    assert config.frontend.listen == "127.0.0.1:6470"
    assert config.node.data_dir == "./mqd-data"
    assert config.node.roles == ["frontend", "metadata", "backend"]
    assert config.storage.fsync == "always"


def test_single_toml_lists_every_key_with_its_default():
    raw = tomllib.loads((ROOT / "config" / "single.toml").read_text())
    defaults = Config()
    for section in dataclasses.fields(Config):
        section_defaults = getattr(defaults, section.name)
        keys = {f.name for f in dataclasses.fields(section_defaults)}
        assert set(raw[section.name]) == keys, section.name
        for key in keys:
            assert raw[section.name][key] == getattr(section_defaults, key), f"{section.name}.{key}"
    assert load_config(ROOT / "config" / "single.toml") == defaults


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[storage]\nfsnyc = 'always'\n", "storage.fsnyc"),
        ("[storage]\nfsync = 'sometimes'\n", "storage.fsync"),
        ("[limits]\nbatch_messages_max = 0\n", "limits.batch_messages_max"),
        ("[limits]\nbatch_messages_max = '10'\n", "limits.batch_messages_max"),
        ("[frontend]\nlisten = 'nowhere'\n", "frontend.listen"),
        ("[frontend]\nlisten = '0.0.0.0:6470'\n", "frontend.listen"),
        ("[bogus]\nx = 1\n", "[bogus]"),
        ("[log]\nformat = 'xml'\n", "log.format"),
        ("[tls]\ncert = '/nonexistent.pem'\nkey = '/nonexistent.key'\n", "tls.cert"),
        ("[tls]\nrequire_client_cert = true\n", "tls.require_client_cert needs tls.ca"),
        ("[tls]\nca = '/nonexistent.pem'\n", "tls.ca needs tls.cert and tls.key"),
        # It started, then refused every message (review).
        ("[storage]\nrecord_bytes_max = 100\n", "below limits.message_bytes_max"),
        # A single node took these silently (review).
        ("[cluster]\nvnodes = -1\n", "cluster.vnodes"),
        ("[cluster]\nadvertise = 'bogus'\n", "cluster.advertise"),
        ("[storage]\nfsync_interval_ms = 1000000000000\n", "storage.fsync_interval_ms"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, named):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert named in str(caught.value)


def test_non_loopback_plaintext_allowed_only_when_insecure(tmp_path):
    path = tmp_path / "open.toml"
    path.write_text("[frontend]\nlisten = '0.0.0.0:6470'\ninsecure = true\n")
    assert load_config(path).frontend.insecure is True


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (  # a backend with no metadata address
            "[node]\nid='b1'\nroles=['backend']\n[cluster]\nlisten='127.0.0.1:7101'\n",
            "cluster.metadata",
        ),
        (  # a frontend without a client port
            "[node]\nid='f1'\nroles=['frontend']\n[cluster]\nlisten='127.0.0.1:7201'\n"
            "metadata=['127.0.0.1:7001']\n",
            "frontend.listen",
        ),
        (  # TLS files missing
            "[node]\nid='b1'\nroles=['backend']\n[cluster]\nlisten='127.0.0.1:7101'\n"
            "metadata=['127.0.0.1:7001']\n",
            "tls.cert",
        ),
        (  # a subset of roles without a cluster
            "[node]\nroles=['backend']\n",
            "node.roles",
        ),
    ],
)
def test_unworkable_cluster_configs_name_the_key(tmp_path, text, named):
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert named in str(caught.value)


def test_a_config_path_that_is_a_directory_or_an_empty_data_dir_is_a_config_error(tmp_path):
    # A directory gave a traceback (IsADirectoryError); an empty data_dir meant the
    # working directory, where the server then wrote its files.
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"node\.data_dir"):
        load_config(None, {"node.data_dir": ""})
    empty = tmp_path / "empty.toml"
    empty.write_text('[node]\ndata_dir = ""\n')
    with pytest.raises(ConfigError, match=r"node\.data_dir"):
        load_config(empty)
