"""The TOML configuration: the example is valid, errors name their key path."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from flybox.cli import main
from flybox.config import DEFAULT_CHAIN, config_problems, load_config, parse_config
from flybox.config.example import EXAMPLE_CONFIG
from flybox.errors import ConfigError


def test_example_configuration_is_valid_and_has_the_contract_keys() -> None:
    config = parse_config(tomllib.loads(EXAMPLE_CONFIG))
    assert config.session is not None
    assert config.session.name == "krios1-2026-11-21"
    assert config.watch is not None
    assert config.watch.mode == "auto"
    assert config.micrograph.picking_pixel_size == 3.32
    assert config.build_chain().streams == {"particles": 256, "particles_small": 64}
    assert config.executor.workers == 2
    assert config.mqtt is not None
    assert config.mqtt.topic_prefix == "flybox/krios1"
    assert config.http.port == 9464
    assert config.http.is_loopback


def test_default_chain_is_relion_like_with_two_streams() -> None:
    config = parse_config({})
    assert config.chain == DEFAULT_CHAIN
    assert config.build_chain().streams == {"particles": 256, "particles_small": 64}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[watch]\nmicrographs = []\n", "watch.micrographs"),
        ('[watch]\nmicrographs = ["a"]\nmode = "inotify"\n', "watch.mode"),
        ('[session]\nname = "bad name"\noutput = "/tmp/x"\n', "session.name"),
        ('[http]\nlisten = "nowhere"\n', "http.listen"),
        ("[executor]\nworkers = 0\n", "executor.workers"),
        ("[mqtt]\nport = 70000\n", "mqtt.port"),
        ("[output]\nfloat32 = true\n", "output.float32"),
        ('[[chain]]\nstep = "extract"\nbox = 1\n', "chain[0].box"),
        ('[[chain]]\nstep = "extract"\nbox = 64\n[[chain]]\nstep = "nope"\n', "chain[1].step"),
    ],
)
def test_invalid_settings_are_refused_with_their_key_path(
    tmp_path: Path, text: str, key: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}: ")


def test_check_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[executor]\nworkers = 0\n[mqtt]\nport = 0\n")
    keys = {problem.key for problem in config_problems(path)}
    assert keys == {"executor.workers", "mqtt.port"}


def test_unreadable_and_non_toml_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[session\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_config_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "example"]) == 0
    example = capsys.readouterr().out
    assert example == EXAMPLE_CONFIG
    good = tmp_path / "good.toml"
    good.write_text(example)
    assert main(["config", "check", str(good)]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")
    bad = tmp_path / "bad.toml"
    bad.write_text("[executor]\nworkers = -1\n")
    assert main(["config", "check", str(bad)]) == 2
    assert "executor.workers" in capsys.readouterr().err


def test_non_loopback_listener_is_detected() -> None:
    assert not parse_config({"http": {"listen": "0.0.0.0:9464"}}).http.is_loopback
    assert parse_config({"http": {"listen": "[::1]:9464"}}).http.is_loopback
