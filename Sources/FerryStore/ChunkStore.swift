import CXXHash
import Foundation
import GRDB
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// A content-addressed store of chunks (issue 11, the peer's side of tree replication): chunks
/// are appended to pack files (`packs/NNNNNN.pack`, at most ``packLimit`` bytes each) and found
/// through an index in SQLite (`index.sqlite`: id → pack, offset, length), never one file per
/// chunk.
///
/// A chunk's ID is the SHA-256 of its content, computed by the caller (FerryTree); the store
/// checks each record with XXH3 when it reads it, and ``verify(_:)`` re-hashes content against
/// the ID with a function the caller passes.
///
/// Durability: ``put(_:id:)`` appends to the open pack; ``commit()`` fdatasyncs the pack, then
/// adds the new chunks to the index in one transaction. A crash between the two leaves records in
/// the pack that the index does not name: opening the store indexes every whole, checksummed
/// record past the last indexed one and cuts the pack after the last good record, so what had
/// arrived is not sent again and a torn tail is never read.
///
/// Record: magic `FCK1` (4) | id (32) | length u32 | checksum u64 (XXH3 of id and data) | data.
public final class ChunkStore: @unchecked Sendable {
    public static let idLength = 32
    static let magic: UInt32 = 0x4643_4B31   // "FCK1"
    static let headerLength = 4 + 32 + 4 + 8
    /// A pack is closed and a new one begun once it holds this many bytes.
    public let packLimit: UInt64

    public let directory: String
    let db: DatabaseQueue
    let lock = NSLock()
    struct Location { var pack: Int; var offset: UInt64; var length: Int }
    /// Appended since the last commit: found by ``contains(_:)`` and ``get(_:)`` already.
    var pending: [Key: (id: [UInt8], at: Location)] = [:]
    /// Chunks ``missing(_:)`` found absent since (the ones a source is about to send).
    var knownMissing = Set<Key>()
    /// A chunk ID as a dictionary key: four words hash far faster than 32 bytes one by one.
    struct Key: Hashable {
        var a, b, c, d: UInt64
        init(_ id: [UInt8]) {
            (a, b, c, d) = id.withUnsafeBytes { raw in
                raw.count >= 32
                    ? (raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self),
                       raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
                    : (UInt64(raw.count), 0, 0, 0)
            }
        }
    }
    var packNumber: Int
    var packFD: Int32
    /// Descriptors of closed packs being read (at most ``maxReaders``; dropped before a pack is
    /// deleted).
    var readers: [Int: Int32] = [:]
    static let maxReaders = 64
    private var packSize: UInt64
    /// Records appended to the open pack and not yet written to it (at most about 1 MiB), from
    /// offset ``tailStart``: one write per megabyte rather than one per chunk (a run of 200,000
    /// small files). Read from here until written; written before any sync, pack change or
    /// collection.
    private var tail = ByteBuffer()
    private var tailStart: UInt64 = 0
    static let tailLimit = 1 << 20
    /// The pack chunks are appended to now.
    var currentPack: Int { packNumber }

    public init(directory: String, packLimit: UInt64 = 64 << 20) throws {
        self.directory = directory
        self.packLimit = packLimit
        try FileManager.default.createDirectory(atPath: directory + "/packs", withIntermediateDirectories: true)
        var config = Configuration()
        config.prepareDatabase { db in try db.execute(sql: "PRAGMA synchronous = FULL") }
        do {
            db = try DatabaseQueue(path: directory + "/index.sqlite", configuration: config)
            try db.writeWithoutTransaction { try $0.execute(sql: "PRAGMA journal_mode = WAL") }
            try db.write { db in
                try db.execute(sql: """
                    CREATE TABLE IF NOT EXISTS chunk (
                        id BLOB PRIMARY KEY NOT NULL, pack INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL
                    ) WITHOUT ROWID
                    """)
            }
        } catch let error as DatabaseError {
            throw StoreError("open chunk index", path: directory + "/index.sqlite", detail: error.message ?? "\(error)")
        }
        let packs = (try? FileManager.default.contentsOfDirectory(atPath: directory + "/packs")) ?? []
        packNumber = packs.compactMap { $0.hasSuffix(".pack") ? Int($0.dropLast(5)) : nil }.max() ?? 1
        let path = Self.packPath(directory, packNumber)
        packFD = try FileIO.open(path, create: true)
        packSize = try FileIO.size(packFD, path: path)
        try recoverTail()
        tailStart = packSize
    }

