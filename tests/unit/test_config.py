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
    # Optional overrides are shown commented out: the files' own pixel sizes are used.
    assert config.micrograph.pixel_size is None
    assert config.micrograph.picking_pixel_size is None
    assert config.build_chain().streams == {"particles": 256, "particles_small": 64}
    # RELION-normalised and unmasked: what Class2D expects.
    steps = [step["step"] for step in config.chain]
    assert "mask" not in steps
    assert "normalize" in steps
    assert config.executor.workers == 2
    # Dask is shown commented out (the local pool by default), and valid once uncommented.
    assert config.executor.address is None
    line = next(ln for ln in EXAMPLE_CONFIG.splitlines() if ln.startswith("# address = "))
    uncommented = EXAMPLE_CONFIG.replace(line, line[2:].split("#")[0])
    assert parse_config(tomllib.loads(uncommented)).executor.address == "tcp://scheduler:8786"
    assert config.mqtt is not None
    assert config.mqtt.topic_prefix is None  # default: flybox/<session name>
    assert '# topic_prefix = "flybox/krios1-2026-11-21"' in EXAMPLE_CONFIG
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
    captured = capsys.readouterr()
    # The example's /data folders do not exist here: valid, with one warning per pattern.
    assert captured.out.strip() == f"{good}: ok (3 warnings)"
    assert f"warning: {good}: watch.micrographs[0]: folder /data/krios1/MotionCorr" in captured.err
    assert f"warning: {good}: watch.ctf: /data/krios1/CtfFind/micrographs_ctf.star" in captured.err
    bad = tmp_path / "bad.toml"
    bad.write_text("[executor]\nworkers = -1\n")
    assert main(["config", "check", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad}: executor.workers")


def test_non_loopback_listener_is_detected() -> None:
    assert not parse_config({"http": {"listen": "0.0.0.0:9464"}}).http.is_loopback
    assert parse_config({"http": {"listen": "[::1]:9464"}}).http.is_loopback


def test_config_errors_name_the_file_once_in_check_run_and_extract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.toml"
    bad = tmp_path / "bad.toml"
    bad.write_text("[executor]\nworkers = -1\n")
    for path, problem in ((missing, "cannot read the configuration"), (bad, "executor.workers")):
        for argv in (
            ["config", "check", str(path)],
            ["run", "-c", str(path)],
            ["extract", "--micrographs", "x.mrc", "-o", str(tmp_path / "o"), "-c", str(path)],
        ):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {path}: {problem}"), (argv, err)
            assert err.count(str(path)) == 1, (argv, err)


def test_pixel_size_override_disagreeing_with_ctf_table_and_header_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flybox.sim.microscope import write_dataset

    star = write_dataset(tmp_path / "p", 1, shape=128, n_particles=4, pixel_size_a=1.0)
    config = tmp_path / "c.toml"
    config.write_text(
        f"""[session]\nname = "s"\noutput = "{tmp_path / "out"}"\n
[watch]\nmicrographs = ["{tmp_path}/p/Micrographs/*.mrc"]\nctf = "{star}"\n
[micrograph]\npixel_size = 0.83\n"""
    )
    assert main(["config", "check", str(config)]) == 0
    err = capsys.readouterr().err
    assert "micrograph.pixel_size = 0.83 Å disagrees with the CTF table" in err
    assert "micrograph.pixel_size = 0.83 Å disagrees with the MRC header" in err
    assert "17%" in err
    config.write_text(config.read_text().replace("0.83", "1.005"))  # within 1 %
    assert main(["config", "check", str(config)]) == 0
    assert "disagrees" not in capsys.readouterr().err


def test_run_warns_about_missing_folders_and_names_the_file_in_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    # Valid for `config check`, refused by `run` before anything starts (a chain that needs
    # each micrograph's CTF, and no CTF source).
    config.write_text(
        f"""[session]\nname = "s"\noutput = "{tmp_path / "out"}"\n
[watch]\nmicrographs = ["{tmp_path}/nowhere/*.mrc"]\n
[[chain]]\nstep = "extract"\nbox = 64\n
[[chain]]\nstep = "phase_flip"\n"""
    )
    assert main(["run", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"warning: {config}: watch.micrographs[0]: folder {tmp_path}/nowhere does not exist"
    )
    assert f"error: {config}: watch.ctf: the chain needs each micrograph's CTF" in err
