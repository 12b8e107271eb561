import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Where the mirror writer finds blobs and chunks by ID.
public protocol ChunkSource: AnyObject {
    func blob(_ id: ChunkID) throws -> ByteBuffer?
}

/// Writes a snapshot's manifest into a directory: the peer's live mirror (from the last applied
/// snapshot to the new one) or a restore (into an empty directory).
///
/// Each file is written under a temporary name in its directory (`.ferry-NNNN.tmp`), given its
/// metadata (mode, owner and group when run as root, times to the nanosecond), then renamed over
/// its name, so a reader sees the old file or the new one, never a part. Holes stay holes. Names
/// the manifest does not have are removed, directories' metadata are set after their contents.
/// Subtrees whose blob ID did not change since `old` are skipped unless the last apply was cut
/// short (`full`).
public final class TreeMirror {
    public struct Stats: Sendable, Equatable {
        public var filesWritten = 0
        /// Files written ahead of the commit, in directories staged as their blobs arrived.
        public var filesStaged = 0
        public var bytesWritten: UInt64 = 0
        public var linked = 0
        public var removed = 0
        /// Names renamed in place of being removed and written again (same content).
        public var renamed = 0
        public var directoriesVisited = 0
        /// Paths (shown) moved aside instead of being overwritten or removed.
        public var keptAside: [String] = []
        /// Seconds the commit spent applying the manifest to the mirror, syncing its filesystem
        /// (0 when nothing changed), and making the chunks durable (for the log).
        public var applySeconds = 0.0, syncSeconds = 0.0, chunksSeconds = 0.0
    }

    /// Anything this apply would overwrite or remove whose ctime is after `after` is moved into
    /// `directory` (same relative path) instead: a former primary's changes that its replica never
    /// received (P6).
    public var keepAside: (after: FileTime, directory: String)?
    /// Files (device, inode) whose ctime this apply itself moved while they have other names (a
    /// name of theirs replaced, removed or linked, their metadata set): another name of theirs
    /// with a ctime after the keep-aside time and an mtime before it is not a change of this
    /// site's, and is not kept aside (an operator walk-through found a hard link kept aside that
    /// no one had changed).
    private var bumpedByApply: Set<[UInt64]> = []

    private func noteBump(_ st: stat?) {
        guard keepAside != nil, let st, !PosixFS.isDirectory(st), st.st_nlink > 1 else { return }
        bumpedByApply.insert([UInt64(st.st_dev), UInt64(st.st_ino)])
    }

    let source: any ChunkSource
    let root: String
    let rootFD: Int32
    let full: Bool
    let setOwner: Bool
    public private(set) var stats = Stats()
    /// Directories built ahead of this apply (a first run), taken instead of built.
    weak var staging: TreeStaging?
    /// Whether this apply changed anything in the directory (a file, a name, metadata): when it
    /// did not, there is nothing new to make durable.
    public private(set) var touched = false
    /// Called once, before the first change this apply makes to the directory (the repository
    /// records there that an apply is under way).
    public var beforeFirstChange: (() throws -> Void)?

    private func touch() throws {
        guard !touched else { return }
        try beforeFirstChange?()
        touched = true
    }
    /// Hard-link groups met this apply: group → path (from the root) of the name written first.
    public private(set) var groups: [UInt64: [UInt8]] = [:]
    /// Hard-link groups written by earlier applies (the peer keeps them), to link a new name to a
    /// file in a directory this apply skips.
    let knownGroups: [UInt64: [UInt8]]
    /// Where a hard-link group's first name is now, while it is inside a new directory still
    /// under its temporary name (cleared when that directory is renamed into place).
    private var located: [UInt64: [UInt8]] = [:]
    /// The new directory being built under a temporary name: its path and where it is now.
    private var freshTop: (path: [UInt8], now: [UInt8])?
    private var tempCounter = 0

    public init(source: any ChunkSource, into root: String, full: Bool, knownGroups: [UInt64: [UInt8]] = [:]) throws {
        self.source = source
        self.root = root
        self.full = full
        self.knownGroups = knownGroups
        self.setOwner = geteuid() == 0
        let fd = PosixFS.openDirectory(root)
        guard fd >= 0 else { throw TreeFSError("open directory", Array(root.utf8)) }
        self.rootFD = fd
    }

