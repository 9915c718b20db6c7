"""Data locations come from configuration: an explicit folder, ``$QSERVE_DATA``, or a checkout's default."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import typer

import core.data
from core.data import DATA_ENV, DataDirError, data_dir, data_file

ROOT = Path(__file__).resolve().parents[2]


def _installed_copy(tmp_path: Path):
    """``core/data.py`` as a non-editable install has it: in a site-packages folder, no checkout around."""
    target = tmp_path / "lib" / "python3" / "site-packages" / "core" / "data.py"
    target.parent.mkdir(parents=True)
    shutil.copy(core.data.__file__, target)
    spec = importlib.util.spec_from_file_location("installed_core_data", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_installed_qserve_without_qserve_data_says_how_to_set_it(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    installed = _installed_copy(tmp_path)
    assert installed.checkout_data_dir() is None
    with pytest.raises(FileNotFoundError) as missing:
        installed.data_file("wikitext2-test.raw")
    message = str(missing.value)
    assert "\n" not in message and f"set {DATA_ENV}" in message


def test_an_installed_qserve_reads_qserve_data(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "wikitext2-test.raw").write_text("text")
    monkeypatch.setenv(DATA_ENV, str(data))
    installed = _installed_copy(tmp_path)
    assert installed.data_dir() == data
    assert installed.data_file("wikitext2-test.raw") == data / "wikitext2-test.raw"


def test_an_explicit_folder_comes_before_the_environment(tmp_path, monkeypatch):
    env, explicit = tmp_path / "env", tmp_path / "explicit"
    env.mkdir(), explicit.mkdir()
    monkeypatch.setenv(DATA_ENV, str(env))
    assert data_dir() == env and data_dir(explicit) == explicit and data_dir(str(explicit)) == explicit


@pytest.mark.parametrize("how", ["env", "explicit"])
def test_a_configured_folder_that_does_not_exist_is_one_line(tmp_path, monkeypatch, how):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(DATA_ENV, str(missing) if how == "env" else str(tmp_path))
    with pytest.raises(DataDirError) as error:
        data_dir(missing if how == "explicit" else None)
    assert str(missing) in str(error.value) and DATA_ENV in str(error.value) and "\n" not in str(error.value)


def test_a_missing_file_names_the_folder_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    expected = rf"arc_easy_test.jsonl is not in the data folder {tmp_path}; set {DATA_ENV}"
    with pytest.raises(DataDirError, match=expected):
        data_file("arc_easy_test.jsonl")


def test_the_checkout_default_is_used_only_when_it_exists(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    default = ROOT.parent / "shared" / "data"
    if default.is_dir():
        assert data_dir() == default
    else:
        with pytest.raises(DataDirError):
            data_dir()


def test_the_cli_reports_it_as_one_error_line(tmp_path, monkeypatch, capsys):
    """``DataDirError`` is one of the errors every command turns into ``error: ...`` and exit code 1."""
    from qserve.common import user_errors

    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(typer.Exit) as exit_:
        user_errors(lambda: data_file("wikitext2-test.raw"))()
    err = capsys.readouterr().err
    assert exit_.value.exit_code == 1 and err.startswith(f"error: {DATA_ENV}=") and err.count("\n") == 1


def test_the_docker_image_reads_data_from_a_mounted_folder():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ENV {DATA_ENV}=/data" in dockerfile.splitlines()
    assert any(line.startswith("#") and "-v /path/to/data:/data" in line and " eval " in line
               for line in dockerfile.splitlines())
