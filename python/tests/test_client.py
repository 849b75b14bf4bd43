"""The Python client against a real cluster: every request goes over mutual TLS to real processes."""

import asyncio
import os
import signal
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tessera import TINY, Client, Span, TesseraError, cluster_id, load_trace

SEED = int(os.environ.get("TESSERA_TEST_SEED", "20261204"))
IMAGE_TOKENS = TINY.tokens_per_image
TEXT_TOKENS = 24
PROMPT = IMAGE_TOKENS + TEXT_TOKENS
SPANS = [Span("image", 0, IMAGE_TOKENS), Span("text", IMAGE_TOKENS, TEXT_TOKENS)]


def prompt(rng):
    g = TINY
    keys = rng.standard_normal((g.layers, g.kv_heads, PROMPT, g.head_dim), dtype=np.float32)
    values = rng.standard_normal((g.layers, g.kv_heads, PROMPT, g.head_dim), dtype=np.float32)
    queries = rng.standard_normal((g.layers, g.query_heads, PROMPT, g.head_dim), dtype=np.float32)
    return keys, values, queries


def step(rng):
    g = TINY
    return (
        rng.standard_normal((g.layers, g.kv_heads, g.head_dim), dtype=np.float32),
        rng.standard_normal((g.layers, g.kv_heads, g.head_dim), dtype=np.float32),
        rng.standard_normal((g.layers, g.query_heads, g.head_dim), dtype=np.float32),
    )


def attention(query, keys, values):
    """Softmax(q·Kᵀ/√d)·V in float64: the reference for one query head over its KV head's rows."""
    logits = keys.astype(np.float64) @ query.astype(np.float64) / np.sqrt(query.shape[-1])
    weights = np.exp(logits - logits.max())
    return (weights / weights.sum()) @ values.astype(np.float64)


