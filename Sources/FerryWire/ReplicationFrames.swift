import CZstd
import FerryCore
import NIOCore
import Synchronization

/// One ``ReplicationMessage`` of one volume, with the data of a write or region: the payload of a
/// ``FrameType/replication`` frame (protocol.md §6.2).
///
/// # Layout (frame type 0x10)
///
/// All integers big-endian; offsets from the start of the frame's payload.
///
///     offset  size  field
///     0       1     kind          u8   1 open, 2 write, 3 region, 4 barrier, 5 position, 6 ack, 7 refuse,
///                                      8 handoff, 9 verify, 10 hashes
///     1       2+V   volume        string (u16 length V >= 1, UTF-8): the volume's name
///     3+V     ...   fields        per kind, below
///
///     kind          fields                                                            bytes
///     1 open        epoch u64, generation u64, volume size u64, mode u8,              43 + 24H
///                   applied seq u64, discards u64, history u16 H,
///                   then H × (generation u64, epoch u64, branch seq u64)
///                   (mode: 1 sync, 2 semi-sync, 3 async, 4 scheduled; the volume is the frame's;
///                   H at most 4,096, the sender's generations oldest first; discards 0 or the
///                   receiver's generation a `ferry resolve` on the sender's site discarded)
///     2 write       epoch u64, index u64, seq u64, offset u64, length u64, zero u8    41 + data
///     3 region      the same as write                                                 41 + data
///     4 barrier     epoch u64, index u64, seq u64, kind u8                            25
///                   (kind: 1 flush, 2 cut, 3 catch-up begin, 4 catch-up end, 5 point)
///     5 position    epoch u64, generation u64, applied seq u64, consistent u8,        30 + 16N
///                   initialized u8, needs u32 N, then N × (offset u64, length u64)
///                   (N at most 65,536: ranges a demoted primary wrote that it needs sent again)
///     6 ack         level u8 (1 received, 2 written, 3 durable), index u64            9
///     7 refuse      reason string (the sender cuts it to 1024 bytes)                  2 + R
///     8 handoff     epoch u64, generation u64, seq u64                                24
///     9 verify      id u64, offset u64, length u64, block size u32                    28
///                   (block size a power of two from 4 KiB to 64 MiB, at most 8,192 blocks)
///     10 hashes     id u64, count u32 N (at most 8,192), then N × XXH3-64 u64         12 + 8N
///
/// Bytes that are booleans (zero, consistent, initialized) are 0 or 1. The data of a write or
/// region is the rest of the payload: nothing when `zero` is 1; otherwise exactly `length` bytes
/// (at most ``maxDataLength``), or, with flag 0x0001, one zstd frame whose header states a content
/// size of exactly `length` bytes and which decompresses to exactly that. Flag 0x0001 on any other
/// message, or on a zeroing item, is malformed, as is anything else that does not fit this layout:
/// each is ``FrameError/malformedPayload(_:_:)``, which closes the link.
public struct VolumeFrame: Sendable, Equatable {
    /// The volume the message is about.
    public var volume: String
    /// The header: what the state machines exchange.
    public var message: ReplicationMessage
    /// The data of a `write` or `region` that is not zero: exactly `range.length` bytes. Nil for
    /// every other message and for zeroing items.
    public var payload: ByteBuffer?
    /// The data as zstd compressed it, when ``ReplicationFrameEncoder/prepare(_:worthTrying:allocator:)`` found that
    /// worth it; it then goes on the wire instead of ``payload``. Nil on a decoded frame.
    public internal(set) var compressedPayload: ByteBuffer?

