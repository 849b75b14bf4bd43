import ClusterState
import Testing

@Suite struct AdmissionTests {
    @Test func unlimitedAdmitsAnything() {
        var admission = Admission()
        #expect(admission.admit(tenant: "t", sequenceID: 1, estimatedBytes: .max / 2) == .admitted)
        #expect(admission.admit(tenant: "t", sequenceID: 2, estimatedBytes: .max / 2).isAdmitted)
        #expect(admission.availableBytes == nil && !admission.isOverLimit)
        #expect(admission.sequenceCount == 2)
    }

    @Test func theMemoryLimitBounds() {
        var admission = Admission(memoryLimitBytes: 1000, retryAfterMillis: 40)
        #expect(admission.admit(tenant: "a", sequenceID: 1, estimatedBytes: 600) == .admitted)
        #expect(admission.admit(tenant: "b", sequenceID: 2, estimatedBytes: 400) == .admitted, "exactly at the limit")
        #expect(admission.availableBytes == 0)
        let refused = admission.admit(tenant: "b", sequenceID: 3, estimatedBytes: 1)
        #expect(
            refused
                == .refused(.memoryInUse(requestedBytes: 1, usedBytes: 1000, limitBytes: 1000), retryAfterMillis: 40)
        )
        if case .refused(let reason, _) = refused {
            #expect(reason.isRetryable)
            #expect(reason.description == "the cluster holds 1000 of its 1000 bytes; 1 more do not fit")
        }
        // Never fits: not retryable.
        let never = admission.admit(tenant: "c", sequenceID: 4, estimatedBytes: 1001)
        #expect(never == .refused(.exceedsMemoryLimit(requestedBytes: 1001, limitBytes: 1000), retryAfterMillis: 0))
        // A refusal charges nothing; a release makes room.
        #expect(admission.totalBytes == 1000 && admission.sequenceCount == 2 && admission.sequence(3) == nil)
        #expect(
            admission.release(sequenceID: 2)
                == .released(.init(tenant: "b", sequenceID: 2, estimatedBytes: 400, reportedBytes: nil))
        )
        #expect(admission.admit(tenant: "b", sequenceID: 3, estimatedBytes: 400) == .admitted)
    }

    @Test func bytesReservedForADeadWorkersCopiesAreNotAdmittedOver() {
        var admission = Admission(memoryLimitBytes: 1000)
        #expect(admission.admit(tenant: "a", sequenceID: 1, estimatedBytes: 600) == .admitted)
        admission.reservedBytes = 300
        #expect(admission.availableBytes == 100)
        #expect(
            admission.admit(tenant: "a", sequenceID: 2, estimatedBytes: 200)
                == .refused(.memoryInUse(requestedBytes: 200, usedBytes: 900, limitBytes: 1000), retryAfterMillis: 250)
        )
        admission.reservedBytes = 0
        #expect(admission.admit(tenant: "a", sequenceID: 2, estimatedBytes: 200) == .admitted)
        #expect(admission.totalBytes == 800, "a reservation is not a charge")
    }

    @Test func tenantQuotas() {
        var admission = Admission(tenantQuotaBytes: ["small": 100], defaultTenantQuotaBytes: 500)
        #expect(admission.quotaBytes(forTenant: "small") == 100 && admission.quotaBytes(forTenant: "other") == 500)
        #expect(admission.admit(tenant: "small", sequenceID: 1, estimatedBytes: 60) == .admitted)
        #expect(
            admission.admit(tenant: "small", sequenceID: 2, estimatedBytes: 50)
                == .refused(
                    .tenantQuotaInUse(tenant: "small", requestedBytes: 50, usedBytes: 60, quotaBytes: 100),
                    retryAfterMillis: 250
                )
        )
        #expect(
            admission.admit(tenant: "small", sequenceID: 2, estimatedBytes: 101)
                == .refused(
                    .exceedsTenantQuota(tenant: "small", requestedBytes: 101, quotaBytes: 100),
                    retryAfterMillis: 0
                )
        )
        // Another tenant is not affected by small's quota, only by its own (the default).
        #expect(admission.admit(tenant: "big", sequenceID: 2, estimatedBytes: 500) == .admitted)
        #expect(admission.admit(tenant: "big", sequenceID: 3, estimatedBytes: 1).isAdmitted == false)
        #expect(admission.bytes(forTenant: "small") == 60 && admission.bytes(forTenant: "big") == 500)
        #expect(
            admission.usageByTenant == [
                "small": TenantUsage(bytes: 60, sequences: 1), "big": TenantUsage(bytes: 500, sequences: 1),
            ]
        )
        // Quotas can change at run time.
        admission.tenantQuotaBytes["small"] = 0
        #expect(admission.admit(tenant: "small", sequenceID: 4, estimatedBytes: 10_000) == .admitted)
    }

    @Test func aTenantQuotaIsCheckedBeforeTheClusterLimit() {
        var admission = Admission(memoryLimitBytes: 100, tenantQuotaBytes: ["t": 50])
        #expect(admission.admit(tenant: "u", sequenceID: 1, estimatedBytes: 90).isAdmitted)
        let decision = admission.admit(tenant: "t", sequenceID: 2, estimatedBytes: 60)
        #expect(
            decision
                == .refused(.exceedsTenantQuota(tenant: "t", requestedBytes: 60, quotaBytes: 50), retryAfterMillis: 0)
        )
    }

    @Test func duplicateSequenceIDsAreRefused() {
        var admission = Admission()
        #expect(admission.admit(tenant: "a", sequenceID: 7, estimatedBytes: 10).isAdmitted)
        let same = admission.admit(tenant: "a", sequenceID: 7, estimatedBytes: 10)
        let other = admission.admit(tenant: "b", sequenceID: 7, estimatedBytes: 10)
        #expect(same == .refused(.duplicateSequence(sequenceID: 7), retryAfterMillis: 0))
        #expect(other == same)
        #expect(AdmissionRefusal.duplicateSequence(sequenceID: 7).description.contains("already open"))
        #expect(!AdmissionRefusal.duplicateSequence(sequenceID: 7).isRetryable)
        #expect(admission.totalBytes == 10 && admission.sequence(7)?.tenant == "a")
        // Once released, the id may be used again.
        _ = admission.release(sequenceID: 7)
        #expect(admission.admit(tenant: "b", sequenceID: 7, estimatedBytes: 10).isAdmitted)
    }

    @Test func reportsReplaceTheEstimate() {
        var admission = Admission(memoryLimitBytes: 1000)
        #expect(admission.admit(tenant: "a", sequenceID: 1, estimatedBytes: 800).isAdmitted)
        #expect(admission.record(sequenceID: 1, kvBytes: 300) == .recorded(previousBytes: 800, bytes: 300))
        #expect(admission.totalBytes == 300 && admission.bytes(forTenant: "a") == 300)
        #expect(admission.sequence(1)?.chargedBytes == 300 && admission.sequence(1)?.estimatedBytes == 800)
        // Compression freed room for another.
        #expect(admission.admit(tenant: "b", sequenceID: 2, estimatedBytes: 700).isAdmitted)
        // Decode growth may push past the limit; admission reports it and refuses newcomers.
        #expect(admission.record(sequenceID: 1, kvBytes: 450) == .recorded(previousBytes: 300, bytes: 450))
        #expect(admission.isOverLimit && admission.availableBytes == 0 && admission.totalBytes == 1150)
        #expect(!admission.admit(tenant: "c", sequenceID: 3, estimatedBytes: 0).isAdmitted)
        #expect(admission.record(sequenceID: 99, kvBytes: 1) == .unknownSequence(sequenceID: 99))
        #expect(admission.totalBytes == 1150)
    }

    @Test func releaseFreesAndReportsUnknownIDs() {
        var admission = Admission()
        #expect(admission.admit(tenant: "a", sequenceID: 1, estimatedBytes: 100).isAdmitted)
        #expect(admission.admit(tenant: "a", sequenceID: 2, estimatedBytes: 50).isAdmitted)
        _ = admission.record(sequenceID: 1, kvBytes: 70)
        let released = admission.release(sequenceID: 1)
        #expect(released == .released(.init(tenant: "a", sequenceID: 1, estimatedBytes: 100, reportedBytes: 70)))
        #expect(admission.totalBytes == 50 && admission.usageByTenant["a"] == TenantUsage(bytes: 50, sequences: 1))
        #expect(admission.release(sequenceID: 1) == .unknownSequence(sequenceID: 1))
        #expect(admission.release(sequenceID: 42) == .unknownSequence(sequenceID: 42))
        _ = admission.release(sequenceID: 2)
        #expect(admission.totalBytes == 0 && admission.usageByTenant.isEmpty && admission.sequences.isEmpty)
    }

    /// Random admissions, reports and releases against a reference model: totals always equal the
    /// sum of the charges, admission never exceeds a limit, and decisions match the rules.
    @Test(arguments: UInt64(1)...12)
    func matchesAReferenceModel(seed: UInt64) {
        var generator = SeededGenerator(seed: seed)
        let limit = UInt64.random(in: 500...5000, using: &generator)
        let quotas: [String: UInt64] = ["a": limit / 2, "b": 0]
        var admission = Admission(memoryLimitBytes: limit, tenantQuotaBytes: quotas, defaultTenantQuotaBytes: limit / 3)
        var charges: [UInt64: (tenant: String, bytes: UInt64)] = [:]
        for step in 0..<500 {
            let id = UInt64.random(in: 0..<40, using: &generator)
            let tenant = ["a", "b", "c"].randomElement(using: &generator)!
            switch Int.random(in: 0..<3, using: &generator) {
            case 0:
                let bytes = UInt64.random(in: 0...(limit / 4), using: &generator)
                let decision = admission.admit(tenant: tenant, sequenceID: id, estimatedBytes: bytes)
                let used = charges.values.reduce(0) { $0 + $1.bytes }
                let tenantUsed = charges.values.filter { $0.tenant == tenant }.reduce(0) { $0 + $1.bytes }
                let quota = quotas[tenant] ?? limit / 3
                let fits = charges[id] == nil && used + bytes <= limit && (quota == 0 || tenantUsed + bytes <= quota)
                #expect(decision.isAdmitted == fits, "seed \(seed) step \(step): \(decision)")
                if fits { charges[id] = (tenant, bytes) }
            case 1:
                let bytes = UInt64.random(in: 0...(limit / 3), using: &generator)
                let outcome = admission.record(sequenceID: id, kvBytes: bytes)
                if let previous = charges[id] {
                    #expect(
                        outcome == .recorded(previousBytes: previous.bytes, bytes: bytes),
                        "seed \(seed) step \(step)"
                    )
                    charges[id]!.bytes = bytes
                } else {
                    #expect(outcome == .unknownSequence(sequenceID: id), "seed \(seed) step \(step)")
                }
            default:
                let outcome = admission.release(sequenceID: id)
                if charges.removeValue(forKey: id) != nil {
                    if case .released(let sequence) = outcome {
                        #expect(sequence.sequenceID == id, "seed \(seed) step \(step)")
                    } else {
                        Issue.record("seed \(seed) step \(step): \(outcome)")
                    }
                } else {
                    #expect(outcome == .unknownSequence(sequenceID: id), "seed \(seed) step \(step)")
                }
            }
            #expect(admission.totalBytes == charges.values.reduce(0) { $0 + $1.bytes }, "seed \(seed) step \(step)")
            for name in ["a", "b", "c"] {
                let expected = charges.values.filter { $0.tenant == name }.reduce(0) { $0 + $1.bytes }
                #expect(admission.bytes(forTenant: name) == expected, "seed \(seed) step \(step) tenant \(name)")
            }
            #expect(admission.sequenceCount == charges.count, "seed \(seed) step \(step)")
        }
    }
}
