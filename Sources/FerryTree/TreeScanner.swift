import FerryStore
import NIOCore
import CFerrySys
#if canImport(Glibc)
import Glibc
#endif

/// What the scanner remembers of a path from the last scan (the files cache, DESIGN §5.2): a file
/// whose size, mtime, ctime, inode and device are unchanged is not read again; a directory keeps
/// its manifest blob ID, so one that cannot be read this time keeps its previous contents instead
/// of vanishing from the snapshot.
public struct CachedEntry: Equatable, Sendable {
    public var entry: TreeEntry
    public var ctime: FileTime
    public var inode: UInt64
    public var device: UInt64

    public init(entry: TreeEntry, ctime: FileTime, inode: UInt64, device: UInt64) {
        self.entry = entry
        self.ctime = ctime
        self.inode = inode
        self.device = device
    }

    /// Encoded for the catalog: ctime (i64, u32), inode u64, device u64, then the entry as a
    /// one-entry directory blob.
    public func encoded() -> [UInt8] {
        var buffer = ByteBuffer()
        buffer.writeInteger(ctime.seconds)
        buffer.writeInteger(ctime.nanoseconds)
        buffer.writeInteger(inode)
        buffer.writeInteger(device)
        var blob = DirectoryBlob.encode([entry])
        buffer.writeBuffer(&blob)
        return Array(buffer.readableBytesView)
    }

    /// A tree's files cache as the catalog keeps it.
    public static func load(_ tree: String, from catalog: Catalog) throws -> [[UInt8]: CachedEntry] {
        var cache: [[UInt8]: CachedEntry] = [:]
        for (path, record) in try catalog.treeFiles(tree: tree) { cache[path] = CachedEntry(encoded: record) }
        return cache
    }

    public init?(encoded bytes: [UInt8]) {
        var buffer = ByteBuffer(bytes: bytes)
        guard let seconds = buffer.readInteger(as: Int64.self), let nanos = buffer.readInteger(as: UInt32.self),
              let inode = buffer.readInteger(as: UInt64.self), let device = buffer.readInteger(as: UInt64.self),
              let entries = try? DirectoryBlob.decode(buffer), entries.count == 1 else { return nil }
        self.init(entry: entries[0], ctime: FileTime(seconds: seconds, nanoseconds: nanos), inode: inode, device: device)
    }
}

/// Receives what a scan produces, in this order per directory: the chunks of each file read
/// (``chunk(_:_:)``, then ``file(_:_:read:)``), each entry's file record, then the directory's
/// blob (``directory(_:_:_:)``), children before parents; the root last.
public protocol ScanSink: AnyObject {
    /// A chunk of a file being read: its ID and content. A file that then turns out to have
    /// changed while read is read again: its earlier chunks are simply not referenced.
    func chunk(_ id: ChunkID, _ data: ByteBuffer) throws
    /// A file's entry; `read` is false when it came from the files cache unread.
    func file(_ path: [UInt8], _ entry: TreeEntry, read: Bool) throws
    /// A directory's blob, after everything in it.
    func directory(_ path: [UInt8], _ id: ChunkID, _ blob: ByteBuffer) throws
}

/// Something wrong with one path that did not stop the scan; the previous version is kept where
/// there was one.
public struct ScanProblem: Equatable, Sendable, CustomStringConvertible {
    public var path: [UInt8]
    public var message: String

    public var description: String { "\(TreePath.display(path)): \(message)" }
}

/// The scan could not run at all: nothing is taken from it (never "the source is empty, delete
/// everything on the peer").
public struct ScanFailure: Error, CustomStringConvertible {
    public var description: String
}

