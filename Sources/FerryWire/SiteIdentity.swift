import Crypto
import FerryCore
import Foundation
import NIOSSL
import SwiftASN1
import X509

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A site's long-lived identity: a P-256 key and the self-signed certificate that carries it.
///
/// Peers do not trust a CA; they pin the certificate itself. The ``siteID`` (the SHA-256 of the
/// certificate's DER) is what an operator copies into the other sites' `peers.NAME.site-id`, so a
/// site keeps the same identity for its whole life: ``write(to:)`` refuses to replace one, and
/// re-initialising a site means every peer must update its pin.
///
/// On disk an identity is two PEM files in the site's data directory: `site.crt` (the
/// certificate, mode 0644) and `site.key` (a PKCS#8 private key, mode 0600).
public struct SiteIdentity: Sendable {
    /// The name the site was initialised with; the certificate's common name.
    public let siteName: String
    /// SHA-256 of the certificate's DER encoding: what peers pin.
    public let siteID: SiteID
    /// The certificate, PEM-encoded (`-----BEGIN CERTIFICATE-----`).
    public let certificatePEM: String
    /// The private key, PEM-encoded PKCS#8 (`-----BEGIN PRIVATE KEY-----`). Keep it secret.
    public let privateKeyPEM: String

    /// File name of the certificate inside an identity directory.
    public static let certificateFileName = "site.crt"
    /// File name of the private key inside an identity directory.
    public static let privateKeyFileName = "site.key"