    deinit { close(rootFD) }

    public struct Incomplete: Error, CustomStringConvertible {
        public var description: String
    }

    func entries(_ id: ChunkID, path: [UInt8]) throws -> [TreeEntry] {
        guard let blob = try source.blob(id) else {
            throw Incomplete(description: "the manifest of directory \(TreePath.display(path)) (\(id)) is missing")
        }
        guard ChunkID.of(blob) == id else {
            throw Incomplete(description: "the manifest of directory \(TreePath.display(path)) (\(id)) is damaged")
        }
        return try DirectoryBlob.decode(blob)
    }

    /// Applies the snapshot whose root blob is `new` over the one whose root blob is `old`
    /// (nil: nothing is assumed of the directory).
    public func apply(old: ChunkID?, new: ChunkID) throws {
        let newRoot = try entries(new, path: [])
        guard newRoot.count == 1, newRoot[0].kind == .directory, let top = newRoot[0].subtree else {
            throw Incomplete(description: "the snapshot's root blob \(new) does not name one directory")
        }
        var oldTop: ChunkID?
        if let old, let oldRoot = try? entries(old, path: []), oldRoot.count == 1 { oldTop = oldRoot[0].subtree }
        try applyDirectory(rootFD, path: [], old: oldTop, new: top)
        // What was not taken goes before the root's times are set.
        staging?.discard()
        staging = nil
        try setMetadata(fd: rootFD, newRoot[0], path: [])
    }

    /// Restores the subtree at `path` of the snapshot: the directory's contents, or one file or
    /// link, into `root` (which must be empty).
    public func restore(snapshotRoot: ChunkID, path: [UInt8]) throws {
        var entry = try entries(snapshotRoot, path: [])[0]
        for component in TreePath.components(path) {
            guard entry.kind == .directory, let sub = entry.subtree,
                  let next = try entries(sub, path: path).first(where: { $0.name == component }) else {
                throw Incomplete(description: "\(TreePath.display(path)) is not in this snapshot")
            }
            entry = next
        }
        if entry.kind == .directory {
            try applyDirectory(rootFD, path: [], old: nil, new: entry.subtree!)
            try setMetadata(fd: rootFD, entry, path: [])
        } else {
            try applyEntry(rootFD, entry, path: entry.name, old: nil)
        }
    }

    /// Builds the directory of blob `id` in the staging directory ahead of the commit, when it
    /// can be (see ``TreeStaging``); `order` is the build's place in the staging's schedule.
    func stage(_ id: ChunkID, order: Int) throws {
        guard let staging, !staging.has(id) else { return }
        let list = try entries(id, path: TreeStaging.name)
        staging.wait(for: list.compactMap { $0.kind == .directory ? $0.subtree : nil }, scheduledBefore: order)
        guard list.allSatisfy({ e in
            !e.name.isEmpty && (e.kind != .file || e.linkGroup == 0) && (e.kind != .directory || e.subtree.map(staging.has) == true)
        }) else { return }
        let name = Array("building-".utf8) + TreeStaging.buildName(id)
        let path = TreeStaging.name + [0x2F] + TreeStaging.buildName(id)
        guard PosixFS.withCName(name, { mkdirat(staging.fd, $0, 0o700) }) == 0 else { throw TreeFSError("create directory", path) }
        do {
            let sub = PosixFS.openDirectory(at: staging.fd, name)
            guard sub >= 0 else { throw TreeFSError("open directory", path) }
            defer { close(sub) }
            try applyDirectory(sub, path: path, old: nil, new: id, fresh: true)
            let rc = PosixFS.withCName(name) { n in PosixFS.withCName(TreeStaging.buildName(id)) { renameat(staging.fd, n, staging.fd, $0) } }
            guard rc == 0 else { throw TreeFSError("rename into place", path) }
        } catch {
            try? removeTree(staging.fd, name, path: path, keepingAside: false)
            throw error
        }
        staging.add(id)
    }

