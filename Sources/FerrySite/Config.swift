import FerryCore
import Foundation
import Logging
import Yams

/// A site's configuration: one YAML file per site, documented field by field in
/// `docs/configuration.md`.
///
/// Read it with ``load(path:)`` or ``parse(yaml:path:)``: the whole file is validated and every
/// problem is reported at once, each with its field path (``ConfigProblems``). A value of this type
/// is therefore always valid: names are well formed, every volume's primary is this site or a
/// configured peer and so is each of its replicas (never the primary itself), each replica has only
/// the options of its mode, listen addresses do not collide, and paths are absolute. ``yaml()`` writes it
/// back in a form that parses to an equal value.
public struct SiteConfig: Sendable, Equatable {
    public var site: SiteSection
    public var listen: ListenSection
    /// Sorted by name.
    public var peers: [PeerConfig]
    /// Sorted by name.
    public var volumes: [VolumeConfig]
    /// Sorted by name.
    public var trees: [TreeConfig] = []
    /// One of `trace`, `debug`, `info`, `notice`, `warning`, `error`, `critical`; `info` by default.
    public var logLevel: String
    /// The absolute path of the file this configuration was read from (or is to be written to);
    /// relative paths inside it were resolved against its directory.
    public var path: String

    public init(site: SiteSection, listen: ListenSection, peers: [PeerConfig] = [],
                volumes: [VolumeConfig] = [], logLevel: String = "info", path: String) {
        self.site = site
        self.listen = listen
        self.peers = peers.sorted { $0.name < $1.name }
        self.volumes = volumes.sorted { $0.name < $1.name }
        self.logLevel = logLevel
        self.path = path
    }

    /// ``logLevel`` as swift-log's level.
    public var loggerLevel: Logger.Level { Logger.Level(rawValue: logLevel) ?? .info }

    public func peer(named name: String) -> PeerConfig? { peers.first { $0.name == name } }
    public func volume(named name: String) -> VolumeConfig? { volumes.first { $0.name == name } }
    public func tree(named name: String) -> TreeConfig? { trees.first { $0.name == name } }

    /// Reads and validates the file at `path` (relative to the current directory if not absolute).
    ///
    /// A missing, unreadable or empty file is reported as a ``ConfigProblem`` with an empty path,
    /// like any other mistake.
    public static func load(path: String) throws(ConfigProblems) -> SiteConfig {
        let file = ConfigPath.absolute(path)
        let text: String
        do {
            text = try ConfigPath.readText(file)
        } catch {
            throw ConfigProblems(file: file, problems: [ConfigProblem(path: "", message: error.message)])
        }
        return try parse(yaml: text, path: file)
    }

    /// Validates `yaml` as the contents of the file at `path`; `path` names the file in messages
    /// and is the base for relative paths inside it. Nothing is read from disk.
    public static func parse(yaml: String, path: String) throws(ConfigProblems) -> SiteConfig {
        let file = ConfigPath.absolute(path)
        let root: Node?
        do {
            root = try Yams.compose(yaml: yaml)
        } catch {
            throw ConfigProblems(file: file, problems: [ConfigReader.syntaxProblem(error, in: yaml)])
        }
        guard let root, root.null == nil else {
            throw ConfigProblems(file: file, problems: [ConfigProblem(path: "",
                message: "the file is empty; it needs at least the site and listen sections (see docs/configuration.md)")])
        }
        var reader = ConfigReader(directory: ConfigPath.directory(of: file))
        let config = reader.read(root, file: file)
        guard let config, reader.problems.isEmpty else {
            throw ConfigProblems(file: file, problems: reader.problems)
        }
        return config
    }

    /// The levels `log-level` accepts, from most to least verbose.
    public static let logLevels: [String] = Logger.Level.allCases.map(\.rawValue)
}

/// The `site` section: who this site is and where it keeps its state.
public struct SiteSection: Sendable, Equatable {
    /// A ``SiteName``: 1 to 63 of `a-z`, `0-9` and `-`, not starting with `-`. Peers know this site by this name.
    public var name: String
    /// Absolute path of the data directory: identity, catalog, images.
    public var dataDirectory: String

    public init(name: String, dataDirectory: String) {
        self.name = name
        self.dataDirectory = dataDirectory
    }
}

/// The `listen` section: where this site accepts peers, NBD clients and the CLI.
public struct ListenSection: Sendable, Equatable {
    /// Peer links (TLS).
    public var replication: HostPort
    /// NBD over TCP; at least one of `nbd` and `nbdSocket` is set when the file has volumes.
    public var nbd: HostPort?
    /// NBD over a Unix socket (absolute path).
    public var nbdSocket: String?
    /// The admin API's Unix socket (absolute path); `<data>/admin.sock` unless configured.
    public var adminSocket: String
    /// Prometheus metrics (`/metrics`) and the status page (`/`) over HTTP; off when nil.
    public var metrics: HostPort?
    /// A file holding the bearer token the metrics listener asks for (absolute path); required
    /// when `metrics` is not a loopback address.
    public var metricsTokenFile: String?

