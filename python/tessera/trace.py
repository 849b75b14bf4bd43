"""Trace files (safetensors, as `tessera trace export` writes them; layout in the README's "Trace
files"): read into NumPy arrays, so a recorded or exported trace can be prefilled and decoded on a
cluster, and written from NumPy arrays, so a model's own cache can be recorded (`tessera.dump_hf`)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from tessera.client import Geometry, Span

_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "I32": "<i4"}
FORMAT = "tessera.trace.v1"


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
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: __metadata__.format is {metadata.get('format')!r}; expected {FORMAT!r}")
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


def _bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bit patterns, rounded to nearest even (as PyTorch rounds)."""
    bits = np.ascontiguousarray(array, dtype="<f4").view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype("<u2")


def write_safetensors(path: str, tensors: Dict[str, np.ndarray], metadata: Dict[str, str], dtype: str = "F32"):
    """Writes ``tensors`` (float arrays, stored as ``dtype``: F32, F16 or BF16) with ``metadata`` as a
    safetensors file. A value that is not finite once stored (float16 overflows past 65504) raises
    ``ValueError`` naming the tensor, and nothing is written."""
    if dtype not in ("F32", "F16", "BF16"):
        raise ValueError(f"dtype {dtype!r} is not one of F32, F16, BF16")
    header: Dict[str, object] = {"__metadata__": dict(metadata)}
    blobs = []
    offset = 0
    for name, array in tensors.items():
        if dtype == "BF16":
            stored = _bfloat16_bits(array)
            finite = np.isfinite((stored.astype(np.uint32) << 16).view(np.float32))
        else:
            with np.errstate(over="ignore"):  # reported below, naming the tensor
                stored = np.ascontiguousarray(array, dtype=_DTYPES[dtype])
            finite = np.isfinite(stored)
        if not finite.all():
            where = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise ValueError(
                f"{path}: tensor {name} has a non-finite element at {where} in {dtype}"
                + (" (float16 holds magnitudes up to 65504: write F32 or BF16)" if dtype == "F16" else "")
            )
        data = stored.tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the format recommends
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for data in blobs:
            f.write(data)


def save_trace(path: str, trace: Trace, dtype: str = "F32"):
    """Writes ``trace`` in the layout ``tessera eval --traces`` reads (the README's "Trace files")."""
    g = trace.geometry
    metadata = {
        "format": FORMAT,
        "geometry": json.dumps(
            {
                "name": g.name,
                "layers": g.layers,
                "query_heads": g.query_heads,
                "kv_heads": g.kv_heads,
                "head_dim": g.head_dim,
                "tokens_per_image": g.tokens_per_image,
            }
        ),
        "spans": json.dumps([{"kind": s.kind, "index": s.index, "start": s.start, "count": s.count} for s in trace.spans]),
        "decode_steps": str(trace.decode_steps),
    }
    tensors: Dict[str, np.ndarray] = {}
    for layer in range(g.layers):
        tensors[f"layers.{layer}.keys"] = trace.keys[layer]
        tensors[f"layers.{layer}.values"] = trace.values[layer]
        if trace.queries is not None:
            tensors[f"layers.{layer}.queries"] = trace.queries[layer]
        if trace.decode_steps:
            tensors[f"layers.{layer}.decode.keys"] = trace.decode_keys[layer]
            tensors[f"layers.{layer}.decode.values"] = trace.decode_values[layer]
            tensors[f"layers.{layer}.decode.queries"] = trace.decode_queries[layer]
    write_safetensors(path, tensors, metadata, dtype)
