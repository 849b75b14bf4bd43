"""Tessera's Python client: drive a cluster that compresses multimodal KV caches (VL-Cache, MadaKV,
LOOK-M and the baselines) from asyncio code. See ``tessera.client``."""

from tessera.client import (
    LLAVA_1_5_7B,
    LLAVA_1_6_MISTRAL_7B,
    QWEN2_5_VL_7B,
    TINY,
    Client,
    Connection,
    DecodeStep,
    Geometry,
    Span,
    TesseraError,
    cluster_id,
)
from tessera.trace import Trace, load_trace, read_safetensors

__all__ = [
    "Client",
    "Connection",
    "DecodeStep",
    "Geometry",
    "Span",
    "TesseraError",
    "cluster_id",
    "Trace",
    "load_trace",
    "read_safetensors",
    "TINY",
    "LLAVA_1_5_7B",
    "LLAVA_1_6_MISTRAL_7B",
    "QWEN2_5_VL_7B",
]
