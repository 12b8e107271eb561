import FerryCore
import Testing
@testable import FerrySite

/// One kind of configuration mistake: the file, the field path it must be reported at, a phrase of
/// the message, and how many problems the file has in all.
struct ConfigMistake: Sendable, CustomTestStringConvertible {
    var name: String
    var yaml: String
    var path: String
    var phrase: String
    var count = 1

    var testDescription: String { name }

    static let all: [ConfigMistake] = [
        // site
        .init(name: "site name missing", yaml: ConfigFixture.with(("  name: east\n", "")),
              path: "site.name", phrase: "missing; required"),
        .init(name: "site name in capitals", yaml: ConfigFixture.with(("name: east", "name: East")),
              path: "site.name", phrase: "\"East\" is not a valid site name; use 1 to 63 lowercase letters, digits and dashes, starting with a letter or digit (e.g. \"east\")"),
        .init(name: "site name too long", yaml: ConfigFixture.with(("name: east", "name: " + String(repeating: "e", count: 64))),
              path: "site.name", phrase: "is not a valid site name"),
        .init(name: "site data missing", yaml: ConfigFixture.with(("  data: /var/lib/ferry/east\n", "")),
              path: "site.data", phrase: "missing; required"),
        .init(name: "site data empty", yaml: ConfigFixture.with(("data: /var/lib/ferry/east", "data: \"\"")),
              path: "site.data", phrase: "\"\" is not a directory"),
        .init(name: "site is a list", yaml: ConfigFixture.with(("  name: east\n  data: /var/lib/ferry/east\n", "  - east\n")),
              path: "site", phrase: "expected a map with name and data, found a list"),
        .init(name: "site is text", yaml: ConfigFixture.with(("site:\n  name: east\n  data: /var/lib/ferry/east\n", "site: east\n")),
              path: "site", phrase: "found \"east\""),
        .init(name: "site section missing", yaml: ConfigFixture.with(("site:\n  name: east\n  data: /var/lib/ferry/east\n", "")),
              path: "site.data", phrase: "missing; required", count: 2),
        .init(name: "data spelled data-dir", yaml: ConfigFixture.with(("  data: /", "  data-dir: /")),
              path: "site.data-dir", phrase: "unknown field; did you mean \"data\"?", count: 2),

        // top level
        .init(name: "section name misspelled", yaml: ConfigFixture.with(("volumes:", "volume:")),
              path: "volume", phrase: "unknown field; did you mean \"volumes\"?"),
        .init(name: "unknown section", yaml: ConfigFixture.with(("log-level: debug", "colour: blue")),
              path: "colour", phrase: "unknown field; the fields here are site, listen, peers, volumes, trees, log-level"),
        .init(name: "whole file is a list", yaml: "- site\n- listen\n",
              path: "", phrase: "expected a map with the sections site, listen, peers, volumes, trees, log-level, found a list"),
        .init(name: "whole file is one word", yaml: "east\n", path: "", phrase: "found \"east\""),
        .init(name: "empty file", yaml: "", path: "", phrase: "the file is empty"),
        .init(name: "only comments", yaml: "# east\n", path: "", phrase: "the file is empty"),

        // YAML syntax
        .init(name: "colon inside a value", yaml: ConfigFixture.with(("name: east", "name: east: x")),
              path: "line 3, column 13", phrase: "not valid YAML: mapping values are not allowed in this context"),
        .init(name: "tab indentation", yaml: ConfigFixture.with(("  data: /var", "\tdata: /var")),
              path: "line 4, column 1", phrase: "not valid YAML"),
        .init(name: "unclosed quote", yaml: ConfigFixture.with(("address: 10.0.0.2:7800", "address: \"10.0.0.2:7800")),
              path: "line 15, column 15", phrase: "did not find expected key (while parsing a block mapping at line 12, column 5)"),
        .init(name: "duplicate key", yaml: ConfigFixture.with(("  north:\n", "  west:\n")),
              path: "line 11, column 3", phrase: "key \"west\" appears more than once in the same map"),
        .init(name: "one name as a number and as text", yaml: ConfigFixture.with(("  vm2:", "  1:"), ("  vm1:", "  \"1\":")),
              path: "volumes.1", phrase: "appears more than once; keep one"),
        .init(name: "two documents", yaml: ConfigFixture.yaml + "---\nsite: {}\n",
              path: "line 25, column 1", phrase: "a second YAML document starts here"),

        // listen
        .init(name: "replication missing", yaml: ConfigFixture.with(("  replication: 0.0.0.0:7800\n", "")),
              path: "listen.replication", phrase: "missing; required"),
        .init(name: "replication without port", yaml: ConfigFixture.with(("replication: 0.0.0.0:7800", "replication: 0.0.0.0")),
              path: "listen.replication", phrase: "\"0.0.0.0\" is not a host:port; the port is missing"),
        .init(name: "replication port out of range", yaml: ConfigFixture.with(("0.0.0.0:7800", "0.0.0.0:78000")),
              path: "listen.replication", phrase: "\"78000\" is not a port; use a number from 1 to 65535"),
        .init(name: "IPv6 without brackets", yaml: ConfigFixture.with(("nbd: 127.0.0.1:10809", "nbd: ::1:10809")),
              path: "listen.nbd", phrase: "put an IPv6 address in brackets"),
        .init(name: "no NBD listener", yaml: ConfigFixture.with(("  nbd: 127.0.0.1:10809\n  nbd-socket: /run/ferry/east.nbd\n", "")),
              path: "listen", phrase: "set nbd or nbd-socket (or both)"),
        .init(name: "listen section missing",
              yaml: ConfigFixture.with(("listen:\n  replication: 0.0.0.0:7800\n  nbd: 127.0.0.1:10809\n  nbd-socket: /run/ferry/east.nbd\n  admin-socket: /run/ferry/east.admin\n", "")),
              path: "listen", phrase: "set nbd or nbd-socket (or both)", count: 2),
        .init(name: "nbd on the replication address", yaml: ConfigFixture.with(("127.0.0.1:10809", "0.0.0.0:7800")),
              path: "listen.nbd", phrase: "0.0.0.0:7800 is also the address of listen.replication"),
        .init(name: "nbd under the wildcard replication address", yaml: ConfigFixture.with(("127.0.0.1:10809", "127.0.0.1:7800")),
              path: "listen.nbd", phrase: "give NBD its own port, e.g. 127.0.0.1:10809"),
        .init(name: "metrics reachable from other machines without a token",
              yaml: ConfigFixture.with(("  admin-socket: /run/ferry/east.admin\n", "  admin-socket: /run/ferry/east.admin\n  metrics: 0.0.0.0:9480\n")),
              path: "listen.metrics", phrase: "is reachable from other machines, so the page and /metrics need a bearer token"),
        .init(name: "metrics on the NBD port", yaml: ConfigFixture.with(("  admin-socket: /run/ferry/east.admin\n", "  admin-socket: /run/ferry/east.admin\n  metrics: 127.0.0.1:10809\n")),
              path: "listen.metrics", phrase: "is also the address of listen.nbd"),
        .init(name: "metrics token file without metrics",
              yaml: ConfigFixture.with(("  admin-socket: /run/ferry/east.admin\n", "  admin-socket: /run/ferry/east.admin\n  metrics-token-file: /etc/ferry/t\n")),
              path: "listen.metrics-token-file", phrase: "is set but listen.metrics is not"),
        .init(name: "nbd is a map", yaml: ConfigFixture.with(("nbd: 127.0.0.1:10809", "nbd: {host: 127.0.0.1, port: 10809}")),
              path: "listen.nbd", phrase: "expected a value such as 127.0.0.1:10809, found a map"),
        .init(name: "nbd-socket is the admin socket", yaml: ConfigFixture.with(("/run/ferry/east.admin", "/run/ferry/east.nbd")),
              path: "listen.admin-socket", phrase: "give each socket its own path"),
        .init(name: "nbd-socket is the default admin socket",
              yaml: ConfigFixture.with(("  admin-socket: /run/ferry/east.admin\n", ""), ("/run/ferry/east.nbd", "/var/lib/ferry/east/admin.sock")),
              path: "listen.nbd-socket", phrase: "is also the admin socket"),
        .init(name: "socket path too long", yaml: ConfigFixture.with(("/run/ferry/east.nbd", "/run/" + String(repeating: "x", count: 120))),
              path: "listen.nbd-socket", phrase: "a Unix socket path can have; use a shorter path"),
        .init(name: "default admin socket too long",
              yaml: ConfigFixture.with(("  admin-socket: /run/ferry/east.admin\n", ""), ("/var/lib/ferry/east", "/" + String(repeating: "d", count: 100))),
              path: "listen.admin-socket", phrase: "set admin-socket to a shorter path"),
        .init(name: "camelCase key", yaml: ConfigFixture.with(("nbd-socket:", "nbdSocket:")),
              path: "listen.nbdSocket", phrase: "unknown field; did you mean \"nbd-socket\"?"),

        // peers
        .init(name: "peers as a list", yaml: ConfigFixture.with(("  west:\n    address", "  - address"), ("  north:\n    address", "  - address")),
              path: "peers", phrase: "expected a map from peer name to its address and site-id, found a list; write each peer as `west:`"),
        .init(name: "peer named like this site", yaml: ConfigFixture.with(("  north:", "  east:")),
              path: "peers.east", phrase: "\"east\" is this site's own name"),
        .init(name: "peer name invalid", yaml: ConfigFixture.with(("  north:", "  North_1:")),
              path: "peers.North_1", phrase: "is not a valid site name"),
        .init(name: "peer site ID too short", yaml: ConfigFixture.with(("site-id: \(SiteID(ConfigFixture.westID)!)", "site-id: abc")),
              path: "peers.west.site-id", phrase: "\"abc\" is not a site ID; paste the 64-hex-digit ID that `ferry id` prints on west"),
        .init(name: "peer site ID missing", yaml: ConfigFixture.with(("    site-id: \(SiteID(ConfigFixture.westID)!)\n", "")),
              path: "peers.west.site-id", phrase: "missing; required"),
        .init(name: "peer address missing", yaml: ConfigFixture.with(("    address: 10.0.0.2:7800\n", "")),
              path: "peers.west.address", phrase: "missing; required"),
        .init(name: "peer on port 0", yaml: ConfigFixture.with(("10.0.0.2:7800", "10.0.0.2:0")),
              path: "peers.west.address", phrase: "port 0 only makes sense for listening"),
        .init(name: "peer field misspelled", yaml: ConfigFixture.with(("    address: 10.0.0.2", "    adress: 10.0.0.2")),
              path: "peers.west.adress", phrase: "unknown field; did you mean \"address\"?", count: 2),
        .init(name: "peer without fields", yaml: ConfigFixture.with(("  west:\n    address: 10.0.0.2:7800\n    site-id: \(SiteID(ConfigFixture.westID)!)\n", "  west:\n")),
              path: "peers.west.address", phrase: "missing; required", count: 2),
        .init(name: "two peers with one site ID", yaml: ConfigFixture.with(("\"\(ConfigFixture.northID)\"", ConfigFixture.westID)),
              path: "peers.west.site-id", phrase: "same site ID as peers.north"),
        .init(name: "two peers at one address", yaml: ConfigFixture.with(("\"[fd00::3]:7801\"", "10.0.0.2:7800")),
              path: "peers.west.address", phrase: "10.0.0.2:7800 is also the address of peers.north"),
        .init(name: "peer at this site's own address", yaml: ConfigFixture.with(("replication: 0.0.0.0:7800", "replication: 10.0.0.2:7800")),
              path: "peers.west.address", phrase: "is this site's own listen.replication"),

        // volumes
        .init(name: "size not a size", yaml: ConfigFixture.with(("size: 20G", "size: 20X")),
              path: "volumes.vm1.size", phrase: "\"20X\" is not a size; use 512M, 20G, 1T"),
        .init(name: "size zero", yaml: ConfigFixture.with(("size: 20G", "size: 0")),
              path: "volumes.vm1.size", phrase: "a volume needs more than 0 bytes"),
        .init(name: "size not whole blocks", yaml: ConfigFixture.with(("size: 20G", "size: 1000")),
              path: "volumes.vm1.size", phrase: "\"1000\" (1000 bytes) is not a multiple of 4096 bytes; use 4K"),
        .init(name: "size negative", yaml: ConfigFixture.with(("size: 20G", "size: -1G")),
              path: "volumes.vm1.size", phrase: "is not a size"),
        .init(name: "size too large", yaml: ConfigFixture.with(("size: 20G", "size: 8192P")),
              path: "volumes.vm1.size", phrase: "larger than an image file can be"),
        .init(name: "size is a list", yaml: ConfigFixture.with(("size: 20G", "size: [20G]")),
              path: "volumes.vm1.size", phrase: "expected a value such as 20G, found a list"),
        .init(name: "size misspelled", yaml: ConfigFixture.with(("    size: 20G", "    sise: 20G")),
              path: "volumes.vm1.sise", phrase: "unknown field; did you mean \"size\"?", count: 2),
        .init(name: "primary unknown", yaml: ConfigFixture.with(("primary: east", "primary: south")),
              path: "volumes.vm1.primary", phrase: "\"south\" is neither this site (\"east\") nor a configured peer (north, west)"),
        .init(name: "primary misspelled", yaml: ConfigFixture.with(("primary: east", "primary: eats")),
              path: "volumes.vm1.primary", phrase: "did you mean \"east\"?"),
        .init(name: "primary with no peers", yaml: ConfigFixture.with(("peers:", "peerz:")),
              path: "volumes.vm2.primary", phrase: "nor a configured peer (there are none)", count: 2),
        .init(name: "primary missing", yaml: ConfigFixture.with(("    primary: east\n", "")),
              path: "volumes.vm1.primary", phrase: "missing; required"),
        .init(name: "on-promote empty", yaml: ConfigFixture.with(("    primary: east\n", "    primary: east\n    on-promote: \" \"\n")),
              path: "volumes.vm1.on-promote", phrase: "empty; give the command to run after a promotion"),
        .init(name: "history neither size nor duration", yaml: ConfigFixture.with(("    primary: east\n", "    primary: east\n    history: forever\n")),
              path: "volumes.vm1.history", phrase: "\"forever\" is neither a size nor a duration; use a size such as 10G, a duration such as 24h or 7d"),
        .init(name: "history map with a bad size", yaml: ConfigFixture.with(("    primary: east\n", "    primary: east\n    history: {time: 24h, bytes: lots}\n")),
              path: "volumes.vm1.history.bytes", phrase: "\"lots\" is not a size of more than 0"),
        .init(name: "on-promote a list", yaml: ConfigFixture.with(("    primary: east\n", "    primary: east\n    on-promote: [a, b]\n")),
              path: "volumes.vm1.on-promote", phrase: "expected a value such as /usr/local/bin/start-vm1, found a list"),
        .init(name: "volume name in capitals", yaml: ConfigFixture.with(("  vm1:", "  VM1:")),
              path: "volumes.VM1", phrase: "is not a valid volume name"),
        .init(name: "volume without fields", yaml: ConfigFixture.with(("  vm1:\n    size: 20G\n    primary: east\n", "  vm1:\n")),
              path: "volumes.vm1.size", phrase: "missing; required", count: 2),
        .init(name: "volumes as a list", yaml: ConfigFixture.with(("  vm2:\n    size", "  - size"), ("  vm1:\n    size", "  - size")),
              path: "volumes", phrase: "found a list; write each volume as `vm1:`"),

        // volumes.<name>.replicas
        .init(name: "replicas as a list", yaml: ConfigFixture.withReplicas("- west"),
              path: "volumes.vm1.replicas", phrase: "expected a map from site name to how it replicates, found a list; write each replica as `west: { mode: sync }`"),
        .init(name: "replica given as a bare mode", yaml: ConfigFixture.withReplicas("west: semi-sync"),
              path: "volumes.vm1.replicas.west", phrase: "expected a map with mode and its options, found \"semi-sync\"; write it as `west: { mode: semi-sync }`"),
        .init(name: "replica mode missing", yaml: ConfigFixture.withReplicas("west: { on-peer-loss: block }"),
              path: "volumes.vm1.replicas.west.mode", phrase: "missing; required: one of sync, semi-sync, async, scheduled, e.g. mode: sync"),
        .init(name: "replica without fields", yaml: ConfigFixture.withReplicas("west:"),
              path: "volumes.vm1.replicas.west.mode", phrase: "missing; required"),
        .init(name: "replica mode unknown", yaml: ConfigFixture.withReplicas("west: { mode: synchronous }"),
              path: "volumes.vm1.replicas.west.mode", phrase: "\"synchronous\" is not a replication mode; did you mean \"sync\"? use one of sync, semi-sync, async, scheduled"),
        .init(name: "replica on an unknown site", yaml: ConfigFixture.withReplicas("south: { mode: sync }"),
              path: "volumes.vm1.replicas.south", phrase: "\"south\" is neither this site (\"east\") nor a configured peer (north, west); a replica is kept by this site or one of its peers"),
        .init(name: "replica name misspelled", yaml: ConfigFixture.withReplicas("wets: { mode: sync }"),
              path: "volumes.vm1.replicas.wets", phrase: "did you mean \"west\"?"),
        .init(name: "replica name invalid", yaml: ConfigFixture.withReplicas("West: { mode: sync }"),
              path: "volumes.vm1.replicas.West", phrase: "\"West\" is not a valid site name; use 1 to 63 lowercase letters, digits and dashes, starting with a letter or digit (e.g. \"west\")"),
        .init(name: "replica is the primary", yaml: ConfigFixture.withReplicas("east: { mode: async }"),
              path: "volumes.vm1.replicas.east", phrase: "\"east\" is the volume's primary; replicas are the other sites"),
        .init(name: "replica field misspelled", yaml: ConfigFixture.withReplicas("west: { mode: async, max_lag: 64M }"),
              path: "volumes.vm1.replicas.west.max_lag", phrase: "unknown field; did you mean \"max-lag\"?"),
        .init(name: "on-peer-loss on an async replica", yaml: ConfigFixture.withReplicas("north: { mode: async, on-peer-loss: block }"),
              path: "volumes.vm1.replicas.north.on-peer-loss", phrase: "on-peer-loss applies only to sync and semi-sync replicas, not async; remove it, or change the mode"),
        .init(name: "max-lag on a sync replica", yaml: ConfigFixture.withReplicas("west: { mode: sync, max-lag: 64M }"),
              path: "volumes.vm1.replicas.west.max-lag", phrase: "max-lag applies only to async replicas, not sync; remove it, or set mode: async"),
        .init(name: "journal-size on a scheduled replica", yaml: ConfigFixture.withReplicas("west: { mode: scheduled, every: 1h, journal-size: 4G }"),
              path: "volumes.vm1.replicas.west.journal-size", phrase: "journal-size applies only to async replicas, not scheduled"),
        .init(name: "every on an async replica", yaml: ConfigFixture.withReplicas("west: { mode: async, every: 1h }"),
              path: "volumes.vm1.replicas.west.every", phrase: "every applies only to scheduled replicas, not async; remove it, or set mode: scheduled"),
        .init(name: "on-peer-loss unknown", yaml: ConfigFixture.withReplicas("west: { mode: sync, on-peer-loss: wait }"),
              path: "volumes.vm1.replicas.west.on-peer-loss", phrase: "\"wait\" is not an on-peer-loss policy; use one of degrade, block"),
        .init(name: "on-lag misspelled", yaml: ConfigFixture.withReplicas("west: { mode: async, on-lag: pullahead }"),
              path: "volumes.vm1.replicas.west.on-lag", phrase: "did you mean \"pull-ahead\"? use one of throttle, pull-ahead"),
        .init(name: "compression unknown", yaml: ConfigFixture.withReplicas("west: { mode: sync, compression: lz4 }"),
              path: "volumes.vm1.replicas.west.compression", phrase: "\"lz4\" is not a compression method; use one of zstd, none"),
        .init(name: "max-lag neither size nor duration", yaml: ConfigFixture.withReplicas("west: { mode: async, max-lag: fast }"),
              path: "volumes.vm1.replicas.west.max-lag", phrase: "\"fast\" is neither a size nor a duration; use a size such as 64M, a duration such as 30s or 5m, or both as {bytes: 64M, time: 30s}"),
        .init(name: "max-lag as a list", yaml: ConfigFixture.withReplicas("west: { mode: async, max-lag: [64M, 30s] }"),
              path: "volumes.vm1.replicas.west.max-lag", phrase: "found a list"),
        .init(name: "max-lag map empty", yaml: ConfigFixture.withReplicas("west: { mode: async, max-lag: {} }"),
              path: "volumes.vm1.replicas.west.max-lag", phrase: "give bytes, time or both"),
        .init(name: "max-lag map with a wrong key and a bad time", yaml: ConfigFixture.withReplicas("west: { mode: async, max-lag: {bytez: 64M, time: 1.5m} }"),
              path: "volumes.vm1.replicas.west.max-lag.time", phrase: "\"1.5m\" is not a duration; use a number followed by s, m, h or d", count: 2),
        .init(name: "max-lag beyond the journal", yaml: ConfigFixture.withReplicas("west: { mode: async, max-lag: 2G }"),
              path: "volumes.vm1.replicas.west.max-lag", phrase: "2G of lag cannot fit in the default journal-size of 1G, which holds what the replica has not received; lower max-lag or set journal-size: 2G or more"),
        .init(name: "journal-size too small", yaml: ConfigFixture.withReplicas("west: { mode: async, max-lag: 5m, journal-size: 64K }"),
              path: "volumes.vm1.replicas.west.journal-size", phrase: "is too small for a journal; give at least 1M"),
        .init(name: "resync-rate not a rate", yaml: ConfigFixture.withReplicas("west: { mode: sync, resync-rate: fast }"),
              path: "volumes.vm1.replicas.west.resync-rate", phrase: "\"fast\" is not a rate; give bytes per second as a size, e.g. 100M"),
        .init(name: "scheduled without every or at", yaml: ConfigFixture.withReplicas("west: { mode: scheduled }"),
              path: "volumes.vm1.replicas.west", phrase: "a scheduled replica needs every or at: every: 1h, or at: \"02:00\" (daily), with on: sunday (weekly)"),
        .init(name: "scheduled with every and at", yaml: ConfigFixture.withReplicas("west: { mode: scheduled, every: 1h, at: \"02:00\" }"),
              path: "volumes.vm1.replicas.west.at", phrase: "give every or at, not both"),
        .init(name: "every of years", yaml: ConfigFixture.withReplicas("west: { mode: scheduled, every: 9223372036854775807s }"),
              path: "volumes.vm1.replicas.west.every", phrase: "is longer than 52 weeks; give every: 52w or less"),
        .init(name: "every in mebibytes", yaml: ConfigFixture.withReplicas("west: { mode: scheduled, every: 1M }"),
              path: "volumes.vm1.replicas.west.every", phrase: "minutes are a lowercase m"),
        .init(name: "on with every", yaml: ConfigFixture.withReplicas("west: { mode: scheduled, every: 1d, on: sunday }"),
              path: "volumes.vm1.replicas.west.on", phrase: "on goes with at (a weekly point at a time of day), not with every"),
        .init(name: "on alone", yaml: ConfigFixture.withReplicas("west: { mode: scheduled, on: sunday }"),
              path: "volumes.vm1.replicas.west", phrase: "a scheduled replica needs every or at"),
        .init(name: "every under a minute", yaml: ConfigFixture.withReplicas("west: { mode: scheduled, every: 30s }"),
              path: "volumes.vm1.replicas.west.every", phrase: "\"30s\" is 30s, shorter than a minute; give every: 1m or more (or use mode: async"),
        .init(name: "every in words", yaml: ConfigFixture.withReplicas("west: { mode: scheduled, every: hourly }"),
              path: "volumes.vm1.replicas.west.every", phrase: "\"hourly\" is not an interval; use a number followed by s, m, h, d or w (lowercase), e.g. 15m, 1h, 1d, 1w"),
        .init(name: "at out of range", yaml: ConfigFixture.withReplicas("west: { mode: scheduled, at: \"24:00\" }"),
              path: "volumes.vm1.replicas.west.at", phrase: "\"24:00\" is not a time of day; use HH:MM from 00:00 to 23:59, in quotes, e.g. at: \"02:00\""),
        .init(name: "on misspelled", yaml: ConfigFixture.withReplicas("west: { mode: scheduled, at: \"02:00\", on: sundays }"),
              path: "volumes.vm1.replicas.west.on", phrase: "\"sundays\" is not a day of the week; did you mean \"sunday\"? use monday … sunday or mon … sun"),
        .init(name: "replica checked against a broken peers section", yaml: ConfigFixture.with(("peers:", "peerz:"), ("    primary: east\n", "    primary: east\n    replicas:\n      south: { mode: sync }\n")),
              path: "volumes.vm2.primary", phrase: "nor a configured peer (there are none)", count: 3),

        // log-level
        .init(name: "log level abbreviated", yaml: ConfigFixture.with(("log-level: debug", "log-level: warn")),
              path: "log-level", phrase: "\"warn\" is not a log level; did you mean \"warning\"? use one of trace, debug, info, notice, warning, error, critical"),
        .init(name: "log level unknown", yaml: ConfigFixture.with(("log-level: debug", "log-level: loud")),
              path: "log-level", phrase: "\"loud\" is not a log level; use one of"),
        .init(name: "log level is a map", yaml: ConfigFixture.with(("log-level: debug", "log-level: {peers: debug}")),
              path: "log-level", phrase: "expected a value such as info, found a map"),
    ]
}

