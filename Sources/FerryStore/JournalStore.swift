import FerryCore
import Foundation
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// The primary's async journal (DESIGN §5.1 "Async"): the entries of ``PrimaryVolume``'s
/// `appendJournal` actions with their payloads, in segment files `journal-000001.seg`,
/// `journal-000002.seg`, … in one directory. A segment is closed when the next record would take
/// it past the segment size (a segment always holds at least one record).
///
/// ## Record layout (little-endian)
///
///     offset  size  field
///     0       4     magic           "FJN1"
///     4       8     seq             the write's (or flush's) sequence
///     12      8     range offset
///     20      8     range length
///     28      4     flags           bit 0: zero, bit 1: barrier
///     32      8     atNanos         i64, monotonic
///     40      4     payload length  u32: range length for a write, 0 for a zeroing or barrier
///     44      N     payload
///     44+N    8     checksum        XXH3-64 of bytes 0 ..< 44+N
///
/// Durability: ``append(_:payload:)`` writes to the page cache; ``sync()`` makes every record
/// appended before it durable (the primary syncs at each barrier, DESIGN §5.1). After a crash,
/// ``open(directory:)`` keeps the intact prefix: the first record that is torn or fails its
/// checksum ends the journal (its segment is cut there and later segments are deleted).
///
/// ``trim(through:)`` forgets entries logically at once but deletes only whole segments, so a
/// reopened journal may start with entries at or below the last trim; they are intact and in order.
///
/// `@unchecked Sendable`: file descriptors and the index are mutable; the caller serializes
/// access (the runtime calls it from one event loop or under one lock).
public final class JournalStore: @unchecked Sendable {
    public let directory: String
    public let segmentSize: UInt64
    private let allocator = ByteBufferAllocator()

    private struct Segment {
        var number: Int
        var bytes: UInt64
        /// The sequences of its records, ascending; those before `liveFrom` are trimmed.
        var seqs: [UInt64] = []
        var liveFrom = 0
        var maxSeq: UInt64 { seqs.last ?? 0 }
    }
    /// Where a payload is.
    private struct Location {
        var segment: Int
        var offset: UInt64
        var length: UInt32
    }

    /// Oldest first; the last is the one being written.
    private var segments: [Segment]
    private var index: [UInt64: Location] = [:]
    /// The highest sequence ever appended: sequences only go up (PrimaryVolume continues above
    /// every number it gave out, also after a crash).
    private var lastSeq: UInt64
    private var writeFD: Int32
    /// Segments closed since the last sync, still to be made durable (their descriptors).
    private var unsynced: [(number: Int, fd: Int32)] = []
    private var currentDirty = false
    private var directoryDirty = false
    /// The last segment read from, kept open for the sender's sequential reads.
    private var readFD: (number: Int, fd: Int32)?

    static var headerSize: Int { 44 }
    static var magic: UInt32 { 0x314E_4A46 }  // "FJN1" little-endian
    public static let defaultSegmentSize: UInt64 = 64 << 20

    public static func segmentName(_ number: Int) -> String {
        "journal-" + String(repeating: "0", count: max(0, 6 - String(number).count)) + String(number) + ".seg"
    }

    private func segmentPath(_ number: Int) -> String { directory + "/" + Self.segmentName(number) }

    private init(directory: String, segmentSize: UInt64, segments: [Segment], index: [UInt64: Location], writeFD: Int32) {
        self.directory = directory
        self.segmentSize = segmentSize
        self.segments = segments
        self.index = index
        self.lastSeq = segments.last(where: { !$0.seqs.isEmpty })?.maxSeq ?? 0
        self.writeFD = writeFD
    }

    deinit {
        _ = Glibc.close(writeFD)
        for (_, fd) in unsynced { _ = Glibc.close(fd) }
        if let (_, fd) = readFD { _ = Glibc.close(fd) }
    }

    /// Bytes of all segments on disk.
    public var bytes: UInt64 { segments.reduce(0) { $0 + $1.bytes } }

    /// Segment files on disk, oldest first (for status and tests).
    public var segmentNames: [String] { segments.map { Self.segmentName($0.number) } }

    // MARK: - Opening

