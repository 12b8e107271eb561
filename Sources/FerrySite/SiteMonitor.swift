import Foundation

/// Something the site starts once its listeners are up and stops first when it shuts down: the
/// metrics listener and status page (FerryMonitor) plug in here, so FerrySite needs none of
/// their dependencies.
public protocol SiteMonitor: Sendable {
    /// Starts serving; returns the URL it serves at (`site.metrics` in status). Throws when it
    /// cannot (the port is taken, the token file is unreadable): the site then does not start.
    func start(site: Site) async throws -> String
    func stop() async
}

/// sd_notify(3) without libsystemd: one datagram to `$NOTIFY_SOCKET` (a path, or an abstract
/// socket when it starts with `@`). Does nothing when the variable is unset, as outside systemd.
public enum SystemdNotify {
    @discardableResult
    public static func send(_ message: String, environment: [String: String] = ProcessInfo.processInfo.environment) -> Bool {
        guard let path = environment["NOTIFY_SOCKET"], !path.isEmpty else { return false }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(path.utf8)
        if bytes.first == UInt8(ascii: "@") { bytes[0] = 0 }
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + (bytes.first == 0 ? 0 : 1))
        let data = Array(message.utf8)
        let sent = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                sendto(fd, data, data.count, 0, sa, length)
            }
        }
        return sent == data.count
    }
}
