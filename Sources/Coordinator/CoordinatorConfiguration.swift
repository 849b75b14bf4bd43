public import ClusterSecurity
public import ClusterState
public import ClusterTransport

/// What the coordinator process needs to start.
public struct CoordinatorConfiguration: Sendable {
    public var nodeID: String
    public var incarnation: UInt64
    public var listen: NodeAddress
    public var maxFrameBytes: Int
    public var failureDetector: FailureDetectorSettings
    /// Cluster-wide cap on accounted KV bytes (0 = unlimited).
    public var memoryLimitBytes: UInt64
    public var tenantQuotaBytes: [String: UInt64]
    /// Under memory pressure admitted sequences are tightened, but never below this retention ratio.
    public var floorRatio: Double
    /// Copies of each shard of a sequence, on distinct workers.
    public var replication: Int
    /// An open sequence that no client connection watches for this long is closed: its client is
    /// gone (a lease; clients of `TesseraClient` watch every sequence they opened).
    public var orphanGrace: Duration
    /// How long a worker keeps its copies without an acknowledged heartbeat before it drops them
    /// (told at registration). Until twice this has passed since a dead worker's last heartbeat, the
    /// copies it may still hold are reserved out of the memory limit. It also bounds how long the
    /// coordinator may be away before the workers drop everything.
    public var workerLease: Duration
    /// Whether this coordinator starts a new cluster rather than replacing one: a replacement admits
    /// nothing for the failure detector's dead-after time, while the workers that outlived its
    /// predecessor re-register and their copies are charged (also when a worker says it had
    /// registered with another coordinator).
    public var startsNewCluster: Bool
    /// Faults to inject into the connections the coordinator accepts (none when nil).
    public var faults: FaultInjector?
    /// Mutual TLS with the cluster's certificates, or insecure.
    public var security: TransportSecurity
    /// Protections switched off (only the simulator does, to test that it notices).
    package var weakened: Set<Protection> = []

    public init(
        nodeID: String = "coordinator",
        incarnation: UInt64,
        listen: NodeAddress,
        security: TransportSecurity,
        maxFrameBytes: Int = 64 << 20,
        failureDetector: FailureDetectorSettings = .defaults,
        memoryLimitBytes: UInt64 = 0,
        tenantQuotaBytes: [String: UInt64] = [:],
        floorRatio: Double = 0.02,
        replication: Int = 2,
        orphanGrace: Duration = .seconds(30),
        workerLease: Duration = .seconds(30),
        startsNewCluster: Bool = false,
        faults: FaultInjector? = nil
    ) {
        self.nodeID = nodeID
        self.incarnation = incarnation
        self.listen = listen
        self.maxFrameBytes = maxFrameBytes
        self.failureDetector = failureDetector
        self.memoryLimitBytes = memoryLimitBytes
        self.tenantQuotaBytes = tenantQuotaBytes
        self.floorRatio = floorRatio
        self.replication = replication
        self.orphanGrace = orphanGrace
        self.workerLease = workerLease
        self.startsNewCluster = startsNewCluster
        self.faults = faults
        self.security = security
    }
}
