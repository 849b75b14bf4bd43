public import Logging

/// Everything a Tessera cluster is configured with, as read from a YAML file (see `cluster/local.yaml`).
///
/// Every field is optional in the file: a missing key (or a `null` value) keeps the default. Unknown keys are
/// errors, so a typo never silently falls back to a default. Precedence is defaults, then the file, then the
/// CLI's flags; call ``validate()`` after merging flags.
public struct ClusterConfiguration: Sendable, Codable, Equatable {
    /// The coordinator process.
    public var coordinator: CoordinatorSettings
    /// Every worker process.
    public var worker: WorkerSettings
    /// How `tessera cluster up` launches and supervises the processes.
    public var cluster: LaunchSettings
    /// The links between hosts under `tessera cluster up --hosts N`.
    public var network: NetworkSettings

    public init(
        coordinator: CoordinatorSettings = .defaults,
        worker: WorkerSettings = .defaults,
        cluster: LaunchSettings = .defaults,
        network: NetworkSettings = .defaults
    ) {
        self.coordinator = coordinator
        self.worker = worker
        self.cluster = cluster
        self.network = network
    }

    /// The built-in defaults: a loopback cluster of 3 workers on kernel-chosen ports.
    public static var defaults: Self { Self() }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case coordinator, worker, cluster, network
    }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self, section: "the top level")
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let defaults = Self.defaults
        self.coordinator = try container.decode(.coordinator, default: defaults.coordinator)
        self.worker = try container.decode(.worker, default: defaults.worker)
        self.cluster = try container.decode(.cluster, default: defaults.cluster)
        self.network = try container.decode(.network, default: defaults.network)
    }
}

/// Settings of the coordinator process (YAML section `coordinator`).
public struct CoordinatorSettings: Sendable, Codable, Equatable {
    /// The address the cluster listener binds.
    public var host: String
    /// The cluster (protobuf) port; 0 lets the kernel choose.
    public var port: Int
    /// The admin HTTP port (`/metrics`, `/healthz`); 0 lets the kernel choose.
    public var adminPort: Int
    /// How often workers are pinged.
    public var heartbeatIntervalMillis: Int
    /// Silence after which a worker is suspected; greater than ``heartbeatIntervalMillis``.
    public var suspectAfterMillis: Int
    /// Silence after which a worker is declared dead; greater than ``suspectAfterMillis``.
    public var deadAfterMillis: Int
    /// The cluster-wide KV-cache memory budget.
    public var memory: Memory
    /// How many workers hold each sequence's cache; at most `cluster.workers`.
    public var replication: Int
    /// Transport faults injected into the connections the coordinator accepts, in the compact form
    /// of `--faults` (e.g. `drop=1,peer=worker-2`); `none` by default. Checked when the process starts.
    public var faults: String

    /// The cluster-wide KV-cache memory budget (YAML section `coordinator.memory`).
    public struct Memory: Sendable, Codable, Equatable {
        /// Total bytes of KV cache the coordinator admits across workers; 0 means unlimited, absent
        /// half of the coordinator machine's memory (`ProcessMemory.defaultLimitBytes`).
        public var limitBytes: UInt64?
        /// Per-tenant caps in bytes, keyed by tenant name; a tenant not listed is capped only by ``limitBytes``.
        public var tenantQuotas: [String: UInt64]
        /// The fraction of a sequence's budget every modality keeps, however low its scores (0...1).
        public var floorRatio: Double

        public init(limitBytes: UInt64? = nil, tenantQuotas: [String: UInt64] = [:], floorRatio: Double = 0.02) {
            self.limitBytes = limitBytes
            self.tenantQuotas = tenantQuotas
            self.floorRatio = floorRatio
        }

        public static var defaults: Self { Self() }

        enum CodingKeys: String, CodingKey, CaseIterable {
            case limitBytes, tenantQuotas, floorRatio
        }

        public init(from decoder: any Decoder) throws {
            try decoder.rejectUnknownKeys(CodingKeys.self, section: "coordinator.memory")
            let container = try decoder.container(keyedBy: CodingKeys.self)
            let defaults = Self.defaults
            self.limitBytes = try container.decodeIfPresent(UInt64.self, forKey: .limitBytes)
            self.tenantQuotas = try container.decode(.tenantQuotas, default: defaults.tenantQuotas)
            self.floorRatio = try container.decode(.floorRatio, default: defaults.floorRatio)
        }
    }

    public init(
        host: String = "127.0.0.1",
        port: Int = 0,
        adminPort: Int = 0,
        heartbeatIntervalMillis: Int = 250,
        suspectAfterMillis: Int = 1000,
        deadAfterMillis: Int = 3000,
        memory: Memory = .defaults,
        replication: Int = 2,
        faults: String = "none"
    ) {
        self.host = host
        self.port = port
        self.adminPort = adminPort
        self.heartbeatIntervalMillis = heartbeatIntervalMillis
        self.suspectAfterMillis = suspectAfterMillis
        self.deadAfterMillis = deadAfterMillis
        self.memory = memory
        self.replication = replication
        self.faults = faults
    }

    public static var defaults: Self { Self() }

