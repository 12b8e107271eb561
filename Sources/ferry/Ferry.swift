import ArgumentParser
import FerryCore
import FerryMonitor
import FerrySite
import FerryWire
import Foundation
import Logging
import ServiceLifecycle

@main
struct Ferry: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ferry",
        abstract: "Replicate volumes and trees between sites.",
        discussion: """
            Start here: `ferry quickstart` runs two sites on this machine and exports a volume over NBD.
            A real site: `ferry init --site NAME --data DIR`, write a config (docs/configuration.md),
            then `ferry serve --config FILE` and `ferry status --config FILE`.
            """,
        version: BuildInfo.description,
        subcommands: [Init.self, ID.self, Serve.self, Status.self, Checkpoint.self, Promote.self, Demote.self, Diverged.self, Resolve.self, Switchover.self, Verify.self, Points.self, Drill.self, Tree.self, Quickstart.self])
}

/// Loads a config, or prints every problem and exits with status 2 (docs/configuration.md).
func loadConfigOrExit(_ path: String) throws -> SiteConfig {
    do {
        return try SiteConfig.load(path: path)
    } catch {
        FileHandle.standardError.write(Data("\(error)\n".utf8))
        throw ExitCode(2)
    }
}

/// The admin socket named by `--socket`, or by the config given with `--config`.
func adminSocket(config: String?, socket: String?) throws -> String {
    if let socket { return socket }
    if let config { return try loadConfigOrExit(config).listen.adminSocket }
    printError("say which site: --config FILE or --socket PATH")
    throw ExitCode(2)
}

func printError(_ message: String) {
    FileHandle.standardError.write(Data("ferry: \(message)\n".utf8))
}

struct Init: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a site's data directory and identity (a key and a self-signed certificate).")

    @Option(help: "The site's name: \(SiteName.rule).") var site: String
    @Option(help: "The site's data directory (created if missing).") var data: String

    func run() throws {
        guard SiteName.isValid(site) else {
            printError("--site \"\(site)\" is not a site name; use \(SiteName.rule) (east, dc-2)")
            throw ExitCode(2)
        }
        let dir = URL(fileURLWithPath: data).standardizedFileURL.path
        do {
            do {
                try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true,
                                                        attributes: [.posixPermissions: 0o700])
            } catch {
                // Foundation's own text names a Cocoa domain and code; say what failed, and why.
                let why = ((error as NSError).userInfo[NSUnderlyingErrorKey] as? NSError).map { String(cString: strerror(Int32($0.code))) }
                printError("cannot create the data directory \(dir)" + (why.map { ": \($0)" } ?? "")
                           + "; give --data a directory this user may create, or create it first")
                throw ExitCode(1)
            }
            let identity = try SiteIdentity.generate(siteName: site)
            try identity.write(to: dir)
            print("""
                created site \(site) in \(dir)
                site ID: \(identity.siteID)

                Give this ID to every peer of \(site): it goes in their config as peers.\(site).site-id.
                `ferry id --data \(dir)` prints it again. Nothing else was changed.
                """)
        } catch {
            printError("\(error)")
            throw ExitCode(1)
        }
    }
}