    /// Flag bit 0x0001 of a replication frame: the data is zstd-compressed.
    public static let compressedFlag: UInt16 = 0x0001
    /// Every flag bit a replication frame may carry.
    public static let knownFlags: UInt16 = compressedFlag
    /// The frame types (with their flags) a `PeerLinks` must deliver for volume replication: its
    /// `dataFrameTypes`.
    public static let frameTypes: [FrameType: UInt16] = [.replication: knownFlags]
    /// The most data one write or region may carry: 32 MiB, so that the frame fits in
    /// ``Frame/maxPayloadSize`` uncompressed whatever the volume name, and so that a compressed
    /// frame cannot make a receiver allocate more.
    public static let maxDataLength = 32 * 1024 * 1024

    public init(volume: String, message: ReplicationMessage, payload: ByteBuffer? = nil) {
        self.volume = volume
        self.message = message
        self.payload = payload
    }

    /// Equal when volume, message and data are: how the data travels does not matter.
    public static func == (a: VolumeFrame, b: VolumeFrame) -> Bool {
        a.volume == b.volume && a.message == b.message && a.payload == b.payload
    }

    enum Kind: UInt8 {
        case open = 1, write, region, barrier, position, ack, refuse, handoff, verify, hashes
    }

    private static let type = FrameType.replication

    // MARK: - Decoding

