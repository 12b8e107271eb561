import FerryCore
import FerryStore
import Foundation
import Logging
import NIOCore
import Synchronization

/// A tree on its primary: watches (continuous) or waits for the schedule, then runs a scan and
/// sends it to every replica, on a thread of its own.
public final class TreeSource: @unchecked Sendable {
    public struct Settings: Sendable {
        public var name: String
        public var source: String
        public var peers: [String]
        public var continuous: Bool
        public var schedule: Schedule?
        public var exclude: [String]
        public var compress: Bool
        public var bytesPerSecond: UInt64?
        /// The tree's epoch on this site: bumped by every promotion, sent in every hello.
        public var epoch: UInt64 = 1

        public init(name: String, source: String, peers: [String], continuous: Bool, schedule: Schedule?,
                    exclude: [String], compress: Bool, bytesPerSecond: UInt64?, epoch: UInt64 = 1) {
            self.epoch = epoch
            self.name = name
            self.source = source
            self.peers = peers
            self.continuous = continuous
            self.schedule = schedule
            self.exclude = exclude
            self.compress = compress
            self.bytesPerSecond = bytesPerSecond
        }
    }

    public struct PeerState: Sendable {
        public var lastSnapshot: TreeSnapshot?
        public var lastError: String?
        public var lastRunBytesSent: UInt64 = 0
        public var wireBytesTotal: UInt64 = 0
        public var dataBytesTotal: UInt64 = 0
        public init() {}
    }

    public struct Progress: Sendable {
        public var startedAt: Date
        public var filesScanned: Int
        public var bytesRead: UInt64
        /// From the last scan: what this one will probably cover.
        public var expectedFiles: Int
        public var expectedBytes: UInt64
    }

    public struct Status: Sendable {
        public var state: String
        public var lagSeconds: Double
        public var progress: Progress?
        public var problems: [String]
        public var lastError: String?
        public var files: Int
        public var bytes: UInt64
        public var nextRunAt: Date?
        public var peers: [String: PeerState]
    }

    public let settings: Settings
    let catalog: Catalog
    let logger: Logger
    let transports: [String: RemoteTreeTransport]
    let port: any TreePort
    private let condition = NSCondition()
    private var dirty = true
    private var stopped = false
    private var pendingSince: Date? = Date()
    private var covering: Date?
    private var thread: Thread?
    private var watcher: TreeWatcher?
    private let shared = Mutex(Shared())
    private var cache = FilesCache()
    private var cacheRoot: ChunkID?
    private var lastRunStart: Date?
    private var lastRunFailed = false
    /// A run is under way (guarded by `condition`).
    private var running = false
    /// A run was under way when the daemon stopped (the catalog says): it resumes at start.
    private var interrupted = false
    /// Runs asked for by ``syncAndWait(until:)``, the last such request a run began after, and
    /// the last one a finished run covered, with its outcome (guarded by `condition`).
    private var requests: UInt64 = 0
    private var runCovers: UInt64 = 0
    private var finishedCovers: UInt64 = 0
    private var finishedOutcome: (ok: Bool, message: String) = (true, "")

    struct Shared {
        var state = "starting"
        var progress: Progress?
        var problems: [String] = []
        var lastError: String?
        var files = 0
        var bytes: UInt64 = 0
        var nextRunAt: Date?
        var peers: [String: PeerState] = [:]
        var scanProgress: ScanProgress?
    }

    public init(settings: Settings, catalog: Catalog, port: any TreePort, logger: Logger) {
        self.settings = settings
        self.catalog = catalog
        self.logger = logger
        self.port = port
        var transports: [String: RemoteTreeTransport] = [:]
        for peer in settings.peers {
            let transport = RemoteTreeTransport(tree: settings.name, peer: peer, port: port, compress: settings.compress,
                                                bytesPerSecond: settings.bytesPerSecond)
            transport.epoch = settings.epoch
            transports[peer] = transport
        }
        self.transports = transports
        shared.withLock { s in for p in settings.peers { s.peers[p] = PeerState() } }
    }