@Suite("SiteConfig mistakes")
struct ConfigMistakeTests {
    @Test("every kind of mistake is reported at its field path", arguments: ConfigMistake.all)
    func mistake(_ mistake: ConfigMistake) {
        let problems = ConfigFixture.problems(mistake.yaml)
        let listing = problems.map(\.description).joined(separator: "\n")
        #expect(problems.contains { $0.path == mistake.path && $0.message.contains(mistake.phrase) },
                "expected \(mistake.path): …\(mistake.phrase)…, got:\n\(listing)")
        #expect(problems.count == mistake.count, "got:\n\(listing)")
    }

    @Test("a file with many mistakes reports every one of them, in order, in one error")
    func manyMistakes() throws {
        let yaml = """
            site:
              name: East
            listen:
              replication: 0.0.0.0
              nbd-sockt: /run/east.nbd
            peers:
              west:
                address: 10.0.0.2:0
                site-id: abc
            volumes:
              vm1:
                size: 20X
                primary: north
              vm2:
                size: 4097
                primary: west
            log-level: loud
            """
        let error = #expect(throws: ConfigProblems.self) { try SiteConfig.parse(yaml: yaml, path: "/etc/ferry/east.yaml") }
        let problems = try #require(error).problems
        #expect(problems.map(\.path) == [
            "site.name", "site.data",
            "listen.nbd-sockt", "listen.replication", "listen",
            "peers.west.address", "peers.west.site-id",
            "volumes.vm1.size", "volumes.vm2.size",
            "log-level",
        ])
        #expect(problems.map(\.line) == [2, 1, 5, 4, 3, 8, 9, 12, 15, 17])
        // site.name is invalid, so vm1's primary cannot be checked against it and is not blamed too.
        let text = try #require(error).description
        #expect(text.split(separator: "\n").count == problems.count)
        #expect(text.hasPrefix("/etc/ferry/east.yaml: site.name: \"East\" is not a valid site name"))
        #expect(text.contains("\n/etc/ferry/east.yaml: listen.nbd-sockt: unknown field; did you mean \"nbd-socket\"?\n"))
    }

    @Test("mistakes in several replicas of several volumes are all reported, in file order")
    func manyReplicaMistakes() throws {
        let yaml = ConfigFixture.with(("    primary: east\n", """
                primary: east
                replicas:
                  west: { mode: sync, max-lag: 64M }
                  north: { mode: asynch, on-lag: drop }
                  south: { mode: scheduled }
                  east: { mode: async }

            """), ("    primary: west\n", """
                primary: west
                replicas:
                  west: { mode: sync }
                  east: { mode: scheduled, every: 30s, at: "02:00" }

            """))
        let error = #expect(throws: ConfigProblems.self) { try SiteConfig.parse(yaml: yaml, path: ConfigFixture.file) }
        let problems = try #require(error).problems
        let listing = problems.map(\.description).joined(separator: "\n")
        #expect(problems.map(\.path) == [
            "volumes.vm2.replicas.west",
            "volumes.vm2.replicas.east.at", "volumes.vm2.replicas.east.every",
            "volumes.vm1.replicas.west.max-lag",
            "volumes.vm1.replicas.north.mode", "volumes.vm1.replicas.north.on-lag",
            "volumes.vm1.replicas.south", "volumes.vm1.replicas.south",
            "volumes.vm1.replicas.east",
        ], "\(listing)")
        #expect(problems[4].message.contains("did you mean \"async\"?"), "\(listing)")
        // The mode is unknown, so on-lag is checked on its own, not as an option of the wrong mode.
        #expect(problems[5].message.contains("\"drop\" is not an on-lag policy"), "\(listing)")
        #expect(problems.allSatisfy { $0.line != nil }, "\(listing)")
    }
}