    /// Decodes a replication frame strictly: any deviation from the layout throws
    /// ``FrameError/malformedPayload(_:_:)``, a flag outside ``knownFlags``
    /// ``FrameError/unknownFlags(_:_:)``. Uncompressed data is a slice of the frame's payload (no
    /// copy); compressed data is decompressed with a reused zstd context.
    public init(frame: Frame) throws {
        let type = Self.type
        guard frame.type == type else {
            throw FrameError.malformedPayload(frame.type, "not a replication frame (type 0x10)")
        }
        guard frame.flags & ~Self.knownFlags == 0 else { throw FrameError.unknownFlags(frame.type, frame.flags) }
        if frame.payloadTail != nil {
            // Only a frame that never went over the wire has a tail.
            self = try VolumeFrame(frame: frame.flattened())
            return
        }
        let compressed = frame.flags & Self.compressedFlag != 0
        var p = frame.payload
        let kindByte = try LinkMessage.read(UInt8.self, from: &p, type)
        guard let kind = Kind(rawValue: kindByte) else {
            throw FrameError.malformedPayload(type, "unknown message kind \(kindByte)")
        }
        let volume = try LinkMessage.readString(from: &p, type)
        guard !volume.isEmpty else { throw FrameError.malformedPayload(type, "volume name is empty") }
        func u64() throws -> UInt64 { try LinkMessage.read(UInt64.self, from: &p, type) }
        func u8() throws -> UInt8 { try LinkMessage.read(UInt8.self, from: &p, type) }
        func bool(_ name: String) throws -> Bool {
            let byte = try u8()
            guard byte <= 1 else { throw FrameError.malformedPayload(type, "\(name) is \(byte), not 0 or 1") }
            return byte == 1
        }
        if compressed, kind != .write, kind != .region {
            throw FrameError.malformedPayload(type, "flag 0x0001 (compressed) on a \(kind) message, which carries no data")
        }
        var payload: ByteBuffer?
        switch kind {
        case .open:
            let epoch = try u64(), generation = try u64(), size = try u64()
            let modeByte = try u8()
            guard let mode = Self.mode(modeByte) else {
                throw FrameError.malformedPayload(type, "unknown replication mode \(modeByte)")
            }
            let applied = try u64(), discards = try u64()
            guard let count = p.readInteger(as: UInt16.self) else {
                throw FrameError.malformedPayload(type, "open ends before its count of generations")
            }
            guard count <= VolumeOpen.maxHistory else {
                throw FrameError.malformedPayload(type, "open carries \(count) generations, more than \(VolumeOpen.maxHistory)")
            }
            var history: [GenerationRecord] = []
            history.reserveCapacity(Int(count))
            for _ in 0..<count {
                let id = try u64(), genEpoch = try u64(), branch = try u64()
                guard id != 0 else { throw FrameError.malformedPayload(type, "open carries generation 0") }
                history.append(GenerationRecord(id: id, epoch: genEpoch, branchSeq: branch))
            }
            message = .open(VolumeOpen(volume: volume, epoch: epoch, generation: generation, volumeSize: size, mode: mode,
                                       history: history, appliedSeq: applied, discards: discards))
        case .write, .region:
            let epoch = try u64(), index = try u64(), seq = try u64(), offset = try u64(), length = try u64()
            let zero = try bool("the zero flag")
            guard offset.addingReportingOverflow(length).overflow == false else {
                throw FrameError.malformedPayload(type, "range offset \(offset) + length \(length) overflows")
            }
            let item = ReplicationItem(epoch: epoch, index: index, seq: seq,
                                       range: BlockRange(offset: offset, length: length), isZero: zero)
            message = kind == .write ? .write(item) : .region(item)
            if zero {
                if compressed { throw FrameError.malformedPayload(type, "flag 0x0001 (compressed) on a zeroing item") }
            } else {
                guard length <= UInt64(Self.maxDataLength) else {
                    throw FrameError.malformedPayload(type, "range of \(length) bytes exceeds the \(Self.maxDataLength)-byte data limit")
                }
                let data = p.readSlice(length: p.readableBytes)!
                if compressed {
                    payload = try ZstdContexts.decompress(data, exactly: Int(length))
                } else {
                    guard data.readableBytes == Int(length) else {
                        throw FrameError.malformedPayload(type, "data is \(data.readableBytes) bytes but the range is \(length) bytes")
                    }
                    payload = data
                }
            }
        case .barrier:
            let epoch = try u64(), index = try u64(), seq = try u64()
            let kindByte = try u8()
            guard let barrierKind = BarrierKind(rawValue: kindByte) else {
                throw FrameError.malformedPayload(type, "unknown barrier kind \(kindByte)")
            }
            message = .barrier(ReplicationBarrier(epoch: epoch, index: index, seq: seq, kind: barrierKind))
        case .position:
            let epoch = try u64(), generation = try u64(), applied = try u64()
            let consistent = try bool("the consistent flag")
            // The second byte: bit 0 initialized, bit 1 `needsComplete`.
            let flags = try u8()
            guard flags <= 3 else { throw FrameError.malformedPayload(type, "the initialized flags are \(flags), not 0 to 3") }
            let initialized = flags & 1 != 0
            guard let count = p.readInteger(as: UInt32.self) else {
                throw FrameError.malformedPayload(type, "position ends before its count of needed ranges")
            }
            guard count <= ReplicaPosition.maxNeeds else {
                throw FrameError.malformedPayload(type, "position needs \(count) ranges, more than \(ReplicaPosition.maxNeeds)")
            }
            var needs: [BlockRange] = []
            needs.reserveCapacity(Int(count))
            for _ in 0..<count {
                let offset = try u64(), length = try u64()
                guard length > 0, offset <= UInt64.max - length else {
                    throw FrameError.malformedPayload(type, "position needs an invalid range at \(offset) of \(length) bytes")
                }
                needs.append(BlockRange(offset: offset, length: length))
            }
            message = .position(ReplicaPosition(epoch: epoch, generation: generation, appliedSeq: applied,
                                                consistent: consistent, initialized: initialized,
                                                needs: count == 0 ? nil : needs, needsComplete: flags & 2 != 0 ? true : nil))
        case .ack:
            let levelByte = try u8()
            guard let level = AckLevel(rawValue: levelByte) else {
                throw FrameError.malformedPayload(type, "unknown ack level \(levelByte)")
            }
            message = .ack(level: level, index: try u64())
        case .refuse:
            message = .refuse(reason: try LinkMessage.readString(from: &p, type))
        case .handoff:
            let epoch = try u64(), generation = try u64(), seq = try u64()
            message = .handoff(VolumeHandoff(epoch: epoch, generation: generation, seq: seq))
        case .verify:
            let id = try u64(), offset = try u64(), length = try u64()
            let request = VerifyRequest(id: id, offset: offset, length: length, blockSize: try LinkMessage.read(UInt32.self, from: &p, type))
            if let problem = request.problem { throw FrameError.malformedPayload(type, "verify: \(problem)") }
            message = .verify(request)
        case .hashes:
            let id = try u64()
            let count = try LinkMessage.read(UInt32.self, from: &p, type)
            guard count <= VerifyRequest.maxBlocks else {
                throw FrameError.malformedPayload(type, "hashes carries \(count) hashes, more than \(VerifyRequest.maxBlocks)")
            }
            var hashes: [UInt64] = []
            hashes.reserveCapacity(Int(count))
            for _ in 0..<count { hashes.append(try u64()) }
            message = .hashes(id: id, hashes)
        }
        guard p.readableBytes == 0 else {
            throw FrameError.malformedPayload(type, "\(p.readableBytes) unexpected bytes after the fields")
        }
        self.volume = volume
        self.payload = payload
    }

