import FerryCore
import Yams

/// Walks a parsed YAML tree against the site configuration schema, collecting every problem
/// instead of stopping at the first, and builds a ``SiteConfig`` when there are none.
///
/// Checks that need two fields (a volume's primary against the peers, listen addresses against
/// each other) run only when both fields were read cleanly, so that one mistake is reported once
/// and not again as the cause of others.
struct ConfigReader {
    /// The configuration file's directory: relative paths inside the file are relative to it.
    let directory: String
    var problems: [ConfigProblem] = []

    init(directory: String) {
        self.directory = directory
    }

    static let topKeys = ["site", "listen", "peers", "volumes", "trees", "log-level"]
    static let siteKeys = ["name", "data"]
    static let listenKeys = ["replication", "nbd", "nbd-socket", "admin-socket", "metrics", "metrics-token-file"]
    static let peerKeys = ["address", "site-id"]
    static let volumeKeys = ["size", "primary", "replicas", "on-promote", "history"]

    /// Volume sizes must be whole 4 KiB blocks (the NBD block size Ferry advertises).
    static let volumeSizeUnit: UInt64 = 4096

    mutating func read(_ root: Node, file: String) -> SiteConfig? {
        guard let top = map(root, at: "", expected: "a map with the sections \(Self.topKeys.joined(separator: ", "))")
        else { return nil }
        let fields = fields(of: top, at: "", known: Self.topKeys)
        let site = readSite(fields["site"], line: fields.keyLines["site"])
        // A site with no volumes (trees only) needs no NBD listener.
        let listen = readListen(fields["listen"], line: fields.keyLines["listen"], dataDirectory: site.dataDirectory,
                                needsNBD: fields["volumes"] != nil)
        let peers = readPeers(fields["peers"], line: fields.keyLines["peers"], siteName: site.name, replication: listen?.replication)
        let volumes = readVolumes(fields["volumes"], line: fields.keyLines["volumes"], siteName: site.name, peerNames: peers.names)
        let trees = readTrees(fields["trees"], line: fields.keyLines["trees"], siteName: site.name, peerNames: peers.names,
                              volumeNames: volumes.map(\.name), dataDirectory: site.dataDirectory)
        let logLevel = readLogLevel(fields)

        guard problems.isEmpty, let name = site.name, let data = site.dataDirectory, let listen, let logLevel
        else { return nil }
        var config = SiteConfig(site: SiteSection(name: name, dataDirectory: data), listen: listen,
                                peers: peers.configs, volumes: volumes, logLevel: logLevel, path: file)
        config.trees = trees
        return config
    }

    // MARK: site

