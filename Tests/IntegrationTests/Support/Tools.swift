import FerrySite
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The package root, found from this file's path (Tests/IntegrationTests/Support/Tools.swift).
let packageRoot: String = {
    var url = URL(fileURLWithPath: #filePath)
    for _ in 0..<4 { url.deleteLastPathComponent() }
    return url.path
}()

/// The `ferry` binary the tests run: FERRY_BIN, or the debug build (`swift build` makes it;
/// `make test` builds it before testing).
func ferryBinary() throws -> String {
    if let env = ProcessInfo.processInfo.environment["FERRY_BIN"] { return env }
    let path = packageRoot + "/.build/debug/ferry"
    guard FileManager.default.isExecutableFile(atPath: path) else {
        Issue.record("no ferry binary at \(path): run `swift build` (or `make test`, which builds it) first")
        throw TestFailure("ferry binary missing")
    }
    return path
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// Fails the test with the install line when a program the test needs is missing (never skips).
func requireTool(_ name: String, package: String) throws -> String {
    for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
        let path = "\(dir)/\(name)"
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    Issue.record("\(name) is not installed; install it with: apt-get install -y \(package)  (make test does this)")
    throw TestFailure("\(name) missing")
}

/// The result of running a program to completion.
struct RunResult {
    var status: Int32
    var stdout: String
    var stderr: String
    var output: String { stdout + stderr }
}

/// Runs a program and waits for it, killing it (SIGKILL) after `timeout`.
@discardableResult
func run(_ program: String, _ arguments: [String], timeout: Duration = .seconds(120),
         environment: [String: String]? = nil, expect status: Int32? = 0,
         sourceLocation: SourceLocation = #_sourceLocation) throws -> RunResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: program)
    p.arguments = arguments
    if let environment { p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
    let outFile = tempFile("out"), errFile = tempFile("err")
    defer { unlink(outFile); unlink(errFile) }
    p.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: outFile))
    p.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errFile))
    p.standardInput = FileHandle.nullDevice
    try p.run()
    let deadline = ContinuousClock.now + timeout
    while p.isRunning && ContinuousClock.now < deadline { usleep(10_000) }
    if p.isRunning {
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        Issue.record("\(program) \(arguments.joined(separator: " ")) did not finish within \(timeout); killed", sourceLocation: sourceLocation)
    }
    p.waitUntilExit()
    let result = RunResult(status: p.terminationStatus,
                           stdout: (try? String(contentsOfFile: outFile, encoding: .utf8)) ?? "",
                           stderr: (try? String(contentsOfFile: errFile, encoding: .utf8)) ?? "")
    if let status, result.status != status {
        Issue.record("\((program as NSString).lastPathComponent) \(arguments.joined(separator: " ")) exited \(result.status), expected \(status)\nstdout: \(result.stdout)\nstderr: \(result.stderr)", sourceLocation: sourceLocation)
        throw TestFailure("unexpected exit status \(result.status)")
    }
    return result
}

func tempFile(_ tag: String) -> String {
    var template = Array("/tmp/ferry-test-\(tag)-XXXXXX".utf8CString)
    let fd = mkstemp(&template)
    close(fd)
    return template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
}

/// A temporary directory removed when the value is released.
final class TempDir {
    let path: String
    init() {
        var template = Array("/tmp/ferry-it-XXXXXX".utf8CString)
        path = mkdtemp(&template).map { String(decoding: UnsafeRawBufferPointer(start: $0, count: strlen($0)), as: UTF8.self) } ?? "/tmp/ferry-it-fallback-\(getpid())"
    }
    /// Kept (for logs) when FERRY_KEEP_TEST_DIRS is set.
    deinit {
        if ProcessInfo.processInfo.environment["FERRY_KEEP_TEST_DIRS"] == nil { try? FileManager.default.removeItem(atPath: path) }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
func freePort() -> Int {
    (try? freeLoopbackPort()) ?? 0
}

/// Polls `condition` until it is true or `timeout` passes.
func eventually(_ timeout: Duration = .seconds(15), _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try condition() { return true }
        usleep(100_000)
    }
    return try condition()
}
