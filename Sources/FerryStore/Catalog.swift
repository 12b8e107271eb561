import Foundation
import GRDB

/// What the site knows about one volume, kept in the catalog.
public struct VolumeRecord: Codable, Equatable, Sendable, FetchableRecord, PersistableRecord {
    public static let databaseTableName = "volume"

    public var name: String
    /// Stable identity of the volume across sites and renames of its image file.
    public var uuid: String
    public var sizeBytes: Int64
    /// Bumped by every promotion (DESIGN §2); 1 when the volume is created.
    public var epoch: Int64
    /// The current generation's ID: one span of history under one primary.
    public var generation: String
    public var createdAt: Date
    /// The role this site took at run time (`primary` after `ferry promote`, `secondary` after
    /// `ferry demote`), which outlives restarts and the config's `primary:`; nil: the config decides.
    public var role: String?
    /// The generations this site's image descends from, oldest first, as JSON
    /// (``FerryCore/GenerationRecord``); empty until the first promotion or demotion.
    public var history: String

    public init(name: String, uuid: String, sizeBytes: Int64, epoch: Int64, generation: String, createdAt: Date,
                role: String? = nil, history: String = "[]") {
        self.name = name
        self.uuid = uuid
        self.sizeBytes = sizeBytes
        self.epoch = epoch
        self.generation = generation
        self.createdAt = createdAt
        self.role = role
        self.history = history
    }
}

/// The site's SQLite catalog: volume metadata now; generations, positions and trees later.
///
/// SQLite in WAL mode with `synchronous=FULL`, so a committed change survives a power loss.
public final class Catalog: Sendable {
    private let db: DatabaseQueue
    public let path: String

    public init(path: String) throws {
        self.path = path
        var config = Configuration()
        config.prepareDatabase { db in
            try db.execute(sql: "PRAGMA synchronous = FULL")
        }
        do {
            db = try DatabaseQueue(path: path, configuration: config)
            try db.writeWithoutTransaction { try $0.execute(sql: "PRAGMA journal_mode = WAL") }
            try Self.migrator.migrate(db)
        } catch let error as DatabaseError {
            throw StoreError("open catalog", path: path, detail: error.message ?? "\(error)")
        }
    }

    private static var migrator: DatabaseMigrator {
        var m = DatabaseMigrator()
        m.registerMigration("v1-volumes") { db in
            try db.create(table: "volume") { t in
                t.primaryKey("name", .text)
                t.column("uuid", .text).notNull().unique()
                t.column("sizeBytes", .integer).notNull()
                t.column("epoch", .integer).notNull()
                t.column("generation", .text).notNull()
                t.column("createdAt", .datetime).notNull()
            }
        }
        m.registerMigration("v2-roles") { db in
            try db.alter(table: "volume") { t in
                t.add(column: "role", .text)
                t.add(column: "history", .text).notNull().defaults(to: "[]")
            }
        }
        m.registerMigration("v3-trees") { db in
            try db.execute(sql: """
                CREATE TABLE tree_file (tree TEXT NOT NULL, path BLOB NOT NULL, record BLOB NOT NULL,
                                        PRIMARY KEY (tree, path)) WITHOUT ROWID;
                CREATE TABLE tree_state (tree TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
                                         PRIMARY KEY (tree, key)) WITHOUT ROWID;
                """)
        }
        // The files cache became one record per directory (issue 11): the per-file rows are
        // dropped, so the next scan reads every file once and asks the peer which chunks it lacks.
        m.registerMigration("v4-tree-directories") { db in
            try db.execute(sql: """
                DROP TABLE tree_file;
                CREATE TABLE tree_dir (tree TEXT NOT NULL, path BLOB NOT NULL, record BLOB NOT NULL,
                                       PRIMARY KEY (tree, path)) WITHOUT ROWID;
                DELETE FROM tree_state WHERE key = 'cacheRoot';
                """)
        }
        return m
    }

    // MARK: trees

