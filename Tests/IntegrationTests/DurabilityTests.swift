import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// What a client was told is durable survives the daemon dying, and the daemon stops cleanly.
@Suite(.serialized)
struct DurabilityTests {
    func bytes(of path: String, at offset: UInt64, count: Int) throws -> [UInt8] {
        let fh = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? fh.close() }
        try fh.seek(toOffset: offset)
        return [UInt8](fh.readData(ofLength: count))
    }

    /// Starts fio writing 4 KiB blocks at QD32 for 30 s and waits until it is connected.
    func startLoad(_ fio: String, on site: TestSite, size: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: fio)
        p.arguments = ["--name=load", "--ioengine=nbd", "--uri=\(site.uri("vm1"))", "--rw=randwrite", "--bs=4k",
                       "--iodepth=32", "--size=\(size)", "--time_based", "--runtime=30", "--output=/dev/null"]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        _ = eventually(.seconds(10)) { (try? site.status().volumes.first?.clientsConnected) == 1 }
        return p
    }

    @Test func flushedWritesAreInTheImageAfterKill9() throws {
        let qemuIO = try requireTool("qemu-io", package: "qemu-utils")
        let dir = TempDir()
        let site = try TestSite(name: "east", root: dir.path)
        try site.writeConfig(volumes: [.init(name: "vm1", size: "64M", primary: "east")])
        try site.start()
        defer { site.stop() }
        // A FUA write and a plain write followed by FLUSH.
        try run(qemuIO, ["-f", "raw", "-c", "write -f -P 0x3c 0 64k", "-c", "write -P 0x77 1M 1M", "-c", "flush", site.uri("vm1")])
        site.kill9()
        #expect(try bytes(of: site.imagePath("vm1"), at: 0, count: 65536).allSatisfy { $0 == 0x3c })
        #expect(try bytes(of: site.imagePath("vm1"), at: 1 << 20, count: 1 << 20).allSatisfy { $0 == 0x77 })
        #expect(try bytes(of: site.imagePath("vm1"), at: 2 << 20, count: 4096).allSatisfy { $0 == 0 })

        // The site comes back after kill -9 (stale lock and sockets) and serves the same data.
        try site.start()
        let read = try run(qemuIO, ["-f", "raw", "-r", "-c", "read -P 0x77 1M 1M", "-c", "read -P 0x3c 0 64k", site.uri("vm1")])
        #expect(!read.output.contains("Pattern verification failed"), "\(read.output)")
        let status = try site.status()
        #expect(status.volumes.first?.uuid != nil)
    }

    @Test func killedMidWriteComesBackWithEarlierFlushedData() throws {
        let qemuIO = try requireTool("qemu-io", package: "qemu-utils")
        let fio = try requireTool("fio", package: "fio")
        let dir = TempDir()
        let site = try TestSite(name: "east", root: dir.path)
        try site.writeConfig(volumes: [.init(name: "vm1", size: "128M", primary: "east")])
        try site.start()
        defer { site.stop() }
        try run(qemuIO, ["-f", "raw", "-c", "write -P 0xc4 100M 4M", "-c", "flush", site.uri("vm1")])
        // fio hammers the first 64 MiB while the daemon is killed under it.
        let p = try startLoad(fio, on: site, size: "64m")
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; p.waitUntilExit() }
        usleep(1_500_000)
        site.kill9()
        kill(p.processIdentifier, SIGKILL)
        #expect(try bytes(of: site.imagePath("vm1"), at: 100 << 20, count: 4 << 20).allSatisfy { $0 == 0xc4 })
        try site.start()
        let read = try run(qemuIO, ["-f", "raw", "-r", "-c", "read -P 0xc4 100M 4M", site.uri("vm1")])
        #expect(!read.output.contains("Pattern verification failed"), "\(read.output)")
    }

    @Test func sigtermAnswersInFlightRequestsAndStopsCleanly() throws {
        let fio = try requireTool("fio", package: "fio")
        let dir = TempDir()
        let site = try TestSite(name: "east", root: dir.path)
        try site.writeConfig(volumes: [.init(name: "vm1", size: "64M", primary: "east")])
        try site.start()
        let p = try startLoad(fio, on: site, size: "32m")
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; p.waitUntilExit() }
        usleep(1_000_000)
        let status = site.stop()
        #expect(status == 0, "ferry serve should exit 0 on SIGTERM; log:\n\(site.log(tail: 30))")
        let log = site.log()
        #expect(log.contains("stopped cleanly"))
        #expect(!log.contains("closed at shutdown with requests in flight"), "in-flight requests were not answered:\n\(log.suffix(2000))")
        #expect(!FileManager.default.fileExists(atPath: site.adminSocket), "admin socket left behind")
    }
}
