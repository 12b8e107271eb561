import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Interop with the NBD clients people use: libnbd's nbdinfo and nbdcopy, QEMU's qemu-img and
/// qemu-io, fio's nbd engine — each against a real `ferry serve`.
@Suite(.serialized)
struct NBDClientTests {
    /// Starts one site that is primary for the given volumes and runs `body` against it.
    func withSite(_ volumes: [(String, String)], _ body: (TestSite, TempDir) throws -> Void) throws {
        let dir = TempDir()
        let site = try TestSite(name: "east", root: dir.path)
        try site.writeConfig(volumes: volumes.map { TestSite.Volume(name: $0.0, size: $0.1, primary: "east") })
        try site.start()
        defer { site.stop() }
        try body(site, dir)
        #expect(site.isRunning, "the daemon died during the test; log:\n\(site.log(tail: 30))")
    }

    /// A file of `size` random bytes.
    func randomFile(_ path: String, size: Int) throws {
        var rng = SystemRandomNumberGenerator()
        var bytes = [UInt8](repeating: 0, count: size)
        for i in stride(from: 0, to: size, by: 8) {
            withUnsafeBytes(of: rng.next()) { raw in
                for j in 0..<min(8, size - i) { bytes[i + j] = raw[j] }
            }
        }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    @Test func nbdinfoListsExportsAndMapsHoles() throws {
        let nbdinfo = try requireTool("nbdinfo", package: "libnbd-bin")
        let qemuIO = try requireTool("qemu-io", package: "qemu-utils")
        try withSite([("vm1", "64M"), ("vm2", "16M")]) { site, _ in
            let list = try run(nbdinfo, ["--list", "nbd://127.0.0.1:\(site.nbdPort)"])
            #expect(list.stdout.contains("export=\"vm1\"") || list.stdout.contains("vm1"))
            #expect(list.stdout.contains("vm2"))
            let info = try run(nbdinfo, [site.uri("vm1")])
            #expect(info.stdout.contains("67108864"), "size of vm1 in nbdinfo: \(info.stdout)")
            #expect(info.stdout.contains("base:allocation"))

            // A fresh volume is all hole; write 1 MiB at 8 MiB and the map shows data there only.
            let before = try run(nbdinfo, ["--map", site.uri("vm1")])
            #expect(before.stdout.contains("hole"))
            #expect(!before.stdout.contains(" data"), "fresh volume should have no data: \(before.stdout)")
            try run(qemuIO, ["-f", "raw", "-c", "write -P 0x42 8M 1M", site.uri("vm1")])
            let after = try run(nbdinfo, ["--map", site.uri("vm1")])
            let lines = after.stdout.split(separator: "\n").map { $0.split(separator: " ", omittingEmptySubsequences: true) }
            // nbdinfo --map lines: offset length type description
            let data = lines.filter { $0.count >= 4 && $0[3].hasPrefix("data") }
            #expect(data.count == 1, "one data extent expected: \(after.stdout)")
            if let d = data.first {
                #expect(UInt64(d[0]) == 8 << 20)
                #expect(UInt64(d[1]) == 1 << 20)
            }
            #expect(lines.contains { $0.count >= 4 && $0[3].hasPrefix("hole") && UInt64($0[0]) == 0 })
            // Every client above has gone; status must not count them any more.
            #expect(eventually(.seconds(10)) { (try? site.status())?.volumes.allSatisfy { $0.clientsConnected == 0 } == true },
                    "clients still counted: \(String(describing: try? site.status().volumes.map(\.clientsConnected)))")
        }
    }

