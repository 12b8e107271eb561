import Foundation
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// One Codable value kept atomically and durably in one file, double-buffered so that a crash in
/// the middle of ``store(_:)`` leaves the previous value readable (DESIGN §5.1: "written with care
/// for torn writes").
///
/// ## Layout
/// The file holds two slots of equal capacity: slot A at offset 0 and slot B at half the file's
/// size. Each slot is a header and a JSON body:
///
///     offset  size  field
///     0       4     magic       "FMD1"
///     4       4     version     u32 LE, 1
///     8       8     generation  u64 LE: 1 for the first value stored, +1 for each later one
///     16      4     length      u32 LE: body bytes
///     20      4     reserved    0
///     24      8     checksum    u64 LE: XXH3-64 of bytes 0..<24 and the body
///     32      N     body        the value as JSON
///
/// ``store(_:)`` writes the slot that does not hold the newest value, then fdatasyncs: until the
/// sync returns the other slot still holds the previous value intact. ``load()`` returns the valid
/// slot with the highest generation. A slot of all zeros was never written.
///
/// The file starts at 2 × 64 KiB and doubles when a value does not fit its slot (a dirty bitmap
/// of a 1 TiB volume at 64 KiB regions is ~2 MiB of words): the new slot B is written past the
/// old end with the file grown first, so slot A — which then holds the newest value — is never
/// touched while the file grows. Unwritten slot space stays a hole.
///
/// `@unchecked Sendable`: the file descriptor and the cached slot state are mutable; the caller
/// serializes access (the runtime calls each file from one event loop or under one lock).
public final class MetadataFile<Value: Codable>: @unchecked Sendable {
    public let path: String
    private let fd: Int32
    private let allocator = ByteBufferAllocator()
    /// What the slots hold, once read: which one has the newest generation.
    private var state: (newest: Slot, generation: UInt64)?
    private var scanned = false

    static var headerSize: Int { 32 }
    static var magic: UInt32 { 0x3144_4D46 }  // "FMD1" little-endian
    static var version: UInt32 { 1 }
    static var initialSlotCapacity: UInt64 { 64 << 10 }

    enum Slot { case a, b }

    /// Opens (creating it empty when missing) the file at `path`. Nothing is read until
    /// ``load()`` or ``store(_:)``.
    public init(path: String) throws {
        self.path = path
        let existed = FileIO.exists(path)
        fd = try FileIO.open(path, create: true)
        if !existed {
            do { try FileIO.syncDirectory(FileIO.directory(of: path)) } catch { _ = Glibc.close(fd); throw error }
        }
    }

    deinit { _ = Glibc.close(fd) }

    /// The newest intact value; nil when nothing was ever stored (a missing or empty file, or
    /// slots never written). Throws when the file holds slots but none is intact.
    public func load() throws -> Value? {
        let slot: Slot, body: ByteBuffer
        switch try scan() {
        case .nothing: return nil
        case .newest(let s, let b): (slot, body) = (s, b)
        case .corrupt(let problems):
            throw StoreError("load", path: path, detail:
                "no intact copy of the value: \(problems.joined(separator: "; ")). The disk corrupted the file "
                + "(or it is not a Ferry metadata file): restore it from a backup, or move it aside to start "
                + "from nothing (for replication state this means a full resync)")
        }
        do {
            return try JSONDecoder().decode(Value.self, from: Data(body.readableBytesView))
        } catch {
            throw StoreError("decode", path: path, detail:
                "slot \(slot) passes its checksum but does not decode as \(Value.self) (\(error)); "
                + "the file was written by another version of Ferry or for another purpose — "
                + "move it aside to start from nothing")
        }
    }

    /// Replaces the value: durable when this returns. On a crash before then, ``load()`` returns
    /// either this value or the previous one. Storing over a file whose slots are both corrupt
    /// replaces them (what they held is lost either way).
    public func store(_ value: Value) throws {
        if !scanned { _ = try scan() }
        let body: Data
        do {
            body = try JSONEncoder().encode(value)
        } catch {
            throw StoreError("encode", path: path, detail: "\(Value.self) does not encode as JSON: \(error)")
        }
        guard body.count <= Int(UInt32.max) else {
            throw StoreError("store", path: path, detail: "the value is \(body.count) bytes, more than a slot can hold (4 GiB)")
        }
        let needed = UInt64(Self.headerSize + body.count)
        var size = try FileIO.size(fd, path: path)
        if size < 2 * Self.initialSlotCapacity {
            try FileIO.truncate(fd, to: 2 * Self.initialSlotCapacity, path: path)
            size = 2 * Self.initialSlotCapacity
        }
        var target: Slot = state?.newest == .a ? .b : .a
        if needed > size / 2 {
            if state?.newest == .b {
                // Slot A's space would run into slot B, which holds the newest value: first make
                // a copy of it the newest in slot A (it fits, it was stored at this capacity).
                guard case .newest(_, let newest) = try scan() else {
                    throw StoreError("store", path: path, detail: "slot B changed under this process; is another process writing the file?")
                }
                try write(slot: .a, body: newest, capacity: size / 2)
                target = .b
            }
            var capacity = size / 2
            while capacity < needed { capacity *= 2 }
            // Slot B moves to the new half-way point; the old slot B lies inside slot A's space.
            try FileIO.truncate(fd, to: 2 * capacity, path: path)
            size = 2 * capacity
        }
        var buffer = allocator.buffer(capacity: body.count)
        buffer.writeBytes(body)
        try write(slot: target, body: buffer, capacity: size / 2)
    }

