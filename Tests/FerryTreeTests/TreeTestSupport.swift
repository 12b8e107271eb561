import Foundation
@testable import FerryTree
#if canImport(Glibc)
import Glibc
#endif

/// Builds and compares trees with every kind of awkward entry, through the `*at()` calls and with
/// names as bytes.
enum OddTree {
    static func temporaryDirectory(_ label: String) -> String {
        let path = NSTemporaryDirectory() + "ferry-tree-\(label)-\(UUID().uuidString.prefix(8))"
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    static func path(_ root: String, _ rel: [UInt8]) -> [UInt8] { Array(root.utf8) + [0x2F] + rel }

    static func mkdirs(_ root: String, _ rel: [UInt8], mode: mode_t = 0o755) {
        var sofar: [UInt8] = []
        for c in TreePath.components(rel) {
            sofar = TreePath.join(sofar, c)
            _ = PosixFS.withCName(path(root, sofar)) { mkdir($0, mode) }
        }
    }

    static func write(_ root: String, _ rel: [UInt8], _ data: [UInt8], mode: mode_t = 0o644) {
        let fd = PosixFS.withCName(path(root, rel)) { open($0, O_WRONLY | O_CREAT | O_TRUNC, mode) }
        precondition(fd >= 0, "create \(TreePath.display(rel)): \(errno)")
        data.withUnsafeBytes { _ = Glibc.write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }

    static func write(_ root: String, _ rel: String, _ data: [UInt8], mode: mode_t = 0o644) {
        write(root, Array(rel.utf8), data, mode: mode)
    }

    static func setTime(_ root: String, _ rel: [UInt8], seconds: Int, nanos: Int) {
        var times = [timespec(tv_sec: seconds, tv_nsec: nanos), timespec(tv_sec: seconds, tv_nsec: nanos)]
        _ = PosixFS.withCName(path(root, rel)) { utimensat(AT_FDCWD, $0, &times, AT_SYMLINK_NOFOLLOW) }
    }

    static func random(_ count: Int, seed: inout UInt64) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var i = 0
        while i < count {
            seed = seed &* 6364136223846793005 &+ 1442695040888963407
            var x = seed
            for _ in 0..<8 where i < count {
                out[i] = UInt8(truncatingIfNeeded: x >> 56)
                x <<= 8
                i += 1
            }
        }
        return out
    }

    /// The awkward entries, plus `bulk` small files spread over directories.
    static func make(_ root: String, bulk: Int, seed: UInt64 = 1) {
        var seed = seed
        write(root, "with space.txt", Array("spaces\n".utf8))
        write(root, "new\nline", Array("a newline in the name\n".utf8))
        write(root, [0x6E, 0x6F, 0x74, 0xFF, 0xFE, 0x2D, 0x75, 0x74, 0x66, 0x38], Array("not UTF-8\n".utf8))
        write(root, [0x6C, 0x61, 0x74, 0x69, 0x6E, 0x31, 0xE9], Array("latin-1 é\n".utf8))
        write(root, Array(repeating: 0x6E, count: 255), Array("a 255-byte name\n".utf8))
        // Deep: 30 levels of 100-byte names (about 3 KB of path; rsync must still compare it).
        var deep: [UInt8] = Array("deep".utf8)
        for level in 0..<30 { deep = TreePath.join(deep, Array(String(format: "%03d", level).utf8) + Array(repeating: 0x64, count: 97)) }
        mkdirs(root, deep)
        write(root, TreePath.join(deep, Array("bottom.txt".utf8)), Array("the bottom\n".utf8))
        // Symlinks, dangling ones too; never followed.
        _ = PosixFS.withCName(path(root, Array("link-to-file".utf8))) { symlink("with space.txt", $0) }
        _ = PosixFS.withCName(path(root, Array("dangling".utf8))) { symlink("does/not/exist", $0) }
        _ = PosixFS.withCName(path(root, Array("link-to-dir".utf8))) { symlink("deep", $0) }
        _ = PosixFS.withCName(path(root, Array("link-up".utf8))) { symlink("../../../etc/passwd", $0) }
        // Hard links within the tree, across directories.
        mkdirs(root, Array("hard/a".utf8))
        mkdirs(root, Array("hard/b".utf8))
        write(root, "hard/a/one", random(20_000, seed: &seed))
        _ = PosixFS.withCName(path(root, Array("hard/a/one".utf8))) { a in PosixFS.withCName(path(root, Array("hard/b/two".utf8))) { link(a, $0) } }
        _ = PosixFS.withCName(path(root, Array("hard/a/one".utf8))) { a in PosixFS.withCName(path(root, Array("hard/three".utf8))) { link(a, $0) } }
        // Sparse: 64 MiB with two islands of data.
        let fd = PosixFS.withCName(path(root, Array("sparse.img".utf8))) { open($0, O_WRONLY | O_CREAT | O_TRUNC, 0o644) }
        ftruncate(fd, 64 << 20)
        random(4096, seed: &seed).withUnsafeBytes { _ = pwrite(fd, $0.baseAddress, $0.count, 0) }
        random(1 << 20, seed: &seed).withUnsafeBytes { _ = pwrite(fd, $0.baseAddress, $0.count, 32 << 20) }
        close(fd)
        // A file of several chunks, and an identical copy (dedup).
        let big = random(12 << 20, seed: &seed)
        write(root, "big.bin", big)
        write(root, "big-copy.bin", big)
        // Empty things.
        write(root, "empty", [])
        mkdirs(root, Array("empty-dir".utf8))
        mkdirs(root, Array("nested/empty/dirs".utf8))
        // Odd modes and owners.
        write(root, "mode-000", Array("no permissions\n".utf8), mode: 0)
        write(root, "setuid", Array("#!/bin/sh\n".utf8), mode: 0o755)
        _ = PosixFS.withCName(path(root, Array("setuid".utf8))) { chmod($0, 0o4755) }
        write(root, "owned", Array("someone else's\n".utf8))
        _ = PosixFS.withCName(path(root, Array("owned".utf8))) { lchown($0, 1234, 5678) }
        mkdirs(root, Array("sticky".utf8))
        _ = PosixFS.withCName(path(root, Array("sticky".utf8))) { chmod($0, 0o1777) }
        mkdirs(root, Array("readonly".utf8))
        write(root, "readonly/inside", Array("in a read-only directory\n".utf8))
        _ = PosixFS.withCName(path(root, Array("readonly".utf8))) { chmod($0, 0o555) }
        _ = PosixFS.withCName(path(root, Array("fifo".utf8))) { mkfifo($0, 0o640) }
        // Bulk: small files, some identical.
        for i in 0..<bulk {
            let dir = "bulk/d\(i / 100)"
            if i % 100 == 0 { mkdirs(root, Array(dir.utf8)) }
            let size = Int(seed % 4096)
            let data = i % 10 == 0 ? Array("same content\n".utf8) : random(size, seed: &seed)
            write(root, "\(dir)/file \(i).txt", data)
        }
        // Nanosecond times, set last (children first, so directories keep theirs).
        setTime(root, Array("with space.txt".utf8), seconds: 1_700_000_000, nanos: 123_456_789)
        setTime(root, Array("dangling".utf8), seconds: 1_600_000_000, nanos: 987_654_321)
        setTime(root, Array("empty-dir".utf8), seconds: 1_500_000_000, nanos: 1)
    }

    /// Every path's description: kind, mode, owner, size, mtime to the ns, content digest or link
    /// target, and which other paths are hard links of it.
    static func describe(_ root: String) -> [String: String] {
        var out: [String: String] = [:]
        var inodes: [UInt64: [String]] = [:]
        func walk(_ fd: Int32, _ rel: [UInt8]) {
            for name in (PosixFS.names(in: fd) ?? []).sorted(by: { $0.lexicographicallyPrecedes($1) }) {
                let p = TreePath.join(rel, name)
                let key = TreePath.display(p)
                guard let st = PosixFS.lstat(at: fd, name) else { out[key] = "vanished"; continue }
                var d = "mode=\(String(st.st_mode, radix: 8)) uid=\(st.st_uid) gid=\(st.st_gid) mtime=\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)"
                if PosixFS.isDirectory(st) {
                    let sub = PosixFS.openDirectory(at: fd, name)
                    walk(sub, p)
                    close(sub)
                } else if PosixFS.isSymlink(st) {
                    d += " -> \(TreePath.display(PosixFS.readlink(at: fd, name, size: Int(st.st_size)) ?? []))"
                } else if PosixFS.isRegular(st) {
                    let f = PosixFS.withCName(name) { openat(fd, $0, O_RDONLY) }
                    var data = [UInt8](repeating: 0, count: Int(st.st_size))
                    if !data.isEmpty { data.withUnsafeMutableBytes { _ = pread(f, $0.baseAddress, $0.count, 0) } }
                    close(f)
                    d += " size=\(st.st_size) sha=\(ChunkID.of(data))"
                    if st.st_nlink > 1 { inodes[UInt64(st.st_ino), default: []].append(key) }
                    if st.st_size > 1 << 20 && Int(st.st_blocks) * 512 < Int(st.st_size) / 2 { d += " sparse" }
                }
                out[key] = d
            }
        }
        let fd = PosixFS.openDirectory(root)
        walk(fd, [])
        close(fd)
        for group in inodes.values {
            for p in group { out[p]! += " links=\(group.sorted().joined(separator: ","))" }
        }
        return out
    }

    /// The differences between two trees, one line each (empty: the same).
    static func differences(_ a: String, _ b: String) -> [String] {
        differences(describe(a), describe(b))
    }

    static func differences(_ x: [String: String], _ y: [String: String]) -> [String] {
        var out: [String] = []
        for key in Set(x.keys).union(y.keys).sorted() where x[key] != y[key] {
            out.append("\(key): \(x[key] ?? "absent") ≠ \(y[key] ?? "absent")")
        }
        return out
    }

    /// `rsync -anciH --delete` from `source` to `target`: the itemized changes it would make (none
    /// when the trees agree), as an independent check.
    static func rsyncDifferences(_ source: String, _ target: String) throws -> [String] {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/rsync")
        process.arguments = ["-anciH", "--delete", source + "/", target + "/"]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let lines = String(decoding: data, as: UTF8.self).split(separator: "\n").map(String.init)
        return process.terminationStatus == 0 ? lines : ["rsync exit \(process.terminationStatus)"] + lines
    }

    /// setfsuid(2), which Swift's Glibc module does not import: per thread, and a nonzero fsuid
    /// drops the file capabilities, so root reads as that user would.
    static func setfsuid(_ uid: UInt32) -> Int32 {
        typealias Fn = @convention(c) (UInt32) -> Int32
        let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "setfsuid")!
        return unsafeBitCast(symbol, to: Fn.self)(uid)
    }

    static func remove(_ path: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/rm")
        p.arguments = ["-rf", path]
        try? p.run()
        p.waitUntilExit()
    }

    static func copy(_ from: String, _ to: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/cp")
        p.arguments = ["-a", from, to]
        try? p.run()
        p.waitUntilExit()
    }
}
