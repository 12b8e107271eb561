import Crypto
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// A chunk's or manifest blob's ID: the SHA-256 of its content, held inline (no allocation).
public struct ChunkID: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var a: UInt64, b: UInt64, c: UInt64, d: UInt64

    public init(a: UInt64, b: UInt64, c: UInt64, d: UInt64) {
        self.a = a; self.b = b; self.c = c; self.d = d
    }

    /// From 32 bytes (big-endian words); nil for any other length.
    public init?<C: Collection>(bytes: C) where C.Element == UInt8 {
        guard bytes.count == 32 else { return nil }
        var words = [UInt64](repeating: 0, count: 4)
        for (i, byte) in bytes.enumerated() { words[i / 8] = words[i / 8] << 8 | UInt64(byte) }
        self.init(a: words[0], b: words[1], c: words[2], d: words[3])
    }

    /// The SHA-256 of `data`.
    public static func of(_ data: UnsafeRawBufferPointer) -> ChunkID {
        let digest = SHA256.hash(data: data)
        return digest.withUnsafeBytes { ChunkID(bytes: $0)! }
    }

    public static func of(_ buffer: ByteBuffer) -> ChunkID {
        buffer.withUnsafeReadableBytes { of($0) }
    }

    public static func of(_ bytes: [UInt8]) -> ChunkID {
        bytes.withUnsafeBytes { of($0) }
    }

    public var bytes: [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(32)
        for word in [a, b, c, d] {
            for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: word >> UInt64(shift))) }
        }
        return out
    }

    public var hex: String { bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined() }
    /// The first 12 hex digits: enough to name a chunk or snapshot root to a person.
    public var description: String { String(hex.prefix(12)) }

    public static func < (x: ChunkID, y: ChunkID) -> Bool { (x.a, x.b, x.c, x.d) < (y.a, y.b, y.c, y.d) }

    func write(to buffer: inout ByteBuffer) {
        buffer.writeInteger(a); buffer.writeInteger(b); buffer.writeInteger(c); buffer.writeInteger(d)
    }

    static func read(from buffer: inout ByteBuffer) -> ChunkID? {
        guard let a = buffer.readInteger(as: UInt64.self), let b = buffer.readInteger(as: UInt64.self),
              let c = buffer.readInteger(as: UInt64.self), let d = buffer.readInteger(as: UInt64.self) else { return nil }
        return ChunkID(a: a, b: b, c: c, d: d)
    }
}

/// A file's data: runs of chunks at offsets; the gaps between segments (and up to the size) are
/// holes, so a sparse file stays sparse.
public struct FileSegment: Equatable, Sendable {
    public var offset: UInt64
    public var chunks: [ChunkRef]

    public init(offset: UInt64, chunks: [ChunkRef]) {
        self.offset = offset
        self.chunks = chunks
    }

    public var length: UInt64 { chunks.reduce(0) { $0 + UInt64($1.length) } }
}

public struct ChunkRef: Hashable, Sendable {
    public var id: ChunkID
    public var length: UInt32

    public init(id: ChunkID, length: UInt32) {
        self.id = id
        self.length = length
    }
}

/// A nanosecond timestamp as `stat` gives it.
public struct FileTime: Equatable, Sendable, Comparable {
    public var seconds: Int64
    public var nanoseconds: UInt32

    public init(seconds: Int64, nanoseconds: UInt32) {
        self.seconds = seconds
        self.nanoseconds = nanoseconds
    }

    public static func < (x: FileTime, y: FileTime) -> Bool { (x.seconds, x.nanoseconds) < (y.seconds, y.nanoseconds) }
}

/// One name in a directory of a snapshot's manifest. Names are bytes, as Linux keeps them (never
/// decoded as UTF-8: two different names must never collapse into one).
public struct TreeEntry: Equatable, Sendable {
    public enum Kind: UInt8, Sendable {
        case file = 1, directory = 2, symlink = 3, fifo = 4
    }

    public var name: [UInt8]
    public var kind: Kind
    /// Permission bits with setuid, setgid and sticky (`mode & 0o7777`).
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var mtime: FileTime
    /// A file's size in bytes; 0 for the others.
    public var size: UInt64
    /// Files with more than one link share a nonzero group within a snapshot (the source's inode
    /// number): the peer makes them hard links of each other.
    public var linkGroup: UInt64
    /// A symlink's target, as bytes; never followed.
    public var target: [UInt8]
    /// A directory's manifest blob.
    public var subtree: ChunkID?
    /// A file's data.
    public var segments: [FileSegment]

    public init(name: [UInt8], kind: Kind, mode: UInt32, uid: UInt32, gid: UInt32, mtime: FileTime, size: UInt64 = 0,
                linkGroup: UInt64 = 0, target: [UInt8] = [], subtree: ChunkID? = nil, segments: [FileSegment] = []) {
        self.name = name
        self.kind = kind
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.size = size
        self.linkGroup = linkGroup
        self.target = target
        self.subtree = subtree
        self.segments = segments
    }

