import FerryCore
import FerryWire
import Foundation

/// What `ferry status --json` prints and `GET /v1/status` on the admin socket returns.
public struct SiteStatus: Codable, Sendable, Equatable {
    public struct Site: Codable, Sendable, Equatable {
        public var name: String
        public var siteID: String
        public var pid: Int32
        public var startedAt: Date
        public var configPath: String
        public var dataDirectory: String
        /// Where the site listens: replication (peer links), NBD (TCP and Unix), admin.
        public var replicationAddress: String?
        public var nbdAddresses: [String]
        public var adminSocket: String
    }

    public struct Volume: Codable, Sendable, Equatable {
        public var name: String
        public var sizeBytes: UInt64
        /// `primary` when this site serves it read-write; `secondary` otherwise.
        public var role: String
        public var primarySite: String
        public var uuid: String?
        public var epoch: Int64?
        public var generation: String?
        /// NBD URIs the volume is exported at (empty on a secondary).
        public var exports: [String]
        public var clientsConnected: Int
    }

    public var site: Site
    public var peers: [PeerLinkStatus]
    public var volumes: [Volume]

    public static func decoder() -> JSONDecoder {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .iso8601
        return d
    }

    public static func encoder() -> JSONEncoder {
        let e = JSONEncoder()
        e.dateEncodingStrategy = .iso8601
        e.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return e
    }
}

extension SiteStatus {
    /// The human form of `ferry status`.
    public func rendered(now: Date = Date()) -> String {
        var out = "site \(site.name)  id \(site.siteID)\n"
        out += "  pid \(site.pid), up \(Self.age(from: site.startedAt, to: now)), config \(site.configPath)\n"
        if let r = site.replicationAddress { out += "  replication on \(r)\n" }
        if !site.nbdAddresses.isEmpty { out += "  NBD on \(site.nbdAddresses.joined(separator: ", "))\n" }
        out += "\npeers\n"
        if peers.isEmpty { out += "  (none configured)\n" }
        for p in peers {
            var line = "  \(p.name.padding(12))\(p.state.rawValue.padding(13))since \(Self.age(from: p.since, to: now)) ago"
            if let rtt = p.rttMilliseconds, p.state == .connected { line += ", rtt \(String(format: "%.2f", rtt)) ms" }
            line += "  \(p.address)"
            if let e = p.lastError, p.state != .connected { line += "\n      last error: \(e)" }
            out += line + "\n"
        }
        out += "\nvolumes\n"
        if volumes.isEmpty { out += "  (none configured)\n" }
        for v in volumes {
            var line = "  \(v.name.padding(12))\(ByteSize.format(v.sizeBytes).padding(8))\(v.role.padding(11))"
            if v.role == "primary" {
                line += "epoch \(v.epoch ?? 0), \(v.clientsConnected) client\(v.clientsConnected == 1 ? "" : "s")"
                for e in v.exports { line += "\n      \(e)" }
            } else {
                line += "primary is \(v.primarySite)"
            }
            out += line + "\n"
        }
        return out
    }

    static func age(from: Date, to: Date) -> String {
        let s = max(0, Int(to.timeIntervalSince(from)))
        if s < 120 { return "\(s)s" }
        if s < 7200 { return "\(s / 60)m" }
        if s < 172_800 { return "\(s / 3600)h\(s % 3600 / 60)m" }
        return "\(s / 86400)d"
    }
}

extension String {
    func padding(_ width: Int) -> String {
        count >= width ? self + " " : self + String(repeating: " ", count: width - count)
    }
}
