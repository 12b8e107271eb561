import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A temporary directory removed when the test is done with it.
final class TemporaryDirectory {
    let path: String

    init() {
        var template = Array("/tmp/ferry-store-XXXXXX".utf8CString)
        path = String(cString: mkdtemp(&template)!)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    func file(_ name: String) -> String { path + "/" + name }
}

/// What a crash or a bad disk leaves: bytes overwritten, or the file cut short.
enum Damage {
    static func overwrite(_ path: String, at offset: UInt64, with bytes: [UInt8]) {
        let fd = open(path, O_WRONLY)
        precondition(fd >= 0, "open \(path)")
        defer { close(fd) }
        let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
        precondition(n == bytes.count)
    }

    /// Flips every bit of the byte at `offset`.
    static func flip(_ path: String, at offset: UInt64) {
        let fd = open(path, O_RDWR)
        precondition(fd >= 0, "open \(path)")
        defer { close(fd) }
        var byte: UInt8 = 0
        precondition(pread(fd, &byte, 1, off_t(offset)) == 1)
        byte = ~byte
        precondition(pwrite(fd, &byte, 1, off_t(offset)) == 1)
    }

    static func cut(_ path: String, to size: UInt64) {
        precondition(truncate(path, off_t(size)) == 0)
    }

    static func size(_ path: String) -> UInt64 {
        var st = stat()
        precondition(stat(path, &st) == 0)
        return UInt64(st.st_size)
    }
}