    /// Opens the journal in `directory` (creating the directory when missing) and returns it with
    /// its intact entries, oldest first — what ``PrimaryVolume/init(config:metadata:cleanShutdown:journal:now:)``
    /// takes as `journal`.
    public static func open(directory: String, segmentSize: UInt64 = defaultSegmentSize) throws -> (JournalStore, [JournalEntry]) {
        if !FileIO.exists(directory) {
            guard mkdir(directory, 0o700) == 0 || Glibc.errno == EEXIST else {
                throw StoreError("create journal directory", path: directory, errno: Glibc.errno)
            }
            try FileIO.syncDirectory(FileIO.directory(of: directory))
        }
        var numbers = try FileManager.default.contentsOfDirectory(atPath: directory).compactMap(segmentNumber).sorted()
        // Segment numbers are consecutive by construction; segments before a gap are older than
        // an interrupted trim (they were being deleted) and describe nothing current.
        if let gap = numbers.indices.dropFirst().last(where: { numbers[$0] != numbers[$0 - 1] + 1 }) {
            for number in numbers[..<gap] { try removeSegment(directory + "/" + segmentName(number)) }
            numbers.removeFirst(gap)
        }
        var segments: [Segment] = []
        var entries: [JournalEntry] = []
        var index: [UInt64: Location] = [:]
        var torn = false
        for number in numbers {
            let path = directory + "/" + segmentName(number)
            if torn { try removeSegment(path); continue }
            let fd = try FileIO.open(path, create: false)
            defer { _ = Glibc.close(fd) }
            var segment = Segment(number: number, bytes: 0)
            let size = try FileIO.size(fd, path: path)
            var offset: UInt64 = 0
            while offset < size {
                guard let (entry, payloadLength, end) = try readRecord(fd, at: offset, fileSize: size, path: path) else {
                    torn = true
                    break
                }
                // Sequences ascend; a record that does not follow is not part of this journal.
                guard entry.seq > (entries.last?.seq ?? 0) else {
                    torn = true
                    break
                }
                entries.append(entry)
                segment.seqs.append(entry.seq)
                index[entry.seq] = Location(segment: number, offset: offset + UInt64(headerSize), length: payloadLength)
                offset = end
            }
            if offset < size {
                try FileIO.truncate(fd, to: offset, path: path)
                try FileIO.datasync(fd, path: path)
            }
            // A segment with no record is kept only as the last one (it is written next).
            if segment.seqs.isEmpty { torn = true }
            segment.bytes = offset
            segments.append(segment)
        }
        // Only the last segment may be empty: it is the one written next.
        if segments.isEmpty { segments.append(Segment(number: 1, bytes: 0)) }
        let fd = try FileIO.open(directory + "/" + segmentName(segments.last!.number), create: true)
        // Durable: the new segment's name, and any deletion above.
        do { try FileIO.syncDirectory(directory) } catch { _ = Glibc.close(fd); throw error }
        return (JournalStore(directory: directory, segmentSize: segmentSize, segments: segments, index: index, writeFD: fd), entries)
    }

    private static func segmentNumber(_ name: String) -> Int? {
        guard name.hasPrefix("journal-"), name.hasSuffix(".seg") else { return nil }
        return Int(name.dropFirst(8).dropLast(4))
    }

    private static func removeSegment(_ path: String) throws {
        guard unlink(path) == 0 || Glibc.errno == ENOENT else {
            throw StoreError("delete journal segment", path: path, errno: Glibc.errno)
        }
    }

    /// The record at `offset`, or nil when it is torn or corrupt there.
    private static func readRecord(_ fd: Int32, at offset: UInt64, fileSize: UInt64, path: String) throws -> (JournalEntry, UInt32, UInt64)? {
        guard fileSize - offset >= UInt64(headerSize + 8) else { return nil }
        let allocator = ByteBufferAllocator()
        var header = try FileIO.read(fd, offset: offset, count: headerSize, path: path, allocator: allocator)
        let covered = header
        guard header.readableBytes == headerSize, header.readInteger(endianness: .little, as: UInt32.self) == magic else { return nil }
        let seq = header.readInteger(endianness: .little, as: UInt64.self)!
        let rangeOffset = header.readInteger(endianness: .little, as: UInt64.self)!
        let rangeLength = header.readInteger(endianness: .little, as: UInt64.self)!
        let flags = header.readInteger(endianness: .little, as: UInt32.self)!
        let atNanos = header.readInteger(endianness: .little, as: Int64.self)!
        let payloadLength = header.readInteger(endianness: .little, as: UInt32.self)!
        let entry = JournalEntry(seq: seq, range: BlockRange(offset: rangeOffset, length: rangeLength),
                                 isZero: flags & 1 != 0, isBarrier: flags & 2 != 0, atNanos: atNanos)
        let end = offset + UInt64(headerSize) + UInt64(payloadLength) + 8
        guard flags & ~3 == 0, entry.bytes == UInt64(payloadLength), end <= fileSize else { return nil }
        var rest = try FileIO.read(fd, offset: offset + UInt64(headerSize), count: Int(payloadLength) + 8, path: path, allocator: allocator)
        guard rest.readableBytes == Int(payloadLength) + 8 else { return nil }
        let payload = rest.readSlice(length: Int(payloadLength))!
        let checksum = rest.readInteger(endianness: .little, as: UInt64.self)!
        guard RecordChecksum.of(covered, payload) == checksum else { return nil }
        return (entry, payloadLength, end)
    }

