/// Cluster-wide K/V memory accounting and admission control.
///
/// Every open sequence is charged: its estimate from admission until a worker reports, then the
/// latest reported total. A new sequence is admitted when its estimate fits under both the
/// cluster's memory limit and its tenant's quota, counting what is already charged. Bytes are
/// counted as in `SequenceStatus.kv_bytes`: one replica of each shard, not multiplied by the
/// replication; a coordinator that wants the limit to cover every copy divides its capacity by it.
///
/// Sequence ids are one namespace on the coordinator (the workers' reports name a sequence by id
/// alone), so an id already open for any tenant is refused.
public struct Admission: Sendable, Hashable {
    /// The cluster's limit on charged bytes; 0 means unlimited. Lowering it below what is charged
    /// evicts nothing: new sequences are refused until enough are released.
    public var memoryLimitBytes: UInt64
    /// Per-tenant limits on charged bytes; a tenant not listed gets `defaultTenantQuotaBytes`.
    /// 0 means unlimited.
    public var tenantQuotaBytes: [String: UInt64]
    /// The quota of tenants not in `tenantQuotaBytes`; 0 means unlimited.
    public var defaultTenantQuotaBytes: UInt64
    /// The retry hint of a refusal that may succeed later (memory or quota in use).
    public var retryAfterMillis: UInt32

    /// Bytes held outside every charge: copies that workers declared dead may still hold until their
    /// lease lapses. A new sequence is admitted only if it fits beside them too.
    public var reservedBytes: UInt64 = 0
    private var open: [UInt64: AdmittedSequence] = [:]
    private var usage: [String: TenantUsage] = [:]
    public private(set) var totalBytes: UInt64 = 0

    public init(
        memoryLimitBytes: UInt64 = 0,
        tenantQuotaBytes: [String: UInt64] = [:],
        defaultTenantQuotaBytes: UInt64 = 0,
        retryAfterMillis: UInt32 = 250
    ) {
        self.memoryLimitBytes = memoryLimitBytes
        self.tenantQuotaBytes = tenantQuotaBytes
        self.defaultTenantQuotaBytes = defaultTenantQuotaBytes
        self.retryAfterMillis = retryAfterMillis
    }

    // MARK: Queries

    /// The quota that applies to `tenant`; 0 means unlimited.
    public func quotaBytes(forTenant tenant: String) -> UInt64 {
        tenantQuotaBytes[tenant] ?? defaultTenantQuotaBytes
    }

    /// Bytes charged to `tenant`.
    public func bytes(forTenant tenant: String) -> UInt64 {
        usage[tenant]?.bytes ?? 0
    }

    /// Charged bytes and open sequences of every tenant that has one open.
    public var usageByTenant: [String: TenantUsage] { usage }

    /// The open sequence with `sequenceID`.
    public func sequence(_ sequenceID: UInt64) -> AdmittedSequence? {
        open[sequenceID]
    }

    /// Every open sequence, ordered by id.
    public var sequences: [AdmittedSequence] {
        open.values.sorted { $0.sequenceID < $1.sequenceID }
    }

    public var sequenceCount: Int { open.count }

    /// Bytes still available under the memory limit, or nil when unlimited.
    public var availableBytes: UInt64? {
        guard memoryLimitBytes != 0 else { return nil }
        let used = Self.sum(totalBytes, reservedBytes)
        return memoryLimitBytes - min(memoryLimitBytes, used)
    }

    /// True when reports have pushed the charged bytes past the memory limit (admission never
    /// does); the coordinator should tighten budgets.
    public var isOverLimit: Bool { memoryLimitBytes != 0 && totalBytes > memoryLimitBytes }

    // MARK: Events

