import FerryCore
import Foundation
import NIOCore
import Testing
@testable import FerryStore

/// The undo log against a model: the image's bytes copied at every mark. Reading a point, rolling
/// back to it, reopening after a restart (unconfirmed marks dropped, a torn tail cut) and pruning
/// must all agree with the copies.
struct UndoLogTests {
    let size: UInt64 = 256 << 10 + 1536   // not a multiple of the granule: the short last one counts

    func position(_ seq: UInt64) -> ReplicaPosition {
        ReplicaPosition(epoch: 1, generation: 7, appliedSeq: seq, consistent: true, initialized: true)
    }

    func bytes(_ image: VolumeImage) throws -> [UInt8] {
        Array(try image.read(offset: 0, length: Int(image.size), allocator: ByteBufferAllocator()).readableBytesView)
    }

    /// Random writes (data and zeros, unaligned) with a mark every few writes.
    func workload(seed: UInt64, image: VolumeImage, log: UndoLog, marks: Int) throws -> [UInt64: [UInt8]] {
        var rng = SeededRandom(seed: seed)
        var copies: [UInt64: [UInt8]] = [:]
        var seq: UInt64 = 0
        for i in 0 ..< marks {
            let point = try log.mark(position(seq), time: Double(i), kind: "history", confirmed: true)
            copies[point.id] = try bytes(image)
            for _ in 0 ..< Int(rng.next() % 6) {
                seq += 1
                let offset = rng.next() % (size - 1)
                let length = min(1 + rng.next() % 20_000, size - offset)
                let byte = UInt8(truncatingIfNeeded: rng.next() % 3 == 0 ? 0 : seq)
                try log.protect([(offset, length)], image: image) {
                    try image.write(offset: offset, data: ByteBuffer(repeating: byte, count: Int(length)))
                }
            }
        }
        return copies
    }

    @Test(arguments: [1, 2, 3, 4, 5] as [UInt64])
    func everyPointReadsAndRollsBackToItsBytes(seed: UInt64) throws {
        let dir = TemporaryDirectory()
        let image = try VolumeImage.openOrCreate(path: dir.file("img"), size: size)
        var log = try UndoLog.open(path: dir.file("undo"), position: position(0))
        let copies = try workload(seed: seed, image: image, log: log, marks: 12)
        for point in log.points {
            #expect(Array(try log.read(at: point.id, offset: 0, length: Int(size), image: image).readableBytesView) == copies[point.id])
            let part = try log.read(at: point.id, offset: 5000, length: 9000, image: image)
            #expect(Array(part.readableBytesView) == Array(copies[point.id]![5000 ..< 14000]))
        }
        // A restart: the same points, read the same.
        log = try UndoLog.open(path: dir.file("undo"), position: position(1000))
        #expect(log.points.count == 12)
        let target = log.points[Int(seed % 12)]
        try log.rollBack(to: target.id, image: image)
        #expect(try bytes(image) == copies[target.id])
        #expect(log.points.last == target)
        // The points before it still read right after the roll-back, and after another restart.
        log = try UndoLog.open(path: dir.file("undo"), position: position(1000))
        for point in log.points { #expect(Array(try log.read(at: point.id, offset: 0, length: Int(size), image: image).readableBytesView) == copies[point.id]) }
    }

    @Test func unconfirmedMarksAreDroppedAtOpenAndATornTailIsCut() throws {
        let dir = TemporaryDirectory()
        let image = try VolumeImage.openOrCreate(path: dir.file("img"), size: size)
        let log = try UndoLog.open(path: dir.file("undo"), position: position(0))
        let first = try log.mark(position(0), time: 0, kind: "catch-up", confirmed: true)
        let before = try bytes(image)
        try log.protect([(0, 8192)], image: image) { try image.write(offset: 0, data: ByteBuffer(repeating: 9, count: 8192)) }
        try log.mark(position(5), time: 1, kind: "history", confirmed: false)
        #expect(log.points.map(\.id) == [first.id])
        log.confirm(through: position(5))
        #expect(log.points.count == 2)
        try log.mark(position(9), time: 2, kind: "history", confirmed: false)
        // Restarted with the position at 5: the mark at 9 was never reached.
        let reopened = try UndoLog.open(path: dir.file("undo"), position: position(5))
        #expect(reopened.points.map(\.position.appliedSeq) == [0, 5])
        // A torn last record is cut: the points before it remain.
        let end = try FileManager.default.attributesOfItem(atPath: dir.file("undo"))[.size] as! UInt64
        Damage.flip(dir.file("undo"), at: end - 3)
        let cut = try UndoLog.open(path: dir.file("undo"), position: position(99))
        #expect(cut.points.map(\.position.appliedSeq) == [0, 5])
        #expect(Array(try cut.read(at: first.id, offset: 0, length: Int(size), image: image).readableBytesView) == before)
    }

    @Test func pruningKeepsTheNewestAndPinnedPointsAndTheirBytes() throws {
        let dir = TemporaryDirectory()
        let image = try VolumeImage.openOrCreate(path: dir.file("img"), size: size)
        var log = try UndoLog.open(path: dir.file("undo"), position: position(0))
        let copies = try workload(seed: 9, image: image, log: log, marks: 10)
        let ids = log.points.map(\.id)
        // By age: the three points older than the fourth go.
        #expect(try log.prune(olderThan: 3, maxBytes: nil, pinned: []) == 3)
        #expect(log.points.map(\.id) == Array(ids.dropFirst(3)))
        // By size: everything but the newest would go, but a pinned point stops it there.
        let pinned = ids[5]
        #expect(try log.prune(olderThan: nil, maxBytes: 0, pinned: [pinned]) == 2)
        #expect(log.points.first?.id == pinned)
        #expect(try log.prune(olderThan: nil, maxBytes: 0, pinned: []) == ids.count - 6)
        #expect(log.points.map(\.id) == [ids.last!])
        log = try UndoLog.open(path: dir.file("undo"), position: position(10_000))
        for point in log.points { #expect(Array(try log.read(at: point.id, offset: 0, length: Int(size), image: image).readableBytesView) == copies[point.id]) }
        try log.reset()
        #expect(log.isEmpty && log.points.isEmpty)
    }
}
