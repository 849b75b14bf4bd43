import ClusterAdmin
import Logging
import Testing

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// `/…/Tests/ClusterAdminTests/<this file>` → the package root.
private let packageRoot: String = {
    var components = #filePath.split(separator: "/", omittingEmptySubsequences: false)
    components.removeLast(3)
    return components.joined(separator: "/")
}()

@Suite("ClusterConfiguration")
struct ClusterConfigurationTests {
    @Test("defaults are the documented values and valid")
    func defaults() throws {
        let configuration = ClusterConfiguration.defaults
        #expect(configuration.coordinator.host == "127.0.0.1")
        #expect(configuration.coordinator.port == 0)
        #expect(configuration.coordinator.adminPort == 0)
        #expect(configuration.coordinator.heartbeatIntervalMillis == 250)
        #expect(configuration.coordinator.suspectAfterMillis == 1000)
        #expect(configuration.coordinator.deadAfterMillis == 3000)
        #expect(configuration.coordinator.heartbeatInterval == .milliseconds(250))
        #expect(configuration.coordinator.memory.limitBytes == nil, "absent: the coordinator's machine default")
        #expect(configuration.coordinator.memory.tenantQuotas.isEmpty)
        #expect(configuration.coordinator.memory.floorRatio == 0.02)
        #expect(configuration.coordinator.replication == 2)
        #expect(configuration.worker.host == "127.0.0.1")
        #expect(configuration.worker.port == 0)
        #expect(configuration.worker.adminPort == 0)
        #expect(configuration.worker.maxFrameBytes == 64 * 1024 * 1024)
        #expect(configuration.worker.storage == .f32)
        #expect(configuration.worker.memoryCapacityBytes == 8 * 1024 * 1024 * 1024)
        #expect(configuration.cluster.workers == 3)
        #expect(configuration.cluster.readyTimeoutSeconds == 60)
        #expect(configuration.cluster.maxLifetimeSeconds == 0)
        #expect(configuration.cluster.maxLifetime == nil)
        #expect(configuration.cluster.logLevel == .info)
        try configuration.validate()
    }

    @Test(
        "an empty document, comments only, null and empty sections give the defaults",
        arguments: ["", "# nothing here\n", "---\n", "~\n", "coordinator:\nworker: ~\ncluster: null\n", "worker: {}\n"]
    )
    func emptyDocuments(yaml: String) throws {
        #expect(try ClusterConfiguration.decode(yaml: yaml) == .defaults)
    }

    @Test("a partial file overrides only what it names")
    func partialFile() throws {
        let configuration = try ClusterConfiguration.decode(
            yaml: """
                coordinator:
                  port: 7100
                  memory:
                    tenantQuotas:
                      alice: 1048576
                      bob: 2097152
                worker:
                  storage: f16
                cluster:
                  logLevel: debug
                """
        )
        var expected = ClusterConfiguration.defaults
        expected.coordinator.port = 7100
        expected.coordinator.memory.tenantQuotas = ["alice": 1_048_576, "bob": 2_097_152]
        expected.worker.storage = .f16
        expected.cluster.logLevel = .debug
        #expect(configuration == expected)
    }

    @Test("values round-trip through yamlString()")
    func roundTrip() throws {
        var configuration = ClusterConfiguration.defaults
        configuration.coordinator.memory = .init(limitBytes: 1 << 34, tenantQuotas: ["t1": 1 << 30], floorRatio: 0.1)
        configuration.worker.storage = .f16
        configuration.cluster = .init(workers: 5, readyTimeoutSeconds: 9, maxLifetimeSeconds: 120, logLevel: .warning)
        let yaml = try configuration.yamlString()
        #expect(try ClusterConfiguration.decode(yaml: yaml) == configuration)
    }

    struct InvalidCase: Sendable, CustomTestStringConvertible {
        var yaml: String
        var fieldPath: String
        var message: String
        var line: Int?
        var testDescription: String { self.fieldPath }
    }

