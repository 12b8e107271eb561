#if canImport(Glibc)
import Glibc
#endif
import NIOConcurrencyHelpers

/// Ports this process handed out: two daemons of one test (or the quickstart's two sites) must
/// never be given the same one, which a check that only binds and closes cannot see.
private let handedOut = NIOLockedValueBox(Set<Int>())

/// A TCP port on 127.0.0.1 that was free a moment ago (for the quickstart and tests, which start
/// daemons that must know each other's ports before they run).
///
/// Chosen below the kernel's ephemeral range (`ip_local_port_range`), so that no outgoing
/// connection (a site dialing its peer, say) is given it as its source port between this check
/// and the daemon's bind: a port handed out by `bind(0)` comes from that range, and CI saw one
/// taken that way ("Address already in use").
public func freeLoopbackPort() throws -> Int {
    let low = ephemeralRangeStart()
    if low > 12_000 {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<64 {
            let port = Int.random(in: 10_000..<low, using: &rng)
            guard handedOut.withLockedValue({ $0.insert(port).inserted }) else { continue }
            if (try? bindLoopback(port: port)) != nil { return port }
        }
    }
    return try bindLoopback(port: 0)
}

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
private func ephemeralRangeStart() -> Int {
    guard let text = try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8),
          let first = text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).first, let n = Int(first) else { return 32768 }
    return n
}

/// Binds a TCP socket to 127.0.0.1:`port` (0: any), closes it, and returns the port it got.
private func bindLoopback(port: Int) throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw SiteError("cannot open a socket: \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = UInt16(port).bigEndian
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
    }
    guard ok else { throw SiteError("cannot find a free port on 127.0.0.1: \(String(cString: strerror(errno)))") }
    return Int(UInt16(bigEndian: addr.sin_port))
}
