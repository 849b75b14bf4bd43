package import ClusterWire
import FoundationEssentials
import SwiftASN1
import Synchronization
public import X509

extension CertificateDirectory {
    /// The certificates the cluster no longer trusts, one per line: the serial number in hex, then
    /// (for people) the holder and when it was revoked. `tessera certs revoke` appends to it.
    public var revocationList: String { "\(path)/revoked.txt" }

    /// Adds `certificate` (of `holder`) to the revocation list, creating it; returns its serial as
    /// written there.
    @discardableResult
    public func revoke(_ certificate: Certificate, holder: String) throws(CertificateError) -> String {
        let serial = certificate.serialNumber.hex
        var text = (try? read(revocationList, what: "the revocation list")) ?? ""
        if !text.isEmpty && !text.hasSuffix("\n") { text += "\n" }
        text += "\(serial) \(holder) revoked \(Date())\n"
        try write(text, to: revocationList, secret: false)
        return serial
    }

    /// The certificate in `NAME.pem`.
    public func certificate(named name: String) throws(CertificateError) -> Certificate {
        let file = certificate(name)
        let pem = try read(file, what: "the certificate of \(name)")
        do {
            return try Certificate(pemEncoded: pem)
        } catch {
            throw CertificateError("cannot parse \(file): \(error)")
        }
    }
}

extension Certificate.SerialNumber {
    /// Lower-case hex, two digits a byte: how the revocation list spells serials.
    var hex: String {
        let digits = Array("0123456789abcdef")
        return String(bytes.flatMap { [digits[Int($0 >> 4)], digits[Int($0 & 0xF)]] })
    }
}

/// A process's view of its folder's revocation list, read again whenever the file changes: checked
/// at each handshake, so a revocation applies to every connection made after it without restarts,
/// and as frames arrive on connections already open (`PeerCertificate.refusal`), so it ends those too.
final class RevocationList: Sendable {
    private let directory: CertificateDirectory
    private struct Loaded {
        var modified: Date?
        var serials: Set<String> = []
        /// When the file's modification time was last looked at.
        var checkedAt: ContinuousClock.Instant?
    }
    private let loaded = Mutex(Loaded())

    /// How stale the list may be when checked for a frame on an open connection: looking at the file
    /// for every frame would cost a system call each.
    static let recheckInterval = Duration.milliseconds(500)

    init(_ directory: CertificateDirectory) {
        self.directory = directory
    }

    /// Whether the list names the certificate with this serial; with `maxAge`, the list as read up to
    /// that long ago. A list that exists but cannot be read refuses every peer: failing open would
    /// let a revoked certificate back in.
    func contains(serial: String, maxAge: Duration = .zero) throws(CertificateError) -> Bool {
        let now = ContinuousClock.now
        if maxAge > .zero,
            let serials = loaded.withLock({ loaded in
                loaded.checkedAt.map { now - $0 < maxAge } == true ? loaded.serials : nil
            })
        {
            return serials.contains(serial)
        }
        let file = directory.revocationList
        let modified = (try? FileManager.default.attributesOfItem(atPath: file))?[.modificationDate] as? Date
        let serials = try loaded.withLock { (loaded) throws(CertificateError) -> Set<String> in
            defer { loaded.checkedAt = now }
            guard modified != loaded.modified else { return loaded.serials }
            var serials: Set<String> = []
            if modified != nil {
                for line in try directory.read(file, what: "the revocation list").split(separator: "\n") {
                    if let serial = line.split(separator: " ").first, !serial.hasPrefix("#") {
                        serials.insert(serial.lowercased())
                    }
                }
            }
            loaded.modified = modified
            loaded.serials = serials
            return serials
        }
        return serials.contains(serial)
    }
}

/// A peer's certificate as the handshake found it: what it says, and whether it is still trusted.
package struct PeerCertificate: Sendable {
    package let identity: CertifiedIdentity
    let serial: String
    let revocations: RevocationList

    /// The refusal that ends the connection once the certificate has been revoked (the list as read
    /// at most `RevocationList.recheckInterval` ago); nil while it is trusted.
    package func refusal() -> WireError? {
        do {
            guard try revocations.contains(serial: serial, maxAge: RevocationList.recheckInterval) else { return nil }
            return WireError(
                .permissionDenied,
                "the peer's certificate was revoked (serial \(serial)) after it connected"
            )
        } catch {
            return WireError(.permissionDenied, "the peer's certificate: \(error.message)")
        }
    }
}