    /// ``heartbeatIntervalMillis`` as a `Duration`.
    public var heartbeatInterval: Duration { .milliseconds(self.heartbeatIntervalMillis) }
    /// ``suspectAfterMillis`` as a `Duration`.
    public var suspectAfter: Duration { .milliseconds(self.suspectAfterMillis) }
    /// ``deadAfterMillis`` as a `Duration`.
    public var deadAfter: Duration { .milliseconds(self.deadAfterMillis) }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case host, port, adminPort, heartbeatIntervalMillis, suspectAfterMillis, deadAfterMillis, memory, replication,
            faults
    }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self, section: "coordinator")
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let defaults = Self.defaults
        self.host = try container.decode(.host, default: defaults.host)
        self.port = try container.decode(.port, default: defaults.port)
        self.adminPort = try container.decode(.adminPort, default: defaults.adminPort)
        self.heartbeatIntervalMillis = try container.decode(
            .heartbeatIntervalMillis,
            default: defaults.heartbeatIntervalMillis
        )
        self.suspectAfterMillis = try container.decode(.suspectAfterMillis, default: defaults.suspectAfterMillis)
        self.deadAfterMillis = try container.decode(.deadAfterMillis, default: defaults.deadAfterMillis)
        self.memory = try container.decode(.memory, default: defaults.memory)
        self.replication = try container.decode(.replication, default: defaults.replication)
        self.faults = try container.decode(.faults, default: defaults.faults)
    }
}

/// Settings shared by every worker process (YAML section `worker`).
public struct WorkerSettings: Sendable, Codable, Equatable {
    /// The element type KV tensors are stored in.
    public enum Storage: String, Sendable, Codable, Equatable, CaseIterable {
        /// 32-bit floats.
        case f32
        /// 16-bit floats: half the bytes.
        case f16

        /// Bytes per stored element.
        public var bytesPerElement: Int {
            switch self {
            case .f32: 4
            case .f16: 2
            }
        }

        public init(from decoder: any Decoder) throws {
            self = try decoder.decodeChoice(Self.self)
        }
    }

    /// The address the worker's listener binds.
    public var host: String
    /// The worker's cluster port; 0 lets the kernel choose (needed when several workers share a host).
    public var port: Int
    /// The worker's admin HTTP port; 0 lets the kernel choose.
    public var adminPort: Int
    /// The largest frame a worker accepts or sends, in bytes (1 KiB...1 GiB).
    public var maxFrameBytes: Int
    /// The element type KV tensors are stored in.
    public var storage: Storage
    /// The KV-cache bytes one worker holds before it evicts or rejects.
    public var memoryCapacityBytes: UInt64
    /// Transport faults injected into the connections every worker accepts (compact form of
    /// `--faults`); `none` by default. Checked when the processes start.
    public var faults: String

    public init(
        host: String = "127.0.0.1",
        port: Int = 0,
        adminPort: Int = 0,
        maxFrameBytes: Int = 64 << 20,
        storage: Storage = .f32,
        memoryCapacityBytes: UInt64 = 8 << 30,
        faults: String = "none"
    ) {
        self.host = host
        self.port = port
        self.adminPort = adminPort
        self.maxFrameBytes = maxFrameBytes
        self.storage = storage
        self.memoryCapacityBytes = memoryCapacityBytes
        self.faults = faults
    }

    public static var defaults: Self { Self() }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case host, port, adminPort, maxFrameBytes, storage, memoryCapacityBytes, faults
    }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self, section: "worker")
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let defaults = Self.defaults
        self.host = try container.decode(.host, default: defaults.host)
        self.port = try container.decode(.port, default: defaults.port)
        self.adminPort = try container.decode(.adminPort, default: defaults.adminPort)
        self.maxFrameBytes = try container.decode(.maxFrameBytes, default: defaults.maxFrameBytes)
        self.storage = try container.decode(.storage, default: defaults.storage)
        self.memoryCapacityBytes = try container.decode(.memoryCapacityBytes, default: defaults.memoryCapacityBytes)
        self.faults = try container.decode(.faults, default: defaults.faults)
    }
}

/// How `tessera cluster up` launches the cluster (YAML section `cluster`).
public struct LaunchSettings: Sendable, Codable, Equatable {
    /// How many worker processes to start.
    public var workers: Int
    /// How long to wait for every process's `READY` line.
    public var readyTimeoutSeconds: Int
    /// Each process exits after this long; 0 means no limit.
    public var maxLifetimeSeconds: Int
    /// The log level of every process.
    public var logLevel: Logger.Level

    public init(
        workers: Int = 3,
        readyTimeoutSeconds: Int = 60,
        maxLifetimeSeconds: Int = 0,
        logLevel: Logger.Level = .info
    ) {
        self.workers = workers
        self.readyTimeoutSeconds = readyTimeoutSeconds
        self.maxLifetimeSeconds = maxLifetimeSeconds
        self.logLevel = logLevel
    }

    public static var defaults: Self { Self() }

    /// ``readyTimeoutSeconds`` as a `Duration`.
    public var readyTimeout: Duration { .seconds(self.readyTimeoutSeconds) }
    /// ``maxLifetimeSeconds`` as a `Duration`, or `nil` when unlimited.
    public var maxLifetime: Duration? { self.maxLifetimeSeconds == 0 ? nil : .seconds(self.maxLifetimeSeconds) }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case workers, readyTimeoutSeconds, maxLifetimeSeconds, logLevel
    }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self, section: "cluster")
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let defaults = Self.defaults
        self.workers = try container.decode(.workers, default: defaults.workers)
        self.readyTimeoutSeconds = try container.decode(.readyTimeoutSeconds, default: defaults.readyTimeoutSeconds)
        self.maxLifetimeSeconds = try container.decode(.maxLifetimeSeconds, default: defaults.maxLifetimeSeconds)
        if container.contains(.logLevel), try !container.decodeNil(forKey: .logLevel) {
            let levelDecoder = try container.superDecoder(forKey: .logLevel)
            self.logLevel = try levelDecoder.decodeChoice(Logger.Level.self)
        } else {
            self.logLevel = defaults.logLevel
        }
    }
}
