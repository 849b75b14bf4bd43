"""`tessera.dump_hf` on a tiny randomly initialised LLaVA built from a config (no download): the trace
holds exactly the keys and values the model caches and the queries whose attention the model
computes, and the Swift side takes it through `eval --traces`, `compress` and `bench --traces`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tessera import Span, load_trace, read_safetensors
from tessera.dump_hf import main, modality_spans, record_trace
from tessera.trace import save_trace, write_safetensors

IMAGE_TOKEN = 999
IMAGE_TOKENS = 16
# Text, one image (16 placeholder tokens, which the model replaces with its projected patches), then a
# question long enough (45 tokens) that SnapKV's 32-row window and VL-Cache's post-vision rows fit in it.
PROMPT = [1, 5, 6] + [IMAGE_TOKEN] * IMAGE_TOKENS + list(range(100, 145))
STEPS = 3


def tiny_llava(attention: str = "sdpa"):
    torch.manual_seed(7)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14
        ),
        text_config=LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
        ),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=IMAGE_TOKENS,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attention)
    return model


def inputs():
    generator = torch.Generator().manual_seed(11)
    return {"input_ids": torch.tensor([PROMPT]), "pixel_values": torch.randn(1, 3, 56, 56, generator=generator)}


def cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    model = tiny_llava()
    trace = record_trace(model, inputs(), decode_steps=STEPS, name="tiny-llava")
    folder = tmp_path_factory.mktemp("dumped")
    path = folder / "tiny-llava.safetensors"
    save_trace(str(path), trace)
    return model, trace, path


def test_the_geometry_and_spans_come_from_the_model_and_its_placeholders(recorded):
    _, trace, _ = recorded
    g = trace.geometry
    assert (g.name, g.layers, g.query_heads, g.kv_heads, g.head_dim, g.tokens_per_image) == (
        "tiny-llava", 3, 4, 2, 16, IMAGE_TOKENS
    )
    assert trace.spans == [Span("text", 0, 3), Span("image", 3, IMAGE_TOKENS, 0), Span("text", 19, 45)]
    m = len(PROMPT)
    assert trace.keys.shape == (3, 2, m, 16) and trace.values.shape == (3, 2, m, 16)
    assert trace.queries.shape == (3, 4, m, 16)
    assert trace.decode_keys.shape == (3, 2, STEPS, 16) and trace.decode_queries.shape == (3, 4, STEPS, 16)


def test_keys_and_values_are_what_the_model_caches(recorded):
    _, trace, _ = recorded
    model = tiny_llava()  # the same seed: the same weights, and no recording this time
    with torch.no_grad():
        output = model(**inputs(), use_cache=True)
        for _ in range(STEPS):
            token = output.logits[:, -1:].argmax(dim=-1)
            output = model(input_ids=token, use_cache=True, cache=cache_of(output))
    cache = cache_of(output)
    m = len(PROMPT)
    for layer in range(3):
        keys = cache.layers[layer].keys[0].numpy()
        values = cache.layers[layer].values[0].numpy()
        np.testing.assert_array_equal(keys[:, :m], trace.keys[layer])
        np.testing.assert_array_equal(values[:, :m], trace.values[layer])
        np.testing.assert_array_equal(keys[:, m:], trace.decode_keys[layer])
        np.testing.assert_array_equal(values[:, m:], trace.decode_values[layer])


def test_the_queries_give_the_models_own_attention_weights(recorded):
    _, trace, _ = recorded
    model = tiny_llava("eager")
    with torch.no_grad():
        attentions = model(**inputs(), output_attentions=True).attentions
    m, d = len(PROMPT), trace.geometry.head_dim
    group = trace.geometry.query_heads // trace.geometry.kv_heads
    causal = np.triu(np.full((m, m), -np.inf), k=1)
    for layer in range(3):
        keys = np.repeat(trace.keys[layer], group, axis=0)  # query head h reads KV head h // group
        scores = trace.queries[layer] @ keys.transpose(0, 2, 1) / np.sqrt(d) + causal
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        np.testing.assert_allclose(weights, attentions[layer][0].numpy(), atol=1e-5)


def test_the_file_reads_back_exactly_and_float16_overflow_is_refused(recorded, tmp_path):
    _, trace, path = recorded
    back = load_trace(str(path))
    assert back.geometry == trace.geometry and back.spans == trace.spans and back.decode_steps == STEPS
    for name in ("keys", "values", "queries", "decode_keys", "decode_values", "decode_queries"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
    with pytest.raises(ValueError, match=r"tensor big has a non-finite element at \(1,\) in F16"):
        write_safetensors(str(tmp_path / "big.safetensors"), {"big": np.array([1.0, 7e4], dtype=np.float32)}, {}, "F16")
    assert not (tmp_path / "big.safetensors").exists()
    write_safetensors(str(tmp_path / "bf16.safetensors"), {"x": np.array([1.0, 7e4, -3.5], dtype=np.float32)}, {}, "BF16")
    tensors, _ = read_safetensors(str(tmp_path / "bf16.safetensors"))
    np.testing.assert_array_equal(tensors["x"], [1.0, 70144.0, -3.5])  # 7e4 rounded to bfloat16's 8 bits


def test_a_qwen2_5_vl_prompt_with_an_image_and_a_video_is_recorded_with_its_frames():
    """Qwen2.5-VL: multimodal rotary positions, an image of 4 merged patches and a video of 2 temporal
    patches, whose 8 tokens become 2 frames (`video_grid_thw`); keys equal the model's cache."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    def model():
        torch.manual_seed(5)
        config = Qwen2_5_VLConfig(
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                               fullatt_block_indexes=[0]),
            text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1000, bos_token_id=1, eos_token_id=2,
                             rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
            image_token_id=990, video_token_id=991, vision_start_token_id=992, vision_end_token_id=993,
        )
        return Qwen2_5_VLForConditionalGeneration(config).eval()

    ids = [1, 5, 992] + [990] * 4 + [993, 6, 992] + [991] * 8 + [993, 7, 8, 9]
    generator = torch.Generator().manual_seed(13)
    patch = 3 * 2 * 14 * 14  # channels × temporal patch × patch²
    inputs = {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.randn(16, patch, generator=generator),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "pixel_values_videos": torch.randn(32, patch, generator=generator),
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
    }
    trace = record_trace(model(), inputs, decode_steps=2)
    assert trace.spans == [
        Span("text", 0, 3),
        Span("image", 3, 4, 0),
        Span("text", 7, 3),
        Span("video_frame", 10, 4, 0),
        Span("video_frame", 14, 4, 1),
        Span("text", 18, 4),
    ]
    with torch.no_grad():
        reference = model()
        output = reference(**inputs, use_cache=True)
        for _ in range(2):
            token = output.logits[:, -1:].argmax(dim=-1)
            output = reference(input_ids=token, use_cache=True, cache=cache_of(output))
    for layer in range(2):
        keys = cache_of(output).layers[layer].keys[0].numpy()
        np.testing.assert_array_equal(keys[:, : len(ids)], trace.keys[layer])
        np.testing.assert_array_equal(keys[:, len(ids) :], trace.decode_keys[layer])


