import FerrySite
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A real `ferry serve` process on loopback with its own data directory, config and log, made
/// with the real CLI (`ferry init`, `ferry id`). Stopped by PID in every path: `stop()`, `kill9()`,
/// or when the value is released.
final class TestSite {
    let name: String
    let root: String
    let dataDirectory: String
    let configPath: String
    let logPath: String
    let replicationPort: Int
    let nbdPort: Int
    var siteID: String = ""
    private(set) var process: Process?
    /// `listen.metrics` on this port when set (before `writeConfig`), with the token file if any.
    var metricsPort: Int?
    var metricsTokenFile: String?
    var metricsURL: String { "http://127.0.0.1:\(metricsPort ?? 0)" }
    /// Extra environment for `ferry serve` (NOTIFY_SOCKET).
    var environment: [String: String] = [:]

    var nbdSocket: String { dataDirectory + "/nbd.sock" }
    var adminSocket: String { dataDirectory + "/admin.sock" }

    init(name: String, root: String) throws {
        self.name = name
        self.root = root
        self.dataDirectory = "\(root)/\(name)"
        self.configPath = "\(root)/\(name).yaml"
        self.logPath = "\(root)/\(name).log"
        self.replicationPort = freePort()
        self.nbdPort = freePort()
        let ferry = try ferryBinary()
        try run(ferry, ["init", "--site", name, "--data", dataDirectory])
        let id = try run(ferry, ["id", "--data", dataDirectory])
        siteID = String(id.stdout.split(separator: " ").first ?? "")
    }

    deinit {
        if let p = process, p.isRunning {
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
        }
    }

    struct Volume {
        var name: String
        var size: String
        var primary: String
        /// `replicas:` entries as YAML flow maps by site, e.g. `["west": "{ mode: sync }"]`.
        var replicas: [String: String] = [:]
        /// `on-promote:` (a shell command), if any.
        var onPromote: String? = nil
        /// `history:` (e.g. `1h`), if any.
        var history: String? = nil
    }

    /// Writes the site's config: peers pinned to the given IDs, volumes, NBD on TCP and a socket.
    func writeConfig(peers: [(name: String, port: Int, siteID: String)] = [], volumes: [Volume] = [],
                     extra: String = "") throws {
        var yaml = """
            site:
              name: \(name)
              data: \(dataDirectory)
            listen:
              replication: 127.0.0.1:\(replicationPort)
              nbd: 127.0.0.1:\(nbdPort)
              nbd-socket: \(nbdSocket)
              admin-socket: \(adminSocket)

            """
        if let metricsPort { yaml += "  metrics: 127.0.0.1:\(metricsPort)\n" }
        if let metricsTokenFile { yaml += "  metrics-token-file: \(metricsTokenFile)\n" }
        yaml += "log-level: debug\n"
        if !peers.isEmpty {
            yaml += "peers:\n"
            for p in peers { yaml += "  \(p.name):\n    address: 127.0.0.1:\(p.port)\n    site-id: \(p.siteID)\n" }
        }
        if !volumes.isEmpty {
            yaml += "volumes:\n"
            for v in volumes {
                yaml += "  \(v.name):\n    size: \(v.size)\n    primary: \(v.primary)\n"
                if let hook = v.onPromote { yaml += "    on-promote: '\(hook.replacingOccurrences(of: "'", with: "''"))'\n" }
                if let history = v.history { yaml += "    history: \(history)\n" }
                if !v.replicas.isEmpty {
                    yaml += "    replicas:\n"
                    for (site, policy) in v.replicas.sorted(by: { $0.key < $1.key }) { yaml += "      \(site): \(policy)\n" }
                }
            }
        }
        yaml += extra
        try yaml.write(toFile: configPath, atomically: true, encoding: .utf8)
    }

    /// Starts `ferry serve` and waits until its admin API answers.
    func start(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try ferryBinary())
        p.arguments = ["serve", "--config", configPath]
        if !environment.isEmpty { p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        if !FileManager.default.fileExists(atPath: logPath) {
            _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        }
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        log.seekToEndOfFile()
        p.standardOutput = log
        p.standardError = log
        p.standardInput = FileHandle.nullDevice
        try p.run()
        process = p
        let up = eventually(.seconds(30)) { !p.isRunning || (try? status()) != nil }
        guard up, p.isRunning else {
            Issue.record("site \(name) did not start; log:\n\(self.log(tail: 40))", sourceLocation: sourceLocation)
            throw TestFailure("site \(name) did not start")
        }
    }

    var pid: Int32 { process?.processIdentifier ?? 0 }
    var isRunning: Bool { process?.isRunning ?? false }

    func status() throws -> SiteStatus {
        let (code, body) = try AdminClient.get(socketPath: adminSocket, path: "/v1/status", timeoutSeconds: 5)
        guard code == 200 else { throw TestFailure("status \(code)") }
        return try SiteStatus.decoder().decode(SiteStatus.self, from: body)
    }

    /// SIGTERM, then wait (up to 30 s, then SIGKILL); returns the exit status.
    @discardableResult
    func stop() -> Int32 {
        guard let p = process else { return 0 }
        if p.isRunning {
            kill(p.processIdentifier, SIGTERM)
            let deadline = ContinuousClock.now + .seconds(30)
            while p.isRunning && ContinuousClock.now < deadline { usleep(20_000) }
            if p.isRunning {
                Issue.record("site \(name) ignored SIGTERM for 30 s; killing it")
                kill(p.processIdentifier, SIGKILL)
            }
        }
        p.waitUntilExit()
        process = nil
        return p.terminationStatus
    }

    func kill9() {
        guard let p = process else { return }
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        process = nil
    }

    /// Freezes the daemon (SIGSTOP): its links stay open, it reads nothing, answers nothing.
    func pause() {
        if let p = process { kill(p.processIdentifier, SIGSTOP) }
    }

    /// Lets a paused daemon run again (SIGCONT).
    func resume() {
        if let p = process { kill(p.processIdentifier, SIGCONT) }
    }

    func uri(_ volume: String) -> String { "nbd://127.0.0.1:\(nbdPort)/\(volume)" }
    func unixURI(_ volume: String) -> String { "nbd+unix:///\(volume)?socket=\(nbdSocket)" }
    func imagePath(_ volume: String) -> String { "\(dataDirectory)/volumes/\(volume).img" }

    func log(tail lines: Int = 1000) -> String {
        let text = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
        return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }
}
