"""An asyncio client for a Tessera cluster, speaking the same wire protocol as the Swift client.

Frames are a 4-byte big-endian length and one serialized ``tessera.v1.Envelope``. The first frame on a
connection is a ``Hello`` naming the client's role and node id (over mutual TLS, the node id is the
certificate's name and the tenant is the one the certificate names). Requests carry odd ids (the side
that connects) and replies are matched by id, so many requests share one connection.

Sequences are opened through the coordinator, which admits and places them; prefill and decode then go
straight to each shard's primary worker, which replicates them before it answers. When a primary
cannot take a write (a failover is under way) the client asks for the placement again and retries that
shard with backoff, as the Swift client does; writes are idempotent, so a retry never applies twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import secrets
import ssl
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tessera.v1 import (
    cluster_pb2,
    common_pb2,
    data_pb2,
    envelope_pb2,
    errors_pb2,
    handshake_pb2,
    sequence_pb2,
)

PROTOCOL_VERSION = 1
#: The largest frame a Tessera process accepts by default.
MAX_FRAME_BYTES = 64 << 20
#: How long writes keep retrying while their shard fails over (the coordinator needs the failure
#: detector's dead-after time, 3 s by default, to notice).
FAILOVER_PATIENCE_SECONDS = 20.0
#: How many parts of one shard's prefill are on their way at once: the worker takes the next part off
#: the wire while it still checks and profiles this one.
PARTS_IN_FLIGHT = 2
_RETRYABLE = {
    errors_pb2.ERROR_CODE_NOT_PRIMARY,
    errors_pb2.ERROR_CODE_STALE_EPOCH,
    errors_pb2.ERROR_CODE_UNAVAILABLE,
    errors_pb2.ERROR_CODE_MALFORMED_FRAME,
}


CLIENT_ID_LIMIT = 1 << 62
"""Sequence ids below this are a client's own, scoped to its tenant."""


def cluster_id(tenant: str, sequence_id: int) -> int:
    """The cluster's id of ``tenant``'s own ``sequence_id`` (``OpenSequence.sequence_id`` in
    ``sequence.proto``): the top bit set over the first 63 bits of SHA-256 of the tenant's UTF-8
    length (8 bytes, little-endian), its UTF-8 bytes and the id (8 bytes, little-endian). 0 and the
    cluster's ids (2**62 and up) map to themselves."""
    if sequence_id == 0 or sequence_id >= CLIENT_ID_LIMIT:
        return sequence_id
    name = tenant.encode()
    digest = hashlib.sha256(struct.pack("<Q", len(name)) + name + struct.pack("<Q", sequence_id)).digest()
    return int.from_bytes(digest[:8], "big") | (1 << 63)


class TesseraError(Exception):
    """An ``Error`` a Tessera process answered with: ``code`` is the wire ``ErrorCode`` number and
    ``code_name`` its name without the prefix (for example ``"UNKNOWN_SEQUENCE"``)."""

    def __init__(self, code: int, message: str, retry_after: Optional[float] = None):
        self.code = code
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"{self.code_name}: {message}")

    @property
    def code_name(self) -> str:
        try:
            return errors_pb2.ErrorCode.Name(self.code).removeprefix("ERROR_CODE_")
        except ValueError:
            return f"CODE_{self.code}"

    @property
    def retryable(self) -> bool:
        """Whether a fresh placement or a new connection may cure it."""
        return self.code in _RETRYABLE

    @classmethod
    def from_proto(cls, error: errors_pb2.Error) -> "TesseraError":
        retry = error.retry_after_millis / 1000 if error.retry_after_millis else None
        return cls(error.code, error.message, retry)


@dataclass(frozen=True)
class Geometry:
    """A model's KV-cache geometry (as ``tessera.v1.ModelGeometry``)."""

    name: str
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    tokens_per_image: int = 0

    def proto(self) -> sequence_pb2.ModelGeometry:
        return sequence_pb2.ModelGeometry(
            name=self.name,
            layers=self.layers,
            query_heads=self.query_heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            tokens_per_image=self.tokens_per_image,
        )


