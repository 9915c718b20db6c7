"""`qserve serve CKPT --replicas N` from the command line (no --config): the gateway config it builds has N
replicas of the one model, and the gateway gets N engines for it, each on its own port. vLLM is never
started: ``serving.server.serve`` (or the app it builds) is replaced by a recorder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import json

from typer.testing import CliRunner

from serving.backends import BackendPool
from serving.config import GatewayConfig, build_backends, validate_config


def _invoke(*args: str):
    from qserve.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    """A directory that passes for a checkpoint (``resolve_model`` asks for its config.json only)."""
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture()
def recorded(monkeypatch) -> dict[str, list]:
    """``serve`` records its config instead of starting the gateway; ``validate_config`` records the data the
    command line built (and still validates it)."""
    from serving import config, server

    seen: dict[str, list] = {"served": [], "specs": []}

    def validate(data: dict[str, Any], where: str = "config") -> GatewayConfig:
        seen["specs"].append(data)
        return validate_config(data, where)

    monkeypatch.setattr(config, "validate_config", validate)
    monkeypatch.setattr(server, "serve", lambda settings, log: seen["served"].append(settings))
    return seen


def _ports():
    ports = iter(range(5600, 5700))
    return lambda: next(ports)


def test_the_command_line_spec_validates_to_two_replicas(checkpoint, recorded):
    result = _invoke("serve", str(checkpoint), "--replicas", "2", "--served-model-name", "m", "--max-model-len",
                     "1024", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    # the one spec the command line built carries the flag: catches --replicas parsed but left out of it
    (data,) = recorded["specs"]
    (spec,) = data["models"]
    assert spec["replicas"] == 2 and spec["name"] == "m" and spec["checkpoint"] == str(checkpoint)
    assert spec["engine_args"] == ["--dtype", "bfloat16"] and spec["max_model_len"] == 1024
    # the library function, called with that spec, gives two replicas of one model; and that is what serve got
    config = validate_config(data, "command line")
    assert [(m.name, m.replicas) for m in config.models] == [("m", 2)]
    assert recorded["served"] == [config]


def test_two_replicas_become_two_engines_behind_one_model_name(checkpoint, recorded, tmp_path):
    assert _invoke("serve", str(checkpoint), "--replicas", "2", "--served-model-name", "m", "--dtype",
                   "bfloat16").exit_code == 0
    (config,) = recorded["served"]
    backends = build_backends(config, Path, _ports(), tmp_path / "logs")
    # two launched engines, both serving "m" from the same checkpoint with the same engine arguments, each
    # on its own port and with its own log: catches replicas collapsed into one, or sharing a port
    assert [(b.model, b.name) for b in backends] == [("m", "m-0"), ("m", "m-1")]
    engines = [b.engine.config for b in backends]
    assert {e.model_dir for e in engines} == {checkpoint} and {e.served_name for e in engines} == {"m"}
    assert len({e.port for e in engines}) == 2 and len({e.log_path for e in engines}) == 2
    assert all(e.command()[-2:] == ["--dtype", "bfloat16"] for e in engines)
    # the gateway routes the name "m" over both
    assert [b.name for b in BackendPool(backends).replicas["m"]] == ["m-0", "m-1"]


def test_without_the_flag_there_is_one_engine(checkpoint, recorded, tmp_path):
    assert _invoke("serve", str(checkpoint), "--served-model-name", "m").exit_code == 0
    (config,) = recorded["served"]
    # the default is one replica, named after the model: catches a default that is not 1
    assert [(b.model, b.name) for b in build_backends(config, Path, _ports(), tmp_path / "logs")] == [("m", "m")]


def test_the_real_serve_hands_the_gateway_both_replicas(checkpoint, monkeypatch, tmp_path):
    """Through ``serving.server.serve`` itself, stopped where it builds the gateway app: catches a serve that
    launches fewer engines than the config's replicas."""
    from serving import server

    class Built(Exception):
        pass

    captured, sockets = [], []

    def build_app(settings):
        captured.append(settings)
        raise Built

    def bind_socket(host, port):  # the real one, its socket kept so that the test closes it
        sockets.append(real_bind(host, port))
        return sockets[-1]

    real_bind = server.bind_socket
    monkeypatch.setattr(server, "build_app", build_app)
    monkeypatch.setattr(server, "bind_socket", bind_socket)
    try:
        result = _invoke("serve", str(checkpoint), "--replicas", "2", "--served-model-name", "m", "--port", "0",
                         "--log-dir", str(tmp_path / "logs"))
    finally:
        for sock in sockets:
            sock.close()
    assert isinstance(result.exception, Built), result.output
    (settings,) = captured
    assert [(b.model, b.name, b.state) for b in settings.backends] == [("m", "m-0", "starting"),
                                                                       ("m", "m-1", "starting")]
    assert len({b.url for b in settings.backends}) == 2
    assert all(b.engine.config.model_dir == checkpoint.resolve() for b in settings.backends)


def test_replicas_below_one_and_replicas_beside_a_config_are_refused(checkpoint, recorded, tmp_path):
    zero = _invoke("serve", str(checkpoint), "--replicas", "0")
    # refused by the option's bound, before anything is built or served
    assert zero.exit_code == 2 and "--replicas" in zero.stderr and recorded["served"] == []
    config = tmp_path / "gw.yaml"
    config.write_text(f"models: [{{name: a, checkpoint: {checkpoint}}}]\n")
    both = _invoke("serve", "--config", str(config), "--replicas", "2")
    # the flag is not silently dropped in favour of the file's replicas: one line naming it
    lines = both.stderr.strip().splitlines()
    assert both.exit_code == 1 and len(lines) == 1 and "--replicas" in lines[0] and "config's models" in lines[0]
    assert recorded["served"] == []


@pytest.mark.parametrize("trained, expected", [(2048, 2048), (32768, 4096), (None, 4096)])
def test_the_engine_context_defaults_to_the_models_own_when_shorter(checkpoint, recorded, tmp_path, trained, expected):
    """vLLM refuses a --max-model-len above the model's max_position_embeddings: a 2k model must start."""
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "max_position_embeddings": trained}))
    assert _invoke("serve", str(checkpoint), "--served-model-name", "m").exit_code == 0
    (served,) = recorded["served"]
    (backend,) = build_backends(served, Path, _ports(), tmp_path / "logs")
    assert backend.engine.config.max_model_len == expected