    static let invalidCases: [InvalidCase] = [
        .init(
            yaml: "coordinator:\n  host: ''\n",
            fieldPath: "coordinator.host",
            message: #"coordinator.host must be a host name or IP address, got """#,
            line: 2
        ),
        .init(
            yaml: "coordinator:\n  port: 70000\n",
            fieldPath: "coordinator.port",
            message: "coordinator.port must be in 0...65535, got 70000",
            line: 2
        ),
        .init(
            yaml: "coordinator:\n  adminPort: -1\n",
            fieldPath: "coordinator.adminPort",
            message: "coordinator.adminPort must be in 0...65535, got -1",
            line: 2
        ),
        .init(
            yaml: "coordinator:\n  port: 7000\n  adminPort: 7000\n",
            fieldPath: "coordinator.adminPort",
            message: "coordinator.adminPort must differ from coordinator.port (7000), got 7000",
            line: 3
        ),
        .init(
            yaml: "coordinator:\n  heartbeatIntervalMillis: 5\n",
            fieldPath: "coordinator.heartbeatIntervalMillis",
            message: "coordinator.heartbeatIntervalMillis must be in 10...60000, got 5",
            line: 2
        ),
        .init(
            yaml: "coordinator:\n  suspectAfterMillis: 5\n",
            fieldPath: "coordinator.suspectAfterMillis",
            message: "coordinator.suspectAfterMillis must be in 10...3600000, got 5",
            line: 2
        ),
        .init(
            yaml: "coordinator:\n  suspectAfterMillis: 250\n",
            fieldPath: "coordinator.suspectAfterMillis",
            message:
                "coordinator.suspectAfterMillis must be greater than coordinator.heartbeatIntervalMillis (250), "
                + "got 250",
            line: 2
        ),
        .init(
            yaml: "coordinator:\n  deadAfterMillis: 4000000\n",
            fieldPath: "coordinator.deadAfterMillis",
            message: "coordinator.deadAfterMillis must be in 10...3600000, got 4000000",
            line: 2
        ),
        .init(
            yaml: "coordinator:\n  deadAfterMillis: 900\n",
            fieldPath: "coordinator.deadAfterMillis",
            message: "coordinator.deadAfterMillis must be greater than coordinator.suspectAfterMillis (1000), got 900",
            line: 2
        ),
        .init(
            yaml: "coordinator:\n  memory:\n    floorRatio: 1.5\n",
            fieldPath: "coordinator.memory.floorRatio",
            message: "coordinator.memory.floorRatio must be in 0.0...1.0, got 1.5",
            line: 3
        ),
        .init(
            yaml: "coordinator:\n  memory:\n    floorRatio: -0.1\n",
            fieldPath: "coordinator.memory.floorRatio",
            message: "coordinator.memory.floorRatio must be in 0.0...1.0, got -0.1",
            line: 3
        ),
        .init(
            yaml: "coordinator:\n  memory:\n    tenantQuotas:\n      alice: 0\n",
            fieldPath: "coordinator.memory.tenantQuotas.alice",
            message: "coordinator.memory.tenantQuotas.alice must be at least 1, got 0",
            line: 4
        ),
        .init(
            yaml: "coordinator:\n  memory:\n    limitBytes: 100\n    tenantQuotas: {alice: 50, bob: 101}\n",
            fieldPath: "coordinator.memory.tenantQuotas.bob",
            message: "coordinator.memory.tenantQuotas.bob must be in 1...coordinator.memory.limitBytes (100), got 101",
            line: 4
        ),
        .init(
            yaml: "coordinator:\n  replication: 0\n",
            fieldPath: "coordinator.replication",
            message: "coordinator.replication must be in 1...16, got 0",
            line: 2
        ),
        .init(
            yaml: "coordinator:\n  replication: 4\n",
            fieldPath: "coordinator.replication",
            message: "coordinator.replication must be at most cluster.workers (3), got 4",
            line: 2
        ),
        .init(
            yaml: "worker:\n  host: 'a b'\n",
            fieldPath: "worker.host",
            message: #"worker.host must be a host name or IP address, got "a b""#,
            line: 2
        ),
        .init(
            yaml: "worker:\n  port: 65536\n",
            fieldPath: "worker.port",
            message: "worker.port must be in 0...65535, got 65536",
            line: 2
        ),
        .init(
            yaml: "worker:\n  adminPort: 99999\n",
            fieldPath: "worker.adminPort",
            message: "worker.adminPort must be in 0...65535, got 99999",
            line: 2
        ),
        .init(
            yaml: "worker:\n  port: 9000\n  adminPort: 9000\n",
            fieldPath: "worker.adminPort",
            message: "worker.adminPort must differ from worker.port (9000), got 9000",
            line: 3
        ),
        .init(
            yaml: "worker:\n  maxFrameBytes: 12\n",
            fieldPath: "worker.maxFrameBytes",
            message: "worker.maxFrameBytes must be in 1024...1073741824, got 12",
            line: 2
        ),
        .init(
            yaml: "worker:\n  memoryCapacityBytes: 12\n",
            fieldPath: "worker.memoryCapacityBytes",
            message: "worker.memoryCapacityBytes must be at least 1048576, got 12",
            line: 2
        ),
        .init(
            yaml: "worker:\n  storage: f8\n",
            fieldPath: "worker.storage",
            message: #"worker.storage must be one of f32, f16, got "f8""#,
            line: 2
        ),
        .init(
            yaml: "cluster:\n  workers: 0\n",
            fieldPath: "cluster.workers",
            message: "cluster.workers must be in 1...256, got 0",
            line: 2
        ),
        .init(
            yaml: "cluster:\n  readyTimeoutSeconds: 0\n",
            fieldPath: "cluster.readyTimeoutSeconds",
            message: "cluster.readyTimeoutSeconds must be in 1...3600, got 0",
            line: 2
        ),
        .init(
            yaml: "cluster:\n  maxLifetimeSeconds: -1\n",
            fieldPath: "cluster.maxLifetimeSeconds",
            message: "cluster.maxLifetimeSeconds must be at least 0 (0 = unlimited), got -1",
            line: 2
        ),
        .init(
            yaml: "cluster:\n  logLevel: loud\n",
            fieldPath: "cluster.logLevel",
            message:
                #"cluster.logLevel must be one of trace, debug, info, notice, warning, error, critical, got "loud""#,
            line: 2
        ),
        // Wrong types.
        .init(
            yaml: "worker:\n  port: abc\n",
            fieldPath: "worker.port",
            message: #"worker.port must be an integer, got "abc""#,
            line: 2
        ),
        .init(
            yaml: "worker:\n  memoryCapacityBytes: -5\n",
            fieldPath: "worker.memoryCapacityBytes",
            message: #"worker.memoryCapacityBytes must be a non-negative integer, got "-5""#,
            line: 2
        ),
        .init(
            yaml: "coordinator:\n  memory:\n    floorRatio: lots\n",
            fieldPath: "coordinator.memory.floorRatio",
            message: #"coordinator.memory.floorRatio must be a number, got "lots""#,
            line: 3
        ),
        .init(
            yaml: "coordinator:\n  host: [a, b]\n",
            fieldPath: "coordinator.host",
            message: "coordinator.host must be a single value, got a list",
            line: 2
        ),
        .init(
            yaml: "coordinator: [1, 2]\n",
            fieldPath: "coordinator",
            message: "coordinator must be a mapping, got a list",
            line: 1
        ),
        .init(
            yaml: "coordinator:\n  memory:\n    tenantQuotas: [a]\n",
            fieldPath: "coordinator.memory.tenantQuotas",
            message: "coordinator.memory.tenantQuotas must be a mapping, got a list",
            line: 3
        ),
    ]

