import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// Keeps every log line a test's loggers write, so a test can assert a line was logged.
final class LogCapture: Sendable {
    private let lines = Mutex<[String]>([])

    func append(_ line: String) { lines.withLock { $0.append(line) } }

    var all: [String] { lines.withLock { $0 } }

    func contains(_ parts: String...) -> Bool {
        all.contains { line in parts.allSatisfy { line.contains($0) } }
    }

    /// A logger (at debug level) whose lines go here, prefixed with `label`; also printed when
    /// FERRY_TEST_LOG is set in the environment.
    func logger(_ label: String) -> Logger {
        var logger = Logger(label: label) { _ in CapturingLogHandler(capture: self, label: label) }
        logger.logLevel = .debug
        return logger
    }
}

struct CapturingLogHandler: LogHandler {
    let capture: LogCapture
    let label: String
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .debug

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let text = "\(label) \(event.level): \(event.message)"
        capture.append(text)
        if ProcessInfo.processInfo.environment["FERRY_TEST_LOG"] != nil { print(text) }
    }
}

/// A TCP port that was free a moment ago: bound to port 0 on 127.0.0.1, then released.
/// For a site whose port its peer must know before the site starts.
func reservePort(group: any EventLoopGroup) async throws -> Int {
    let channel = try await ServerBootstrap(group: group)
        .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
        .bind(host: "127.0.0.1", port: 0).get()
    let port = channel.localAddress!.port!
    try await channel.close()
    return port
}

/// Polls `condition` every 100 ms until it holds or `timeout` passes; returns whether it held.
func eventually(_ timeout: Duration, _ condition: () -> Bool) async -> Bool {
    let clock = ContinuousClock()
    let deadline = clock.now + timeout
    while clock.now < deadline {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(100))
    }
    return condition()
}

/// Values collected from callbacks on other threads.
final class Collected<Element: Sendable>: Sendable {
    private let items = Mutex<[Element]>([])

    func append(_ item: Element) { items.withLock { $0.append(item) } }

    var all: [Element] { items.withLock { $0 } }
}