    // MARK: - Encoding

    /// This message as a replication frame. The data (or its compressed form) becomes the frame's
    /// ``Frame/payloadTail``, not copied; the fields go in a small buffer of their own.
    ///
    /// The frame must be valid (``validate()``); that is the sender's contract, checked in debug
    /// builds. In release builds an invalid one goes out as it is and the receiver refuses it.
    public func frame(allocator: ByteBufferAllocator = ByteBufferAllocator()) -> Frame {
        assert({ do { try validate(); return true } catch { print("\(error)"); return false } }())
        var fields = allocator.buffer(capacity: 48 + volume.utf8.count)
        var flags: UInt16 = 0
        var data: ByteBuffer?
        func item(_ kind: Kind, _ item: ReplicationItem) {
            fields.writeInteger(kind.rawValue)
            writeVolume(&fields)
            fields.writeMultipleIntegers(item.epoch, item.index, item.seq, item.range.offset, item.range.length)
            fields.writeInteger(UInt8(item.isZero ? 1 : 0))
            guard !item.isZero else { return }
            if let compressedPayload {
                flags = Self.compressedFlag
                data = compressedPayload
            } else {
                data = payload
            }
        }
        switch message {
        case .open(let open):
            fields.writeInteger(Kind.open.rawValue)
            writeVolume(&fields)
            fields.writeMultipleIntegers(open.epoch, open.generation, open.volumeSize, Self.modeByte(open.mode))
            let history = open.history.suffix(VolumeOpen.maxHistory)
            fields.writeMultipleIntegers(open.appliedSeq, open.discards, UInt16(history.count))
            for g in history { fields.writeMultipleIntegers(g.id, g.epoch, g.branchSeq) }
        case .write(let i):
            item(.write, i)
        case .region(let i):
            item(.region, i)
        case .barrier(let barrier):
            fields.writeInteger(Kind.barrier.rawValue)
            writeVolume(&fields)
            fields.writeMultipleIntegers(barrier.epoch, barrier.index, barrier.seq, barrier.kind.rawValue)
        case .position(let position):
            fields.writeInteger(Kind.position.rawValue)
            writeVolume(&fields)
            fields.writeMultipleIntegers(
                position.epoch, position.generation, position.appliedSeq,
                UInt8(position.consistent ? 1 : 0), UInt8(position.initialized ? 1 : 0) | UInt8(position.needsComplete == true ? 2 : 0))
            let needs = (position.needs ?? []).prefix(ReplicaPosition.maxNeeds)
            fields.writeInteger(UInt32(needs.count))
            for r in needs { fields.writeMultipleIntegers(r.offset, r.length) }
        case .ack(let level, let index):
            fields.writeInteger(Kind.ack.rawValue)
            writeVolume(&fields)
            fields.writeMultipleIntegers(level.rawValue, index)
        case .refuse(let reason):
            fields.writeInteger(Kind.refuse.rawValue)
            writeVolume(&fields)
            LinkMessage.writeString(reason, to: &fields)
        case .handoff(let h):
            fields.writeInteger(Kind.handoff.rawValue)
            writeVolume(&fields)
            fields.writeMultipleIntegers(h.epoch, h.generation, h.seq)
        case .verify(let v):
            fields.writeInteger(Kind.verify.rawValue)
            writeVolume(&fields)
            fields.writeMultipleIntegers(v.id, v.offset, v.length, v.blockSize)
        case .hashes(let id, let hashes):
            fields.writeInteger(Kind.hashes.rawValue)
            writeVolume(&fields)
            let some = hashes.prefix(VerifyRequest.maxBlocks)
            fields.writeMultipleIntegers(id, UInt32(some.count))
            for h in some { fields.writeInteger(h) }
        }
        return Frame(type: Self.type, flags: flags, payload: fields, payloadTail: data)
    }