def test_spans_split_videos_into_frames_and_refuse_an_uneven_split():
    ids = [1, 2] + [50] * 8 + [3] + [60] * 4
    assert modality_spans(ids, image_token=60, video_token=50, frames_per_video=[2]) == [
        Span("text", 0, 2),
        Span("video_frame", 2, 4, 0),
        Span("video_frame", 6, 4, 1),
        Span("text", 10, 1),
        Span("image", 11, 4, 0),
    ]
    with pytest.raises(ValueError, match="video 0 has 8 tokens, which do not split into 3 equal frames"):
        modality_spans(ids, image_token=60, video_token=50, frames_per_video=[3])


def test_the_command_line_records_a_model_and_its_processor_from_disk(tmp_path, capsys):
    """`python -m tessera.dump_hf` as a user runs it: a model folder with its processor (a word-level
    tokenizer and CLIP's image processor, saved here), an image file and a prompt."""
    from PIL import Image
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    folder = tmp_path / "tiny-llava"
    tiny_llava().save_pretrained(folder)
    words = "user : what is in the picture ? assistant".split()
    vocabulary = {"<unk>": 0, "<image>": IMAGE_TOKEN, **{word: 10 + i for i, word in enumerate(words)}}
    tokenizer = Tokenizer(WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")
    fast.add_tokens(["<image>"], special_tokens=True)
    LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
        tokenizer=fast,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    ).save_pretrained(folder)
    image = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "picture.safetensors"

    assert main(["--model", str(folder), "--image", str(image), "--prompt",
                 "user : <image> what is in the picture ? assistant :", "--decode-steps", "2", "--out", str(out)]) == 0
    assert "26 prompt positions (text 0+2, image 2+16, text 18+8), 2 decode steps" in capsys.readouterr().out
    trace = load_trace(str(out))
    assert trace.geometry.name == "tiny-llava"
    assert trace.spans == [Span("text", 0, 2), Span("image", 2, IMAGE_TOKENS, 0), Span("text", 18, 8)]
    assert trace.keys.dtype == np.float16 and trace.decode_steps == 2