    public func start() throws {
        cache = try FilesCache.load(settings.name, from: catalog)
        let state = try catalog.treeState(settings.name)
        cacheRoot = state["cacheRoot"].flatMap { ChunkID(bytes: TreeSnapshot.bytes(hex: $0)) }
        interrupted = state["running"] != nil
        if settings.continuous {
            let watcher = TreeWatcher(root: settings.source, changed: { [weak self] in self?.changed() },
                                      problem: { [logger, settings] message in
                                          logger.warning("tree watch: \(message)", metadata: ["tree": "\(settings.name)"])
                                      })
            self.watcher = watcher
            watcher.start()
        }
        let thread = Thread { [self] in loop() }
        thread.name = "ferry-tree-\(settings.name)"
        self.thread = thread
        thread.start()
    }

    public func stop() {
        watcher?.stop()
        condition.lock()
        stopped = true
        condition.broadcast()
        condition.unlock()
        for t in transports.values { t.linkDown("the site is stopping") }
        while thread?.isFinished == false { usleep(10_000) }
    }

    /// Something changed under the source (the watcher), or a run is asked for (`ferry tree sync`,
    /// a peer that came back).
    public func changed() {
        condition.lock()
        dirty = true
        if pendingSince == nil { pendingSince = Date() }
        condition.broadcast()
        condition.unlock()
    }

    public func deliver(_ message: TreeMessage, from peer: String) { transports[peer]?.deliver(message) }
    /// A replica's link came up: a continuous tree runs (the replica may be behind); a scheduled
    /// one only when its last run did not reach every replica.
    public func linkUp(_ peer: String) {
        guard transports[peer] != nil else { return }
        condition.lock()
        // A link that comes up during a run (which may have found no replica connected) runs again.
        if settings.continuous || lastRunFailed || running { dirty = true }
        condition.broadcast()
        condition.unlock()
    }
    public func linkDown(_ peer: String, reason: String) { transports[peer]?.linkDown(reason) }
    public func writable(_ peer: String) { transports[peer]?.writable() }

    public var status: Status {
        condition.lock()
        let oldest = [pendingSince, covering].compactMap { $0 }.min()
        condition.unlock()
        return shared.withLock { s in
            var progress = s.progress
            if let scan = s.scanProgress, progress != nil {
                let (files, bytes) = scan.value
                progress!.filesScanned = files
                progress!.bytesRead = bytes
            }
            var peers = s.peers
            for (peer, t) in transports {
                peers[peer]?.wireBytesTotal = t.wireBytes
                peers[peer]?.dataBytesTotal = t.dataBytes
            }
            return Status(state: s.state, lagSeconds: oldest.map { max(0, Date().timeIntervalSince($0)) } ?? 0,
                          progress: progress, problems: s.problems, lastError: s.lastError, files: s.files, bytes: s.bytes, nextRunAt: s.nextRunAt, peers: peers)
        }
    }

    private func nextScheduled() -> Date? {
        guard !settings.continuous, let schedule = settings.schedule else { return nil }
        let after = Int64((lastRunStart ?? Date()).timeIntervalSince1970)
        // UTC, as for scheduled volumes (docs/configuration.md).
        return Date(timeIntervalSince1970: Double(schedule.nextPoint(afterSeconds: after)))
    }

    private func loop() {
        var failures = 0
        // A scheduled tree runs once at start only if it never ran (no cache yet).
        if !settings.continuous && cacheRoot != nil && !interrupted {
            condition.lock(); dirty = false; pendingSince = nil; condition.unlock()
        }
        while true {
            condition.lock()
            var wake = nextScheduled()
            shared.withLock { $0.nextRunAt = wake; if $0.state == "starting" { $0.state = "idle" } }
            while !stopped && !dirty {
                if let at = wake, Date() >= at { dirty = true; break }
                condition.wait(until: wake ?? Date().addingTimeInterval(3600))
                wake = nextScheduled()
            }
            if stopped {
                condition.unlock()
                return
            }
            dirty = false
            running = true
            runCovers = requests
            covering = pendingSince ?? Date()
            pendingSince = nil
            condition.unlock()

            try? catalog.updateTree(settings.name, upsert: [], delete: [], state: ["running": ISO8601DateFormatter().string(from: Date())])
            let outcome = runOnce()
            let ok = outcome == .done
            if ok { try? catalog.updateTree(settings.name, upsert: [], delete: [], state: ["running": nil]) }
            condition.lock()
            running = false
            lastRunFailed = !ok
            finishedCovers = runCovers
            finishedOutcome = (ok, outcomeMessage(outcome))
            condition.broadcast()
            if outcome == .noReplica {
                // Nothing to send to: wait (without a backoff) until a replica's link comes up.
                pendingSince = [pendingSince, covering].compactMap { $0 }.min()
                covering = nil
                shared.withLock { $0.state = "waiting"; $0.nextRunAt = nil }
            } else if ok {
                covering = nil
                failures = 0
            } else {
                pendingSince = [pendingSince, covering].compactMap { $0 }.min()
                covering = nil
                failures += 1
                let delay = min(30.0, 0.5 * pow(2.0, Double(min(failures, 6))))
                shared.withLock { $0.state = "retrying"; $0.nextRunAt = Date().addingTimeInterval(delay) }
                // Retry after a backoff, sooner if a peer comes back or something changes.
                _ = condition.wait(until: Date().addingTimeInterval(delay))
                dirty = true
            }
            condition.unlock()
        }
    }

