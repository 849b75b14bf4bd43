import ArgumentParser
import ClusterAdmin
import ClusterTransport
import ClusterWire

/// The transport fault plan of a long-running process: set at start with `--faults`, read and changed
/// at run time through the admin endpoint (`GET`/`PUT /faults`).
struct FaultOptions: ParsableArguments {
    @Option(
        help: ArgumentHelp(
            "Inject faults into this process's connections, e.g. 'drop=1,peer=worker-2' or "
                + "'corrupt=0.02,direction=inbound,seed=7' (keys: drop, duplicate, reorder, corrupt, delay=5ms..20ms, "
                + "close-after, peer, direction, seed). Change it later with PUT /faults on the admin port.",
            valueName: "plan"
        )
    )
    var faults = "none"

    /// The injector every connection of the process consults (the identity plan unless `--faults`).
    func injector() throws -> FaultInjector {
        do { return try FaultInjector(FaultPlan(parsing: faults)) } catch {
            throw usageFailure("--faults: \(error.message)")
        }
    }

    /// The admin setting that reads and replaces the injector's plan.
    static func setting(_ injector: FaultInjector) -> [String: AdminSetting] {
        [
            "/faults": AdminSetting(
                read: { injector.plan.description },
                write: { text in
                    let plan = try FaultPlan(parsing: text)
                    try injector.update(plan)
                    return plan.description
                }
            )
        ]
    }
}