    /// Brings the directory open as `fd` to the blob `new`. `fresh`: the directory was made by
    /// this apply and is not yet under its name (no reader sees it): it is empty, and its
    /// entries are written under their own names, with no temporary name or rename each.
    private func applyDirectory(_ fd: Int32, path: [UInt8], old: ChunkID?, new: ChunkID, fresh: Bool = false) throws {
        stats.directoriesVisited += 1
        let newEntries = try entries(new, path: path)
        if fresh {
            let directory = FreshDirectory()
            for e in newEntries { try applyNew(fd, e, path: TreePath.join(path, e.name), in: directory) }
            return
        }
        var oldByName: [[UInt8]: TreeEntry] = [:]
        if let old, let list = try? entries(old, path: path) {
            for e in list { oldByName[e.name] = e }
        }
        let wanted = Set(newEntries.map(\.name))
        guard let present = PosixFS.names(in: fd) else { throw TreeFSError("list directory", path) }
        // A name that goes and one that comes with the same content (a renamed directory or file)
        // is renamed here rather than removed and written again. The new names are indexed only
        // when something goes (never on a first apply).
        var arrivals: Arrivals?
        func arrival(matching old: TreeEntry) -> [UInt8]? {
            if arrivals == nil {
                let presentSet = Set(present)
                arrivals = Arrivals(newEntries.filter { !presentSet.contains($0.name) })
            }
            return arrivals!.take(matching: old)
        }
        var renamedFrom: [[UInt8]: TreeEntry] = [:]
        // A source with a name like the staging directory's: nothing is taken from it.
        if path.isEmpty, let staging, wanted.contains(TreeStaging.name) {
            staging.discard()
            self.staging = nil
        }
        for name in present where !wanted.contains(name) && !(path.isEmpty && staging != nil && name == TreeStaging.name) {
            // Only when the mirror is known to hold the old manifest (not after a cut-short apply,
            // nor on a former primary keeping its late changes aside).
            if !full, keepAside == nil, let was = oldByName[name], let to = arrival(matching: was) {
                try touch()
                if PosixFS.withCName(name, { n in PosixFS.withCName(to, { renameat(fd, n, fd, $0) }) }) == 0 {
                    renamedFrom[to] = was
                    stats.renamed += 1
                    continue
                }
            }
            try removeTree(fd, name, path: TreePath.join(path, name))
            stats.removed += 1
        }
        // A directory whose blob was staged whole (the top of a first run): what the mirror
        // lacks is taken from the build, complete with its metadata.
        let build = staging?.openBuild(new) ?? -1
        defer { if build >= 0 { close(build) } }
        let absent = build >= 0 ? Set(newEntries.map(\.name)).subtracting(present) : []
        for e in newEntries {
            if absent.contains(e.name) {
                try touch()
                if PosixFS.withCName(e.name, { renameat(build, $0, fd, $0) }) == 0 { continue }
            }
            // An entry the last snapshot had exactly so is on the mirror as it is (the mirror is
            // known to hold that snapshot), as a directory whose blob did not change is: not
            // even looked at.
            if !full, keepAside == nil, let was = oldByName[e.name], was == e { continue }
            try applyEntry(fd, e, path: TreePath.join(path, e.name), old: oldByName[e.name] ?? renamedFrom[e.name])
        }
    }

    /// New names of a directory, by content: a directory by its subtree, a file by its data.
    private struct Arrivals {
        var directories: [ChunkID: [UInt8]] = [:]
        var files: [[ChunkRef]: [UInt8]] = [:]

        init(_ entries: [TreeEntry]) {
            for e in entries {
                switch e.kind {
                case .directory: if let id = e.subtree { directories[id] = e.name }
                case .file: if e.size > 0 { files[e.segments.flatMap(\.chunks)] = e.name }
                default: break
                }
            }
        }

        /// The new name with the same content as `old` had (taken: one arrival per departure).
        mutating func take(matching old: TreeEntry) -> [UInt8]? {
            switch old.kind {
            case .directory:
                guard let id = old.subtree else { return nil }
                return directories.removeValue(forKey: id)
            case .file where old.size > 0:
                return files.removeValue(forKey: old.segments.flatMap(\.chunks))
            default:
                return nil
            }
        }
    }

