import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A fault-injecting TCP proxy in the test process, for the faults the kernel's missing `netem`
/// cannot make (DESIGN §7): it listens on 127.0.0.1 (an ephemeral port) and forwards every
/// connection to `127.0.0.1:targetPort`, both directions, and can
/// - ``delay(milliseconds:)``: hold every chunk read for that long before forwarding it (added
///   latency, both directions; order is kept);
/// - ``stall()`` / ``resume()``: stop forwarding, keeping everything read in memory (the senders
///   go on sending into it, as into a link that has gone quiet), then forward it all;
/// - ``cut()`` / ``heal()``: close every current connection (both ends see EOF at once) and refuse
///   new ones (accepted and closed at once) until healed.
///
/// Plain sockets and threads: one accept thread, and per connection a reader and a writer thread
/// for each direction. Every chunk read is counted in ``bytesToTarget`` / ``bytesFromTarget`` once
/// it is forwarded.
///
/// `@unchecked Sendable`: every mutable field is guarded by `condition` (an `NSCondition`, which
/// the writer threads also wait on); the file descriptors are immutable after creation.
final class FaultProxy: @unchecked Sendable {
    /// The port it listens on.
    let port: Int
    let targetPort: Int
    private let listenFD: Int32
    private let condition = NSCondition()

    private var delayNanos: Int64 = 0
    private var stalled = false
    private var isCut = false
    private var stopped = false
    private var connections: [Int: Connection] = [:]
    private var nextConnection = 0
    private var forwarded: [Direction: UInt64] = [.toTarget: 0, .fromTarget: 0]
    private var accepted = 0
    private var refused = 0
    private var acceptThreadDone = false

    private enum Direction: Hashable { case toTarget, fromTarget }

    /// One proxied connection. `@unchecked Sendable`: its four threads share it, and every mutable
    /// field is read and written only under the proxy's `condition`.
    private final class Connection: @unchecked Sendable {
        let client: Int32
        let target: Int32
        var queues: [Direction: [(bytes: [UInt8], due: Int64)]] = [.toTarget: [], .fromTarget: []]
        var eof: [Direction: Bool] = [.toTarget: false, .fromTarget: false]
        /// Aborted (cut, stop, or a socket error): writers drop what is queued.
        var aborted = false
        var threadsLeft = 4
        init(client: Int32, target: Int32) {
            self.client = client
            self.target = target
        }
        func source(_ d: Direction) -> Int32 { d == .toTarget ? client : target }
        func sink(_ d: Direction) -> Int32 { d == .toTarget ? target : client }
    }