    /// Admits a new sequence, charging `estimatedBytes` to it until a worker reports, or refuses it.
    /// Checks, in order: the id is not open; the estimate could ever fit the tenant's quota and the
    /// memory limit; it fits now beside what the tenant and the cluster already hold.
    public mutating func admit(tenant: String, sequenceID: UInt64, estimatedBytes: UInt64) -> AdmissionDecision {
        if open[sequenceID] != nil {
            return .refused(.duplicateSequence(sequenceID: sequenceID), retryAfterMillis: 0)
        }
        let quota = quotaBytes(forTenant: tenant)
        if quota != 0, estimatedBytes > quota {
            return .refused(
                .exceedsTenantQuota(tenant: tenant, requestedBytes: estimatedBytes, quotaBytes: quota),
                retryAfterMillis: 0
            )
        }
        if memoryLimitBytes != 0, estimatedBytes > memoryLimitBytes {
            return .refused(
                .exceedsMemoryLimit(requestedBytes: estimatedBytes, limitBytes: memoryLimitBytes),
                retryAfterMillis: 0
            )
        }
        let tenantBytes = bytes(forTenant: tenant)
        if quota != 0, Self.sum(tenantBytes, estimatedBytes) > quota {
            return .refused(
                .tenantQuotaInUse(
                    tenant: tenant,
                    requestedBytes: estimatedBytes,
                    usedBytes: tenantBytes,
                    quotaBytes: quota
                ),
                retryAfterMillis: retryAfterMillis
            )
        }
        let used = Self.sum(totalBytes, reservedBytes)
        if memoryLimitBytes != 0, Self.sum(used, estimatedBytes) > memoryLimitBytes {
            return .refused(
                .memoryInUse(requestedBytes: estimatedBytes, usedBytes: used, limitBytes: memoryLimitBytes),
                retryAfterMillis: retryAfterMillis
            )
        }
        open[sequenceID] = AdmittedSequence(
            tenant: tenant,
            sequenceID: sequenceID,
            estimatedBytes: estimatedBytes,
            reportedBytes: nil
        )
        usage[tenant, default: TenantUsage()].sequences += 1
        charge(tenant: tenant, from: 0, to: estimatedBytes)
        return .admitted
    }

    /// A worker-reported total for a sequence (K/V bytes of one replica of every shard). Replaces
    /// the previous charge, whatever it was; may push the cluster over its limit (see `isOverLimit`).
    public mutating func record(sequenceID: UInt64, kvBytes: UInt64) -> AccountingOutcome {
        guard var sequence = open[sequenceID] else { return .unknownSequence(sequenceID: sequenceID) }
        let previous = sequence.chargedBytes
        sequence.reportedBytes = kvBytes
        open[sequenceID] = sequence
        charge(tenant: sequence.tenant, from: previous, to: kvBytes)
        return .recorded(previousBytes: previous, bytes: kvBytes)
    }

    /// Re-admits a sequence that a restarted coordinator learned from the workers, charging what they
    /// report; never refused, since the bytes are already held. For an open sequence it is `record`.
    public mutating func restore(tenant: String, sequenceID: UInt64, kvBytes: UInt64) {
        if open[sequenceID] == nil {
            open[sequenceID] = AdmittedSequence(
                tenant: tenant,
                sequenceID: sequenceID,
                estimatedBytes: 0,
                reportedBytes: nil
            )
            usage[tenant, default: TenantUsage()].sequences += 1
        }
        _ = record(sequenceID: sequenceID, kvBytes: kvBytes)
    }

    /// Closes a sequence and frees its charge.
    public mutating func release(sequenceID: UInt64) -> ReleaseOutcome {
        guard let sequence = open.removeValue(forKey: sequenceID) else {
            return .unknownSequence(sequenceID: sequenceID)
        }
        charge(tenant: sequence.tenant, from: sequence.chargedBytes, to: 0)
        usage[sequence.tenant]?.sequences -= 1
        if usage[sequence.tenant]?.sequences == 0 { usage[sequence.tenant] = nil }
        return .released(sequence)
    }

    private mutating func charge(tenant: String, from old: UInt64, to new: UInt64) {
        // Totals are sums of charges; the arithmetic saturates so that absurd reports near
        // `UInt64.max` distort the totals instead of trapping.
        totalBytes = Self.sum(Self.difference(totalBytes, old), new)
        let tenantBytes = usage[tenant, default: TenantUsage()].bytes
        usage[tenant, default: TenantUsage()].bytes = Self.sum(Self.difference(tenantBytes, old), new)
    }

    private static func difference(_ a: UInt64, _ b: UInt64) -> UInt64 {
        a > b ? a - b : 0
    }

    /// Saturating addition.
    private static func sum(_ a: UInt64, _ b: UInt64) -> UInt64 {
        let (result, overflow) = a.addingReportingOverflow(b)
        return overflow ? .max : result
    }
}

