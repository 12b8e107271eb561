import FerryWire
import Foundation
import NIOCore

extension FrameType {
    /// Tree replication (docs/protocol.md §7): one ``TreeMessage`` per frame.
    public static let tree = FrameType(rawValue: 0x20)
}

/// A message of tree replication between a tree's primary (the source) and a replica: the payload
/// of a ``FrameType/tree`` frame.
///
/// Layout (big-endian): kind u8, tree name (u16 length, UTF-8), then by kind:
///
///     kind            fields
///     1 hello         request u64, epoch u64, pending since (ms) u64 (0: nothing pending)
///                                                                 source → replica: "what is your newest snapshot?"
///     2 latest        request u64, has u8, root (32), snapshot i64 replica → source
///     3 query         request u64, count u32, count × ID (32)     source → replica: "which of these do you lack?"
///     4 lacking       request u64, count u32, count × ID (32)     replica → source
///     5 put           ID (32), then the data (flag 0x0001: one zstd frame)
///     6 commit        request u64, root (32), epoch u64, source time (ms since 1970) i64,
///                     files u64, directories u64, bytes u64
///     7 committed     request u64, snapshot i64, committed at (ms) i64
///     8 failed        request u64, message (u16 length, UTF-8)
///
/// A replica answers every request it gets, in order: a put before a query is stored before the
/// query is answered. Anything that does not fit is ``FrameError/malformedPayload(_:_:)``.
public enum TreeMessage: Sendable, Equatable {
    case hello(request: UInt64, epoch: UInt64, pendingSinceMs: UInt64)
    case latest(request: UInt64, root: ChunkID?, snapshot: Int64)
    case query(request: UInt64, ids: [ChunkID])
    case lacking(request: UInt64, ids: [ChunkID])
    case put(id: ChunkID, data: ByteBuffer)
    case commit(request: UInt64, root: ChunkID, summary: RunSummary)
    case committed(request: UInt64, snapshot: Int64, at: Date)
    case failed(request: UInt64, message: String)

    /// The most IDs one query or answer carries.
    public static let maxIDs = 65_536
    public static let compressedFlag: UInt16 = 0x0001
    /// What a `PeerLinks` must deliver for trees (its `dataFrameTypes`).
    public static let frameTypes: [FrameType: UInt16] = [.tree: compressedFlag]
    /// Chunks are at most 8 MiB; blobs of huge directories may be larger.
    public static let maxData = 48 << 20

    var kind: UInt8 {
        switch self {
        case .hello: 1
        case .latest: 2
        case .query: 3
        case .lacking: 4
        case .put: 5
        case .commit: 6
        case .committed: 7
        case .failed: 8
        }
    }

    /// The frame for `tree`, a put's data compressed with `compressor` (one per sender, reused)
    /// when that makes it smaller.
    public func frame(tree: String, compressor: ZstdCompressor? = nil) -> Frame {
        var b = ByteBuffer()
        b.writeInteger(kind)
        let name = Array(tree.utf8)
        b.writeInteger(UInt16(name.count))
        b.writeBytes(name)
        var flags: UInt16 = 0
        var tail: ByteBuffer?
        func ids(_ list: [ChunkID]) {
            b.writeInteger(UInt32(list.count))
            for id in list { id.write(to: &b) }
        }
        switch self {
        case .hello(let request, let epoch, let since):
            b.writeInteger(request); b.writeInteger(epoch); b.writeInteger(since)
        case .latest(let request, let root, let snapshot):
            b.writeInteger(request)
            b.writeInteger(UInt8(root == nil ? 0 : 1))
            (root ?? ChunkID(a: 0, b: 0, c: 0, d: 0)).write(to: &b)
            b.writeInteger(snapshot)
        case .query(let request, let list), .lacking(let request, let list):
            b.writeInteger(request); ids(list)
        case .put(let id, let data):
            id.write(to: &b)
            if let compressor, data.readableBytes > 1, let packed = compressor.compress(data, limit: data.readableBytes - 1) {
                flags = Self.compressedFlag
                tail = packed
            } else {
                tail = data
            }
        case .commit(let request, let root, let s):
            b.writeInteger(request)
            root.write(to: &b)
            b.writeInteger(UInt64(s.epoch))
            b.writeInteger(Int64((s.sourceTime.timeIntervalSince1970 * 1000).rounded()))
            b.writeInteger(UInt64(s.files)); b.writeInteger(UInt64(s.directories)); b.writeInteger(UInt64(s.bytes))
        case .committed(let request, let snapshot, let at):
            b.writeInteger(request); b.writeInteger(snapshot)
            b.writeInteger(Int64((at.timeIntervalSince1970 * 1000).rounded()))
        case .failed(let request, let message):
            b.writeInteger(request)
            let text = Array(message.utf8.prefix(4096))
            b.writeInteger(UInt16(text.count))
            b.writeBytes(text)
        }
        return Frame(type: .tree, flags: flags, payload: b, payloadTail: tail)
    }

