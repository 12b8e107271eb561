import CZstd
import FerryCore
import NIOCore
import NIOEmbedded
import Testing

@testable import FerryWire

/// The volume replication frames (protocol.md §6.2): every message through the real encoder and
/// decoder, and every way a payload can be malformed.
@Suite("Replication frames")
struct ReplicationFrameTests {
    /// Compressible data: a repeating text.
    static func text(_ length: Int) -> ByteBuffer {
        var buffer = ByteBuffer()
        while buffer.readableBytes < length { buffer.writeString("block of a volume; ") }
        return buffer.getSlice(at: 0, length: length)!
    }

    /// Incompressible data.
    static func noise(_ length: Int) -> ByteBuffer {
        var rng = SystemRandomNumberGenerator()
        var buffer = ByteBuffer()
        while buffer.readableBytes < length { buffer.writeInteger(rng.next() as UInt64) }
        return buffer.getSlice(at: 0, length: length)!
    }

    static func item(_ length: UInt64, zero: Bool = false) -> ReplicationItem {
        ReplicationItem(epoch: 7, index: 42, seq: 1_000_001, range: BlockRange(offset: 1 << 40, length: length), isZero: zero)
    }

    static let messages: [VolumeFrame] = [
        VolumeFrame(volume: "vm1", message: .open(VolumeOpen(volume: "vm1", epoch: 3, generation: 9, volumeSize: 20 << 30, mode: .sync))),
        VolumeFrame(volume: "vm1", message: .handoff(VolumeHandoff(epoch: 4, generation: 0xdead_beef, seq: 123_456))),
        VolumeFrame(volume: "vm1", message: .verify(VerifyRequest(id: 7, offset: 4 << 20, length: 1 << 30, blockSize: 4 << 20))),
        VolumeFrame(volume: "vm1", message: .hashes(id: 7, [1, 2, .max])),
        VolumeFrame(volume: "vm1", message: .hashes(id: 8, [])),
        VolumeFrame(volume: "vm1", message: .open(VolumeOpen(volume: "vm1", epoch: 3, generation: 9, volumeSize: 20 << 30, mode: .sync,
            history: [GenerationRecord(id: 7, epoch: 1, branchSeq: 0), GenerationRecord(id: 9, epoch: 3, branchSeq: 12_345)],
            appliedSeq: 99_999, discards: 0xfeed))),
        VolumeFrame(volume: "vm1", message: .open(VolumeOpen(volume: "vm1", epoch: 0, generation: .max, volumeSize: 512, mode: .semiSync))),
        VolumeFrame(volume: "vm1", message: .open(VolumeOpen(volume: "vm1", epoch: 1, generation: 1, volumeSize: 1, mode: .async))),
        VolumeFrame(volume: "vm-é", message: .open(VolumeOpen(volume: "vm-é", epoch: 1, generation: 2, volumeSize: 3, mode: .scheduled))),
        VolumeFrame(volume: "vm1", message: .write(item(4096)), payload: text(4096)),
        VolumeFrame(volume: "vm1", message: .write(item(65536)), payload: noise(65536)),
        VolumeFrame(volume: "vm1", message: .write(item(1 << 30, zero: true))),
        VolumeFrame(volume: "vm1", message: .write(item(0)), payload: ByteBuffer()),
        VolumeFrame(volume: "vm1", message: .region(item(300_000)), payload: text(300_000)),
        VolumeFrame(volume: "vm1", message: .region(item(512)), payload: noise(512)),
        VolumeFrame(volume: "vm1", message: .region(item(8192, zero: true))),
        VolumeFrame(volume: "vm1", message: .barrier(ReplicationBarrier(epoch: 7, index: 43, seq: 1_000_001, kind: .flush))),
        VolumeFrame(volume: "vm1", message: .barrier(ReplicationBarrier(epoch: 7, index: 44, seq: 5, kind: .cut))),
        VolumeFrame(volume: "vm1", message: .barrier(ReplicationBarrier(epoch: 7, index: 45, seq: 5, kind: .catchUpBegin))),
        VolumeFrame(volume: "vm1", message: .barrier(ReplicationBarrier(epoch: 7, index: 46, seq: 5, kind: .catchUpEnd))),
        VolumeFrame(volume: "vm1", message: .barrier(ReplicationBarrier(epoch: 7, index: 47, seq: 5, kind: .point))),
        VolumeFrame(volume: "vm1", message: .position(ReplicaPosition(epoch: 7, generation: 9, appliedSeq: 99, consistent: true, initialized: true))),
        VolumeFrame(volume: "vm1", message: .position(ReplicaPosition(epoch: 1, generation: 2, appliedSeq: 3, consistent: false, initialized: true))),
        VolumeFrame(volume: "vm1", message: .position(.empty)),
        VolumeFrame(volume: "vm1", message: .position(ReplicaPosition(epoch: 1, generation: 2, appliedSeq: 0, consistent: false, initialized: true,
                                                                      needs: [BlockRange(offset: 0, length: 4096), BlockRange(offset: 8 << 20, length: 1 << 20)]))),
        VolumeFrame(volume: "vm1", message: .position(ReplicaPosition(epoch: 3, generation: 4, appliedSeq: 70, consistent: true, initialized: true,
                                                                      needs: [BlockRange(offset: 4 << 20, length: 4 << 20)], needsComplete: true))),
        VolumeFrame(volume: "vm1", message: .position(ReplicaPosition(epoch: 3, generation: 4, appliedSeq: 70, consistent: true, initialized: true,
                                                                      needsComplete: true))),
        VolumeFrame(volume: "vm1", message: .ack(level: .received, index: 1)),
        VolumeFrame(volume: "vm1", message: .ack(level: .written, index: .max)),
        VolumeFrame(volume: "vm1", message: .ack(level: .durable, index: 0)),
        VolumeFrame(volume: "vm1", message: .refuse(reason: "epoch 3 is older than this replica's epoch 4")),
        VolumeFrame(volume: "vm1", message: .refuse(reason: "")),
    ]