/// Walks a source tree (never following symlinks, staying on its filesystem), reads and chunks the
/// files the cache does not vouch for, and builds the manifest's directory blobs.
public final class TreeScanner {
    public struct Result: Sendable {
        public var root: ChunkID
        public var files: Int
        public var directories: Int
        /// Bytes of file data in the tree (logical sizes).
        public var bytes: UInt64
        /// Files read this scan (not vouched for by the cache) and their bytes.
        public var filesRead: Int
        public var bytesRead: UInt64
        public var problems: [ScanProblem]
        /// The files cache after this scan: every path in the snapshot.
        public var cache: [[UInt8]: CachedEntry]
    }

    public let source: String
    let chunker: FastCDC
    let excludes: [[UInt8]]
    let previous: [[UInt8]: CachedEntry]
    /// How often a file that changes while read is read again before it is reported.
    let readAttempts: Int
    /// Files and bytes covered so far, for status.
    public var progress: ScanProgress?
    /// Called between the reads of a file's attempts: tests change files here.
    var afterRead: ((_ path: [UInt8], _ attempt: Int) -> Void)?

    private var cache: [[UInt8]: CachedEntry] = [:]
    private var problems: [ScanProblem] = []
    private var files = 0, directories = 0, filesRead = 0
    private var bytes: UInt64 = 0, bytesRead: UInt64 = 0
    private var rootDevice: UInt64 = 0
    private var linksSeen: [UInt64: CachedEntry] = [:]
    /// The last scan's files by inode: a file whose directory was renamed is found here unread.
    private lazy var previousByInode: [UInt64: CachedEntry] = {
        var out: [UInt64: CachedEntry] = [:]
        for c in previous.values where c.entry.kind == .file { out[c.inode] = c }
        return out
    }()
    private var buffer: UnsafeMutableRawBufferPointer
    private var sink: (any ScanSink)!

    /// - Parameters:
    ///   - excludes: glob patterns (fnmatch): one without `/` matches a name anywhere, one with
    ///     `/` the path from the tree's root.
    ///   - cache: the files cache of the last scan.
    public init(source: String, chunker: FastCDC = .files, excludes: [String] = [], cache: [[UInt8]: CachedEntry] = [:],
                readAttempts: Int = 3) {
        self.source = source
        self.chunker = chunker
        self.excludes = excludes.map { Array($0.utf8) }
        self.previous = cache
        self.readAttempts = readAttempts
        self.buffer = .allocate(byteCount: max(16 << 20, 2 * chunker.maxSize), alignment: 4096)
    }

    deinit { buffer.deallocate() }

    /// Tests: called after each read attempt of a file, before its second fstat.
    public func onAfterRead(_ body: @escaping (_ path: [UInt8], _ attempt: Int) -> Void) { afterRead = body }

    public func scan(into sink: any ScanSink) throws -> Result {
        self.sink = sink
        defer { self.sink = nil }
        let rootFD = PosixFS.openDirectory(source)
        guard rootFD >= 0 else {
            throw ScanFailure(description: "cannot open the source directory \(source): \(String(cString: strerror(errno))); nothing is replicated until it is back")
        }
        defer { close(rootFD) }
        guard let st = PosixFS.fstat(rootFD) else {
            throw ScanFailure(description: "cannot stat the source directory \(source): \(String(cString: strerror(errno)))")
        }
        rootDevice = UInt64(st.st_dev)
        if let before = previous[[]], before.device != rootDevice {
            throw ScanFailure(description: "the source directory \(source) is on a different filesystem than at the last scan (device \(before.device) → \(rootDevice)): was it unmounted? Nothing is replicated until it is back")
        }
        guard let root = try scanDirectory(rootFD, path: [], st: st) else {
            throw ScanFailure(description: "cannot read the source directory \(source): \(problems.last?.message ?? "unreadable"); nothing is replicated until it is readable")
        }
        return Result(root: root.subtree!, files: files, directories: directories, bytes: bytes, filesRead: filesRead,
                      bytesRead: bytesRead, problems: problems, cache: cache)
    }

    private func report(_ path: [UInt8], _ message: String) {
        problems.append(ScanProblem(path: path, message: message))
    }

