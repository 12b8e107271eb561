import FerryCore
import FerryNBD
import FerryStore
import FerryVolume
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// Recovery points on a secondary (issue 10 §6, §7): `ferry points`, `promote --at`, `ferry drill`.
extension Site {
    /// A drill running on this site: its export shows a point of the replica, writable, while
    /// replication goes on underneath.
    struct DrillState: Sendable {
        var export: String
        var point: RecoveryPoint
        var startedAt: Date
        var device: DrillDevice
    }

    static func drillExportName(_ volume: String) -> String { volume + "-drill" }

    /// The point `text` names for `replica`: a point ID (`12`), or an ISO 8601 UTC time
    /// (`2026-11-30T23:00:00Z`) meaning the newest point at or before it. The refusal says
    /// which points there are.
    static func point(_ text: String, of replica: ReplicaVolumeRuntime, volume: String) -> Result<RecoveryPoint, RoleRefusal> {
        let points = replica.undo.points
        let range = points.isEmpty ? "it keeps none (set `history:` on the volume, e.g. `history: 24h`)"
            : "it keeps \(points.count), #\(points.first!.id) at \(Self.isoTime(points.first!.time)) to #\(points.last!.id) at \(Self.isoTime(points.last!.time))"
        func refuse(_ why: String) -> Result<RecoveryPoint, RoleRefusal> {
            .failure(RoleRefusal(reply: reply(409, "error", "\(why); \(range). Nothing changed; `ferry points \(volume)` lists them")))
        }
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        if let id = UInt64(trimmed.hasPrefix("#") ? String(trimmed.dropFirst()) : trimmed) {
            guard let point = replica.undo.point(id) else { return refuse("no recovery point #\(id) of \(volume) here") }
            return .success(point)
        }
        guard let time = parseISOTime(trimmed) else {
            return .failure(RoleRefusal(reply: reply(400, "error",
                "\"\(text)\" is neither a point ID (as `ferry points \(volume)` lists) nor a UTC time such as 2026-11-30T23:00:00Z; nothing changed")))
        }
        guard let point = points.last(where: { $0.time <= time }) else {
            return refuse("no recovery point of \(volume) at or before \(Self.isoTime(time))")
        }
        return .success(point)
    }

    static func parseISOTime(_ text: String) -> Double? {
        let plain = ISO8601DateFormatter()
        plain.formatOptions = [.withInternetDateTime]
        let fractional = ISO8601DateFormatter()
        fractional.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return (plain.date(from: text) ?? fractional.date(from: text))?.timeIntervalSince1970
    }

    static func isoTime(_ seconds: Double) -> String {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return f.string(from: Date(timeIntervalSince1970: seconds))
    }

    /// `POST /v1/volumes/NAME/points`: the recovery points this secondary keeps, oldest first.
    func points(_ name: String) -> AdminReply {
        withRoleContext(name) { context in
            guard let replica = context.engine.replica(name) else {
                return Self.reply(409, "error", "site \(config.site.name) is the primary of \(name): recovery points are kept on its secondaries")
            }
            let points = replica.undo.points
            var lines: [String] = []
            if let window = context.volume.config.history {
                let parts = [window.seconds.map { DurationText.format(seconds: $0) }, window.bytes.map { ByteSize.format($0) }].compactMap { $0 }
                lines.append("recovery points of \(name) on \(config.site.name) (history: \(parts.joined(separator: ", ")); undo log \(ByteSize.format(replica.undo.size))):")
            } else {
                lines.append("recovery points of \(name) on \(config.site.name) (no `history:` configured: only a running catch-up's or drill's base is kept):")
            }
            if points.isEmpty { return Self.reply(200, "message", (lines + ["  none"]).joined(separator: "\n")) }
            // Columns padded by hand: `String(format: "%-6@")` does not pad on Linux.
            func row(_ cells: String...) -> String {
                "  " + zip(cells, [7, 28, 11, 11]).map { $0.padding($1) }.joined() + cells[4]
            }
            lines.append(row("ID", "TIME (UTC)", "SEQUENCE", "TO UNDO", "KIND"))
            // Sequences count along one primary's line: where the points move to another
            // generation (a promotion happened between them), a line says so.
            let generations = Set(points.map(\.position.generation))
            var shown: UInt64?
            for p in points {
                if generations.count > 1, p.position.generation != shown {
                    shown = p.position.generation
                    lines.append("  -- generation \(GenerationRecord.hex(p.position.generation)) (epoch \(p.position.epoch)):")
                }
                lines.append(row("#\(p.id)", Self.isoTime(p.time), "\(p.position.appliedSeq)",
                                 ByteSize.format(replica.undo.undoBytes(after: p.id)), p.kind))
            }
            if let last = points.last {
                lines.append("promote at one: `ferry promote \(name) --at \(last.id)` or `--at \(Self.isoTime(last.time))`; test one without downtime: `ferry drill \(name) --at \(last.id)`")
            }
            return Self.reply(200, "message", lines.joined(separator: "\n"))
        }
    }