    /// Makes a new identity: a fresh P-256 key and a self-signed certificate for it.
    ///
    /// The certificate has CN = `siteName` (also the issuer), is valid from an hour ago (to
    /// tolerate clock skew between sites) for 100 years, is not a CA, allows digital signatures
    /// only, is good for both TLS server and client authentication (every site both dials and
    /// accepts), and names the site as a DNS SAN (sanitised; peers never verify host names, the
    /// SAN is there for tools that insist on one).
    public static func generate(siteName: String) throws -> SiteIdentity {
        try validate(siteName: siteName)
        let key = P256.Signing.PrivateKey()
        let certificateKey = Certificate.PrivateKey(key)
        let name = try DistinguishedName { CommonName(siteName) }
        let now = Date()
        var serial = [UInt8](repeating: 0, count: 20)
        var rng = SystemRandomNumberGenerator()
        for i in serial.indices { serial[i] = rng.next() }
        serial[0] &= 0x7f  // a serial number is a positive INTEGER
        serial[0] |= 0x01  // and has no leading zero byte to strip
        let extensions = try Certificate.Extensions {
            Critical(BasicConstraints.notCertificateAuthority)
            Critical(KeyUsage(digitalSignature: true))
            try ExtendedKeyUsage([.serverAuth, .clientAuth])
            SubjectAlternativeNames([.dnsName(dnsName(for: siteName))])
        }
        let certificate = try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(bytes: serial),
            publicKey: certificateKey.publicKey,
            notValidBefore: now.addingTimeInterval(-3600),
            notValidAfter: now.addingTimeInterval(100 * 365.25 * 24 * 3600),
            issuer: name,
            subject: name,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: extensions,
            issuerPrivateKey: certificateKey)
        var serializer = DER.Serializer()
        try serializer.serialize(certificate)
        let der = serializer.serializedBytes
        return SiteIdentity(
            siteName: siteName,
            siteID: fingerprint(ofDER: der),
            certificatePEM: PEMDocument(type: "CERTIFICATE", derBytes: der).pemString,
            privateKeyPEM: try certificateKey.serializeAsPEM().pemString)
    }

    private init(siteName: String, siteID: SiteID, certificatePEM: String, privateKeyPEM: String) {
        self.siteName = siteName
        self.siteID = siteID
        self.certificatePEM = certificatePEM
        self.privateKeyPEM = privateKeyPEM
    }

    /// The site ID of a certificate given as DER: its SHA-256.
    public static func fingerprint(ofDER der: some Sequence<UInt8>) -> SiteID {
        // SHA-256 is always 32 bytes, which is all SiteID asks.
        SiteID(bytes: Array(SHA256.hash(data: Array(der))))!
    }

    // MARK: - Files

    /// Writes `site.crt` and `site.key` into `directory`, creating it (mode 0700) if needed.
    ///
    /// Each file is written under a temporary name, flushed to disk and renamed into place, so a
    /// crash never leaves a half-written key. The key is created with mode 0600 from the start.
    /// Throws ``SiteIdentityError/alreadyExists(path:)`` rather than replace an existing identity,
    /// because peers pin it.
    public func write(to directory: String) throws {
        try Self.makeDirectory(directory)
        let certPath = Self.path(directory, Self.certificateFileName)
        let keyPath = Self.path(directory, Self.privateKeyFileName)
        for path in [certPath, keyPath] where Self.exists(path) {
            throw SiteIdentityError.alreadyExists(path: path)
        }
        // Key first: a crash between the two leaves a key without a certificate, which `load`
        // reports as an incomplete identity instead of silently pairing files that do not match.
        try Self.writeAtomically(Array(privateKeyPEM.utf8), to: keyPath, mode: 0o600)
        try Self.writeAtomically(Array(certificatePEM.utf8), to: certPath, mode: 0o644)
    }

    /// Reads the identity that ``write(to:)`` stored in `directory`.
    ///
    /// Checks that both files are there and parse, that the key belongs to the certificate, and
    /// that the key file is not readable by group or others.
    public static func load(from directory: String) throws -> SiteIdentity {
        let certPath = path(directory, certificateFileName)
        let keyPath = path(directory, privateKeyFileName)
        switch (exists(certPath), exists(keyPath)) {
        case (false, false): throw SiteIdentityError.noIdentity(directory: directory)
        case (true, false): throw SiteIdentityError.incomplete(missing: keyPath, present: certPath)
        case (false, true): throw SiteIdentityError.incomplete(missing: certPath, present: keyPath)
        case (true, true): break
        }
        var info = stat()
        if stat(keyPath, &info) == 0, info.st_mode & 0o077 != 0 {
            throw SiteIdentityError.keyTooOpen(path: keyPath, mode: UInt32(info.st_mode & 0o777))
        }
        let certificatePEM = try readText(certPath)
        let privateKeyPEM = try readText(keyPath)

        let certificate: Certificate
        let der: [UInt8]
        do {
            let document = try PEMDocument(pemString: certificatePEM)
            guard document.discriminator == "CERTIFICATE" else {
                throw SiteIdentityError.unreadable(
                    path: certPath, reason: "it holds a \(document.discriminator), not a CERTIFICATE")
            }
            der = document.derBytes
            certificate = try Certificate(derEncoded: der)
        } catch let error as SiteIdentityError {
            throw error
        } catch {
            throw SiteIdentityError.unreadable(path: certPath, reason: "not a PEM certificate (\(error))")
        }
        let key: Certificate.PrivateKey
        do {
            key = try Certificate.PrivateKey(pemEncoded: privateKeyPEM)
        } catch {
            throw SiteIdentityError.unreadable(path: keyPath, reason: "not a PEM private key (\(error))")
        }
        guard key.publicKey == certificate.publicKey else {
            throw SiteIdentityError.keyMismatch(keyPath: keyPath, certificatePath: certPath)
        }
        guard let siteName = commonName(of: certificate) else {
            throw SiteIdentityError.unreadable(path: certPath, reason: "the certificate has no common name (CN)")
        }
        return SiteIdentity(
            siteName: siteName, siteID: fingerprint(ofDER: der),
            certificatePEM: certificatePEM, privateKeyPEM: privateKeyPEM)
    }

    // MARK: - TLS material

    /// The certificate and key in the form swift-nio-ssl takes.
    func tlsMaterial() throws -> (certificate: NIOSSLCertificate, key: NIOSSLPrivateKey) {
        let certificates = try NIOSSLCertificate.fromPEMBytes(Array(certificatePEM.utf8))
        guard let certificate = certificates.first else {
            throw SiteIdentityError.unreadable(path: Self.certificateFileName, reason: "no certificate in the PEM text")
        }
        let key = try NIOSSLPrivateKey(bytes: Array(privateKeyPEM.utf8), format: .pem)
        return (certificate, key)
    }

    // MARK: - Helpers

    static func validate(siteName: String) throws {
        guard !siteName.isEmpty, siteName.utf8.count <= 64,
              !siteName.unicodeScalars.contains(where: { $0.properties.generalCategory == .control })
        else {
            throw SiteIdentityError.invalidSiteName(siteName)
        }
    }

    /// `siteName` reduced to a DNS label: lowercase letters, digits and `-`, at most 63 long.
    static func dnsName(for siteName: String) -> String {
        var label = ""
        for scalar in siteName.lowercased().unicodeScalars {
            switch scalar {
            case "a"..."z", "0"..."9": label.unicodeScalars.append(scalar)
            default: if !label.hasSuffix("-") { label += "-" }
            }
        }
        label = String(label.drop(while: { $0 == "-" }).prefix(63))
        while label.hasSuffix("-") { label.removeLast() }
        return label.isEmpty ? "ferry-site" : label
    }

    private static func commonName(of certificate: Certificate) -> String? {
        for rdn in certificate.subject {
            for attribute in rdn where attribute.type == .RDNAttributeType.commonName {
                if let name = String(attribute.value) { return name }
            }
        }
        return nil
    }

    private static func path(_ directory: String, _ file: String) -> String {
        directory.hasSuffix("/") ? directory + file : directory + "/" + file
    }

    private static func exists(_ path: String) -> Bool {
        var info = stat()
        return lstat(path, &info) == 0
    }

    private static func errnoText(_ code: Int32 = errno) -> String {
        String(cString: strerror(code))
    }

    private static func makeDirectory(_ directory: String) throws {
        var info = stat()
        if stat(directory, &info) == 0 {
            guard info.st_mode & S_IFMT == S_IFDIR else {
                throw SiteIdentityError.writeFailed(path: directory, reason: "it exists and is not a directory")
            }
            return
        }
        do {
            try FileManager.default.createDirectory(
                atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch {
            throw SiteIdentityError.writeFailed(path: directory, reason: "cannot create the directory (\(error))")
        }
    }

    private static func readText(_ path: String) throws -> String {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SiteIdentityError.unreadable(path: path, reason: "cannot read it; check its permissions")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw SiteIdentityError.unreadable(path: path, reason: "it is not text (PEM)")
        }
        return text
    }

    private static func writeAtomically(_ bytes: [UInt8], to path: String, mode: mode_t) throws {
        let temporary = path + ".tmp-\(getpid())"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
        guard fd >= 0 else {
            throw SiteIdentityError.writeFailed(path: temporary, reason: errnoText())
        }
        var failure: String?
        // open() applies the umask; set the mode explicitly so 0600 really is 0600.
        if fchmod(fd, mode) != 0 { failure = errnoText() }
        var offset = 0
        while failure == nil, offset < bytes.count {
            let written = bytes.withUnsafeBytes { raw in
                posixWrite(fd, raw.baseAddress! + offset, raw.count - offset)
            }
            if written < 0 {
                if errno == EINTR { continue }
                failure = errnoText()
            } else {
                offset += written
            }
        }
        if failure == nil, fsync(fd) != 0 { failure = errnoText() }
        if close(fd) != 0, failure == nil { failure = errnoText() }
        if failure == nil, rename(temporary, path) != 0 { failure = errnoText() }
        if let failure {
            unlink(temporary)
            throw SiteIdentityError.writeFailed(path: path, reason: failure)
        }
    }
}