    private func excluded(_ path: [UInt8], name: [UInt8]) -> Bool {
        for pattern in excludes {
            let subject = pattern.contains(0x2F) ? path : name
            let rc = PosixFS.withCName(pattern) { p in PosixFS.withCName(subject) { s in fnmatch(p, s, 0) } }
            if rc == 0 { return true }
        }
        return false
    }

    private func base(_ name: [UInt8], _ kind: TreeEntry.Kind, _ st: stat) -> TreeEntry {
        TreeEntry(name: name, kind: kind, mode: UInt32(st.st_mode) & 0o7777, uid: st.st_uid, gid: st.st_gid,
                  mtime: PosixFS.time(st.st_mtim))
    }

    private func remember(_ path: [UInt8], _ entry: TreeEntry, _ st: stat) {
        cache[path] = CachedEntry(entry: entry, ctime: PosixFS.time(st.st_ctim), inode: UInt64(st.st_ino), device: UInt64(st.st_dev))
    }

    /// The directory's entry with its blob, or nil (reported) when it cannot be read and was not
    /// in the last scan either.
    private func scanDirectory(_ fd: Int32, path: [UInt8], st: stat) throws -> TreeEntry? {
        let name = TreePath.components(path).last ?? []
        guard let names = PosixFS.names(in: fd) else {
            report(path, "cannot list directory: \(String(cString: strerror(errno))); kept as it was")
            return keepPrevious(path)
        }
        var entries: [TreeEntry] = []
        entries.reserveCapacity(names.count)
        for child in names.sorted(by: { $0.lexicographicallyPrecedes($1) }) {
            let childPath = TreePath.join(path, child)
            if excluded(childPath, name: child) { continue }
            guard let cst = PosixFS.lstat(at: fd, child) else {
                if errno != ENOENT { report(childPath, "cannot stat: \(String(cString: strerror(errno)))") }
                if errno != ENOENT, let kept = keepPrevious(childPath) { entries.append(kept) }
                continue
            }
            if let entry = try scanEntry(fd, name: child, path: childPath, st: cst) { entries.append(entry) }
        }
        let blob = DirectoryBlob.encode(entries)
        let id = ChunkID.of(blob)
        try sink.directory(path, id, blob)
        directories += 1
        var entry = base(name, .directory, st)
        entry.subtree = id
        remember(path, entry, st)
        return entry
    }

    private func keepPrevious(_ path: [UInt8]) -> TreeEntry? {
        guard let old = previous[path] else { return nil }
        // A kept directory keeps everything under it in the cache, so the next scan still knows it.
        if old.entry.kind == .directory {
            let prefix = path + [0x2F]
            for (p, c) in previous where p.starts(with: prefix) || path.isEmpty {
                cache[p] = c
                if c.entry.kind == .file { files += 1; bytes += c.entry.size }
            }
        } else if old.entry.kind == .file {
            files += 1
            bytes += old.entry.size
        }
        cache[path] = old
        return old.entry
    }

    private func scanEntry(_ dirfd: Int32, name: [UInt8], path: [UInt8], st: stat) throws -> TreeEntry? {
        if PosixFS.isDirectory(st) {
            guard UInt64(st.st_dev) == rootDevice else {
                report(path, "another filesystem is mounted here; not crossed (its mount point is kept as an empty directory)")
                let entry = base(name, .directory, st)
                var empty = entry
                let blob = DirectoryBlob.encode([])
                empty.subtree = ChunkID.of(blob)
                try sink.directory(path, empty.subtree!, blob)
                return empty
            }
            let fd = PosixFS.openDirectory(at: dirfd, name)
            guard fd >= 0 else {
                report(path, "cannot open directory: \(String(cString: strerror(errno))); kept as it was")
                return keepPrevious(path)
            }
            defer { close(fd) }
            return try scanDirectory(fd, path: path, st: st)
        }
        if PosixFS.isSymlink(st) {
            guard let target = PosixFS.readlink(at: dirfd, name, size: Int(st.st_size)) else {
                report(path, "cannot read symlink: \(String(cString: strerror(errno)))")
                return keepPrevious(path)
            }
            var entry = base(name, .symlink, st)
            entry.target = target
            remember(path, entry, st)
            return entry
        }
        if PosixFS.isFIFO(st) {
            let entry = base(name, .fifo, st)
            remember(path, entry, st)
            return entry
        }
        guard PosixFS.isRegular(st) else {
            report(path, "a socket or device node; not replicated")
            return nil
        }
        return try scanFile(dirfd, name: name, path: path, st: st)
    }