#: The presets the Swift side knows by name (`tessera eval --model`).
TINY = Geometry("tiny", 6, 4, 2, 32, 64)
LLAVA_1_5_7B = Geometry("llava-1.5-7b", 32, 32, 32, 128, 576)
LLAVA_1_6_MISTRAL_7B = Geometry("llava-1.6-mistral-7b", 32, 32, 8, 128, 576)
QWEN2_5_VL_7B = Geometry("qwen2.5-vl-7b", 28, 28, 4, 128, 256)

_KINDS = {
    "text": common_pb2.MODALITY_KIND_TEXT,
    "image": common_pb2.MODALITY_KIND_IMAGE,
    "video_frame": common_pb2.MODALITY_KIND_VIDEO_FRAME,
}


@dataclass(frozen=True)
class Span:
    """Prompt positions ``start ..< start + count`` produced by one modality: ``"text"``,
    ``"image"`` or ``"video_frame"`` (``index`` tells which image or frame)."""

    kind: str
    start: int
    count: int
    index: int = 0

    def proto(self) -> sequence_pb2.ModalitySpan:
        if self.kind not in _KINDS:
            raise ValueError(f"span kind {self.kind!r} is not one of {sorted(_KINDS)}")
        return sequence_pb2.ModalitySpan(kind=_KINDS[self.kind], index=self.index, start=self.start, count=self.count)


def tensor(array: np.ndarray, name: str) -> data_pb2.Tensor:
    """``array`` as a wire ``Tensor`` (float32, or float16 when the array is), checked finite."""
    if array.dtype == np.float16:
        dtype, wire = data_pb2.SCALAR_TYPE_FLOAT16, np.ascontiguousarray(array, dtype="<f2")
    else:
        dtype, wire = data_pb2.SCALAR_TYPE_FLOAT32, np.ascontiguousarray(array, dtype="<f4")
    if array.size == 0:
        raise ValueError(f"{name} is empty: every dimension must be at least 1")
    if not np.isfinite(wire).all():
        index = int(np.flatnonzero(~np.isfinite(wire))[0])
        raise ValueError(f"{name} has a non-finite element at flat index {index}; every element must be finite")
    return data_pb2.Tensor(dtype=dtype, shape=list(wire.shape), data=wire.tobytes())


def _check_shape(array: np.ndarray, expected: Tuple[int, ...], name: str) -> None:
    if tuple(array.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(array.shape)}; expected {expected}")


def _address(text: str) -> Tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def tls_context(certs: str, name: str) -> ssl.SSLContext:
    """Mutual TLS 1.3 with the cluster CA (``certs/ca.pem``) as the only root, as certificate
    ``name`` (``certs/NAME.pem`` and ``certs/NAME-key.pem``, made by ``tessera certs issue``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # nodes are named by their certificates' subjects, not host names
    context.load_verify_locations(os.path.join(certs, "ca.pem"))
    context.load_cert_chain(os.path.join(certs, f"{name}.pem"), os.path.join(certs, f"{name}-key.pem"))
    return context


@dataclass
class DecodeStep:
    """One decode step's outcome over every shard."""

    #: Attention outputs ``[layers, query_heads, head_dim]``, float32.
    outputs: np.ndarray
    #: K/V bytes the shards' primaries hold for the sequence after the step.
    kv_bytes: int
    #: What they would hold uncompressed.
    full_kv_bytes: int