/// `write(2)` under another name: inside `SiteIdentity` the method `write(to:)` hides the C function.
private func posixWrite(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int) -> Int {
    write(fd, buffer, count)
}

/// Why a site identity could not be made, stored or loaded; each message says what to do.
public enum SiteIdentityError: Error, CustomStringConvertible, Equatable {
    /// Neither `site.crt` nor `site.key` is in the directory.
    case noIdentity(directory: String)
    /// One of the two files is there, the other is not.
    case incomplete(missing: String, present: String)
    /// A file exists but cannot be read or parsed.
    case unreadable(path: String, reason: String)
    /// The private key does not belong to the certificate.
    case keyMismatch(keyPath: String, certificatePath: String)
    /// The key file can be read by group or others.
    case keyTooOpen(path: String, mode: UInt32)
    /// `write(to:)` found an identity (or part of one) already there.
    case alreadyExists(path: String)
    /// Creating the directory or writing a file failed.
    case writeFailed(path: String, reason: String)
    /// The site name cannot be used.
    case invalidSiteName(String)

    public var description: String {
        switch self {
        case .noIdentity(let directory):
            return "no identity in \(directory): run `ferry init --site NAME --data \(directory)` first"
        case .incomplete(let missing, let present):
            return "incomplete identity: \(present) exists but \(missing) is missing; restore it from a backup, "
                + "or move \(present) aside and run `ferry init` again (every peer must then update its site-id pin)"
        case .unreadable(let path, let reason):
            return "cannot load \(path): \(reason); it should be the file `ferry init` wrote, restore it from a backup"
        case .keyMismatch(let keyPath, let certificatePath):
            return "\(keyPath) does not belong to \(certificatePath) (the public keys differ); "
                + "restore the matching pair from a backup"
        case .keyTooOpen(let path, let mode):
            return "\(path) is readable by other users (mode \(String(mode, radix: 8))): run `chmod 600 \(path)`"
        case .alreadyExists(let path):
            return "refusing to overwrite the site identity at \(path): peers pin its site ID; "
                + "to re-initialise the site, move the old site.crt and site.key aside first"
        case .writeFailed(let path, let reason):
            return "cannot write \(path): \(reason)"
        case .invalidSiteName(let name):
            return "site name \"\(name)\" cannot be used: give 1 to 64 bytes of text without control characters"
        }
    }
}