    private func unchanged(_ c: CachedEntry, _ st: stat) -> Bool {
        c.entry.kind == .file && c.entry.size == UInt64(st.st_size) && c.entry.mtime == PosixFS.time(st.st_mtim)
            && c.ctime == PosixFS.time(st.st_ctim) && c.inode == UInt64(st.st_ino) && c.device == UInt64(st.st_dev)
    }

    private func scanFile(_ dirfd: Int32, name: [UInt8], path: [UInt8], st: stat) throws -> TreeEntry? {
        let group: UInt64 = st.st_nlink > 1 ? UInt64(st.st_ino) : 0
        var entry: TreeEntry
        if let seen = linksSeen[UInt64(st.st_ino)], group != 0, unchangedLink(seen, st) {
            // Another name of a file read this scan: same data, no second read.
            entry = seen.entry
            entry.name = name
            try sink.file(path, entry, read: false)
        } else if let cached = previous[path].flatMap({ unchanged($0, st) ? $0 : nil })
                    ?? previousByInode[UInt64(st.st_ino)].flatMap({ unchanged($0, st) ? $0 : nil }) {
            entry = cached.entry
            entry.name = name
            entry.linkGroup = group
            entry.mode = UInt32(st.st_mode) & 0o7777
            entry.uid = st.st_uid
            entry.gid = st.st_gid
            try sink.file(path, entry, read: false)
        } else {
            guard let read = try readFile(dirfd, name: name, path: path) else { return keepPrevious(path) }
            entry = read.entry
            entry.linkGroup = read.st.st_nlink > 1 ? UInt64(read.st.st_ino) : 0
            try sink.file(path, entry, read: true)
            remember(path, entry, read.st)
            if entry.linkGroup != 0 { linksSeen[entry.linkGroup] = cache[path] }
            files += 1
            bytes += entry.size
            progress?.add(files: 1, bytes: entry.size)
            return entry
        }
        remember(path, entry, st)
        if group != 0 { linksSeen[group] = cache[path] }
        files += 1
        bytes += entry.size
        progress?.add(files: 1, bytes: entry.size)
        return entry
    }

    private func unchangedLink(_ c: CachedEntry, _ st: stat) -> Bool {
        c.entry.size == UInt64(st.st_size) && c.entry.mtime == PosixFS.time(st.st_mtim) && c.ctime == PosixFS.time(st.st_ctim)
    }

