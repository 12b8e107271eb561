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
        /// The metrics listener and status page (`listen.metrics`), e.g. `http://127.0.0.1:9480/`;
        /// null when it is off.
        public var metrics: String?

        private enum CodingKeys: String, CodingKey {
            case name, siteID, pid, startedAt, configPath, dataDirectory, replicationAddress, nbdAddresses, adminSocket, metrics
        }

        /// As synthesized, but `metrics` is written as null when off (scripts test for it).
        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(name, forKey: .name)
            try c.encode(siteID, forKey: .siteID)
            try c.encode(pid, forKey: .pid)
            try c.encode(startedAt, forKey: .startedAt)
            try c.encode(configPath, forKey: .configPath)
            try c.encode(dataDirectory, forKey: .dataDirectory)
            try c.encodeIfPresent(replicationAddress, forKey: .replicationAddress)
            try c.encode(nbdAddresses, forKey: .nbdAddresses)
            try c.encode(adminSocket, forKey: .adminSocket)
            try c.encode(metrics, forKey: .metrics)
        }
    }

    public struct Volume: Codable, Sendable, Equatable {
        public var name: String
        public var sizeBytes: UInt64
        /// `primary` when this site serves it read-write; `secondary` otherwise.
        public var role: String
        public var primarySite: String
        /// On a secondary that no primary streams to and none has since it became a secondary:
        /// true, and `primarySite` is only the configured primary (or the only other site).
        public var primaryGuessed: Bool?
        public var uuid: String?
        public var epoch: Int64?
        public var generation: String?
        /// NBD URIs the volume is exported at: read-write on its primary, read-only on a replica.
        public var exports: [String]
        public var clientsConnected: Int
        /// The image file's path on this site (nil where the site holds no copy).
        public var image: String?
        /// On the primary: one entry per peer the volume replicates to.
        public var replicas: [Replica]
        /// On a replica: where its copy is.
        public var replicaState: ReplicaState?
        /// The last I/O or replication error, if any.
        public var lastError: String?
        /// Why this site takes no writes for the volume although it was its primary (another site
        /// holds a newer epoch), if so.
        public var fenced: String?
        /// Where the live role differs from the config's `primary:` (after promote or demote), and
        /// how to make the config agree.
        public var roleNote: String?
        /// The last `on-promote` hook run here: `running …`, `succeeded: …` or `FAILED …`.
        public var onPromote: String?
        /// The generations this site's copy descends from, oldest first (recorded by promote and
        /// demote; empty before either): each began with a promotion at `epoch`, branching from
        /// its parent at `branchSequence`.
        public var history: [Generation]?
        /// On a secondary: the recovery points it keeps (`history:`), and the point a promotion
        /// in the middle of a catch-up rolls back to.
        public var recoveryPoints: RecoveryPoints?
        /// A DR drill running on this site (`ferry drill`).
        public var drill: Drill?
        /// On a primary: the peers that are primaries of the volume too, with a history that
        /// diverged from this one (split brain; `ferry resolve` settles it).
        public var splitBrain: [String]?

        public struct Generation: Codable, Sendable, Equatable {
            /// The generation's 64-bit ID, in hex.
            public var id: String
            public var epoch: UInt64
            public var branchSequence: UInt64
        }

        public init(name: String, sizeBytes: UInt64, role: String, primarySite: String, uuid: String?, epoch: Int64?,
                    generation: String?, exports: [String], clientsConnected: Int, image: String? = nil,
                    replicas: [Replica] = [], replicaState: ReplicaState? = nil, lastError: String? = nil) {
            self.name = name
            self.sizeBytes = sizeBytes
            self.role = role
            self.primarySite = primarySite
            self.uuid = uuid
            self.epoch = epoch
            self.generation = generation
            self.exports = exports
            self.clientsConnected = clientsConnected
            self.image = image
            self.replicas = replicas
            self.replicaState = replicaState
            self.lastError = lastError
        }
    }

    /// One peer of a volume, as its primary sees it (issue 9: these names are a contract).
    public struct Replica: Codable, Sendable, Equatable {
        public var peer: String
        /// sync, semi-sync, async, scheduled.
        public var mode: String
        /// connecting, initial-sync, catching-up, in-sync, lagging, degraded, blocked, pull-ahead,
        /// waiting, sending-point.
        public var state: String
        /// Why it is in that state, in words.
        public var reason: String
        public var connected: Bool
        /// The peer's copy equals a state of the primary (false during initial sync and catch-up).
        public var consistent: Bool
        /// The live RPO: data bytes and seconds the peer is behind.
        public var lagBytes: UInt64
        public var lagSeconds: Double
        /// Regions marked for the peer in its dirty bitmap.
        public var dirtyBytes: UInt64
        public var inFlightBytes: UInt64
        /// Data bytes sent to the peer since the daemon started.
        public var bytesSent: UInt64
        /// async: journal bytes the peer has not acknowledged, and the journal's bound
        /// (`journal-size`); absent for other modes.
        public var journalBytes: UInt64?
        public var journalLimitBytes: UInt64?
        /// Initial sync or catch-up in progress: bytes left, bytes in all.
        public var syncRemainingBytes: UInt64?
        public var syncTotalBytes: UInt64?
        /// Seconds the sync or catch-up still needs at its rate so far.
        public var syncETASeconds: Double?
        /// RPO is zero (a sync peer, connected, nothing dirty).
        public var rpoZero: Bool
        /// scheduled: the last completed point and when the next is due.
        public var lastPoint: Point?
        public var nextPointAt: Date?
    }

    public struct Point: Codable, Sendable, Equatable {
        public var sequence: UInt64
        public var cutAt: Date
        public var completedAt: Date
        public var bytes: UInt64
    }

    /// A recovery point (`ferry points` lists them all).
    public struct PointRef: Codable, Sendable, Equatable {
        public var id: UInt64
        public var time: Date
        public var sequence: UInt64
        /// history, catch-up or drill.
        public var kind: String
    }

    public struct RecoveryPoints: Codable, Sendable, Equatable {
        public var count: Int
        public var oldest: PointRef?
        public var newest: PointRef?
        /// Bytes the undo log holds (the before-images that make the points reachable).
        public var undoLogBytes: UInt64
        /// Mid catch-up: the consistent state `ferry promote` rolls back to.
        public var rollbackPoint: PointRef?
    }

    public struct Drill: Codable, Sendable, Equatable {
        /// The export name (`VOLUME-drill`) and its NBD URIs.
        public var export: String
        public var exports: [String]
        public var point: PointRef
        public var startedAt: Date
        public var bytesWritten: UInt64
    }

    /// A replica's own view of its copy.
    public struct ReplicaState: Codable, Sendable, Equatable {
        public var consistent: Bool
        public var initialized: Bool
        public var epoch: UInt64
        public var appliedSequence: UInt64
        public var bytesReceived: UInt64
        /// The site whose stream is open to this copy now; nil when no primary streams to it (its
        /// link is down, or its configuration does not list this site as a replica).
        public var streamingFrom: String?
    }

    /// A replicated directory (issue 11), as its primary or a replica sees it.
    public struct Tree: Codable, Sendable, Equatable {
        public struct Snapshot: Codable, Sendable, Equatable {
            public var id: Int64
            /// When the source's scan for it began: the tree as it was then.
            public var time: Date
            public var committedAt: Date
            public var files: Int64
            public var bytes: Int64
        }

        public struct Progress: Codable, Sendable, Equatable {
            public var startedAt: Date
            public var filesScanned: Int
            public var bytesScanned: UInt64
            /// The last run's totals: what this one probably covers.
            public var expectedFiles: Int
            public var expectedBytes: UInt64
            public var etaSeconds: Double?
        }

        public struct Replica: Codable, Sendable, Equatable {
            public var peer: String
            public var target: String?
            /// `in-sync`, `behind` (no snapshot of the last run yet) or `failed`.
            public var state: String
            public var lastSnapshot: Snapshot?
            public var lastError: String?
            public var bytesSentLastRun: UInt64
            /// Chunk data sent since the daemon started (before compression), and all bytes on the wire.
            public var bytesSent: UInt64
            public var bytesOnWire: UInt64
        }

        public var name: String
        /// `primary` (this site holds the source) or `replica`.
        public var role: String
        /// On the primary: the directory replicated.
        public var source: String?
        /// On a replica: the directory it keeps the tree in.
        public var target: String?
        /// `continuous` or `scheduled`.
        public var mode: String
        public var schedule: String?
        /// Primary: `idle`, `scanning`, `committing`, `error`, `retrying`; replica: `idle`,
        /// `receiving`, `applying`.
        public var state: String
        /// The newest snapshot every replica has (primary), or this replica's newest.
        public var lastSnapshot: Snapshot?
        /// Seconds since the oldest change not yet on every replica (0 when none is pending).
        public var lagSeconds: Double
        public var progress: Progress?
        /// Files and directories the last scan could not take (unreadable, changing), each a line.
        public var errors: [String]
        public var lastError: String?
        public var nextRunAt: Date?
        public var files: Int?
        public var bytes: UInt64?
        /// On a replica: chunk bytes received since the daemon started.
        public var bytesReceived: UInt64?
        public var replicas: [Replica]
        /// Bumped by every promotion of the tree.
        public var epoch: Int64 = 1
        /// Files a former primary kept aside instead of overwriting (P6), since the daemon started.
        public var keptAside: [String] = []

        private enum CodingKeys: String, CodingKey {
            case name, role, source, target, mode, schedule, state, lastSnapshot, lagSeconds, progress, errors, lastError
            case nextRunAt, files, bytes, bytesReceived, replicas, epoch, keptAside
        }

        public init(name: String, role: String, source: String?, target: String?, mode: String, schedule: String?, state: String,
                    lastSnapshot: Snapshot?, lagSeconds: Double, progress: Progress?, errors: [String], lastError: String?,
                    nextRunAt: Date?, files: Int?, bytes: UInt64?, bytesReceived: UInt64?, replicas: [Replica],
                    epoch: Int64 = 1, keptAside: [String] = []) {
            self.name = name; self.role = role; self.source = source; self.target = target; self.mode = mode
            self.schedule = schedule; self.state = state; self.lastSnapshot = lastSnapshot; self.lagSeconds = lagSeconds
            self.progress = progress; self.errors = errors; self.lastError = lastError; self.nextRunAt = nextRunAt
            self.files = files; self.bytes = bytes; self.bytesReceived = bytesReceived; self.replicas = replicas
            self.epoch = epoch; self.keptAside = keptAside
        }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            name = try c.decode(String.self, forKey: .name)
            role = try c.decode(String.self, forKey: .role)
            source = try c.decodeIfPresent(String.self, forKey: .source)
            target = try c.decodeIfPresent(String.self, forKey: .target)
            mode = try c.decode(String.self, forKey: .mode)
            schedule = try c.decodeIfPresent(String.self, forKey: .schedule)
            state = try c.decode(String.self, forKey: .state)
            lastSnapshot = try c.decodeIfPresent(Snapshot.self, forKey: .lastSnapshot)
            lagSeconds = try c.decode(Double.self, forKey: .lagSeconds)
            progress = try c.decodeIfPresent(Progress.self, forKey: .progress)
            errors = try c.decode([String].self, forKey: .errors)
            lastError = try c.decodeIfPresent(String.self, forKey: .lastError)
            nextRunAt = try c.decodeIfPresent(Date.self, forKey: .nextRunAt)
            files = try c.decodeIfPresent(Int.self, forKey: .files)
            bytes = try c.decodeIfPresent(UInt64.self, forKey: .bytes)
            bytesReceived = try c.decodeIfPresent(UInt64.self, forKey: .bytesReceived)
            replicas = try c.decode([Replica].self, forKey: .replicas)
            epoch = try c.decodeIfPresent(Int64.self, forKey: .epoch) ?? 1
            keptAside = try c.decodeIfPresent([String].self, forKey: .keptAside) ?? []
        }

        /// `lastSnapshot` and `lagSeconds` are always present (null when there is none yet).
        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(name, forKey: .name)
            try c.encode(role, forKey: .role)
            try c.encodeIfPresent(source, forKey: .source)
            try c.encodeIfPresent(target, forKey: .target)
            try c.encode(mode, forKey: .mode)
            try c.encodeIfPresent(schedule, forKey: .schedule)
            try c.encode(state, forKey: .state)
            try c.encode(lastSnapshot, forKey: .lastSnapshot)
            try c.encode(lagSeconds, forKey: .lagSeconds)
            try c.encodeIfPresent(progress, forKey: .progress)
            try c.encode(errors, forKey: .errors)
            try c.encodeIfPresent(lastError, forKey: .lastError)
            try c.encodeIfPresent(nextRunAt, forKey: .nextRunAt)
            try c.encodeIfPresent(files, forKey: .files)
            try c.encodeIfPresent(bytes, forKey: .bytes)
            try c.encodeIfPresent(bytesReceived, forKey: .bytesReceived)
            try c.encode(replicas, forKey: .replicas)
            try c.encode(epoch, forKey: .epoch)
            if !keptAside.isEmpty { try c.encode(keptAside, forKey: .keptAside) }
        }
    }

    public var site: Site
    public var peers: [PeerLinkStatus]
    public var volumes: [Volume]
    public var trees: [Tree] = []

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
        if let metrics = site.metrics { out += "  status page and /metrics at \(metrics)\n" }
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
        if volumes.isEmpty { out += "  (none held on this site)\n" }
        for v in volumes {
            var line = "  \(v.name.padding(12))\(ByteSize.format(v.sizeBytes).padding(8))\(v.role.padding(11))"
            if v.role == "primary" {
                line += "epoch \(v.epoch ?? 0), \(v.clientsConnected) client\(v.clientsConnected == 1 ? "" : "s")"
                for e in v.exports { line += "\n      \(e)" }
                for r in v.replicas { line += "\n      → " + Self.render(r, now: now) }
            } else {
                if v.primaryGuessed == true {
                    line += v.primarySite == site.name ? "no primary known yet" : "no primary known yet (configured: \(v.primarySite))"
                } else {
                    line += "primary is \(v.primarySite)"
                }
                if let r = v.replicaState {
                    line += r.consistent ? ", consistent at sequence \(r.appliedSequence)"
                        : r.initialized ? ", catching up (inconsistent until it ends)" : ", initial sync in progress (not yet consistent)"
                    line += ", \(ByteSize.format(r.bytesReceived)) received"
                    if r.streamingFrom == nil {
                        line += v.primarySite == site.name ? "\n      no stream from a primary now: promote a site, or this one again (`ferry promote \(v.name)`)"
                            : "\n      no stream from a primary now: is the link to \(v.primarySite) up, and does its config list this site as a replica?"
                    }
                }
                for e in v.exports { line += "\n      \(e) (read-only)" }
            }
            if let h = v.history, let last = h.last {
                line += "\n      history: " + h.map { "epoch \($0.epoch)" + ($0.branchSequence > 0 ? " from sequence \($0.branchSequence)" : "") }
                    .joined(separator: " → ") + " (generation \(last.id))"
            }
            if let rp = v.recoveryPoints {
                if let oldest = rp.oldest, let newest = rp.newest, oldest.id == newest.id {
                    line += "\n      recovery points: 1, #\(newest.id) \(Self.age(from: newest.time, to: now)) ago "
                        + "(undo log \(ByteSize.format(rp.undoLogBytes)))"
                } else if let oldest = rp.oldest, let newest = rp.newest {
                    line += "\n      recovery points: \(rp.count), #\(oldest.id) \(Self.age(from: oldest.time, to: now)) ago to #\(newest.id) "
                        + "\(Self.age(from: newest.time, to: now)) ago (undo log \(ByteSize.format(rp.undoLogBytes)))"
                } else {
                    line += "\n      recovery points: none yet"
                }
                if let back = rp.rollbackPoint { line += "\n      a promotion now rolls back to point #\(back.id) (sequence \(back.sequence)), the state before this catch-up" }
            }
            if let d = v.drill {
                line += "\n      DRILL running since \(Self.age(from: d.startedAt, to: now)) ago at point #\(d.point.id): \(d.exports.first ?? d.export), "
                    + "\(ByteSize.format(d.bytesWritten)) written; end it with `ferry drill \(v.name) --end`"
            }
            if let f = v.fenced { line += "\n      FENCED: \(f)" }
            if let h = v.onPromote { line += "\n      on-promote hook \(h)" }
            if let n = v.roleNote { line += "\n      note: \(n)" }
            if let e = v.lastError { line += "\n      last error: \(e)" }
            out += line + "\n"
        }
        if !trees.isEmpty { out += "\ntrees\n" }
        for t in trees {
            var line = "  \(t.name)  \(t.role)  \(t.mode)\(t.schedule.map { " (\($0))" } ?? "")  \(t.state)"
            line += t.role == "primary" ? "  source \(t.source ?? "?")" : "  target \(t.target ?? "?")"
            if let s = t.lastSnapshot {
                line += "\n      last snapshot #\(s.id) of \(Self.age(from: s.time, to: now)) ago: \(s.files) files, \(ByteSize.format(UInt64(max(0, s.bytes))))"
            } else {
                line += "\n      no snapshot yet"
            }
            line += t.lagSeconds > 0 ? ", lag \(String(format: "%.1f", t.lagSeconds)) s" : ", nothing pending"
            if let p = t.progress {
                // The estimate is the last snapshot's count: a tree that grew since passes it.
                let of = p.expectedFiles > p.filesScanned ? " of ~\(p.expectedFiles)" : ""
                line += "\n      scanning: \(p.filesScanned)\(of) files, \(ByteSize.format(p.bytesScanned))"
                if let eta = p.etaSeconds { line += ", about \(Int(eta.rounded())) s left" }
            }
            for r in t.replicas {
                line += "\n      → \(r.peer): \(r.state)"
                if let s = r.lastSnapshot { line += ", snapshot #\(s.id)" }
                line += ", \(ByteSize.format(r.bytesSent)) sent since start"
                if let e = r.lastError { line += "; \(e)" }
            }
            if let next = t.nextRunAt, t.mode == "scheduled" { line += "\n      next run in \(Self.age(from: now, to: next))" }
            if !t.errors.isEmpty {
                line += "\n      \(t.errors.count) path\(t.errors.count == 1 ? "" : "s") not replicated this run:"
                for e in t.errors.prefix(5) { line += "\n        \(e)" }
                if t.errors.count > 5 { line += "\n        … (`ferry status --json` lists up to 100)" }
            }
            if let e = t.lastError { line += "\n      last error: \(e)" }
            out += line + "\n"
        }
        return out
    }

    static func render(_ r: Replica, now: Date) -> String {
        var line = "\(r.peer) \(r.mode): \(r.state)"
        if r.mode == "sync" || r.mode == "semi-sync" { line += r.rpoZero ? " (RPO 0)" : " (RPO not 0)" }
        line += ", lag \(ByteSize.format(r.lagBytes)) / \(String(format: "%.1f", r.lagSeconds)) s"
        if let remaining = r.syncRemainingBytes, let total = r.syncTotalBytes, total > 0 {
            let done = Double(total - min(total, remaining)) / Double(total) * 100
            line += String(format: ", sync %.0f%% (%@ left", done, ByteSize.format(remaining))
            if let eta = r.syncETASeconds { line += ", about \(Self.age(from: now, to: now.addingTimeInterval(eta))) to go" }
            line += ")"
        }
        line += ", sent \(ByteSize.format(r.bytesSent))"
        if !r.consistent { line += ", replica inconsistent" }
        if let p = r.lastPoint { line += ", last point \(Self.age(from: p.completedAt, to: now)) ago (\(ByteSize.format(p.bytes)))" }
        if let next = r.nextPointAt {
            // A point whose time has come waits for the replica (unreachable, or a copy under way).
            line += next.timeIntervalSince(now) < -1 ? ", a point due \(Self.age(from: next, to: now)) ago waits for it"
                : ", next in \(Self.age(from: now, to: next))"
        }
        line += "\n        \(r.reason)"
        return line
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
    /// Left-aligned in a column of `width`, with at least one space after.
    func padding(_ width: Int) -> String {
        count >= width ? self + " " : self + String(repeating: " ", count: width - count)
    }

    /// Right-aligned in a column of `width` (`String(format: "%10@")` does not pad on Linux).
    func padding(leading width: Int) -> String {
        count >= width ? self : String(repeating: " ", count: width - count) + self
    }
}