    /// Decodes a tree frame: the tree's name and the message.
    public static func decode(_ frame: Frame) throws -> (tree: String, message: TreeMessage) {
        var b = frame.flattened().payload
        func bad(_ why: String) -> FrameError { FrameError.malformedPayload(.tree, why) }
        guard let kind = b.readInteger(as: UInt8.self), let n = b.readInteger(as: UInt16.self),
              let nameBytes = b.readBytes(length: Int(n)), let tree = String(validating: nameBytes, as: UTF8.self)
        else { throw bad("no kind or tree name") }
        if frame.flags & compressedFlag != 0 && kind != 5 { throw bad("compressed flag on a message without data") }
        func ids() throws -> [ChunkID] {
            guard let count = b.readInteger(as: UInt32.self), count <= maxIDs, b.readableBytes == Int(count) * 32 else {
                throw bad("bad ID list")
            }
            return (0..<count).map { _ in ChunkID.read(from: &b)! }
        }
        func u64() throws -> UInt64 {
            guard let v = b.readInteger(as: UInt64.self) else { throw bad("cut short") }
            return v
        }
        func i64() throws -> Int64 { Int64(bitPattern: try u64()) }
        func id() throws -> ChunkID {
            guard let v = ChunkID.read(from: &b) else { throw bad("cut short") }
            return v
        }
        let message: TreeMessage
        switch kind {
        case 1: message = .hello(request: try u64(), epoch: try u64(), pendingSinceMs: try u64())
        case 2:
            let request = try u64()
            guard let has = b.readInteger(as: UInt8.self) else { throw bad("cut short") }
            let root = try id()
            message = .latest(request: request, root: has == 1 ? root : nil, snapshot: try i64())
        case 3: message = .query(request: try u64(), ids: try ids())
        case 4: message = .lacking(request: try u64(), ids: try ids())
        case 5:
            let chunk = try id()
            var data = b
            if frame.flags & compressedFlag != 0 {
                do { data = try Zstd.decompress(b, maxSize: maxData) } catch { throw bad("\(error)") }
            }
            message = .put(id: chunk, data: data)
            b.moveReaderIndex(forwardBy: b.readableBytes)
        case 6:
            let request = try u64(), root = try id(), epoch = try i64(), ms = try i64()
            let files = try i64(), dirs = try i64(), bytes = try i64()
            message = .commit(request: request, root: root, summary: RunSummary(
                sourceTime: Date(timeIntervalSince1970: Double(ms) / 1000), epoch: epoch, files: files, directories: dirs, bytes: bytes))
        case 7:
            let request = try u64(), snapshot = try i64(), ms = try i64()
            message = .committed(request: request, snapshot: snapshot, at: Date(timeIntervalSince1970: Double(ms) / 1000))
        case 8:
            let request = try u64()
            guard let n = b.readInteger(as: UInt16.self), let text = b.readBytes(length: Int(n)) else { throw bad("cut short") }
            message = .failed(request: request, message: String(decoding: text, as: UTF8.self))
        default:
            throw bad("unknown kind \(kind)")
        }
        guard b.readableBytes == 0 else { throw bad("\(b.readableBytes) bytes past the message") }
        return (tree, message)
    }
}
