import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Path arithmetic and file reading for configuration files. Lexical only: symbolic links are
/// not followed, so a path means what the operator wrote.
enum ConfigPath {
    /// Why a configuration file could not be read; `message` says what to do.
    struct ReadError: Error {
        var message: String
    }

    /// `path` made absolute against the current directory, with `.`, `..` and repeated slashes removed.
    static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return normalize(path) }
        return normalize(join(FileManager.default.currentDirectoryPath, path))
    }

    /// `path` made absolute against `directory` (itself absolute).
    static func resolve(_ path: String, against directory: String) -> String {
        path.hasPrefix("/") ? normalize(path) : normalize(join(directory, path))
    }

    /// The directory part of an absolute path: `/etc/ferry/east.yaml` → `/etc/ferry`.
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    static func join(_ directory: String, _ name: String) -> String {
        directory.hasSuffix("/") ? directory + name : directory + "/" + name
    }

    static func normalize(_ path: String) -> String {
        var parts: [Substring] = []
        for part in path.split(separator: "/", omittingEmptySubsequences: true) {
            switch part {
            case ".": continue
            case "..": if !parts.isEmpty { parts.removeLast() }
            default: parts.append(part)
            }
        }
        return "/" + parts.joined(separator: "/")
    }

    /// The longest path a Unix socket can have on this system (`sun_path` less its NUL).
    static let maxSocketPathBytes: Int = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1

    /// Reads a whole file as UTF-8 text.
    static func readText(_ path: String) throws(ReadError) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let code = errno
            switch code {
            case ENOENT:
                throw ReadError(message: "no such file; create it (docs/configuration.md has an example, `ferry quickstart` writes one) or give the right path")
            case EACCES:
                throw ReadError(message: "permission denied; run as a user that can read it, or fix its permissions")
            default:
                throw ReadError(message: "cannot open: \(describe(code))")
            }
        }
        defer { close(fd) }
        var info = stat()
        if fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR {
            throw ReadError(message: "is a directory; give the path of the site's YAML file")
        }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                let code = errno
                if code == EINTR { continue }
                throw ReadError(message: "cannot read: \(describe(code))")
            }
            if n == 0 { break }
            bytes.append(contentsOf: chunk[0..<n])
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw ReadError(message: "is not UTF-8 text; a configuration file is YAML in UTF-8")
        }
        return text
    }

    private static func describe(_ code: Int32) -> String {
        String(cString: strerror(code))
    }
}