struct ID: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "id", abstract: "Print this site's ID (the SHA-256 of its certificate).")

    @Option(help: "The site's data directory.") var data: String?
    @Option(help: "The site's config file (its site.data is used).") var config: String?

    func run() throws {
        let dir: String
        if let data { dir = data } else if let config { dir = try loadConfigOrExit(config).site.dataDirectory } else {
            printError("say which site: --data DIR or --config FILE")
            throw ExitCode(2)
        }
        do {
            let identity = try SiteIdentity.load(from: dir)
            print("\(identity.siteID)  \(identity.siteName)")
        } catch {
            printError("\(error)")
            throw ExitCode(1)
        }
    }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run a site: NBD exports, peer links and the admin API, until SIGTERM or SIGINT.")

    @Option(help: "The site's config file.") var config: String

    func run() async throws {
        let cfg = try loadConfigOrExit(config)
        let level = cfg.loggerLevel
        LoggingSystem.bootstrap { label in JournalLogHandler(label: label, level: level) }
        var logger = Logger(label: "ferry")
        logger[metadataKey: "site"] = "\(cfg.site.name)"
        let monitor = cfg.listen.metrics == nil ? nil : MonitorServer(config: cfg, logger: logger)
        let site = Site(config: cfg, logger: logger, monitor: monitor)
        let group = ServiceGroup(configuration: .init(
            services: [.init(service: site)],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        do {
            try await group.run()
        } catch {
            printError("\(error)")
            throw ExitCode(1)
        }
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show a running site: its peers and their links, its volumes and exports.")

    @Option(help: "The site's config file.") var config: String?
    @Option(help: "The admin socket, instead of --config.") var socket: String?
    @Flag(help: "Print the JSON the admin API returns.") var json = false

    func run() throws {
        let path = try adminSocket(config: config, socket: socket)
        do {
            let (code, body) = try AdminClient.get(socketPath: path, path: "/v1/status")
            guard code == 200 else {
                printError("the daemon answered \(code): \(String(decoding: body, as: UTF8.self))")
                throw ExitCode(1)
            }
            if json {
                FileHandle.standardOutput.write(body)
            } else {
                let status = try SiteStatus.decoder().decode(SiteStatus.self, from: body)
                print(status.rendered(), terminator: "")
            }
        } catch let e as AdminClient.Failure {
            printError(e.description)
            throw ExitCode(1)
        }
    }
}

struct Checkpoint: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Cut a point of a volume now and send it to its scheduled replicas (before maintenance, or to test).")

    @Argument(help: "The volume.") var volume: String
    @Option(help: "The config file of the volume's primary site.") var config: String?
    @Option(help: "The admin socket, instead of --config.") var socket: String?

    func run() throws {
        try postVolumeAction("/v1/volumes/\(volume)/checkpoint", config: config, socket: socket, done: "point cut")
    }
}

/// POSTs an admin action and prints the daemon's message; exit 1 with its error otherwise.
func postVolumeAction(_ route: String, config: String?, socket: String?, done: String, timeoutSeconds: Int = 30) throws {
    let path = try adminSocket(config: config, socket: socket)
    do {
        let (code, body) = try AdminClient.post(socketPath: path, path: route, timeoutSeconds: timeoutSeconds)
        let object = (try? JSONSerialization.jsonObject(with: body)) as? [String: String]
        guard code == 200 else {
            printError(object?["error"] ?? "the daemon answered \(code): \(String(decoding: body, as: UTF8.self))")
            throw ExitCode(1)
        }
        print(object?["message"] ?? done)
    } catch let e as AdminClient.Failure {
        printError(e.description)
        throw ExitCode(1)
    }
}

struct Promote: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make this site the primary of a volume it holds a replica of (failover).",
        discussion: """
            Refuses while the current primary is reachable (demote it there first). A replica in the \
            middle of a catch-up is rolled back to the consistent state the catch-up started from \
            (--force-inconsistent keeps it as it is); one whose initial sync never completed is refused. \
            --at promotes a recovery point instead (`ferry points` lists them): the ransomware case. The \
            site takes a new epoch: a former primary that comes back is fenced and takes no writes until \
            it is demoted.
            """)

    @Argument(help: "The volume.") var volume: String
    @Option(help: "A recovery point: its ID, or a UTC time such as 2026-11-30T23:00:00Z (the newest point at or before it).") var at: String?
    @Flag(help: "Promote even though the current primary is reachable.") var force = false
    @Flag(help: "Promote an inconsistent replica (mid catch-up or initial sync) as it is, without rolling back.") var forceInconsistent = false
    @Option(help: "The config file of the site to promote.") var config: String?
    @Option(help: "The admin socket, instead of --config.") var socket: String?

    func run() throws {
        var query: [String] = []
        if force { query.append("force=1") }
        if forceInconsistent { query.append("force-inconsistent=1") }
        if let at { query.append("at=" + (at.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? at)) }
        try postVolumeAction("/v1/volumes/\(volume)/promote" + (query.isEmpty ? "" : "?" + query.joined(separator: "&")),
                             config: config, socket: socket, done: "promoted", timeoutSeconds: 600)
    }
}

struct Points: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the recovery points a secondary keeps of a volume (time, sequence, bytes to undo).",
        discussion: """
            A secondary keeps the states it received for the volume's `history:` window (a barrier of \
            a sync link at most once a second, every async group, every scheduled point). Promote one \
            with `ferry promote VOLUME --at ID`, or test it with `ferry drill VOLUME --at ID`.
            """)

    @Argument(help: "The volume.") var volume: String
    @Option(help: "The secondary's config file.") var config: String?
    @Option(help: "The admin socket, instead of --config.") var socket: String?

    func run() throws {
        try postVolumeAction("/v1/volumes/\(volume)/points", config: config, socket: socket, done: "")
    }
}

