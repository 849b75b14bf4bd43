public import Logging
public import NIOCore
import NIOHTTP1
public import NIOPosix
public import Prometheus

/// A small HTTP/1.1 server for operators and scrapers, over plain TCP or TLS.
///
/// Routes:
/// - `GET /metrics`: the registry in Prometheus text exposition format (`text/plain; version=0.0.4`),
///   with the standard process metrics (``ProcessMetrics``) read at that moment.
/// - `GET /healthz`: `ok`.
/// - for each ``AdminSetting`` at `/NAME`: `GET` reads it, `PUT` with a text body changes it (400 with
///   the reason when the value is refused, 413 above 64 KiB). A `PUT` needs `Authorization: Bearer
///   TOKEN` with the server's token (401 without it, 403 when the server has none: nothing changes).
/// - any other path: 404; a method a path does not take: 405 (with `Allow`).
///
/// ``run()`` binds, reports the bound port through `onListening`, serves each connection in its own child
/// task (a failing connection never stops the server) and returns once the calling task is cancelled,
/// after closing the listener and every connection. Wrap it with `cancelWhenGracefulShutdown` (or conform
/// it to `Service` in the module that owns the `ServiceGroup`).
public struct AdminServer: Sendable {
    /// The address to bind, e.g. `127.0.0.1`.
    public var host: String
    /// The port to bind; 0 lets the kernel choose (read it from `onListening`).
    public var port: Int

    private let registry: PrometheusCollectorRegistry
    private let processMetrics: ProcessMetrics
    private let eventLoopGroup: any EventLoopGroup
    private let logger: Logger
    private let onListening: @Sendable (Int) -> Void
    private let settings: [String: AdminSetting]
    private let token: AdminToken?
    private let tls: TLS?