    @Test func qemuImgConvertIntoTheExportAndCompareBack() throws {
        let qemuImg = try requireTool("qemu-img", package: "qemu-utils")
        try withSite([("vm1", "64M")]) { site, dir in
            let source = dir.path + "/random.img"
            try randomFile(source, size: 64 << 20)
            try run(qemuImg, ["convert", "-n", "-f", "raw", "-O", "raw", source, site.uri("vm1")])
            let same = try run(qemuImg, ["compare", "-f", "raw", "-F", "raw", source, site.uri("vm1")])
            #expect(same.stdout.contains("Images are identical"))
            // And the comparison can fail: change one sector of the source.
            let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: source))
            try fh.seek(toOffset: 5 << 20)
            fh.write(Data(repeating: 0xEE, count: 512))
            try fh.close()
            let differ = try run(qemuImg, ["compare", "-f", "raw", "-F", "raw", source, site.uri("vm1")], expect: nil)
            #expect(differ.status == 1, "qemu-img compare must notice one changed sector: \(differ.output)")
        }
    }

    @Test func qemuIOPatternsReadBackThroughASecondConnection() throws {
        let qemuIO = try requireTool("qemu-io", package: "qemu-utils")
        try withSite([("vm1", "64M")]) { site, _ in
            try run(qemuIO, ["-f", "raw",
                             "-c", "write -P 0xa5 0 1M", "-c", "write -P 0x5a 4M 512k",
                             "-c", "write -z 1M 64k", "-c", "write -P 0x11 63M 1M", "-c", "flush", site.uri("vm1")])
            // A second connection, this time over the Unix socket.
            let ok = try run(qemuIO, ["-f", "raw", "-r",
                                      "-c", "read -P 0xa5 0 1M", "-c", "read -P 0x5a 4M 512k",
                                      "-c", "read -P 0 1M 64k", "-c", "read -P 0x11 63M 1M", site.unixURI("vm1")])
            #expect(!ok.output.contains("Pattern verification failed"), "\(ok.output)")
            #expect(ok.output.contains("read 1048576/1048576 bytes at offset 0"))
            let bad = try run(qemuIO, ["-f", "raw", "-r", "-c", "read -P 0x5a 0 4k", site.uri("vm1")], expect: nil)
            #expect(bad.output.contains("Pattern verification failed"), "a wrong pattern must be noticed: \(bad.output)")
        }
    }

    @Test func nbdcopyInAndOutWithSeveralConnections() throws {
        let nbdcopy = try requireTool("nbdcopy", package: "libnbd-bin")
        let cmp = try requireTool("cmp", package: "diffutils")
        try withSite([("vm1", "64M")]) { site, dir in
            let source = dir.path + "/in.img", back = dir.path + "/out.img"
            try randomFile(source, size: 64 << 20)
            // Leave a hole in the middle so the copy exercises zero/extent handling too.
            let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: source))
            try fh.seek(toOffset: 16 << 20)
            fh.write(Data(count: 8 << 20))
            try fh.close()
            try run(nbdcopy, ["--connections=4", "--requests=16", "--flush", source, site.uri("vm1")])
            _ = FileManager.default.createFile(atPath: back, contents: nil)
            try run(nbdcopy, ["--connections=4", "--requests=16", site.uri("vm1"), back])
            try run(cmp, [source, back])
            try run(cmp, [source, site.imagePath("vm1")])
        }
    }

    @Test func fioWritesWithCrc32cAndVerifies() throws {
        let fio = try requireTool("fio", package: "fio")
        try withSite([("vm1", "128M")]) { site, dir in
            let result = try run(fio, [
                "--name=ferry-verify", "--ioengine=nbd", "--uri=\(site.uri("vm1"))",
                "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=64m", "--direct=1",
                "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=1024",
                "--verify_state_save=0",  // fio would leave a *.verify.state file in the working directory
                "--output-format=json", "--output=\(dir.path)/fio.json",
            ])
            #expect(result.status == 0)
            let json = try String(contentsOfFile: "\(dir.path)/fio.json", encoding: .utf8)
            #expect(json.contains("\"error\" : 0"), "fio reported an error: \(json.prefix(2000))")
            #expect(!result.output.contains("verify: bad"), "\(result.output)")
        }
    }
}