    // MARK: - Writing

    /// Appends an entry: `payload` is the write's data (exactly `entry.range.length` bytes) and
    /// nil for a zeroing or a barrier. In the page cache until ``sync()``.
    public func append(_ entry: JournalEntry, payload: ByteBuffer?) throws {
        let length = payload?.readableBytes ?? 0
        guard UInt64(length) == entry.bytes else {
            throw StoreError("append to journal", path: directory, detail:
                "entry \(entry.seq) for \(entry.range)\(entry.isZero ? " (zero)" : "")\(entry.isBarrier ? " (barrier)" : "") "
                + "carries \(entry.bytes) bytes but was given a payload of \(length); this is a bug in the caller")
        }
        guard entry.seq > lastSeq else {
            throw StoreError("append to journal", path: directory, detail:
                "sequence \(entry.seq) does not follow \(lastSeq), the last one appended; "
                + "the journal takes entries in sequence order and each once (a bug in the caller)")
        }
        let recordSize = UInt64(Self.headerSize + length + 8)
        if segments.last!.bytes > 0 && segments.last!.bytes + recordSize > segmentSize {
            try startSegment()
        }
        var header = allocator.buffer(capacity: Self.headerSize)
        header.writeInteger(Self.magic, endianness: .little)
        header.writeInteger(entry.seq, endianness: .little)
        header.writeInteger(entry.range.offset, endianness: .little)
        header.writeInteger(entry.range.length, endianness: .little)
        header.writeInteger(UInt32((entry.isZero ? 1 : 0) | (entry.isBarrier ? 2 : 0)), endianness: .little)
        header.writeInteger(entry.atNanos, endianness: .little)
        header.writeInteger(UInt32(length), endianness: .little)
        let body = payload ?? allocator.buffer(capacity: 0)
        var trailer = allocator.buffer(capacity: 8)
        trailer.writeInteger(RecordChecksum.of(header, body), endianness: .little)

        var segment = segments.removeLast()
        let path = segmentPath(segment.number)
        do {
            try FileIO.write(writeFD, offset: segment.bytes, [header, body, trailer], path: path)
        } catch {
            // Whatever part reached the file is past `bytes` and is overwritten by the next append.
            segments.append(segment)
            throw error
        }
        index[entry.seq] = Location(segment: segment.number, offset: segment.bytes + UInt64(Self.headerSize), length: UInt32(length))
        segment.bytes += recordSize
        segment.seqs.append(entry.seq)
        segments.append(segment)
        lastSeq = entry.seq
        currentDirty = true
    }

    private func startSegment() throws {
        let number = segments.last!.number + 1
        let fd = try FileIO.open(segmentPath(number), create: true)
        if currentDirty { unsynced.append((segments.last!.number, writeFD)) } else { _ = Glibc.close(writeFD) }
        writeFD = fd
        currentDirty = false
        directoryDirty = true
        segments.append(Segment(number: number, bytes: 0))
    }

    /// Makes every entry appended so far durable (fdatasync of each segment written since the
    /// last sync, and of the directory when a segment was created).
    public func sync() throws {
        try takeSync().run()
    }

    /// The fdatasyncs that make every entry appended so far durable, taken out of the journal so
    /// that they can run (``PendingSync/run()``) without the lock its appends take: a client's
    /// flush then does not hold the writes behind it for the length of a disk flush. Once taken,
    /// the journal counts these entries as synced: if the run fails, every later ``takeSync()``
    /// throws (a failed fdatasync may have dropped the data; a retry that succeeds proves nothing).
    public func takeSync() throws -> PendingSync {
        if let failure = order.failure {
            throw StoreError("sync journal", path: directory, detail: "an earlier fdatasync of the journal failed (\(failure)); "
                             + "entries since may be lost, so no later sync can vouch for them: restart the site")
        }
        // The one step that can fail comes first, before anything is taken.
        let copy = currentDirty ? dup(writeFD) : -1
        guard !currentDirty || copy >= 0 else {
            throw StoreError("sync journal", path: segmentPath(segments.last!.number), errno: Glibc.errno)
        }
        var pending = PendingSync(journal: self, ticket: order.take())
        for (number, fd) in unsynced { pending.files.append((fd, segmentPath(number), true)) }
        unsynced = []
        if currentDirty {
            pending.files.append((copy, segmentPath(segments.last!.number), true))
            currentDirty = false
        }
        if directoryDirty {
            pending.directory = directory
            directoryDirty = false
        }
        return pending
    }

