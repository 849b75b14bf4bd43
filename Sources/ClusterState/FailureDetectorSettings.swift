/// Timing of the heartbeat failure detector. Silence is measured from a member's latest join or
/// heartbeat: after `suspectAfter` an alive member becomes suspect, after `deadAfter` it is dead.
public struct FailureDetectorSettings: Sendable, Hashable {
    /// How often workers send a heartbeat (told to them at registration).
    public var heartbeatInterval: Duration
    /// Silence after which an alive member becomes suspect.
    public var suspectAfter: Duration
    /// Silence after which a member (alive or suspect) is declared dead.
    public var deadAfter: Duration

    public init(
        heartbeatInterval: Duration = .milliseconds(250),
        suspectAfter: Duration = .seconds(1),
        deadAfter: Duration = .seconds(3)
    ) {
        self.heartbeatInterval = heartbeatInterval
        self.suspectAfter = suspectAfter
        self.deadAfter = deadAfter
    }

    /// 250 ms heartbeats, suspect after 1 s of silence, dead after 3 s.
    public static var defaults: FailureDetectorSettings { FailureDetectorSettings() }

    /// Requires `0 < heartbeatInterval < suspectAfter < deadAfter`, so that one late heartbeat does
    /// not make a member suspect and a suspect has time to recover before it is declared dead.
    public func validate() throws(ClusterStateError) {
        guard heartbeatInterval > .zero else {
            throw ClusterStateError(.invalidSetting, "heartbeatInterval must be positive, got \(heartbeatInterval)")
        }
        guard suspectAfter > heartbeatInterval else {
            throw ClusterStateError(
                .invalidSetting,
                "suspectAfter (\(suspectAfter)) must be longer than heartbeatInterval (\(heartbeatInterval))"
            )
        }
        guard deadAfter > suspectAfter else {
            throw ClusterStateError(
                .invalidSetting,
                "deadAfter (\(deadAfter)) must be longer than suspectAfter (\(suspectAfter))"
            )
        }
    }
}
