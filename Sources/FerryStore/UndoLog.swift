import CFerrySys
import FerryCore
import Foundation
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// A state of a replica's image that can be gone back to: a recovery point (issue 10 §6), the
/// last consistent state kept while a catch-up overwrites the image out of order (P3), or the
/// base of a DR drill.
public struct RecoveryPoint: Sendable, Equatable, Codable {
    /// Numbered from 1 in the order the points were made (never reused by one log).
    public var id: UInt64
    /// When the replica reached the state (seconds since 1970, UTC).
    public var time: Double
    /// The position the image was at: the sequence, generation, epoch and lineage.
    public var position: ReplicaPosition
    /// Why the point was made: `history` (a barrier, a scheduled point), `catch-up` (the state a
    /// catch-up started from), `drill` (a drill's base).
    public var kind: String

    public init(id: UInt64, time: Double, position: ReplicaPosition, kind: String) {
        self.id = id
        self.time = time
        self.position = position
        self.kind = kind
    }
}

/// A replica's undo log: before each write that may have to be undone reaches the image, the
/// bytes it overwrites are appended here and made durable (write-ahead); between them, **marks**
/// say "here the image was at this recovery point". The image at a mark is the image now with
/// every before-image recorded after the mark put back, the oldest one winning for each byte.
/// One mechanism serves three needs: `promote --at` (roll the image back to a point), a promotion
/// in the middle of a catch-up (roll back to the state it started from, P3) and a drill (read the
/// state at a point while the image moves on).
///
/// Before-images are whole 4 KiB granules (clamped to the image), and a granule is saved once per
/// mark: later writes to it before the next mark cannot change what the mark needs.
///
/// ## Layout
/// Records from the offset kept in the side file `PATH.start` (pruning moves it forward and
/// punches out what lies before it), little-endian:
///
///     0  4  magic "FUL1" | 4  1  type: 1 mark, 2 before-image | 5  1  flags: bit 0 all zeros
///     6  2  reserved     | 8  8  range offset | 16 8  range length | 24 4  payload length N
///     28 N  payload (a mark: its RecoveryPoint as JSON; a before-image: the bytes, none if zero)
///     28+N 8  XXH3-64 of bytes 0 ..< 28+N
///
/// ``open(path:position:)`` reads to the first torn or corrupt record and cuts the file there. A
/// mark is made when the state is reached and counts once the replica's recorded position has
/// reached it (``confirm(through:)``); unconfirmed marks found at open are dropped (their
/// before-images stay: earlier marks need them).
///
/// Thread-safe: every method takes the log's lock, and ``protect(_:image:write:)`` holds it over
/// the image write too, so a reader of a point never sees the image between the two.
public final class UndoLog: @unchecked Sendable {
    public let path: String
    public static let granule: UInt64 = 4096
    private let fd: Int32
    private let startFile: MetadataFile<UInt64>
    private let allocator = ByteBufferAllocator()
    private let lock = NSLock()

    private enum Content {
        case mark(RecoveryPoint, confirmed: Bool)
        /// The first granule and the count; `data` is the payload's file offset (nil: zeros).
        case before(granule: UInt64, count: UInt64, data: UInt64?)
    }
    private struct Record {
        var content: Content
        var start: UInt64
    }

    private var records: [Record] = []
    private var end: UInt64
    private var nextID: UInt64 = 1
    /// Granules saved since the last mark.
    private var saved: Set<UInt64> = []
    /// Bytes of before-images recorded in all, and that count when each mark was made: what
    /// going back to a point costs is the difference (O(1) per write, however many points).
    private var savedTotal: UInt64 = 0
    private var savedAtMark: [UInt64: UInt64] = [:]
    /// Indexes into `records` of marks not yet confirmed (few: the ones since the last store).
    private var unconfirmed: [Int] = []
    /// Drill views by point, kept up to date as before-images are added.
    private var views: [UInt64: [UInt64: UInt64?]] = [:]
    /// Marks in the log: with none, nothing needs saving.
    private var markCount = 0

    static let magic: UInt32 = 0x314C_5546  // "FUL1"
    static let headerSize = 28

    private init(path: String, fd: Int32, startFile: MetadataFile<UInt64>, end: UInt64) {
        self.path = path
        self.fd = fd
        self.startFile = startFile
        self.end = end
    }

    deinit { _ = Glibc.close(fd) }