    /// Reads and chunks a file; reads it again while it changes under the read; nil (reported)
    /// when it cannot be read or keeps changing.
    private func readFile(_ dirfd: Int32, name: [UInt8], path: [UInt8]) throws -> (entry: TreeEntry, st: stat)? {
        // O_NOATIME (Linux 0o1000000) keeps the scan from touching atimes; only the owner (or root)
        // may ask for it, so others open without.
        var fd = PosixFS.withCName(name) { openat(dirfd, $0, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | 0o1000000) }
        if fd < 0 && errno == EPERM { fd = PosixFS.withCName(name) { openat(dirfd, $0, O_RDONLY | O_NOFOLLOW | O_CLOEXEC) } }
        guard fd >= 0 else {
            report(path, "cannot open: \(String(cString: strerror(errno))); \(previous[path] == nil ? "not replicated" : "the previous version is kept")")
            return nil
        }
        defer { close(fd) }
        for attempt in 1...readAttempts {
            guard let before = PosixFS.fstat(fd) else { break }
            guard PosixFS.isRegular(before) else {
                report(path, "is no longer a regular file")
                return nil
            }
            let segments: [FileSegment]
            do {
                segments = try readSegments(fd, size: UInt64(before.st_size), path: path)
            } catch let error as TreeFSError {
                report(path, "\(String(cString: strerror(error.code))) while reading; \(previous[path] == nil ? "not replicated" : "the previous version is kept")")
                return nil
            }
            afterRead?(path, attempt)
            guard let after = PosixFS.fstat(fd) else { break }
            if after.st_size == before.st_size && PosixFS.time(after.st_mtim) == PosixFS.time(before.st_mtim)
                && PosixFS.time(after.st_ctim) == PosixFS.time(before.st_ctim) {
                var entry = base(name, .file, after)
                entry.size = UInt64(after.st_size)
                entry.segments = segments
                filesRead += 1
                bytesRead += entry.size
                return (entry, after)
            }
        }
        report(path, "changed while being read \(readAttempts) times; \(previous[path] == nil ? "not replicated this time" : "the previous version is kept")")
        return nil
    }

    /// The file's data extents (SEEK_DATA/SEEK_HOLE), each cut into content-defined chunks.
    private func readSegments(_ fd: Int32, size: UInt64, path: [UInt8]) throws -> [FileSegment] {
        var segments: [FileSegment] = []
        var position: Int64 = 0
        let end = Int64(size)
        while position < end {
            let dataStart = ferry_seek_data(fd, position)
            if dataStart < 0 {
                if errno == ENXIO { break }
                // No SEEK_DATA here: the whole rest is data.
                segments.append(try readExtent(fd, from: UInt64(position), to: UInt64(end), path: path))
                break
            }
            if dataStart >= end { break }
            var holeStart = ferry_seek_hole(fd, dataStart)
            if holeStart < 0 || holeStart > end { holeStart = end }
            segments.append(try readExtent(fd, from: UInt64(dataStart), to: UInt64(holeStart), path: path))
            position = holeStart
        }
        return segments
    }

    private func readExtent(_ fd: Int32, from start: UInt64, to end: UInt64, path: [UInt8]) throws -> FileSegment {
        var chunks: [ChunkRef] = []
        var filled = 0          // bytes in buffer
        var consumed = 0        // bytes of the buffer already chunked
        var offset = start      // file offset just past buffer[filled - 1]
        var eof = false         // the file ended before `end` (it shrank; the fstat after the read notices)
        let capacity = buffer.count
        while true {
            // Refill so that a whole maximum chunk is in the buffer, unless the extent ends first.
            if filled - consumed < chunker.maxSize && offset < end && !eof {
                let remaining = filled - consumed
                if consumed > 0 && remaining > 0 {
                    buffer.baseAddress!.copyMemory(from: buffer.baseAddress! + consumed, byteCount: remaining)
                }
                filled = remaining
                consumed = 0
                while filled < capacity && offset < end {
                    let want = Int(min(UInt64(capacity - filled), end - offset))
                    let n = pread(fd, buffer.baseAddress! + filled, want, off_t(offset))
                    if n < 0 {
                        if errno == EINTR { continue }
                        throw TreeFSError("read", path)
                    }
                    if n == 0 { eof = true; break }
                    filled += n
                    offset += UInt64(n)
                }
            }
            let available = filled - consumed
            if available == 0 { break }
            // Fewer than a maximum chunk left only at the end of the extent: the last chunk.
            let window = UnsafeRawBufferPointer(rebasing: buffer[consumed..<filled])
            let length = chunker.firstChunkLength(window)
            let piece = UnsafeRawBufferPointer(rebasing: window[0..<length])
            let id = ChunkID.of(piece)
            try sink.chunk(id, ByteBuffer(bytes: piece))
            chunks.append(ChunkRef(id: id, length: UInt32(length)))
            consumed += length
        }
        return FileSegment(offset: start, chunks: chunks)
    }
}
