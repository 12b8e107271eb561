import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A minimal HTTP/1.1 client for the admin socket (blocking; one request per connection).
public enum AdminClient {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// GETs `path` and returns the status code and body.
    public static func get(socketPath: String, path: String, timeoutSeconds: Int = 10) throws -> (status: Int, body: Data) {
        try request("GET", socketPath: socketPath, path: path, timeoutSeconds: timeoutSeconds)
    }

    /// POSTs to `path` (an action with no body) and returns the status code and body.
    public static func post(socketPath: String, path: String, timeoutSeconds: Int = 30) throws -> (status: Int, body: Data) {
        try request("POST", socketPath: socketPath, path: path, timeoutSeconds: timeoutSeconds)
    }

    private static func request(_ method: String, socketPath: String, path: String, timeoutSeconds: Int) throws -> (status: Int, body: Data) {
        let fd = try connect(socketPath: socketPath, timeoutSeconds: timeoutSeconds)
        defer { close(fd) }
        let request = "\(method) \(path) HTTP/1.1\r\nHost: ferry\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        let sent = request.withCString { send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
        guard sent == request.utf8.count else {
            throw Failure(description: "could not send to the admin socket \(socketPath): \(String(cString: strerror(errno)))")
        }
        var response = Data()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = recv(fd, &chunk, chunk.count, 0)
            if n < 0 {
                if errno == EINTR { continue }
                throw Failure(description: "reading from the admin socket \(socketPath) failed: \(String(cString: strerror(errno)))")
            }
            if n == 0 { break }
            response.append(contentsOf: chunk[0..<n])
        }
        guard let split = response.range(of: Data("\r\n\r\n".utf8)),
              let statusLine = String(data: response[..<split.lowerBound], encoding: .utf8)?.split(separator: "\r\n").first,
              let code = statusLine.split(separator: " ").dropFirst().first.flatMap({ Int($0) }) else {
            throw Failure(description: "the admin socket \(socketPath) sent something that is not HTTP")
        }
        return (code, Data(response[split.upperBound...]))
    }

    /// True when something accepts connections on the socket.
    public static func isAnswering(socketPath: String) -> Bool {
        guard let fd = try? connect(socketPath: socketPath, timeoutSeconds: 2) else { return false }
        close(fd)
        return true
    }

    private static func connect(socketPath: String, timeoutSeconds: Int) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket(): \(String(cString: strerror(errno)))") }
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(socketPath.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            close(fd)
            throw Failure(description: "admin socket path \(socketPath) is too long for a Unix socket (max 107 bytes)")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard rc == 0 else {
            let e = errno
            close(fd)
            throw Failure(description: "no ferry daemon answers on \(socketPath) (\(String(cString: strerror(e)))); is `ferry serve` running with this config?")
        }
        return fd
    }
}
