import Foundation
import NIOCore
import Testing
@testable import FerryTree
import FerryWire

@Suite struct TreeFrameTests {
    @Test func everyMessageRoundTrips() throws {
        let id = ChunkID.of(Array("x".utf8)), other = ChunkID.of(Array("y".utf8))
        let data = ByteBuffer(bytes: Array(repeating: 7, count: 100_000))
        let summary = RunSummary(sourceTime: Date(timeIntervalSince1970: 1_800_000_000.123), epoch: 3, files: 20_000, directories: 300, bytes: 6 << 30)
        let messages: [TreeMessage] = [
            .hello(request: 1, epoch: 2, pendingSinceMs: 3),
            .latest(request: 4, root: id, snapshot: 9), .latest(request: 5, root: nil, snapshot: 0),
            .query(request: 6, ids: [id, other]), .lacking(request: 7, ids: []),
            .put(id: id, data: data),
            .commit(request: 8, root: other, summary: summary),
            .committed(request: 9, snapshot: 12, at: Date(timeIntervalSince1970: 1_800_000_001.5)),
            .failed(request: 10, message: "snapshot not committed: No space left on device"),
        ]
        let compressor = ZstdCompressor(level: 1)
        for message in messages {
            for compress in [false, true] {
                let frame = message.frame(tree: "www", compressor: compress ? compressor : nil)
                let (tree, decoded) = try TreeMessage.decode(frame)
                #expect(tree == "www")
                #expect(decoded == message)
            }
        }
        // Compressible data travels compressed.
        #expect(TreeMessage.put(id: id, data: data).frame(tree: "t", compressor: compressor).payloadLength < 1000)
    }

    @Test func malformedFramesAreRefused() {
        var cut = TreeMessage.query(request: 1, ids: [ChunkID.of([1])]).frame(tree: "t").flattened().payload
        cut.moveWriterIndex(to: cut.writerIndex - 1)
        #expect(throws: (any Error).self) { try TreeMessage.decode(.init(type: .tree, payload: cut)) }
        var unknown = ByteBuffer()
        unknown.writeInteger(UInt8(99)); unknown.writeInteger(UInt16(1)); unknown.writeString("t")
        #expect(throws: (any Error).self) { try TreeMessage.decode(.init(type: .tree, payload: unknown)) }
        let flagged = TreeMessage.hello(request: 1, epoch: 1, pendingSinceMs: 0).frame(tree: "t")
        #expect(throws: (any Error).self) { try TreeMessage.decode(.init(type: .tree, flags: 1, payload: flagged.payload)) }
    }

    @Test func directoryBlobsRoundTripWithOddNames() throws {
        let entries = DirectoryBlob.sorted([
            TreeEntry(name: [0x66, 0xFF, 0x0A], kind: .file, mode: 0o4755, uid: 1, gid: 2, mtime: FileTime(seconds: -5, nanoseconds: 999_999_999),
                      size: 10, linkGroup: 77, segments: [FileSegment(offset: 4096, chunks: [ChunkRef(id: ChunkID.of([1]), length: 10)])]),
            TreeEntry(name: Array(repeating: 0x61, count: 255), kind: .symlink, mode: 0o777, uid: 0, gid: 0, mtime: FileTime(seconds: 1, nanoseconds: 2), target: Array("../x".utf8)),
            TreeEntry(name: Array("d".utf8), kind: .directory, mode: 0o1777, uid: 0, gid: 0, mtime: FileTime(seconds: 3, nanoseconds: 4), subtree: ChunkID.of([2])),
            TreeEntry(name: Array("p".utf8), kind: .fifo, mode: 0o640, uid: 0, gid: 0, mtime: FileTime(seconds: 5, nanoseconds: 6)),
        ])
        let blob = DirectoryBlob.encode(entries)
        #expect(try DirectoryBlob.decode(blob) == entries)
        var cut = blob
        cut.moveWriterIndex(to: cut.writerIndex - 3)
        #expect(throws: DirectoryBlob.Malformed.self) { try DirectoryBlob.decode(cut) }
        // A manifest cannot name its way out of its directory, nor list a name twice.
        let file = entries[0]
        for bad in [[0x2E, 0x2E], [0x2E], Array("a/b".utf8), Array("/etc/passwd".utf8), [0x61, 0x00]] as [[UInt8]] {
            var e = file
            e.name = bad
            #expect(throws: DirectoryBlob.Malformed.self, "\(bad)") { try DirectoryBlob.decode(DirectoryBlob.encode([e, file])) }
        }
        #expect(throws: DirectoryBlob.Malformed.self) { try DirectoryBlob.decode(DirectoryBlob.encode([file, file])) }
    }
}