    enum Outcome { case done, failed, noReplica }

    /// A run now, waiting until it has finished (`ferry tree sync --wait`): whether every replica
    /// committed it, and what each holds or why it failed. A run already under way does not count:
    /// the one that begins after the request does.
    public func syncAndWait(until deadline: Date) -> (ok: Bool, message: String) {
        condition.lock()
        requests += 1
        let ticket = requests
        dirty = true
        if pendingSince == nil { pendingSince = Date() }
        condition.broadcast()
        while finishedCovers < ticket && !stopped && Date() < deadline { _ = condition.wait(until: deadline) }
        let result = finishedCovers >= ticket ? finishedOutcome
            : (false, stopped ? "the site stopped before the run finished" : "the run had not finished by the deadline; `ferry status` shows it")
        condition.unlock()
        return result
    }

    /// What a finished run did, per replica (called with `condition` held).
    private func outcomeMessage(_ outcome: Outcome) -> String {
        shared.withLock { s in
            if outcome == .noReplica { return "no replica of \(settings.name) is connected; the run waits for one" }
            var lines: [String] = []
            for peer in settings.peers.sorted() {
                let p = s.peers[peer]
                if let error = p?.lastError {
                    lines.append("\(peer): failed: \(error)")
                } else if let snapshot = p?.lastSnapshot {
                    lines.append("\(peer): snapshot \(snapshot.id) committed (\(snapshot.files) files, \(ByteSize.format(UInt64(max(0, snapshot.bytes))))), "
                                 + "\(ByteSize.format(p?.lastRunBytesSent ?? 0)) of chunk data sent")
                }
            }
            if outcome != .done, let error = s.lastError, lines.isEmpty { lines.append(error) }
            return lines.joined(separator: "\n")
        }
    }

