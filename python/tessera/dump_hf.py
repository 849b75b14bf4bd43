"""Record a trace (the safetensors layout ``tessera eval --traces`` reads) from a Hugging Face
``transformers`` vision-language model's own forward pass: the keys and values every language-model
layer caches, the query rows the scoring policies observe, greedy decode steps, and the modality of
every prompt position from the image and video placeholder tokens.

Works offline on any LLaVA, LLaVA-NeXT or Qwen2.5-VL style model on disk (a language model whose
attention layers call ``transformers``' attention interface, and a config naming the image token)::

    python -m tessera.dump_hf --model /models/llava-1.5-7b-hf --image cat.jpg \\
        --prompt "USER: <image>\\nWhat is in the picture? ASSISTANT:" --decode-steps 8 --out cat.safetensors

The tensors are taken where the model hands them to its attention function, after the rotary
position embedding: exactly the keys and values its cache holds and the queries that attend over
them. Needs ``torch`` and ``transformers`` (and ``Pillow`` for ``--image``), which the client itself
does not.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from tessera.client import Geometry, Span
from tessera.trace import Trace, save_trace

CAPTURE = "tessera_capture"


def modality_spans(input_ids: Sequence[int], image_token: Optional[int], video_token: Optional[int] = None,
                   frames_per_video: Sequence[int] = ()) -> List[Span]:
    """Spans tiling the prompt: each run of ``image_token`` is one image; each run of ``video_token``
    is one video, cut into ``frames_per_video[v]`` equal frames (one frame when not given); the
    rest is text."""
    kinds = ["text"] * len(input_ids)
    for position, token in enumerate(input_ids):
        if image_token is not None and token == image_token:
            kinds[position] = "image"
        elif video_token is not None and token == video_token:
            kinds[position] = "video"
    runs = []  # (kind, start, count)
    for position, kind in enumerate(kinds):
        if runs and runs[-1][0] == kind:
            runs[-1][2] += 1
        else:
            runs.append([kind, position, 1])
    spans: List[Span] = []
    images = videos = frames = 0
    for kind, start, count in runs:
        if kind == "text":
            spans.append(Span("text", start, count))
        elif kind == "image":
            spans.append(Span("image", start, count, images))
            images += 1
        else:
            parts = frames_per_video[videos] if videos < len(frames_per_video) else 1
            if parts < 1 or count % parts:
                raise ValueError(f"video {videos} has {count} tokens, which do not split into {parts} equal frames")
            for part in range(parts):
                spans.append(Span("video_frame", start + part * (count // parts), count // parts, frames))
                frames += 1
            videos += 1
    return spans


def _placeholder_tokens(config):
    """The image and video placeholder token ids a VLM config names (None where it has none)."""

    def first(*names):
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int) and value >= 0:
                return value
        return None

    return first("image_token_id", "image_token_index"), first("video_token_id", "video_token_index")


def _frames_per_video(inputs) -> List[int]:
    """Temporal patches per video from Qwen2.5-VL's ``video_grid_thw`` (empty for other models)."""
    grid = inputs.get("video_grid_thw")
    return [] if grid is None else [int(t) for t in grid[:, 0]]


class _Recorder:
    """Collects, per language-model layer, what the model passes to its attention function."""

    def __init__(self, layers):
        self.index = {id(module): layer for layer, module in enumerate(layers)}
        self.calls: Dict[int, list] = {}

    def capture(self, delegate):
        def attention(module, query, key, value, attention_mask, **kwargs):
            layer = self.index.get(id(module))
            if layer is not None:
                self.calls.setdefault(layer, []).append((query.detach(), key.detach(), value.detach()))
            return delegate(module, query, key, value, attention_mask, **kwargs)

        return attention

    def take(self, layers: int):
        missing = [layer for layer in range(layers) if len(self.calls.get(layer, [])) != 1]
        if missing:
            raise RuntimeError(
                f"the attention function was not called exactly once for layers {missing}: the model's "
                "language-model attention does not go through transformers' attention interface"
            )
        taken = [self.calls[layer][0] for layer in range(layers)]
        self.calls = {}
        return taken


