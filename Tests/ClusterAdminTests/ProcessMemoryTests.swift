import ClusterAdmin
import Testing

@Suite struct ProcessMemoryTests {
    /// The coordinator's default memory limit comes from here; a reading that silently fell to 0 would
    /// make it unlimited.
    @Test func theDefaultLimitIsHalfOfWhatThisProcessMayUse() {
        let available = ProcessMemory.availableBytes()
        #expect(available > 256 << 20, "physical memory, or the cgroup's limit")
        #expect(ProcessMemory.defaultLimitBytes() == available / 2)
        let resident = ProcessMemory.residentBytes()
        #expect(resident > 0 && resident < available)
    }
}