    deinit {
        try? flushTail()
        close(packFD)
        for fd in readers.values { close(fd) }
    }

    static func packPath(_ directory: String, _ number: Int) -> String {
        let digits = String(number)
        return directory + "/packs/" + String(repeating: "0", count: max(0, 6 - digits.count)) + digits + ".pack"
    }

    /// Indexes the whole records at the end of the packs that the index does not name (a crash
    /// after a pack's fdatasync and before the index commit), and cuts off a torn one. Only the
    /// packs from the newest the index names onwards can hold such records.
    private func recoverTail() throws {
        let newestIndexed: Int = try db.read { try Int.fetchOne($0, sql: "SELECT MAX(pack) FROM chunk") } ?? 1
        for number in min(newestIndexed, packNumber)...packNumber {
            let path = Self.packPath(directory, number)
            guard FileIO.exists(path) else { continue }
            let fd = number == packNumber ? packFD : try FileIO.open(path, create: false)
            defer { if fd != packFD { close(fd) } }
            let size = try FileIO.size(fd, path: path)
            var offset: UInt64 = try db.read { db in
                try UInt64.fetchOne(db, sql: "SELECT MAX(offset + length) FROM chunk WHERE pack = ?", arguments: [number]) ?? 0
            }
            var found: [([UInt8], Location)] = []
            while offset + UInt64(Self.headerLength) <= size {
                guard let (id, length) = try readRecord(fd: fd, path: path, at: offset, verify: true) else { break }
                found.append((id, Location(pack: number, offset: offset, length: Self.headerLength + length)))
                offset += UInt64(Self.headerLength + length)
            }
            if offset < size {
                try FileIO.truncate(fd, to: offset, path: path)
                try FileIO.datasync(fd, path: path)
                if number == packNumber { packSize = offset }
            }
            if !found.isEmpty { try insert(found) }
        }
    }

    /// Reads the record at `offset`: its ID and data length, and checks it when `verify`; nil when
    /// it is not a whole, well-formed record.
    private func readRecord(fd: Int32, path: String, at offset: UInt64, verify: Bool) throws -> (id: [UInt8], length: Int)? {
        let header = try FileIO.read(fd, offset: offset, count: Self.headerLength, path: path, allocator: ByteBufferAllocator())
        guard header.readableBytes == Self.headerLength, header.getInteger(at: header.readerIndex, as: UInt32.self) == Self.magic
        else { return nil }
        let id = header.getBytes(at: header.readerIndex + 4, length: Self.idLength)!
        let length = Int(header.getInteger(at: header.readerIndex + 36, as: UInt32.self)!)
        let checksum = header.getInteger(at: header.readerIndex + 40, as: UInt64.self)!
        guard verify else { return (id, length) }
        let data = try FileIO.read(fd, offset: offset + UInt64(Self.headerLength), count: length, path: path, allocator: ByteBufferAllocator())
        guard data.readableBytes == length, Self.checksum(id: id, data: data) == checksum else { return nil }
        return (id, length)
    }

    static func checksum(id: [UInt8], data: ByteBuffer) -> UInt64 {
        RecordChecksum.of(ByteBuffer(bytes: id), data)
    }

    func insert(_ entries: [([UInt8], Location)], replace: Bool = false) throws {
        do {
            try db.write { db in
                let statement = try db.cachedStatement(sql: "INSERT OR \(replace ? "REPLACE" : "IGNORE") INTO chunk (id, pack, offset, length) VALUES (?, ?, ?, ?)")
                for (id, at) in entries {
                    try statement.execute(arguments: [Data(id), at.pack, Int64(at.offset), at.length])
                }
            }
        } catch let error as DatabaseError {
            throw StoreError("update chunk index", path: directory + "/index.sqlite", detail: error.message ?? "\(error)")
        }
    }

