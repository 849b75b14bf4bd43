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

/// A process's view of its folder's revocation list, read again whenever the file changes (checked
/// at each handshake), so a revocation applies to every connection made after it without restarts.
/// Connections already open stay until they close.
final class RevocationList: Sendable {
    private let directory: CertificateDirectory
    private let loaded = Mutex<(modified: Date?, serials: Set<String>)>((nil, []))

    init(_ directory: CertificateDirectory) {
        self.directory = directory
    }

    /// Whether the list names `certificate`. A list that exists but cannot be read refuses every
    /// peer: failing open would let a revoked certificate back in.
    func contains(_ certificate: Certificate) throws(CertificateError) -> Bool {
        let file = directory.revocationList
        let modified = (try? FileManager.default.attributesOfItem(atPath: file))?[.modificationDate] as? Date
        let serials = try loaded.withLock { (loaded) throws(CertificateError) -> Set<String> in
            guard modified != loaded.modified else { return loaded.serials }
            var serials: Set<String> = []
            if modified != nil {
                for line in try directory.read(file, what: "the revocation list").split(separator: "\n") {
                    if let serial = line.split(separator: " ").first, !serial.hasPrefix("#") {
                        serials.insert(serial.lowercased())
                    }
                }
            }
            loaded = (modified, serials)
            return serials
        }
        return serials.contains(certificate.serialNumber.hex)
    }
}
