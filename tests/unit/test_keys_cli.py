"""``qserve keys new`` prints a key and a key-file entry; the entry, pasted under ``keys:``, lets that key in."""

import pytest
from typer.testing import CliRunner

from qserve.cli import app
from serving.errors import APIError
from serving.keys import KeyRing

ENTRY_HEADER = "key-file entry (under `keys:`):"


def _new_key(*args: str) -> tuple[str, str]:
    """Runs ``qserve keys new ARGS``; returns the printed key and the printed entry's lines."""
    result = CliRunner().invoke(app, ["keys", "new", *args])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    key = next(line.split(": ", 1)[1] for line in lines if line.startswith("key (shown once"))
    entry = lines[lines.index(ENTRY_HEADER) + 1:]
    return key.strip(), "\n".join(line for line in entry if line.strip())


def test_a_new_key_entry_is_accepted_and_authenticates_only_its_key(tmp_path):
    key, entry = _new_key("team-a", "--rpm", "60", "--tpm", "1000", "--model", "w8a8", "--model", "bf16")
    other, other_entry = _new_key("team-b")
    assert key != other and key not in entry  # the entry stores a hash, never the key
    key_file = tmp_path / "keys.yaml"
    key_file.write_text(f"keys:\n{entry}\n")
    ring = KeyRing.load(key_file, env={})

    found = ring.identify(f"Bearer {key}")
    assert (found.id, found.rpm, found.tpm, found.models) == ("team-a", 60, 1000, frozenset({"w8a8", "bf16"}))
    ring.admit(found, "w8a8")
    with pytest.raises(APIError) as refused:
        ring.admit(found, "other-model")
    assert refused.value.status == 403
    with pytest.raises(APIError) as unknown:
        ring.identify(f"Bearer {other}")  # a real key of the same format, just not in this file
    assert unknown.value.status == 401 and unknown.value.code == "invalid_api_key"

    key_file.write_text(f"keys:\n{entry}\n{other_entry}\n")  # entries stack under one `keys:`
    assert KeyRing.load(key_file, env={}).identify(f"Bearer {other}").id == "team-b"