def expect_exact_attention(outputs, queries, keys, values, context):
    """Every query head's output is attention over every row of its KV head (GQA groups in order)."""
    g = TINY
    group = g.query_heads // g.kv_heads
    for layer in range(g.layers):
        for head in range(g.query_heads):
            want = attention(queries[layer, head], keys[layer, head // group], values[layer, head // group])
            np.testing.assert_allclose(outputs[layer, head], want, rtol=1e-4, atol=1e-5, err_msg=context)


def run(coroutine):
    return asyncio.run(coroutine)


def test_status_lists_the_workers(cluster):
    async def body():
        async with await Client.connect(cluster["coordinator"], certs=cluster["certs"]) as client:
            status = await client.status()
            assert sorted(w.endpoint.node_id for w in status.workers) == ["worker-1", "worker-2"]

    run(body())


def test_the_full_cache_decodes_exact_attention(cluster):
    """With the full cache every decode output equals attention over every row sent so far."""
    rng = np.random.default_rng(SEED)
    g = TINY
    keys, values, queries = prompt(rng)

    async def body():
        async with await Client.connect(cluster["coordinator"], certs=cluster["certs"]) as client:
            placement = await client.open_sequence(TINY, SPANS, policy="full", retention=1.0, decode_tokens=3)
            sequence = placement.sequence_id
            assert sequence != 0 and placement.shards
            held = await client.prefill(sequence, keys, values)
            assert held >= 2 * keys.nbytes  # every shard on its primary and its replica
            all_keys, all_values = keys, values
            for number in range(3):
                k, v, q = step(rng)
                outputs = (await client.decode(sequence, number, k, v, q)).outputs
                all_keys = np.concatenate([all_keys, k[:, :, None, :]], axis=2)
                all_values = np.concatenate([all_values, v[:, :, None, :]], axis=2)
                expect_exact_attention(outputs, q, all_keys, all_values, f"seed {SEED} step {number}")
                # A step already applied is answered again, not appended twice.
                again = await client.decode(sequence, number, k, v, q)
                np.testing.assert_array_equal(again.outputs, outputs)
            assert await client.close_sequence(sequence) > 0

    run(body())


def test_a_compressing_policy_keeps_its_budget(cluster):
    rng = np.random.default_rng(SEED + 1)
    keys, values, queries = prompt(rng)

    async def body():
        async with await Client.connect(cluster["coordinator"], certs=cluster["certs"]) as client:
            placement = await client.open_sequence(TINY, SPANS, policy="vl-cache", retention=0.25, decode_tokens=4)
            sequence = placement.sequence_id
            await client.prefill(sequence, keys, values, queries)
            for number in range(4):
                decoded = await client.decode(sequence, number, *step(rng))
                assert np.isfinite(decoded.outputs).all() and np.abs(decoded.outputs).sum() > 0, f"seed {SEED}"
            # Compressed to about a quarter of the prompt, plus the decoded rows.
            assert decoded.full_kv_bytes == 2 * keys.nbytes // PROMPT * (PROMPT + 4)
            assert 0 < decoded.kv_bytes < 0.35 * decoded.full_kv_bytes, f"seed {SEED}: {decoded}"
            await client.close_sequence(sequence)

    run(body())


def test_a_prefill_sent_in_parts_compresses_and_decodes_as_one_sent_whole(cluster):
    """``part_bytes=1`` sends every layer in a request of its own: the shard is prefilled, scored and
    compressed only once the last layer is there, exactly as from a single request."""
    rng = np.random.default_rng(SEED + 4)
    keys, values, queries = prompt(rng)
    steps = [step(rng) for _ in range(3)]

    async def decoded(client, part_bytes):
        placement = await client.open_sequence(TINY, SPANS, policy="snapkv", retention=0.25, decode_tokens=3)
        sequence = placement.sequence_id
        await client.prefill(sequence, keys, values, queries, part_bytes=part_bytes)
        results = [await client.decode(sequence, number, *inputs) for number, inputs in enumerate(steps)]
        await client.close_sequence(sequence)
        return results

    async def body():
        async with await Client.connect(cluster["coordinator"], certs=cluster["certs"]) as client:
            whole = await decoded(client, 16 << 20)
            parts = await decoded(client, 1)
        for number, (a, b) in enumerate(zip(whole, parts)):
            np.testing.assert_array_equal(a.outputs, b.outputs, err_msg=f"seed {SEED} step {number}")
            assert (a.kv_bytes, a.full_kv_bytes) == (b.kv_bytes, b.full_kv_bytes)
        assert 0 < parts[-1].kv_bytes < 0.35 * parts[-1].full_kv_bytes

    run(body())


def test_errors_carry_the_wire_code(cluster):
    async def body():
        async with await Client.connect(cluster["coordinator"], certs=cluster["certs"]) as client:
            with pytest.raises(TesseraError) as refused:
                await client.close_sequence(987654321)
            assert refused.value.code_name == "UNKNOWN_SEQUENCE", str(refused.value)
            with pytest.raises(TesseraError) as unknown:
                await client.decode(987654321, 0, *step(np.random.default_rng(SEED)))
            assert unknown.value.code_name == "UNKNOWN_SEQUENCE"
        # The certificate names tenant "default": claiming another is refused by the coordinator.
        async with await Client.connect(cluster["coordinator"], certs=cluster["certs"], tenant="mallory") as client:
            with pytest.raises(TesseraError) as denied:
                await client.open_sequence(TINY, SPANS, policy="full", retention=1.0)
            assert denied.value.code_name == "PERMISSION_DENIED", str(denied.value)

    run(body())


def test_bad_tensors_are_refused_before_anything_is_sent(cluster):
    rng = np.random.default_rng(SEED + 2)
    keys, values, queries = prompt(rng)

    async def body():
        async with await Client.connect(cluster["coordinator"], certs=cluster["certs"]) as client:
            placement = await client.open_sequence(TINY, SPANS, policy="snapkv", retention=0.5)
            sequence = placement.sequence_id
            with pytest.raises(ValueError, match=r"keys has shape"):
                await client.prefill(sequence, keys[:, :1], values, queries)
            poisoned = values.copy()
            poisoned[2, 1, 5, 7] = np.nan
            with pytest.raises(ValueError, match=r"layer 2 values has a non-finite element"):
                await client.prefill(sequence, keys, poisoned, queries)
            # The sequence is untouched: a valid prefill still goes through.
            assert await client.prefill(sequence, keys, values, queries) > 0
            await client.close_sequence(sequence)

    run(body())


def test_decoding_goes_on_after_the_primary_is_killed(own_cluster):
    """SIGKILL the primary of a shard between two steps: the next step waits for the failover (the
    client retries with a fresh placement) and the replica, now primary, holds every row."""
    rng = np.random.default_rng(SEED + 3)
    keys, values, _ = prompt(rng)

    async def body():
        async with await Client.connect(own_cluster["coordinator"], certs=own_cluster["certs"]) as client:
            placement = await client.open_sequence(TINY, SPANS, policy="full", retention=1.0, decode_tokens=3)
            sequence = placement.sequence_id
            await client.prefill(sequence, keys, values)
            all_keys, all_values = keys, values
            for number in range(3):
                if number == 1:
                    victim = placement.shards[0].primary.node_id
                    pid = next(w["pid"] for w in own_cluster["workers"] if w["id"] == victim)
                    os.kill(pid, signal.SIGKILL)
                k, v, q = step(rng)
                outputs = (await client.decode(sequence, number, k, v, q)).outputs
                all_keys = np.concatenate([all_keys, k[:, :, None, :]], axis=2)
                all_values = np.concatenate([all_values, v[:, :, None, :]], axis=2)
                expect_exact_attention(outputs, q, all_keys, all_values, f"seed {SEED} step {number}")
            moved = await client.refresh_placement(sequence)
            assert moved.epoch > placement.epoch and moved.shards[0].primary.node_id != victim
            await client.close_sequence(sequence)

    run(body())


def test_an_exported_trace_is_prefilled_and_decoded(cluster, tessera, tmp_path):
    """`tessera trace export` writes a trace; the client prefills it and decodes its own steps, and
    with the full cache every output is exact attention over the file's rows."""
    subprocess.run(
        [str(tessera), "trace", "export", "--workload", "image-qa", "--model", "tiny", "--seed", str(SEED)]
        + ["--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    trace = load_trace(str(tmp_path / "sequence-0.safetensors"))
    assert trace.geometry == TINY and trace.decode_steps > 2

    async def body():
        async with await Client.connect(cluster["coordinator"], certs=cluster["certs"]) as client:
            placement = await client.open_sequence(trace.geometry, trace.spans, policy="full", retention=1.0)
            sequence = placement.sequence_id
            await client.prefill(sequence, trace.keys, trace.values, trace.queries)
            keys, values = trace.keys, trace.values
            for number in range(2):
                k, v, q = trace.step(number)
                outputs = (await client.decode(sequence, number, k, v, q)).outputs
                keys = np.concatenate([keys, k[:, :, None, :]], axis=2)
                values = np.concatenate([values, v[:, :, None, :]], axis=2)
                expect_exact_attention(outputs, q, keys, values, f"seed {SEED} step {number}")
            await client.close_sequence(sequence)

    run(body())


def scrape(port):
    """Every sample of a process's /metrics, parsed by the Prometheus client library's own parser:
    {(name, frozenset(labels)): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_tell_an_operator_what_is_held_compressed_and_alive(cluster):
    """The coordinator's and the workers' /metrics parse cleanly and show an open sequence's charge
    by tenant and policy, the workers alive, the process figures, and the compression the workers did."""
    rng = np.random.default_rng(SEED + 3)
    keys, values, queries = prompt(rng)

    snapkv = frozenset({"policy": "snapkv"}.items())

    def compressed():
        """Bytes the workers compressed with SnapKV so far, before and after."""
        totals = [0, 0]
        for worker in cluster["workers"]:
            figures = scrape(worker["adminPort"])
            totals[0] += figures.get(("tessera_compression_input_bytes_total", snapkv), 0)
            totals[1] += figures.get(("tessera_compression_output_bytes_total", snapkv), 0)
            assert figures[("process_cpu_seconds_total", frozenset())] > 0
        return totals

    async def body():
        before = compressed()
        async with await Client.connect(cluster["coordinator"], certs=cluster["certs"]) as client:
            placement = await client.open_sequence(TINY, SPANS, policy="snapkv", retention=0.25, decode_tokens=2)
            sequence = placement.sequence_id
            await client.prefill(sequence, keys, values, queries)
            await client.decode(sequence, 0, *step(rng))
            # The coordinator publishes its gauges every half heartbeat interval.
            charged = ("tessera_accounted_kv_bytes", frozenset({"tenant": "default", "policy": "snapkv"}.items()))
            deadline = time.monotonic() + 10
            while (coordinator := scrape(cluster["coordinatorAdminPort"])).get(charged, 0) <= 0:
                assert time.monotonic() < deadline, "the coordinator never showed the sequence's charge"
                await asyncio.sleep(0.1)
            assert coordinator[("tessera_workers", frozenset({"state": "alive"}.items()))] == 2
            assert coordinator[("process_resident_memory_bytes", frozenset())] > 1e6
            assert coordinator[("process_open_fds", frozenset())] >= 3
            after = compressed()
            taken, kept = after[0] - before[0], after[1] - before[1]
            # Every copy of every shard compressed the prompt to about a quarter.
            assert taken == 2 * (keys.nbytes + values.nbytes)
            assert 0 < kept < 0.35 * taken
            await client.close_sequence(sequence)

    run(body())


def test_cluster_ids_follow_the_protocol():
    """The mapping ``sequence.proto`` spells out, with the values the Swift tests pin too."""
    assert cluster_id("owner", 5) == 11357538024524090489
    assert cluster_id("mallory", 5) == 11218012884897897600
    assert cluster_id("owner", 0) == 0
    scoped = cluster_id("t", 42)
    assert scoped >= 1 << 63 and cluster_id("other", scoped) == scoped


def test_a_sequence_opened_under_an_own_id(cluster):
    """A client's own id works in every call, and the placement carries the cluster's id for it."""
    rng = np.random.default_rng(SEED + 7)
    keys, values, queries = prompt(rng)

    async def body():
        async with await Client.connect(cluster["coordinator"], certs=cluster["certs"]) as client:
            placement = await client.open_sequence(TINY, SPANS, policy="snapkv", retention=0.5, sequence_id=31)
            assert placement.sequence_id == cluster_id(client.tenant, 31)
            assert await client.prefill(31, keys, values, queries) > 0
            outputs = (await client.decode(31, 0, *step(rng))).outputs
            assert outputs.shape == (TINY.layers, TINY.query_heads, TINY.head_dim)
            assert await client.close_sequence(placement.sequence_id) > 0

    run(body())