    /// Every chunk the file's data needs.
    public var chunkIDs: [ChunkID] { segments.flatMap { $0.chunks.map(\.id) } }
}

/// A directory of a manifest, stored as one blob named by its SHA-256, so a directory that did not
/// change keeps its ID and a whole unchanged subtree is skipped by comparing one ID.
///
/// Layout (big-endian): magic `FTD1` u32, count u32, then per entry sorted by name bytes:
/// name (u16 length, bytes), kind u8, mode u32, uid u32, gid u32, mtime seconds i64, nanoseconds
/// u32, size u64, link group u64, then by kind: directory — subtree ID (32 bytes); symlink —
/// target (u16 length, bytes); file — segments u32, each: offset u64, chunks u32, each: ID (32
/// bytes), length u32.
public enum DirectoryBlob {
    static let magic: UInt32 = 0x4654_4431   // "FTD1"

    public static func encode(_ entries: [TreeEntry]) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.reserveCapacity(8 + entries.count * 96)
        buffer.writeInteger(magic)
        buffer.writeInteger(UInt32(entries.count))
        for e in entries { write(e, to: &buffer) }
        return buffer
    }

    /// One entry, as ``encode(_:)`` lays it out.
    static func write(_ e: TreeEntry, to buffer: inout ByteBuffer) {
        buffer.writeInteger(UInt16(e.name.count))
        buffer.writeBytes(e.name)
        buffer.writeInteger(e.kind.rawValue)
        buffer.writeInteger(e.mode)
        buffer.writeInteger(e.uid)
        buffer.writeInteger(e.gid)
        buffer.writeInteger(e.mtime.seconds)
        buffer.writeInteger(e.mtime.nanoseconds)
        buffer.writeInteger(e.size)
        buffer.writeInteger(e.linkGroup)
        switch e.kind {
        case .directory:
            (e.subtree ?? ChunkID(a: 0, b: 0, c: 0, d: 0)).write(to: &buffer)
        case .symlink:
            buffer.writeInteger(UInt16(e.target.count))
            buffer.writeBytes(e.target)
        case .file:
            buffer.writeInteger(UInt32(e.segments.count))
            for s in e.segments {
                buffer.writeInteger(s.offset)
                buffer.writeInteger(UInt32(s.chunks.count))
                for c in s.chunks {
                    c.id.write(to: &buffer)
                    buffer.writeInteger(c.length)
                }
            }
        case .fifo:
            break
        }
    }

    /// Where each entry of a blob lies, without decoding it (the scanner compares names and copies
    /// unchanged entries as bytes): offsets from the blob's reader index. Nil when malformed.
    struct Span {
        var start: Int
        var end: Int
        var nameLength: Int
        var kind: UInt8
        /// The name's bytes start two bytes into the entry.
        var nameStart: Int { start + 2 }
        /// A directory's subtree ID starts here.
        var subtreeStart: Int { start + 2 + nameLength + 41 }
    }

    static func spans(_ blob: ByteBuffer) -> [Span]? {
        blob.withUnsafeReadableBytes { raw -> [Span]? in
            func u16(_ at: Int) -> Int { Int(raw[at]) << 8 | Int(raw[at + 1]) }
            func u32(_ at: Int) -> Int { u16(at) << 16 | u16(at + 2) }
            guard raw.count >= 8, u32(0) == Int(magic) else { return nil }
            let count = u32(4)
            var spans: [Span] = []
            spans.reserveCapacity(min(count, raw.count / 43))
            var at = 8
            for _ in 0..<count {
                let start = at
                guard at + 2 <= raw.count else { return nil }
                let nameLength = u16(at)
                at += 2 + nameLength
                // kind u8, mode, uid, gid u32, mtime i64 + u32, size u64, link group u64: 41 bytes.
                guard at + 41 <= raw.count else { return nil }
                let kind = raw[at]
                at += 41
                switch TreeEntry.Kind(rawValue: kind) {
                case .directory:
                    at += 32
                case .symlink:
                    guard at + 2 <= raw.count else { return nil }
                    at += 2 + u16(at)
                case .file:
                    guard at + 4 <= raw.count else { return nil }
                    let segments = u32(at)
                    at += 4
                    for _ in 0..<segments {
                        guard at + 12 <= raw.count else { return nil }
                        at += 12 + 36 * u32(at + 8)
                    }
                case .fifo:
                    break
                case nil:
                    return nil
                }
                guard at <= raw.count else { return nil }
                spans.append(Span(start: start, end: at, nameLength: nameLength, kind: kind))
            }
            return at == raw.count ? spans : nil
        }
    }

    /// How the name of the entry at `span` orders against `name` (memcmp's sign).
    static func compareName(_ blob: ByteBuffer, _ span: Span, _ name: [UInt8]) -> Int32 {
        blob.withUnsafeReadableBytes { raw in
            name.withUnsafeBytes { other in
                let n = min(span.nameLength, other.count)
                let order = n == 0 ? 0 : memcmp(raw.baseAddress! + span.nameStart, other.baseAddress!, n)
                if order != 0 { return order }
                return span.nameLength < other.count ? -1 : span.nameLength > other.count ? 1 : 0
            }
        }
    }

    /// The subtree ID of the directory entry at `span` (nil for other kinds).
    static func subtree(_ blob: ByteBuffer, _ span: Span) -> ChunkID? {
        guard span.kind == TreeEntry.Kind.directory.rawValue else { return nil }
        var slice = blob.getSlice(at: blob.readerIndex + span.subtreeStart, length: 32)!
        return ChunkID.read(from: &slice)
    }

    /// The entry at `span` of `blob`.
    static func entry(_ blob: ByteBuffer, _ span: Span) throws -> TreeEntry {
        var b = blob.getSlice(at: blob.readerIndex + span.start, length: span.end - span.start)!
        guard let e = try readEntry(&b) else { throw Malformed(description: "directory blob cut short") }
        return e
    }

    public struct Malformed: Error, CustomStringConvertible {
        public var description: String
    }

    public static func decode(_ blob: ByteBuffer) throws -> [TreeEntry] {
        var b = blob
        guard b.readInteger(as: UInt32.self) == magic, let count = b.readInteger(as: UInt32.self) else {
            throw Malformed(description: "not a directory blob (bad magic)")
        }
        var entries: [TreeEntry] = []
        entries.reserveCapacity(Int(min(count, 1 << 20)))
        func fail() -> Malformed { Malformed(description: "directory blob cut short at entry \(entries.count) of \(count)") }
        for _ in 0..<count {
            guard let e = try readEntry(&b) else { throw fail() }
            let name = e.name
            // A name is one path component: never empty, `.`, `..`, nor holding `/` or NUL, and
            // the names are sorted and unique, so a manifest cannot reach outside its directory.
            guard !name.isEmpty || count == 1, name != [0x2E], name != [0x2E, 0x2E], !name.contains(0x2F), !name.contains(0) else {
                throw Malformed(description: "directory blob has an entry named \"\(TreePath.display(name))\", which is not a file name")
            }
            if let previous = entries.last, !PosixFS.precedes(previous.name, name) {
                throw Malformed(description: "directory blob's names are not sorted and unique at \"\(TreePath.display(name))\"")
            }
            entries.append(e)
        }
        guard b.readableBytes == 0 else { throw Malformed(description: "directory blob has \(b.readableBytes) bytes past its last entry") }
        return entries
    }

    /// One entry (nil when the blob ends inside it); its name is not checked here.
    static func readEntry(_ b: inout ByteBuffer) throws -> TreeEntry? {
        guard let nameLength = b.readInteger(as: UInt16.self), let name = b.readBytes(length: Int(nameLength)),
              let kindByte = b.readInteger(as: UInt8.self), let mode = b.readInteger(as: UInt32.self),
              let uid = b.readInteger(as: UInt32.self), let gid = b.readInteger(as: UInt32.self),
              let seconds = b.readInteger(as: Int64.self), let nanos = b.readInteger(as: UInt32.self),
              let size = b.readInteger(as: UInt64.self), let group = b.readInteger(as: UInt64.self)
        else { return nil }
        guard let kind = TreeEntry.Kind(rawValue: kindByte) else {
            throw Malformed(description: "directory blob has an entry of unknown kind \(kindByte)")
        }
        var e = TreeEntry(name: name, kind: kind, mode: mode, uid: uid, gid: gid,
                          mtime: FileTime(seconds: seconds, nanoseconds: nanos), size: size, linkGroup: group)
        switch kind {
        case .directory:
            guard let id = ChunkID.read(from: &b) else { return nil }
            e.subtree = id
        case .symlink:
            guard let n = b.readInteger(as: UInt16.self), let target = b.readBytes(length: Int(n)) else { return nil }
            e.target = target
        case .file:
            guard let n = b.readInteger(as: UInt32.self) else { return nil }
            for _ in 0..<n {
                guard let offset = b.readInteger(as: UInt64.self), let m = b.readInteger(as: UInt32.self) else { return nil }
                var chunks: [ChunkRef] = []
                chunks.reserveCapacity(Int(min(m, 1 << 16)))
                for _ in 0..<m {
                    guard let id = ChunkID.read(from: &b), let length = b.readInteger(as: UInt32.self) else { return nil }
                    chunks.append(ChunkRef(id: id, length: length))
                }
                e.segments.append(FileSegment(offset: offset, chunks: chunks))
            }
        case .fifo:
            break
        }
        return e
    }

    /// Orders names as the manifest does: by bytes.
    public static func sorted(_ entries: [TreeEntry]) -> [TreeEntry] {
        entries.sorted { PosixFS.precedes($0.name, $1.name) }
    }
}