    /// Through the pipeline's encoder (buffers concatenated as TCP would) and the frame decoder.
    static func overTheWire(_ frame: Frame) throws -> Frame {
        let encoder = FrameEncoder()
        var stream = ByteBuffer()
        try encoder.encode(frame, allocator: ByteBufferAllocator()) { stream.writeImmutableBuffer($0) }
        let decoded = try FrameDecoder(knownFlags: FrameType.dataPlane).nextFrame(from: &stream)
        #expect(stream.readableBytes == 0)
        return try #require(decoded)
    }

    @Test("every message survives the wire, with and without data, compressed and not",
          arguments: messages.indices, [false, true])
    func roundTrip(index: Int, compress: Bool) throws {
        let original = Self.messages[index]
        try original.validate()
        var encoder = ReplicationFrameEncoder(compress: compress)
        let frame = encoder.frame(for: original)
        #expect(frame.type == .replication)
        let wire = try Self.overTheWire(frame)
        let decoded = try VolumeFrame(frame: wire)
        #expect(decoded == original)
        #expect(decoded.payload?.readableBytes == original.payload?.readableBytes)
        // Compressed exactly when asked to and it saves at least 1/8: text does, noise does not.
        let data = original.payload?.readableBytes ?? 0
        let compressible = data > 0 && original.payload == Self.text(data)
        #expect(wire.flags == (compress && compressible ? VolumeFrame.compressedFlag : 0))
        if wire.flags != 0 {
            #expect(wire.payloadLength <= frame.payload.readableBytes + data * 7 / 8)
        }
    }

    @Test("compression is used only when it saves an eighth, and the encoder counts what it saved")
    func compressionThreshold() throws {
        var encoder = ReplicationFrameEncoder(compress: true)
        let text = VolumeFrame(volume: "v", message: .write(Self.item(65536)), payload: Self.text(65536))
        let noise = VolumeFrame(volume: "v", message: .write(Self.item(65536)), payload: Self.noise(65536))
        let packed = encoder.prepare(text)
        #expect(packed.compressedPayload != nil)
        #expect(try #require(packed.compressedPayload).readableBytes * 8 <= 65536 * 7)
        #expect(encoder.prepare(noise).compressedPayload == nil)
        #expect(encoder.dataBytes == 2 * 65536)
        #expect(encoder.wireDataBytes == 65536 + UInt64(packed.compressedPayload!.readableBytes))
        // Not tried when the caller says the link has room to spare; tried when it has not.
        var fresh = ReplicationFrameEncoder(compress: true)
        #expect(fresh.prepare(text, worthTrying: false).compressedPayload == nil)
        #expect(fresh.prepare(text).compressedPayload != nil)
        var plain = ReplicationFrameEncoder(compress: false)
        #expect(plain.prepare(text).compressedPayload == nil)
        #expect(plain.frame(for: text).flags == 0)
    }