    /// One scan, sent to every connected replica; done when every replica committed it.
    private func runOnce() -> Outcome {
        let started = Date()
        lastRunStart = started
        let scanProgress = ScanProgress()
        shared.withLock {
            $0.state = "scanning"
            $0.progress = Progress(startedAt: started, filesScanned: 0, bytesRead: 0, expectedFiles: $0.files, expectedBytes: $0.bytes)
            $0.scanProgress = scanProgress
        }
        defer { shared.withLock { $0.progress = nil; $0.scanProgress = nil } }
        var runs: [String: TreeRun] = [:]
        var failed: [String: String] = [:]
        condition.lock()
        let since = covering
        condition.unlock()
        for (peer, transport) in transports {
            guard port.isConnected(peer) else {
                failed[peer] = "\(peer) is not connected"
                continue
            }
            transport.reset()
            transport.pendingSince = since
            let run = TreeRun(transport: transport, sourceRoot: settings.source)
            do {
                try run.begin(cacheRoot: cacheRoot)
                runs[peer] = run
            } catch {
                failed[peer] = "\(error)"
            }
        }
        guard !runs.isEmpty else {
            if failed.values.allSatisfy({ $0.hasSuffix("is not connected") }) {
                shared.withLock { s in for (peer, message) in failed { s.peers[peer]?.lastError = message } }
                return .noReplica
            }
            record(failed: failed, reports: [:], error: "no replica reachable: " + failed.map { "\($0.key): \($0.value)" }.sorted().joined(separator: "; "))
            return .failed
        }
        let scanner = TreeScanner(source: settings.source, excludes: settings.exclude, cache: cache)
        scanner.progress = scanProgress
        let fan = FanOutSink(runs)
        let scan: TreeScanner.Result
        do {
            scan = try scanner.scan(into: fan)
        } catch {
            for (peer, e) in fan.failures { failed[peer] = "\(e)" }
            record(failed: failed, reports: [:], error: "\(error)")
            return .failed
        }
        for (peer, e) in fan.failures { failed[peer] = "\(e)" }
        let scanned = Date()
        shared.withLock {
            $0.state = "committing"
            $0.files = scan.files
            $0.bytes = scan.bytes
            $0.problems = scan.problems.prefix(100).map(\.description)
        }
        for problem in scan.problems.prefix(20) {
            logger.warning("tree: \(problem.description)", metadata: ["tree": "\(settings.name)"])
        }
        var reports: [String: TreeRun.Report] = [:]
        for (peer, run) in fan.runs {
            do {
                reports[peer] = try run.finish(scan, epoch: Int64(settings.epoch), sourceTime: started)
                // What this replica has up to: a former primary keeps aside what changed after it.
                try? catalog.updateTree(settings.name, upsert: [], delete: [], state: ["sent.\(peer)": "\(started.timeIntervalSince1970)"])
            } catch {
                failed[peer] = "\(error)"
            }
        }
        // The files cache is written after the commits, off the path of the replicas' snapshots
        // (a cache saved or not is right either way: see TreeRun.begin).
        saveCache(scan)
        record(failed: failed, reports: reports, error: nil)
        for (peer, report) in reports {
            logger.info("tree run committed", metadata: [
                "tree": "\(settings.name)", "peer": "\(peer)", "snapshot": "\(report.snapshot.id)", "files": "\(scan.files)",
                "read": "\(scan.filesRead)", "sent": "\(report.bytesSent)",
                "scan": "\(String(format: "%.3f", scanned.timeIntervalSince(started)))s",
                "peerwait": "\(String(format: "%.3f", report.waitedForAnswers))s", "linkwait": "\(String(format: "%.3f", report.waitedForLink))s",
                "seconds": "\(String(format: "%.3f", Date().timeIntervalSince(started)))"])
        }
        return failed.isEmpty ? .done : .failed
    }

    private func record(failed: [String: String], reports: [String: TreeRun.Report], error: String?) {
        for (peer, message) in failed {
            logger.warning("tree run to \(peer) failed: \(message)", metadata: ["tree": "\(settings.name)"])
        }
        shared.withLock { s in
            s.state = failed.isEmpty && error == nil ? "idle" : "error"
            s.lastError = error ?? (failed.isEmpty ? nil : failed.map { "\($0.key): \($0.value)" }.sorted().joined(separator: "; "))
            for (peer, message) in failed { s.peers[peer]?.lastError = message }
            for (peer, report) in reports {
                s.peers[peer]?.lastSnapshot = report.snapshot
                s.peers[peer]?.lastError = nil
                s.peers[peer]?.lastRunBytesSent = report.bytesSent
            }
        }
    }

    /// Writes what changed in the files cache to the catalog, with the scan's root.
    private func saveCache(_ scan: TreeScanner.Result) {
        let (root, _) = TreeRun.rootBlob(scan, sourceRoot: settings.source)
        let (upsert, delete) = scan.cache.changes(from: cache)
        do {
            try catalog.updateTree(settings.name, upsert: upsert, delete: delete, state: ["cacheRoot": root.hex])
            cache = scan.cache
            cacheRoot = root
        } catch {
            logger.error("tree files cache not saved", metadata: ["tree": "\(settings.name)", "error": "\(error)"])
        }
    }
}

/// Files and bytes a running scan has read, readable from other threads.
public final class ScanProgress: Sendable {
    private let counts = Mutex((0, UInt64(0)))
    public init() {}
    public var value: (Int, UInt64) { counts.withLock { $0 } }
    func add(files: Int, bytes: UInt64) { counts.withLock { $0.0 += files; $0.1 += bytes } }
}
