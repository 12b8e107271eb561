import FerrySite
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The CLI as a person meets it: invalid configs, misuse, `init`/`id`, `status`, the quickstart.
@Suite(.serialized)
struct CLITests {
    static let validBase = """
        site:
          name: east
          data: /tmp/ferry-never-created
        listen:
          replication: 127.0.0.1:7800
          nbd: 127.0.0.1:10809

        """

    /// Each kind of mistake, the field path the message must name, and a phrase it must contain.
    @Test(arguments: [
        (validBase + "volumes:\n  vm1:\n    size: 20X\n    primary: east\n", "volumes.vm1.size", "is not a size"),
        (validBase + "volumes:\n  vm1:\n    size: 1G\n    primary: north\n", "volumes.vm1.primary", "north"),
        (validBase + "volumes:\n  vm1:\n    sise: 1G\n    primary: east\n", "volumes.vm1.sise", "unknown field"),
        (validBase + "peers:\n  west:\n    address: 10.0.0.2:7800\n    site-id: abc\n", "peers.west.site-id", "is not a site ID"),
        (validBase + "peers:\n  west:\n    address: nowhere\n    site-id: \(String(repeating: "ab", count: 32))\n", "peers.west.address", "host:port"),
        ("site:\n  data: /tmp/x\nlisten:\n  replication: 127.0.0.1:1\n  nbd: 127.0.0.1:2\n", "site.name", "missing"),
        ("site:\n  name: east\n  data: /tmp/x\nlisten:\n  replication: 127.0.0.1:1\nvolumes:\n  vm1: {size: 1G, primary: east}\n", "listen", "nbd"),
        ("site: [1, 2\n", "", "line"),
        ("", "", "empty"),
        (validBase + "log-level: loud\n", "log-level", "loud"),
    ])
    func invalidConfigsExitWithStatus2AndNameTheField(yaml: String, field: String, phrase: String) throws {
        let dir = TempDir()
        let path = dir.path + "/bad.yaml"
        try yaml.write(toFile: path, atomically: true, encoding: .utf8)
        let ferry = try ferryBinary()
        for command in [["serve", "--config", path], ["status", "--config", path]] {
            let r = try run(ferry, command, timeout: .seconds(30), expect: 2)
            #expect(field.isEmpty || r.stderr.contains(field), "\(command[0]): message should name \(field): \(r.stderr)")
            #expect(r.stderr.lowercased().contains(phrase.lowercased()), "\(command[0]): message should say \(phrase): \(r.stderr)")
        }
        #expect(!FileManager.default.fileExists(atPath: "/tmp/ferry-never-created"), "an invalid config changed something")
    }

    @Test func severalMistakesAreReportedTogether() throws {
        let dir = TempDir()
        let path = dir.path + "/bad.yaml"
        try (Self.validBase + "volumes:\n  vm1:\n    size: 20X\n    primary: north\n  vm2:\n    size: 0\n    primary: east\n")
            .write(toFile: path, atomically: true, encoding: .utf8)
        let r = try run(try ferryBinary(), ["serve", "--config", path], expect: 2)
        #expect(r.stderr.contains("volumes.vm1.size"))
        #expect(r.stderr.contains("volumes.vm1.primary"))
        #expect(r.stderr.contains("volumes.vm2.size"))
    }

    @Test func aMissingConfigFileIsStatus2() throws {
        let r = try run(try ferryBinary(), ["serve", "--config", "/nonexistent/ferry.yaml"], expect: 2)
        #expect(r.stderr.contains("/nonexistent/ferry.yaml"))
    }

    @Test func initRefusesToOverwriteAnIdentityAndIdPrintsItAgain() throws {
        let dir = TempDir()
        let ferry = try ferryBinary()
        let created = try run(ferry, ["init", "--site", "east", "--data", dir.path + "/east"])
        #expect(created.stdout.contains("site ID:"))
        let id = try run(ferry, ["id", "--data", dir.path + "/east"])
        let printed = String(id.stdout.split(separator: " ").first ?? "")
        #expect(created.stdout.contains(printed))
        #expect(printed.split(separator: "-").count == 16)
        let again = try run(ferry, ["init", "--site", "east", "--data", dir.path + "/east"], expect: 1)
        #expect(!again.stderr.isEmpty)
        #expect(try run(ferry, ["id", "--data", dir.path + "/east"]).stdout == id.stdout, "the identity changed")
        let badName = try run(ferry, ["init", "--site", "East Coast", "--data", dir.path + "/x"], expect: 2)
        #expect(badName.stderr.contains("East Coast"))
        let missing = try run(ferry, ["id", "--data", dir.path + "/nothing"], expect: 1)
        #expect(missing.stderr.contains("ferry init"))
    }

    @Test func serveWithoutAnIdentitySaysToRunInit() throws {
        let dir = TempDir()
        let path = dir.path + "/east.yaml"
        try """
            site:
              name: east
              data: \(dir.path)/east
            listen:
              replication: 127.0.0.1:\(freePort())
              nbd: 127.0.0.1:\(freePort())
            """.write(toFile: path, atomically: true, encoding: .utf8)
        let r = try run(try ferryBinary(), ["serve", "--config", path], timeout: .seconds(30), expect: 1)
        #expect(r.stderr.contains("ferry init"), "\(r.stderr)")
        // A data directory made for another site is refused, before it serves anything.
        _ = try run(try ferryBinary(), ["init", "--site", "west", "--data", dir.path + "/east"])
        let other = try run(try ferryBinary(), ["serve", "--config", path], timeout: .seconds(30), expect: 1)
        #expect(other.stderr.contains("belongs to site west") && other.stderr.contains("names this site east"), "\(other.stderr)")
    }

