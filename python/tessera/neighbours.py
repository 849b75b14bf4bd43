"""How alike the values of rows with alike keys are, by modality, in a trace file.

Merging (LOOK-M, and the composite policy's ``merge`` part) folds an evicted row's key and value into
the kept row whose key is most like it. That can only help where rows with alike keys also have alike
values. For every prompt row of the chosen layers, in every KV head, this finds the other row whose
key is most like its own (cosine) and reports, by the row's modality, the mean cosine of those keys,
of the same pairs' values, and of the values of random pairs (the floor)::

    python -m tessera.neighbours traces/sequence-0.safetensors --layers 0,16,31

It reads generated traces (``tessera trace export``) and a model's own (``python -m tessera.dump_hf``)
alike, so the generator's answer can be set beside a real model's.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from tessera.trace import Trace, load_trace


@dataclass
class Neighbours:
    """Means over one modality's rows of a layer, every KV head."""

    rows: int
    key_cosine: float
    value_cosine: float
    random_value_cosine: float


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.where(norms == 0, 1, norms)


def layer_neighbours(trace: Trace, layer: int, seed: int = 0) -> Dict[str, Neighbours]:
    """Each modality's rows of ``layer``: how alike their nearest keys, and those pairs' values, are."""
    if not 0 <= layer < trace.geometry.layers:
        raise ValueError(f"layer {layer} is outside 0..<{trace.geometry.layers}")
    tokens = trace.keys.shape[2]
    if tokens < 2:
        raise ValueError("a prompt of fewer than 2 rows has no neighbours")
    kinds = np.empty(tokens, dtype=object)
    for span in trace.spans:
        kinds[span.start:span.start + span.count] = span.kind
    rng = np.random.default_rng(seed)
    sums: Dict[str, np.ndarray] = {}
    for head in range(trace.geometry.kv_heads):
        keys = _unit(trace.keys[layer, head].astype(np.float64))
        values = _unit(trace.values[layer, head].astype(np.float64))
        similarity = keys @ keys.T
        np.fill_diagonal(similarity, -np.inf)
        nearest = similarity.argmax(axis=1)
        key_cosine = similarity[np.arange(tokens), nearest]
        value_cosine = np.einsum("ij,ij->i", values, values[nearest])
        others = (np.arange(tokens) + rng.integers(1, tokens, tokens)) % tokens
        random_cosine = np.einsum("ij,ij->i", values, values[others])
        for kind in set(kinds):
            rows = kinds == kind
            totals = np.array([rows.sum(), key_cosine[rows].sum(), value_cosine[rows].sum(), random_cosine[rows].sum()])
            sums[kind] = sums.get(kind, 0) + totals
    return {
        kind: Neighbours(int(total[0]) // trace.geometry.kv_heads, *(total[1:] / total[0]))
        for kind, total in sorted(sums.items())
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tessera.neighbours",
        description="How alike the values of rows with alike keys are, by modality (what merging relies on).",
    )
    parser.add_argument("trace", help="a trace file (.safetensors) from tessera trace export or tessera.dump_hf")
    parser.add_argument("--layers", default="", help="comma-separated layers (default: first, middle and last)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random pairs (default: 0)")
    args = parser.parse_args(argv)
    try:
        trace = load_trace(args.trace)
        count = trace.geometry.layers
        layers: List[int] = (
            [int(text) for text in args.layers.split(",")] if args.layers else sorted({0, count // 2, count - 1})
        )
        results = [(layer, layer_neighbours(trace, layer, args.seed)) for layer in layers]
    except (OSError, ValueError) as error:
        parser.error(str(error))
    print(f"{'layer':>5}  {'modality':<11}  {'rows':>5}  {'key cos':>7}  {'value cos':>9}  {'random pairs':>12}")
    for layer, by_kind in results:
        for kind, n in by_kind.items():
            print(
                f"{layer:>5}  {kind:<11}  {n.rows:>5}  {n.key_cosine:>7.3f}  {n.value_cosine:>9.3f}  "
                f"{n.random_value_cosine:>12.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