    private func writeVolume(_ buffer: inout ByteBuffer) {
        let bytes = volume.utf8
        buffer.writeInteger(UInt16(truncatingIfNeeded: bytes.count))
        buffer.writeBytes(bytes.prefix(Int(UInt16.max)))
    }

    /// Throws ``FrameError/malformedPayload(_:_:)`` with the reason when this frame cannot be
    /// sent as it is: the data does not match the message, or a field cannot be encoded.
    public func validate() throws {
        func bad(_ why: String) -> FrameError { FrameError.malformedPayload(Self.type, why) }
        guard !volume.isEmpty else { throw bad("volume name is empty") }
        guard volume.utf8.count <= Int(UInt16.max) else { throw bad("volume name of \(volume.utf8.count) bytes is too long") }
        switch message {
        case .write(let item), .region(let item):
            guard item.range.offset.addingReportingOverflow(item.range.length).overflow == false else {
                throw bad("range offset \(item.range.offset) + length \(item.range.length) overflows")
            }
            if item.isZero {
                guard payload == nil else { throw bad("data on a zeroing item") }
            } else {
                guard let payload else { throw bad("no data for a \(item.range.length)-byte item that is not zero") }
                guard item.range.length <= UInt64(Self.maxDataLength) else {
                    throw bad("range of \(item.range.length) bytes exceeds the \(Self.maxDataLength)-byte data limit")
                }
                guard payload.readableBytes == Int(item.range.length) else {
                    throw bad("data is \(payload.readableBytes) bytes but the range is \(item.range.length) bytes")
                }
            }
        case .open(let open):
            guard open.volume == volume else { throw bad("open names volume \"\(open.volume)\" in a frame for \"\(volume)\"") }
            guard payload == nil else { throw bad("data on an open message") }
        case .barrier, .position, .ack, .refuse, .handoff, .verify, .hashes:
            guard payload == nil else { throw bad("data on a message that carries none") }
        }
        guard compressedPayload == nil || payload != nil else { throw bad("compressed data without data") }
    }

    // MARK: - Wire values

    static func modeByte(_ mode: ReplicationMode) -> UInt8 {
        switch mode {
        case .sync: return 1
        case .semiSync: return 2
        case .async: return 3
        case .scheduled: return 4
        }
    }

    static func mode(_ byte: UInt8) -> ReplicationMode? {
        switch byte {
        case 1: return .sync
        case 2: return .semiSync
        case 3: return .async
        case 4: return .scheduled
        default: return nil
        }
    }
}

/// Prepares a sender's replication frames: compresses the data of writes and regions with zstd
/// when `compress` is on and that saves at least an eighth of the bytes (DESIGN §5.1:
/// "zstd-compressed when it helps"), reusing one compression context.
///
/// One per sender (per peer of a volume). Copies share the context, which a lock guards, so a copy
/// used from another thread is safe, only slower.
public struct ReplicationFrameEncoder: Sendable {
    /// Whether data is compressed at all.
    public let compress: Bool
    /// The zstd level (1, the fastest, by default).
    public let level: Int32
    /// Bytes of data prepared, before compression.
    public private(set) var dataBytes: UInt64 = 0
    /// Bytes of data as they go on the wire: compressed where that helped, else as they were.
    public private(set) var wireDataBytes: UInt64 = 0