def _attention_layers(model):
    """The self-attention module of every language-model decoder layer, in order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no language-model decoder with `layers` (get_decoder())")
    return [layer.self_attn for layer in layers]


def _numpy(tensor) -> np.ndarray:
    return tensor[0].float().cpu().numpy()  # drop the batch of one: [heads, rows, head_dim]


def record_trace(model, inputs, *, decode_steps: int = 0, query_rows: Optional[int] = None,
                 name: Optional[str] = None) -> Trace:
    """Runs ``model`` on ``inputs`` (a processor's output for one prompt: ``input_ids`` and the
    pixel values) and ``decode_steps`` greedy steps after it; returns the trace. ``query_rows``
    keeps the last that many prompt rows of queries (default: every row, which H2O and LOOK-M
    observe; SnapKV needs 32, VL-Cache the rows after the last visual token)."""
    import torch
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"one prompt at a time: input_ids has a batch of {input_ids.shape[0]}")
    prompt = [int(token) for token in input_ids[0]]
    image_token, video_token = _placeholder_tokens(model.config)
    spans = modality_spans(prompt, image_token, video_token, _frames_per_video(inputs))

    attention = _attention_layers(model)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    previous = text_config._attn_implementation or "eager"
    delegate = ALL_ATTENTION_FUNCTIONS.get_interface(previous, None)
    if delegate is None:  # eager attention is the model's own function, not a registered one
        delegate = sys.modules[type(attention[0]).__module__].eager_attention_forward
    recorder = _Recorder(attention)
    AttentionInterface.register(CAPTURE, recorder.capture(delegate))
    model.set_attn_implementation({"text_config": CAPTURE} if text_config is not model.config else CAPTURE)
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    try:
        with torch.no_grad():
            output = model(**inputs, use_cache=True)
            prefill = recorder.take(len(attention))
            steps = []
            for _ in range(decode_steps):
                cache = getattr(output, "cache", None) or output.past_key_values
                token = output.logits[:, -1:].argmax(dim=-1)
                output = model(input_ids=token, use_cache=True, **{cache_argument: cache})
                steps.append(recorder.take(len(attention)))
    finally:
        model.set_attn_implementation({"text_config": previous} if text_config is not model.config else previous)

    m = len(prompt)
    query, key, _ = prefill[0]
    rows = m if query_rows is None else max(0, min(query_rows, m))
    geometry = Geometry(
        name or os.path.basename(str(getattr(model.config, "name_or_path", "")).rstrip("/")) or type(model).__name__,
        len(attention),
        query.shape[1],
        key.shape[1],
        query.shape[-1],
        next((s.count for s in spans if s.kind == "image"), 0),
    )
    if key.shape[2] != m:
        raise RuntimeError(f"layer 0 cached {key.shape[2]} positions for a prompt of {m} tokens")
    return Trace(
        geometry,
        spans,
        keys=np.stack([_numpy(k) for _, k, _ in prefill]),
        values=np.stack([_numpy(v) for _, _, v in prefill]),
        queries=np.stack([_numpy(q)[:, m - rows :] for q, _, _ in prefill]) if rows else None,
        # Each step's new row is the last the cache passes to attention.
        decode_keys=np.stack([np.stack([_numpy(k)[:, -1] for _, k, _ in step], axis=0) for step in steps], axis=2)
        if steps else None,
        decode_values=np.stack([np.stack([_numpy(v)[:, -1] for _, _, v in step], axis=0) for step in steps], axis=2)
        if steps else None,
        decode_queries=np.stack([np.stack([_numpy(q)[:, -1] for q, _, _ in step], axis=0) for step in steps], axis=2)
        if steps else None,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tessera.dump_hf",
        description="Record a Tessera trace (safetensors) from a Hugging Face vision-language model on disk.",
    )
    parser.add_argument("--model", required=True, help="a model folder (or hub id already in the local cache)")
    parser.add_argument("--prompt", required=True,
                        help="the prompt, with the model's image placeholder (e.g. <image>) where each image goes")
    parser.add_argument("--image", action="append", default=[], help="an image file, once per placeholder")
    parser.add_argument("--decode-steps", type=int, default=8, help="greedy decode steps to record (default 8)")
    parser.add_argument("--query-rows", type=int, default=None,
                        help="keep the last R prompt rows of queries (default: every row)")
    parser.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f16",
                        help="stored element type (default f16; f32 to keep the model's floats exactly)")
    parser.add_argument("--name", default=None, help="the geometry's name in the trace (default: the model folder's)")
    parser.add_argument("--out", required=True, help="the trace file to write")
    args = parser.parse_args(argv)
    if args.decode_steps < 0:
        parser.error(f"--decode-steps must be 0 or more, got {args.decode_steps}")
    if args.query_rows is not None and args.query_rows < 0:
        parser.error(f"--query-rows must be 0 or more, got {args.query_rows}")

    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(args.model, local_files_only=True).eval()
    images = None
    if args.image:
        from PIL import Image

        images = [Image.open(path).convert("RGB") for path in args.image]
    inputs = processor(images=images, text=args.prompt, return_tensors="pt")
    trace = record_trace(model, dict(inputs), decode_steps=args.decode_steps, query_rows=args.query_rows,
                         name=args.name)
    save_trace(args.out, trace, args.dtype.upper())
    g = trace.geometry
    print(
        f"{args.out}: {g.layers} layers, {g.query_heads} query / {g.kv_heads} KV heads of {g.head_dim}, "
        f"{trace.keys.shape[2]} prompt positions ({', '.join(f'{s.kind} {s.start}+{s.count}' for s in trace.spans)}), "
        f"{trace.decode_steps} decode steps"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
