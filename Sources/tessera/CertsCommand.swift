import ArgumentParser
import ClusterSecurity
import ClusterWire

struct CertsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "certs",
        abstract: "Make a cluster's certificate authority and issue node and client certificates.",
        discussion: """
            Every connection is mutual TLS with the cluster CA as the only trust root. A certificate's \
            subject says what its holder may do: OU is the role (coordinator, worker, client), CN the \
            node id, and for clients O the tenant. A process must run as the node its certificate names. \
            Rotate a certificate by issuing it again and restarting its process; rotate the CA with a new \
            `init` and reissuing every certificate. A certificate that must stop working before it \
            expires (a lost key) is revoked: its serial goes on DIR/revoked.txt, which every process \
            of the cluster reads from its own certificate folder and checks at each handshake.

              tessera certs init --dir certs
              tessera certs issue --dir certs --role coordinator --name coordinator
              tessera certs issue --dir certs --role worker --name worker-1
              tessera certs issue --dir certs --role client --name alice --tenant alice
              tessera certs revoke --dir certs --name alice
            """,
        subcommands: [Initialize.self, Issue.self, Revoke.self]
    )

    struct Initialize: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "init",
            abstract: "Create a cluster CA: DIR/ca.pem and DIR/ca-key.pem (readable by you only)."
        )

        @Option(help: "The certificate folder.")
        var dir = "certs"

        @Option(help: "Days the CA is valid (1...36500).")
        var days = 3650

        @Flag(help: "Replace an existing CA (every certificate it issued stops being trusted).")
        var force = false

        func run() throws {
            let folder = CertificateDirectory(dir)
            guard (1...36500).contains(days) else { throw usageFailure("--days must be in 1...36500, got \(days)") }
            guard force || !folder.hasAuthority else {
                throw usageFailure("\(dir) already holds a CA; give --force to replace it")
            }
            do {
                try CertificateAuthority.create(days: days).write(to: folder)
            } catch {
                throw usageFailure(error.message)
            }
            Terminal.output("created the cluster CA in \(folder.caCertificate) (key: \(folder.caKey))\n")
        }
    }

    struct Issue: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Issue DIR/NAME.pem and DIR/NAME-key.pem, signed by the CA in DIR."
        )

        @Option(help: "The certificate folder holding the CA.")
        var dir = "certs"

        @Option(help: "The holder's role: coordinator, worker or client.")
        var role: String

        @Option(help: "The holder's node id (a worker's --node-id; a client's --cert-name).")
        var name: String

        @Option(help: "For a client: the tenant whose sequences it may reach (required for clients only).")
        var tenant: String?

        @Option(help: "Days the certificate is valid (1...36500).")
        var days = CertificateAuthority.defaultValidityDays

        func run() throws {
            guard let nodeRole = NodeRole(rawValue: role) else {
                throw usageFailure("unknown role '\(role)'; allowed: coordinator, worker, client")
            }
            guard (1...36500).contains(days) else { throw usageFailure("--days must be in 1...36500, got \(days)") }
            let folder = CertificateDirectory(dir)
            do {
                let identity = CertifiedIdentity(role: nodeRole, nodeID: name, tenant: tenant)
                try CertificateAuthority.load(from: folder).issue(identity, days: days, into: folder)
                Terminal.output("issued \(folder.certificate(name)) for \(identity), valid \(days) days\n")
            } catch {
                throw usageFailure(error.message)
            }
        }
    }

    struct Revoke: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Stop trusting DIR/NAME.pem: add its serial number to DIR/revoked.txt.",
            discussion: """
                Processes whose certificate folder holds the list refuse the certificate at every \
                handshake from then on, without a restart; connections already open stay until they \
                close. Revoke before issuing the name again (issuing replaces NAME.pem). Copy \
                revoked.txt to every host whose processes use another copy of the folder.
                """
        )

        @Option(help: "The certificate folder.")
        var dir = "certs"

        @Option(help: "The holder whose certificate DIR/NAME.pem is revoked.")
        var name: String

        func run() throws {
            let folder = CertificateDirectory(dir)
            do {
                let certificate = try folder.certificate(named: name)
                let serial = try folder.revoke(certificate, holder: name)
                Terminal.output("revoked \(folder.certificate(name)) (serial \(serial)) in \(folder.revocationList)\n")
            } catch {
                throw usageFailure(error.message)
            }
        }
    }
}
