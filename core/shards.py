"""Writes tensors into size-bounded safetensors shards with the standard index file, in constant memory.

Each tensor's bytes go to a spill file as soon as it is added, so a quantization never holds its
output in memory; a shard is then assembled as the safetensors header followed by the spilled bytes,
copied in chunks. The format is an 8-byte little-endian header length, a JSON header (dtype, shape,
byte offsets per tensor; padded with spaces to 8 bytes), then the raw little-endian data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_COPY_CHUNK = 64 * 2**20


class ShardWriter:
    """Spills tensors as they come and closes a shard whenever ``max_shard_bytes`` would be exceeded."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 2 * 2**30) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._files: list[Path] = []
        self._entries: dict[str, dict] = {}
        self._spill_path = self.out_dir / ".spill"
        self._spill = open(self._spill_path, "wb")
        self._spilled = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name in self._entries or name in self.weight_map:
                raise ValueError(f"tensor {name} written twice")
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            if self._entries and self._spilled + data.nbytes > self.max_shard_bytes:
                self._flush()
            if tensor.dtype not in _DTYPES:
                raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors name")
            self._entries[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [self._spilled, self._spilled + data.nbytes]}
            self._spill.write(data.tobytes() if data.nbytes < _COPY_CHUNK else memoryview(data))
            self._spilled += data.nbytes

    def _flush(self) -> None:
        """Writes the shard: header, then the spilled bytes; starts a new spill."""
        self._spill.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        path = self.out_dir / f"model-{len(self._files) + 1:05d}.safetensors"
        with open(path, "wb") as out, open(self._spill_path, "rb") as spill:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            while chunk := spill.read(_COPY_CHUNK):
                out.write(chunk)
        self._files.append(path)
        self.weight_map.update({name: path.name for name in self._entries})
        self.total_bytes += path.stat().st_size
        self._entries, self._spilled = {}, 0
        self._spill = open(self._spill_path, "wb")

    def close(self) -> None:
        """Writes the last shard; one shard is renamed ``model.safetensors``, several get an index."""
        if self._entries or not self._files:
            self._flush()
        self._spill.close()
        self._spill_path.unlink()
        if len(self._files) == 1:
            self._files[0].rename(self.out_dir / "model.safetensors")
            return
        total = len(self._files)
        renames = {p.name: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, p in enumerate(self._files)}
        for path in self._files:
            path.rename(self.out_dir / renames[path.name])
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {k: renames[v] for k, v in self.weight_map.items()}}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