    /// Writes `body` to `slot` as the next generation and makes it durable.
    private func write(slot: Slot, body: ByteBuffer, capacity: UInt64) throws {
        let generation = (state?.generation ?? 0) + 1
        var header = allocator.buffer(capacity: Self.headerSize)
        header.writeInteger(Self.magic, endianness: .little)
        header.writeInteger(Self.version, endianness: .little)
        header.writeInteger(generation, endianness: .little)
        header.writeInteger(UInt32(body.readableBytes), endianness: .little)
        header.writeInteger(UInt32(0), endianness: .little)
        let checksum = RecordChecksum.of(header, body)
        header.writeInteger(checksum, endianness: .little)
        try FileIO.write(fd, offset: slot == .a ? 0 : capacity, [header, body], path: path)
        try FileIO.datasync(fd, path: path)
        state = (slot, generation)
    }

    private enum SlotContent {
        case empty
        case corrupt(String)
        case valid(generation: UInt64, body: ByteBuffer)
    }

    private enum ScanResult {
        case nothing
        case newest(Slot, ByteBuffer)
        case corrupt([String])
    }

    /// Reads both slots; remembers which is newest for the next ``store(_:)``.
    private func scan() throws -> ScanResult {
        scanned = true
        state = nil
        let size = try FileIO.size(fd, path: path)
        guard size > 0 else { return .nothing }
        let capacity = size / 2
        let a = try readSlot(at: 0, capacity: capacity)
        let b = try readSlot(at: capacity, capacity: size - capacity)
        var best: (slot: Slot, generation: UInt64, body: ByteBuffer)?
        for (slot, content) in [(Slot.a, a), (Slot.b, b)] {
            if case .valid(let generation, let body) = content, generation > best?.generation ?? 0 {
                best = (slot, generation, body)
            }
        }
        if let best {
            state = (best.slot, best.generation)
            return .newest(best.slot, best.body)
        }
        var problems: [String] = []
        if case .corrupt(let why) = a { problems.append("slot A: \(why)") }
        if case .corrupt(let why) = b { problems.append("slot B: \(why)") }
        return problems.isEmpty ? .nothing : .corrupt(problems)
    }

    private func readSlot(at offset: UInt64, capacity: UInt64) throws -> SlotContent {
        var header = try FileIO.read(fd, offset: offset, count: Self.headerSize, path: path, allocator: allocator)
        guard header.readableBytes == Self.headerSize else { return .empty }
        if header.readableBytesView.allSatisfy({ $0 == 0 }) { return .empty }
        let covered = header.getSlice(at: 0, length: 24)!
        let magic = header.readInteger(endianness: .little, as: UInt32.self)!
        let version = header.readInteger(endianness: .little, as: UInt32.self)!
        let generation = header.readInteger(endianness: .little, as: UInt64.self)!
        let length = header.readInteger(endianness: .little, as: UInt32.self)!
        _ = header.readInteger(endianness: .little, as: UInt32.self)!
        let checksum = header.readInteger(endianness: .little, as: UInt64.self)!
        guard magic == Self.magic else { return .corrupt("bad magic \(String(magic, radix: 16))") }
        guard version == Self.version else {
            return .corrupt("format version \(version), this Ferry reads version \(Self.version)")
        }
        guard UInt64(Self.headerSize) + UInt64(length) <= capacity else {
            return .corrupt("length \(length) does not fit its slot of \(capacity) bytes")
        }
        let body = try FileIO.read(fd, offset: offset + UInt64(Self.headerSize), count: Int(length), path: path, allocator: allocator)
        guard body.readableBytes == Int(length) else { return .corrupt("body cut short") }
        guard RecordChecksum.of(covered, body) == checksum else { return .corrupt("checksum mismatch (a torn or damaged write)") }
        return .valid(generation: generation, body: body)
    }
}
