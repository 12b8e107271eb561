import FerrySite
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Two or three real `ferry serve` daemons on loopback, pinned to each other, with `vm1` primary
/// on east and replicated to the others with the given policies.
final class ReplicationSites {
    let dir = TempDir()
    let sites: [String: TestSite]
    let volumeSize: String

    var east: TestSite { sites["east"]! }
    var west: TestSite { sites["west"]! }

    init(replicas: [String: String], size: String = "256M", extraVolumes: [TestSite.Volume] = [], onPromote: String? = nil,
         history: String? = nil, metrics: Bool = false) throws {
        var sites: [String: TestSite] = [:]
        for name in ["east"] + replicas.keys.sorted() {
            let site = try TestSite(name: name, root: dir.path)
            if metrics { site.metricsPort = freePort() }
            sites[name] = site
        }
        self.sites = sites
        self.volumeSize = size
        for (name, site) in sites {
            let peers = sites.filter { $0.key != name }.map { (name: $0.key, port: $0.value.replicationPort, siteID: $0.value.siteID) }
            try site.writeConfig(peers: peers, volumes: [TestSite.Volume(name: "vm1", size: size, primary: "east", replicas: replicas, onPromote: onPromote, history: history)] + extraVolumes)
        }
    }

    func startAll() throws {
        for name in sites.keys.sorted() { try sites[name]!.start() }
    }

    func stopAll() {
        for site in sites.values where site.isRunning { site.stop() }
    }

    /// vm1's replica entry for `peer` in east's status.
    func replica(_ peer: String) -> SiteStatus.Replica? {
        (try? east.status())?.volumes.first { $0.name == "vm1" }?.replicas.first { $0.peer == peer }
    }

    /// Waits until every replica of vm1 is connected and consistent in a steady state.
    func waitInSync(_ timeout: Duration = .seconds(120), sourceLocation: SourceLocation = #_sourceLocation) {
        let ok = eventually(timeout) {
            guard let status = try? east.status(), let vm1 = status.volumes.first(where: { $0.name == "vm1" }) else { return false }
            return !vm1.replicas.isEmpty && vm1.replicas.allSatisfy {
                $0.connected && $0.consistent && ($0.state == "in-sync" || $0.state == "waiting") && $0.lagBytes == 0
            }
        }
        #expect(ok, "replicas did not reach a steady state: \(String(describing: (try? east.status())?.volumes.first?.replicas))\neast log:\n\(east.log(tail: 30))",
                sourceLocation: sourceLocation)
    }

    /// Runs `qemu-io` commands against east's vm1 (or `uri`).
    @discardableResult
    func qemuIO(_ commands: [String], uri: String? = nil, readOnly: Bool = false, expect: Int32? = 0) throws -> RunResult {
        let qemuIO = try requireTool("qemu-io", package: "qemu-utils")
        var args = ["-f", "raw"]
        if readOnly { args.append("-r") }
        for c in commands { args += ["-c", c] }
        args.append(uri ?? east.unixURI("vm1"))
        return try run(qemuIO, args, expect: expect)
    }

    /// `cmp` of east's and `peer`'s images.
    func imagesIdentical(_ peer: String = "west") throws -> Bool {
        let result = try run("/usr/bin/cmp", [east.imagePath("vm1"), sites[peer]!.imagePath("vm1")], expect: nil)
        return result.status == 0
    }
}

/// Starts fio writing verified 4 KiB blocks at QD16 to east's vm1 in `dir` (its verify state
/// is saved there when it stops).
func startVerifiedWriter(_ fio: String, uri: String, dir: String, size: String = "48m") throws -> Process {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: fio)
    p.currentDirectoryURL = URL(fileURLWithPath: dir)
    p.arguments = [
        "--name=crash", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite", "--bs=4k", "--iodepth=16",
        "--size=\(size)", "--verify=crc32c", "--do_verify=0", "--verify_state_save=1", "--time_based", "--runtime=60",
        "--output=\(dir)/fio-write.log",
    ]
    p.standardOutput = FileHandle.nullDevice
    p.standardError = FileHandle.nullDevice
    try p.run()
    return p
}
