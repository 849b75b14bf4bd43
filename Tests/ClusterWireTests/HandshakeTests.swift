import ClusterWire
import NIOCore
import Testing

@Suite("Handshake")
struct HandshakeTests {
    let coordinator = Handshake(
        local: NodeIdentity(role: .coordinator, nodeID: "coordinator", incarnation: 100),
        acceptedPeerRoles: [.worker, .client]
    )
    let worker = Handshake(
        local: NodeIdentity(role: .worker, nodeID: "worker-1", incarnation: 7),
        acceptedPeerRoles: [.coordinator]
    )

    private func hello(
        version: UInt32 = 1,
        role: Tessera_V1_NodeRole = .worker,
        nodeID: String = "worker-1"
    )
        -> ByteBuffer
    {
        var hello = Tessera_V1_Hello()
        hello.protocolVersion = version
        hello.role = role
        hello.nodeID = nodeID
        hello.incarnation = 7
        return try! Tessera_V1_Envelope(requestID: 1, .hello(hello)).serializedFrame()
    }

    @Test("a valid Hello and HelloAck establish both identities")
    func success() throws {
        let helloFrame = try worker.helloFrame(requestID: 1)
        let accepted = try coordinator.acceptHello(frame: helloFrame)
        #expect(accepted.peer == NodeIdentity(role: .worker, nodeID: "worker-1", incarnation: 7))
        #expect(accepted.protocolVersion == WireProtocol.currentVersion)

        let ackFrame = try coordinator.helloAckFrame(for: accepted, requestID: 1)
        let connected = try worker.acceptHelloAck(frame: ackFrame)
        #expect(connected.peer == NodeIdentity(role: .coordinator, nodeID: "coordinator", incarnation: 100))
        #expect(connected.protocolVersion == 1)
    }

    @Test("an unsupported protocol version is refused, naming both", arguments: [UInt32(0), 2, UInt32.max])
    func unsupportedVersion(version: UInt32) {
        let error = wireError { _ = try coordinator.acceptHello(frame: hello(version: version)) }
        #expect(error?.code == .unsupportedVersion)
        #expect(error?.message.contains("\(version)") == true)
        #expect(error?.message.contains("1...1") == true)
        #expect(error?.code.closesConnection == true)
    }

    @Test("a first frame that is not a Hello is refused")
    func notHello() throws {
        for sample in envelopeSamples where sample.body.name != "hello" {
            let frame = try Tessera_V1_Envelope(requestID: 1, sample.body).serializedFrame()
            let error = wireError { _ = try coordinator.acceptHello(frame: frame) }
            #expect(error?.code == .badRequest, "\(sample.body.name)")
            #expect(error?.message.contains(sample.body.name) == true)
        }
        var noBody = Tessera_V1_Envelope()
        noBody.requestID = 5
        let error = wireError { _ = try coordinator.acceptHello(frame: noBody.serializedFrame()) }
        #expect(error?.message.contains("got empty") == true)
    }

    @Test(
        "a bad role, a refused role or a bad node id is refused",
        arguments: [
            (Tessera_V1_NodeRole.unspecified, "worker-1", "role 0"),
            (.UNRECOGNIZED(9), "worker-1", "role 9"),
            (.coordinator, "worker-1", "accepts only worker, client"),
            (.worker, "", "node id of 0 bytes"),
            (.worker, String(repeating: "x", count: 257), "node id of 257 bytes"),
        ]
    )
    func badPeer(role: Tessera_V1_NodeRole, nodeID: String, expected: String) {
        let error = wireError { _ = try coordinator.acceptHello(frame: hello(role: role, nodeID: nodeID)) }
        #expect(error?.code == .badRequest)
        #expect(error?.message.contains(expected) == true, "\(error?.message ?? "")")
    }

    @Test("garbage as the first frame is .malformedFrame")
    func garbageFirstFrame() {
        let error = wireError { _ = try coordinator.acceptHello(frame: ByteBuffer(bytes: [0xFF, 0xFF])) }
        #expect(error?.code == .malformedFrame)
    }

    @Test("a rejection reaches the connecting side as the WireError it carries")
    func rejection() throws {
        let refusal = WireError(.unsupportedVersion, "this node speaks 1...1")
        let frame = try coordinator.rejectionFrame(for: refusal, requestID: 1)
        let error = wireError { _ = try worker.acceptHelloAck(frame: frame) }
        #expect(error?.code == .unsupportedVersion)
        #expect(error?.message.contains("refused the handshake: this node speaks 1...1") == true)
    }

    @Test("the connecting side checks the acceptor's role and version")
    func ackChecks() throws {
        // A worker expecting the coordinator reaches a client instead.
        let client = Handshake(local: NodeIdentity(role: .client, nodeID: "loadgen", incarnation: 1))
        let outcome = try client.acceptHello(frame: worker.helloFrame())
        let wrongRole = wireError { _ = try worker.acceptHelloAck(frame: client.helloAckFrame(for: outcome)) }
        #expect(wrongRole?.code == .badRequest)
        #expect(wrongRole?.message.contains("client") == true)

        var ack = Tessera_V1_HelloAck()
        ack.protocolVersion = 3
        ack.role = .coordinator
        ack.nodeID = "coordinator"
        let frame = try Tessera_V1_Envelope(requestID: 1, .helloAck(ack)).serializedFrame()
        #expect(wireError { _ = try worker.acceptHelloAck(frame: frame) }?.code == .unsupportedVersion)

        let notAck = try Tessera_V1_Envelope(requestID: 1, envelopeSamples[5].body).serializedFrame()
        #expect(wireError { _ = try worker.acceptHelloAck(frame: notAck) }?.code == .badRequest)
    }
}
