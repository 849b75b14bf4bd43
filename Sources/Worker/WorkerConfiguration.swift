public import ClusterSecurity
public import ClusterTransport
public import KVCacheCore

/// What a worker process needs to start.
public struct WorkerConfiguration: Sendable {
    public var nodeID: String
    /// Distinguishes a restarted worker from its previous life.
    public var incarnation: UInt64
    public var listen: NodeAddress
    /// The host the coordinator tells clients and peers to reach this worker by (a pod's IP behind a
    /// listener on 0.0.0.0); the listen host when nil.
    public var advertisedHost: String?
    public var coordinator: NodeAddress
    public var maxFrameBytes: Int
    public var storage: ScalarType
    public var memoryCapacityBytes: UInt64
    public var heartbeatInterval: Duration
    /// Faults injected into connections this worker accepts (clients, and primaries forwarding to it).
    public var faults: FaultInjector?
    /// Mutual TLS with the cluster's certificates, or insecure.
    public var security: TransportSecurity
    /// Protections switched off (only the simulator does, to test that it notices).
    package var weakened: Set<Protection> = []

    public init(
        nodeID: String,
        incarnation: UInt64,
        listen: NodeAddress,
        coordinator: NodeAddress,
        security: TransportSecurity,
        maxFrameBytes: Int = 64 << 20,
        storage: ScalarType = .float32,
        memoryCapacityBytes: UInt64 = 8 << 30,
        heartbeatInterval: Duration = .milliseconds(250),
        faults: FaultInjector? = nil,
        advertisedHost: String? = nil
    ) {
        self.advertisedHost = advertisedHost
        self.nodeID = nodeID
        self.incarnation = incarnation
        self.listen = listen
        self.coordinator = coordinator
        self.maxFrameBytes = maxFrameBytes
        self.storage = storage
        self.memoryCapacityBytes = memoryCapacityBytes
        self.heartbeatInterval = heartbeatInterval
        self.faults = faults
        self.security = security
    }
}