    /// Appends a chunk unless the store has it; true when it was added. Durable at ``commit()``.
    @discardableResult
    public func put(_ data: ByteBuffer, id: [UInt8]) throws -> Bool {
        precondition(id.count == Self.idLength, "a chunk ID is 32 bytes")
        return try lock.withLock {
            let key = Key(id)
            if pending[key] != nil { return false }
            // What `missing` just named needs no second look in the index.
            if knownMissing.remove(key) == nil, try location(id) != nil { return false }
            try append(data, id: id, key: key)
            return true
        }
    }

    /// Appends a record to the open pack (the caller holds the lock).
    func append(_ data: ByteBuffer, id: [UInt8], key: Key? = nil) throws {
        do {
            if packSize >= packLimit { try nextPack() }
            tail.writeInteger(Self.magic)
            tail.writeBytes(id)
            tail.writeInteger(UInt32(data.readableBytes))
            tail.writeInteger(Self.checksum(id: id, data: data))
            tail.writeImmutableBuffer(data)
            pending[key ?? Key(id)] = (id, Location(pack: packNumber, offset: packSize, length: Self.headerLength + data.readableBytes))
            packSize += UInt64(Self.headerLength + data.readableBytes)
            if tail.readableBytes >= Self.tailLimit { try flushTail() }
        }
    }

    /// Writes the buffered records to the open pack (the caller holds the lock). When that
    /// fails, they are forgotten (a later run sends them again) and the error thrown.
    func flushTail() throws {
        guard tail.readableBytes > 0 else { return }
        do {
            try FileIO.write(packFD, offset: tailStart, [tail], path: Self.packPath(directory, packNumber))
        } catch {
            let (pack, start) = (packNumber, tailStart)
            pending = pending.filter { $0.value.at.pack != pack || $0.value.at.offset < start }
            packSize = tailStart
            tail.clear()
            throw error
        }
        tailStart = packSize
        tail.clear()
    }

    /// Makes every chunk put so far durable and indexed.
    public func commit() throws {
        try lock.withLock {
            guard !pending.isEmpty else { return }
            try flushTail()
            try FileIO.datasync(packFD, path: Self.packPath(directory, packNumber))
            // In key order: the index's B-tree is then appended to page by page rather than
            // touched at random (a run of 200,000 new chunks: 1.3 s before, 0.55–0.9 s in key order).
            try insert(pending.values.map { ($0.id, $0.at) }.sorted { Self.precedes($0.0, $1.0) })
            pending.removeAll()
        }
    }

    static func precedes(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        a.withUnsafeBufferPointer { x in b.withUnsafeBufferPointer { y in
            let c = memcmp(x.baseAddress!, y.baseAddress!, min(x.count, y.count))
            return c < 0 || (c == 0 && x.count < y.count)
        } }
    }

    private func nextPack() throws {
        let old = Self.packPath(directory, packNumber)
        try flushTail()
        try FileIO.datasync(packFD, path: old)
        close(packFD)
        packNumber += 1
        let path = Self.packPath(directory, packNumber)
        packFD = try FileIO.open(path, create: true)
        packSize = 0
        tailStart = 0
        try FileIO.syncDirectory(directory + "/packs")
    }

    func location(_ id: [UInt8]) throws -> Location? {
        if let pending = pending[Key(id)] { return pending.at }
        // A point lookup needs no transaction (`read` adds one and two pragmas per call).
        return try db.inDatabase { db in try Self.location(id, in: db) }
    }

    /// The indexed location (one prepared statement, kept by the connection).
    static func location(_ id: [UInt8], in db: Database) throws -> Location? {
        let statement = try db.cachedStatement(sql: "SELECT pack, offset, length FROM chunk WHERE id = ?")
        return try Row.fetchOne(statement, arguments: [Data(id)])
            .map { Location(pack: $0[0], offset: UInt64($0[1] as Int64), length: $0[2]) }
    }

