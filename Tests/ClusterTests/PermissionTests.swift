import Client
import ClusterSecurity
import ClusterState
import ClusterTransport
import ClusterWire
import Coordinator
import KVCacheCore
import Logging
import Testing
import Worker
import Workloads

/// The probes of a hostile peer against a cluster over mutual TLS: each is refused with
/// PERMISSION_DENIED (or at the handshake) and changes nothing the owner can see. The services run
/// in this process on port 0, with real sockets and real TLS; one at a time, with a failure detector
/// that a loaded machine cannot trip (a worker declared dead would fail the sequence over mid-probe).
@Suite(.serialized) struct PermissionTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
    static let sequenceID: UInt64 = 5

    /// A running cluster (coordinator, two workers, replication 2) with one prefilled sequence of
    /// tenant `owner`, decoded one step.
    struct Cluster: Sendable {
        var certificates: CertificateDirectory
        var coordinator: NodeAddress
        var owner: TesseraClient
        var placement: SequencePlacement
        var primary: NodeAddress { placement.shards[0].primary }
        var replica: NodeAddress { placement.shards[0].replicas[0] }

        /// What the owner sees after decoding `step`: the shard's copies on both holders.
        func ownerView(step: Int) async throws -> [ShardCopy] {
            _ = try await owner.decode(PermissionTests.sequenceID, step: step, geometry: .tiny)
            return try await owner.shardCopies(on: primary) + owner.shardCopies(on: replica)
        }

        /// Nothing was cut or dropped: each copy grew by the decoded row only, and the primary and
        /// the replica still hold the same bytes.
        static func expectUnharmed(before: [ShardCopy], after: [ShardCopy]) {
            #expect(after.count == 2 && before.count == 2, "copies: \(after)")
            #expect(zip(before, after).allSatisfy { $0.kvBytes < $1.kvBytes }, "before \(before), after \(after)")
            #expect(Set(after.map(\.digest)).count == 1 && Set(after.map(\.kvBytes)).count == 1, "diverged: \(after)")
        }

        /// Opens a raw connection as `identity`, with the certificate `certificate` names (default:
        /// the same identity), and runs `body` with it.
        func connect<T: Sendable>(
            to address: NodeAddress,
            as identity: NodeIdentity,
            certificate: CertifiedIdentity? = nil,
            _ body: @escaping @Sendable (PeerConnection) async throws -> T
        ) async throws -> T {
            let wanted =
                certificate ?? CertifiedIdentity(role: identity.role, nodeID: identity.nodeID, tenant: identity.tenant)
            // The certificate on disk as it is, revoked or not: what its holder would present.
            let onDisk = try? NodeCredentials(directory: certificates, name: wanted.nodeID)
            let credentials =
                try onDisk.flatMap { $0.identity == wanted ? $0 : nil } ?? certificates.credentials(for: wanted)
            return try await Transport.withConnection(
                to: address,
                handshake: Handshake(local: identity),
                security: .mutualTLS(credentials),
                maxFrameBytes: 1 << 20,
                handler: RefuseRequests(),
                logger: PermissionTests.logger,
                body
            )
        }
    }

    static func withCluster(_ body: @escaping @Sendable (Cluster) async throws -> Void) async throws {
        try await withTestCertificates { certificates in
            try await withInProcessCluster(
                certificates,
                workers: 2,
                named: "worker",
                failureDetector: FailureDetectorSettings(suspectAfter: .seconds(20), deadAfter: .seconds(60)),
                logger: logger
            ) { address, _ in
                let owner = try certificates.security(.client, "owner", tenant: "owner")
                try await TesseraClient.withClient(coordinator: address, security: owner, logger: logger) { client in
                    _ = try await eventually("two workers") {
                        try await client.status().workers.filter { $0.state == "alive" }.count == 2 ? true : nil
                    }
                    let trace = TraceGenerator(preset: .imageQA, geometry: .tiny, seed: 3).sequence(0)
                    let placement = try await client.openSequence(
                        sequenceID,
                        geometry: .tiny,
                        layout: trace.layout,
                        policy: .snapKV(.init()),
                        retention: 0.2
                    )
                    _ = try await client.prefillSynthetic(sequenceID, workload: "image-qa", seed: 3, index: 0)
                    _ = try await client.decode(sequenceID, step: 0, geometry: .tiny)
                    try await body(
                        Cluster(certificates: certificates, coordinator: address, owner: client, placement: placement)
                    )
                }
            }
        }
    }

    static func expectDenied(_ what: String, _ body: () async throws -> Void) async {
        do {
            try await body()
            Issue.record("\(what) was accepted")
        } catch let error as WireError {
            #expect(error.code == .permissionDenied, "\(what): \(error)")
        } catch {
            Issue.record("\(what) failed with \(error), expected PERMISSION_DENIED")
        }
    }

    static let client = NodeIdentity(role: .client, nodeID: "mallory", incarnation: 1, tenant: "mallory")

    @Test(.timeLimit(.minutes(2)))
    func aClientCannotSendCoordinatorMessagesToAWorker() async throws {
        try await Self.withCluster { cluster in
            let before = try await cluster.ownerView(step: 1)
            try await cluster.connect(to: cluster.primary, as: Self.client) { worker in
                var close = Tessera_V1_Close()
                close.tenant = "owner"
                close.sequenceID = cluster.placement.sequenceID
                await Self.expectDenied("close from a client") { _ = try await worker.request(.close(close)) }
                var budget = Tessera_V1_AssignBudget()
                budget.sequenceID = cluster.placement.sequenceID
                budget.epoch = cluster.placement.epoch
                await Self.expectDenied("assign_budget from a client") {
                    _ = try await worker.request(.assignBudget(budget))
                }
                var assignment = Tessera_V1_ShardAssignment()
                assignment.tenant = "owner"
                assignment.sequenceID = cluster.placement.sequenceID
                assignment.epoch = cluster.placement.epoch + 1
                await Self.expectDenied("shard_assignment from a client") {
                    _ = try await worker.request(.shardAssignment(assignment))
                }
                var copy = Tessera_V1_CopyShard()
                copy.sequenceID = cluster.placement.sequenceID
                await Self.expectDenied("copy_shard from a client") { _ = try await worker.request(.copyShard(copy)) }
            }
            Cluster.expectUnharmed(before: before, after: try await cluster.ownerView(step: 2))
        }
    }

    @Test(.timeLimit(.minutes(2)))
    func aHelloMustClaimTheCertificatesRoleAndNodeID() async throws {
        try await Self.withCluster { cluster in
            let certificate = CertifiedIdentity(role: .client, nodeID: "mallory", tenant: "mallory")
            for claim in [
                NodeIdentity(role: .coordinator, nodeID: "coordinator", incarnation: 1),
                NodeIdentity(role: .worker, nodeID: "worker-1", incarnation: 9),
                NodeIdentity(role: .client, nodeID: "owner", incarnation: 1),
            ] {
                await Self.expectDenied("hello as \(claim) with a client certificate") {
                    try await cluster.connect(to: cluster.primary, as: claim, certificate: certificate) { _ in }
                }
            }
            _ = try await cluster.ownerView(step: 1)
        }
    }

    /// A revoked certificate's open connection ends at its next frame, and its new connections are
    /// refused at the handshake by the coordinator and the workers, without restarting them; other
    /// certificates still connect.
    @Test(.timeLimit(.minutes(2)))
    func aRevokedCertificateIsRefusedAtItsNextFrameAndHandshake() async throws {
        try await Self.withCluster { cluster in
            let laptop = NodeIdentity(role: .client, nodeID: "laptop", incarnation: 1, tenant: "owner")
            let status = Tessera_V1_Envelope.OneOf_Body.statusRequest(Tessera_V1_StatusRequest())
            let serial = try await cluster.connect(to: cluster.coordinator, as: laptop) { open in
                _ = try await open.request(status)
                let serial = try cluster.certificates.revoke(
                    try cluster.certificates.certificate(named: "laptop"),
                    holder: "laptop"
                )
                // The connection made before the revocation ends at a frame of the peer's once the
                // coordinator has read the list again (within half a second).
                let deadline = ContinuousClock.now + .seconds(10)
                while ContinuousClock.now < deadline {
                    do {
                        _ = try await open.request(status, timeout: .seconds(5))
                    } catch let error as WireError {
                        #expect(
                            error.code == .unavailable
                                && error.message.contains("revoked (serial \(serial)) after it connected"),
                            "\(error)"
                        )
                        return serial
                    }
                    try await Task.sleep(for: .milliseconds(50))
                }
                Issue.record("the connection of a revoked certificate stayed open")
                return serial
            }
            for address in [cluster.coordinator, cluster.primary] {
                do {
                    _ = try await cluster.connect(to: address, as: laptop) { try await $0.request(status) }
                    Issue.record("a revoked certificate connected to \(address)")
                } catch let error as WireError {
                    #expect(
                        error.code == .permissionDenied && error.message.contains("revoked (serial \(serial))"),
                        "\(address): \(error)"
                    )
                }
            }
            let owner = NodeIdentity(role: .client, nodeID: "owner", incarnation: 1, tenant: "owner")
            _ = try await cluster.connect(to: cluster.coordinator, as: owner) { try await $0.request(status) }
            _ = try await cluster.ownerView(step: 1)
            // Credentials asked for again are issued anew rather than the revoked ones reused.
            let reissued = try cluster.certificates.credentials(
                for: CertifiedIdentity(role: .client, nodeID: "laptop", tenant: "owner")
            )
            try reissued.checkNotRevoked()
            _ = try await cluster.connect(to: cluster.coordinator, as: laptop) { try await $0.request(status) }
        }
    }

    /// Sequence ids are scoped per tenant: another tenant opening the id the owner is about to use
    /// gets a sequence of its own, and neither its open nor its close touches the owner's.
    @Test(.timeLimit(.minutes(2)))
    func anIDIsScopedToItsTenant() async throws {
        try await Self.withCluster { cluster in
            let next = Self.sequenceID + 1
            let trace = TraceGenerator(preset: .imageQA, geometry: .tiny, seed: 3).sequence(0)
            let mallory = try cluster.certificates.security(.client, "mallory", tenant: "mallory")
            try await TesseraClient.withClient(coordinator: cluster.coordinator, security: mallory, logger: Self.logger)
            {
                mallory in
                let taken = try await mallory.openSequence(
                    next,
                    geometry: .tiny,
                    layout: trace.layout,
                    policy: .full,
                    retention: 1
                )
                let owners = try await cluster.owner.openSequence(
                    next,
                    geometry: .tiny,
                    layout: trace.layout,
                    policy: .snapKV(.init()),
                    retention: 0.2
                )
                #expect(taken.sequenceID != owners.sequenceID)
                #expect(
                    owners.sequenceID == cluster.owner.clusterID(next) && taken.sequenceID == mallory.clusterID(next)
                )
                _ = try await cluster.owner.prefillSynthetic(next, workload: "image-qa", seed: 3, index: 0)
                #expect(try await mallory.close(next) == 0, "nothing was prefilled under mallory's id")
                let outputs = try await cluster.owner.decode(next, step: 0, geometry: .tiny)
                #expect(outputs.count == ModelGeometry.tiny.layers)
                // The cluster's own ids cannot be opened by a client: that is how one would aim at
                // another tenant's scoped id.
                do {
                    _ = try await mallory.openSequence(
                        owners.sequenceID,
                        geometry: .tiny,
                        layout: trace.layout,
                        policy: .full,
                        retention: 1
                    )
                    Issue.record("an open under the cluster's id of another tenant's sequence was accepted")
                } catch let error as WireError {
                    #expect(error.code == .badRequest && error.message.contains("below 2^62"), "\(error)")
                }
                #expect(try await cluster.owner.close(next) > 0)
            }
        }
    }

    @Test(.timeLimit(.minutes(2)))
    func onlyTheShardsPrimaryForwardsWrites() async throws {
        try await Self.withCluster { cluster in
            let before = try await cluster.ownerView(step: 1)
            // A real worker certificate, but not the primary of the shard.
            let stranger = NodeIdentity(role: .worker, nodeID: "worker-9", incarnation: 1)
            try await cluster.connect(to: cluster.replica, as: stranger) { replica in
                var decode = Tessera_V1_Decode()
                decode.tenant = "owner"
                decode.sequenceID = cluster.placement.sequenceID
                decode.shardID = cluster.placement.shards[0].id
                decode.epoch = cluster.placement.epoch
                decode.step = 2
                decode.primaryResult.sequenceID = decode.sequenceID
                decode.primaryResult.shardID = decode.shardID
                decode.primaryResult.step = decode.step
                await Self.expectDenied("a forwarded decode from a non-primary") {
                    _ = try await replica.request(.decode(decode))
                }
            }
            Cluster.expectUnharmed(before: before, after: try await cluster.ownerView(step: 2))
        }
    }

    @Test(.timeLimit(.minutes(2)))
    func aWorkerRegistersOnlyItsOwnNodeID() async throws {
        try await Self.withCluster { cluster in
            let impostor = NodeIdentity(role: .worker, nodeID: "worker-9", incarnation: 1)
            try await cluster.connect(to: cluster.coordinator, as: impostor) { coordinator in
                var register = Tessera_V1_RegisterWorker()
                register.endpoint.nodeID = "worker-1"
                register.endpoint.host = "127.0.0.1"
                register.endpoint.port = 1
                register.incarnation = .max
                await Self.expectDenied("register_worker for another node") {
                    _ = try await coordinator.request(.registerWorker(register))
                }
            }
            let status = try await cluster.owner.status()
            #expect(status.workers.filter { $0.state == "alive" }.map(\.id).sorted() == ["worker-1", "worker-2"])
            _ = try await cluster.ownerView(step: 1)
        }
    }

    @Test(.timeLimit(.minutes(2)))
    func aTenantReachesOnlyItsOwnSequences() async throws {
        try await Self.withCluster { cluster in
            let before = try await cluster.ownerView(step: 1)
            try await cluster.connect(to: cluster.primary, as: Self.client) { worker in
                // Claiming the owner's tenant is refused; claiming its own finds another tenant's sequence.
                var decode = Tessera_V1_Decode()
                decode.tenant = "owner"
                decode.sequenceID = cluster.placement.sequenceID
                decode.shardID = cluster.placement.shards[0].id
                decode.epoch = cluster.placement.epoch
                decode.step = 2
                await Self.expectDenied("a decode claiming another tenant") {
                    _ = try await worker.request(.decode(decode))
                }
                decode.tenant = ""
                do {
                    _ = try await worker.request(.decode(decode))
                    Issue.record("another tenant's decode was accepted")
                } catch let error as WireError {
                    #expect(error.code == .wrongTenant, "\(error)")
                }
                // Status lists only the asking tenant's sequences.
                var request = Tessera_V1_StatusRequest()
                request.includeSequences = true
                guard case .statusReply(let reply) = try await worker.request(.statusRequest(request)) else {
                    Issue.record("no status reply")
                    return
                }
                #expect(reply.sequences.isEmpty, "\(reply.sequences)")
            }
            try await cluster.connect(to: cluster.coordinator, as: Self.client) { coordinator in
                var close = Tessera_V1_Close()
                close.tenant = "owner"
                close.sequenceID = cluster.placement.sequenceID
                await Self.expectDenied("a close claiming another tenant") {
                    _ = try await coordinator.request(.close(close))
                }
            }
            Cluster.expectUnharmed(before: before, after: try await cluster.ownerView(step: 2))
        }
    }

    @Test(.timeLimit(.minutes(2)))
    func aRefusedStepChangesNothing() async throws {
        try await Self.withCluster { cluster in
            let before = try await cluster.ownerView(step: 1)
            // Finite, but attention over them overflows: the step is refused, and its rows must not stay.
            let g = ModelGeometry.tiny
            let huge = try DecodeStepInput(
                geometry: g,
                keys: Array(repeating: 3e38, count: g.kvHeads * g.headDim),
                values: Array(repeating: 3e38, count: g.kvHeads * g.headDim),
                queries: Array(repeating: 3e38, count: g.queryHeads * g.headDim)
            )
            do {
                _ = try await cluster.owner.decode(
                    Self.sequenceID,
                    step: 2,
                    geometry: g,
                    inputs: Dictionary(uniqueKeysWithValues: (0..<g.layers).map { ($0, huge) })
                )
                Issue.record("a step with overflowing attention was accepted")
            } catch let error as WireError {
                #expect(error.code == .invalidValue, "\(error)")
            }
            let unchanged =
                try await cluster.owner.shardCopies(on: cluster.primary)
                + cluster.owner.shardCopies(on: cluster.replica)
            #expect(
                unchanged.map(\.kvBytes) == before.map(\.kvBytes) && unchanged.map(\.digest) == before.map(\.digest)
            )
            let outputs = try await cluster.owner.decode(Self.sequenceID, step: 2, geometry: g)
            #expect(outputs.values.allSatisfy { $0.allSatisfy(\.isFinite) })
        }
    }
}
