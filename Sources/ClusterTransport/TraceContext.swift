import ClusterWire
package import Tracing

/// Requests join their sender's trace: a request or one-way message carries the trace context it was
/// sent in (`Envelope.trace_context`, written by whatever instrument the process bootstrapped; W3C
/// `traceparent` and `tracestate` with OpenTelemetry), and the receiver answers it inside a server
/// span of that trace. Tessera never starts a trace by itself: a request that carries no context gets
/// no span (heartbeats, or any traffic when tracing is off), so untraced work costs an empty-map
/// check and a task-local binding per request.
extension Tessera_V1_Envelope {
    /// Writes the current task's trace context, if any, into `trace_context`.
    mutating func injectCurrentTrace() {
        guard let context = ServiceContext.current else { return }
        InstrumentationSystem.instrument.inject(context, into: &traceContext, using: TraceCarrier())
    }
}

/// Runs `body` in a span named `name` that continues the trace in `carrier` (an envelope's
/// `trace_context`, or one kept from it); without a carrier, runs `body` outside any trace. Either
/// way, what `body` sends carries this trace or none, never a context its task inherited: a
/// connection's reading task, for one, inherits the context of whatever request first dialled it.
package func withSpan<T>(
    _ name: String,
    continuing carrier: [String: String],
    ofKind kind: SpanKind = .internal,
    attributes: @autoclosure () -> SpanAttributes = [:],
    _ body: () async throws -> T
) async rethrows -> T {
    guard !carrier.isEmpty else { return try await ServiceContext.withValue(nil) { try await body() } }
    var context = ServiceContext.topLevel
    InstrumentationSystem.instrument.extract(carrier, into: &context, using: TraceCarrier())
    return try await withSpan(name, context: context, ofKind: kind) { span in
        span.attributes = attributes()
        return try await body()
    }
}

extension Tessera_V1_Envelope.OneOf_Body {
    /// The sequence a message is about, for span attributes; nil for messages about none.
    var sequenceID: UInt64? {
        switch self {
        case .openSequence(let message): message.sequenceID
        case .placementRequest(let message): message.sequenceID
        case .placement(let message): message.sequenceID
        case .placementMoved(let message): message.placement.sequenceID
        case .close(let message): message.sequenceID
        case .shardAssignment(let message): message.sequenceID
        case .layerStats(let message): message.sequenceID
        case .assignBudget(let message): message.sequenceID
        case .prefill(let message): message.sequenceID
        case .decode(let message): message.sequenceID
        case .copyShard(let message): message.sequenceID
        case .shardTransfer(let message): message.sequenceID
        default: nil
        }
    }
}

/// Reads and writes trace headers in an envelope's `trace_context` map. Keys are lower-cased on the
/// way in, as HTTP header names are, so that any propagator finds what it wrote.
struct TraceCarrier: Injector, Extractor {
    func inject(_ value: String, forKey key: String, into carrier: inout [String: String]) {
        carrier[key.lowercased()] = value
    }

    func extract(key: String, from carrier: [String: String]) -> String? {
        carrier[key.lowercased()]
    }
}