    private func applyEntry(_ fd: Int32, _ e: TreeEntry, path: [UInt8], old: TreeEntry?) throws {
        let st = PosixFS.lstat(at: fd, e.name)
        switch e.kind {
        case .directory:
            guard let st, PosixFS.isDirectory(st) else {
                try applyNewDirectory(fd, e, path: path, existing: st)
                return
            }
            let unchanged = !full && old?.kind == .directory && old?.subtree == e.subtree
            let sub = PosixFS.openDirectory(at: fd, e.name)
            guard sub >= 0 else { throw TreeFSError("open directory", path) }
            defer { close(sub) }
            if !unchanged { try applyDirectory(sub, path: path, old: old?.kind == .directory ? old?.subtree : nil, new: e.subtree!) }
            if !unchanged || old.map({ !sameMetadata($0, e) }) == true { try setMetadata(fd: sub, e, path: path) }
        case .file:
            try applyFile(fd, e, path: path, st: st, old: old)
        case .symlink:
            if let st, PosixFS.isSymlink(st), PosixFS.readlink(at: fd, e.name, size: Int(st.st_size)) == e.target {
                try setLinkMetadata(fd, e.name, e, path: path, st: st)
                return
            }
            let temp = try nextTemp()
            let rc = PosixFS.withCName(e.target) { t in PosixFS.withCName(temp) { symlinkat(t, fd, $0) } }
            guard rc == 0 else { throw TreeFSError("create symlink", path) }
            try setLinkMetadata(fd, temp, e, path: path, st: nil)
            try replace(fd, temp, with: e.name, path: path, existing: st)
            stats.filesWritten += 1
        case .fifo:
            if let st, PosixFS.isFIFO(st) {
                try setLinkMetadata(fd, e.name, e, path: path, st: st)
                return
            }
            let temp = try nextTemp()
            let rc = PosixFS.withCName(temp) { mkfifoat(fd, $0, 0o600) }
            guard rc == 0 else { throw TreeFSError("create fifo", path) }
            try setLinkMetadata(fd, temp, e, path: path, st: nil)
            try replace(fd, temp, with: e.name, path: path, existing: st)
        }
    }

    private func sameMetadata(_ a: TreeEntry, _ b: TreeEntry) -> Bool {
        a.mode == b.mode && a.uid == b.uid && a.gid == b.gid && a.mtime == b.mtime
    }

    private func applyFile(_ fd: Int32, _ e: TreeEntry, path: [UInt8], st: stat?, old: TreeEntry?) throws {
        if try linkToGroup(fd, e, path: path, st: st, fresh: false) { return }
        // The data on disk is the entry's when size and mtime match, unless the source changed
        // the content under the same mtime (then the chunk lists differ).
        if let st, PosixFS.isRegular(st), UInt64(st.st_size) == e.size, PosixFS.time(st.st_mtim) == e.mtime,
           old == nil || old!.kind != .file || old!.segments == e.segments || old!.mtime != e.mtime, !full || old?.segments == e.segments {
            if st.st_nlink > 1 && e.linkGroup == 0 {
                // Was a hard link, no longer is: give it data of its own.
            } else {
                if UInt32(st.st_mode) & 0o7777 != e.mode || (setOwner && (st.st_uid != e.uid || st.st_gid != e.gid)) {
                    try setLinkMetadata(fd, e.name, e, path: path, st: st)
                }
                return
            }
        }
        let temp = try nextTemp()
        try writeFile(fd, temp, e, path: path)
        try replace(fd, temp, with: e.name, path: path, existing: st)
        stats.filesWritten += 1
        stats.bytesWritten += e.size
    }

    /// Makes `e` a hard link to the first name of its group when that is written (by this apply
    /// or an earlier one) and still holds the same file; true when it did. Otherwise `e` becomes
    /// its group's first name.
    private func linkToGroup(_ fd: Int32, _ e: TreeEntry, path: [UInt8], st: stat?, fresh: Bool) throws -> Bool {
        let group = e.linkGroup
        guard group != 0 else { return false }
        if let first = groups[group] ?? knownGroups[group], first != path {
            let now = located[group] ?? first
            if let target = PosixFS.lstat(at: rootFD, now), PosixFS.isRegular(target),
               UInt64(target.st_size) == e.size, PosixFS.time(target.st_mtim) == e.mtime {
                if let st, st.st_ino == target.st_ino, st.st_dev == target.st_dev { return true }
                let name = fresh ? e.name : try nextTemp()
                try touch()
                noteBump(target)
                if PosixFS.withCName(now, { f in PosixFS.withCName(name) { linkat(rootFD, f, fd, $0, 0) } }) == 0 {
                    if !fresh { try replace(fd, name, with: e.name, path: path, existing: st) }
                    stats.linked += 1
                    groups[group] = groups[group] ?? first
                    return true
                }
            }
        }
        if groups[group] == nil {
            groups[group] = path
            if let top = freshTop { located[group] = top.now + path.dropFirst(top.path.count) }
        }
        return false
    }

