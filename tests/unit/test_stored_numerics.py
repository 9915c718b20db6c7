"""What the checkpoint stores is what calibration used: scales are rounded to the stored dtype before the
integers are computed, in every method, so the compressed-tensors library decodes the very weights the
pipeline ran the next layer's calibration inputs through."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from core.numerics import fake_quantize
from core.schemes import QuantArgs, Scheme, get_scheme
from exporters.dequantize import read_tensors
from quantize import layerwise
from quantize.calibration import CalibrationSpec
from quantize.pipeline import QuantizeOptions, quantize_checkpoint

SCHEMES = {
    "w8a8": get_scheme("w8a8"),
    "w8a8-static": get_scheme("w8a8-static"),
    "w8a16": get_scheme("w8a16"),
    "w4a16": get_scheme("w4a16", 32),
    "w4a16-asym": Scheme("w4a16-asym", QuantArgs(num_bits=4, strategy="group", group_size=32, symmetric=False)),
    "fp8": get_scheme("fp8"),
}
CASES = [(s, m) for s in SCHEMES for m in ("rtn", "gptq")] + [
    ("w4a16-asym", "awq"), ("w4a16", "awq+gptq"), ("w8a8", "smoothquant"), ("w8a8", "smoothquant+gptq")]


def _library_weights(ckpt) -> dict[str, torch.Tensor]:
    """Every quantized linear's weight as the compressed-tensors library decompresses it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    quant = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    compressor = BaseCompressor.get_value_from_registry(quant["format"])
    group = quant["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
    raw = read_tensors(ckpt)
    prefixes = {k.removesuffix(".weight_scale") for k in raw if k.endswith(".weight_scale")}
    return {p: compressor.decompress({k.removeprefix(p + "."): v for k, v in raw.items()
                                      if k.rsplit(".", 1)[0] == p}, scheme)["weight"] for p in prefixes}


@pytest.mark.parametrize("scheme_name, method", CASES)
def test_library_decodes_the_weights_calibration_used(tiny_with_tokenizer, tmp_path, monkeypatch, scheme_name, method):
    used: dict[str, torch.Tensor] = {}  # full name -> the weight the layer computed with after quantization
    seen: dict[str, int] = {}  # layers run in order: the n-th time a name is quantized, it is in layer n
    real = layerwise._quantize_group

    def recording(names, targets, *args, **kwargs):
        quantized = real(names, targets, *args, **kwargs)
        for name in quantized:  # the next layer's calibration inputs come from this weight
            index = seen[name] = seen.get(name, -1) + 1
            used[f"model.layers.{index}.{name}"] = targets[name].weight.detach().clone()
        return quantized

    monkeypatch.setattr(layerwise, "_quantize_group", recording)
    options = QuantizeOptions(calibration=CalibrationSpec(num_samples=4, seq_len=32))
    out = tmp_path / "out"
    quantize_checkpoint(tiny_with_tokenizer, SCHEMES[scheme_name], method, out, progress=False,
                        log=lambda m: None, options=options)
    decoded = _library_weights(out)
    assert len(decoded) == 14
    if method == "rtn" and not SCHEMES[scheme_name].static_activations:  # streamed: no layer ran on them
        source, args = read_tensors(tiny_with_tokenizer), SCHEMES[scheme_name].weights
        used = {p: fake_quantize(source[f"{p}.weight"], replace(args, scale_dtype="bfloat16")) for p in decoded}
    assert set(used) == set(decoded)
    for prefix, weight in decoded.items():
        ours = used[prefix]
        diff = (weight.float() - ours.float()).abs().max()
        assert torch.equal(weight.to(ours.dtype), ours), f"{prefix}: decoded weight differs by up to {diff:g}"
