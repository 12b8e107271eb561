import FerryCore

/// Display helpers over FerryCore's pure formatting.
enum FerryCoreFormat {
    static func size(_ bytes: UInt64) -> String { ByteSize.format(bytes) }
}