    /// Creates the file `name` in `fd` with the entry's data and metadata; removed again when
    /// that fails.
    private func writeFile(_ fd: Int32, _ name: [UInt8], _ e: TreeEntry, path: [UInt8], fresh: FreshDirectory? = nil) throws {
        // In a directory no one sees yet, a file is created with its mode when the umask keeps
        // it whole and no special bit is set (a chown would clear it): one call less per file.
        let modeAtCreate = fresh != nil && e.mode & ~0o777 == 0 && e.mode & PosixFS.umask == 0
        let out = PosixFS.withCName(name) { openat(fd, $0, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, modeAtCreate ? mode_t(e.mode) : 0o600) }
        guard out >= 0 else { throw TreeFSError("create", path) }
        do {
            try writeData(out, e, path: path)
            if setOwner {
                // There, a file created with the owner it is to have needs no chown.
                if let fresh, fresh.owner == nil, let st = PosixFS.fstat(out) { fresh.owner = (st.st_uid, st.st_gid) }
                if fresh?.owner.map({ $0.uid == e.uid && $0.gid == e.gid }) != true {
                    guard fchown(out, e.uid, e.gid) == 0 else { throw TreeFSError("chown", path) }
                }
            }
            if !modeAtCreate { guard fchmod(out, mode_t(e.mode)) == 0 else { throw TreeFSError("chmod", path) } }
            var times = [timespec(tv_sec: Int(e.mtime.seconds), tv_nsec: Int(e.mtime.nanoseconds)),
                         timespec(tv_sec: Int(e.mtime.seconds), tv_nsec: Int(e.mtime.nanoseconds))]
            guard futimens(out, &times) == 0 else { throw TreeFSError("set times", path) }
            close(out)
        } catch {
            close(out)
            _ = PosixFS.withCName(name) { unlinkat(fd, $0, 0) }
            throw error
        }
    }

    /// A directory the mirror lacks (or has something else under its name): built whole under a
    /// temporary name, then renamed into place, so a reader sees all of it or none of it, and its
    /// files need no temporary name and rename each.
    private func applyNewDirectory(_ fd: Int32, _ e: TreeEntry, path: [UInt8], existing: stat?) throws {
        let temp = try nextTemp()
        let staged = staging?.take(e.subtree!, into: fd, as: temp) == true
        if !staged {
            guard PosixFS.withCName(temp, { mkdirat(fd, $0, 0o700) }) == 0 else { throw TreeFSError("create directory", path) }
        }
        freshTop = (path, Array(path.dropLast(e.name.count)) + temp)
        defer {
            freshTop = nil
            located.removeAll()
        }
        do {
            let sub = PosixFS.openDirectory(at: fd, temp)
            guard sub >= 0 else { throw TreeFSError("open directory", path) }
            defer { close(sub) }
            if !staged { try applyDirectory(sub, path: path, old: nil, new: e.subtree!, fresh: true) }
            try setMetadata(fd: sub, e, path: path)
            if existing != nil { try removeTree(fd, e.name, path: path) }
            let rc = PosixFS.withCName(temp) { t in PosixFS.withCName(e.name) { renameat(fd, t, fd, $0) } }
            guard rc == 0 else { throw TreeFSError("rename into place", path) }
        } catch {
            try? removeTree(fd, temp, path: path, keepingAside: false)
            throw error
        }
    }

    /// A directory this apply is building (see `fresh`): the owner a file created in it gets,
    /// learnt from its first file (the directory's set-group-ID bit or the filesystem may choose
    /// the group).
    private final class FreshDirectory {
        var owner: (uid: uid_t, gid: gid_t)?
    }

