"""`python -m tessera.neighbours`: key neighbours and their values, by modality."""

import numpy as np
import pytest

from tessera.client import Geometry, Span
from tessera.neighbours import layer_neighbours, main
from tessera.trace import Trace, save_trace

GEOMETRY = Geometry("test", layers=2, query_heads=2, kv_heads=2, head_dim=32)
SPANS = [Span("text", 0, 40), Span("image", 40, 160)]


def trace(values_follow_keys: bool, seed: int = 3) -> Trace:
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((2, 2, 200, 32)).astype(np.float32)
    values = keys.copy() if values_follow_keys else rng.standard_normal(keys.shape).astype(np.float32)
    return Trace(GEOMETRY, SPANS, keys, values, None, None, None, None)


def test_values_that_are_the_keys_are_as_alike_as_the_keys():
    for kind, n in layer_neighbours(trace(values_follow_keys=True), layer=1).items():
        assert n.value_cosine == pytest.approx(n.key_cosine), kind
        assert n.key_cosine > 0.3, kind
    assert {kind: n.rows for kind, n in layer_neighbours(trace(True), layer=0).items()} == {"image": 160, "text": 40}


def test_values_drawn_apart_from_the_keys_are_no_more_alike_than_random_pairs():
    for kind, n in layer_neighbours(trace(values_follow_keys=False), layer=0).items():
        assert abs(n.value_cosine - n.random_value_cosine) < 0.1, kind
        assert n.key_cosine > 0.3, kind


def test_the_command_prints_a_row_per_layer_and_modality_and_names_a_bad_layer(tmp_path, capsys):
    path = tmp_path / "t.safetensors"
    save_trace(str(path), trace(values_follow_keys=True))
    assert main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["layer", "modality", "rows", "key", "cos", "value", "cos", "random", "pairs"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["0", "image", "160"], ["0", "text", "40"], ["1", "image", "160"], ["1", "text", "40"]
    ]
    with pytest.raises(SystemExit) as exit:
        main([str(path), "--layers", "2"])
    assert exit.value.code == 2
    assert "layer 2 is outside 0..<2" in capsys.readouterr().err