    private let compressor: ZstdCompressor?
    /// Payloads still to send as they are before trying compression again, and how many the next
    /// failure makes it skip: after a payload that did not compress, the next 1, then 2, 4, ...
    /// up to ``maxSkip`` go uncompressed, so a stream of incompressible data (random, encrypted,
    /// already compressed) costs one compression attempt in `maxSkip` payloads instead of each one.
    private var skipRemaining = 0
    private var nextSkip = 1
    static let maxSkip = 64
    /// Compression attempts made (for tests and status).
    public private(set) var attempts: UInt64 = 0

    public init(compress: Bool, level: Int32 = 1) {
        self.compress = compress
        self.level = level
        self.compressor = compress ? ZstdCompressor(level: level) : nil
    }

    /// `frame`, with its data compressed for the wire if that saves at least 1/8 of it
    /// (``VolumeFrame/compressedPayload``); otherwise unchanged. Payloads after ones that did not
    /// compress are sent as they are without trying (see ``attempts``).
    ///
    /// `worthTrying` false sends the data as it is without trying (the caller knows the link has
    /// room to spare, so compressing would only cost CPU).
    public mutating func prepare(_ frame: VolumeFrame, worthTrying: Bool = true,
                                 allocator: ByteBufferAllocator = ByteBufferAllocator()) -> VolumeFrame {
        guard let data = frame.payload else { return frame }
        dataBytes += UInt64(data.readableBytes)
        var prepared = frame
        prepared.compressedPayload = nil
        if let compressor, worthTrying {
            if skipRemaining > 0 {
                skipRemaining -= 1
            } else {
                attempts += 1
                // At most 7/8 of the input, so a result that fits saves at least 1/8.
                if let packed = compressor.compress(data, limit: data.readableBytes * 7 / 8, allocator: allocator) {
                    prepared.compressedPayload = packed
                    nextSkip = 1
                } else {
                    skipRemaining = nextSkip
                    nextSkip = min(nextSkip * 2, Self.maxSkip)
                }
            }
        }
        wireDataBytes += UInt64((prepared.compressedPayload ?? data).readableBytes)
        return prepared
    }

    /// `frame` prepared (``prepare(_:worthTrying:allocator:)``) and encoded (``VolumeFrame/frame(allocator:)``).
    public mutating func frame(for frame: VolumeFrame, allocator: ByteBufferAllocator = ByteBufferAllocator()) -> Frame {
        prepare(frame, allocator: allocator).frame(allocator: allocator)
    }
}

/// One zstd compression context, reused; a lock keeps it to one thread at a time.
public final class ZstdCompressor: Sendable {
    private let context: Mutex<OpaquePointer?>

    public init(level: Int32) {
        let cctx = ZSTD_createCCtx()
        if let cctx {
            ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, level)
            // No zstd checksum: the frame's XXH3 covers the bytes on the wire.
            ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 0)
        }
        context = Mutex(cctx)
    }

    deinit {
        context.withLock { cctx in
            if let cctx { ZSTD_freeCCtx(cctx) }
        }
    }

    /// `input` compressed into at most `limit` bytes, or nil when it does not fit (or zstd fails).
    public func compress(_ input: ByteBuffer, limit: Int, allocator: ByteBufferAllocator = ByteBufferAllocator()) -> ByteBuffer? {
        guard limit > 0 else { return nil }
        var out = allocator.buffer(capacity: limit)
        let written = context.withLock { cctx -> Int in
            guard let cctx else { return 0 }
            return input.withUnsafeReadableBytes { src in
                out.writeWithUnsafeMutableBytes(minimumWritableBytes: limit) { dst in
                    let n = ZSTD_compress2(cctx, dst.baseAddress, limit, src.baseAddress, src.count)
                    // dstSize_tooSmall is the usual "not worth it".
                    return ZSTD_isError(n) != 0 ? 0 : n
                }
            }
        }
        return written > 0 ? out : nil
    }
}