    init(targetPort: Int) throws {
        self.targetPort = targetPort
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestFailure("proxy: socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = Self.loopback(port: 0)
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, len) == 0 && listen(fd, 64) == 0 && getsockname(fd, $0, &len) == 0
            }
        }
        guard ok else {
            let why = String(cString: strerror(errno))
            close(fd)
            throw TestFailure("proxy: cannot listen on 127.0.0.1: \(why)")
        }
        listenFD = fd
        port = Int(UInt16(bigEndian: addr.sin_port))
        let thread = Thread { [self] in acceptLoop() }
        thread.name = "proxy-accept-\(port)"
        thread.start()
    }

    deinit {
        // stop() is the caller's job; this only makes a forgotten one visible in a test log.
        if !stopped { print("FaultProxy on port \(port) released without stop()") }
    }

    // MARK: - Controls

    /// Adds `milliseconds` of latency to every chunk read from now on, both directions (0 removes it).
    func delay(milliseconds: Int) {
        locked { delayNanos = Int64(milliseconds) * 1_000_000 }
    }

    /// Stops forwarding; what arrives meanwhile is kept, in order.
    func stall() {
        locked { stalled = true }
    }

    /// Forwards again, starting with what was kept while stalled.
    func resume() {
        locked { stalled = false }
    }

    /// Closes every current connection and refuses new ones until ``heal()``.
    func cut() {
        locked {
            isCut = true
            for c in connections.values { abort(c) }
        }
    }

    /// Accepts and forwards new connections again.
    func heal() {
        locked { isCut = false }
    }

    /// Closes the listener and every connection, and waits for every thread to end.
    func stop() {
        let alreadyStopped = locked { () -> Bool in
            defer { stopped = true }
            if stopped { return true }
            for c in connections.values { abort(c) }
            return false
        }
        guard !alreadyStopped else { return }
        shutdown(listenFD, Int32(SHUT_RDWR))
        condition.lock()
        let deadline = Date().addingTimeInterval(10)
        while (!acceptThreadDone || !connections.isEmpty) && Date() < deadline {
            _ = condition.wait(until: Date().addingTimeInterval(0.05))
        }
        condition.unlock()
        close(listenFD)
    }

    /// Bytes forwarded to the target so far (client → target).
    var bytesToTarget: UInt64 { locked { forwarded[.toTarget]! } }
    /// Bytes forwarded back to the clients so far (target → client).
    var bytesFromTarget: UInt64 { locked { forwarded[.fromTarget]! } }
    /// Bytes read and not yet forwarded (kept while stalled or delayed).
    var bytesHeld: UInt64 {
        locked { connections.values.reduce(0) { $0 + $1.queues.values.reduce(0) { $0 + $1.reduce(0) { $0 + UInt64($1.bytes.count) } } } }
    }
    /// Connections accepted and forwarded, and those refused while cut.
    var connectionsAccepted: Int { locked { accepted } }
    var connectionsRefused: Int { locked { refused } }
    /// Connections open right now.
    var liveConnections: Int { locked { connections.count } }

    // MARK: - Threads

    private func locked<T>(_ body: () throws -> T) rethrows -> T {
        condition.lock()
        defer { condition.broadcast(); condition.unlock() }
        return try body()
    }

    /// Under the lock: both sockets are shut down, so the readers see EOF and the peers see the
    /// connection close; the writers drop what is queued.
    private func abort(_ c: Connection) {
        guard !c.aborted else { return }
        c.aborted = true
        shutdown(c.client, Int32(SHUT_RDWR))
        shutdown(c.target, Int32(SHUT_RDWR))
    }

    private func acceptLoop() {
        while true {
            let client = accept(listenFD, nil, nil)
            if client < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                break
            }
            let refuse = locked { () -> Bool in
                if stopped { return true }
                if isCut { refused += 1; return true }
                return false
            }
            if refuse {
                close(client)
                if locked({ stopped }) { break }
                continue
            }
            let target = Self.connect(port: targetPort)
            guard target >= 0 else {
                // The target is down: the client sees its connection close, as it would see a refusal.
                close(client)
                continue
            }
            for fd in [client, target] {
                var one: Int32 = 1
                setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            }
            let c = Connection(client: client, target: target)
            let id = locked { () -> Int in
                defer { nextConnection += 1 }
                accepted += 1
                connections[nextConnection] = c
                if isCut || stopped { abort(c) }
                return nextConnection
            }
            for d in [Direction.toTarget, .fromTarget] {
                Thread { [self] in readLoop(c, id: id, d) }.start()
                Thread { [self] in writeLoop(c, id: id, d) }.start()
            }
        }
        locked { acceptThreadDone = true }
    }

    private func readLoop(_ c: Connection, id: Int, _ d: Direction) {
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(c.source(d), $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            let ok = locked { () -> Bool in
                if n <= 0 {
                    c.eof[d] = true
                    if n < 0 { abort(c) }   // a reset: the whole connection goes
                    return false
                }
                c.queues[d]!.append((Array(buffer[0..<n]), Self.nowNanos() + delayNanos))
                return true
            }
            if !ok { break }
        }
        finished(c, id: id)
    }

    private func writeLoop(_ c: Connection, id: Int, _ d: Direction) {
        condition.lock()
        while true {
            if c.aborted { break }
            guard let head = c.queues[d]!.first else {
                if c.eof[d]! {
                    // The source finished cleanly: pass the half-close on.
                    shutdown(c.sink(d), Int32(SHUT_WR))
                    break
                }
                condition.wait()
                continue
            }
            if stalled {
                condition.wait()
                continue
            }
            let wait = head.due - Self.nowNanos()
            if wait > 0 {
                _ = condition.wait(until: Date().addingTimeInterval(Double(wait) / 1e9))
                continue
            }
            c.queues[d]!.removeFirst()
            condition.unlock()
            let ok = Self.writeAll(c.sink(d), head.bytes)
            condition.lock()
            if !ok {
                abort(c)
                break
            }
            forwarded[d]! += UInt64(head.bytes.count)
        }
        condition.broadcast()
        condition.unlock()
        finished(c, id: id)
    }

    private func finished(_ c: Connection, id: Int) {
        let last = locked { () -> Bool in
            c.threadsLeft -= 1
            guard c.threadsLeft == 0 else { return false }
            connections[id] = nil
            return true
        }
        if last {
            close(c.client)
            close(c.target)
        }
    }

    // MARK: - Sockets

    private static func loopback(port: Int) -> sockaddr_in {
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(port).bigEndian
        return addr
    }

    private static func connect(port: Int) -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return -1 }
        var addr = loopback(port: port)
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
        if !ok { close(fd); return -1 }
        return fd
    }

    private static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                return false
            }
            offset += n
        }
        return true
    }

    private static func nowNanos() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }
}

/// Two proxies, one in front of each site's replication port, so that whichever site dials, the
/// link goes through a proxy and every fault applies to it. Give each site the *other* proxy's
/// port as its peer's address.
final class ProxiedLink: Sendable {
    /// In front of `east` (west dials it) and in front of `west` (east dials it).
    let toEast: FaultProxy
    let toWest: FaultProxy

    init(eastPort: Int, westPort: Int) throws {
        toEast = try FaultProxy(targetPort: eastPort)
        toWest = try FaultProxy(targetPort: westPort)
    }

    private var both: [FaultProxy] { [toEast, toWest] }
    func delay(milliseconds: Int) { both.forEach { $0.delay(milliseconds: milliseconds) } }
    func stall() { both.forEach { $0.stall() } }
    func resume() { both.forEach { $0.resume() } }
    func cut() { both.forEach { $0.cut() } }
    func heal() { both.forEach { $0.heal() } }
    func stop() { both.forEach { $0.stop() } }
    var bytesForwarded: UInt64 { both.reduce(0) { $0 + $1.bytesToTarget + $1.bytesFromTarget } }
    var bytesHeld: UInt64 { both.reduce(0) { $0 + $1.bytesHeld } }
    var liveConnections: Int { both.reduce(0) { $0 + $1.liveConnections } }
}