def test_the_command_line_names_a_bad_argument(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--model", "m", "--prompt", "p", "--out", "o", "--decode-steps", "-1"])
    assert exit.value.code == 2
    assert "--decode-steps must be 0 or more, got -1" in capsys.readouterr().err


def run(tessera, *arguments):
    done = subprocess.run([str(tessera), *arguments], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"tessera {' '.join(arguments)} exited {done.returncode}:\n{done.stderr}"
    return done


def test_eval_compress_and_bench_take_the_recorded_trace(recorded, tessera, tmp_path):
    _, trace, path = recorded
    results = tmp_path / "eval.json"
    run(tessera, "eval", "--traces", str(path), "--policies", "full,snapkv,h2o,vl-cache", "--budgets", "0.5",
        "--json", str(results))
    rows = json.loads(results.read_text())["results"]
    assert sorted(row["policy"] for row in rows) == ["full", "h2o", "snapkv", "vl-cache"]
    full = next(row for row in rows if row["policy"] == "full")
    assert full["outputError"] == pytest.approx(0, abs=1e-6)
    assert all(row["keptBytes"] < full["keptBytes"] for row in rows if row["policy"] != "full")

    kept = tmp_path / "kept.safetensors"
    run(tessera, "compress", "--trace", str(path), "--policy", "snapkv", "--budget", "0.5", "--out", str(kept))
    tensors, _ = read_safetensors(str(kept))
    m = len(PROMPT)
    for layer in range(3):
        for head in range(2):
            positions = tensors[f"layers.{layer}.heads.{head}.kept"]
            assert list(positions) == sorted(set(positions)) and 0 < len(positions) < m
            np.testing.assert_array_equal(tensors[f"layers.{layer}.heads.{head}.keys"], trace.keys[layer, head, positions])

    # The recorded trace and one the generator exports, side by side: sequences 0 and 2 replay the
    # generator's (sequence-0 sorts first), 1 and 3 the recorded one.
    traces = tmp_path / "traces"
    run(tessera, "trace", "export", "--workload", "image-qa", "--model", "tiny", "--sequences", "1", "--out", str(traces))
    (traces / path.name).write_bytes(path.read_bytes())
    exported = load_trace(str(traces / "sequence-0.safetensors"))
    report = tmp_path / "bench.json"
    run(tessera, "bench", "--local", "2", "--traces", str(traces), "--policies", "full,snapkv", "--budget", "0.5",
        "--sequences", "4", "--concurrency", "2", "--audit-fraction", "1", "--json", str(report))
    bench = json.loads(report.read_text())
    assert bench["model"] == "tiny"
    for policy in bench["policies"]:
        steps = 2 * exported.decode_steps + 2 * STEPS
        assert (policy["sequences"], policy["errors"], policy["decodeTokens"]) == (4, 0, steps), policy
    snapkv = next(p for p in bench["policies"] if p["policy"] == "snapkv")
    assert snapkv["compressedKVBytes"] < snapkv["fullKVBytes"]
    assert snapkv["outputError"] is not None


def test_the_readme_example_replays_the_trace_on_a_cluster(recorded, cluster, tmp_path):
    """The README's "Use your own model" Python example, run as written."""
    _, _, path = recorded
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Use your own model") :]
    example = section[section.index("```python\n") + len("```python\n") :]
    script = tmp_path / "replay.py"
    script.write_text(example[: example.index("```")])
    python = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(script), cluster["coordinator"], cluster["certs"], str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(python)},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"step {t}" for t in range(STEPS)]
    held, full = (int(word) for word in lines[-1].split()[2:5:2])
    assert 0 < held < full
