import ArgumentParser
import Foundation
import Logging
import OTel
import ServiceLifecycle
import Tracing

/// OpenTelemetry traces over OTLP/HTTP: off unless an endpoint is named, by this option or by the
/// standard environment variables (which child processes of `cluster up`, `bench --local` and
/// `chaos` inherit).
struct TracingOptions: ParsableArguments {
    @Option(
        help: ArgumentHelp(
            "Export traces over OTLP/HTTP to this collector, e.g. http://127.0.0.1:4318 (spans go to its /v1/traces). "
                + "OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT do the same; without any, nothing is traced.",
            valueName: "url"
        )
    )
    var otlpEndpoint: String?

    /// The option for the cluster processes a launcher starts (the environment they inherit).
    var childArguments: [String] { otlpEndpoint.map { ["--otlp-endpoint", $0] } ?? [] }

    /// The endpoint named in the environment, if any (and the SDK not disabled there).
    static var environmentEndpoint: String? {
        let environment = ProcessInfo.processInfo.environment
        guard environment["OTEL_SDK_DISABLED"]?.lowercased() != "true" else { return nil }
        let endpoint = environment["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] ?? environment["OTEL_EXPORTER_OTLP_ENDPOINT"]
        return endpoint?.isEmpty == false ? endpoint : nil
    }

    /// Makes this process's tracer when an endpoint is configured: `InstrumentationSystem` is
    /// bootstrapped with it, and the returned service batches and exports the spans until shutdown,
    /// when it flushes them. Nil when tracing is off.
    ///
    /// - Parameters:
    ///   - service: the `service.name` of the spans (`OTEL_SERVICE_NAME` overrides it).
    ///   - instance: the `service.instance.id`, the node id of a cluster process.
    ///   - logger: where the exporter reports trouble (an unreachable collector, say).
    func bootstrap(service: String, instance: String, logger: Logger) throws -> (any Service)? {
        guard otlpEndpoint != nil || Self.environmentEndpoint != nil else { return nil }
        var configuration = OTel.Configuration.default
        configuration.serviceName = service
        configuration.diagnosticLogger = .custom(logger)
        configuration.resourceAttributes["service.instance.id"] = instance
        configuration.metrics.enabled = false  // metrics are Prometheus's, on the admin endpoint
        configuration.logs.enabled = false  // logs go to standard error
        configuration.traces.exporter = .otlp
        configuration.traces.otlpExporter.protocol = .httpProtobuf
        // An export gives up after this (10 s by default), so an unreachable collector holds up a
        // process's exit by seconds at most; a batch is at most 512 spans of a few hundred bytes.
        configuration.traces.otlpExporter.timeout = .seconds(3)
        if let otlpEndpoint {
            guard let url = URL(string: otlpEndpoint), ["http", "https"].contains(url.scheme), url.host != nil else {
                throw usageFailure("--otlp-endpoint must be an http:// or https:// URL, got '\(otlpEndpoint)'")
            }
            configuration.traces.otlpExporter.endpoint =
                otlpEndpoint.hasSuffix("/") ? "\(otlpEndpoint)v1/traces" : "\(otlpEndpoint)/v1/traces"
        }
        let backend = try OTel.makeTracingBackend(configuration: configuration)
        InstrumentationSystem.bootstrap(backend.factory)
        return backend.service
    }

    /// Runs `body` with this process's spans exported, when tracing is on, and flushed once it ends.
    func exporting<T: Sendable>(
        service: String,
        instance: String,
        _ body: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        let logger = Logger(label: "tessera.tracing")
        guard let exporter = try bootstrap(service: service, instance: instance, logger: logger) else {
            return try await body()
        }
        let group = ServiceGroup(services: [exporter], logger: logger)
        return try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            let result: Result<T, any Error>
            do { result = .success(try await body()) } catch { result = .failure(error) }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
            return try result.get()
        }
    }
}