    /// - Parameters:
    ///   - host: The address to bind.
    ///   - port: The port to bind; 0 picks a free one.
    ///   - registry: The registry `GET /metrics` exposes.
    ///   - eventLoopGroup: The group to run on; `MultiThreadedEventLoopGroup.singleton` by default.
    ///   - logger: Where to log; the default discards everything.
    ///   - settings: Values an operator may read and change at run time, by path (e.g. `/faults`).
    ///   - token: The bearer token a `PUT` must present; without one, settings are read-only.
    ///   - tls: HTTPS; nil serves plain HTTP.
    ///   - onListening: Called once with the bound port, before the first connection is accepted.
    public init(
        host: String,
        port: Int,
        registry: PrometheusCollectorRegistry,
        settings: [String: AdminSetting] = [:],
        token: AdminToken? = nil,
        tls: TLS? = nil,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "tessera.admin", factory: { _ in SwiftLogNoOpLogHandler() }),
        onListening: @escaping @Sendable (Int) -> Void = { _ in }
    ) {
        self.host = host
        self.port = port
        self.registry = registry
        processMetrics = ProcessMetrics(registry: registry)
        self.eventLoopGroup = eventLoopGroup
        self.logger = logger
        self.onListening = onListening
        self.settings = settings
        self.token = token
        self.tls = tls
    }

    /// HTTPS: makes the TLS handler of each connection (the handler's module owns the certificates).
    public struct TLS: Sendable {
        let handler: @Sendable () -> any ChannelHandler

        public init(handler: @escaping @Sendable () -> any ChannelHandler) {
            self.handler = handler
        }
    }

    /// Largest request body a setting accepts.
    static let maxBodyBytes = 64 * 1024

    private typealias Connection = NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>

    /// Binds and serves until the calling task is cancelled, then closes the listener and returns.
    ///
    /// - Throws: ``ClusterAdminError`` with code ``ClusterAdminError/Code/bindFailed`` if the socket cannot be
    ///   bound; other errors only if the listening socket itself fails.
    public func run() async throws {
        let listener: NIOAsyncChannel<Connection, Never>
        do {
            listener = try await ServerBootstrap(group: self.eventLoopGroup)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .bind(host: self.host, port: self.port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        if let tls = self.tls { try channel.pipeline.syncOperations.addHandler(tls.handler()) }
                        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                        return try Connection(wrappingChannelSynchronously: channel)
                    }
                }
        } catch {
            throw ClusterAdminError(
                code: .bindFailed,
                message: "admin server cannot bind \(self.host):\(self.port): \(error)",
                cause: error
            )
        }

        let boundPort = listener.channel.localAddress?.port ?? self.port
        self.logger.info(
            "admin server listening",
            metadata: ["admin.host": "\(self.host)", "admin.port": "\(boundPort)"]
        )
        self.onListening(boundPort)

        do {
            try await listener.serveUntilCancelled { connection in await self.serve(connection) }
        } catch is CancellationError {
            // Cancellation is the normal way to stop.
        }
        self.logger.info("admin server stopped", metadata: ["admin.port": "\(boundPort)"])
    }

    /// Serves the requests of one connection; never throws, so one bad client can't stop the server.
    private func serve(_ connection: Connection) async {
        do {
            try await connection.executeThenClose { inbound, outbound in
                var pending: HTTPRequestHead?
                var body = ByteBuffer()
                var tooLarge = false
                for try await part in inbound {
                    switch part {
                    case .head(let head):
                        pending = head
                        body.clear()
                        tooLarge = false
                    case .body(var chunk):
                        // Kept only up to the limit; a larger body is answered 413 at its end.
                        if body.readableBytes + chunk.readableBytes > Self.maxBodyBytes {
                            tooLarge = true
                        } else {
                            body.writeBuffer(&chunk)
                        }
                    case .end:
                        guard let head = pending else { continue }
                        pending = nil
                        let keepAlive = head.isKeepAlive
                        let response =
                            tooLarge
                            ? Response(
                                status: .payloadTooLarge,
                                body: ByteBuffer(string: "body larger than \(Self.maxBodyBytes) bytes\n")
                            )
                            : self.route(head, body: String(buffer: body))
                        try await self.respond(response, to: head, keepAlive: keepAlive, outbound: outbound)
                        if !keepAlive { return }
                    }
                }
            }
        } catch {
            self.logger.debug("admin connection failed", metadata: ["error": "\(error)"])
        }
    }

    private func respond(
        _ response: Response,
        to head: HTTPRequestHead,
        keepAlive: Bool,
        outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>
    ) async throws {
        var headers = HTTPHeaders()
        headers.add(name: "content-type", value: response.contentType)
        headers.add(name: "content-length", value: "\(response.body.readableBytes)")
        if let allow = response.allow { headers.add(name: "allow", value: allow) }
        if !keepAlive { headers.add(name: "connection", value: "close") }
        try await outbound.write(
            .head(HTTPResponseHead(version: head.version, status: response.status, headers: headers))
        )
        if head.method != .HEAD {  // A response to HEAD has the headers of the full response but no body.
            try await outbound.write(.body(.byteBuffer(response.body)))
        }
        try await outbound.write(.end(nil))
    }

    private struct Response {
        var status: HTTPResponseStatus
        var contentType = "text/plain; charset=utf-8"
        var body: ByteBuffer
        var allow: String?
    }

    private func route(_ head: HTTPRequestHead, body: String) -> Response {
        let path = String(head.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? "")
        if let setting = self.settings[path] {
            switch head.method {
            case .GET:
                return Response(status: .ok, body: ByteBuffer(string: setting.read() + "\n"))
            case .PUT:
                guard let token else {
                    return Response(
                        status: .forbidden,
                        body: ByteBuffer(
                            string: "settings are read-only: this process has no admin token (--admin-token-file)\n"
                        )
                    )
                }
                guard token.accepts(authorization: head.headers["Authorization"].first) else {
                    return Response(
                        status: .unauthorized,
                        body: ByteBuffer(string: "PUT needs Authorization: Bearer TOKEN\n")
                    )
                }
                do {
                    let value = try setting.write(
                        String(body.drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed())
                    )
                    self.logger.notice(
                        "admin setting changed",
                        metadata: ["admin.path": "\(path)", "value": "\(value)"]
                    )
                    return Response(status: .ok, body: ByteBuffer(string: value + "\n"))
                } catch {
                    return Response(status: .badRequest, body: ByteBuffer(string: "\(error)\n"))
                }
            default:
                return Response(
                    status: .methodNotAllowed,
                    body: ByteBuffer(string: "method not allowed\n"),
                    allow: "GET, PUT"
                )
            }
        }
        guard head.method == .GET else {
            return Response(status: .methodNotAllowed, body: ByteBuffer(string: "method not allowed\n"), allow: "GET")
        }
        switch path {
        case "/metrics":
            processMetrics.update()
            var bytes: [UInt8] = []
            self.registry.emit(into: &bytes)
            return Response(
                status: .ok,
                contentType: "text/plain; version=0.0.4",
                body: ByteBuffer(bytes: bytes)
            )
        case "/healthz":
            return Response(status: .ok, body: ByteBuffer(string: "ok"))
        default:
            return Response(status: .notFound, body: ByteBuffer(string: "not found\n"))
        }
    }
}

/// A value an operator reads and changes through the admin server (`GET`/`PUT /NAME`), e.g. the
/// fault plan of a process's connections.
public struct AdminSetting: Sendable {
    /// The current value as text.
    public var read: @Sendable () -> String
    /// Applies a new value given as text and returns it as now in force; throws (with a message naming
    /// what is allowed) to refuse it, changing nothing.
    public var write: @Sendable (String) throws -> String

    public init(read: @escaping @Sendable () -> String, write: @escaping @Sendable (String) throws -> String) {
        self.read = read
        self.write = write
    }
}