struct Drill: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Test a failover without downtime: export a writable clone of a recovery point on a secondary.",
        discussion: """
            Exports VOLUME-drill over NBD: the replica's state now (or at --at), copy-on-write, so a test \
            VM can boot and write while replication goes on untouched. `--end` discards the clone.
            """)

    @Argument(help: "The volume.") var volume: String
    @Option(help: "A recovery point: its ID, or a UTC time such as 2026-11-30T23:00:00Z.") var at: String?
    @Flag(help: "End the running drill and discard what it wrote.") var end = false
    @Option(help: "The secondary's config file.") var config: String?
    @Option(help: "The admin socket, instead of --config.") var socket: String?

    func run() throws {
        var query: [String] = []
        if end { query.append("end=1") }
        if let at { query.append("at=" + (at.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? at)) }
        try postVolumeAction("/v1/volumes/\(volume)/drill" + (query.isEmpty ? "" : "?" + query.joined(separator: "&")),
                             config: config, socket: socket, done: end ? "drill ended" : "drill started")
    }
}

struct Diverged: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the blocks of a volume this site kept aside when it was demoted (written here, maybe never replicated).")

    @Argument(help: "The volume.") var volume: String
    @Option(help: "The site's config file.") var config: String?
    @Option(help: "The admin socket, instead of --config.") var socket: String?

    func run() throws {
        try postVolumeAction("/v1/volumes/\(volume)/diverged", config: config, socket: socket, done: "")
    }
}

struct Switchover: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Move the primary role of a volume to a replica, planned, with no write lost.",
        discussion: """
            Run on the current primary. Drains the volume (its NBD clients are disconnected: shut the VM \
            down first, or let the new site's on-promote hook start it there), waits until the replica \
            holds every write durably, demotes this site and has the replica promote itself; each step \
            is printed. Until the demotion a failure changes nothing. Move back the same way from the \
            new primary.
            """)

    @Argument(help: "The volume.") var volume: String
    @Option(help: "The replica that becomes the primary.") var to: String
    @Option(help: "Seconds to wait for the replica at each step.") var timeout: Int = 60
    @Option(help: "The config file of the current primary's site.") var config: String?
    @Option(help: "The admin socket, instead of --config.") var socket: String?

    func run() throws {
        let site = to.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? to
        try postVolumeAction("/v1/volumes/\(volume)/switchover?to=\(site)&timeout=\(timeout)", config: config, socket: socket,
                             done: "switched over", timeoutSeconds: 2 * timeout + 30)
    }
}

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare a volume with a replica's copy, online, and report the exact ranges that differ.",
        discussion: """
            Run on the primary. Both sites hash their images (XXH3 per 4 MiB block; what differs is \
            hashed again per 64 KiB, then per 4 KiB), so a matching volume costs 8 bytes per 4 MiB on \
            the wire. Replication goes on meanwhile. --repair sends the differing ranges again.
            """)

    @Argument(help: "The volume.") var volume: String
    @Option(help: "The replica to compare with.") var peer: String
    @Flag(help: "Send the differing ranges to the replica again.") var repair = false
    @Option(help: "The config file of the primary's site.") var config: String?
    @Option(help: "The admin socket, instead of --config.") var socket: String?

    func run() throws {
        let site = peer.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? peer
        try postVolumeAction("/v1/volumes/\(volume)/verify?peer=\(site)" + (repair ? "&repair=1" : ""), config: config, socket: socket,
                             done: "verified", timeoutSeconds: 3600)
    }
}

struct Resolve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Settle a split brain: say which site's data of a volume to keep.",
        discussion: """
            Two sites that were both promoted and both took writes never resync on their own. Run this \
            on either of them: naming this site, the other gives way when next connected; naming the \
            other, this site gives way now. The site that gives way keeps aside what it wrote \
            (`ferry diverged VOLUME` there lists it), becomes a secondary, and receives only what differs.
            """)

    @Argument(help: "The volume.") var volume: String
    @Option(help: "The site whose data is kept.") var keep: String
    @Option(help: "The site's config file.") var config: String?
    @Option(help: "The admin socket, instead of --config.") var socket: String?

    func run() throws {
        let site = keep.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? keep
        try postVolumeAction("/v1/volumes/\(volume)/resolve?keep=\(site)", config: config, socket: socket, done: "resolved")
    }
}

struct Demote: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make this site a secondary of a volume it is primary of (after a failover, or before one).",
        discussion: "Refuses while NBD clients are connected. The image is flushed and served read-only; the next primary copies the volume here.")

    @Argument(help: "The volume.") var volume: String
    @Option(help: "The config file of the site to demote.") var config: String?
    @Option(help: "The admin socket, instead of --config.") var socket: String?

    func run() throws {
        try postVolumeAction("/v1/volumes/\(volume)/demote", config: config, socket: socket, done: "demoted")
    }
}