    /// Opens (or creates) the log. `position` is the replica's recorded position: marks beyond it
    /// on its generation were never confirmed and are dropped.
    public static func open(path: String, position: ReplicaPosition) throws -> UndoLog {
        let fd = try FileIO.open(path, create: true)
        let startFile = try MetadataFile<UInt64>(path: path + ".start")
        let size = try FileIO.size(fd, path: path)
        let log = UndoLog(path: path, fd: fd, startFile: startFile, end: 0)
        var at = min(try startFile.load() ?? 0, size)
        while at + UInt64(headerSize) + 8 <= size {
            guard let (record, next) = try log.readRecord(at: at) else { break }
            log.records.append(record)
            at = next
        }
        log.end = at
        if at < size { try FileIO.truncate(fd, to: at, path: path) }
        for (i, record) in log.records.enumerated() {
            guard case .mark(let point, _) = record.content else { continue }
            log.nextID = max(log.nextID, point.id + 1)
            let reached = point.position.generation != position.generation || point.position.appliedSeq <= position.appliedSeq
            log.records[i].content = .mark(point, confirmed: reached)
        }
        log.records.removeAll { if case .mark(_, false) = $0.content { return true } else { return false } }
        log.recount()
        return log
    }

    private func readRecord(at offset: UInt64) throws -> (Record, UInt64)? {
        let header = try FileIO.read(fd, offset: offset, count: Self.headerSize, path: path, allocator: allocator)
        guard header.readableBytes == Self.headerSize,
              header.getInteger(at: header.readerIndex, endianness: .little, as: UInt32.self) == Self.magic else { return nil }
        let type = header.getInteger(at: header.readerIndex + 4, as: UInt8.self)!
        let flags = header.getInteger(at: header.readerIndex + 5, as: UInt8.self)!
        let rangeOffset = header.getInteger(at: header.readerIndex + 8, endianness: .little, as: UInt64.self)!
        let rangeLength = header.getInteger(at: header.readerIndex + 16, endianness: .little, as: UInt64.self)!
        let n = Int(header.getInteger(at: header.readerIndex + 24, endianness: .little, as: UInt32.self)!)
        let payload = try FileIO.read(fd, offset: offset + UInt64(Self.headerSize), count: n, path: path, allocator: allocator)
        let sum = try FileIO.read(fd, offset: offset + UInt64(Self.headerSize + n), count: 8, path: path, allocator: allocator)
        guard payload.readableBytes == n, sum.readableBytes == 8,
              sum.getInteger(at: sum.readerIndex, endianness: .little, as: UInt64.self) == RecordChecksum.of(header, payload) else { return nil }
        let next = offset + UInt64(Self.headerSize + n + 8)
        switch type {
        case 1:
            guard let point = try? JSONDecoder().decode(RecoveryPoint.self, from: Data(payload.readableBytesView)) else { return nil }
            return (Record(content: .mark(point, confirmed: false), start: offset), next)
        case 2:
            let zero = flags & 1 != 0
            return (Record(content: .before(granule: rangeOffset / Self.granule, count: rangeLength / Self.granule,
                                            data: zero ? nil : offset + UInt64(Self.headerSize)), start: offset), next)
        default:
            return nil
        }
    }

    private func append(type: UInt8, zero: Bool, offset: UInt64, length: UInt64, payload: ByteBuffer?) throws -> UInt64 {
        var header = allocator.buffer(capacity: Self.headerSize)
        header.writeInteger(Self.magic, endianness: .little)
        header.writeInteger(type)
        header.writeInteger(UInt8(zero ? 1 : 0))
        header.writeInteger(UInt16(0))
        header.writeInteger(offset, endianness: .little)
        header.writeInteger(length, endianness: .little)
        let body = payload ?? allocator.buffer(capacity: 0)
        header.writeInteger(UInt32(body.readableBytes), endianness: .little)
        var sum = allocator.buffer(capacity: 8)
        sum.writeInteger(RecordChecksum.of(header, body), endianness: .little)
        let start = end
        try FileIO.write(fd, offset: start, [header, body, sum], path: path)
        end = start + UInt64(Self.headerSize + body.readableBytes + 8)
        return start
    }

    // MARK: - Reading what the log holds

    /// The confirmed points, oldest first.
    public var points: [RecoveryPoint] {
        lock.withLock { records.compactMap { if case .mark(let p, true) = $0.content { return p } else { return nil } } }
    }

    /// The confirmed point `id`, if the log holds it.
    public func point(_ id: UInt64) -> RecoveryPoint? {
        lock.withLock {
            guard let i = markIndex(of: id), case .mark(let p, true) = records[i].content else { return nil }
            return p
        }
    }

    private func markIndex(of id: UInt64) -> Int? {
        records.firstIndex { if case .mark(let p, _) = $0.content { return p.id == id } else { return false } }
    }

    /// Bytes of before-images recorded after the point: what going back to it rewrites.
    public func undoBytes(after id: UInt64) -> UInt64 { lock.withLock { savedAtMark[id].map { savedTotal - $0 } ?? 0 } }

    /// Bytes the log occupies (from its start to its end).
    public var size: UInt64 { lock.withLock { end - (records.first?.start ?? end) } }

    public var isEmpty: Bool { lock.withLock { records.isEmpty } }

