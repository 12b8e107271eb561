import FerrySite
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// FLUSH is a barrier (P1): its reply must not leave the primary before the data is durable on
/// the primary and on a sync replica. `kill -9` cannot show a missing fdatasync (the page cache
/// survives it), so this watches the system calls: `strace` on both daemons, then for every
/// FLUSH the primary answered, an fdatasync of the primary's image must have started after the
/// request arrived and finished before the reply was written, and the replica must have finished
/// an fdatasync of its image in between.
@Suite(.serialized)
struct FlushOrderTests {
    struct Call {
        var line: Int
        var time: Double
        var thread: String
        var text: String
    }

    /// The fd number of `path` in process `pid`.
    func fd(of path: String, in pid: Int32) -> Int? {
        let dir = "/proc/\(pid)/fd"
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] {
            if (try? FileManager.default.destinationOfSymbolicLink(atPath: "\(dir)/\(entry)")) == path { return Int(entry) }
        }
        return nil
    }

    func parse(_ path: String) -> [Call] {
        let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        var calls: [Call] = []
        for (n, line) in text.split(separator: "\n").enumerated() {
            let parts = line.split(separator: " ", maxSplits: 2)
            guard parts.count == 3 else { continue }
            let clock = parts[1].split(separator: ":")
            guard clock.count == 3, let h = Double(clock[0]), let m = Double(clock[1]), let s = Double(clock[2]) else { continue }
            calls.append(Call(line: n, time: h * 3600 + m * 60 + s, thread: String(parts[0]), text: String(parts[2])))
        }
        return calls
    }

    /// (start, end) of each fdatasync of `fd`: end is the line that shows it returned.
    func fdatasyncs(_ calls: [Call], fd: Int) -> [(start: Call, end: Call)] {
        var open: [String: Call] = [:]
        var done: [(Call, Call)] = []
        for call in calls {
            if call.text.hasPrefix("fdatasync(\(fd))") && call.text.contains("= 0") {
                done.append((call, call))
            } else if call.text.hasPrefix("fdatasync(\(fd) <unfinished") {
                open[call.thread] = call
            } else if call.text.hasPrefix("<... fdatasync resumed>"), let start = open.removeValue(forKey: call.thread) {
                if call.text.contains("= 0") { done.append((start, call)) }
            }
        }
        return done
    }

    @Test func flushIsAnsweredOnlyAfterFdatasyncOnThePrimaryAndTheSyncReplica() throws {
        let strace = try requireTool("strace", package: "strace")
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        let eastImage = try #require(fd(of: sites.east.imagePath("vm1"), in: sites.east.pid), "east has no open image")
        let westImage = try #require(fd(of: sites.west.imagePath("vm1"), in: sites.west.pid), "west has no open image")
        let eastTrace = sites.dir.path + "/east.strace", westTrace = sites.dir.path + "/west.strace"
        var tracers: [Process] = []
        for (pid, out, calls) in [(sites.east.pid, eastTrace, "read,write,writev,fdatasync"), (sites.west.pid, westTrace, "fdatasync")] {
            let p = Process()
            // The test runner's threads block SIGTERM and SIGINT, and children inherit the mask:
            // unblock them, so that strace can be told to detach and write out its trace.
            p.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
            p.arguments = ["-c", "import os, signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, range(1, signal.NSIG)); os.execv(sys.argv[1], sys.argv[1:])",
                           strace, "-f", "-tt", "-x", "-s", "48", "-e", "trace=\(calls)", "-o", out, "-p", "\(pid)"]
            p.standardError = FileHandle.nullDevice
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            tracers.append(p)
        }
        defer { for t in tracers where t.isRunning { kill(t.processIdentifier, SIGKILL); t.waitUntilExit() } }
        // strace writes the output file once it has attached.
        let attached = eventually(.seconds(10)) {
            [eastTrace, westTrace].allSatisfy { FileManager.default.fileExists(atPath: $0) }
        }
        #expect(attached)
        usleep(300_000)
        var commands: [String] = []
        for i in 0..<5 { commands += ["write -P \(0x30 + i) \(i * 65536) 4k", "flush"] }
        try sites.qemuIO(commands)
        // SIGTERM: strace detaches and writes out its trace (bounded: a stuck strace is killed).
        for t in tracers {
            kill(t.processIdentifier, SIGTERM)
            if !eventually(.seconds(10), { !t.isRunning }) { kill(t.processIdentifier, SIGKILL) }
            t.waitUntilExit()
        }

        let east = parse(eastTrace), west = parse(westTrace)
        let eastSyncs = fdatasyncs(east, fd: eastImage), westSyncs = fdatasyncs(west, fd: westImage)
        // NBD requests: magic 25609513, flags, type 0003 (FLUSH), then the 8-byte handle.
        let requestPrefix = "\\x25\\x60\\x95\\x13\\x00\\x00\\x00\\x03"
        var flushes = 0
        for (i, request) in east.enumerated() where request.text.hasPrefix("read(") && request.text.contains(requestPrefix) {
            guard let start = request.text.range(of: requestPrefix) else { continue }
            let handle = String(request.text[start.upperBound...].prefix(32))   // 8 bytes as \xNN
            // The simple reply: magic 67446698, error 0, the same handle.
            let replyText = "\\x67\\x44\\x66\\x98\\x00\\x00\\x00\\x00" + handle
            guard let reply = east[(i + 1)...].first(where: { ($0.text.hasPrefix("write") || $0.text.hasPrefix("writev")) && $0.text.contains(replyText) }) else {
                Issue.record("no reply to the FLUSH at line \(request.line) of \(eastTrace)")
                continue
            }
            flushes += 1
            let local = eastSyncs.contains { $0.start.line > request.line && $0.end.line < reply.line }
            #expect(local, "the FLUSH at line \(request.line) was answered (line \(reply.line)) without an fdatasync of east's image in between")
            let remote = westSyncs.contains { $0.end.time >= request.time && $0.end.time <= reply.time }
            #expect(remote, "the FLUSH at line \(request.line) was answered at \(reply.time) without west finishing an fdatasync of its image after \(request.time)")
        }
        // qemu-io flushes once more when it closes.
        #expect(flushes >= 5, "found \(flushes) FLUSH requests with replies in the trace, expected at least 5")
    }
}