    private let order = SyncOrder()

    /// Taken syncs finish in the order they were taken: a sync that found nothing new to flush
    /// still returns only after the ones taken before it, which hold its entries, are durable.
    /// Also keeps the first failure of a taken sync (under the same lock).
    private final class SyncOrder: @unchecked Sendable {
        private let condition = NSCondition()
        private var next: UInt64 = 1
        private var doneThrough: UInt64 = 0
        private var firstFailure: String?

        var failure: String? { condition.withLock { firstFailure } }

        func fail(_ error: any Error) {
            condition.withLock { firstFailure = firstFailure ?? "\(error)" }
        }

        func take() -> UInt64 {
            condition.withLock {
                defer { next += 1 }
                return next
            }
        }

        func finish(_ ticket: UInt64) {
            condition.withLock {
                while doneThrough < ticket - 1 { condition.wait() }
                doneThrough = ticket
                condition.broadcast()
            }
        }
    }

    /// What ``takeSync()`` took: descriptors to fdatasync and close, and the directory to sync.
    public struct PendingSync: @unchecked Sendable {
        fileprivate let journal: JournalStore
        fileprivate let ticket: UInt64
        fileprivate var files: [(fd: Int32, path: String, close: Bool)] = []
        fileprivate var directory: String?

        fileprivate init(journal: JournalStore, ticket: UInt64) {
            self.journal = journal
            self.ticket = ticket
        }

        /// Runs the fdatasyncs, then waits for the syncs taken before this one; needs no lock.
        /// Closes every descriptor whatever happens. Must be called once for every taken sync.
        public func run() throws {
            defer { for file in files where file.close { _ = Glibc.close(file.fd) } }
            var failure: (any Error)?
            do {
                for file in files { try FileIO.datasync(file.fd, path: file.path) }
                if let directory { try FileIO.syncDirectory(directory) }
            } catch {
                failure = error
                journal.order.fail(error)
            }
            journal.order.finish(ticket)
            if let failure { throw failure }
            // One taken before this one may have failed meanwhile: its entries are not durable.
            if let earlier = journal.order.failure {
                throw StoreError("sync journal", path: journal.directory, detail: "an earlier fdatasync of the journal failed (\(earlier))")
            }
        }
    }

    // MARK: - Reading and trimming

    /// The payload of write `seq`, read from its segment; nil for a zeroing or barrier. Throws
    /// when the journal does not hold `seq` (never appended, or trimmed).
    public func payload(seq: UInt64) throws -> ByteBuffer? {
        guard let location = index[seq] else {
            throw StoreError("read from journal", path: directory, detail:
                "sequence \(seq) is not in the journal (trimmed, or never appended); the peer needs a bitmap resync")
        }
        guard location.length > 0 else { return nil }
        let path = segmentPath(location.segment)
        let fd: Int32
        if location.segment == segments.last!.number {
            fd = writeFD
        } else if let cached = readFD, cached.number == location.segment {
            fd = cached.fd
        } else {
            if let (_, old) = readFD { _ = Glibc.close(old); readFD = nil }
            fd = try FileIO.open(path, create: false)
            readFD = (location.segment, fd)
        }
        let buffer = try FileIO.read(fd, offset: location.offset, count: Int(location.length), path: path, allocator: allocator)
        guard buffer.readableBytes == Int(location.length) else {
            throw StoreError("read from journal", path: path, detail:
                "the segment ends inside sequence \(seq)'s payload; was it truncated by another process?")
        }
        return buffer
    }

    /// Forgets every entry with a sequence up to and including `seq`, and deletes the segments
    /// that hold nothing else (never the one being written).
    public func trim(through seq: UInt64) throws {
        var removed = false
        while segments.count > 1, segments[0].maxSeq <= seq {
            let segment = segments.removeFirst()
            if let cached = readFD, cached.number == segment.number { _ = Glibc.close(cached.fd); readFD = nil }
            if let i = unsynced.firstIndex(where: { $0.number == segment.number }) {
                _ = Glibc.close(unsynced.remove(at: i).fd)
            }
            for s in segment.seqs[segment.liveFrom...] { index[s] = nil }
            try Self.removeSegment(segmentPath(segment.number))
            removed = true
        }
        // The rest are forgotten in memory now; their bytes go with their segment.
        for i in segments.indices {
            while segments[i].liveFrom < segments[i].seqs.count, segments[i].seqs[segments[i].liveFrom] <= seq {
                index[segments[i].seqs[segments[i].liveFrom]] = nil
                segments[i].liveFrom += 1
            }
            if segments[i].liveFrom < segments[i].seqs.count { break }
        }
        if removed { try FileIO.syncDirectory(directory) }
    }
}
