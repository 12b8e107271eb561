import FerryCore
import Foundation
import Testing
@testable import FerrySite

@Suite("trees: configuration")
struct TreeConfigTests {
    static func yaml(_ trees: String) -> String {
        ConfigFixture.yaml.replacingOccurrences(of: "log-level: debug\n", with: "log-level: debug\ntrees:\n" + trees)
    }

    @Test func aSiteThatOnlyReplicatesTreesNeedsNoNBDListenerButOneWithVolumesDoes() throws {
        let treesOnly = """
            site: {name: east, data: /var/lib/ferry/east}
            listen:
              replication: 0.0.0.0:7800
            peers:
              west: {address: 10.0.0.2:7800, site-id: "\(String(repeating: "ab", count: 32))"}
            trees:
              www: {primary: east, source: /srv/www, replicas: {west: /srv/www-copy}}

            """
        let config = try SiteConfig.parse(yaml: treesOnly, path: ConfigFixture.file)
        #expect(config.listen.nbd == nil && config.listen.nbdSocket == nil && config.trees.map(\.name) == ["www"])
        let withVolume = treesOnly + "volumes:\n  vm1: {size: 1G, primary: east}\n"
        let error = try #require(throws: ConfigProblems.self) { try SiteConfig.parse(yaml: withVolume, path: ConfigFixture.file) }
        #expect(error.problems.map(\.path) == ["listen"] && error.problems[0].message.hasPrefix("set nbd or nbd-socket (or both)"), "\(error)")
    }

    @Test func aFullTreeParsesAndRendersBackToTheSameValue() throws {
        let text = Self.yaml("""
              www:
                primary: east
                source: /srv/www/
                replicas:
                  west: { target: /srv/www-copy }
                  north: /backup/www
                mode: scheduled
                at: "02:30"
                on: sunday
                exclude: ["*.tmp", "cache/*"]
                keep: { grid: "24x1h | 30x1d | 12x30d", last: 10 }
                compression: none
                bandwidth-limit: 50M/s
              home:
                primary: west
                source: /home
                replicas: { east: { target: /srv/home } }
                keep: "1x15m | 24x1h"

            """)
        let config = try SiteConfig.parse(yaml: text, path: ConfigFixture.file)
        #expect(config.trees.map(\.name) == ["home", "www"])
        let www = try #require(config.tree(named: "www"))
        #expect(www.source == "/srv/www")
        #expect(www.replicas == ["west": "/srv/www-copy", "north": "/backup/www"])
        #expect(www.mode == .scheduled)
        #expect(www.schedule == Schedule.parseAt("02:30", on: "sunday"))
        #expect(www.exclude == ["*.tmp", "cache/*"])
        #expect(www.keep == Retention(grid: [.init(count: 24, seconds: 3600), .init(count: 30, seconds: 86_400), .init(count: 12, seconds: 30 * 86_400)], last: 10))
        #expect(www.compression == .none)
        #expect(www.bandwidthLimit == 50 << 20)
        let home = try #require(config.tree(named: "home"))
        #expect(home.mode == .continuous)
        #expect(home.keep?.last == nil)
        #expect(try SiteConfig.parse(yaml: config.yaml(), path: ConfigFixture.file) == config)
    }

