import FerryCore
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// The secondary's receive log for a logged (async, scheduled) link (DESIGN §5.1 "Async"): one
/// append-only file of the items and barriers ``ReplicaVolume`` asks to log, executing its
/// `appendLog`, `syncLog`, `applyLog` and `discardLogTail` actions.
///
/// Records are **untaken** until ``takeGroup(throughBarrierIndex:)`` hands them out to be applied,
/// then **taken** until ``releaseGroup()`` says the oldest taken group is applied, flushed and its
/// position recorded; released records are gone for good, also after a crash. Taken records always
/// precede untaken ones. When no record remains the file is cut to 0 bytes, which is how it stays
/// small.
///
/// ## Layout
/// Bytes 0 ..< 4096 are the header: two copies (at 0 and 512) of where the live records start,
/// written alternately so that a torn write leaves the other intact:
///
///     0   4  magic "FRH1" | 4  4  version 1 | 8  8  generation | 16  8  start offset
///     24  8  XXH3-64 of bytes 0 ..< 24
///
/// A copy of all zeros was never written (the header area is a hole until the first release
/// that leaves records behind); with neither copy written, records start at 4096. Records follow,
/// little-endian:
///
///     0   4  magic "FRL1"      | 4   1  type: 1 item, 2 barrier | 5  1  flags: bit 0 zero
///     6   1  barrier kind      | 7   1  reserved
///     8   8  epoch             | 16  8  stream index           | 24 8  seq
///     32  8  range offset      | 40  8  range length           | 48 4  payload length N
///     52  N  payload           | 52+N 8 XXH3-64 of bytes 0 ..< 52+N
///
/// ``open(path:)`` reads the records from the start offset to the first torn or corrupt one and
/// cuts the file there; after a crash every record is untaken again, as in the simulation's
/// `ReplicaNode` (Tests/FerrySimulationTests/SimWorld+Replica.swift), whose `log`,
/// `applyIssuedCount` and `appliedPending` this class implements on disk.
///
/// `@unchecked Sendable`: the descriptor and the record list are mutable; the caller serializes
/// access (the runtime calls it from one event loop or under one lock).
public final class ReceiveLog: @unchecked Sendable {
    public let path: String
    private let fd: Int32
    private let allocator = ByteBufferAllocator()

    private enum Content {
        case item(ReplicationItem, payloadLength: UInt32)
        case barrier(ReplicationBarrier)
    }
    private struct Record {
        var content: Content
        var start: UInt64
        var end: UInt64
        /// Its payload, kept from the append until it is taken (see `keptLimit`).
        var kept: ByteBuffer?
    }
    /// Bytes of the payloads kept in memory. An async replica applies a group a few
    /// milliseconds after it arrived; reading each item back cost a pread and a buffer per write.
    /// Payloads under `copyBelow` are copied (a peer's receive buffer is not kept alive for them).
    private var keptBytes = 0
    static var keptLimit: Int { 16 << 20 }
    static var copyBelow: Int { 64 << 10 }

    /// Live records, oldest first: the first `takenCount` are taken.
    private var records: [Record]
    private var takenCount = 0
    /// Record counts of the taken groups, oldest first.
    private var takenGroups: [Int] = []
    /// Where the next record goes (0: the file is empty, the header area not yet skipped).
    private var end: UInt64
    private var headerGeneration: UInt64

    static var headerAreaSize: UInt64 { 4096 }
    static var headerCopyOffsets: [UInt64] { [0, 512] }
    static var headerMagic: UInt32 { 0x3148_5246 }  // "FRH1"
    static var recordMagic: UInt32 { 0x314C_5246 }  // "FRL1"
    static var recordHeaderSize: Int { 52 }

    private init(path: String, fd: Int32, records: [Record], end: UInt64, headerGeneration: UInt64) {
        self.path = path
        self.fd = fd
        self.records = records
        self.end = end
        self.headerGeneration = headerGeneration
    }

    deinit { _ = Glibc.close(fd) }

    /// Bytes of the file.
    public var bytes: UInt64 { end }

    /// Records in the log, taken or not (for status and tests).
    public var recordCount: Int { records.count }

    // MARK: - Opening

