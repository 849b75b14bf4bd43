import NIOCore
import NIOPosix

/// Reads and changes a process's admin settings over HTTP, as an operator would with
/// `curl -X PUT --data 'drop=1,peer=worker-2' http://127.0.0.1:PORT/faults`.
public enum AdminClient {
    /// `PUT path` with `body` to the admin endpoint at `host:port`, presenting `token`; returns the
    /// value now in force.
    ///
    /// - Throws: ``ClusterAdminError`` with code ``ClusterAdminError/Code/requestFailed`` when the
    ///   endpoint cannot be reached or answers anything but 200 (the message carries its answer).
    public static func put(
        host: String = "127.0.0.1",
        port: Int,
        path: String,
        body: String,
        token: String
    ) async throws -> String {
        let request =
            "PUT \(path) HTTP/1.1\r\nHost: \(host)\r\nConnection: close\r\nContent-Type: text/plain\r\n"
            + "Authorization: Bearer \(token)\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
        let raw: String
        do {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connect(host: host, port: port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                    }
                }
            raw = try await channel.executeThenClose { inbound, outbound in
                try await outbound.write(ByteBuffer(string: request))
                var received = ByteBuffer()
                for try await var chunk in inbound { received.writeBuffer(&chunk) }
                return String(buffer: received)
            }
        } catch {
            throw ClusterAdminError(
                code: .requestFailed,
                message: "PUT \(path) to \(host):\(port) failed: \(error)",
                cause: error
            )
        }
        // Parsed as bytes: a Swift String treats "\r\n" as one Character.
        let bytes = Array(raw.utf8)
        let lineEnd = bytes.firstRange(of: Array("\r\n".utf8))?.lowerBound ?? bytes.endIndex
        let statusLine = String(decoding: bytes[..<lineEnd], as: UTF8.self)
        let bodyStart = bytes.firstRange(of: Array("\r\n\r\n".utf8))?.upperBound ?? bytes.endIndex
        let answer = String(decoding: bytes[bodyStart...], as: UTF8.self)
        guard statusLine.split(separator: " ").dropFirst().first == "200" else {
            throw ClusterAdminError(
                code: .requestFailed,
                message: "PUT \(path) to \(host):\(port) was refused: \(statusLine): \(answer.filter { $0 != "\n" })"
            )
        }
        return String(answer.drop { $0 == "\n" }.reversed().drop { $0 == "\n" }.reversed())
    }
}