    /// `POST /v1/volumes/NAME/drill[?at=POINT][&end=1]`: exports a writable copy-on-write clone of
    /// a recovery point (the replica's state now without `at`) as `NAME-drill`; replication goes on
    /// untouched. `end` discards it.
    func drill(_ name: String, at: String?, end: Bool) -> AdminReply {
        withRoleContext(name) { context in
            let me = config.site.name
            guard let replica = context.engine.replica(name) else {
                return Self.reply(409, "error", "site \(me) is the primary of \(name): run the drill on a secondary, which is what a failover would promote")
            }
            let exportName = Self.drillExportName(name)
            if end {
                guard let drill = state.withLockedValue({ $0.drills.removeValue(forKey: name) }) else {
                    return Self.reply(409, "error", "no drill of \(name) is running on \(me); nothing changed")
                }
                exports.remove(exportName)
                replica.endDrill()
                drill.device.discard()
                logger.notice("volume \(name): drill ended", metadata: ["export": "\(exportName)"])
                return Self.reply(200, "message", "drill of \(name) ended: export \(exportName) removed, what it wrote discarded")
            }
            if state.withLockedValue({ $0.drills[name] != nil }) {
                return Self.reply(409, "error", "a drill of \(name) is already running (export \(exportName)); end it with `ferry drill \(name) --end`")
            }
            if config.volumes.contains(where: { $0.name == exportName }) {
                return Self.reply(409, "error", "a volume is named \(exportName), the name a drill of \(name) would export as; nothing changed")
            }
            var pointID: UInt64?
            if let at {
                switch Self.point(at, of: replica, volume: name) {
                case .success(let p): pointID = p.id
                case .failure(let refusal): return refusal.reply
                }
            }
            let point: RecoveryPoint
            let device: DrillDevice
            do {
                point = try replica.startDrill(at: pointID)
                let overlay = config.site.dataDirectory + "/volumes/\(name).state/drill.img"
                device = try DrillDevice(replica: replica, point: point.id, overlayPath: overlay, threadPool: threadPool)
            } catch {
                replica.endDrill()
                return Self.reply(409, "error", "cannot start a drill of \(name): \(error); nothing changed")
            }
            state.withLockedValue { $0.drills[name] = DrillState(export: exportName, point: point, startedAt: Date(), device: device) }
            exports.add(NBDExport(name: exportName, description: "ferry drill of \(name) at point #\(point.id)", device: device))
            let uris = state.withLockedValue { $0.nbdURIBases }.map { Self.uri(base: $0, export: exportName) }
            logger.notice("volume \(name): drill started", metadata: ["export": "\(exportName)", "point": "\(point.id)"])
            return Self.reply(200, "message", [
                "drill of \(name) on \(me): point #\(point.id) (\(Self.isoTime(point.time)), sequence \(point.position.appliedSeq)) exported read-write at \(uris.joined(separator: " and "))",
                "writes go to a copy-on-write overlay; the replica keeps replicating, untouched",
                "boot a test VM from it, then end the drill: `ferry drill \(name) --end`",
            ].joined(separator: "\n"))
        }
    }

    /// A promotion ends a drill on the volume first: the site serves the volume itself now.
    func endDrillForPromotion(_ name: String, replica: ReplicaVolumeRuntime) -> String? {
        guard let drill = state.withLockedValue({ $0.drills.removeValue(forKey: name) }) else { return nil }
        exports.remove(drill.export)
        replica.endDrill()
        drill.device.discard()
        return "the drill of \(name) (export \(drill.export)) was ended"
    }

    func drillStatus(_ name: String) -> SiteStatus.Drill? {
        guard let drill = state.withLockedValue({ $0.drills[name] }) else { return nil }
        let uris = state.withLockedValue { $0.nbdURIBases }.map { Self.uri(base: $0, export: drill.export) }
        return SiteStatus.Drill(export: drill.export, exports: uris, point: SiteStatus.PointRef(drill.point),
                                startedAt: drill.startedAt, bytesWritten: drill.device.bytesWritten)
    }

    static func recoveryPointsStatus(_ replica: ReplicaVolumeRuntime) -> SiteStatus.RecoveryPoints? {
        let points = replica.undo.points
        guard !points.isEmpty || replica.history != nil else { return nil }
        return SiteStatus.RecoveryPoints(count: points.count, oldest: points.first.map(SiteStatus.PointRef.init),
                                         newest: points.last.map(SiteStatus.PointRef.init), undoLogBytes: replica.undo.size,
                                         rollbackPoint: replica.catchUpBase.map(SiteStatus.PointRef.init))
    }
}

extension SiteStatus.PointRef {
    init(_ p: RecoveryPoint) {
        self.init(id: p.id, time: Date(timeIntervalSince1970: p.time), sequence: p.position.appliedSeq, kind: p.kind)
    }
}

