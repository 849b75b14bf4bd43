import ArgumentParser
import ClusterSecurity

#if canImport(Glibc)
import Glibc
#endif

/// How a process secures its connections: the cluster's certificates (mutual TLS), or `--insecure`.
struct SecurityOptions: ParsableArguments {
    @Option(
        name: .customLong("certs"),
        help: ArgumentHelp(
            "Folder of the cluster's certificates: ca.pem, and NAME.pem with NAME-key.pem for this process "
                + "(make them with `tessera certs`). Default: $TESSERA_CERTS, else ./certs.",
            valueName: "dir"
        )
    )
    var certificates: String?

    @Flag(
        help:
            "Plaintext connections without certificates: any peer can claim any role, node id or tenant. Logged loudly at start."
    )
    var insecure = false

    var folder: CertificateDirectory {
        CertificateDirectory(certificates ?? getenv("TESSERA_CERTS").map { String(cString: $0) } ?? "certs")
    }

    /// The process's security as the certificate `name` (its node id) in the folder.
    func security(name: String) throws -> TransportSecurity {
        if insecure {
            guard certificates == nil else { throw usageFailure("give --certs or --insecure, not both") }
            Terminal.warnInsecure()
            return .insecure
        }
        do {
            let credentials = try NodeCredentials(directory: folder, name: name)
            try credentials.checkNotRevoked()
            return .mutualTLS(credentials)
        } catch {
            throw usageFailure("\(error.message) (or run with --insecure)")
        }
    }
}

/// The security options of a command that acts as a client of a running cluster.
struct ClientSecurityOptions: ParsableArguments {
    @OptionGroup var transport: SecurityOptions

    @Option(help: "The client certificate to use from the certificate folder (its node id); it names the tenant.")
    var certName = "client"

    func security() throws -> TransportSecurity { try transport.security(name: certName) }
}
