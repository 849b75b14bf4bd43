import ClusterAdmin
import NIOCore
import NIOPosix
import Prometheus
import Testing

/// A parsed HTTP/1.1 response (one of possibly several read from a connection).
struct HTTPTestResponse {
    var statusLine: String
    var headers: [(name: String, value: String)]
    var body: String

    var status: Int? {
        let parts = self.statusLine.split(separator: " ")
        return parts.count >= 2 ? Int(parts[1]) : nil
    }

    func header(_ name: String) -> String? {
        self.headers.first { $0.name.lowercased() == name.lowercased() }?.value
    }

    /// Parses the first response in `raw` (headers, then a `content-length` body).
    init(parsing raw: String) throws {
        self = try Self.parse(Array(raw.utf8)[...]).response
    }

    /// Parses every response in `raw`, in order (as read from a keep-alive connection).
    static func parseAll(_ raw: String) throws -> [HTTPTestResponse] {
        var remaining = Array(raw.utf8)[...]
        var responses: [HTTPTestResponse] = []
        while !remaining.isEmpty {
            let (response, rest) = try Self.parse(remaining)
            responses.append(response)
            remaining = rest
        }
        return responses
    }

    private init(statusLine: String, headers: [(name: String, value: String)], body: String) {
        self.statusLine = statusLine
        self.headers = headers
        self.body = body
    }

    private static func parse(
        _ bytes: ArraySlice<UInt8>
    ) throws -> (
        response: HTTPTestResponse, rest: ArraySlice<UInt8>
    ) {
        guard let headerRange = bytes.firstRange(of: Array("\r\n\r\n".utf8)) else {
            throw HTTPTestError(
                message: "no header terminator in \(String(decoding: bytes, as: UTF8.self).debugDescription)"
            )
        }
        let headerLines = String(decoding: bytes[..<headerRange.lowerBound], as: UTF8.self).split(separator: "\r\n")
        let headers: [(name: String, value: String)] = headerLines.dropFirst().compactMap { line in
            guard let colon = line.firstIndex(of: ":") else { return nil }
            return (String(line[..<colon]), String(line[line.index(after: colon)...].drop(while: { $0 == " " })))
        }
        let length = headers.first { $0.name.lowercased() == "content-length" }.flatMap { Int($0.value) }
        let bodyEnd = min(bytes.endIndex, headerRange.upperBound + (length ?? bytes.count))
        let response = HTTPTestResponse(
            statusLine: String(headerLines.first ?? ""),
            headers: headers,
            body: String(decoding: bytes[headerRange.upperBound..<bodyEnd], as: UTF8.self)
        )
        return (response, bytes[bodyEnd...])
    }
}

struct HTTPTestError: Error, CustomStringConvertible {
    var message: String
    var description: String { self.message }
}

/// Sends `request` verbatim over a real TCP connection and returns everything the server sends until it
/// closes the connection (so the last request should carry `Connection: close`).
func rawHTTPExchange(port: Int, request: String) async throws -> String {
    try await withDeadline(seconds: 10) {
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                }
            }
        return try await channel.executeThenClose { inbound, outbound in
            try await outbound.write(ByteBuffer(string: request))
            var received = ""
            for try await chunk in inbound {
                received += String(buffer: chunk)
            }
            return received
        }
    }
}

/// A one-request exchange with `Connection: close`, parsed.
func httpRequest(
    port: Int,
    method: String = "GET",
    path: String,
    body: String = "",
    token: String? = nil
) async throws -> HTTPTestResponse {
    var request = "\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    if let token { request += "Authorization: Bearer \(token)\r\n" }
    if !body.isEmpty { request += "Content-Length: \(body.utf8.count)\r\n" }
    request += "\r\n" + body
    return try HTTPTestResponse(parsing: try await rawHTTPExchange(port: port, request: request))
}

/// Runs an admin server on an ephemeral loopback port for the duration of `body`, then cancels it and
/// waits for `run()` to return.
func withAdminServer<Result: Sendable>(
    registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry(),
    settings: [String: AdminSetting] = [:],
    token: AdminToken? = nil,
    _ body: @Sendable (_ port: Int) async throws -> Result
) async throws -> Result {
    let (ports, continuation) = AsyncStream.makeStream(of: Int.self)
    let server = AdminServer(host: "127.0.0.1", port: 0, registry: registry, settings: settings, token: token) { port in
        continuation.yield(port)
        continuation.finish()
    }
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask {
            defer { continuation.finish() }
            try await server.run()
        }
        var iterator = ports.makeAsyncIterator()
        guard let port = await iterator.next() else {
            try await group.next()
            throw HTTPTestError(message: "admin server stopped before listening")
        }
        do {
            let result = try await body(port)
            group.cancelAll()
            try await group.waitForAll()
            return result
        } catch {
            group.cancelAll()
            throw error
        }
    }
}

/// Runs `operation`, failing with a timeout error if it takes longer than `seconds`.
func withDeadline<Result: Sendable>(
    seconds: Int,
    _ operation: @Sendable @escaping () async throws -> Result
) async throws -> Result {
    try await withThrowingTaskGroup(of: Result.self) { group in
        group.addTask { try await operation() }
        group.addTask {
            try await Task.sleep(for: .seconds(seconds))
            throw HTTPTestError(message: "deadline of \(seconds) s exceeded")
        }
        defer { group.cancelAll() }
        guard let result = try await group.next() else {
            throw HTTPTestError(message: "no result")
        }
        return result
    }
}
