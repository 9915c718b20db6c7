"""Writes tensors into size-bounded safetensors shards with the standard index file."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class ShardWriter:
    """Accumulates tensors and flushes a shard whenever ``max_shard_bytes`` would be exceeded."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 2 * 2**30) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._files: list[Path] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_shard_bytes:
                self._flush()
            self.pending[name] = tensor.contiguous()
            self.pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f"model-{len(self._files) + 1:05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self._files.append(path)
        for name in self.pending:
            self.weight_map[name] = path.name
        self.total_bytes += path.stat().st_size
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Writes the last shard; one shard is renamed ``model.safetensors``, several get an index."""
        if self.pending or not self._files:
            self._flush()
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
