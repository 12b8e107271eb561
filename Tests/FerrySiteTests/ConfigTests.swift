import FerryCore
import Foundation
import Testing
@testable import FerrySite

/// A valid configuration that the other tests change one thing at a time.
enum ConfigFixture {
    static let file = "/etc/ferry/east.yaml"
    static let westID = String(repeating: "3f2a9c1d", count: 8)
    /// The colon-separated uppercase form `openssl x509 -fingerprint -sha256` prints.
    static let northID = Array(repeating: "AB", count: 32).joined(separator: ":")

    static let yaml = """
        # east, the main office
        site:
          name: east
          data: /var/lib/ferry/east
        listen:
          replication: 0.0.0.0:7800
          nbd: 127.0.0.1:10809
          nbd-socket: /run/ferry/east.nbd
          admin-socket: /run/ferry/east.admin
        peers:
          west:
            address: 10.0.0.2:7800
            site-id: \(SiteID(westID)!)
          north:
            address: "[fd00::3]:7801"
            site-id: "\(northID)"
        volumes:
          vm2:
            size: 1T
            primary: west
          vm1:
            size: 20G
            primary: east
        log-level: debug

        """

    /// The fixture with each `(old, new)` replaced; `old` must occur in it.
    static func with(_ edits: (String, String)...) -> String {
        var text = yaml
        for (old, new) in edits { text = text.replacingOccurrences(of: old, with: new) }
        return text
    }

    /// The fixture with `lines`, one replica each (`west: { mode: sync }`), as vm1's replicas;
    /// vm1's primary is east, and the peers are west and north.
    static func withReplicas(_ lines: String...) -> String {
        with(("    primary: east\n", "    primary: east\n    replicas:\n" + lines.map { "      \($0)\n" }.joined()))
    }

    /// The fixture with a replica of every mode and most options set.
    static let replicated = with(("    primary: east\n", """
            primary: east
            replicas:
              west: { mode: sync, on-peer-loss: block, resync-rate: 100M/s }
              north:
                mode: async
                max-lag: {bytes: 128M, time: 30s}
                on-lag: pull-ahead
                journal-size: 4G
                compression: none

        """), ("    primary: west\n", """
            primary: west
            replicas:
              east: { mode: scheduled, at: "02:00", on: Sunday }
              north: { mode: semi-sync }

        """))

    static func problems(_ yaml: String, path: String = file) -> [ConfigProblem] {
        do {
            _ = try SiteConfig.parse(yaml: yaml, path: path)
            return []
        } catch {
            return error.problems
        }
    }
}

