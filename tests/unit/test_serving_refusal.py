"""An engine test is skipped only on vLLM's own refusal of the scheme, read from the logs a start error names;
any other start failure is a failure (``tests/integration/test_scheme_layouts.py``)."""

from pathlib import Path

from tests.integration.test_scheme_layouts import engine_refusal

WNA16_REFUSAL = """\
(EngineCore pid=4242) ERROR 12-02 06:40:01 [core.py:1012] EngineCore failed to start.
(EngineCore pid=4242) ERROR 12-02 06:40:01 [core.py:1012] Traceback (most recent call last):
(EngineCore pid=4242) ERROR 12-02 06:40:01 [core.py:1012] ValueError: Failed to find a kernel that can implement the WNA16 linear layer. Reasons: 
(EngineCore pid=4242) ERROR 12-02 06:40:01 [core.py:1012]  CPUWNA16LinearKernel cannot implement due to: Unsupported quant type uint8b128
"""
CRASH = """\
(EngineCore pid=4242) ERROR 12-02 06:40:01 [core.py:1012] EngineCore failed to start.
(EngineCore pid=4242) ERROR 12-02 06:40:01 [core.py:1012] ValueError: Unrecognized model in /ckpt. Should have a `model_type` key
(EngineCore pid=4242) ERROR 12-02 06:40:01 [core.py:1012] RuntimeError: this feature is not supported yet
"""


def _start_error(tmp_path: Path, engine_log: str) -> str:
    """What ``GatewayProcess.wait_ready`` raises: the gateway log's tail naming the engine's log, then its own."""
    vllm_log, gateway_log = tmp_path / "vllm-case.log", tmp_path / "gateway.log"
    vllm_log.write_text(engine_log)
    gateway_log.write_text(f"error: vLLM exited with code 1 while starting /ckpt. Last lines of its log:\n"
                           f"...\nfull log: {vllm_log}\n")
    return f"qserve serve exited with 1:\n{gateway_log.read_text()}full log: {gateway_log}"


def test_the_kernel_refusal_is_named_most_specific_first(tmp_path):
    refusal = engine_refusal(_start_error(tmp_path, WNA16_REFUSAL))
    assert refusal == "CPUWNA16LinearKernel cannot implement due to: Unsupported quant type uint8b128"


def test_another_start_failure_is_not_a_refusal(tmp_path):
    # a ValueError and a "not supported" that are not about the scheme: the old markers skipped on these
    assert engine_refusal(_start_error(tmp_path, CRASH)) is None


def test_a_timeout_names_no_engine_log(tmp_path):
    assert engine_refusal(f"qserve serve not ready after 900 s; log: {tmp_path / 'gateway.log'}") is None