/// An open sequence as accounted.
public struct AdmittedSequence: Sendable, Hashable {
    public var tenant: String
    public var sequenceID: UInt64
    /// The estimate given at admission.
    public var estimatedBytes: UInt64
    /// The latest reported total, nil until the first report.
    public var reportedBytes: UInt64?

    public init(tenant: String, sequenceID: UInt64, estimatedBytes: UInt64, reportedBytes: UInt64?) {
        self.tenant = tenant
        self.sequenceID = sequenceID
        self.estimatedBytes = estimatedBytes
        self.reportedBytes = reportedBytes
    }

    /// What the sequence is charged: the reported total once there is one, else the estimate.
    public var chargedBytes: UInt64 { reportedBytes ?? estimatedBytes }
}

/// One tenant's charged bytes and open sequences.
public struct TenantUsage: Sendable, Hashable {
    public var bytes: UInt64
    public var sequences: Int

    public init(bytes: UInt64 = 0, sequences: Int = 0) {
        self.bytes = bytes
        self.sequences = sequences
    }
}

/// The answer to `admit`.
public enum AdmissionDecision: Sendable, Hashable {
    case admitted
    /// Refused. `retryAfterMillis` is the wire's retry hint: non-zero when retrying later may
    /// succeed, 0 when it never will (a duplicate id, a request larger than the limit itself).
    case refused(AdmissionRefusal, retryAfterMillis: UInt32)

    public var isAdmitted: Bool { self == .admitted }
}

/// Why a sequence was refused.
public enum AdmissionRefusal: Sendable, Hashable, CustomStringConvertible {
    /// A sequence with this id is already open (for this or another tenant).
    case duplicateSequence(sequenceID: UInt64)
    /// The estimate alone is larger than the tenant's quota: it can never be admitted.
    case exceedsTenantQuota(tenant: String, requestedBytes: UInt64, quotaBytes: UInt64)
    /// The estimate alone is larger than the cluster's memory limit: it can never be admitted.
    case exceedsMemoryLimit(requestedBytes: UInt64, limitBytes: UInt64)
    /// The tenant's open sequences leave too little of its quota.
    case tenantQuotaInUse(tenant: String, requestedBytes: UInt64, usedBytes: UInt64, quotaBytes: UInt64)
    /// The cluster's open sequences leave too little memory.
    case memoryInUse(requestedBytes: UInt64, usedBytes: UInt64, limitBytes: UInt64)

    /// True when the same request may be admitted later.
    public var isRetryable: Bool {
        switch self {
        case .tenantQuotaInUse, .memoryInUse: true
        case .duplicateSequence, .exceedsTenantQuota, .exceedsMemoryLimit: false
        }
    }

    public var description: String {
        switch self {
        case .duplicateSequence(let id):
            "sequence \(id) is already open; sequence ids must be unique among open sequences"
        case .exceedsTenantQuota(let tenant, let requested, let quota):
            "sequence needs \(requested) bytes, more than tenant '\(tenant)''s whole quota of \(quota) bytes"
        case .exceedsMemoryLimit(let requested, let limit):
            "sequence needs \(requested) bytes, more than the cluster's whole memory limit of \(limit) bytes"
        case .tenantQuotaInUse(let tenant, let requested, let used, let quota):
            "tenant '\(tenant)' holds \(used) of its \(quota) bytes; \(requested) more do not fit"
        case .memoryInUse(let requested, let used, let limit):
            "the cluster holds \(used) of its \(limit) bytes; \(requested) more do not fit"
        }
    }
}

/// The answer to `record`.
public enum AccountingOutcome: Sendable, Hashable {
    case recorded(previousBytes: UInt64, bytes: UInt64)
    /// No open sequence has this id (never admitted, or released): the report is ignored.
    case unknownSequence(sequenceID: UInt64)
}

/// The answer to `release`.
public enum ReleaseOutcome: Sendable, Hashable {
    /// The sequence as it was, with the bytes its release freed (`chargedBytes`).
    case released(AdmittedSequence)
    /// No open sequence has this id (never admitted, or already released).
    case unknownSequence(sequenceID: UInt64)
}
