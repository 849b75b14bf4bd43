extension ClusterConfiguration {
    /// Checks every setting and the relations between them.
    ///
    /// - Throws: ``ClusterAdminError`` with code ``ClusterAdminError/Code/invalidValue`` for the first
    ///   violation, e.g. `worker.maxFrameBytes must be in 1024...1073741824, got 12`; its `fieldPath` names
    ///   the field.
    public func validate() throws(ClusterAdminError) {
        try self.coordinator.validate()
        try self.worker.validate()
        try self.cluster.validate()
        try self.network.validate()
        try check(
            self.coordinator.replication <= self.cluster.workers,
            "coordinator.replication",
            "must be at most cluster.workers (\(self.cluster.workers)), got \(self.coordinator.replication)"
        )
    }
}

extension CoordinatorSettings {
    /// Valid heartbeat intervals in milliseconds.
    public static let heartbeatIntervalMillisRange = 10...60_000
    /// Valid failure-detection timeouts in milliseconds (suspect and dead).
    public static let detectionMillisRange = 10...3_600_000
    /// Valid replication factors.
    public static let replicationRange = 1...16

    /// Checks this section on its own (paths are reported under `coordinator.`).
    public func validate() throws(ClusterAdminError) {
        try checkHost(self.host, "coordinator.host")
        try checkRange(self.port, portRange, "coordinator.port")
        try checkRange(self.adminPort, portRange, "coordinator.adminPort")
        try check(
            self.adminPort == 0 || self.adminPort != self.port,
            "coordinator.adminPort",
            "must differ from coordinator.port (\(self.port)), got \(self.adminPort)"
        )
        try checkRange(
            self.heartbeatIntervalMillis,
            Self.heartbeatIntervalMillisRange,
            "coordinator.heartbeatIntervalMillis"
        )
        try checkRange(self.suspectAfterMillis, Self.detectionMillisRange, "coordinator.suspectAfterMillis")
        try check(
            self.suspectAfterMillis > self.heartbeatIntervalMillis,
            "coordinator.suspectAfterMillis",
            "must be greater than coordinator.heartbeatIntervalMillis (\(self.heartbeatIntervalMillis)), "
                + "got \(self.suspectAfterMillis)"
        )
        try checkRange(self.deadAfterMillis, Self.detectionMillisRange, "coordinator.deadAfterMillis")
        try check(
            self.deadAfterMillis > self.suspectAfterMillis,
            "coordinator.deadAfterMillis",
            "must be greater than coordinator.suspectAfterMillis (\(self.suspectAfterMillis)), "
                + "got \(self.deadAfterMillis)"
        )
        try self.memory.validate()
        try checkRange(self.replication, Self.replicationRange, "coordinator.replication")
    }
}

extension CoordinatorSettings.Memory {
    /// Valid floor ratios.
    public static let floorRatioRange = 0.0...1.0

    /// Checks this section on its own (paths are reported under `coordinator.memory.`).
    public func validate() throws(ClusterAdminError) {
        try checkRange(self.floorRatio, Self.floorRatioRange, "coordinator.memory.floorRatio")
        for (tenant, quota) in self.tenantQuotas.sorted(by: { $0.key < $1.key }) {
            let path = "coordinator.memory.tenantQuotas.\(tenant)"
            try check(!tenant.isEmpty, path, "must name a tenant, got an empty name")
            if let limit = self.limitBytes, limit > 0 {
                try check(
                    quota > 0 && quota <= limit,
                    path,
                    "must be in 1...coordinator.memory.limitBytes (\(limit)), got \(quota)"
                )
            } else {
                try check(quota > 0, path, "must be at least 1, got \(quota)")
            }
        }
    }
}

extension WorkerSettings {
    /// Valid frame caps in bytes (1 KiB...1 GiB).
    public static let maxFrameBytesRange = 1024...1_073_741_824
    /// The smallest valid memory capacity in bytes (1 MiB).
    public static let minimumMemoryCapacityBytes: UInt64 = 1 << 20

    /// Checks this section on its own (paths are reported under `worker.`).
    public func validate() throws(ClusterAdminError) {
        try checkHost(self.host, "worker.host")
        try checkRange(self.port, portRange, "worker.port")
        try checkRange(self.adminPort, portRange, "worker.adminPort")
        try check(
            self.adminPort == 0 || self.adminPort != self.port,
            "worker.adminPort",
            "must differ from worker.port (\(self.port)), got \(self.adminPort)"
        )
        try checkRange(self.maxFrameBytes, Self.maxFrameBytesRange, "worker.maxFrameBytes")
        try check(
            self.memoryCapacityBytes >= Self.minimumMemoryCapacityBytes,
            "worker.memoryCapacityBytes",
            "must be at least \(Self.minimumMemoryCapacityBytes), got \(self.memoryCapacityBytes)"
        )
    }
}

extension LaunchSettings {
    /// Valid worker counts.
    public static let workersRange = 1...256
    /// Valid ready timeouts in seconds.
    public static let readyTimeoutSecondsRange = 1...3600

    /// Checks this section on its own (paths are reported under `cluster.`).
    public func validate() throws(ClusterAdminError) {
        try checkRange(self.workers, Self.workersRange, "cluster.workers")
        try checkRange(self.readyTimeoutSeconds, Self.readyTimeoutSecondsRange, "cluster.readyTimeoutSeconds")
        try check(
            self.maxLifetimeSeconds >= 0,
            "cluster.maxLifetimeSeconds",
            "must be at least 0 (0 = unlimited), got \(self.maxLifetimeSeconds)"
        )
    }
}

private let portRange = 0...65535

private func check(
    _ condition: Bool,
    _ path: String,
    _ requirement: @autoclosure () -> String
)
    throws(ClusterAdminError)
{
    guard condition else {
        throw ClusterAdminError(code: .invalidValue, message: "\(path) \(requirement())", fieldPath: path)
    }
}

private func checkRange<Value: Comparable>(
    _ value: Value,
    _ range: ClosedRange<Value>,
    _ path: String
) throws(ClusterAdminError) {
    try check(range.contains(value), path, "must be in \(range), got \(value)")
}

private func checkHost(_ host: String, _ path: String) throws(ClusterAdminError) {
    try check(
        !host.isEmpty && !host.contains(where: \.isWhitespace),
        path,
        "must be a host name or IP address, got \"\(host)\""
    )
}
