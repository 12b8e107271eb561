import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A failed system call on a path of a tree: what was done, to which path (shown with non-UTF-8
/// bytes escaped) and the errno.
public struct TreeFSError: Error, CustomStringConvertible, Equatable {
    public var operation: String
    public var path: [UInt8]
    public var code: Int32

    public init(_ operation: String, _ path: [UInt8], _ code: Int32 = errno) {
        self.operation = operation
        self.path = path
        self.code = code
    }

    public var description: String {
        "\(operation) \(TreePath.display(path)): \(String(cString: strerror(code)))"
    }
}

/// Paths inside a tree: bytes, components joined by `/`, relative to the tree's root ("" is the
/// root).
public enum TreePath {
    public static func join(_ parent: [UInt8], _ name: [UInt8]) -> [UInt8] {
        parent.isEmpty ? name : parent + [0x2F] + name
    }

    /// For people: valid UTF-8 as is, other bytes and control characters as `\xNN`.
    public static func display(_ path: [UInt8]) -> String {
        if let s = String(validating: path, as: UTF8.self), !s.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) {
            return s.isEmpty ? "." : s
        }
        var out = ""
        var i = 0
        while i < path.count {
            let byte = path[i]
            if byte >= 0x20 && byte < 0x7F {
                out.append(Character(UnicodeScalar(byte)))
                i += 1
                continue
            }
            // A valid multi-byte UTF-8 sequence stays readable.
            let length = byte >= 0xF0 ? 4 : byte >= 0xE0 ? 3 : byte >= 0xC0 ? 2 : 1
            if length > 1, i + length <= path.count, let s = String(validating: path[i..<(i + length)], as: UTF8.self) {
                out += s
                i += length
                continue
            }
            out += "\\x" + (byte < 16 ? "0" : "") + String(byte, radix: 16)
            i += 1
        }
        return out
    }

    public static func components(_ path: [UInt8]) -> [[UInt8]] {
        path.split(separator: 0x2F, omittingEmptySubsequences: true).map(Array.init)
    }
}

/// Thin wrappers over the `*at()` calls, so trees deeper than PATH_MAX are walked and written
/// relative to directory descriptors, with names as bytes.
enum PosixFS {
    static func withCName<R>(_ name: [UInt8], _ body: (UnsafePointer<CChar>) throws -> R) rethrows -> R {
        // On the stack for the usual lengths: the scanner calls this for every entry.
        try withUnsafeTemporaryAllocation(of: CChar.self, capacity: name.count + 1) { z in
            name.withUnsafeBytes { UnsafeMutableRawBufferPointer(z).copyMemory(from: $0) }
            z[name.count] = 0
            return try body(UnsafePointer(z.baseAddress!))
        }
    }

    /// Names in manifest order: by bytes (memcmp), a prefix first.
    static func precedes(_ x: [UInt8], _ y: [UInt8]) -> Bool {
        x.withUnsafeBytes { a in
            y.withUnsafeBytes { b in
                let n = min(a.count, b.count)
                let order = n == 0 ? 0 : memcmp(a.baseAddress!, b.baseAddress!, n)
                return order != 0 ? order < 0 : a.count < b.count
            }
        }
    }

    static func fnmatch(_ pattern: [UInt8], _ subject: [UInt8]) -> Bool {
        withCName(pattern) { p in withCName(subject) { s in Glibc.fnmatch(p, s, 0) == 0 } }
    }

    static func withCPath<R>(_ path: String, _ body: (UnsafePointer<CChar>) throws -> R) rethrows -> R {
        try withCName(Array(path.utf8), body)
    }

    /// The process's umask, from /proc/self/status (reading it with umask(2) would change it
    /// for a moment under other threads); all bits when it cannot be read.
    static let umask: UInt32 = {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Umask:") }),
              let value = UInt32(line.dropFirst(6).trimmingCharacters(in: .whitespaces), radix: 8) else { return 0o777 }
        return value
    }()

    /// Opens a directory (never through a symlink).
    static func openDirectory(at dirfd: Int32, _ name: [UInt8]) -> Int32 {
        withCName(name) { openat(dirfd, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
    }

    static func openDirectory(_ path: String) -> Int32 {
        withCPath(path) { open($0, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
    }

    static func lstat(at dirfd: Int32, _ name: [UInt8]) -> stat? {
        var st = stat()
        let rc = withCName(name) { fstatat(dirfd, $0, &st, AT_SYMLINK_NOFOLLOW) }
        return rc == 0 ? st : nil
    }

    static func fstat(_ fd: Int32) -> stat? {
        var st = stat()
        return Glibc.fstat(fd, &st) == 0 ? st : nil
    }

    /// The names in a directory, without `.` and `..`; nil with errno set on failure.
    static func names(in dirfd: Int32) -> [[UInt8]]? {
        let copy = dup(dirfd)
        guard copy >= 0, let dir = fdopendir(copy) else {
            let saved = errno
            if copy >= 0 { close(copy) }
            errno = saved
            return nil
        }
        defer { closedir(dir) }
        rewinddir(dir)
        var out: [[UInt8]] = []
        errno = 0
        while let entry = readdir(dir) {
            let name: [UInt8] = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                let bytes = raw.bindMemory(to: UInt8.self)
                let n = bytes.firstIndex(of: 0) ?? bytes.count
                return Array(bytes[0..<n])
            }
            if name == [0x2E] || name == [0x2E, 0x2E] { continue }
            out.append(name)
        }
        return errno == 0 ? out : nil
    }

    /// A symlink's target; `size` is the length its lstat gave, and a target that grew since is
    /// read whole all the same.
    static func readlink(at dirfd: Int32, _ name: [UInt8], size: Int) -> [UInt8]? {
        var capacity = max(size, 255) + 1
        while true {
            var buffer = [UInt8](repeating: 0, count: capacity)
            let n = withCName(name) { cname in
                buffer.withUnsafeMutableBufferPointer { readlinkat(dirfd, cname, UnsafeMutableRawPointer($0.baseAddress!).assumingMemoryBound(to: CChar.self), $0.count) }
            }
            guard n >= 0 else { return nil }
            if n < capacity || capacity > 65536 { return Array(buffer[0..<n]) }
            capacity *= 4
        }
    }

    static func time(_ ts: timespec) -> FileTime {
        FileTime(seconds: Int64(ts.tv_sec), nanoseconds: UInt32(ts.tv_nsec))
    }

    static func isDirectory(_ st: stat) -> Bool { st.st_mode & S_IFMT == S_IFDIR }
    static func isRegular(_ st: stat) -> Bool { st.st_mode & S_IFMT == S_IFREG }
    static func isSymlink(_ st: stat) -> Bool { st.st_mode & S_IFMT == S_IFLNK }
    static func isFIFO(_ st: stat) -> Bool { st.st_mode & S_IFMT == S_IFIFO }
}
