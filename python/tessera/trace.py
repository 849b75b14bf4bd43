"""Trace files (safetensors, as `tessera trace export` writes them; layout in the README's "Trace
files"): read into NumPy arrays, so a recorded or exported trace can be prefilled and decoded on a
cluster."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from tessera.client import Geometry, Span

_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "I32": "<i4"}


def read_safetensors(path: str):
    """The tensors (as NumPy arrays, BF16 widened to float32) and the metadata of a safetensors file."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: too short for the 8-byte header length")
    (length,) = struct.unpack("<Q", blob[:8])
    if length > len(blob) - 8:
        raise ValueError(f"{path}: the header length {length} runs past the file ({len(blob)} bytes)")
    header = json.loads(blob[8 : 8 + length])
    data = memoryview(blob)[8 + length :]
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}; allowed: {sorted(_DTYPES)}")
        begin, end = entry["data_offsets"]
        array = np.frombuffer(data[begin:end], dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        if entry["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array
    return tensors, metadata


@dataclass
class Trace:
    """One sequence's prompt and decode steps: ``keys``/``values`` ``[layers, kv_heads, tokens, head_dim]``,
    ``queries`` ``[layers, query_heads, rows, head_dim]`` (the last prompt rows; None without), and
    the decode steps ``decode_keys``/``decode_values`` ``[layers, kv_heads, steps, head_dim]`` and
    ``decode_queries`` ``[layers, query_heads, steps, head_dim]``."""

    geometry: Geometry
    spans: List[Span]
    keys: np.ndarray
    values: np.ndarray
    queries: Optional[np.ndarray]
    decode_keys: Optional[np.ndarray]
    decode_values: Optional[np.ndarray]
    decode_queries: Optional[np.ndarray]

    @property
    def decode_steps(self) -> int:
        return 0 if self.decode_keys is None else self.decode_keys.shape[2]

    def step(self, t: int):
        """Decode step ``t``'s keys, values and queries, as ``Client.decode`` takes them."""
        return self.decode_keys[:, :, t], self.decode_values[:, :, t], self.decode_queries[:, :, t]


def load_trace(path: str) -> Trace:
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != "tessera.trace.v1":
        raise ValueError(f"{path}: __metadata__.format is {metadata.get('format')!r}; expected 'tessera.trace.v1'")
    g = json.loads(metadata["geometry"])
    geometry = Geometry(
        g["name"], g["layers"], g["query_heads"], g["kv_heads"], g["head_dim"], g.get("tokens_per_image", 0)
    )
    spans = [Span(s["kind"], s["start"], s["count"], s["index"]) for s in json.loads(metadata["spans"])]

    def stacked(suffix: str) -> Optional[np.ndarray]:
        names = [f"layers.{layer}.{suffix}" for layer in range(geometry.layers)]
        if not all(name in tensors for name in names):
            return None
        return np.stack([tensors[name] for name in names])

    keys, values = stacked("keys"), stacked("values")
    if keys is None or values is None:
        raise ValueError(f"{path}: every layer needs keys and values")
    return Trace(
        geometry,
        spans,
        keys,
        values,
        stacked("queries"),
        stacked("decode.keys"),
        stacked("decode.values"),
        stacked("decode.queries"),
    )