/// Decompression contexts for received replication frames, reused across frames and threads: a
/// receiver takes one, decompresses, and gives it back.
enum ZstdContexts {
    /// A `ZSTD_DCtx *`. Sendable because only one thread uses it at a time: it is either in the
    /// pool (under its lock) or taken by exactly one caller of `decompress`.
    private struct DCtx: @unchecked Sendable {
        let pointer: OpaquePointer
    }

    /// Idle contexts; at most `keep` are kept (about one per event loop is what is needed).
    private static let pool = Mutex<[DCtx]>([])
    private static let keep = 16

    /// Decompresses one zstd frame that must hold exactly `length` bytes of content; anything else
    /// throws ``FrameError/malformedPayload(_:_:)`` before more than `length` bytes are allocated.
    static func decompress(_ input: ByteBuffer, exactly length: Int) throws -> ByteBuffer {
        func bad(_ why: String) -> FrameError { FrameError.malformedPayload(.replication, "compressed data: \(why)") }
        let (size, frameSize) = input.withUnsafeReadableBytes { src in
            (ZSTD_getFrameContentSize(src.baseAddress, src.count), ZSTD_findFrameCompressedSize(src.baseAddress, src.count))
        }
        // ZSTD_CONTENTSIZE_UNKNOWN / _ERROR are the two largest UInt64 values.
        guard size < UInt64.max - 1 else { throw bad("not a zstd frame with a stated content size") }
        guard size == UInt64(length) else {
            throw bad("zstd frame holds \(size) bytes but the range is \(length) bytes")
        }
        guard ZSTD_isError(frameSize) == 0, frameSize == input.readableBytes else {
            throw bad("\(input.readableBytes) bytes are not exactly one zstd frame")
        }
        var failure: String?
        guard let out = decompress(input, size: length, failure: &failure) else { throw bad(failure ?? "zstd failed") }
        return out
    }

    /// Decompresses `input` into `size` bytes with a context from the pool; nil (and `failure`
    /// set) when zstd fails or the content is not `size` bytes.
    static func decompress(_ input: ByteBuffer, size: Int, failure: inout String?) -> ByteBuffer? {
        guard let dctx = pool.withLock({ $0.popLast() }) ?? ZSTD_createDCtx().map(DCtx.init) else {
            failure = "cannot allocate a zstd context"
            return nil
        }
        defer {
            let kept = pool.withLock { idle in
                guard idle.count < keep else { return false }
                idle.append(dctx)
                return true
            }
            if !kept { ZSTD_freeDCtx(dctx.pointer) }
        }
        var out = ByteBufferAllocator().buffer(capacity: size)
        var error: String?
        input.withUnsafeReadableBytes { src in
            _ = out.writeWithUnsafeMutableBytes(minimumWritableBytes: max(1, size)) { dst in
                let n = ZSTD_decompressDCtx(dctx.pointer, dst.baseAddress, size, src.baseAddress, src.count)
                if ZSTD_isError(n) != 0 {
                    error = "zstd: " + String(cString: ZSTD_getErrorName(n))
                    return 0
                }
                if n != size { error = "decompresses to \(n) bytes but the range is \(size) bytes" }
                return n
            }
        }
        failure = error
        return error == nil ? out : nil
    }
}

extension VolumeFrame.Kind: CustomStringConvertible {
    var description: String {
        switch self {
        case .open: return "open"
        case .write: return "write"
        case .region: return "region"
        case .barrier: return "barrier"
        case .position: return "position"
        case .ack: return "ack"
        case .refuse: return "refuse"
        case .handoff: return "handoff"
        case .verify: return "verify"
        case .hashes: return "hashes"
        }
    }
}
