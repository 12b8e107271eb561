import Foundation
import NIOCore
import Testing
@testable import FerryStore

struct VolumeImageTests {
    func tempDir() -> String {
        var t = Array("/tmp/ferry-store-XXXXXX".utf8CString)
        return String(cString: mkdtemp(&t)!)
    }

    @Test func createdSparseAtTheConfiguredSize() throws {
        let dir = tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = try VolumeImage.openOrCreate(path: dir + "/a.img", size: 64 << 20)
        #expect(image.size == 64 << 20)
        let attrs = try FileManager.default.attributesOfItem(atPath: dir + "/a.img")
        #expect(attrs[.size] as? UInt64 == 64 << 20)
        #expect(image.extents(offset: 0, length: 64 << 20) == [.init(length: 64 << 20, isHole: true)])
    }

    @Test func writeReadFlushAndExtents() throws {
        let dir = tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = try VolumeImage.openOrCreate(path: dir + "/a.img", size: 16 << 20)
        try image.write(offset: 4 << 20, data: ByteBuffer(repeating: 0x5a, count: 1 << 20))
        try image.flush()
        let back = try image.read(offset: 4 << 20, length: 1 << 20, allocator: ByteBufferAllocator())
        #expect(back.readableBytesView.allSatisfy { $0 == 0x5a })
        let extents = image.extents(offset: 0, length: 16 << 20)
        #expect(extents.first == .init(length: 4 << 20, isHole: true))
        #expect(extents.contains(.init(length: 1 << 20, isHole: false)))
        #expect(extents.reduce(0) { $0 + $1.length } == 16 << 20)

        // Punching the data out makes it read as zeros and a hole again.
        #expect(try image.punchHole(offset: 4 << 20, length: 1 << 20))
        let zeros = try image.read(offset: 4 << 20, length: 4096, allocator: ByteBufferAllocator())
        #expect(zeros.readableBytesView.allSatisfy { $0 == 0 })
        #expect(image.extents(offset: 0, length: 16 << 20).allSatisfy { $0.isHole })
    }

    @Test func zeroingWithoutAHoleKeepsTheRangeAllocated() throws {
        let dir = tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = try VolumeImage.openOrCreate(path: dir + "/a.img", size: 4 << 20)
        try image.write(offset: 0, data: ByteBuffer(repeating: 0xff, count: 1 << 20))
        if try !image.zeroRangeFast(offset: 0, length: 65536) {
            try image.writeZeroBytes(offset: 0, length: 65536)
        }
        let back = try image.read(offset: 0, length: 65536 + 4096, allocator: ByteBufferAllocator())
        #expect(back.readableBytesView.prefix(65536).allSatisfy { $0 == 0 })
        #expect(back.readableBytesView.suffix(4096).allSatisfy { $0 == 0xff })
        #expect(image.extents(offset: 0, length: 65536).first?.isHole == false)
    }

    @Test func anImageOfAnotherSizeIsRefusedNotTruncated() throws {
        let dir = tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try VolumeImage.openOrCreate(path: dir + "/a.img", size: 8 << 20)
        #expect(throws: StoreError.self) { try VolumeImage.openOrCreate(path: dir + "/a.img", size: 4 << 20) }
        let attrs = try FileManager.default.attributesOfItem(atPath: dir + "/a.img")
        #expect(attrs[.size] as? UInt64 == 8 << 20)
    }
}

struct CatalogTests {
    @Test func volumesAreCreatedOnceAndKeepTheirIdentity() throws {
        var t = Array("/tmp/ferry-cat-XXXXXX".utf8CString)
        let dir = String(cString: mkdtemp(&t)!)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let first: VolumeRecord
        do {
            let catalog = try Catalog(path: dir + "/catalog.sqlite")
            let (record, created) = try catalog.ensureVolume(name: "vm1", sizeBytes: 1 << 30)
            #expect(created)
            #expect(record.epoch == 1)
            first = record
        }
        // Reopened: the same record, not a new UUID.
        let catalog = try Catalog(path: dir + "/catalog.sqlite")
        let (again, created) = try catalog.ensureVolume(name: "vm1", sizeBytes: 1 << 30)
        #expect(!created)
        #expect(again.uuid == first.uuid)
        #expect(again.generation == first.generation)
        #expect(try catalog.volumes().map(\.name) == ["vm1"])
        #expect(throws: StoreError.self) { try catalog.ensureVolume(name: "vm1", sizeBytes: 2 << 30) }
    }
}