    /// An entry of a directory this apply is building (see `fresh`): written under its own name.
    private func applyNew(_ fd: Int32, _ e: TreeEntry, path: [UInt8], in directory: FreshDirectory) throws {
        switch e.kind {
        case .directory:
            let staged = staging?.take(e.subtree!, into: fd, as: e.name) == true
            if !staged {
                guard PosixFS.withCName(e.name, { mkdirat(fd, $0, 0o700) }) == 0 else { throw TreeFSError("create directory", path) }
            }
            let sub = PosixFS.openDirectory(at: fd, e.name)
            guard sub >= 0 else { throw TreeFSError("open directory", path) }
            defer { close(sub) }
            if !staged { try applyDirectory(sub, path: path, old: nil, new: e.subtree!, fresh: true) }
            try setMetadata(fd: sub, e, path: path)
        case .file:
            if try linkToGroup(fd, e, path: path, st: nil, fresh: true) { return }
            try writeFile(fd, e.name, e, path: path, fresh: directory)
            stats.filesWritten += 1
            stats.bytesWritten += e.size
        case .symlink:
            let rc = PosixFS.withCName(e.target) { t in PosixFS.withCName(e.name) { symlinkat(t, fd, $0) } }
            guard rc == 0 else { throw TreeFSError("create symlink", path) }
            try setLinkMetadata(fd, e.name, e, path: path, st: nil)
            stats.filesWritten += 1
        case .fifo:
            guard PosixFS.withCName(e.name, { mkfifoat(fd, $0, 0o600) }) == 0 else { throw TreeFSError("create fifo", path) }
            try setLinkMetadata(fd, e.name, e, path: path, st: nil)
        }
    }

    private func writeData(_ out: Int32, _ e: TreeEntry, path: [UInt8]) throws {
        // The file is new and empty: only a hole at its end needs the size set apart.
        let end = e.segments.last.map { $0.offset + $0.chunks.reduce(0) { $0 + UInt64($1.length) } } ?? 0
        if end != e.size { guard ftruncate(out, off_t(e.size)) == 0 else { throw TreeFSError("write", path) } }
        for segment in e.segments {
            var offset = segment.offset
            for chunk in segment.chunks {
                guard let data = try source.blob(chunk.id), data.readableBytes == Int(chunk.length) else {
                    throw Incomplete(description: "chunk \(chunk.id) of \(TreePath.display(path)) is missing")
                }
                try data.withUnsafeReadableBytes { raw in
                    var done = 0
                    while done < raw.count {
                        let n = pwrite(out, raw.baseAddress! + done, raw.count - done, off_t(offset) + off_t(done))
                        if n < 0 {
                            if errno == EINTR { continue }
                            throw TreeFSError("write", path)
                        }
                        done += n
                    }
                }
                offset += UInt64(chunk.length)
            }
        }
    }

    private func nextTemp() throws -> [UInt8] {
        try touch()
        tempCounter += 1
        return Array(".ferry-\(getpid())-\(tempCounter).tmp".utf8)
    }

    /// Moves `name` aside when it changed after the keep-aside time; true when it did.
    private func keptAside(_ fd: Int32, _ name: [UInt8], path: [UInt8], st: stat?) throws -> Bool {
        guard let keep = keepAside, let st, PosixFS.time(st.st_ctim) > keep.after else { return false }
        if PosixFS.time(st.st_mtim) <= keep.after, bumpedByApply.contains([UInt64(st.st_dev), UInt64(st.st_ino)]) { return false }
        noteBump(st)
        let destination = Array(keep.directory.utf8) + [0x2F] + path
        let parent = Array(destination[..<(destination.lastIndex(of: 0x2F)!)])
        var sofar: [UInt8] = []
        for component in TreePath.components(parent) {
            sofar += [0x2F] + component
            _ = PosixFS.withCName(sofar) { mkdir($0, 0o700) }
        }
        let rc = PosixFS.withCName(name) { n in PosixFS.withCName(destination) { renameat(fd, n, AT_FDCWD, $0) } }
        guard rc == 0 else { throw TreeFSError("keep aside (nothing is overwritten)", path) }
        stats.keptAside.append(TreePath.display(path))
        return true
    }