    /// Whether writes must be saved first (the log holds a mark).
    public var isRecording: Bool { lock.withLock { markCount > 0 } }

    private func recount() {
        savedAtMark = [:]
        markCount = 0
        unconfirmed = []
        views = [:]
        var total: UInt64 = 0
        for (i, record) in records.enumerated() {
            switch record.content {
            case .before(_, let count, _): total += count * Self.granule
            case .mark(let p, let confirmed):
                savedAtMark[p.id] = total
                markCount += 1
                if !confirmed { unconfirmed.append(i) }
            }
        }
        savedTotal = total
    }

    // MARK: - Writing

    /// Appends a mark: the image is at `position` now. Unconfirmed until ``confirm(through:)``
    /// unless `confirmed` (the position is already recorded).
    @discardableResult
    public func mark(_ position: ReplicaPosition, time: Double, kind: String, confirmed: Bool) throws -> RecoveryPoint {
        try lock.withLock {
            let point = RecoveryPoint(id: nextID, time: time, position: position, kind: kind)
            let json = try JSONEncoder().encode(point)
            var payload = allocator.buffer(capacity: json.count)
            payload.writeBytes(json)
            let start = try append(type: 1, zero: false, offset: 0, length: 0, payload: payload)
            nextID += 1
            records.append(Record(content: .mark(point, confirmed: confirmed), start: start))
            if !confirmed { unconfirmed.append(records.count - 1) }
            savedAtMark[point.id] = savedTotal
            markCount += 1
            saved = []
            return point
        }
    }

    /// Marks reached by the recorded `position` now count.
    public func confirm(through position: ReplicaPosition) {
        lock.withLock {
            unconfirmed.removeAll { i in
                guard i < records.count, case .mark(let p, false) = records[i].content else { return true }
                guard p.position.generation == position.generation && p.position.appliedSeq <= position.appliedSeq else { return false }
                records[i].content = .mark(p, confirmed: true)
                return true
            }
        }
    }

    /// The newest mark, confirmed or not.
    public var lastMark: RecoveryPoint? {
        lock.withLock { records.reversed().lazy.compactMap { if case .mark(let p, _) = $0.content { return p } else { return nil } }.first }
    }

    /// Saves what the ranges hold in `image` (granules not saved since the last mark), makes it
    /// durable, then runs `write`, all under the log's lock. With no mark in the log, nothing
    /// needs saving and `write` runs alone.
    public func protect(_ ranges: [(offset: UInt64, length: UInt64)], image: VolumeImage, write: () throws -> Void) throws {
        try lock.withLock {
            if markCount > 0 {
                var wrote = Set<UInt64>()
                for range in ranges where range.length > 0 {
                    let first = range.offset / Self.granule
                    let last = (min(range.offset + range.length, image.size) - 1) / Self.granule
                    var g = first
                    while g <= last {
                        // A run of granules not yet saved.
                        guard !saved.contains(g), !wrote.contains(g) else { g += 1; continue }
                        var n: UInt64 = 1
                        while g + n <= last && !saved.contains(g + n) && !wrote.contains(g + n) && n < 256 { n += 1 }
                        try saveBefore(granule: g, count: n, image: image)
                        wrote.formUnion(g ..< g + n)
                        g += n
                    }
                }
                if !wrote.isEmpty {
                    try FileIO.datasync(fd, path: path)
                    // Only once durable: a failed sync leaves them to be saved again.
                    saved.formUnion(wrote)
                }
            }
            try write()
        }
    }

    private func saveBefore(granule g: UInt64, count n: UInt64, image: VolumeImage) throws {
        let offset = g * Self.granule
        let length = min(n * Self.granule, image.size - offset)
        let data = try image.read(offset: offset, length: Int(length), allocator: allocator)
        let zero = data.readableBytesView.allSatisfy { $0 == 0 }
        // Stored whole granules: a short last granule is padded with zeros (never written back past the image).
        var payload: ByteBuffer? = nil
        if !zero {
            var padded = data
            if length < n * Self.granule { padded.writeRepeatingByte(0, count: Int(n * Self.granule - length)) }
            payload = padded
        }
        let start = try append(type: 2, zero: zero, offset: offset, length: n * Self.granule, payload: payload)
        records.append(Record(content: .before(granule: g, count: n, data: zero ? nil : start + UInt64(Self.headerSize)), start: start))
        savedTotal += n * Self.granule
        for id in views.keys {
            for k in 0 ..< n where views[id]![g + k] == nil { views[id]![g + k] = .some(zero ? nil : start + UInt64(Self.headerSize) + k * Self.granule) }
        }
    }

    // MARK: - Going back