    public func contains(_ id: [UInt8]) throws -> Bool { try lock.withLock { try location(id) != nil } }

    /// Of `ids`, those the store lacks: what a peer asks the source to send. One read of the
    /// index for the lot.
    public func missing(_ ids: [[UInt8]]) throws -> [[UInt8]] {
        try lock.withLock {
            let unknown = ids.filter { pending[Key($0)] == nil }
            guard !unknown.isEmpty else { return [] }
            // One read transaction for the batch: one lock, not one per ID.
            let missing = try db.read { db in try unknown.filter { try Self.location($0, in: db) == nil } }
            if knownMissing.count > 1 << 20 { knownMissing.removeAll() }
            for id in missing { knownMissing.insert(Key(id)) }
            return missing
        }
    }

    /// The chunk's content, checked against its record checksum; nil when the store lacks it.
    /// Throws when the record is damaged.
    public func get(_ id: [UInt8]) throws -> ByteBuffer? {
        try lock.withLock {
            guard let at = try location(id) else { return nil }
            let path = Self.packPath(directory, at.pack)
            let record: ByteBuffer
            if at.pack == packNumber && at.offset >= tailStart {
                // A copy, not a slice: a slice kept by the caller would make the next append
                // copy the whole buffer.
                let from = tail.readerIndex + Int(at.offset - tailStart)
                var copy = ByteBufferAllocator().buffer(capacity: at.length)
                if from + at.length <= tail.writerIndex { copy.writeBytes(tail.readableBytesView[from..<(from + at.length)]) }
                record = copy
            } else {
                let fd = at.pack == packNumber ? packFD : try reader(at.pack, path: path)
                record = try FileIO.read(fd, offset: at.offset, count: at.length, path: path, allocator: ByteBufferAllocator())
            }
            guard record.readableBytes == at.length,
                  record.getInteger(at: record.readerIndex, as: UInt32.self) == Self.magic,
                  record.getBytes(at: record.readerIndex + 4, length: Self.idLength) == id
            else { throw StoreError("read chunk", path: path, detail: "the record at offset \(at.offset) is not the chunk the index names") }
            let checksum = record.getInteger(at: record.readerIndex + 40, as: UInt64.self)!
            let data = record.getSlice(at: record.readerIndex + Self.headerLength, length: at.length - Self.headerLength)!
            guard Self.checksum(id: id, data: data) == checksum else {
                throw StoreError("read chunk", path: path, detail: "the chunk at offset \(at.offset) fails its checksum (damaged on disk)")
            }
            return data
        }
    }

    /// A descriptor of a closed pack, kept for the next read (the caller holds the lock).
    private func reader(_ pack: Int, path: String) throws -> Int32 {
        if let fd = readers[pack] { return fd }
        if readers.count >= Self.maxReaders { dropReaders() }
        let fd = try FileIO.open(path, create: false)
        readers[pack] = fd
        return fd
    }

    /// Closes the kept descriptors (the caller holds the lock).
    func dropReaders() {
        for fd in readers.values { close(fd) }
        readers.removeAll()
    }

    /// Chunks in the index.
    public func count() throws -> Int {
        try lock.withLock { try db.read { try Int.fetchOne($0, sql: "SELECT COUNT(*) FROM chunk") ?? 0 } + pending.count }
    }

    /// Re-reads every indexed chunk and checks it with `hash` (SHA-256 → its ID); returns the IDs
    /// of the damaged or unreadable ones.
    public func verify(_ hash: (ByteBuffer) -> [UInt8]) throws -> [[UInt8]] {
        let ids: [[UInt8]] = try db.read { db in try Data.fetchAll(db, sql: "SELECT id FROM chunk").map { Array($0) } }
        return ids.filter { id in
            guard let data = try? get(id) else { return true }
            return hash(data) != id
        }
    }
}