    /// Renames `temp` over `name`; a directory in the way is removed first.
    private func replace(_ fd: Int32, _ temp: [UInt8], with name: [UInt8], path: [UInt8], existing: stat?) throws {
        if let existing, try keptAside(fd, name, path: path, st: existing) {
            // Moved aside; `temp` takes the free name.
        } else if let existing, PosixFS.isDirectory(existing) { try removeTree(fd, name, path: path) }
        noteBump(existing)
        let rc = PosixFS.withCName(temp) { t in PosixFS.withCName(name) { renameat(fd, t, fd, $0) } }
        guard rc == 0 else {
            let saved = errno
            _ = PosixFS.withCName(temp) { unlinkat(fd, $0, 0) }
            throw TreeFSError("rename into place", path, saved)
        }
    }

    private func setLinkMetadata(_ fd: Int32, _ name: [UInt8], _ e: TreeEntry, path: [UInt8], st: stat?) throws {
        if setOwner && (st == nil || st!.st_uid != e.uid || st!.st_gid != e.gid) {
            try touch()
            let rc = PosixFS.withCName(name) { fchownat(fd, $0, e.uid, e.gid, AT_SYMLINK_NOFOLLOW) }
            guard rc == 0 else { throw TreeFSError("chown", path) }
        }
        if e.kind != .symlink && (st == nil || UInt32(st!.st_mode) & 0o7777 != e.mode) {
            try touch()
            let rc = PosixFS.withCName(name) { fchmodat(fd, $0, mode_t(e.mode), 0) }
            guard rc == 0 else { throw TreeFSError("chmod", path) }
        }
        if st == nil || PosixFS.time(st!.st_mtim) != e.mtime {
            try touch()
            var times = [timespec(tv_sec: Int(e.mtime.seconds), tv_nsec: Int(e.mtime.nanoseconds)),
                         timespec(tv_sec: Int(e.mtime.seconds), tv_nsec: Int(e.mtime.nanoseconds))]
            let rc = PosixFS.withCName(name) { utimensat(fd, $0, &times, AT_SYMLINK_NOFOLLOW) }
            guard rc == 0 else { throw TreeFSError("set times", path) }
        }
    }

    private func setMetadata(fd: Int32, _ e: TreeEntry, path: [UInt8]) throws {
        let st = PosixFS.fstat(fd)
        if let st, UInt32(st.st_mode) & 0o7777 == e.mode, PosixFS.time(st.st_mtim) == e.mtime,
           !setOwner || (st.st_uid == e.uid && st.st_gid == e.gid) { return }
        try touch()
        noteBump(st)
        if setOwner { guard fchown(fd, e.uid, e.gid) == 0 else { throw TreeFSError("chown", path) } }
        guard fchmod(fd, mode_t(e.mode)) == 0 else { throw TreeFSError("chmod", path) }
        var times = [timespec(tv_sec: Int(e.mtime.seconds), tv_nsec: Int(e.mtime.nanoseconds)),
                     timespec(tv_sec: Int(e.mtime.seconds), tv_nsec: Int(e.mtime.nanoseconds))]
        guard futimens(fd, &times) == 0 else { throw TreeFSError("set times", path) }
    }

    /// Removes a name and, for a directory, everything under it (what changed after the
    /// keep-aside time is moved aside instead).
    func removeTree(_ fd: Int32, _ name: [UInt8], path: [UInt8], keepingAside: Bool = true) throws {
        try touch()
        if keepingAside, keepAside != nil, let st = PosixFS.lstat(at: fd, name) {
            if !PosixFS.isDirectory(st), try keptAside(fd, name, path: path, st: st) { return }
            noteBump(st)
        }
        if PosixFS.withCName(name, { unlinkat(fd, $0, 0) }) == 0 { return }
        guard errno == EISDIR || errno == EPERM else {
            if errno == ENOENT { return }
            throw TreeFSError("remove", path)
        }
        let sub = PosixFS.openDirectory(at: fd, name)
        guard sub >= 0 else { throw TreeFSError("open directory", path) }
        // A read-only directory cannot lose its entries.
        defer { close(sub) }
        _ = fchmod(sub, 0o700)
        for child in PosixFS.names(in: sub) ?? [] {
            try removeTree(sub, child, path: TreePath.join(path, child), keepingAside: keepingAside)
        }
        guard PosixFS.withCName(name, { unlinkat(fd, $0, AT_REMOVEDIR) }) == 0 else { throw TreeFSError("remove directory", path) }
    }
}