    @Test("after data that does not compress, the encoder backs off: 1, 2, 4 ... up to 64 payloads go as they are untried")
    func compressionBacksOffOnNoise() {
        var encoder = ReplicationFrameEncoder(compress: true)
        let noise = VolumeFrame(volume: "v", message: .write(Self.item(4096)), payload: Self.noise(4096))
        let text = VolumeFrame(volume: "v", message: .write(Self.item(4096)), payload: Self.text(4096))
        for _ in 0..<1000 { _ = encoder.prepare(noise) }
        // 1 + 2 + 4 + 8 + 16 + 32 + 64 + 64 ...: about 1000 / 65 attempts once at the ceiling.
        #expect(encoder.attempts > 10 && encoder.attempts < 30, "\(encoder.attempts) attempts for 1000 incompressible payloads")
        // Compressible data is compressed again within the back-off, and then every time.
        var compressed = 0
        for _ in 0..<200 where encoder.prepare(text).compressedPayload != nil { compressed += 1 }
        #expect(compressed >= 200 - 64)
    }

    @Test("the encoder hands the data on as it is: header, data, checksum")
    func dataIsNotCopied() throws {
        let data = Self.noise(100_000)
        let volumeFrame = VolumeFrame(volume: "vm1", message: .write(Self.item(100_000)), payload: data)
        let frame = volumeFrame.frame()
        var pieces: [ByteBuffer] = []
        try FrameEncoder().encode(frame, allocator: ByteBufferAllocator()) { pieces.append($0) }
        #expect(pieces.count == 3)
        // The header piece holds the 12-byte frame header and the replication fields.
        #expect(pieces.first?.readableBytes == 12 + frame.payload.readableBytes)
        #expect(pieces.last?.readableBytes == 8)
        let sameBytes = pieces[1].withUnsafeReadableBytes { piece in
            data.withUnsafeReadableBytes { original in piece.baseAddress == original.baseAddress && piece.count == original.count }
        }
        #expect(sameBytes, "the data went down the pipeline as the caller's buffer")
        // The same bytes as the one-piece encoder, which copies.
        var joined = ByteBuffer()
        for piece in pieces { joined.writeImmutableBuffer(piece) }
        #expect(joined == (try FrameEncoder.encode(frame)))
    }