/// A drill's export: the replica's image at a recovery point (read through its undo log) under a
/// copy-on-write overlay that takes the drill's writes, a sparse file beside the image. Whole 4 KiB
/// granules are copied up on a first partial write. Discarded at the end of the drill (and at start-up).
final class DrillDevice: BlockDevice {
    let replica: ReplicaVolumeRuntime
    let point: UInt64
    let overlay: VolumeImage
    let overlayPath: String
    let threadPool: NIOThreadPool
    /// Granules the drill wrote (they read from the overlay), and bytes written.
    private let written = NIOLockedValueBox<(granules: Set<UInt64>, bytes: UInt64)>(([], 0))
    /// Writes one at a time: two first partial writes to one granule must not both copy it up.
    private let writeLock = NIOLock()
    static let granule = UndoLog.granule

    init(replica: ReplicaVolumeRuntime, point: UInt64, overlayPath: String, threadPool: NIOThreadPool) throws {
        self.replica = replica
        self.point = point
        self.overlayPath = overlayPath
        self.threadPool = threadPool
        try? FileManager.default.removeItem(atPath: overlayPath)
        self.overlay = try VolumeImage.openOrCreate(path: overlayPath, size: replica.image.size)
    }

    var size: UInt64 { overlay.size }
    var isReadOnly: Bool { false }
    var bytesWritten: UInt64 { written.withLockedValue { $0.bytes } }

    func discard() { try? FileManager.default.removeItem(atPath: overlayPath) }

    private func readNow(offset: UInt64, length: Int) throws -> ByteBuffer {
        try written.withLockedValue { w in
            var buffer = try replica.undo.read(at: point, offset: offset, length: length, image: replica.image)
            guard length > 0, !w.granules.isEmpty else { return buffer }
            let end = offset + UInt64(length)
            for g in offset / Self.granule ... (end - 1) / Self.granule where w.granules.contains(g) {
                let from = max(g * Self.granule, offset), to = min((g + 1) * Self.granule, end)
                let bytes = try overlay.read(offset: from, length: Int(to - from), allocator: ByteBufferAllocator())
                buffer.setBuffer(bytes, at: buffer.readerIndex + Int(from - offset))
            }
            return buffer
        }
    }

    private func writeNow(offset: UInt64, data: ByteBuffer) throws {
        try writeLock.withLock { try writeLocked(offset: offset, data: data) }
    }

    private func writeLocked(offset: UInt64, data: ByteBuffer) throws {
        let end = offset + UInt64(data.readableBytes)
        guard end > offset else { return }
        // Granules partly written for the first time get the point's bytes first.
        let first = offset / Self.granule, last = (end - 1) / Self.granule
        let copyUp = written.withLockedValue { w in [first, last].filter { !w.granules.contains($0) } }
        for g in Set(copyUp) where g * Self.granule < offset || min((g + 1) * Self.granule, size) > end {
            let length = Int(min(Self.granule, size - g * Self.granule))
            let base = try replica.undo.read(at: point, offset: g * Self.granule, length: length, image: replica.image)
            try overlay.write(offset: g * Self.granule, data: base)
        }
        try overlay.write(offset: offset, data: data)
        written.withLockedValue { w in
            for g in first ... last { w.granules.insert(g) }
            w.bytes += UInt64(data.readableBytes)
        }
    }

    func read(offset: UInt64, length: Int, on eventLoop: any EventLoop) -> EventLoopFuture<ByteBuffer> {
        eventLoop.makeCompletedFuture { try readNow(offset: offset, length: length) }.flatMapErrorThrowing { throw ImageBlockDevice.deviceError($0) }
    }

    func write(offset: UInt64, data: ByteBuffer, fua: Bool, on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        eventLoop.makeCompletedFuture { try writeNow(offset: offset, data: data) }.flatMapErrorThrowing { throw ImageBlockDevice.deviceError($0) }
    }

    func flush(on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        threadPool.runIfActive(eventLoop: eventLoop) { [overlay] in try overlay.flush() }
    }

    func trim(offset: UInt64, length: UInt64, fua: Bool, on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        writeZeroes(offset: offset, length: length, mayPunchHole: true, fastOnly: false, fua: fua, on: eventLoop)
    }

    func writeZeroes(offset: UInt64, length: UInt64, mayPunchHole: Bool, fastOnly: Bool, fua: Bool,
                     on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        eventLoop.makeCompletedFuture {
            var at = offset
            while at < offset + length {
                let n = Int(min(1 << 20, offset + length - at))
                try writeNow(offset: at, data: ByteBuffer(repeating: 0, count: n))
                at += UInt64(n)
            }
        }.flatMapErrorThrowing { throw ImageBlockDevice.deviceError($0) }
    }

    func blockStatus(offset: UInt64, length: UInt64, on eventLoop: any EventLoop) -> EventLoopFuture<[BlockExtent]> {
        eventLoop.makeSucceededFuture([BlockExtent(length: length, isHole: false, readsAsZero: false)])
    }
}
