"""``qserve inspect CKPT --json FILE`` writes the same report it prints, for a tiny quantized checkpoint."""

import json

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from core.schemes import get_scheme
from qserve.cli import app
from quantize.pipeline import quantize_checkpoint

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _float_weights(model_dir) -> dict[str, int]:
    """Weights per linear module name, summed over the decoder layers, of the float checkpoint."""
    counts = dict.fromkeys(LINEARS, 0)
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                module = next((m for m in LINEARS if key.endswith(f"{m}.weight")), None)
                if module:
                    shape = f.get_slice(key).get_shape()
                    counts[module] += shape[0] * shape[1]
    return counts


@pytest.mark.parametrize("scheme, described", [("w4a16", "int4 g64 sym"), ("w8a8", "int8 channel sym")])
def test_inspect_json_is_the_printed_report(tiny, tmp_path, scheme, described):
    ckpt = tmp_path / scheme
    quantize_checkpoint(tiny, get_scheme(scheme), "rtn", ckpt, progress=False, log=lambda m: None)
    result = CliRunner().invoke(app, ["inspect", str(ckpt), "--json", str(tmp_path / "inspect.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "inspect.json").read_text())
    printed = result.output.splitlines()

    assert printed[0] == f"{report['path']}: {report['format']}" and report["path"] == str(ckpt)
    rows = [line for line in printed if line.startswith("| ") and not line.startswith(("| module", "| all"))]
    assert rows == [f"| {g['module']} | {g['scheme']} | {g['layers']} | {g['weights']:,} | {g['bits_per_weight']:.3f} |"
                    for g in report["groups"]]
    mib = {k: f"{report[k] / 2**20:.1f} MiB" for k in ("total_bytes", "bf16_bytes", "other_bytes")}
    share = f"{report['total_bytes'] / report['bf16_bytes']:.1%}"
    assert f"total {mib['total_bytes']}; as bf16 {mib['bf16_bytes']} ({share}); other tensors {mib['other_bytes']}" in printed
    assert report["problems"] == [] and any(line.startswith("decode check: every quantized layer") for line in printed)
    # and the report is true of the checkpoint: every linear of both layers, all its weights, one scheme
    assert {g["module"]: g["weights"] for g in report["groups"]} == _float_weights(tiny)
    assert {(g["scheme"], g["layers"]) for g in report["groups"]} == {(described, 2)}
    assert report["total_bytes"] == sum(p.stat().st_size for p in ckpt.glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in ckpt.glob("*.safetensors"))  # minus headers