    /// The files cache of a tree's source (issue 11): a directory's path bytes → the scanner's
    /// record of it.
    public func treeDirectories(tree: String) throws -> [(path: [UInt8], record: [UInt8])] {
        try db.read { db in
            try Row.fetchAll(db, sql: "SELECT path, record FROM tree_dir WHERE tree = ?", arguments: [tree])
                .map { (Array($0["path"] as Data), Array($0["record"] as Data)) }
        }
    }

    /// Updates a tree's files cache and its state values in one transaction.
    public func updateTree(_ tree: String, upsert: [(path: [UInt8], record: [UInt8])], delete: [[UInt8]],
                           state: [String: String?] = [:]) throws {
        try db.write { db in
            for (path, record) in upsert {
                try db.execute(sql: "INSERT OR REPLACE INTO tree_dir (tree, path, record) VALUES (?, ?, ?)",
                               arguments: [tree, Data(path), Data(record)])
            }
            for path in delete {
                try db.execute(sql: "DELETE FROM tree_dir WHERE tree = ? AND path = ?", arguments: [tree, Data(path)])
            }
            for (key, value) in state {
                if let value {
                    try db.execute(sql: "INSERT OR REPLACE INTO tree_state (tree, key, value) VALUES (?, ?, ?)",
                                   arguments: [tree, key, value])
                } else {
                    try db.execute(sql: "DELETE FROM tree_state WHERE tree = ? AND key = ?", arguments: [tree, key])
                }
            }
        }
    }

    public func treeState(_ tree: String) throws -> [String: String] {
        try db.read { db in
            Dictionary(try Row.fetchAll(db, sql: "SELECT key, value FROM tree_state WHERE tree = ?", arguments: [tree])
                .map { ($0["key"] as String, $0["value"] as String) }, uniquingKeysWith: { a, _ in a })
        }
    }

    /// Records `role` alone (`fenced`: another site holds a newer epoch; kept so that a restart
    /// does not take writes again before the link says so).
    public func setRole(name: String, role: String) throws {
        try db.write { db in
            try db.execute(sql: "UPDATE volume SET role = ? WHERE name = ?", arguments: [role, name])
        }
    }

    /// Records a role change of this site for `name` in one transaction: the role, the epoch, the
    /// current generation and the history. A promotion calls it before anything is exported
    /// read-write, so a crash after it restarts in the new role (never the old one).
    public func setRole(name: String, role: String, epoch: Int64, generation: String, history: String) throws {
        try db.write { db in
            guard var record = try VolumeRecord.fetchOne(db, key: name) else {
                throw StoreError("record role", path: name, detail: "the catalog has no volume \(name)")
            }
            record.role = role
            record.epoch = epoch
            record.generation = generation
            record.history = history
            try record.update(db)
        }
    }

    public func volume(named name: String) throws -> VolumeRecord? {
        try db.read { try VolumeRecord.fetchOne($0, key: name) }
    }

    public func volumes() throws -> [VolumeRecord] {
        try db.read { try VolumeRecord.order(Column("name")).fetchAll($0) }
    }

    /// Returns the volume's record, creating it (new UUID, epoch 1, a first generation) when it is
    /// new. A recorded size that differs from `sizeBytes` is an error: resizing is not supported.
    public func ensureVolume(name: String, sizeBytes: UInt64, now: Date = Date()) throws -> (record: VolumeRecord, created: Bool) {
        try db.write { db in
            if let existing = try VolumeRecord.fetchOne(db, key: name) {
                guard existing.sizeBytes == Int64(sizeBytes) else {
                    throw StoreError("open volume", path: name, detail:
                        "the catalog records \(existing.sizeBytes) bytes but the configuration says \(sizeBytes); "
                        + "Ferry does not resize volumes yet — set volumes.\(name).size back to \(existing.sizeBytes)")
                }
                return (existing, false)
            }
            let record = VolumeRecord(name: name, uuid: UUID().uuidString.lowercased(),
                                      sizeBytes: Int64(sizeBytes), epoch: 1,
                                      generation: UUID().uuidString.lowercased(), createdAt: now)
            try record.insert(db)
            return (record, true)
        }
    }
}