extension ChunkStore {
    public struct Collection: Sendable, Equatable {
        /// Chunks no longer in the index, and the pack files removed or rewritten.
        public var chunksRemoved = 0
        public var packsRemoved = 0
        public var packsRewritten = 0
        /// Bytes of pack files given back to the filesystem.
        public var bytesFreed: UInt64 = 0
        /// Bytes of chunks still needed that were copied out of mostly dead packs.
        public var bytesCopied: UInt64 = 0
    }

    /// Garbage collection: keeps the chunks `isLive` says are needed and gives back the space of
    /// the others. A pack with no live chunk is deleted; one whose dead bytes are more than
    /// `maxDeadFraction` of it has its live chunks copied into the open pack (made durable and
    /// indexed first), then is deleted; other packs are left as they are (their dead chunks stay
    /// readable, which is harmless). The open pack is never touched, so chunks of a run in
    /// progress are safe whatever `isLive` says of them.
    public func collect(maxDeadFraction: Double = 0.2, isLive: ([UInt8]) -> Bool) throws -> Collection {
        try commit()
        var result = Collection()
        let rows: [(id: [UInt8], pack: Int, offset: UInt64, length: Int)] = try db.read { db in
            try Row.fetchAll(db, sql: "SELECT id, pack, offset, length FROM chunk").map {
                (Array($0["id"] as Data), $0["pack"], UInt64($0["offset"] as Int64), $0["length"])
            }
        }
        let open = lock.withLock { currentPack }
        var byPack: [Int: [(id: [UInt8], offset: UInt64, length: Int)]] = [:]
        for r in rows where r.pack != open { byPack[r.pack, default: []].append((r.id, r.offset, r.length)) }
        for (pack, chunks) in byPack.sorted(by: { $0.key < $1.key }) {
            let path = Self.packPath(directory, pack)
            let fileSize = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? UInt64) ?? 0
            let live = chunks.filter { isLive($0.id) }
            let liveBytes = live.reduce(UInt64(0)) { $0 + UInt64($1.length) }
            let dead = chunks.count - live.count
            guard dead > 0 else { continue }
            if !live.isEmpty && Double(fileSize - min(fileSize, liveBytes)) <= maxDeadFraction * Double(fileSize) { continue }
            // Copy what is still needed, durably, before the pack goes.
            for chunk in live {
                guard let data = try get(chunk.id) else { continue }
                try lock.withLock { try append(data, id: chunk.id) }
                result.bytesCopied += UInt64(data.readableBytes)
            }
            try lock.withLock {
                if !pending.isEmpty {
                    try flushTail()
                    try FileIO.datasync(packFD, path: Self.packPath(directory, packNumber))
                    try insert(pending.values.map { ($0.id, $0.at) }, replace: true)
                    pending.removeAll()
                }
            }
            let deadIDs = chunks.filter { !isLive($0.id) }.map(\.id)
            try db.write { db in
                let statement = try db.cachedStatement(sql: "DELETE FROM chunk WHERE id = ? AND pack = ?")
                for id in deadIDs { try statement.execute(arguments: [Data(id), pack]) }
            }
            lock.withLock {
                if let fd = readers.removeValue(forKey: pack) { close(fd) }
                unlink(path)
            }
            result.chunksRemoved += deadIDs.count
            result.bytesFreed += fileSize
            if live.isEmpty { result.packsRemoved += 1 } else { result.packsRewritten += 1 }
        }
        try FileIO.syncDirectory(directory + "/packs")
        return result
    }

    /// Drops chunks from the index (damaged ones: a later put stores them again).
    public func forget(_ ids: [[UInt8]]) throws {
        try lock.withLock {
            for id in ids { pending[Key(id)] = nil }
            try db.write { db in
                for id in ids { try db.execute(sql: "DELETE FROM chunk WHERE id = ?", arguments: [Data(id)]) }
            }
        }
    }

    /// Bytes of all pack files.
    public func packBytes() -> UInt64 {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory + "/packs")) ?? []
        return names.reduce(0) { sum, name in
            sum + ((try? FileManager.default.attributesOfItem(atPath: directory + "/packs/" + name)[.size] as? UInt64) ?? 0)
        }
    }
}