    @Test func statusShowsTheSiteItsVolumesAndJSON() throws {
        let dir = TempDir()
        let site = try TestSite(name: "east", root: dir.path)
        try site.writeConfig(volumes: [.init(name: "vm1", size: "64M", primary: "east")])
        try site.start()
        defer { site.stop() }
        let ferry = try ferryBinary()
        let human = try run(ferry, ["status", "--config", site.configPath])
        #expect(human.stdout.contains("site east"))
        #expect(human.stdout.contains(site.siteID))
        #expect(human.stdout.contains("vm1"))
        #expect(human.stdout.contains(site.uri("vm1")))
        let json = try run(ferry, ["status", "--config", site.configPath, "--json"])
        let status = try SiteStatus.decoder().decode(SiteStatus.self, from: Data(json.stdout.utf8))
        #expect(status.volumes.map(\.name) == ["vm1"])
        #expect(status.volumes[0].sizeBytes == 64 << 20)
        #expect(status.volumes[0].role == "primary")
        // Commands about replicas say the volume is not replicated, not that this is no primary.
        for args in [["checkpoint", "vm1"], ["verify", "vm1", "--peer", "west"], ["switchover", "vm1", "--to", "west"]] {
            let refused = try run(ferry, args + ["--config", site.configPath], expect: 1)
            #expect(refused.stderr.contains("not replicated") && !refused.stderr.contains("not the primary"),
                    "\(args.joined(separator: " ")): \(refused.stderr)")
        }
        site.stop()
        let down = try run(ferry, ["status", "--config", site.configPath], expect: 1)
        #expect(down.stderr.contains("no ferry daemon answers"))
    }

    @Test func aSecondDaemonOnTheSameDataIsRefused() throws {
        let dir = TempDir()
        let site = try TestSite(name: "east", root: dir.path)
        try site.writeConfig(volumes: [.init(name: "vm1", size: "16M", primary: "east")])
        try site.start()
        defer { site.stop() }
        let r = try run(try ferryBinary(), ["serve", "--config", site.configPath], timeout: .seconds(30), expect: 1)
        #expect(r.stderr.contains("another ferry daemon"), "\(r.stderr)")
        #expect(site.isRunning)
    }

    @Test func quickstartRunsTwoSitesAndStopsThemOnCtrlC() throws {
        let nbdinfo = try requireTool("nbdinfo", package: "libnbd-bin")
        let dir = TempDir()
        let out = dir.path + "/quickstart.out"
        _ = FileManager.default.createFile(atPath: out, contents: nil)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try ferryBinary())
        p.arguments = ["quickstart", "--dir", dir.path + "/qs", "--size", "64M"]
        p.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: out))
        p.standardError = p.standardOutput
        try p.run()
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; p.waitUntilExit() }
        func text() -> String { (try? String(contentsOfFile: out, encoding: .utf8)) ?? "" }
        #expect(eventually(.seconds(60)) { text().contains("ready") || !p.isRunning }, "\(text())")
        let printed = text()
        #expect(printed.contains("ferry status --config"))
        #expect(printed.contains("nbdinfo nbd://127.0.0.1:"))
        #expect(printed.contains("ferry switchover vm1 --to west --config") && printed.contains("ferry promote vm1"), "no failover drill: \(printed)")
        let pids = printed.split(separator: "\n").filter { $0.hasPrefix("started ") }
            .compactMap { line in line.split(separator: " ").firstIndex(of: "pid").map { Int32(line.split(separator: " ")[$0 + 1].dropLast())! } }
        #expect(pids.count == 2)
        // Both sites see each other, and the printed URI works with a real client.
        #expect(printed.contains("west        connected") || printed.contains("east        connected"), "\(printed)")
        let uri = printed.split(separator: "\n").first { $0.contains("nbdinfo nbd://") }.map { String($0.split(separator: " ").last!) } ?? ""
        let info = try run(nbdinfo, [uri])
        #expect(info.stdout.contains("67108864"))
        // The two status pages it prints answer, each with its site's row for vm1.
        let pages = printed.split(separator: "\n").filter { $0.hasPrefix("  east  http://") || $0.hasPrefix("  west  http://") }
            .map { String($0.split(separator: " ").last!) }
        #expect(pages.count == 2, "no status page URLs: \(printed)")
        for page in pages {
            let got = try httpGet(page)
            #expect(got.code == 200 && got.body.contains(#"data-volume="vm1""#), "\(page): \(got.code)")
        }
        // Ctrl-C stops both sites cleanly.
        kill(p.processIdentifier, SIGINT)
        #expect(eventually(.seconds(40)) { !p.isRunning })
        p.waitUntilExit()
        #expect(p.terminationStatus == 0, "\(text())")
        for pid in pids { #expect(kill(pid, 0) != 0, "site process \(pid) outlived the quickstart") }
        #expect(text().contains("stopped"))
    }
}
