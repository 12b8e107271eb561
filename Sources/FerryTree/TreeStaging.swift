import Foundation
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Directories of a tree's first run built ahead of its commit, as their blobs arrive, in
/// `<mirror>/.ferry-staged/<blob ID>`: the commit renames each into place instead of creating
/// its files then, so a first run of 200,000 small files creates them while the data is still
/// arriving rather than after.
///
/// Only a build the commit could not do differently is staged: a directory whose files are not
/// hard links and whose subdirectories are staged (the directory's own name and metadata are in
/// its parent and are set when the commit takes it). Staging is for a first snapshot into an
/// empty mirror only: there every directory is new. Whatever the commit does not take is removed
/// with the staging directory at the end of the commit, whether it succeeded or not; a staging
/// directory left by a crash is removed when the next run begins. A failure to stage (a missing
/// chunk, a full disk) stops staging for the run and is otherwise ignored: the commit builds
/// what is not staged, and reports what fails then.
final class TreeStaging {
    static let name: [UInt8] = Array(".ferry-staged".utf8)
    let mirror: String
    let fd: Int32
    private var built: Set<ChunkID> = []
    /// Files written ahead when the filesystem was last synced in the background.
    var filesAtSync = 0
    var failed = false

    /// Opens a new staging directory in `mirror`, removing one a crash left behind.
    init?(mirror: String) {
        guard let remover = try? TreeMirror(source: NoChunks(), into: mirror, full: false) else { return nil }
        try? remover.removeTree(remover.rootFD, Self.name, path: Self.name, keepingAside: false)
        let root = PosixFS.openDirectory(mirror)
        guard root >= 0 else { return nil }
        defer { close(root) }
        guard PosixFS.withCName(Self.name, { mkdirat(root, $0, 0o700) }) == 0 else { return nil }
        let fd = PosixFS.openDirectory(at: root, Self.name)
        guard fd >= 0 else { return nil }
        self.mirror = mirror
        self.fd = fd
    }

    deinit { close(fd) }

    /// Whether `mirror` holds nothing but a staging directory (or does not exist yet).
    static func isEmpty(_ mirror: String) -> Bool {
        let fd = PosixFS.openDirectory(mirror)
        guard fd >= 0 else { return errno == ENOENT }
        defer { close(fd) }
        return (PosixFS.names(in: fd) ?? [[0]]).allSatisfy { $0 == name }
    }

    func has(_ id: ChunkID) -> Bool { built.contains(id) }

    func add(_ id: ChunkID) { built.insert(id) }

    static func buildName(_ id: ChunkID) -> [UInt8] { Array(id.hex.utf8) }

    /// Moves the build of `id` to `name` in the directory `dir`; false when there is none.
    func take(_ id: ChunkID, into dir: Int32, as name: [UInt8]) -> Bool {
        guard built.remove(id) != nil else { return false }
        return PosixFS.withCName(Self.buildName(id)) { from in PosixFS.withCName(name) { renameat(fd, from, dir, $0) } } == 0
    }

    /// The build of `id`, opened (-1 when there is none), to take its entries one by one.
    func openBuild(_ id: ChunkID) -> Int32 {
        guard built.contains(id) else { return -1 }
        return PosixFS.openDirectory(at: fd, Self.buildName(id))
    }

    /// Removes the staging directory and what is left in it.
    func discard() {
        built.removeAll()
        if let remover = try? TreeMirror(source: NoChunks(), into: mirror, full: false) {
            try? remover.removeTree(remover.rootFD, Self.name, path: Self.name, keepingAside: false)
        }
    }

    private final class NoChunks: ChunkSource {
        func blob(_ id: ChunkID) throws -> ByteBuffer? { nil }
    }
}