@Suite("SiteConfig")
struct ConfigTests {
    @Test("a full valid configuration parses to the expected values")
    func parsesFullConfig() throws {
        let config = try SiteConfig.parse(yaml: ConfigFixture.yaml, path: ConfigFixture.file)
        #expect(config.path == "/etc/ferry/east.yaml")
        #expect(config.site == SiteSection(name: "east", dataDirectory: "/var/lib/ferry/east"))
        #expect(config.listen.replication == HostPort(host: "0.0.0.0", port: 7800))
        #expect(config.listen.nbd == HostPort(host: "127.0.0.1", port: 10809))
        #expect(config.listen.nbdSocket == "/run/ferry/east.nbd")
        #expect(config.listen.adminSocket == "/run/ferry/east.admin")
        #expect(config.peers == [
            PeerConfig(name: "north", address: HostPort(host: "fd00::3", port: 7801),
                       siteID: SiteID(bytes: Array(repeating: 0xAB, count: 32))!),
            PeerConfig(name: "west", address: HostPort(host: "10.0.0.2", port: 7800),
                       siteID: SiteID(ConfigFixture.westID)!),
        ])
        #expect(config.volumes == [
            VolumeConfig(name: "vm1", sizeBytes: 20 << 30, primary: "east"),
            VolumeConfig(name: "vm2", sizeBytes: 1 << 40, primary: "west"),
        ])
        #expect(config.logLevel == "debug")
        #expect(config.loggerLevel == .debug)
        #expect(config.peer(named: "west")?.address.description == "10.0.0.2:7800")
        #expect(config.volume(named: "vm2")?.primary == "west")
    }

    @Test("optional fields take their defaults; peers and volumes may be absent")
    func defaults() throws {
        let config = try SiteConfig.parse(yaml: """
            site: {name: solo, data: /srv/ferry}
            listen:
              replication: "[::]:0"
              nbd-socket: /run/solo.nbd
            """, path: "/etc/ferry/solo.yaml")
        #expect(config.listen.replication == HostPort(host: "::", port: 0))
        #expect(config.listen.nbd == nil)
        #expect(config.listen.adminSocket == "/srv/ferry/admin.sock")
        #expect(config.peers.isEmpty)
        #expect(config.volumes.isEmpty)
        #expect(config.logLevel == "info")
    }

    @Test("log-level is read in any case and kept in lowercase")
    func logLevelCase() throws {
        let config = try SiteConfig.parse(yaml: ConfigFixture.with(("log-level: debug", "log-level: WARNING")),
                                          path: ConfigFixture.file)
        #expect(config.logLevel == "warning")
    }

    @Test("yaml() renders the fixture back to an equal configuration")
    func roundTripFixture() throws {
        let config = try SiteConfig.parse(yaml: ConfigFixture.yaml, path: ConfigFixture.file)
        let text = config.yaml()
        #expect(try SiteConfig.parse(yaml: text, path: config.path) == config)
        // Every path in the output is absolute, so it means the same wherever the file is put.
        #expect(try SiteConfig.parse(yaml: text, path: "/elsewhere/copy.yaml").site == config.site)
        #expect(text.contains("  admin-socket: /run/ferry/east.admin\n"))
        #expect(text.contains("    size: 20G\n"))
        #expect(text.contains("    address: \"[fd00::3]:7801\"\n"))
    }

    @Test("listen.metrics and its token file are read, resolved and rendered back")
    func metricsListenerRoundTrips() throws {
        let yaml = ConfigFixture.with(("  admin-socket: /run/ferry/east.admin\n",
                                       "  admin-socket: /run/ferry/east.admin\n  metrics: 10.0.0.1:9480\n  metrics-token-file: metrics.token\n"))
        let config = try SiteConfig.parse(yaml: yaml, path: ConfigFixture.file)
        #expect(config.listen.metrics == HostPort(host: "10.0.0.1", port: 9480))
        #expect(config.listen.metricsTokenFile == "/etc/ferry/metrics.token")
        #expect(try SiteConfig.parse(yaml: config.yaml(), path: config.path) == config)
        let loopback = try SiteConfig.parse(yaml: ConfigFixture.with(("  admin-socket: /run/ferry/east.admin\n",
                                                                     "  admin-socket: /run/ferry/east.admin\n  metrics: \"[::1]:9480\"\n")),
                                            path: ConfigFixture.file)
        #expect(loopback.listen.metrics?.isLoopback == true)
        #expect(loopback.listen.metricsTokenFile == nil)
        #expect(try SiteConfig.parse(yaml: ConfigFixture.yaml, path: ConfigFixture.file).listen.metrics == nil)
    }

    @Test("yaml() leaves out the default admin socket and writes empty sections as {}")
    func roundTripMinimal() throws {
        let config = SiteConfig(
            site: SiteSection(name: "solo", dataDirectory: "/srv/ferry"),
            listen: ListenSection(replication: HostPort(host: "0.0.0.0", port: 7800),
                                  nbd: HostPort(host: "::1", port: 10809),
                                  adminSocket: "/srv/ferry/admin.sock"),
            path: "/etc/ferry/solo.yaml")
        let text = config.yaml()
        #expect(!text.contains("admin-socket"))
        #expect(text.contains("peers: {}\n"))
        #expect(text.contains("volumes: {}\n"))
        #expect(text.contains("  nbd: \"[::1]:10809\"\n"))
        #expect(try SiteConfig.parse(yaml: text, path: config.path) == config)
    }

    @Test("yaml() quotes names and paths that YAML would otherwise misread")
    func roundTripAwkwardValues() throws {
        let config = SiteConfig(
            site: SiteSection(name: "null", dataDirectory: "/srv/a: b #c/\"q\"\\ünï\tx"),
            listen: ListenSection(replication: HostPort(host: "true", port: 1),
                                  nbdSocket: "/run/-x/~",
                                  adminSocket: "/run/[admin]: {x}"),
            peers: [PeerConfig(name: "true", address: HostPort(host: "yes", port: 65535),
                               siteID: SiteID(ConfigFixture.westID)!)],
            volumes: [VolumeConfig(name: "1e3", sizeBytes: 4096 * 3, primary: "null"),
                      VolumeConfig(name: "0x10", sizeBytes: (1 << 40) + 4096, primary: "true")],
            logLevel: "critical",
            path: "/etc/ferry/odd.yaml")
        let text = config.yaml()
        #expect(try SiteConfig.parse(yaml: text, path: config.path) == config, "\(text)")
        #expect(text.contains("  name: \"null\"\n"))
        #expect(text.contains("    size: 12K\n"))
    }

    @Test("replicas of every mode parse with their options")
    func parsesReplicas() throws {
        let config = try SiteConfig.parse(yaml: ConfigFixture.replicated, path: ConfigFixture.file)
        let vm1 = try #require(config.volume(named: "vm1"))
        #expect(vm1.replicaNames == ["north", "west"])
        #expect(vm1.replicas["west"] == ReplicaPolicy(mode: .sync, onPeerLoss: .block, resyncRateBytesPerSecond: 100 << 20))
        #expect(vm1.replicas["north"] == ReplicaPolicy(mode: .async, maxLagBytes: 128 << 20, maxLagSeconds: 30,
                                                      onLag: .pullAhead, journalSizeBytes: 4 << 30, compression: .none))
        let vm2 = try #require(config.volume(named: "vm2"))
        #expect(vm2.replicaNames == ["east", "north"])
        #expect(vm2.replicas["east"] == ReplicaPolicy(mode: .scheduled, schedule: Schedule.parseAt("02:00", on: "sunday")))
        #expect(vm2.replicas["east"]?.schedule?.description == "weekly on sunday at 02:00")
        #expect(vm2.replicas["north"] == ReplicaPolicy(mode: .semiSync))
        // Without replicas a volume is unreplicated, as before.
        let plain = try SiteConfig.parse(yaml: ConfigFixture.yaml, path: ConfigFixture.file)
        #expect(plain.volumes.allSatisfy { $0.replicas.isEmpty })
        #expect(try SiteConfig.parse(yaml: ConfigFixture.with(("    primary: east\n", "    primary: east\n    replicas: {}\n")),
                                     path: ConfigFixture.file) == plain)
    }

    @Test("replica options take their defaults, and max-lag reads a size, a duration or both", arguments: [
        ("{ mode: async }", ReplicaPolicy(mode: .async, maxLagBytes: 64 << 20)),
        ("{ mode: async, max-lag: 16M }", ReplicaPolicy(mode: .async, maxLagBytes: 16 << 20)),
        ("{ mode: async, max-lag: 5m }", ReplicaPolicy(mode: .async, maxLagSeconds: 300)),
        ("{ mode: async, max-lag: 64MiB }", ReplicaPolicy(mode: .async, maxLagBytes: 64 << 20)),
        ("{ mode: async, max-lag: {time: 1h} }", ReplicaPolicy(mode: .async, maxLagSeconds: 3600)),
        ("{ mode: async, max-lag: {bytes: 1G}, journal-size: 1G }", ReplicaPolicy(mode: .async, maxLagBytes: 1 << 30)),
        ("{ mode: SYNC }", ReplicaPolicy(mode: .sync)),
        ("{ mode: semi-sync, on-peer-loss: block, compression: none }",
         ReplicaPolicy(mode: .semiSync, onPeerLoss: .block, compression: .none)),
        ("{ mode: scheduled, every: 1h }", ReplicaPolicy(mode: .scheduled, schedule: Schedule.parseEvery("1h"))),
        ("{ mode: scheduled, every: 90s, resync-rate: 10M }",
         ReplicaPolicy(mode: .scheduled, resyncRateBytesPerSecond: 10 << 20, schedule: Schedule.parseEvery("90s"))),
        ("{ mode: scheduled, at: 2:30 }", ReplicaPolicy(mode: .scheduled, schedule: Schedule.parseAt("02:30", on: nil))),
        ("{ mode: scheduled, at: \"23:00\", on: fri }",
         ReplicaPolicy(mode: .scheduled, schedule: Schedule.parseAt("23:00", on: "friday"))),
    ] as [(String, ReplicaPolicy)])
    func replicaDefaults(entry: String, policy: ReplicaPolicy) throws {
        let config = try SiteConfig.parse(yaml: ConfigFixture.withReplicas("west: \(entry)"), path: ConfigFixture.file)
        let parsed = try #require(config.volume(named: "vm1")?.replicas["west"])
        #expect(parsed == policy)
        #expect(try SiteConfig.parse(yaml: config.yaml(), path: config.path) == config, "\(config.yaml())")
    }

    @Test("yaml() writes replicas back: the options that apply and differ from their defaults")
    func roundTripReplicas() throws {
        let config = try SiteConfig.parse(yaml: ConfigFixture.replicated, path: ConfigFixture.file)
        let text = config.yaml()
        #expect(try SiteConfig.parse(yaml: text, path: config.path) == config, "\(text)")
        #expect(text.contains("""
                primary: east
                replicas:
                  north:
                    mode: async
                    max-lag: {bytes: 128M, time: 30s}
                    on-lag: pull-ahead
                    journal-size: 4G
                    compression: none
                  west:
                    mode: sync
                    on-peer-loss: block
                    resync-rate: 100M

            """), "\(text)")
        #expect(text.contains("""
                  east:
                    mode: scheduled
                    at: "02:00"
                    on: sunday
                  north:
                    mode: semi-sync

            """), "\(text)")
        // A replica built in code round-trips too, with every kind of schedule and lag bound.
        var built = config
        built.volumes[0].replicas = [
            "west": ReplicaPolicy(mode: .scheduled, schedule: Schedule.parseEvery("90m")),
            "north": ReplicaPolicy(mode: .async, maxLagSeconds: 7 * 86_400, onLag: .throttle, journalSizeBytes: 3 << 20),
        ]
        built.volumes[1].replicas = ["east": ReplicaPolicy(mode: .scheduled, schedule: Schedule.parseAt("0:05", on: nil))]
        // history: a duration, a size, or both.
        for history in [HistoryLimit(seconds: 86_400, bytes: nil), HistoryLimit(seconds: nil, bytes: 10 << 30),
                        HistoryLimit(seconds: 7 * 86_400, bytes: 512 << 20)] {
            var withHistory = config
            withHistory.volumes[0].history = history
            #expect(try SiteConfig.parse(yaml: withHistory.yaml(), path: config.path) == withHistory, "\(withHistory.yaml())")
        }
        let builtText = built.yaml()
        #expect(try SiteConfig.parse(yaml: builtText, path: built.path) == built, "\(builtText)")
        #expect(builtText.contains("        every: 90m\n"))
        #expect(builtText.contains("        max-lag: 1w\n"))
        #expect(builtText.contains("        at: \"00:05\"\n"))
    }

    @Test("relative paths are resolved against the configuration file's directory")
    func relativePaths() throws {
        let config = try SiteConfig.parse(yaml: ConfigFixture.with(
            ("data: /var/lib/ferry/east", "data: ../lib/./ferry//east/"),
            ("nbd-socket: /run/ferry/east.nbd", "nbd-socket: east.nbd"),
            ("  admin-socket: /run/ferry/east.admin\n", "")), path: "/etc/ferry/east.yaml")
        #expect(config.site.dataDirectory == "/etc/lib/ferry/east")
        #expect(config.listen.nbdSocket == "/etc/ferry/east.nbd")
        #expect(config.listen.adminSocket == "/etc/lib/ferry/east/admin.sock")
    }

    @Test("a relative file path is taken from the current directory")
    func relativeFilePath() throws {
        let config = try SiteConfig.parse(yaml: ConfigFixture.with(("data: /var/lib/ferry/east", "data: state")),
                                          path: "conf/east.yaml")
        let cwd = FileManager.default.currentDirectoryPath
        #expect(config.path == ConfigPath.normalize(cwd + "/conf/east.yaml"))
        #expect(config.site.dataDirectory == ConfigPath.normalize(cwd + "/conf/state"))
    }

    @Test("load reads the file and resolves a relative data directory next to it")
    func loadFromDisk() throws {
        let dir = try ConfigTemporaryDirectory()
        defer { dir.remove() }
        let file = dir.path + "/east.yaml"
        try ConfigFixture.with(("data: /var/lib/ferry/east", "data: state")).write(toFile: file, atomically: true, encoding: .utf8)
        let config = try SiteConfig.load(path: file)
        #expect(config.path == file)
        #expect(config.site.dataDirectory == dir.path + "/state")
    }

    @Test("a missing file, a directory, an empty file and a file of comments are reported")
    func unreadableFiles() throws {
        let dir = try ConfigTemporaryDirectory()
        defer { dir.remove() }
        try "".write(toFile: dir.path + "/empty.yaml", atomically: true, encoding: .utf8)
        try "# nothing yet\n\n".write(toFile: dir.path + "/comments.yaml", atomically: true, encoding: .utf8)
        try Data([0x73, 0x69, 0x74, 0x65, 0xFF, 0xFE]).write(to: URL(fileURLWithPath: dir.path + "/binary.yaml"))
        let cases = [("missing.yaml", "no such file"), ("", "is a directory"), ("empty.yaml", "the file is empty"),
                     ("comments.yaml", "the file is empty"), ("binary.yaml", "is not UTF-8 text")]
        for (name, phrase) in cases {
            let path = name.isEmpty ? dir.path : dir.path + "/" + name
            let error = #expect(throws: ConfigProblems.self) { try SiteConfig.load(path: path) }
            #expect(error?.problems.count == 1)
            #expect(error?.problems.first?.path == "")
            #expect(error?.problems.first?.message.contains(phrase) == true, "\(String(describing: error))")
            #expect(error?.description.hasPrefix("\(path): ") == true, "\(String(describing: error))")
        }
    }

    @Test("problems are printed one a line as FILE: field.path: message")
    func problemsDescription() {
        let problems = ConfigProblems(file: "/etc/ferry/east.yaml", problems: [
            ConfigProblem(path: "site.name", message: "missing; required"),
            ConfigProblem(path: "", message: "the file is empty"),
        ])
        #expect(problems.description == """
            /etc/ferry/east.yaml: site.name: missing; required
            /etc/ferry/east.yaml: the file is empty
            """)
    }

    @Test("sizes render in the largest exact unit", arguments: [
        (4096, "4K"), (20 << 30, "20G"), ((1 << 40) + 4096, "1073741828K"), (1536 << 10, "1536K"),
        (3 << 50, "3P"), (4097, "4097"),
    ] as [(UInt64, String)])
    func renderSize(bytes: UInt64, text: String) {
        #expect(ConfigRendering.size(bytes) == text)
        #expect(ByteSize.parse(text) == bytes)
    }

    @Test("a typo is matched to the field it was meant to be", arguments: [
        ("sise", "size"), ("adress", "address"), ("siteId", "site-id"), ("site_id", "site-id"),
        ("nbdSocket", "nbd-socket"), ("data-dir", "data"), ("warn", "warning"), ("volume", "volumes"),
    ])
    func closestMatch(typed: String, meant: String) {
        let known = ["size", "address", "site-id", "nbd-socket", "nbd", "data", "warning", "volumes", "peers"]
        #expect(ConfigReader.closest(to: typed, among: known) == meant)
    }

    @Test("nothing is suggested for a word that is not close to any field")
    func noCloseMatch() {
        #expect(ConfigReader.closest(to: "colour", among: ["size", "primary"]) == nil)
    }
}

@Suite("HostPort")
struct HostPortTests {
    @Test("valid addresses parse and print back", arguments: [
        ("0.0.0.0:7800", "0.0.0.0", 7800), ("east.example.net:1", "east.example.net", 1),
        ("[::1]:7800", "::1", 7800), ("[fe80::1%eth0]:65535", "fe80::1%eth0", 65535), ("localhost:0", "localhost", 0),
    ])
    func valid(text: String, host: String, port: Int) throws {
        let parsed = try HostPort(parsing: text)
        #expect(parsed == HostPort(host: host, port: port))
        #expect(parsed.description == text)
    }

    @Test("invalid addresses say what is wrong", arguments: [
        ("10.0.0.2", "the port is missing"), ("10.0.0.2:", "the port is missing"), (":7800", "the host is missing"),
        ("::1:7800", "put an IPv6 address in brackets"), ("[::1:7800", "no closing"), ("[::1]7800", "port is missing"),
        ("[east]:7800", "is not an IPv6 address"), ("10.0.0.2:http", "is not a port"), ("10.0.0.2:65536", "is not a port"),
        ("10.0.0.2:-1", "is not a port"), ("east west:1", "is not a host name"), ("", "the port is missing"),
    ])
    func invalid(text: String, phrase: String) {
        #expect(HostPort(text) == nil)
        let error = #expect(throws: HostPort.ParseError.self) { try HostPort(parsing: text) }
        #expect(error?.description.contains(phrase) == true, "\(String(describing: error))")
        #expect(error?.description.hasPrefix("\"\(text)\" is not a host:port") == true)
    }

    @Test("port 0 is refused where it cannot mean anything")
    func portZero() {
        #expect(throws: HostPort.ParseError.self) { try HostPort(parsing: "10.0.0.2:0", allowingPortZero: false) }
        #expect(HostPort("0.0.0.0:0") != nil)
    }
}

/// A directory under the system's temporary directory, removed by `remove()`.
struct ConfigTemporaryDirectory {
    let path: String

    init() throws {
        path = ConfigPath.normalize(FileManager.default.temporaryDirectory.path + "/ferry-config-" + UUID().uuidString)
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    func remove() {
        try? FileManager.default.removeItem(atPath: path)
    }
}

/// The example in docs/configuration.md is a config people copy; it must stay valid.
@Test func theDocumentedExampleParses() throws {
    var url = URL(fileURLWithPath: #filePath)
    for _ in 0..<3 { url.deleteLastPathComponent() }
    let doc = try String(contentsOf: url.appendingPathComponent("docs/configuration.md"), encoding: .utf8)
    let start = try #require(doc.range(of: "```yaml\n"))
    let end = try #require(doc.range(of: "```", range: start.upperBound..<doc.endIndex))
    let yaml = String(doc[start.upperBound..<end.lowerBound])
    let config = try SiteConfig.parse(yaml: yaml, path: "/etc/ferry/east.yaml")
    #expect(!config.volumes.isEmpty)
    #expect(!config.peers.isEmpty)
    // It shows replicas of every mode.
    let modes = Set(config.volumes.flatMap { $0.replicas.values.map(\.mode) })
    #expect(modes == Set(ReplicationMode.allCases))
    #expect(!config.trees.isEmpty, "the example shows a tree too")
}
