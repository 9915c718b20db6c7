"""Fixtures shared by the unit tests: tiny random Llama checkpoints, built once per session."""

import pytest

from tests.unit.tiny import make_tiny_llama, make_tiny_llama_with_tokenizer


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory):
    return make_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny-tok") / "model")