    /// Opens (creating when missing) the log at `path` and returns the barriers of its intact
    /// records, in order: what ``ReplicaVolume/recover(log:)`` takes.
    public static func open(path: String) throws -> (ReceiveLog, [ReplicaVolume.LoggedBarrier]) {
        let existed = FileIO.exists(path)
        let fd = try FileIO.open(path, create: true)
        do {
            if !existed { try FileIO.syncDirectory(FileIO.directory(of: path)) }
            let size = try FileIO.size(fd, path: path)
            let (newestGeneration, start) = try readHeader(fd, size: size, path: path)
            var generation = newestGeneration
            var records: [Record] = []
            var offset = start
            while offset < size, let record = try readRecord(fd, at: offset, fileSize: size, path: path) {
                records.append(record)
                offset = record.end
            }
            if records.isEmpty {
                offset = 0
                generation = 0
            }
            if offset != size {
                try FileIO.truncate(fd, to: offset, path: path)
                try FileIO.datasync(fd, path: path)
            }
            let barriers: [ReplicaVolume.LoggedBarrier] = records.compactMap {
                guard case .barrier(let b) = $0.content else { return nil }
                return .init(index: b.index, seq: b.seq, kind: b.kind)
            }
            return (ReceiveLog(path: path, fd: fd, records: records, end: offset, headerGeneration: generation), barriers)
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
    }

    /// The newest intact header copy: (generation, start of the live records).
    private static func readHeader(_ fd: Int32, size: UInt64, path: String) throws -> (UInt64, UInt64) {
        guard size > headerAreaSize else { return (0, headerAreaSize) }
        var best: (UInt64, UInt64) = (0, headerAreaSize)
        var corrupt = 0
        for at in headerCopyOffsets {
            var copy = try FileIO.read(fd, offset: at, count: 32, path: path, allocator: ByteBufferAllocator())
            if copy.readableBytesView.allSatisfy({ $0 == 0 }) { continue }
            let covered = copy.getSlice(at: 0, length: 24)!
            guard copy.readInteger(endianness: .little, as: UInt32.self) == headerMagic,
                  copy.readInteger(endianness: .little, as: UInt32.self) == 1,
                  let generation = copy.readInteger(endianness: .little, as: UInt64.self),
                  let start = copy.readInteger(endianness: .little, as: UInt64.self),
                  copy.readInteger(endianness: .little, as: UInt64.self) == RecordChecksum.of(covered),
                  start >= headerAreaSize
            else { corrupt += 1; continue }
            if generation > best.0 { best = (generation, start) }
        }
        if corrupt == headerCopyOffsets.count {
            throw StoreError("open receive log", path: path, detail:
                "both copies of the header are damaged, so where the unapplied records start is unknown; "
                + "move the file aside and let the replica resync from its primary")
        }
        return best
    }

    private static func readRecord(_ fd: Int32, at offset: UInt64, fileSize: UInt64, path: String) throws -> Record? {
        guard fileSize - offset >= UInt64(recordHeaderSize + 8) else { return nil }
        let allocator = ByteBufferAllocator()
        var header = try FileIO.read(fd, offset: offset, count: recordHeaderSize, path: path, allocator: allocator)
        let covered = header
        guard header.readableBytes == recordHeaderSize,
              header.readInteger(endianness: .little, as: UInt32.self) == recordMagic else { return nil }
        let type = header.readInteger(as: UInt8.self)!
        let flags = header.readInteger(as: UInt8.self)!
        let kind = header.readInteger(as: UInt8.self)!
        _ = header.readInteger(as: UInt8.self)
        let epoch = header.readInteger(endianness: .little, as: UInt64.self)!
        let index = header.readInteger(endianness: .little, as: UInt64.self)!
        let seq = header.readInteger(endianness: .little, as: UInt64.self)!
        let range = BlockRange(offset: header.readInteger(endianness: .little, as: UInt64.self)!,
                               length: header.readInteger(endianness: .little, as: UInt64.self)!)
        let payloadLength = header.readInteger(endianness: .little, as: UInt32.self)!
        let content: Content
        switch type {
        case 1:
            let isZero = flags & 1 != 0
            guard flags & ~1 == 0, UInt64(payloadLength) == (isZero ? 0 : range.length) else { return nil }
            content = .item(ReplicationItem(epoch: epoch, index: index, seq: seq, range: range, isZero: isZero), payloadLength: payloadLength)
        case 2:
            guard let kind = BarrierKind(rawValue: kind), payloadLength == 0 else { return nil }
            content = .barrier(ReplicationBarrier(epoch: epoch, index: index, seq: seq, kind: kind))
        default:
            return nil
        }
        let end = offset + UInt64(recordHeaderSize) + UInt64(payloadLength) + 8
        guard end <= fileSize else { return nil }
        var rest = try FileIO.read(fd, offset: offset + UInt64(recordHeaderSize), count: Int(payloadLength) + 8, path: path, allocator: allocator)
        guard rest.readableBytes == Int(payloadLength) + 8 else { return nil }
        let payload = rest.readSlice(length: Int(payloadLength))!
        guard rest.readInteger(endianness: .little, as: UInt64.self) == RecordChecksum.of(covered, payload) else { return nil }
        return Record(content: content, start: offset, end: end)
    }

    // MARK: - Appending

    /// Appends an item (`appendLog`): `payload` is its data, exactly `item.range.length` bytes,
    /// and nil for a zeroing. In the page cache until ``sync()``.
    public func append(_ item: ReplicationItem, payload: ByteBuffer?) throws {
        let length = payload?.readableBytes ?? 0
        guard UInt64(length) == (item.isZero ? 0 : item.range.length), length <= Int(UInt32.max) else {
            throw StoreError("append to receive log", path: path, detail:
                "item \(item.index) for \(item.range)\(item.isZero ? " (zero)" : "") was given a payload of \(length) bytes; "
                + "a write carries exactly its range's length and a zeroing none (a bug in the caller)")
        }
        try appendRecord(.item(item, payloadLength: UInt32(length)), type: 1, flags: item.isZero ? 1 : 0, kind: 0,
                         epoch: item.epoch, index: item.index, seq: item.seq, range: item.range, payload: payload)
    }

    /// Appends a barrier (the first half of `syncLog`; ``sync()`` is the second).
    public func appendBarrier(_ barrier: ReplicationBarrier) throws {
        try appendRecord(.barrier(barrier), type: 2, flags: 0, kind: barrier.kind.rawValue, epoch: barrier.epoch,
                         index: barrier.index, seq: barrier.seq, range: BlockRange(offset: 0, length: 0), payload: nil)
    }

    private func appendRecord(_ content: Content, type: UInt8, flags: UInt8, kind: UInt8, epoch: UInt64, index: UInt64,
                              seq: UInt64, range: BlockRange, payload: ByteBuffer?) throws {
        let start = end == 0 ? Self.headerAreaSize : end
        var header = allocator.buffer(capacity: Self.recordHeaderSize)
        header.writeInteger(Self.recordMagic, endianness: .little)
        header.writeInteger(type)
        header.writeInteger(flags)
        header.writeInteger(kind)
        header.writeInteger(UInt8(0))
        header.writeInteger(epoch, endianness: .little)
        header.writeInteger(index, endianness: .little)
        header.writeInteger(seq, endianness: .little)
        header.writeInteger(range.offset, endianness: .little)
        header.writeInteger(range.length, endianness: .little)
        header.writeInteger(UInt32(payload?.readableBytes ?? 0), endianness: .little)
        let body = payload ?? allocator.buffer(capacity: 0)
        var trailer = allocator.buffer(capacity: 8)
        trailer.writeInteger(RecordChecksum.of(header, body), endianness: .little)
        // A failed write leaves bytes past `end`, which the next append overwrites.
        try FileIO.write(fd, offset: start, [header, body, trailer], path: path)
        let recordEnd = start + UInt64(Self.recordHeaderSize + body.readableBytes + 8)
        var kept: ByteBuffer?
        if let payload, keptBytes + payload.readableBytes <= Self.keptLimit {
            if payload.readableBytes < Self.copyBelow {
                var copy = allocator.buffer(capacity: payload.readableBytes)
                copy.writeImmutableBuffer(payload)
                kept = copy
            } else {
                kept = payload
            }
            keptBytes += payload.readableBytes
        }
        records.append(Record(content: content, start: start, end: recordEnd, kept: kept))
        end = recordEnd
    }

    /// Makes every record appended so far durable (fdatasync), and any release before it. Safe
    /// to call from another thread while one appends (it only syncs the descriptor): a caller
    /// need not hold its appends back for the length of a disk flush.
    public func sync() throws {
        try FileIO.datasync(fd, path: path)
    }

    // MARK: - Applying

    /// Hands out the records from the first untaken one up to and including the first untaken
    /// barrier with stream index `index` (`applyLog`), with the items' payloads read back (nil
    /// for a zeroing; the barrier itself is not returned). They are taken until ``releaseGroup()``.
    /// Throws when no untaken barrier has that index.
    public func takeGroup(throughBarrierIndex index: UInt64) throws -> [(ReplicationItem, ByteBuffer?)] {
        // The last untaken barrier with that index: while running, untaken records belong to one
        // link (indexes are unique); after a restart the log may hold groups of several links whose
        // indexes repeat, and recovery applies all of them, through the last barrier.
        guard let last = records[takenCount...].lastIndex(where: {
            if case .barrier(let b) = $0.content { return b.index == index } else { return false }
        }) else {
            throw StoreError("apply receive log", path: path, detail:
                "no barrier with stream index \(index) among the \(records.count - takenCount) records not yet applied; "
                + "the replica state machine and its log disagree (a bug)")
        }
        var group: [(ReplicationItem, ByteBuffer?)] = []
        for i in takenCount...last {
            let record = records[i]
            guard case .item(let item, let length) = record.content else { continue }
            guard length > 0 else { group.append((item, nil)); continue }
            if let kept = record.kept {
                group.append((item, kept))
                records[i].kept = nil
                keptBytes -= kept.readableBytes
                continue
            }
            let payload = try FileIO.read(fd, offset: record.start + UInt64(Self.recordHeaderSize), count: Int(length),
                                          path: path, allocator: allocator)
            guard payload.readableBytes == Int(length) else {
                throw StoreError("apply receive log", path: path, detail:
                    "the file ends inside item \(item.index)'s payload; was it truncated by another process?")
            }
            group.append((item, payload))
        }
        takenGroups.append(last + 1 - takenCount)
        takenCount = last + 1
        return group
    }

    /// The oldest taken group is applied, the image flushed and the position recorded: forget its
    /// records, durably (a crash after this does not apply them again). With nothing left the file
    /// is cut to 0 bytes.
    public func releaseGroup() throws {
        try releaseGroups(1)
    }

    /// The oldest `groups` taken groups are applied, the image flushed and the position recorded:
    /// forget their records. `durably: false` leaves out the fdatasync that makes a header update
    /// final, for a caller that calls ``sync()`` next outside the lock its appends take: until
    /// then a crash may apply these groups again, which brings the image back to where it is (the
    /// groups after them are still in the log, untouched, since appends go past them, and a later
    /// release is durable only with this one). Cutting the file to 0 bytes is always made durable
    /// at once: the next appends reuse its offsets, and a crash must never find them behind an
    /// old header that points among them.
    public func releaseGroups(_ groups: Int, durably: Bool = true) throws {
        guard groups > 0, groups <= takenGroups.count else {
            throw StoreError("release receive log group", path: path,
                             detail: "\(groups) group(s) to release but \(takenGroups.count) taken (a bug in the caller)")
        }
        let count = takenGroups[..<groups].reduce(0, +)
        if count == records.count {
            try FileIO.truncate(fd, to: 0, path: path)
            try FileIO.datasync(fd, path: path)
            end = 0
            headerGeneration = 0
        } else {
            try writeHeader(start: records[count].start)
            if durably { try FileIO.datasync(fd, path: path) }
        }
        takenGroups.removeFirst(groups)
        keptBytes -= records[..<count].reduce(0) { $0 + ($1.kept?.readableBytes ?? 0) }
        records.removeFirst(count)
        takenCount -= count
    }

    /// Forgets the first `groups` barrier groups not yet taken, durably, without handing them
    /// out (`skipLog` after a restart: the image holds them already). Throws when the log holds
    /// fewer groups, or when a group is taken (only a restarted replica skips).
    public func skipGroups(_ groups: Int) throws {
        guard groups > 0 else { return }
        var seen = 0
        let end = records.indices.first { i in
            if case .barrier = records[i].content { seen += 1 }
            return seen == groups
        }
        guard takenCount == 0, let end else {
            throw StoreError("skip receive log groups", path: path, detail:
                "\(groups) group(s) to skip but the log holds \(seen), \(takenCount) record(s) taken (a bug in the caller)")
        }
        takenGroups.append(end + 1)
        takenCount = end + 1
        try releaseGroups(1)
    }

    /// Drops every record not taken (`discardLogTail`), durably: a crash after this does not bring
    /// them back.
    public func discardUntaken() throws {
        guard takenCount < records.count else { return }
        let cut = takenCount == 0 ? 0 : records[takenCount - 1].end
        try FileIO.truncate(fd, to: cut, path: path)
        try FileIO.datasync(fd, path: path)
        keptBytes -= records[takenCount...].reduce(0) { $0 + ($1.kept?.readableBytes ?? 0) }
        records.removeLast(records.count - takenCount)
        end = cut
        if cut == 0 { headerGeneration = 0 }
    }

    private func writeHeader(start: UInt64) throws {
        let generation = headerGeneration + 1
        var copy = allocator.buffer(capacity: 32)
        copy.writeInteger(Self.headerMagic, endianness: .little)
        copy.writeInteger(UInt32(1), endianness: .little)
        copy.writeInteger(generation, endianness: .little)
        copy.writeInteger(start, endianness: .little)
        copy.writeInteger(RecordChecksum.of(copy), endianness: .little)
        try FileIO.write(fd, offset: Self.headerCopyOffsets[Int(generation % 2)], [copy], path: path)
        headerGeneration = generation
    }
}
