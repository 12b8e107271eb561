#if canImport(Glibc)
import Glibc
#endif

/// An I/O failure on a file the store owns: which operation, on which file, and the OS error.
public struct StoreError: Error, CustomStringConvertible, Sendable {
    public var operation: String
    public var path: String
    /// The errno value, when the failure came from a system call.
    public var errno: Int32?
    public var detail: String?

    public init(_ operation: String, path: String, errno: Int32? = nil, detail: String? = nil) {
        self.operation = operation
        self.path = path
        self.errno = errno
        self.detail = detail
    }

    public var description: String {
        var s = "\(operation) \(path) failed"
        if let e = errno { s += ": \(String(cString: strerror(e))) (errno \(e))" }
        if let d = detail { s += ": \(d)" }
        return s
    }
}
