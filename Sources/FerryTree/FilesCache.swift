import FerryStore
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// What `lstat` said of an entry at the last scan. An entry whose stamp is unchanged is not read
/// again, and a directory all of whose entries are unchanged keeps its blob as it was (no entry is
/// decoded, encoded or hashed).
public struct StatStamp: Equatable, Sendable {
    public var size: UInt64
    public var inode: UInt64
    public var device: UInt64
    public var mtimeSeconds: Int64
    public var ctimeSeconds: Int64
    public var mtimeNanoseconds: UInt32
    public var ctimeNanoseconds: UInt32
    /// `st_mode` whole: the kind and the permission bits.
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32

    init(_ st: stat) {
        size = UInt64(st.st_size)
        inode = UInt64(st.st_ino)
        device = UInt64(st.st_dev)
        mtimeSeconds = Int64(st.st_mtim.tv_sec)
        ctimeSeconds = Int64(st.st_ctim.tv_sec)
        mtimeNanoseconds = UInt32(st.st_mtim.tv_nsec)
        ctimeNanoseconds = UInt32(st.st_ctim.tv_nsec)
        mode = UInt32(st.st_mode)
        uid = st.st_uid
        gid = st.st_gid
    }

    var isRegular: Bool { mode & UInt32(S_IFMT) == UInt32(S_IFREG) }

    /// The data is as it was: size, times and inode (a hard link's other name, or a file found by
    /// its inode after its directory was renamed).
    func sameData(_ other: StatStamp) -> Bool {
        size == other.size && inode == other.inode && device == other.device && mtimeSeconds == other.mtimeSeconds
            && mtimeNanoseconds == other.mtimeNanoseconds && ctimeSeconds == other.ctimeSeconds
            && ctimeNanoseconds == other.ctimeNanoseconds
    }

    static let encodedSize = 60

    func write(to buffer: inout ByteBuffer) {
        buffer.writeMultipleIntegers(size, inode, device, mtimeSeconds, ctimeSeconds)
        buffer.writeMultipleIntegers(mtimeNanoseconds, ctimeNanoseconds, mode, uid, gid)
    }

    init?(from buffer: inout ByteBuffer) {
        guard let (size, inode, device, mtime, ctime) = buffer.readMultipleIntegers(as: (UInt64, UInt64, UInt64, Int64, Int64).self),
              let (mtimeNanos, ctimeNanos, mode, uid, gid) = buffer.readMultipleIntegers(as: (UInt32, UInt32, UInt32, UInt32, UInt32).self)
        else { return nil }
        self.size = size; self.inode = inode; self.device = device
        mtimeSeconds = mtime; ctimeSeconds = ctime; mtimeNanoseconds = mtimeNanos; ctimeNanoseconds = ctimeNanos
        self.mode = mode; self.uid = uid; self.gid = gid
    }
}

/// The files cache's record of one directory: its blob as it was sent (the entries, with every
/// file's chunk list) and, per entry in the blob's order, its stamp.
public struct CachedDirectory: Equatable, Sendable {
    public var id: ChunkID
    public var blob: ByteBuffer
    public var stamps: [StatStamp]
    /// The directory's own device (the source's, for the root: a change means it was unmounted).
    public var device: UInt64

    public static func == (x: CachedDirectory, y: CachedDirectory) -> Bool {
        x.id == y.id && x.device == y.device && x.stamps == y.stamps
    }

    /// For the catalog: ID, device u64, stamps u32 and each stamp, then the blob.
    func encoded() -> [UInt8] {
        var buffer = ByteBuffer()
        buffer.reserveCapacity(48 + stamps.count * StatStamp.encodedSize + blob.readableBytes)
        id.write(to: &buffer)
        buffer.writeInteger(device)
        buffer.writeInteger(UInt32(stamps.count))
        for stamp in stamps { stamp.write(to: &buffer) }
        var blob = blob
        buffer.writeBuffer(&blob)
        return Array(buffer.readableBytesView)
    }

    init(id: ChunkID, blob: ByteBuffer, stamps: [StatStamp], device: UInt64) {
        self.id = id
        self.blob = blob
        self.stamps = stamps
        self.device = device
    }

    init?(encoded bytes: [UInt8]) {
        var buffer = ByteBuffer(bytes: bytes)
        guard let id = ChunkID.read(from: &buffer), let device = buffer.readInteger(as: UInt64.self),
              let count = buffer.readInteger(as: UInt32.self), Int(count) * StatStamp.encodedSize <= buffer.readableBytes
        else { return nil }
        var stamps: [StatStamp] = []
        stamps.reserveCapacity(Int(count))
        for _ in 0..<count {
            guard let stamp = StatStamp(from: &buffer) else { return nil }
            stamps.append(stamp)
        }
        // A record whose blob does not match its ID or its stamps is dropped: the directory is
        // then read as new.
        guard ChunkID.of(buffer) == id, DirectoryBlob.spans(buffer)?.count == stamps.count else { return nil }
        self.init(id: id, blob: buffer, stamps: stamps, device: device)
    }

    /// The entries with their stamps (decoded: for the rare paths, never for an unchanged scan).
    func entries() throws -> [(TreeEntry, StatStamp)] {
        Array(zip(try DirectoryBlob.decode(blob), stamps))
    }
}

/// The files cache of a tree's source (DESIGN §5.2): one record per directory, keyed by its path
/// in the tree ("" is the root). A file whose stamp is unchanged is never read again; a directory
/// that cannot be read keeps its previous records, so it does not vanish from the snapshot.
public struct FilesCache: Equatable, Sendable {
    public var directories: [[UInt8]: CachedDirectory]

    public init(directories: [[UInt8]: CachedDirectory] = [:]) { self.directories = directories }

    /// A tree's files cache as the catalog keeps it; records that do not check out are left out.
    public static func load(_ tree: String, from catalog: Catalog) throws -> FilesCache {
        var cache = FilesCache()
        for (path, record) in try catalog.treeDirectories(tree: tree) {
            if let directory = CachedDirectory(encoded: record) { cache.directories[path] = directory }
        }
        return cache
    }

    /// The rows to write and delete to turn `old` into this cache in the catalog.
    public func changes(from old: FilesCache) -> (upsert: [(path: [UInt8], record: [UInt8])], delete: [[UInt8]]) {
        var upsert: [(path: [UInt8], record: [UInt8])] = []
        for (path, directory) in directories where old.directories[path] != directory {
            upsert.append((path, directory.encoded()))
        }
        let delete = old.directories.keys.filter { directories[$0] == nil }
        return (upsert, delete)
    }

    /// Every file with its path, entry and stamp (for seeding a store from a former primary's files).
    public func forEachFile(_ body: ([UInt8], TreeEntry, StatStamp) throws -> Void) throws {
        for (path, directory) in directories {
            for (entry, stamp) in try directory.entries() where entry.kind == .file {
                try body(TreePath.join(path, entry.name), entry, stamp)
            }
        }
    }
}
