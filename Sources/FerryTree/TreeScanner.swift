import FerryStore
import NIOCore
import Dispatch
import CFerrySys
#if canImport(Glibc)
import Glibc
#endif

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
    /// Whether ``file(_:_:read:)`` is wanted for files the cache vouches for (it costs decoding
    /// their entries; a run needs them only when the peer may lack their chunks).
    var wantsUnreadFiles: Bool { get }
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
        /// The files cache after this scan: every directory in the snapshot.
        public var cache: FilesCache
    }

    public let source: String
    let chunker: FastCDC
    /// Exclude patterns matched against a name, and those (holding `/`) matched against the path.
    let nameExcludes: [[UInt8]]
    let pathExcludes: [[UInt8]]
    let previous: FilesCache
    /// How often a file that changes while read is read again before it is reported.
    let readAttempts: Int
    /// Files and bytes covered so far, for status.
    public var progress: ScanProgress?
    /// Called between the reads of a file's attempts: tests change files here.
    var afterRead: ((_ path: [UInt8], _ attempt: Int) -> Void)?

    private var cache = FilesCache()
    private var problems: [ScanProblem] = []
    private var files = 0, directories = 0, filesRead = 0
    private var bytes: UInt64 = 0, bytesRead: UInt64 = 0
    private var rootDevice: UInt64 = 0
    /// Files with several links met this scan, by inode: another name is not read again.
    private var linksSeen: [UInt64: (entry: TreeEntry, stamp: StatStamp)] = [:]
    /// The last scan's files by inode (directory, index in it): a file whose directory was
    /// renamed, or that was moved, is found here unread. Built on first need.
    private lazy var previousByInode: [UInt64: (directory: [UInt8], index: Int)] = {
        var out: [UInt64: (directory: [UInt8], index: Int)] = [:]
        for (path, directory) in previous.directories {
            for (index, stamp) in directory.stamps.enumerated() where stamp.isRegular { out[stamp.inode] = (path, index) }
        }
        return out
    }()
    private var movedSpans: [[UInt8]: [DirectoryBlob.Span]] = [:]
    private var buffer: UnsafeMutableRawBufferPointer
    private var sink: (any ScanSink)!

    /// - Parameters:
    ///   - excludes: glob patterns (fnmatch): one without `/` matches a name anywhere, one with
    ///     `/` the path from the tree's root.
    ///   - cache: the files cache of the last scan.
    public init(source: String, chunker: FastCDC = .files, excludes: [String] = [], cache: FilesCache = FilesCache(),
                readAttempts: Int = 3) {
        self.source = source
        self.chunker = chunker
        let patterns = excludes.map { Array($0.utf8) }
        self.nameExcludes = patterns.filter { !$0.contains(0x2F) }
        self.pathExcludes = patterns.filter { $0.contains(0x2F) }
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
        if let before = previous.directories[[]], before.device != rootDevice {
            throw ScanFailure(description: "the source directory \(source) is on a different filesystem than at the last scan (device \(before.device) → \(rootDevice)): was it unmounted? Nothing is replicated until it is back")
        }
        guard let root = try scanDirectory(rootFD, name: [], path: [], st: st) else {
            throw ScanFailure(description: "cannot read the source directory \(source): \(problems.last?.message ?? "unreadable"); nothing is replicated until it is readable")
        }
        return Result(root: root.subtree!, files: files, directories: directories, bytes: bytes, filesRead: filesRead,
                      bytesRead: bytesRead, problems: problems, cache: cache)
    }

    private func report(_ path: [UInt8], _ message: String) {
        problems.append(ScanProblem(path: path, message: message))
    }

    private func excluded(_ parent: [UInt8], name: [UInt8]) -> Bool {
        for pattern in nameExcludes where PosixFS.fnmatch(pattern, name) { return true }
        guard !pathExcludes.isEmpty else { return false }
        let path = TreePath.join(parent, name)
        for pattern in pathExcludes where PosixFS.fnmatch(pattern, path) { return true }
        return false
    }

    private func base(_ name: [UInt8], _ kind: TreeEntry.Kind, _ st: stat) -> TreeEntry {
        TreeEntry(name: name, kind: kind, mode: UInt32(st.st_mode) & 0o7777, uid: st.st_uid, gid: st.st_gid,
                  mtime: PosixFS.time(st.st_mtim))
    }

    /// An entry of the directory being built: unchanged since the last scan (the previous record's
    /// entry at that index, copied as bytes), or new.
    private enum Slot {
        case same(Int)
        case new(TreeEntry)
    }

    /// The entry at `index` of a directory's previous record.
    private struct Previous {
        var record: CachedDirectory
        var spans: [DirectoryBlob.Span]
        var index: Int
        var stamp: StatStamp { record.stamps[index] }
        var kind: UInt8 { spans[index].kind }
        func entry() throws -> TreeEntry { try DirectoryBlob.entry(record.blob, spans[index]) }
    }

    /// The lstat of each of `names` in the directory `fd` (or the errno of its failure). A large
    /// directory is statted on two threads: in a run that finds little changed, these calls are
    /// most of the scan's time, and the other core is idle. (A name is statted before the
    /// subdirectories that precede it are scanned: what changes after its stat is the next run's,
    /// as a change after any stat is; a file read is checked by its own `fstat`s.)
    static func lstatAll(_ fd: Int32, _ names: [[UInt8]]) -> [Lstat] {
        var results = [Lstat](repeating: Lstat(st: nil, error: 0), count: names.count)
        @Sendable func statRange(_ range: Range<Int>, _ out: UnsafeMutableBufferPointer<Lstat>) {
            for i in range {
                let st = PosixFS.lstat(at: fd, names[i])
                out[i] = Lstat(st: st, error: st == nil ? errno : 0)
            }
        }
        results.withUnsafeMutableBufferPointer { out in
            guard names.count >= 64 else { return statRange(0..<names.count, out) }
            let half = names.count / 2
            nonisolated(unsafe) let shared = out
            DispatchQueue.concurrentPerform(iterations: 2) { part in
                statRange(part == 0 ? 0..<half : half..<names.count, shared)
            }
        }
        return results
    }

    struct Lstat {
        var st: Glibc.stat?
        var error: Int32
    }

    /// The directory's entry with its blob, or nil (reported) when it cannot be listed. A
    /// directory whose entries all match their stamps keeps its previous record whole.
    private func scanDirectory(_ fd: Int32, name: [UInt8], path: [UInt8], st: stat) throws -> TreeEntry? {
        guard var names = PosixFS.names(in: fd) else {
            report(path, "cannot list directory: \(String(cString: strerror(errno))); kept as it was")
            return nil
        }
        names.sort(by: PosixFS.precedes)
        if !nameExcludes.isEmpty || !pathExcludes.isEmpty { names.removeAll { excluded(path, name: $0) } }
        let statted = Self.lstatAll(fd, names)
        let before = previous.directories[path]
        let spans = before.flatMap { DirectoryBlob.spans($0.blob) } ?? []
        var slots: [Slot] = []
        var stamps: [StatStamp] = []
        slots.reserveCapacity(names.count)
        stamps.reserveCapacity(names.count)
        var next = 0                 // the first previous entry not yet passed
        var unreadFiles = 0, unreadBytes: UInt64 = 0
        for (i, child) in names.enumerated() {
            var match: Previous?
            if let before {
                var order: Int32 = 1
                while next < spans.count {
                    order = DirectoryBlob.compareName(before.blob, spans[next], child)
                    if order >= 0 { break }
                    next += 1
                }
                if next < spans.count && order == 0 { match = Previous(record: before, spans: spans, index: next) }
            }
            guard let cst = statted[i].st else {
                let code = statted[i].error
                guard code != ENOENT else { continue }
                report(TreePath.join(path, child), "cannot stat: \(String(cString: strerror(code)))")
                if let match {
                    keep(match, path: TreePath.join(path, child))
                    slots.append(.same(match.index))
                    stamps.append(match.stamp)
                }
                continue
            }
            let stamp = StatStamp(cst)
            if let match, stamp == match.stamp, !PosixFS.isDirectory(cst) {
                // Unchanged since the last scan: neither read nor decoded.
                slots.append(.same(match.index))
                stamps.append(stamp)
                if stamp.isRegular {
                    unreadFiles += 1
                    unreadBytes += stamp.size
                    if cst.st_nlink > 1 || sink.wantsUnreadFiles {
                        let entry = try match.entry()
                        if cst.st_nlink > 1 { linksSeen[stamp.inode] = (entry, stamp) }
                        if sink.wantsUnreadFiles { try sink.file(TreePath.join(path, child), entry, read: false) }
                    }
                }
                continue
            }
            guard let (slot, kept) = try scanEntry(fd, name: child, path: TreePath.join(path, child), st: cst, stamp: stamp,
                                                   previous: match) else { continue }
            slots.append(slot)
            stamps.append(kept)
        }
        files += unreadFiles
        bytes += unreadBytes
        if unreadFiles > 0 { progress?.add(files: unreadFiles, bytes: unreadBytes) }

        let record: CachedDirectory
        if let before, before.device == UInt64(st.st_dev), slots.count == spans.count,
           slots.enumerated().allSatisfy({ if case .same(let i) = $0.element { return i == $0.offset } else { return false } }) {
            record = before
        } else {
            var blob = ByteBuffer()
            blob.reserveCapacity(8 + slots.count * 96)
            blob.writeInteger(DirectoryBlob.magic)
            blob.writeInteger(UInt32(slots.count))
            for slot in slots {
                switch slot {
                case .same(let i):
                    let span = spans[i]
                    var bytes = before!.blob.getSlice(at: before!.blob.readerIndex + span.start, length: span.end - span.start)!
                    blob.writeBuffer(&bytes)
                case .new(let entry):
                    DirectoryBlob.write(entry, to: &blob)
                }
            }
            record = CachedDirectory(id: ChunkID.of(blob), blob: blob, stamps: stamps, device: UInt64(st.st_dev))
        }
        cache.directories[path] = record
        try sink.directory(path, record.id, record.blob)
        directories += 1
        var entry = base(name, .directory, st)
        entry.subtree = record.id
        return entry
    }

    /// Keeps an entry that cannot be read this scan as it was, with everything under it.
    private func keep(_ match: Previous, path: [UInt8]) {
        if match.kind == TreeEntry.Kind.directory.rawValue {
            let prefix = path + [0x2F]
            for (p, record) in previous.directories where p == path || p.starts(with: prefix) {
                cache.directories[p] = record
                for stamp in record.stamps where stamp.isRegular {
                    files += 1
                    bytes += stamp.size
                }
            }
        } else if match.stamp.isRegular {
            files += 1
            bytes += match.stamp.size
        }
    }

    /// The slot and stamp of an entry the cache does not vouch for as is; nil when it is left out.
    private func scanEntry(_ dirfd: Int32, name: [UInt8], path: [UInt8], st: stat, stamp: StatStamp,
                           previous match: Previous?) throws -> (Slot, StatStamp)? {
        /// Unreadable now: kept as it was where there was one.
        func kept() -> (Slot, StatStamp)? {
            guard let match else { return nil }
            keep(match, path: path)
            return (.same(match.index), match.stamp)
        }
        if PosixFS.isDirectory(st) {
            guard UInt64(st.st_dev) == rootDevice else {
                report(path, "another filesystem is mounted here; not crossed (its mount point is kept as an empty directory)")
                var empty = base(name, .directory, st)
                let blob = DirectoryBlob.encode([])
                empty.subtree = ChunkID.of(blob)
                try sink.directory(path, empty.subtree!, blob)
                return (.new(empty), stamp)
            }
            let fd = PosixFS.openDirectory(at: dirfd, name)
            guard fd >= 0 else {
                report(path, "cannot open directory: \(String(cString: strerror(errno))); kept as it was")
                return kept()
            }
            defer { close(fd) }
            guard let entry = try scanDirectory(fd, name: name, path: path, st: st) else { return kept() }
            if let match, match.stamp == stamp, DirectoryBlob.subtree(match.record.blob, match.spans[match.index]) == entry.subtree {
                return (.same(match.index), stamp)
            }
            return (.new(entry), stamp)
        }
        if PosixFS.isSymlink(st) {
            guard let target = PosixFS.readlink(at: dirfd, name, size: Int(st.st_size)) else {
                report(path, "cannot read symlink: \(String(cString: strerror(errno)))")
                return kept()
            }
            var entry = base(name, .symlink, st)
            entry.target = target
            return (.new(entry), stamp)
        }
        if PosixFS.isFIFO(st) {
            return (.new(base(name, .fifo, st)), stamp)
        }
        guard PosixFS.isRegular(st) else {
            report(path, "a socket or device node; not replicated")
            return nil
        }
        let group: UInt64 = st.st_nlink > 1 ? stamp.inode : 0
        var entry: TreeEntry
        var remembered = stamp
        if group != 0, let seen = linksSeen[group], seen.stamp.sameData(stamp) {
            // Another name of a file met this scan: same data, no second read.
            entry = seen.entry
            entry.name = name
            try sink.file(path, entry, read: false)
        } else if let moved = try movedFile(stamp, samePath: match) {
            // Found by its inode: its directory was renamed, or it was moved here.
            entry = moved
            entry.name = name
            entry.linkGroup = group
            entry.mode = UInt32(st.st_mode) & 0o7777
            entry.uid = st.st_uid
            entry.gid = st.st_gid
            try sink.file(path, entry, read: false)
        } else {
            guard let read = try readFile(dirfd, name: name, path: path, hadPrevious: match != nil) else { return kept() }
            entry = read.entry
            entry.linkGroup = read.st.st_nlink > 1 ? UInt64(read.st.st_ino) : 0
            remembered = StatStamp(read.st)
            try sink.file(path, entry, read: true)
        }
        if entry.linkGroup != 0 { linksSeen[entry.linkGroup] = (entry, remembered) }
        files += 1
        bytes += entry.size
        progress?.add(files: 1, bytes: entry.size)
        return (.new(entry), remembered)
    }

    /// The last scan's entry of a file found by its inode elsewhere in the tree, with its data
    /// unchanged. Not looked for when the file at the same path had the same inode (it changed).
    private func movedFile(_ stamp: StatStamp, samePath match: Previous?) throws -> TreeEntry? {
        if let match, match.stamp.inode == stamp.inode { return nil }
        guard let (directory, index) = previousByInode[stamp.inode], let record = previous.directories[directory],
              record.stamps[index].sameData(stamp) else { return nil }
        // The spans of a directory whose files moved are parsed once, not once per file.
        let spans: [DirectoryBlob.Span]
        if let known = movedSpans[directory] {
            spans = known
        } else {
            guard let parsed = DirectoryBlob.spans(record.blob) else { return nil }
            movedSpans[directory] = parsed
            spans = parsed
        }
        return try DirectoryBlob.entry(record.blob, spans[index])
    }

    /// Reads and chunks a file; reads it again while it changes under the read; nil (reported)
    /// when it cannot be read or keeps changing.
    private func readFile(_ dirfd: Int32, name: [UInt8], path: [UInt8], hadPrevious: Bool) throws -> (entry: TreeEntry, st: stat)? {
        // O_NOATIME (Linux 0o1000000) keeps the scan from touching atimes; only the owner (or root)
        // may ask for it, so others open without.
        var fd = PosixFS.withCName(name) { openat(dirfd, $0, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | 0o1000000) }
        if fd < 0 && errno == EPERM { fd = PosixFS.withCName(name) { openat(dirfd, $0, O_RDONLY | O_NOFOLLOW | O_CLOEXEC) } }
        guard fd >= 0 else {
            report(path, "cannot open: \(String(cString: strerror(errno))); \(!hadPrevious ? "not replicated" : "the previous version is kept")")
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
                report(path, "\(String(cString: strerror(error.code))) while reading; \(!hadPrevious ? "not replicated" : "the previous version is kept")")
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
        report(path, "changed while being read \(readAttempts) times; \(!hadPrevious ? "not replicated this time" : "the previous version is kept")")
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