    public init(replication: HostPort, nbd: HostPort? = nil, nbdSocket: String? = nil, adminSocket: String,
                metrics: HostPort? = nil, metricsTokenFile: String? = nil) {
        self.replication = replication
        self.nbd = nbd
        self.nbdSocket = nbdSocket
        self.adminSocket = adminSocket
        self.metrics = metrics
        self.metricsTokenFile = metricsTokenFile
    }

    /// The admin socket used when `listen.admin-socket` is not set.
    public static func defaultAdminSocket(dataDirectory: String) -> String {
        ConfigPath.join(dataDirectory, "admin.sock")
    }
}

/// One entry of `peers`: another site this one replicates with, pinned by its site ID.
public struct PeerConfig: Sendable, Equatable {
    /// The peer's own `site.name`.
    public var name: String
    /// Where the peer's `listen.replication` is reachable from here; port 1...65535.
    public var address: HostPort
    /// The fingerprint the peer's certificate must have (`ferry id` on the peer prints it).
    public var siteID: SiteID

    public init(name: String, address: HostPort, siteID: SiteID) {
        self.name = name
        self.address = address
        self.siteID = siteID
    }
}

/// One entry of `volumes`: a block device replicated between this site and its peers.
public struct VolumeConfig: Sendable, Equatable {
    /// 1 to 63 of `a-z`, `0-9`, `.`, `_` and `-`, starting with a letter or digit.
    public var name: String
    /// More than 0 and a multiple of 4096.
    public var sizeBytes: UInt64
    /// The site meant to serve the volume read-write: this site's name or a configured peer's.
    public var primary: String
    /// The sites that keep a replica, by name (this site or configured peers, never the primary),
    /// each with how it replicates. Empty: the volume is not replicated.
    public var replicas: [String: ReplicaPolicy]
    /// A shell command run on this site after `ferry promote` made it the volume's primary (to
    /// start the VM, say), with FERRY_VOLUME, FERRY_NBD_URI and FERRY_EPOCH in its environment.
    public var onPromote: String?
    /// How long (and/or how many bytes of before-images) a secondary keeps recovery points for
    /// `ferry points` and `promote --at` (issue 10 §6). Nil: no history; a catch-up still keeps
    /// the state it started from until it completes (P3).
    public var history: HistoryLimit?

    public init(name: String, sizeBytes: UInt64, primary: String, replicas: [String: ReplicaPolicy] = [:], onPromote: String? = nil) {
        self.name = name
        self.sizeBytes = sizeBytes
        self.primary = primary
        self.replicas = replicas
        self.onPromote = onPromote
    }

    /// The names in ``replicas``, sorted.
    public var replicaNames: [String] { replicas.keys.sorted() }
}


/// `trees.<name>`: a directory replicated from its primary's `source` to a `target` directory on
/// each replica site (issue 11).
public struct TreeConfig: Sendable, Equatable {
    public enum Mode: String, Sendable, CaseIterable {
        /// Watched with inotify: a change is on the peers within about a second.
        case continuous
        /// A run at each point of ``schedule``.
        case scheduled
    }

    /// The same rule as a volume's name.
    public var name: String
    /// The site whose `source` directory is replicated.
    public var primary: String
    /// The directory replicated (absolute), on the primary.
    public var source: String
    /// Replica site → its target directory (absolute): the live mirror.
    public var replicas: [String: String]
    public var mode: Mode
    /// When `mode` is scheduled.
    public var schedule: Schedule?
    /// Glob patterns: without `/` a name anywhere, with `/` a path from the tree's root.
    public var exclude: [String]
    /// Which snapshots the replicas keep; nil keeps every one.
    public var keep: Retention?
    public var compression: ReplicationCompression
    /// The most bytes per second a run sends to each replica; nil: no limit.
    public var bandwidthLimit: UInt64?

    public init(name: String, primary: String, source: String, replicas: [String: String], mode: Mode,
                schedule: Schedule? = nil, exclude: [String] = [], keep: Retention? = nil,
                compression: ReplicationCompression = .zstd, bandwidthLimit: UInt64? = nil) {
        self.name = name
        self.primary = primary
        self.source = source
        self.replicas = replicas
        self.mode = mode
        self.schedule = schedule
        self.exclude = exclude
        self.keep = keep
        self.compression = compression
        self.bandwidthLimit = bandwidthLimit
    }
}
