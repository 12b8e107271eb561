import FerryCore
import FerryTree
import Foundation

extension Site {
    static func snapshotStatus(_ s: TreeSnapshot?) -> SiteStatus.Tree.Snapshot? {
        s.map { .init(id: $0.id, time: $0.sourceTime, committedAt: $0.committedAt, files: $0.files, bytes: $0.bytes) }
    }

    /// Every configured tree this site takes part in, as status shows it.
    func treeStatuses(_ engine: TreeEngine?) -> [SiteStatus.Tree] {
        guard let engine else { return [] }
        var out: [SiteStatus.Tree] = []
        for tree in config.trees {
            let schedule = tree.schedule?.description
            if let source = engine.sources[tree.name] {
                let s = source.status
                let peers = source.settings.peers
                let replicas = peers.map { peer -> SiteStatus.Tree.Replica in
                    let p = s.peers[peer] ?? TreeSource.PeerState()
                    let state = p.lastError != nil ? "failed" : (s.lagSeconds == 0 && p.lastSnapshot != nil ? "in-sync" : "behind")
                    return .init(peer: peer, target: TreeEngine.directory(tree, on: peer), state: state, lastSnapshot: Self.snapshotStatus(p.lastSnapshot),
                                 lastError: p.lastError, bytesSentLastRun: p.lastRunBytesSent, bytesSent: p.dataBytesTotal,
                                 bytesOnWire: p.wireBytesTotal)
                }
                let snapshots = peers.map { s.peers[$0]?.lastSnapshot }
                let oldest = snapshots.contains { $0 == nil } ? nil : snapshots.compactMap { $0 }.min { $0.sourceTime < $1.sourceTime }
                let progress = s.progress.map { p -> SiteStatus.Tree.Progress in
                    let elapsed = Date().timeIntervalSince(p.startedAt)
                    let eta: Double? = p.bytesRead > 0 && p.expectedBytes > p.bytesRead
                        ? elapsed * Double(p.expectedBytes - p.bytesRead) / Double(p.bytesRead) : nil
                    return .init(startedAt: p.startedAt, filesScanned: p.filesScanned, bytesScanned: p.bytesRead,
                                 expectedFiles: p.expectedFiles, expectedBytes: p.expectedBytes, etaSeconds: eta)
                }
                // A scheduled tree is not watched: its lag is the age of the replicas' copy.
                var lag = s.lagSeconds
                if tree.mode == .scheduled, let oldest { lag = max(lag, Date().timeIntervalSince(oldest.sourceTime)) }
                out.append(.init(name: tree.name, role: "primary", source: source.settings.source, target: nil, mode: tree.mode.rawValue,
                                 schedule: schedule, state: s.state, lastSnapshot: Self.snapshotStatus(oldest),
                                 lagSeconds: (lag * 1000).rounded() / 1000, progress: progress, errors: s.problems,
                                 lastError: s.lastError, nextRunAt: s.nextRunAt, files: s.files, bytes: s.bytes, bytesReceived: nil,
                                 replicas: replicas, epoch: Int64(source.settings.epoch), keptAside: []))
            } else if let receiver = engine.receivers[tree.name] {
                let s = receiver.status
                let lag = s.pendingSince.map { max(0, Date().timeIntervalSince($0)) } ?? 0
                out.append(.init(name: tree.name, role: "replica", source: nil, target: receiver.target, mode: tree.mode.rawValue,
                                 schedule: schedule, state: s.phase, lastSnapshot: Self.snapshotStatus(s.lastSnapshot),
                                 lagSeconds: (lag * 1000).rounded() / 1000, progress: nil, errors: [], lastError: s.lastError,
                                 nextRunAt: nil, files: s.lastSnapshot.map { Int($0.files) }, bytes: s.lastSnapshot.map { UInt64($0.bytes) },
                                 bytesReceived: s.received, replicas: [], epoch: Int64(s.epoch), keptAside: s.keptAside))
            }
        }
        return out
    }
}

extension Site {
    /// Bytes from their hexadecimal digits (two a byte); nil for anything else.
    static func bytes(hex: String) -> [UInt8]? {
        let digits = Array(hex.utf8)
        guard digits.count % 2 == 0 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(digits.count / 2)
        for i in stride(from: 0, to: digits.count, by: 2) {
            guard let byte = UInt8(String(decoding: digits[i..<i + 2], as: UTF8.self), radix: 16) else { return nil }
            out.append(byte)
        }
        return out
    }

