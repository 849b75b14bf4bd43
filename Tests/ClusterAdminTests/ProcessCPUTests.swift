import ClusterAdmin
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite struct ProcessCPUTests {
    /// bench-wire divides these readings by frames: a reading that stood still, or counted another
    /// process, would report a cost the work did not have.
    @Test func readingsGrowWithWorkDoneAndNameTheProcessAsked() throws {
        let thread = try #require(ProcessCPU.threadSeconds())
        let own = try #require(ProcessCPU.ownSeconds())
        let byPID = try #require(ProcessCPU.seconds(pid: getpid()))
        // 50 ms of arithmetic on this thread, whatever the scheduler does meanwhile.
        var sum: UInt64 = 0
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        while try #require(ProcessCPU.threadSeconds()) - thread < 0.05 {
            for _ in 0..<10_000 {
                x ^= x << 13
                x ^= x >> 7
                x ^= x << 17
                sum &+= x
            }
        }
        #expect(sum != 0)
        #expect(try #require(ProcessCPU.ownSeconds()) - own >= 0.049)
        #expect(try #require(ProcessCPU.seconds(pid: getpid())) - byPID >= 0.049)
        #expect(byPID > 0)
    }

    @Test func aProcessThatIsGoneHasNoReading() {
        // Above the kernel's largest pid (pid_max is at most 2^22).
        #expect(ProcessCPU.seconds(pid: 1 << 23) == nil)
    }
}
