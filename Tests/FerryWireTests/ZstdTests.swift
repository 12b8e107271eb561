import FerryWire
import NIOCore
import Testing

struct ZstdTests {
    @Test func compressibleDataRoundTrips() throws {
        var input = ByteBuffer()
        for i in 0..<10_000 { input.writeString("block \(i % 17) of a volume; ") }
        let packed = try #require(Zstd.compress(input))
        #expect(packed.readableBytes < input.readableBytes / 4)
        let back = try Zstd.decompress(packed, maxSize: input.readableBytes)
        #expect(back == input)
    }

    @Test func incompressibleDataIsLeftAlone() {
        var rng = SystemRandomNumberGenerator()
        var input = ByteBuffer()
        for _ in 0..<8192 { input.writeInteger(rng.next() as UInt64) }
        #expect(Zstd.compress(input) == nil)
    }

    @Test func corruptOrOversizedInputIsRefused() throws {
        let packed = try #require(Zstd.compress(ByteBuffer(repeating: 7, count: 1 << 20)))
        #expect(throws: Zstd.Failure.self) { try Zstd.decompress(packed, maxSize: 1 << 19) }
        var corrupt = packed
        corrupt.setInteger(UInt8(0xff), at: corrupt.readerIndex + corrupt.readableBytes - 3)
        corrupt.setInteger(UInt8(0x00), at: corrupt.readerIndex + corrupt.readableBytes / 2)
        #expect(throws: Zstd.Failure.self) { try Zstd.decompress(corrupt, maxSize: 1 << 20) }
        #expect(throws: Zstd.Failure.self) { try Zstd.decompress(ByteBuffer(bytes: [1, 2, 3, 4, 5, 6, 7, 8, 9]), maxSize: 100) }
    }
}