    @Test func everyMistakeIsReportedAtOnceWithItsPath() {
        let problems = ConfigFixture.problems(Self.yaml("""
              Bad Name:
                primary: east
                source: /a
                replicas: { west: /b }
              www:
                primary: eest
                replicas:
                  east: { target: /x }
                  south: { target: /y }
                mode: continous
                keep: "24 hours"
                bandwidth-limit: fast
              sched:
                primary: east
                source: /s
                replicas: { west: { target: "" } }
                mode: scheduled
              cont:
                primary: east
                source: /
                replicas: { west: /c }
                every: 1h

            """))
        let paths = Set(problems.map(\.path))
        for path in ["trees.Bad Name", "trees.www.primary", "trees.www.source", "trees.www.replicas.south",
                     "trees.www.mode", "trees.www.keep", "trees.www.bandwidth-limit", "trees.sched",
                     "trees.sched.replicas.west.target", "trees.cont.source", "trees.cont.every"] {
            #expect(paths.contains(path), "no problem at \(path): \(problems.map { "\($0.path): \($0.message)" })")
        }
        #expect(problems.first { $0.path == "trees.www.primary" }?.message.contains("did you mean \"east\"") == true)
        #expect(problems.first { $0.path == "trees.www.mode" }?.message.contains("continuous") == true)
    }

    @Test func aBadCountInKeepIsOneProblemNotTwo() {
        let problems = ConfigFixture.problems(Self.yaml("""
              www: { primary: east, source: /srv/www, replicas: { west: /x }, keep: { last: ten } }

            """))
        #expect(problems.map(\.path) == ["trees.www.keep.last"], "\(problems.map { "\($0.path): \($0.message)" })")
        #expect(problems.first?.message.contains("not a count") == true)
    }

    @Test func twoTreesInOneDirectoryOfThisSiteAreRefused() {
        let problems = ConfigFixture.problems(Self.yaml("""
              a: { primary: east, source: /srv/data, replicas: { west: /x } }
              b: { primary: west, source: /y, replicas: { east: /srv/data } }

            """))
        #expect(problems.contains { $0.message.contains("/srv/data") && $0.message.contains("own directory") })
    }

    /// A replica's mirror holds only the tree: a target that is, holds or lies inside the site's
    /// data directory would have its first run delete Ferry's own files (catalog, keys, images),
    /// and "/" in the short form was let through (found by a walk through the docs).
    @Test func aTreeDirectoryOverlappingTheDataDirectoryOrTheRootIsRefused() {
        func problems(_ trees: String) -> [String: String] {
            Dictionary(ConfigFixture.problems(Self.yaml(trees + "\n")).map { ($0.path, $0.message) }, uniquingKeysWith: { $0 + " | " + $1 })
        }
        let cases: [(tree: String, path: String, says: String)] = [
            ("a: { primary: west, source: /s, replicas: { east: /var/lib/ferry } }", "trees.a.replicas.east",
             "/var/lib/ferry holds this site's data directory /var/lib/ferry/east (site.data)"),
            ("a: { primary: west, source: /s, replicas: { east: /var/lib/ferry/east/ } }", "trees.a.replicas.east",
             "is this site's data directory"),
            ("a: { primary: west, source: /s, replicas: { east: /var/lib/ferry/east/mirror } }", "trees.a.replicas.east",
             "is inside this site's data directory"),
            ("a: { primary: east, source: /var/lib/ferry/east/x, replicas: { west: /t } }", "trees.a.source",
             "is inside this site's data directory"),
            ("a: { primary: west, source: /s, replicas: { east: /tmp/.. } }", "trees.a.replicas.east", "whole filesystem"),
            ("a: { primary: west, source: /s, replicas: { east: // } }", "trees.a.replicas.east", "whole filesystem"),
            ("g: { primary: east, source: /srv/www, replicas: { west: /t } }\n  h: { primary: west, source: /s, replicas: { east: /srv/www/copy } }",
             "trees.h.replicas.east", "overlaps /srv/www, which tree g uses"),
        ]
        for c in cases {
            let found = problems("  " + c.tree)
            #expect(found.count == 1 && found[c.path]?.contains(c.says) == true, "\(c.tree): \(found)")
        }
        // Beside the data directory, or on another site, is fine.
        #expect(problems("  a: { primary: west, source: /s, replicas: { east: /var/lib/ferry/east-trees } }").isEmpty)
        #expect(problems("  a: { primary: east, source: /s, replicas: { west: /var/lib/ferry/east } }").isEmpty)
    }
}
