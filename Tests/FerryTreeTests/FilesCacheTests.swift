import FerryStore
import Foundation
import NIOCore
import Testing
@testable import FerryTree
#if canImport(Glibc)
import Glibc
#endif

/// The files cache (one record per directory): what it vouches for is not read, what changed is,
/// and it survives the catalog.
@Suite(.serialized) struct FilesCacheTests {
    /// Collects what a scan produces.
    final class Collect: ScanSink {
        var read: [[UInt8]] = []
        var unread: [[UInt8]] = []
        var directories: [[UInt8]: ChunkID] = [:]
        var wantsUnreadFiles = false
        func chunk(_ id: ChunkID, _ data: ByteBuffer) throws {}
        func file(_ path: [UInt8], _ entry: TreeEntry, read: Bool) throws {
            if read { self.read.append(path) } else { unread.append(path) }
        }
        func directory(_ path: [UInt8], _ id: ChunkID, _ blob: ByteBuffer) throws { directories[path] = id }
    }

    func scan(_ source: String, _ cache: FilesCache, wantsUnread: Bool = false) throws -> (TreeScanner.Result, Collect) {
        let sink = Collect()
        sink.wantsUnreadFiles = wantsUnread
        return (try TreeScanner(source: source, cache: cache).scan(into: sink), sink)
    }

    @Test func aLargeDirectoryIsStattedOnTwoThreadsAndASymlinkThatGrewIsReadWhole() throws {
        let base = OddTree.temporaryDirectory("lstat")
        defer { OddTree.remove(base) }
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        var names: [[UInt8]] = []
        for i in 0..<100 {
            let name = "f\(i)"
            if i == 50 { names.append(Array("gone".utf8)) }   // vanished: its errno, in its place
            OddTree.write(base, name, Array(repeating: UInt8(i), count: i))
            names.append(Array(name.utf8))
        }
        let fd = PosixFS.openDirectory(base)
        defer { close(fd) }
        let statted = TreeScanner.lstatAll(fd, names)
        #expect(statted.count == 101)
        for (i, name) in names.enumerated() {
            if name == Array("gone".utf8) {
                #expect(statted[i].st == nil && statted[i].error == ENOENT)
            } else {
                #expect(statted[i].st.map { Int($0.st_size) } == Int(String(decoding: name.dropFirst(), as: UTF8.self)))
            }
        }
        // A target longer than the size the lstat gave (it was replaced in between).
        let long = String(repeating: "t", count: 1000)
        _ = symlink(long, base + "/link")
        #expect(PosixFS.readlink(at: fd, Array("link".utf8), size: 1) == Array(long.utf8))
    }

    @Test func anUnchangedTreeIsNeitherReadNorReencodedAndTheCacheSurvivesTheCatalog() throws {
        let base = OddTree.temporaryDirectory("cache")
        defer { OddTree.remove(base) }
        let source = base + "/source"
        try FileManager.default.createDirectory(atPath: source, withIntermediateDirectories: true)
        OddTree.make(source, bulk: 300)
        let (first, _) = try scan(source, FilesCache())
        #expect(first.filesRead > 300)

        // Through the catalog and back: the same records.
        let catalog = try Catalog(path: base + "/catalog.sqlite")
        let (upsert, delete) = first.cache.changes(from: FilesCache())
        #expect(upsert.count == first.directories && delete.isEmpty)
        try catalog.updateTree("t", upsert: upsert, delete: delete)
        let loaded = try FilesCache.load("t", from: catalog)
        #expect(loaded == first.cache)

        // Nothing changed: nothing read, the same root, every record the very same.
        let (idle, sink) = try scan(source, loaded)
        #expect(idle.filesRead == 0 && idle.root == first.root && idle.files == first.files && idle.bytes == first.bytes)
        #expect(sink.read.isEmpty && sink.unread.isEmpty)
        #expect(idle.cache.changes(from: loaded).upsert.isEmpty)
        // A run for a peer that may lack chunks hears of every file unread.
        let (_, asking) = try scan(source, loaded, wantsUnread: true)
        #expect(asking.unread.count == first.files && asking.read.isEmpty)

        // A damaged record is dropped on load: only that directory's files are read again.
        let (path, record) = try #require(try catalog.treeDirectories(tree: "t").first { $0.path == Array("bulk/d1".utf8) })
        var damaged = record
        damaged[damaged.count - 1] ^= 0xFF
        try catalog.updateTree("t", upsert: [(path, damaged)], delete: [])
        let partial = try FilesCache.load("t", from: catalog)
        #expect(partial.directories.count == first.cache.directories.count - 1 && partial.directories[path] == nil)
        let (rescan, _) = try scan(source, partial)
        let inD1 = first.cache.directories[path]!.stamps.filter(\.isRegular).count
        #expect(rescan.filesRead == inD1 && rescan.root == first.root)
    }

    @Test func theFilesOfAMovedDirectoryAreNotReadAndAModeChangeReachesTheManifest() throws {
        let base = OddTree.temporaryDirectory("cache")
        defer { OddTree.remove(base) }
        let source = base + "/source"
        for dir in ["a/sub", "b"] { try FileManager.default.createDirectory(atPath: source + "/" + dir, withIntermediateDirectories: true) }
        OddTree.write(source, "a/sub/one", Array(repeating: 7, count: 100_000))
        OddTree.write(source, "a/two", Array(repeating: 8, count: 5_000))
        let (first, _) = try scan(source, FilesCache())

        #expect(rename(source + "/a/sub", source + "/b/sub") == 0)
        #expect(chmod(source + "/a/two", 0o600) == 0)
        let (second, sink) = try scan(source, first.cache)
        // The file of the moved directory is found by its inode; the chmod makes its file read
        // again (its ctime changed, as a rewrite that restored the old mtime would change it).
        #expect(sink.unread == [Array("b/sub/one".utf8)])
        #expect(sink.read == [Array("a/two".utf8)])
        let a = try DirectoryBlob.decode(second.cache.directories[Array("a".utf8)]!.blob)
        #expect(a.map(\.name) == [Array("two".utf8)] && a[0].mode == 0o600)
        let b = try DirectoryBlob.decode(second.cache.directories[Array("b/sub".utf8)]!.blob)
        #expect(b.map(\.name) == [Array("one".utf8)] && b[0].size == 100_000 && !b[0].segments.isEmpty)
        #expect(second.cache.directories[Array("a/sub".utf8)] == nil)
        #expect(second.root != first.root)
    }
}