class Connection:
    """One connection to a Tessera process: the handshake, then requests matched to replies by id.

    One-way messages the peer sends (a coordinator's ``PlacementMoved``) go to ``on_push``.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, on_push=None):
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1, 2)
        self._pending: Dict[int, asyncio.Future] = {}
        self._on_push = on_push
        self._closed: Optional[Exception] = None
        self._read_task: Optional[asyncio.Task] = None

    @classmethod
    async def open(
        cls, address: str, node_id: str, context: Optional[ssl.SSLContext], on_push=None, timeout: float = 10.0
    ) -> "Connection":
        host, port = _address(address)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, limit=MAX_FRAME_BYTES), timeout
        )
        connection = cls(reader, writer, on_push)
        hello = handshake_pb2.Hello(
            protocol_version=PROTOCOL_VERSION, role=handshake_pb2.NODE_ROLE_CLIENT, node_id=node_id, incarnation=1
        )
        connection._send(envelope_pb2.Envelope(request_id=0, hello=hello))
        answer = await asyncio.wait_for(connection._read(), timeout)
        if answer.WhichOneof("body") == "error":
            writer.close()
            raise TesseraError.from_proto(answer.error)
        if answer.WhichOneof("body") != "hello_ack":
            writer.close()
            raise TesseraError(errors_pb2.ERROR_CODE_BAD_REQUEST, f"expected hello_ack, got {answer.WhichOneof('body')}")
        connection._read_task = asyncio.create_task(connection._read_loop())
        return connection

    @property
    def is_open(self) -> bool:
        return self._closed is None

    def _send(self, envelope: envelope_pb2.Envelope) -> None:
        payload = envelope.SerializeToString(deterministic=True)
        if not 0 < len(payload) <= MAX_FRAME_BYTES:
            raise ValueError(f"a frame of {len(payload)} bytes is outside 1...{MAX_FRAME_BYTES}")
        self._writer.write(struct.pack(">I", len(payload)) + payload)

    async def _read(self) -> envelope_pb2.Envelope:
        (length,) = struct.unpack(">I", await self._reader.readexactly(4))
        if length == 0 or length > MAX_FRAME_BYTES:
            raise TesseraError(errors_pb2.ERROR_CODE_FRAME_TOO_LARGE, f"the peer sent a frame of {length} bytes")
        envelope = envelope_pb2.Envelope()
        envelope.ParseFromString(await self._reader.readexactly(length))
        return envelope

    async def _read_loop(self) -> None:
        try:
            while True:
                envelope = await self._read()
                future = self._pending.pop(envelope.request_id, None)
                if future is not None:
                    if not future.done():
                        future.set_result(envelope)
                elif envelope.WhichOneof("body") == "placement_moved" and self._on_push is not None:
                    self._on_push(envelope.placement_moved.placement)
                # Anything else answers no request of ours: dropped, never answered.
        except (asyncio.IncompleteReadError, ConnectionError, OSError, TesseraError) as error:
            self._fail(error)
        except asyncio.CancelledError:
            self._fail(ConnectionError("connection closed"))

    def _fail(self, error: Exception) -> None:
        self._closed = error
        unavailable = TesseraError(errors_pb2.ERROR_CODE_UNAVAILABLE, f"connection closed: {error}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(unavailable)
        self._pending.clear()

    async def request(self, timeout: float = 60.0, **body):
        """Sends one request (``body`` names the envelope's field, e.g. ``status_request=...``) and
        returns the reply's body message; an ``Error`` reply raises ``TesseraError``."""
        if self._closed is not None:
            raise TesseraError(errors_pb2.ERROR_CODE_UNAVAILABLE, f"connection closed: {self._closed}")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._send(envelope_pb2.Envelope(request_id=request_id, **body))
        await self._writer.drain()
        try:
            reply = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(request_id, None)
            raise TesseraError(errors_pb2.ERROR_CODE_UNAVAILABLE, f"no answer within {timeout} seconds") from None
        kind = reply.WhichOneof("body")
        if kind == "error":
            raise TesseraError.from_proto(reply.error)
        return getattr(reply, kind)

    async def close(self) -> None:
        if self._read_task is not None:
            self._read_task.cancel()
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError, ssl.SSLError):
            pass


