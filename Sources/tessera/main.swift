import ArgumentParser
import NIOCore
import NIOPosix

// The serving processes and the wire benchmark run Swift concurrency on NIO's event loops rather than
// a thread pool of its own, so a request moves from the socket to its handler (or back to the
// client's task) without waking another thread at each step. Nothing that blocks runs as a task there
// (a worker's tensor work has threads of its own). The other commands keep the default pool:
// evaluations and reference computations run as tasks, and on an event loop they would hold up that
// loop's sockets.
let onEventLoops = ["worker", "coordinator", "bench-wire"]
if let command = CommandLine.arguments.dropFirst().first, onEventLoops.contains(command) {
    NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
}
// Called from an async closure so that the asynchronous `main()` is chosen: at top level Swift picks
// the synchronous one of `ParsableCommand`, which cannot run an `AsyncParsableCommand`.
let run: () async -> Void = { await Tessera.main() }
await run()