    /// `[a-z0-9][a-z0-9._-]{0,62}`: a volume name is also a file name and an NBD export name.
    static func isVolumeName(_ name: String) -> Bool {
        let chars = Array(name.utf8)
        guard (1...63).contains(chars.count), isLowerAlnum(chars[0]) else { return false }
        return chars.allSatisfy { isLowerAlnum($0) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: ".") }
    }

    private static func isLowerAlnum(_ c: UInt8) -> Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(c) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(c)
    }

    /// What is wrong with a name that is not a ``SiteName``, with the rule and an example.
    static func siteNameAdvice(_ name: String) -> String {
        let lower = name.lowercased()
        let example = SiteName.isValid(lower) && lower != name ? "\"\(lower)\"" : "\"east\""
        return "\"\(name)\" is not a valid site name; use \(SiteName.rule) (e.g. \(example))"
    }

    private mutating func readSite(_ node: Node?, line: Int?) -> (name: String?, dataDirectory: String?) {
        guard let mapping = map(node, at: "site", line: line, expected: "a map with name and data") else { return (nil, nil) }
        let fields = fields(of: mapping, at: "site", known: Self.siteKeys, line: line)
        var name = text(fields, "name", required: true, example: "east")
        if let text = name, !SiteName.isValid(text) {
            report("site.name", Self.siteNameAdvice(text), line: fields.line(of: "name"))
            name = nil
        }
        var data = text(fields, "data", required: true, example: "/var/lib/ferry/east")
        if let text = data {
            if text.isEmpty {
                report("site.data", "\"\" is not a directory; give the data directory, e.g. /var/lib/ferry/east",
                       line: fields.line(of: "data"))
                data = nil
            } else {
                data = ConfigPath.resolve(text, against: directory)
            }
        }
        return (name, data)
    }

    // MARK: listen

    private mutating func readListen(_ node: Node?, line: Int?, dataDirectory: String?, needsNBD: Bool) -> ListenSection? {
        guard let mapping = map(node, at: "listen", line: line, expected: "a map with replication and nbd or nbd-socket")
        else { return nil }
        let fields = fields(of: mapping, at: "listen", known: Self.listenKeys, line: line)
        let replication = address(fields, "replication", required: true, example: "0.0.0.0:7800", listening: true)
        let nbd = address(fields, "nbd", required: false, example: "127.0.0.1:10809", listening: true)
        let nbdSocket = socketPath(fields, "nbd-socket", example: "/run/ferry/east.nbd")
        var adminSocket = socketPath(fields, "admin-socket", example: "/run/ferry/east.admin")

        if needsNBD && !fields.has("nbd") && !fields.has("nbd-socket") {
            report("listen", "set nbd or nbd-socket (or both) so that NBD clients can reach the volumes, "
                   + "e.g. nbd: 127.0.0.1:10809", line: fields.line)
        }
        if let replication, let nbd, nbd.collides(with: replication) {
            report("listen.nbd", "\(nbd) is also the address of listen.replication (\(replication)); "
                   + "give NBD its own port, e.g. \(nbd.host.contains(":") ? "[\(nbd.host)]" : nbd.host):10809",
                   line: fields.line(of: "nbd"))
        }
        if !fields.has("admin-socket"), let dataDirectory {
            let fallback = ListenSection.defaultAdminSocket(dataDirectory: dataDirectory)
            if fallback.utf8.count > ConfigPath.maxSocketPathBytes {
                report("listen.admin-socket", "the default \"\(fallback)\" (<data>/admin.sock) is \(fallback.utf8.count) "
                       + "bytes, longer than the \(ConfigPath.maxSocketPathBytes) a Unix socket path can have; "
                       + "set admin-socket to a shorter path, e.g. /run/ferry/east.admin", line: fields.line)
            } else {
                adminSocket = fallback
            }
        }
        if let nbdSocket, let adminSocket, nbdSocket == adminSocket {
            let (field, other) = fields.has("admin-socket") ? ("admin-socket", "nbd-socket") : ("nbd-socket", "admin socket (<data>/admin.sock)")
            report("listen.\(field)", "\"\(adminSocket)\" is also the \(other); give each socket its own path",
                   line: fields.line(of: field))
        }
        let metrics = address(fields, "metrics", required: false, example: "127.0.0.1:9480", listening: true)
        let tokenFile = filePath(fields, "metrics-token-file", example: "/etc/ferry/metrics.token")
        if let metrics {
            for (key, other) in [("replication", replication), ("nbd", nbd)] {
                if let other, metrics.collides(with: other) {
                    report("listen.metrics", "\(metrics) is also the address of listen.\(key) (\(other)); "
                           + "give the metrics listener its own port, e.g. 127.0.0.1:9480", line: fields.line(of: "metrics"))
                }
            }
            if !metrics.isLoopback && !fields.has("metrics-token-file") {
                report("listen.metrics", "\(metrics) is reachable from other machines, so the page and /metrics need a "
                       + "bearer token: set metrics-token-file to a file holding one (e.g. `openssl rand -hex 32 > "
                       + "/etc/ferry/metrics.token`), or bind a loopback address such as 127.0.0.1:9480",
                       line: fields.line(of: "metrics"))
            }
        } else if fields.has("metrics-token-file") {
            report("listen.metrics-token-file", "is set but listen.metrics is not; set metrics (e.g. 127.0.0.1:9480) "
                   + "to serve the metrics, or leave the token file out", line: fields.line(of: "metrics-token-file"))
        }
        guard let replication, let adminSocket else { return nil }
        return ListenSection(replication: replication, nbd: nbd, nbdSocket: nbdSocket, adminSocket: adminSocket,
                             metrics: metrics, metricsTokenFile: tokenFile)
    }

    private mutating func address(_ fields: ConfigFields, _ key: String, required: Bool, example: String,
                                  listening: Bool) -> HostPort? {
        guard let text = text(fields, key, required: required, example: example) else { return nil }
        do {
            return try HostPort(parsing: text, allowingPortZero: listening)
        } catch {
            report(fields.path(key), error.description, line: fields.line(of: key))
            return nil
        }
    }

    /// An optional path field, resolved against the config's directory; `noun` names what it is
    /// the path of, in the message for an empty one.
    mutating func filePath(_ fields: ConfigFields, _ key: String, example: String, noun: String = "file") -> String? {
        guard let text = text(fields, key, required: false, example: example) else { return nil }
        guard !text.isEmpty else {
            report(fields.path(key), "\"\" is not a path; give the \(noun)'s path, e.g. \(example), or leave the field out",
                   line: fields.line(of: key))
            return nil
        }
        return ConfigPath.resolve(text, against: directory)
    }

    private mutating func socketPath(_ fields: ConfigFields, _ key: String, example: String) -> String? {
        guard let path = filePath(fields, key, example: example, noun: "socket") else { return nil }
        guard path.utf8.count <= ConfigPath.maxSocketPathBytes else {
            report(fields.path(key), "\"\(path)\" is \(path.utf8.count) bytes, longer than the "
                   + "\(ConfigPath.maxSocketPathBytes) a Unix socket path can have; use a shorter path, e.g. \(example)",
                   line: fields.line(of: key))
            return nil
        }
        return path
    }

    // MARK: peers

    /// `names` is nil when the section could not be read, so that volumes do not also report
    /// their primary as unknown.
    private mutating func readPeers(_ node: Node?, line: Int?, siteName: String?, replication: HostPort?)
        -> (configs: [PeerConfig], names: [String]?) {
        guard let mapping = map(node, at: "peers", line: line, expected: "a map from peer name to its address and site-id",
                                hint: "; write each peer as `west:` with address and site-id indented under it")
        else { return ([], nil) }
        var configs: [PeerConfig] = []
        var names: [String] = []
        var lines: [String: (address: Int?, siteID: Int?)] = [:]
        for (name, value, keyLine) in entries(of: mapping, at: "peers") {
            let path = "peers.\(name)"
            names.append(name)
            if !SiteName.isValid(name) {
                report(path, Self.siteNameAdvice(name) + "; a peer is named by its own site.name", line: keyLine)
            } else if name == siteName {
                report(path, "\"\(name)\" is this site's own name; a peer is another site, named by that site's site.name",
                       line: keyLine)
            }
            guard let entry = map(value, at: path, line: keyLine, expected: "a map with address and site-id") else { continue }
            let fields = fields(of: entry, at: path, known: Self.peerKeys, line: keyLine)
            let address = address(fields, "address", required: true, example: "10.0.0.2:7800", listening: false)
            var siteID: SiteID?
            if let text = text(fields, "site-id", required: true, example: "3f2a-9c1d-…") {
                siteID = SiteID(text)
                if siteID == nil {
                    report(fields.path("site-id"), "\"\(text)\" is not a site ID; paste the 64-hex-digit ID "
                           + "that `ferry id` prints on \(name)", line: fields.line(of: "site-id"))
                }
            }
            if let address, let replication, !replication.isWildcard, address == replication {
                report(fields.path("address"), "\(address) is this site's own listen.replication; "
                       + "give the address where \(name) listens", line: fields.line(of: "address"))
            }
            lines[name] = (fields.line(of: "address"), fields.line(of: "site-id"))
            if let address, let siteID { configs.append(PeerConfig(name: name, address: address, siteID: siteID)) }
        }
        configs.sort { $0.name < $1.name }
        for (index, peer) in configs.enumerated() {
            let earlier = configs[..<index]
            if let same = earlier.first(where: { $0.siteID == peer.siteID }) {
                report("peers.\(peer.name).site-id", "same site ID as peers.\(same.name); each peer is a different "
                       + "site with its own ID (`ferry id` on \(peer.name) prints it)", line: lines[peer.name]?.siteID)
            }
            if let same = earlier.first(where: { $0.address.host.lowercased() == peer.address.host.lowercased()
                                                 && $0.address.port == peer.address.port }) {
                report("peers.\(peer.name).address", "\(peer.address) is also the address of peers.\(same.name); "
                       + "give each peer the address where it listens", line: lines[peer.name]?.address)
            }
        }
        return (configs, names)
    }

    // MARK: volumes

    private mutating func readVolumes(_ node: Node?, line: Int?, siteName: String?, peerNames: [String]?) -> [VolumeConfig] {
        guard let mapping = map(node, at: "volumes", line: line, expected: "a map from volume name to its size and primary",
                                hint: "; write each volume as `vm1:` with size and primary indented under it")
        else { return [] }
        var volumes: [VolumeConfig] = []
        for (name, value, keyLine) in entries(of: mapping, at: "volumes") {
            let path = "volumes.\(name)"
            if !Self.isVolumeName(name) {
                report(path, "\"\(name)\" is not a valid volume name; use 1 to 63 lowercase letters, digits, "
                       + "dots, dashes and underscores, starting with a letter or digit", line: keyLine)
            }
            guard let entry = map(value, at: path, line: keyLine, expected: "a map with size and primary") else { continue }
            let fields = fields(of: entry, at: path, known: Self.volumeKeys, line: keyLine)
            let size = readSize(fields)
            var primary = text(fields, "primary", required: true, example: siteName ?? "east")
            if let text = primary, let message = Self.unknownSite(text, siteName: siteName, peerNames: peerNames) {
                report(fields.path("primary"), message, line: fields.line(of: "primary"))
                primary = nil
            }
            let replicas = readReplicas(fields, siteName: siteName, peerNames: peerNames, primary: primary)
            let onPromote = text(fields, "on-promote", required: false, example: "/usr/local/bin/start-vm1")
            if let hook = onPromote, hook.trimmingCharacters(in: .whitespaces).isEmpty {
                report(fields.path("on-promote"), "empty; give the command to run after a promotion, or leave the key out",
                       line: fields.line(of: "on-promote"))
            }
            let history = readLimit(fields, key: "history", sizeExample: "10G", timeExample: "24h", timeExamples: "24h or 7d")
            if Self.isVolumeName(name), let size, let primary, let replicas {
                var volume = VolumeConfig(name: name, sizeBytes: size, primary: primary, replicas: replicas,
                                          onPromote: onPromote?.trimmingCharacters(in: .whitespaces).isEmpty == false ? onPromote : nil)
                if history.bytes != nil || history.seconds != nil { volume.history = HistoryLimit(seconds: history.seconds, bytes: history.bytes) }
                volumes.append(volume)
            }
        }
        return volumes.sorted { $0.name < $1.name }
    }

    /// Why `name` is neither this site nor a configured peer, or nil when it is one of them or
    /// when either list could not be read (so that the mistake there is not blamed here too).
    static func unknownSite(_ name: String, siteName: String?, peerNames: [String]?) -> String? {
        guard let siteName, let peerNames, name != siteName, !peerNames.contains(name) else { return nil }
        let peers = peerNames.isEmpty ? "there are none" : peerNames.sorted().joined(separator: ", ")
        var message = "\"\(name)\" is neither this site (\"\(siteName)\") nor a configured peer (\(peers))"
        if let guess = closest(to: name, among: [siteName] + peerNames.sorted()) {
            message += "; did you mean \"\(guess)\"?"
        }
        return message
    }

    private mutating func readSize(_ fields: ConfigFields) -> UInt64? {
        guard let text = text(fields, "size", required: true, example: "20G") else { return nil }
        let path = fields.path("size")
        let line = fields.line(of: "size")
        guard let bytes = ByteSize.parse(text) else {
            report(path, "\"\(text)\" is not a size; use 512M, 20G, 1T", line: line)
            return nil
        }
        guard bytes > 0 else {
            report(path, "\"\(text)\" is not a usable size; a volume needs more than 0 bytes, e.g. 20G", line: line)
            return nil
        }
        guard bytes <= UInt64(Int64.max) - Self.volumeSizeUnit + 1 else {
            report(path, "\"\(text)\" is larger than an image file can be; use a smaller size, e.g. 1T", line: line)
            return nil
        }
        guard bytes % Self.volumeSizeUnit == 0 else {
            let up = (bytes / Self.volumeSizeUnit + 1) * Self.volumeSizeUnit
            report(path, "\"\(text)\" (\(bytes) bytes) is not a multiple of 4096 bytes; use \(ConfigRendering.size(up))",
                   line: line)
            return nil
        }
        return bytes
    }

    // MARK: log-level

    private mutating func readLogLevel(_ fields: ConfigFields) -> String? {
        guard let text = text(fields, "log-level", required: false, example: "info") else {
            return fields.has("log-level") ? nil : "info"
        }
        let level = text.lowercased()
        guard SiteConfig.logLevels.contains(level) else {
            var message = "\"\(text)\" is not a log level; "
            if let guess = Self.closest(to: level, among: SiteConfig.logLevels) { message += "did you mean \"\(guess)\"? " }
            message += "use one of \(SiteConfig.logLevels.joined(separator: ", "))"
            report("log-level", message, line: fields.line(of: "log-level"))
            return nil
        }
        return level
    }
}