    /// For each granule written since point `id`, where its content at the point is (a file
    /// offset of the log, or nil: zeros). Nil when the log holds no such point.
    private func view(of id: UInt64) -> [UInt64: UInt64?]? {
        guard let at = markIndex(of: id) else { return nil }
        var view: [UInt64: UInt64?] = [:]
        for record in records[(at + 1)...] {
            guard case .before(let g, let n, let data) = record.content else { continue }
            for k in 0 ..< n where view[g + k] == nil {
                view[g + k] = .some(data.map { $0 + k * Self.granule })
            }
        }
        return view
    }

    /// Reads `length` bytes at `offset` as the image held them at point `id`.
    public func read(at id: UInt64, offset: UInt64, length: Int, image: VolumeImage) throws -> ByteBuffer {
        try lock.withLock {
            if views[id] == nil { views[id] = view(of: id) }
            guard let view = views[id] else { throw StoreError("read point", path: path, detail: "no recovery point \(id) in the undo log") }
            var buffer = try image.read(offset: offset, length: length, allocator: allocator)
            let first = offset / Self.granule
            let last = (offset + UInt64(length) - 1) / Self.granule
            for g in first ... last {
                guard let saved = view[g] else { continue }
                let gStart = g * Self.granule
                let from = max(gStart, offset), to = min(gStart + Self.granule, offset + UInt64(length))
                let dest = buffer.readerIndex + Int(from - offset)
                if let fileOffset = saved {
                    let bytes = try FileIO.read(fd, offset: fileOffset + (from - gStart), count: Int(to - from), path: path, allocator: allocator)
                    buffer.setBuffer(bytes, at: dest)
                } else {
                    buffer.setRepeatingByte(0, count: Int(to - from), at: dest)
                }
            }
            return buffer
        }
    }

    /// Puts the image back to point `id`: writes back every before-image recorded after it,
    /// flushes the image, then forgets the records after the point (it is the image's state now).
    /// Interrupted (a crash), it can run again: the records stay until the image is flushed.
    /// Returns the ranges written back (granule runs, in order).
    @discardableResult
    public func rollBack(to id: UInt64, image: VolumeImage) throws -> [BlockRange] {
        try lock.withLock {
            guard let view = view(of: id), let at = markIndex(of: id) else {
                throw StoreError("roll back", path: path, detail: "no recovery point \(id) in the undo log")
            }
            var written: [BlockRange] = []
            for g in view.keys.sorted() {
                let offset = g * Self.granule
                guard offset < image.size else { continue }
                let length = min(Self.granule, image.size - offset)
                if let fileOffset = view[g]! {
                    let bytes = try FileIO.read(fd, offset: fileOffset, count: Int(length), path: path, allocator: allocator)
                    try image.write(offset: offset, data: bytes)
                } else {
                    try image.zero(offset: offset, length: length)
                }
                if let last = written.last, last.offset + last.length == offset {
                    written[written.count - 1].length += length
                } else {
                    written.append(BlockRange(offset: offset, length: length))
                }
            }
            try image.flush()
            let cut = at + 1 < records.count ? records[at + 1].start : end
            records.removeSubrange((at + 1)...)
            end = cut
            try FileIO.truncate(fd, to: cut, path: path)
            try FileIO.datasync(fd, path: path)
            saved = []
            recount()
            return written
        }
    }

    // MARK: - Keeping it small

    /// Drops the oldest points not in `pinned` while they are older than `before` or the log is
    /// larger than `maxBytes`; the newest point always stays. Returns the points dropped.
    @discardableResult
    public func prune(olderThan before: Double?, maxBytes: UInt64?, pinned: Set<UInt64>) throws -> Int {
        try lock.withLock {
            var dropped = 0
            let marks = records.indices.filter { if case .mark = records[$0].content { return true } else { return false } }
            var cut = 0   // records before marks[dropped] go
            while dropped + 1 < marks.count, case .mark(let oldest, _) = records[marks[dropped]].content, !pinned.contains(oldest.id) {
                let tooOld = before.map { oldest.time < $0 } ?? false
                let tooBig = maxBytes.map { end - records[cut].start > $0 } ?? false
                guard tooOld || tooBig else { break }
                dropped += 1
                cut = marks[dropped]
            }
            if cut > 0 { records.removeSubrange(0 ..< cut) }
            guard dropped > 0, let start = records.first?.start else { return dropped }
            try startFile.store(start)
            // Only whole 4 KiB blocks before the new start are punched out.
            let hole = start / 4096 * 4096
            if hole > 0 { _ = ferry_punch_hole(fd, 0, Int64(hole)) }
            recount()
            return dropped
        }
    }

    /// Empties the log (nothing to go back to any more).
    public func reset() throws {
        try lock.withLock {
            // The start first: a crash between the two must not leave it pointing into later records.
            try startFile.store(0)
            try FileIO.truncate(fd, to: 0, path: path)
            try FileIO.datasync(fd, path: path)
            records = []
            end = 0
            saved = []
            recount()
        }
    }
}