    /// `POST /v1/trees/NAME/{snapshots,restore,verify,sync}`.
    func treeAction(_ name: String, _ action: String, value: (String) -> String?) -> (code: Int, body: Data) {
        func reply(_ code: Int, _ key: String, _ text: String) -> (code: Int, body: Data) {
            (code, (try? JSONSerialization.data(withJSONObject: [key: text])) ?? Data())
        }
        guard let tree = config.tree(named: name) else {
            let known = config.trees.map(\.name).joined(separator: ", ")
            return reply(404, "error", "no tree \"\(name)\" is configured on site \(config.site.name)" + (known.isEmpty ? "" : " (trees: \(known))"))
        }
        let engine = state.withLockedValue { $0.trees }
        if action == "promote" {
            guard let engine else { return reply(500, "error", "the site is not running its trees yet") }
            do {
                return reply(200, "message", try engine.promote(name, force: value("force") == "1"))
            } catch {
                return reply(409, "error", "\(error)")
            }
        }
        if action == "sync" {
            guard let source = engine?.sources[name] else {
                return reply(409, "error", "site \(config.site.name) is not the primary of tree \(name) (its primary is \(tree.primary)); run sync there")
            }
            if value("wait") == "1" {
                let (ok, message) = source.syncAndWait(until: Date().addingTimeInterval(24 * 3600))
                return ok ? reply(200, "message", message) : reply(409, "error", message)
            }
            source.changed()
            return reply(200, "message", "a run of \(name) to \(source.settings.peers.joined(separator: ", ")) is starting; `ferry status` shows it")
        }
        guard let receiver = engine?.receivers[name] else {
            let where_ = Set([tree.primary] + tree.replicas.keys).subtracting([config.site.name]).sorted().joined(separator: " or ")
            return reply(409, "error", "site \(config.site.name) keeps no replica of tree \(name); its snapshots are on \(where_): run \(action) there")
        }
        let repository = receiver.repository
        do {
            switch action {
            case "snapshots":
                let all = try repository.snapshots()
                guard !all.isEmpty else { return reply(200, "message", "tree \(name) has no snapshot yet on \(config.site.name)") }
                let f = ISO8601DateFormatter()
                var lines = ["ID      TIME (source, UTC)     FILES        SIZE  ROOT"]
                for s in all {
                    lines.append(String(format: "%-7lld ", s.id) + f.string(from: s.sourceTime).padding(toLength: 22, withPad: " ", startingAt: 0)
                                 + String(format: " %8lld  ", s.files) + ByteSize.format(UInt64(s.bytes)).padding(leading: 10) + "  " + s.root.prefix(12))
                }
                lines.append("restore one with: ferry tree restore \(name) --at ID|TIME --to DIR [--path SUBPATH]")
                return reply(200, "message", lines.joined(separator: "\n"))
            case "restore":
                guard let at = value("at"), !at.isEmpty else { return reply(400, "error", "give --at: a snapshot ID or a UTC time such as 2026-11-30T23:00:00Z") }
                guard let to = value("to"), to.hasPrefix("/") else { return reply(400, "error", "give --to: the directory to restore into (an absolute path)") }
                let selected = try Int64(at).map { try repository.snapshot(id: $0) }
                    ?? Self.parseISOTime(at).flatMap { try repository.snapshot(atOrBefore: Date(timeIntervalSince1970: $0)) }
                guard let snapshot = selected else {
                    let all = try repository.snapshots()
                    let range = all.isEmpty ? "there are none yet" : "they run from \(all.first!.id) (\(ISO8601DateFormatter().string(from: all.first!.sourceTime))) to \(all.last!.id) (\(ISO8601DateFormatter().string(from: all.last!.sourceTime)))"
                    return reply(404, "error", "no snapshot of \(name) at \(at); \(range). `ferry tree snapshots \(name)` lists them")
                }
                let target = (to as NSString).standardizingPath
                if target == receiver.target || target.hasPrefix(receiver.target + "/") {
                    return reply(409, "error", "\(to) is inside the live mirror \(receiver.target); restore somewhere else")
                }
                if let contents = try? FileManager.default.contentsOfDirectory(atPath: target), !contents.isEmpty {
                    return reply(409, "error", "\(target) is not empty; restore into a new or empty directory (nothing was written)")
                }
                // `pathhex`: the path's bytes (names need not be UTF-8); `path`: as text.
                let path = value("pathhex").flatMap(Self.bytes(hex:)) ?? value("path").map { Array($0.utf8) } ?? []
                let started = Date()
                let existed = FileManager.default.fileExists(atPath: target)
                let stats: TreeMirror.Stats
                do {
                    stats = try repository.restore(snapshot, path: TreePath.components(path).reduce([], TreePath.join), to: target)
                } catch {
                    if !existed { _ = rmdir(target) }   // made for this restore and still empty: gone again
                    throw error
                }
                let seconds = String(format: "%.1f", Date().timeIntervalSince(started))
                return reply(200, "message", "restored snapshot \(snapshot.id) of \(name) (as it was at \(ISO8601DateFormatter().string(from: snapshot.sourceTime)))"
                             + (path.isEmpty ? "" : ", \(TreePath.display(path)),") + " into \(target): \(stats.filesWritten) files, "
                             + "\(ByteSize.format(stats.bytesWritten)), \(stats.linked) hard links, in \(seconds) s")
            case "verify":
                let report = try receiver.sync { try repository.verify() }
                if report.damage.isEmpty {
                    return reply(200, "message", "tree \(name): \(report.chunks) chunks re-hashed and \(report.snapshots) snapshots' manifests checked; nothing is damaged")
                }
                return reply(422, "error", "tree \(name): \(report.damage.count) problems:\n" + report.damage.prefix(200).joined(separator: "\n"))
            default:
                return reply(404, "error", "no tree action \(action); use snapshots, restore, verify, sync or promote")
            }
        } catch {
            return reply(500, "error", "\(action) of tree \(name) failed: \(error)")
        }
    }
}