class Client:
    """A client of one cluster, as one tenant. Use ``async with await Client.connect(...)``, or call
    ``aclose()``."""

    def __init__(self, coordinator: str, node_id: str, tenant: str, context: Optional[ssl.SSLContext]):
        self.coordinator_address = coordinator
        self.node_id = node_id
        self.tenant = tenant
        self._context = context
        self._coordinator: Optional[Connection] = None
        self._workers: Dict[str, Connection] = {}
        self._placements: Dict[int, sequence_pb2.Placement] = {}
        self._geometries: Dict[int, Geometry] = {}
        self._spans: Dict[int, List[sequence_pb2.ModalitySpan]] = {}
        self._policies: Dict[int, sequence_pb2.Policy] = {}

    @classmethod
    async def connect(
        cls, coordinator: str, *, certs: Optional[str] = None, cert_name: str = "client", tenant: str = "default"
    ) -> "Client":
        """Connects to the coordinator at ``HOST:PORT``. With ``certs`` (a folder from ``tessera certs``,
        or the one ``tessera cluster up`` prints) over mutual TLS as certificate ``cert_name``, whose
        tenant must be ``tenant``; without it, in plaintext (the cluster must run ``--insecure``)."""
        context = tls_context(certs, cert_name) if certs else None
        client = cls(coordinator, cert_name, tenant, context)
        await client._coordinator_connection()
        return client

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *_) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        connections = list(self._workers.values()) + ([self._coordinator] if self._coordinator else [])
        self._workers.clear()
        self._coordinator = None
        for connection in connections:
            await connection.close()

    def _moved(self, placement: sequence_pb2.Placement) -> None:
        known = self._placements.get(placement.sequence_id)
        if known is not None and placement.epoch > known.epoch:
            self._placements[placement.sequence_id] = placement

    async def _coordinator_connection(self) -> Connection:
        if self._coordinator is None or not self._coordinator.is_open:
            self._coordinator = await Connection.open(
                self.coordinator_address, self.node_id, self._context, on_push=self._moved
            )
        return self._coordinator

    async def _worker(self, endpoint: common_pb2.Endpoint) -> Connection:
        address = f"{endpoint.host}:{endpoint.port}"
        connection = self._workers.get(address)
        if connection is None or not connection.is_open:
            connection = await Connection.open(address, self.node_id, self._context)
            self._workers[address] = connection
        return connection

    @staticmethod
    async def _retrying(attempt, between=None):
        """``attempt()`` until it succeeds, retried with backoff (or the wait the peer asked for) while
        its error is one a fresh placement or a new connection may cure, for up to
        ``FAILOVER_PATIENCE_SECONDS``; ``between()`` runs before each retry."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FAILOVER_PATIENCE_SECONDS
        backoff = 0.05
        while True:
            try:
                return await attempt()
            except (TesseraError, ConnectionError, OSError) as error:
                retryable = error.retryable if isinstance(error, TesseraError) else True
                wait = getattr(error, "retry_after", None) or backoff
                if not retryable or loop.time() + wait >= deadline:
                    raise
                await asyncio.sleep(wait)
                backoff = min(backoff * 2, 1.0)
                if between is not None:
                    await between()

    async def _ask_coordinator(self, **body):
        """One request to the coordinator, retried while it cannot answer yet (a coordinator that
        just started hears from its workers first, and says when to retry) or its connection broke."""

        async def attempt():
            coordinator = await self._coordinator_connection()
            return await coordinator.request(**body)

        return await self._retrying(attempt)

    async def status(self) -> cluster_pb2.StatusReply:
        """The cluster's workers, their bytes and liveness, as the coordinator sees them."""
        return await self._ask_coordinator(status_request=cluster_pb2.StatusRequest())

    async def open_sequence(
        self,
        geometry: Geometry,
        spans: Sequence[Span],
        *,
        policy: str = "vl-cache",
        retention: float = 0.1,
        decode_tokens: int = 0,
        sequence_id: int = 0,
    ) -> sequence_pb2.Placement:
        """Admits and places a sequence. A ``sequence_id`` below 2**62 is this client's own, scoped to
        its tenant; with 0 the client draws one at random, so that a retry after a lost answer gets the
        same sequence, never a second one. Either way the placement's ``sequence_id`` is the cluster's
        id of the sequence (``cluster_id``); the other methods take either. Raises ``TesseraError`` (``RESOURCE_EXHAUSTED``
        with ``retry_after``) when the cluster's memory limit or the tenant's quota has no room."""
        if not 0 < retention <= 1:
            raise ValueError(f"retention must be in (0, 1], got {retention}")
        message = sequence_pb2.OpenSequence(
            tenant=self.tenant,
            sequence_id=sequence_id or secrets.randbelow(CLIENT_ID_LIMIT - 1) + 1,
            model=geometry.proto(),
            spans=[span.proto() for span in spans],
            policy=sequence_pb2.Policy(name=policy, retention=retention),
            decode_tokens=decode_tokens,
        )
        placement = await self._ask_coordinator(open_sequence=message)
        self._placements[placement.sequence_id] = placement
        self._geometries[placement.sequence_id] = geometry
        self._spans[placement.sequence_id] = list(message.spans)
        self._policies[placement.sequence_id] = message.policy
        return placement

    async def prefill(
        self,
        sequence_id: int,
        keys: np.ndarray,
        values: np.ndarray,
        queries: Optional[np.ndarray] = None,
        *,
        timeout: float = 300.0,
        part_bytes: int = 16 << 20,
    ) -> int:
        """Stores the prompt's cache on every shard: ``keys`` and ``values`` shaped
        ``[layers, kv_heads, tokens, head_dim]``, ``queries`` (the observed query rows, which the
        scoring policies need) ``[layers, query_heads, rows, head_dim]``. Float32 or float16. Each
        shard's layers go in parts of at most ``part_bytes`` (whole layers; a larger layer goes alone
        and must fit the frame limit, 64 MiB by default). The coordinator then compresses the cache
        to the sequence's budget. Returns the bytes the shards hold."""
        sequence_id = cluster_id(self.tenant, sequence_id)
        placement, g = self._placement(sequence_id)
        tokens = keys.shape[2] if keys.ndim == 4 else -1
        _check_shape(keys, (g.layers, g.kv_heads, tokens, g.head_dim), "keys")
        _check_shape(values, keys.shape, "values")
        if queries is not None:
            _check_shape(queries, (g.layers, g.query_heads, queries.shape[2], g.head_dim), "queries")
            if not 1 <= queries.shape[2] <= tokens:
                raise ValueError(f"queries has {queries.shape[2]} rows; expected 1...{tokens}")
        spans = self._spans[sequence_id]
        per_layer = keys[0].nbytes + values[0].nbytes + (0 if queries is None else queries[0].nbytes)
        layers_per_part = max(1, part_bytes // max(1, per_layer))

        def make(shard: sequence_pb2.ShardPlacement, current: sequence_pb2.Placement, part: int):
            layers = []
            first = shard.first_layer + part * layers_per_part
            for layer in range(first, min(first + layers_per_part, shard.first_layer + shard.layer_count)):
                entry = data_pb2.LayerTensors(
                    layer=layer,
                    keys=tensor(keys[layer], f"layer {layer} keys"),
                    values=tensor(values[layer], f"layer {layer} values"),
                )
                if queries is not None:
                    entry.queries.CopyFrom(tensor(queries[layer], f"layer {layer} queries"))
                layers.append(entry)
            message = data_pb2.Prefill(
                tenant=self.tenant,
                sequence_id=sequence_id,
                shard_id=shard.shard_id,
                epoch=current.epoch,
                model=g.proto(),
                inline_tensors=data_pb2.InlineTensors(layers=layers),
            )
            message.spans.extend(spans)
            message.policy.CopyFrom(self._policies[sequence_id])
            return {"prefill": message}

        shards = await self._on_every_shard(
            sequence_id, make, timeout, parts=lambda shard: -(-shard.layer_count // layers_per_part)
        )
        # Each part's ack gives what its shard held then; parts are acknowledged in any order, and a
        # shard only grows, so its most is what it holds.
        return sum(max(ack.kv_bytes for ack in acks) for acks in shards)

    async def decode(
        self, sequence_id: int, step: int, keys: np.ndarray, values: np.ndarray, queries: np.ndarray
    ) -> DecodeStep:
        """Runs decode step ``step`` (0, 1, … in order): the new token's ``keys`` and ``values``
        ``[layers, kv_heads, head_dim]`` and ``queries`` ``[layers, query_heads, head_dim]`` are
        appended and attended with. Returns the attention outputs ``[layers, query_heads, head_dim]``
        and what the shards hold. A step already applied is answered again, not reapplied."""
        sequence_id = cluster_id(self.tenant, sequence_id)
        _, g = self._placement(sequence_id)
        _check_shape(keys, (g.layers, g.kv_heads, g.head_dim), "keys")
        _check_shape(values, keys.shape, "values")
        _check_shape(queries, (g.layers, g.query_heads, g.head_dim), "queries")

        def make(shard: sequence_pb2.ShardPlacement, current: sequence_pb2.Placement, part: int):
            layers = [
                data_pb2.LayerDecode(
                    layer=layer,
                    keys=tensor(keys[layer][:, None, :], f"layer {layer} keys"),
                    values=tensor(values[layer][:, None, :], f"layer {layer} values"),
                    queries=tensor(queries[layer][:, None, :], f"layer {layer} queries"),
                )
                for layer in range(shard.first_layer, shard.first_layer + shard.layer_count)
            ]
            message = data_pb2.Decode(
                tenant=self.tenant,
                sequence_id=sequence_id,
                shard_id=shard.shard_id,
                epoch=current.epoch,
                step=step,
                layers=layers,
            )
            return {"decode": message}

        outputs = np.zeros((g.layers, g.query_heads, g.head_dim), dtype=np.float32)
        held = full = 0
        for (result,) in await self._on_every_shard(sequence_id, make, 60.0):
            held += result.kv_bytes
            full += result.full_kv_bytes
            for output in result.outputs:
                if output.output.dtype != data_pb2.SCALAR_TYPE_FLOAT32 or output.layer >= g.layers:
                    raise TesseraError(errors_pb2.ERROR_CODE_INTERNAL, f"layer {output.layer}: unexpected output")
                data = np.frombuffer(output.output.data, dtype="<f4")
                outputs[output.layer] = data.reshape(g.query_heads, g.head_dim)
        return DecodeStep(outputs, held, full)

    async def close_sequence(self, sequence_id: int) -> int:
        """Frees the sequence everywhere; returns the K/V bytes the workers freed."""
        sequence_id = cluster_id(self.tenant, sequence_id)
        ack = await self._ask_coordinator(close=sequence_pb2.Close(tenant=self.tenant, sequence_id=sequence_id))
        for book in (self._placements, self._geometries, self._spans, self._policies):
            book.pop(sequence_id, None)
        return ack.freed_bytes

    def _placement(self, sequence_id: int) -> Tuple[sequence_pb2.Placement, Geometry]:
        if sequence_id not in self._placements:
            raise TesseraError(
                errors_pb2.ERROR_CODE_UNKNOWN_SEQUENCE, f"sequence {sequence_id} was not opened by this client"
            )
        return self._placements[sequence_id], self._geometries[sequence_id]

    async def _on_every_shard(self, sequence_id: int, make, timeout: float, parts=lambda shard: 1) -> List[List]:
        """Each shard's requests to its primary, the shards concurrently: ``parts(shard)`` of them
        (``make(shard, placement, part)`` builds part 0, 1, …, built as each is sent), up to
        ``PARTS_IN_FLIGHT`` of a shard at once; returns each shard's replies, in part order. A request
        the primary cannot take (a failover may be under way) is retried with a fresh placement and
        backoff, for up to ``FAILOVER_PATIENCE_SECONDS``."""
        placement, _ = self._placement(sequence_id)

        async def one(first: sequence_pb2.ShardPlacement):
            window = asyncio.Semaphore(PARTS_IN_FLIGHT)

            async def send(part: int):
                async def attempt():
                    current = self._placements[sequence_id]
                    shard = next(s for s in current.shards if s.shard_id == first.shard_id)
                    worker = await self._worker(shard.primary)
                    return await worker.request(timeout=timeout, **make(shard, current, part))

                async with window:
                    return await self._retrying(attempt, between=lambda: self._refresh(sequence_id))

            return await asyncio.gather(*(send(part) for part in range(max(1, parts(first)))))

        return await asyncio.gather(*(one(shard) for shard in placement.shards))

    async def refresh_placement(self, sequence_id: int) -> sequence_pb2.Placement:
        """Asks the coordinator where the sequence lives now (its epoch moves at every failover)."""
        fresh = await self._ask_coordinator(
            placement_request=sequence_pb2.PlacementRequest(tenant=self.tenant, sequence_id=sequence_id)
        )
        self._placements[sequence_id] = fresh
        return fresh

    async def _refresh(self, sequence_id: int) -> None:
        try:
            coordinator = await self._coordinator_connection()
            self._placements[sequence_id] = await coordinator.request(
                placement_request=sequence_pb2.PlacementRequest(tenant=self.tenant, sequence_id=sequence_id)
            )
        except (TesseraError, ConnectionError, OSError):
            pass  # the coordinator may be restarting: retry at the placement known
