import Crypto
import FerryCore
import Foundation
import SwiftASN1
import Testing

@testable import FerryWire

/// A fresh directory under the system temp dir, removed by `remove()`.
struct TemporaryDirectory {
    let path: String

    init() throws {
        path = NSTemporaryDirectory() + "ferry-wire-tests-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

@Suite("Site identity")
struct SiteIdentityTests {
    @Test("the site ID is the SHA-256 of the certificate DER")
    func siteIDIsFingerprint() throws {
        let identity = try SiteIdentity.generate(siteName: "west")
        let der = try PEMDocument(pemString: identity.certificatePEM).derBytes
        #expect(identity.siteID.bytes == Array(SHA256.hash(data: der)))
        #expect(identity.siteName == "west")
        #expect(identity.privateKeyPEM.contains("BEGIN PRIVATE KEY"))
        #expect(try SiteIdentity.generate(siteName: "west").siteID != identity.siteID)
    }

    @Test("write then load gives the same identity, and the key file has mode 0600")
    func writeLoad() throws {
        let dir = try TemporaryDirectory()
        defer { dir.remove() }
        let identity = try SiteIdentity.generate(siteName: "East Site #2")
        try identity.write(to: dir.path)

        let loaded = try SiteIdentity.load(from: dir.path)
        #expect(loaded.siteID == identity.siteID)
        #expect(loaded.siteName == "East Site #2")
        #expect(loaded.certificatePEM == identity.certificatePEM)

        let attributes = try FileManager.default.attributesOfItem(atPath: dir.path + "/site.key")
        #expect((attributes[.posixPermissions] as? NSNumber)?.intValue == 0o600)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted()
        #expect(leftovers == ["site.crt", "site.key"])
    }

    @Test("write creates a missing directory")
    func writeCreatesDirectory() throws {
        let dir = try TemporaryDirectory()
        defer { dir.remove() }
        let nested = dir.path + "/data/site"
        try SiteIdentity.generate(siteName: "north").write(to: nested)
        #expect(try SiteIdentity.load(from: nested).siteName == "north")
    }

    @Test("an existing identity is never overwritten")
    func overwriteRefused() throws {
        let dir = try TemporaryDirectory()
        defer { dir.remove() }
        let first = try SiteIdentity.generate(siteName: "west")
        try first.write(to: dir.path)
        let error = #expect(throws: SiteIdentityError.self) {
            try SiteIdentity.generate(siteName: "west").write(to: dir.path)
        }
        #expect(error?.description.contains("refusing to overwrite") == true)
        #expect(try SiteIdentity.load(from: dir.path).siteID == first.siteID)
    }

    @Test("loading explains what is missing and what to run")
    func loadErrors() throws {
        let dir = try TemporaryDirectory()
        defer { dir.remove() }
        let none = #expect(throws: SiteIdentityError.noIdentity(directory: dir.path)) {
            try SiteIdentity.load(from: dir.path)
        }
        #expect(none?.description == "no identity in \(dir.path): run `ferry init --site NAME --data \(dir.path)` first")

        try SiteIdentity.generate(siteName: "west").write(to: dir.path)
        try FileManager.default.removeItem(atPath: dir.path + "/site.key")
        #expect(throws: SiteIdentityError.incomplete(missing: dir.path + "/site.key", present: dir.path + "/site.crt")) {
            try SiteIdentity.load(from: dir.path)
        }
    }

    @Test("a key file others can read is refused with the chmod to run")
    func keyTooOpen() throws {
        let dir = try TemporaryDirectory()
        defer { dir.remove() }
        try SiteIdentity.generate(siteName: "west").write(to: dir.path)
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: dir.path + "/site.key")
        let error = #expect(throws: SiteIdentityError.self) { try SiteIdentity.load(from: dir.path) }
        #expect(error?.description.contains("chmod 600") == true)
    }

    @Test("a key from another identity does not load with this certificate")
    func keyMismatch() throws {
        let a = try TemporaryDirectory(), b = try TemporaryDirectory()
        defer { a.remove(); b.remove() }
        try SiteIdentity.generate(siteName: "a").write(to: a.path)
        try SiteIdentity.generate(siteName: "b").write(to: b.path)
        try FileManager.default.removeItem(atPath: a.path + "/site.key")
        try FileManager.default.copyItem(atPath: b.path + "/site.key", toPath: a.path + "/site.key")
        #expect(throws: SiteIdentityError.keyMismatch(keyPath: a.path + "/site.key", certificatePath: a.path + "/site.crt")) {
            try SiteIdentity.load(from: a.path)
        }
    }

    @Test("site names become DNS labels for the SAN", arguments: [
        ("west", "west"), ("East Site #2", "east-site-2"), ("--x--", "x"), ("ü", "ferry-site"),
    ])
    func dnsNames(name: String, label: String) {
        #expect(SiteIdentity.dnsName(for: name) == label)
    }

    @Test("an empty site name is refused")
    func emptyName() {
        #expect(throws: SiteIdentityError.invalidSiteName("")) { try SiteIdentity.generate(siteName: "") }
    }
}
