package import NIOCore
internal import SwiftProtobuf

/// The wire protocol version this build speaks.
public enum WireProtocol {
    /// The version sent in `Hello.protocol_version`.
    public static let currentVersion: UInt32 = 1
    /// The versions this build accepts from a peer.
    public static let supportedVersions: ClosedRange<UInt32> = 1...1
}

extension Tessera_V1_Envelope {
    /// Builds an envelope around one body.
    package init(requestID: UInt64 = 0, _ body: OneOf_Body) {
        self.init()
        self.requestID = requestID
        self.body = body
    }

    /// An envelope that answers `requestID` with `error`.
    package init(requestID: UInt64, error: WireError) {
        self.init(requestID: requestID, .error(error.proto))
    }

    /// Parses one frame's payload (as produced by `FrameDecoder`). Tensor data of prefills and shard
    /// copies is not copied: it refers to the frame's bytes (see `FrameTensors`).
    ///
    /// - Throws: `WireError` with code `.malformedFrame` when the bytes are not a valid Envelope. An
    ///   Envelope without a body parses fine; see `requiredBody`.
    package init(frame: ByteBuffer) throws(WireError) {
        do {
            if let envelope = try FrameTensors.decode(frame) {
                self = envelope
            } else {
                try self.init(serializedBytes: ByteBufferBytes(frame))
            }
        } catch {
            throw WireError(
                .malformedFrame,
                "a frame of \(frame.readableBytes) bytes is not a valid tessera.v1.Envelope: \(error)",
                cause: error
            )
        }
    }

    /// Serializes the envelope into a new buffer: the payload of one frame, without the length prefix
    /// (`FrameEncoder` adds it). Deterministic: the same envelope always gives the same bytes.
    ///
    /// - Throws: `WireError` with code `.frameTooLarge` when the encoding exceeds protobuf's 2 GiB limit.
    package func serializedFrame() throws(WireError) -> ByteBuffer {
        var options = BinaryEncodingOptions()
        options.useDeterministicOrdering = true
        do {
            let bytes: ByteBufferBytes = try self.serializedBytes(options: options)
            return bytes.buffer
        } catch {
            throw WireError(
                .frameTooLarge,
                "cannot serialize a \(self.bodyName) envelope: \(error)",
                cause: error
            )
        }
    }

    /// The body, or a `.badRequest` error when there is none (or one this build does not know, which
    /// parses as none).
    package var requiredBody: OneOf_Body {
        get throws(WireError) {
            guard let body = self.body else {
                throw WireError(
                    .badRequest,
                    "envelope \(self.requestID) has no body, or a body type this node does not know"
                        + (self.unknownFields.data.isEmpty ? "" : " (\(self.unknownFields.data.count) unknown bytes)")
                )
            }
            return body
        }
    }

    /// The proto field name of the body (`"open_sequence"`), or `"empty"`; for messages and logs.
    package var bodyName: String {
        self.body?.name ?? "empty"
    }
}

extension Tessera_V1_Envelope.OneOf_Body {
    /// The proto field name of this body, e.g. `"open_sequence"`.
    package var name: String {
        switch self {
        case .hello: "hello"
        case .helloAck: "hello_ack"
        case .error: "error"
        case .registerWorker: "register_worker"
        case .registerAck: "register_ack"
        case .heartbeat: "heartbeat"
        case .heartbeatAck: "heartbeat_ack"
        case .statusRequest: "status_request"
        case .statusReply: "status_reply"
        case .leaveCluster: "leave_cluster"
        case .leaveAck: "leave_ack"
        case .openSequence: "open_sequence"
        case .placementRequest: "placement_request"
        case .placement: "placement"
        case .close: "close"
        case .closeAck: "close_ack"
        case .shardAssignment: "shard_assignment"
        case .shardAssignmentAck: "shard_assignment_ack"
        case .placementMoved: "placement_moved"
        case .layerStats: "layer_stats"
        case .assignBudget: "assign_budget"
        case .budgetApplied: "budget_applied"
        case .prefill: "prefill"
        case .prefillAck: "prefill_ack"
        case .decode: "decode"
        case .decodeResult: "decode_result"
        case .copyShard: "copy_shard"
        case .copyShardAck: "copy_shard_ack"
        case .shardTransfer: "shard_transfer"
        case .shardTransferAck: "shard_transfer_ack"
        }
    }
}

extension Tessera_V1_Envelope.OneOf_Body {
    /// How a message travels, which decides whether it may be answered.
    package enum Kind: Sendable {
        /// Expects exactly one reply (or an `Error`) with its request id.
        case request
        /// Expects nothing back, not even an `Error` when it is refused.
        case oneWay
        /// Answers a request; never answered itself, so two peers cannot reply to each other forever.
        case reply
    }

    package var kind: Kind {
        switch self {
        case .hello, .registerWorker, .heartbeat, .leaveCluster, .statusRequest, .openSequence, .placementRequest,
            .close,
            .shardAssignment, .assignBudget, .prefill, .decode, .copyShard, .shardTransfer:
            .request
        case .layerStats, .placementMoved:
            .oneWay
        case .helloAck, .error, .registerAck, .heartbeatAck, .leaveAck, .statusReply, .placement, .closeAck,
            .shardAssignmentAck,
            .budgetApplied, .prefillAck, .decodeResult, .copyShardAck, .shardTransferAck:
            .reply
        }
    }
}