    @Test("invalid values name the field path, the allowed values and the line", arguments: invalidCases)
    func invalidValue(_ invalid: InvalidCase) throws {
        let error = try #require(throws: ClusterAdminError.self) {
            try ClusterConfiguration.decode(yaml: invalid.yaml, file: "test.yaml")
        }
        #expect(error.code == .invalidValue)
        #expect(error.fieldPath == invalid.fieldPath)
        #expect(error.message == invalid.message)
        #expect(error.file == "test.yaml")
        #expect(error.line == invalid.line)
        if let line = invalid.line {
            #expect(error.description == "test.yaml:\(line): \(invalid.message)")
        }
    }

    @Test("a root that is not a mapping is rejected")
    func rootNotMapping() throws {
        let error = try #require(throws: ClusterAdminError.self) {
            try ClusterConfiguration.decode(yaml: "- 1\n- 2\n")
        }
        #expect(error.code == .invalidValue)
        #expect(error.message == "the configuration must be a mapping, got a list")
    }

    @Test("validate() checks values set in code, e.g. after merging CLI flags")
    func validateInCode() throws {
        var configuration = ClusterConfiguration.defaults
        configuration.worker.maxFrameBytes = 12
        let error = try #require(throws: ClusterAdminError.self) { try configuration.validate() }
        #expect(error.description == "worker.maxFrameBytes must be in 1024...1073741824, got 12")
        #expect(error.fieldPath == "worker.maxFrameBytes")

        // decode(validate: false) leaves validation to the caller.
        let unvalidated = try ClusterConfiguration.decode(yaml: "cluster:\n  workers: 0\n", validate: false)
        #expect(unvalidated.cluster.workers == 0)
        #expect(throws: ClusterAdminError.self) { try unvalidated.validate() }
    }

    @Test(
        "an unknown key is an error naming it and the allowed keys",
        arguments: [
            (
                "verbose: true\n", "verbose",
                "unknown key verbose; the top level allows: coordinator, worker, cluster, network",
                1
            ),
            (
                "worker:\n  storage: f16\n  maxFrameByte: 10\n", "worker.maxFrameByte",
                "unknown key worker.maxFrameByte; worker allows: host, port, adminPort, maxFrameBytes, storage, "
                    + "memoryCapacityBytes, faults",
                3
            ),
            (
                "coordinator:\n  memory:\n    limit: 1\n", "coordinator.memory.limit",
                "unknown key coordinator.memory.limit; coordinator.memory allows: limitBytes, tenantQuotas, "
                    + "floorRatio",
                3
            ),
            (
                "coordinator:\n  heartbeat: 1\n", "coordinator.heartbeat",
                "unknown key coordinator.heartbeat; coordinator allows: host, port, adminPort, "
                    + "heartbeatIntervalMillis, suspectAfterMillis, deadAfterMillis, memory, replication, faults",
                2
            ),
            (
                "cluster:\n  logLevel: info\n  workerCount: 2\n", "cluster.workerCount",
                "unknown key cluster.workerCount; cluster allows: workers, readyTimeoutSeconds, maxLifetimeSeconds, "
                    + "logLevel",
                3
            ),
        ]
    )
    func unknownKey(yaml: String, path: String, message: String, line: Int) throws {
        let error = try #require(throws: ClusterAdminError.self) {
            try ClusterConfiguration.decode(yaml: yaml, file: "x.yaml")
        }
        #expect(error.code == .unknownKey)
        #expect(error.fieldPath == path)
        #expect(error.message == message)
        #expect(error.line == line)
    }

    @Test("a YAML syntax error reports the line")
    func syntaxError() throws {
        let error = try #require(throws: ClusterAdminError.self) {
            try ClusterConfiguration.decode(yaml: "coordinator:\n  port: 1\n  host: [127.0.0.1\n", file: "bad.yaml")
        }
        #expect(error.code == .malformedYAML)
        #expect(error.file == "bad.yaml")
        #expect(error.line != nil)
        #expect(error.description.hasPrefix("bad.yaml:\(error.line ?? -1): invalid YAML: "))
    }

    @Test("tab indentation is a syntax error with a line")
    func tabIndentation() throws {
        let error = try #require(throws: ClusterAdminError.self) {
            try ClusterConfiguration.decode(yaml: "worker:\n\tport: 1\n")
        }
        #expect(error.code == .malformedYAML)
        #expect(error.line == 2)
    }

    @Test("a missing file is reported with its path")
    func missingFile() throws {
        let path = "/nonexistent-tessera-dir/cluster.yaml"
        let error = try #require(throws: ClusterAdminError.self) { try ClusterConfiguration.load(path: path) }
        #expect(error.code == .fileNotReadable)
        #expect(error.file == path)
        #expect(error.description == "\(path): cannot read configuration file: no such file")
    }

    @Test("load(path:) reports errors in a file with the file's path and line")
    func loadReportsPathAndLine() throws {
        let directory = FileManager.default.temporaryDirectory.appending(
            path: "tessera-admin-\(UInt64.random(in: 0...UInt64.max))"
        )
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }

        let invalid = directory.appending(path: "invalid.yaml")
        try Data("# a comment\nworker:\n  maxFrameBytes: 12\n".utf8).write(to: invalid)
        let error = try #require(throws: ClusterAdminError.self) { try ClusterConfiguration.load(path: invalid.path) }
        #expect(error.description == "\(invalid.path):3: worker.maxFrameBytes must be in 1024...1073741824, got 12")

        let malformed = directory.appending(path: "malformed.yaml")
        try Data("worker:\n  port: 1\n port: 2\n".utf8).write(to: malformed)
        let syntax = try #require(throws: ClusterAdminError.self) {
            try ClusterConfiguration.load(path: malformed.path)
        }
        #expect(syntax.code == .malformedYAML)
        #expect(syntax.file == malformed.path)
        #expect(syntax.line == 3)

        let valid = directory.appending(path: "valid.yaml")
        try Data("cluster:\n  workers: 2\n".utf8).write(to: valid)
        #expect(try ClusterConfiguration.load(path: valid.path).cluster.workers == 2)
    }

    @Test("cluster/local.yaml is exactly the defaults")
    func shippedLocal() throws {
        let configuration = try ClusterConfiguration.load(path: packageRoot + "/cluster/local.yaml")
        #expect(configuration == .defaults)
    }

    @Test("cluster/large.yaml: 8 workers, a 16 GiB limit, f16 storage")
    func shippedLarge() throws {
        let configuration = try ClusterConfiguration.load(path: packageRoot + "/cluster/large.yaml")
        #expect(configuration.cluster.workers == 8)
        #expect(configuration.coordinator.memory.limitBytes == 16 << 30)
        #expect(configuration.worker.storage == .f16)
        #expect(configuration.worker.storage.bytesPerElement == 2)
        try configuration.validate()
    }
}
