import ArgumentParser
import CFerrySys
import FerryCore
import FerrySite
import FerryWire
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Two sites on loopback, each its own `ferry serve` process, pinned to each other, with a volume
/// exported over NBD from the first — so a person can see a site run, kill one, and watch the other.
struct Quickstart: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run two sites on this machine (east and west), pinned to each other, with a volume exported over NBD.")

    @Option(help: "Directory for the sites' data, configs and logs (default: a new temporary directory).")
    var dir: String?
    @Option(help: "Size of the demo volume.") var size: String = "1G"
    @Option(help: "How vm1 replicates from east to west: sync, semi-sync, async or scheduled.") var mode: String = "sync"
    @Flag(help: "Print the status once and exit, stopping both sites (for scripts).") var once = false

    /// vm1, primary east, replicated to west, which keeps a day of recovery points (for the drill
    /// and point-in-time commands the quickstart prints).
    static func quickstartVolume(sizeBytes: UInt64, policy: ReplicaPolicy) -> VolumeConfig {
        var volume = VolumeConfig(name: "vm1", sizeBytes: sizeBytes, primary: "east", replicas: ["west": policy])
        volume.history = HistoryLimit(seconds: 86_400, bytes: nil)
        return volume
    }

    func run() async throws {
        // Each line as it is printed, also into a pipe (`ferry quickstart | tee log`).
        ferry_stdout_line_buffered()
        guard let replicationMode = ReplicationMode(rawValue: mode) else {
            printError("--mode \"\(mode)\" is not a mode; use sync, semi-sync, async or scheduled")
            throw ExitCode(2)
        }
        var policy = ReplicaPolicy(mode: replicationMode)
        if replicationMode == .scheduled { policy.schedule = Schedule.parseEvery("15m") }
        guard let sizeBytes = ByteSize.parse(size), sizeBytes > 0, sizeBytes % 4096 == 0 else {
            printError("--size \"\(size)\" is not a size; use 512M, 20G, 1T")
            throw ExitCode(2)
        }
        let base: String
        if let dir {
            base = URL(fileURLWithPath: dir).standardizedFileURL.path
            try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        } else {
            var template = Array("/tmp/ferry-quickstart-XXXXXX".utf8CString)
            guard let made = mkdtemp(&template) else { throw SiteError("mkdtemp failed: \(String(cString: strerror(errno)))") }
            base = String(cString: made)
        }
        let names = ["east", "west"]
        // A small tree replicated continuously from east to west.
        let treeSource = "\(base)/east-docs", treeTarget = "\(base)/west-docs"
        try FileManager.default.createDirectory(atPath: treeSource, withIntermediateDirectories: true)
        if !FileManager.default.fileExists(atPath: treeSource + "/README.txt") {
            try "Files dropped here are replicated to \(treeTarget) within a second.\n"
                .write(toFile: treeSource + "/README.txt", atomically: true, encoding: .utf8)
        }
        let tree = TreeConfig(name: "docs", primary: "east", source: treeSource, replicas: ["west": treeTarget], mode: .continuous,
                              keep: Retention(grid: Retention.parseGrid("60x1m | 24x1h")!, last: 10))
        var identities: [String: SiteIdentity] = [:]
        for name in names {
            let data = "\(base)/\(name)"
            try FileManager.default.createDirectory(atPath: data, withIntermediateDirectories: true)
            if let existing = try? SiteIdentity.load(from: data) {
                identities[name] = existing
            } else {
                let id = try SiteIdentity.generate(siteName: name)
                try id.write(to: data)
                identities[name] = id
            }
        }
        let ports = try (0..<6).map { _ in try freeLoopbackPort() }
        let replication = ["east": ports[0], "west": ports[1]]
        let nbdPorts = ["east": ports[2], "west": ports[3]]
        let metricsPorts = ["east": ports[4], "west": ports[5]]
        var configPaths: [String: String] = [:]
        var adminSockets: [String: String] = [:]
        for name in names {
            let other = names.first { $0 != name }!
            let data = "\(base)/\(name)"
            let config = SiteConfig(
                site: SiteSection(name: name, dataDirectory: data),
                listen: ListenSection(replication: HostPort(host: "127.0.0.1", port: replication[name]!),
                                      nbd: HostPort(host: "127.0.0.1", port: nbdPorts[name]!),
                                      nbdSocket: "\(data)/nbd.sock", adminSocket: "\(data)/admin.sock",
                                      metrics: HostPort(host: "127.0.0.1", port: metricsPorts[name]!)),
                peers: [PeerConfig(name: other, address: HostPort(host: "127.0.0.1", port: replication[other]!),
                                   siteID: identities[other]!.siteID)],
                volumes: [Self.quickstartVolume(sizeBytes: sizeBytes, policy: policy)],
                logLevel: "info", path: "\(base)/\(name).yaml")
            var withTree = config
            withTree.trees = [tree]
            try withTree.yaml().write(toFile: config.path, atomically: true, encoding: .utf8)
            configPaths[name] = config.path
            adminSockets[name] = config.listen.adminSocket
        }

        print("ferry quickstart: two sites in \(base)\n")
        var children: [String: Process] = [:]
        let stopAll = {
            for (_, p) in children where p.isRunning { kill(p.processIdentifier, SIGTERM) }
            for (_, p) in children { p.waitUntilExit() }
        }
        for name in names {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: try selfExecutable())
            p.arguments = ["serve", "--config", configPaths[name]!]
            _ = FileManager.default.createFile(atPath: "\(base)/\(name).log", contents: nil)
            let log = try FileHandle(forWritingTo: URL(fileURLWithPath: "\(base)/\(name).log"))
            log.seekToEndOfFile()
            p.standardOutput = log
            p.standardError = log
            try p.run()
            children[name] = p
            print("started \(name): pid \(p.processIdentifier), log \(base)/\(name).log")
        }

        // Wait until both answer and see each other.
        let deadline = Date().addingTimeInterval(30)
        var statuses: [String: SiteStatus] = [:]
        while Date() < deadline {
            for name in names where children[name]!.isRunning {
                statuses[name] = try? fetchStatus(socket: adminSockets[name]!)
            }
            if let dead = names.first(where: { !(children[$0]?.isRunning ?? false) }) {
                stopAll()
                printError("site \(dead) exited during start-up; see \(base)/\(dead).log")
                throw ExitCode(1)
            }
            if names.allSatisfy({ statuses[$0]?.peers.allSatisfy { $0.state == .connected } ?? false }),
               statuses["east"]?.volumes.first?.replicas.first?.connected == true { break }
            try await Task.sleep(for: .milliseconds(200))
        }
        guard let east = statuses["east"], let vm1 = east.volumes.first(where: { $0.name == "vm1" }) else {
            stopAll()
            printError("the sites did not come up within 30 s; see \(base)/east.log and \(base)/west.log")
            throw ExitCode(1)
        }
        let uri = vm1.exports.first { $0.hasPrefix("nbd://") } ?? ""
        print("""

            volume vm1 (\(ByteSize.format(sizeBytes))) is exported by east over NBD:
              \(vm1.exports.joined(separator: "\n  "))

            vm1 replicates from east to west in \(replicationMode.rawValue) mode\(replicationMode == .scheduled ? " (a point every 15 minutes, or now with `ferry checkpoint vm1 --config \(configPaths["east"]!)`)" : "").
            west holds the replica at \(statuses["west"]?.volumes.first?.image ?? "?") and exports it read-only.

            status pages (live; Prometheus metrics at /metrics on the same listeners):
              east  \(east.site.metrics ?? "(off)")
              west  \(statuses["west"]?.site.metrics ?? "(off)")

            see it work (in another terminal):
              nbdinfo \(uri)
              qemu-io -f raw -c 'write -P 0xab 0 1M' \(uri)          # write on east
              ferry status --config \(configPaths["west"]!)           # west's copy: consistent, sequence, bytes received
              ferry status --config \(configPaths["east"]!)           # east's view of west: state, lag, bytes sent
              qemu-io -f raw -r -c 'read -P 0xab 0 1M' \(statuses["west"]?.volumes.first?.exports.first { $0.hasPrefix("nbd://") } ?? "")   # read it on west
            kill one (kill \(children["west"]!.processIdentifier) stops west) and watch east report it.

            a failover drill, both sites up (docs/operations.md has the runbooks):
              ferry switchover vm1 --to west --config \(configPaths["east"]!)   # west takes over; each step is printed
              qemu-io -f raw -c 'write -P 0xcd 0 1M' \(statuses["west"]?.volumes.first?.exports.first { $0.hasPrefix("nbd://") } ?? "")
              ferry status --config \(configPaths["west"]!)          # west is primary at epoch 3; east follows it
              ferry switchover vm1 --to east --config \(configPaths["west"]!)   # and back
            or a failover: kill -9 east, `ferry promote vm1` on west; restart east and it gives way on its own.
            a DR drill without downtime (west keeps 24 h of recovery points; replication goes on):
              ferry points vm1 --config \(configPaths["west"]!)             # the points west can go back to
              ferry drill vm1 --config \(configPaths["west"]!)              # a writable clone, exported as vm1-drill
              qemu-io -f raw -c 'write -P 0xee 0 1M' \((statuses["west"]?.volumes.first?.exports.first { $0.hasPrefix("nbd://") } ?? "") + "-drill")
              ferry drill vm1 --end --config \(configPaths["west"]!)        # discard it
            and point-in-time: with east gone, `ferry promote vm1 --at ID|TIME` on west promotes one of those points.

            tree docs replicates continuously from east to west (docs/trees.md):
              drop a file into  \(treeSource)
              and watch it in   \(treeTarget)        (within a second; e.g. `watch ls -l \(treeTarget)`)
              ferry tree snapshots docs --config \(configPaths["west"]!)          # every run is a snapshot
              ferry tree restore docs --at ID --to /tmp/docs-restored --config \(configPaths["west"]!)

            """)
        // The tree's first snapshot, so the status below shows it.
        let treeDeadline = Date().addingTimeInterval(20)
        while Date() < treeDeadline {
            if let west = try? fetchStatus(socket: adminSockets["west"]!), west.trees.first?.lastSnapshot != nil {
                statuses["west"] = west
                statuses["east"] = (try? fetchStatus(socket: adminSockets["east"]!)) ?? statuses["east"]
                break
            }
            try await Task.sleep(for: .milliseconds(200))
        }
        print("ready")
        for name in names { if let s = statuses[name] { print(s.rendered()) } }
        if once {
            stopAll()
            print("stopped both sites; data is in \(base)")
            return
        }
        print("live status follows when it changes; Ctrl-C stops both sites.\n")
        let signals = SignalWaiter()
        var last: [String: String] = [:]
        for name in names { last[name] = statuses[name].map(summary) }
        while !signals.received {
            try? await Task.sleep(for: .milliseconds(500))
            for name in names {
                let running = children[name]!.isRunning
                let current = running ? ((try? fetchStatus(socket: adminSockets[name]!)).map(summary) ?? "not answering") : "stopped (exit \(children[name]!.terminationStatus))"
                if current != last[name] {
                    print("\(timestamp())  \(name): \(current)")
                    last[name] = current
                }
            }
        }
        print("\nstopping both sites…")
        stopAll()
        print("stopped. Data, configs and logs stay in \(base); `ferry quickstart --dir \(base)` starts them again.")
    }

    private func fetchStatus(socket: String) throws -> SiteStatus {
        let (code, body) = try AdminClient.get(socketPath: socket, path: "/v1/status", timeoutSeconds: 2)
        guard code == 200 else { throw SiteError("status \(code)") }
        return try SiteStatus.decoder().decode(SiteStatus.self, from: body)
    }

    /// What a person cares about changing: links up or down, replication states, a lag crossing
    /// 1 MiB or 1 s, clients coming and going. Figures that move all the time (RTT, exact lag)
    /// stay in `ferry status`.
    private func summary(_ s: SiteStatus) -> String {
        let peers = s.peers.map { "\($0.name) \($0.state.rawValue)" }.joined(separator: ", ")
        var parts = ["peer " + peers]
        for v in s.volumes {
            if v.role == "primary" {
                var text = "\(v.name): \(v.clientsConnected) NBD client\(v.clientsConnected == 1 ? "" : "s")"
                for r in v.replicas {
                    text += ", → \(r.peer) \(r.state)"
                    if r.lagBytes > 1 << 20 || r.lagSeconds > 1 { text += " (lagging)" }
                    if !r.consistent { text += " (inconsistent)" }
                }
                parts.append(text)
            } else if let r = v.replicaState {
                parts.append("\(v.name): replica \(r.consistent ? "consistent" : r.initialized ? "catching up" : "initial sync")")
            }
        }
        return parts.joined(separator: "; ")
    }

    private func timestamp() -> String {
        let f = DateFormatter()
        f.dateFormat = "HH:mm:ss"
        return f.string(from: Date())
    }
}

/// The path of the running `ferry` binary, to start the sites with.
func selfExecutable() throws -> String {
    var buffer = [UInt8](repeating: 0, count: 4096)
    let n = buffer.withUnsafeMutableBufferPointer { p in
        p.baseAddress!.withMemoryRebound(to: CChar.self, capacity: p.count) { readlink("/proc/self/exe", $0, p.count - 1) }
    }
    guard n > 0 else { throw SiteError("cannot find the ferry binary (/proc/self/exe): \(String(cString: strerror(errno)))") }
    return String(decoding: buffer[0..<n], as: UTF8.self)
}

/// Catches SIGINT and SIGTERM so the quickstart can stop its sites before it exits.
final class SignalWaiter: @unchecked Sendable {
    // Safe: `flag` is only written by the dispatch sources' handlers on `queue` and read with
    // `queue.sync`, so every access is serialised by the queue.
    private let queue = DispatchQueue(label: "ferry.signals")
    private var flag = false
    private var sources: [any DispatchSourceSignal] = []

    init() {
        for sig in [SIGINT, SIGTERM] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: queue)
            source.setEventHandler { [unowned self] in flag = true }
            source.resume()
            sources.append(source)
        }
    }

    var received: Bool { queue.sync { flag } }
}