    @Test("small pieces are copied next to the header; a large head and tail each go as they are")
    func encoderPieces() throws {
        let encoder = FrameEncoder()
        func pieces(_ frame: Frame) throws -> [Int] {
            var sizes: [Int] = []
            try encoder.encode(frame, allocator: ByteBufferAllocator()) { sizes.append($0.readableBytes) }
            return sizes
        }
        let type = FrameType.replication
        #expect(try pieces(Frame(type: .ping, payload: ByteBuffer(repeating: 1, count: 16))) == [36])
        #expect(try pieces(Frame(type: type)) == [20])
        // A 4 KiB block is copied: one buffer, so one TLS record, per frame.
        #expect(try pieces(Frame(type: type, payload: ByteBuffer(repeating: 1, count: 4096))) == [4116])
        #expect(try pieces(Frame(type: type, payload: ByteBuffer(repeating: 1, count: 20000))) == [12, 20000, 8])
        #expect(try pieces(Frame(type: type, payload: ByteBuffer(repeating: 1, count: 20000),
                                 payloadTail: ByteBuffer(repeating: 2, count: 30000))) == [12, 20000, 30000, 8])
        #expect(try pieces(Frame(type: type, payload: ByteBuffer(repeating: 1, count: 10),
                                 payloadTail: ByteBuffer(repeating: 2, count: 100))) == [130])
        #expect(try pieces(Frame(type: type, payload: ByteBuffer(repeating: 1, count: 10),
                                 payloadTail: ByteBuffer(repeating: 2, count: 20000))) == [22, 20000, 8])
        // One hash state serves frame after frame.
        let frame = Frame(type: type, flags: 1, payload: ByteBuffer(repeating: 3, count: 40), payloadTail: Self.noise(4000))
        for _ in 0..<3 { #expect(try Self.overTheWire(frame) == frame) }
    }

    @Test("frames written together leave in a few full buffers at the flush, large data as it is")
    func framesAreGatheredUntilTheFlush() throws {
        let channel = EmbeddedChannel(handler: FrameEncoder())
        defer { _ = try? channel.finish() }
        let big = Self.noise(100_000)
        var frames: [Frame] = (0..<10).map { Frame(type: .replication, flags: 0, payload: ByteBuffer(repeating: UInt8($0), count: 4096)) }
        frames.insert(Frame(type: .replication, payload: ByteBuffer(repeating: 9, count: 30), payloadTail: big), at: 5)
        frames.append(Frame(type: .replication, payload: ByteBuffer(repeating: 7, count: 16)))
        var done = 0
        for frame in frames {
            channel.write(frame).whenSuccess { done += 1 }
        }
        // Before the flush only what had to go (the buffers before the large data, and it) left.
        var early: [ByteBuffer] = []
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { early.append(buffer) }
        #expect(done == 0)
        channel.flush()
        #expect(done == frames.count)
        var buffers = early
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { buffers.append(buffer) }
        // 11 small frames of ~4 KiB in buffers of at least 16 KiB, and the large data on its own.
        #expect(buffers.count <= 6, "\(buffers.map(\.readableBytes))")
        #expect(buffers.contains { piece in
            piece.withUnsafeReadableBytes { p in big.withUnsafeReadableBytes { $0.baseAddress == p.baseAddress && $0.count == p.count } }
        }, "the large data went down the pipeline as the caller's buffer")
        var stream = ByteBuffer()
        for buffer in buffers { stream.writeImmutableBuffer(buffer) }
        let decoder = FrameDecoder(knownFlags: FrameType.dataPlane)
        var decoded: [Frame] = []
        while let frame = try decoder.nextFrame(from: &stream) { decoded.append(frame) }
        #expect(decoded == frames)
        #expect(stream.readableBytes == 0)
    }

    // MARK: - Malformed payloads

    /// A replication payload written by hand: kind, volume, then `rest`.
    static func raw(kind: UInt8, volume: String = "vm1", flags: UInt16 = 0, _ rest: (inout ByteBuffer) -> Void) -> Frame {
        var payload = ByteBuffer()
        payload.writeInteger(kind)
        payload.writeInteger(UInt16(volume.utf8.count))
        payload.writeString(volume)
        rest(&payload)
        return Frame(type: .replication, flags: flags, payload: payload)
    }

    static func itemFields(length: UInt64, zero: UInt8, offset: UInt64 = 4096) -> (inout ByteBuffer) -> Void {
        { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3), offset, length, zero) }
    }

    static func compressed(_ data: ByteBuffer, pledging: Bool = true) -> ByteBuffer {
        guard pledging else {
            // A streaming compression that does not state the content size.
            let cctx = ZSTD_createCCtx()!
            defer { ZSTD_freeCCtx(cctx) }
            var out = ByteBuffer()
            let bound = ZSTD_compressBound(data.readableBytes)
            data.withUnsafeReadableBytes { src in
                _ = out.writeWithUnsafeMutableBytes(minimumWritableBytes: bound) { dst in
                    var input = ZSTD_inBuffer(src: src.baseAddress, size: src.count, pos: 0)
                    var output = ZSTD_outBuffer(dst: dst.baseAddress, size: dst.count, pos: 0)
                    ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 0)
                    _ = ZSTD_compressStream2(cctx, &output, &input, ZSTD_e_end)
                    return output.pos
                }
            }
            return out
        }
        return Zstd.compress(data)!
    }

    enum Malformed: String, CaseIterable, Sendable {
        case empty, unknownKind, emptyVolume, volumeRunsPast, badUTF8
        case openShort, openLong, unknownMode, openWithoutHistoryCount, tooManyGenerations, generationZero, historyRunsPast
        case dataOnZeroItem, dataShorterThanRange, dataLongerThanRange, zeroFlagNotBoolean, rangeOverflows, rangeOverLimit
        case compressedZeroItem, compressedBarrier, compressedAck
        case decompressedShorter, decompressedLonger, contentSizeNotStated, garbageAfterZstdFrame, notZstd
        case barrierShort, unknownBarrierKind
        case positionLong, consistentNotBoolean, positionWithoutNeedsCount, tooManyNeeds, emptyNeed
        case ackShort, unknownAckLevel, handoffShort, verifyOddBlockSize, verifyTooManyBlocks, verifyEmpty, tooManyHashes, hashesShort
        case refuseRunsPast, refuseTrailing
    }

    static func malformed(_ c: Malformed) -> (Frame, String) {
        let text4k = text(4096)
        switch c {
        case .empty:
            return (Frame(type: .replication), "payload is too short")
        case .unknownKind:
            return (raw(kind: 11) { _ in }, "unknown message kind 11")
        case .emptyVolume:
            return (raw(kind: 6, volume: "") { $0.writeMultipleIntegers(UInt8(1), UInt64(1)) }, "volume name is empty")
        case .volumeRunsPast:
            var payload = ByteBuffer()
            payload.writeMultipleIntegers(UInt8(6), UInt16(50))
            payload.writeString("vm1")
            return (Frame(type: .replication, payload: payload), "string of 50 bytes runs past the payload")
        case .badUTF8:
            var payload = ByteBuffer()
            payload.writeMultipleIntegers(UInt8(6), UInt16(2), UInt8(0xC3), UInt8(0x28), UInt8(1), UInt64(1))
            return (Frame(type: .replication, payload: payload), "not valid UTF-8")
        case .openShort:
            return (raw(kind: 1) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3)) }, "payload is too short")
        case .openLong:
            return (raw(kind: 1) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3), UInt8(1), UInt64(0), UInt64(0), UInt16(0), UInt8(0)) },
                    "1 unexpected bytes after the fields")
        case .openWithoutHistoryCount:
            return (raw(kind: 1) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3), UInt8(1), UInt64(0), UInt64(0)) }, "before its count of generations")
        case .tooManyGenerations:
            return (raw(kind: 1) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3), UInt8(1), UInt64(0), UInt64(0), UInt16(4097)) }, "more than 4096")
        case .generationZero:
            return (raw(kind: 1) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3), UInt8(1), UInt64(0), UInt64(0), UInt16(1), UInt64(0), UInt64(1), UInt64(0)) },
                    "open carries generation 0")
        case .historyRunsPast:
            return (raw(kind: 1) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3), UInt8(1), UInt64(0), UInt64(0), UInt16(2), UInt64(5), UInt64(1), UInt64(0)) },
                    "payload is too short")
        case .unknownMode:
            return (raw(kind: 1) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3), UInt8(5)) }, "unknown replication mode 5")
        case .dataOnZeroItem:
            return (raw(kind: 2) { itemFields(length: 4096, zero: 1)(&$0); $0.writeImmutableBuffer(text4k) }, "4096 unexpected bytes after the fields")
        case .dataShorterThanRange:
            return (raw(kind: 2) { itemFields(length: 4097, zero: 0)(&$0); $0.writeImmutableBuffer(text4k) }, "data is 4096 bytes but the range is 4097 bytes")
        case .dataLongerThanRange:
            return (raw(kind: 3) { itemFields(length: 4095, zero: 0)(&$0); $0.writeImmutableBuffer(text4k) }, "data is 4096 bytes but the range is 4095 bytes")
        case .zeroFlagNotBoolean:
            return (raw(kind: 2) { itemFields(length: 0, zero: 2)(&$0) }, "the zero flag is 2, not 0 or 1")
        case .rangeOverflows:
            return (raw(kind: 2) { itemFields(length: 4096, zero: 1, offset: .max - 100)(&$0) }, "overflows")
        case .rangeOverLimit:
            return (raw(kind: 3) { itemFields(length: UInt64(VolumeFrame.maxDataLength) + 1, zero: 0)(&$0) }, "exceeds the 33554432-byte data limit")
        case .compressedZeroItem:
            return (raw(kind: 2, flags: 1) { itemFields(length: 4096, zero: 1)(&$0) }, "flag 0x0001 (compressed) on a zeroing item")
        case .compressedBarrier:
            return (raw(kind: 4, flags: 1) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3), UInt8(1)) }, "flag 0x0001 (compressed) on a barrier message")
        case .compressedAck:
            return (raw(kind: 6, flags: 1) { $0.writeMultipleIntegers(UInt8(1), UInt64(1)) }, "on a ack message")
        case .decompressedShorter:
            return (raw(kind: 2, flags: 1) { itemFields(length: 4097, zero: 0)(&$0); $0.writeImmutableBuffer(compressed(text4k)) },
                    "zstd frame holds 4096 bytes but the range is 4097 bytes")
        case .decompressedLonger:
            return (raw(kind: 2, flags: 1) { itemFields(length: 1000, zero: 0)(&$0); $0.writeImmutableBuffer(compressed(text4k)) },
                    "zstd frame holds 4096 bytes but the range is 1000 bytes")
        case .contentSizeNotStated:
            return (raw(kind: 2, flags: 1) { itemFields(length: 4096, zero: 0)(&$0); $0.writeImmutableBuffer(compressed(text4k, pledging: false)) },
                    "not a zstd frame with a stated content size")
        case .garbageAfterZstdFrame:
            return (raw(kind: 2, flags: 1) { itemFields(length: 4096, zero: 0)(&$0); $0.writeImmutableBuffer(compressed(text4k)); $0.writeInteger(UInt32(7)) },
                    "are not exactly one zstd frame")
        case .notZstd:
            return (raw(kind: 2, flags: 1) { itemFields(length: 4096, zero: 0)(&$0); $0.writeImmutableBuffer(text4k) }, "compressed data:")
        case .barrierShort:
            return (raw(kind: 4) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3)) }, "payload is too short")
        case .unknownBarrierKind:
            return (raw(kind: 4) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3), UInt8(0)) }, "unknown barrier kind 0")
        case .positionLong:
            return (raw(kind: 5) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3), UInt8(1), UInt8(1), UInt32(0), UInt8(1)) }, "1 unexpected bytes")
        case .consistentNotBoolean:
            return (raw(kind: 5) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3), UInt8(7), UInt8(1), UInt32(0)) }, "the consistent flag is 7")
        case .positionWithoutNeedsCount:
            return (raw(kind: 5) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3), UInt8(1), UInt8(1)) }, "before its count of needed ranges")
        case .tooManyNeeds:
            return (raw(kind: 5) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3), UInt8(0), UInt8(1), UInt32(65_537)) }, "more than 65536")
        case .emptyNeed:
            return (raw(kind: 5) { $0.writeMultipleIntegers(UInt64(1), UInt64(2), UInt64(3), UInt8(0), UInt8(1), UInt32(1), UInt64(4096), UInt64(0)) }, "an invalid range at 4096 of 0 bytes")
        case .verifyOddBlockSize:
            return (raw(kind: 9) { $0.writeMultipleIntegers(UInt64(1), UInt64(0), UInt64(1 << 20), UInt32(5000)) }, "block size 5000 is not a power of two")
        case .verifyTooManyBlocks:
            return (raw(kind: 9) { $0.writeMultipleIntegers(UInt64(1), UInt64(0), UInt64(8193 * 4096), UInt32(4096)) }, "more than 8192 blocks")
        case .verifyEmpty:
            return (raw(kind: 9) { $0.writeMultipleIntegers(UInt64(1), UInt64(0), UInt64(0), UInt32(4096)) }, "of 0 bytes is invalid")
        case .tooManyHashes:
            return (raw(kind: 10) { $0.writeMultipleIntegers(UInt64(1), UInt32(8193)) }, "more than 8192")
        case .hashesShort:
            return (raw(kind: 10) { $0.writeMultipleIntegers(UInt64(1), UInt32(2), UInt64(5)) }, "payload is too short")
        case .handoffShort:
            return (raw(kind: 8) { $0.writeMultipleIntegers(UInt64(1), UInt64(2)) }, "payload is too short")
        case .ackShort:
            return (raw(kind: 6) { $0.writeMultipleIntegers(UInt8(1), UInt32(1)) }, "payload is too short")
        case .unknownAckLevel:
            return (raw(kind: 6) { $0.writeMultipleIntegers(UInt8(4), UInt64(1)) }, "unknown ack level 4")
        case .refuseRunsPast:
            return (raw(kind: 7) { $0.writeInteger(UInt16(10)); $0.writeString("no") }, "runs past the payload")
        case .refuseTrailing:
            return (raw(kind: 7) { $0.writeInteger(UInt16(2)); $0.writeString("no!") }, "1 unexpected bytes")
        }
    }

    @Test("a malformed replication payload is refused with the reason", arguments: Malformed.allCases)
    func malformedIsRefused(_ c: Malformed) throws {
        let (frame, why) = Self.malformed(c)
        // It passes the frame checks (the layout is the replication layer's to judge)…
        let wire = try Self.overTheWire(frame)
        // …and is refused there.
        #expect {
            try VolumeFrame(frame: wire)
        } throws: { error in
            guard case FrameError.malformedPayload(.replication, let reason) = error else { return false }
            let matches = reason.contains(why)
            if !matches { Issue.record("reason \"\(reason)\" does not contain \"\(why)\"") }
            return matches && "\(error)".hasPrefix("malformed replication frame: ")
        }
    }

    @Test("a well-formed compressed item decodes, and the same bytes uncompressed do too")
    func handWrittenCompressed() throws {
        let data = Self.text(4096)
        let frame = Self.raw(kind: 2, flags: 1) { Self.itemFields(length: 4096, zero: 0)(&$0); $0.writeImmutableBuffer(Self.compressed(data)) }
        #expect(try VolumeFrame(frame: frame).payload == data)
        let plain = Self.raw(kind: 2) { Self.itemFields(length: 4096, zero: 0)(&$0); $0.writeImmutableBuffer(data) }
        #expect(try VolumeFrame(frame: plain).payload == data)
    }

    @Test("flags other than 0x0001, and frames of other types, are refused")
    func flagsAndTypes() throws {
        let ack = VolumeFrame(volume: "v", message: .ack(level: .durable, index: 3)).frame()
        var flagged = ack
        flagged.flags = 0x0002
        #expect(throws: FrameError.unknownFlags(.replication, 0x0002)) { try VolumeFrame(frame: flagged) }
        var other = ack
        other.type = .ping
        #expect(throws: FrameError.self) { try VolumeFrame(frame: other) }
        // The frame decoder knows the flag the replication type defines, and no other.
        #expect(FrameType.dataPlane == [.replication: 0x0001])
        var wire = try FrameEncoder.encode(flagged)
        #expect(throws: FrameError.unknownFlags(.replication, 0x0002)) {
            try FrameDecoder(knownFlags: FrameType.dataPlane).nextFrame(from: &wire)
        }
    }

    @Test("the sender's contract: data must match the message")
    func validation() {
        let cases: [(VolumeFrame, String)] = [
            (VolumeFrame(volume: "v", message: .write(Self.item(4096, zero: true)), payload: Self.text(4096)), "data on a zeroing item"),
            (VolumeFrame(volume: "v", message: .write(Self.item(4096))), "no data"),
            (VolumeFrame(volume: "v", message: .region(Self.item(4096)), payload: Self.text(100)), "data is 100 bytes but the range is 4096 bytes"),
            (VolumeFrame(volume: "v", message: .ack(level: .received, index: 1), payload: Self.text(1)), "data on a message that carries none"),
            (VolumeFrame(volume: "", message: .ack(level: .received, index: 1)), "volume name is empty"),
            (VolumeFrame(volume: "a", message: .open(VolumeOpen(volume: "b", epoch: 1, generation: 1, volumeSize: 1, mode: .sync))), "open names volume \"b\""),
        ]
        for (frame, why) in cases {
            #expect {
                try frame.validate()
            } throws: { error in
                "\(error)".contains(why)
            }
        }
    }

    @Test("the worked example in protocol.md §6.4 is what the encoder writes")
    func workedExample() throws {
        let ack = VolumeFrame(volume: "vm1", message: .ack(level: .durable, index: 42))
        let bytes = try FrameEncoder.encode(ack.frame())
        let hex = bytes.readableBytesView.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: " ")
        #expect(hex == Self.exampleHex, "\(hex)")
    }

    static let exampleHex = "46 52 59 31 01 10 00 00 00 00 00 0f 06 00 03 76 6d 31 03 00 00 00 00 00 00 00 2a 41 1b 0a 2d c0 77 d0 5f"
}
