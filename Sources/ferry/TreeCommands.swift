import ArgumentParser
import Foundation

/// `ferry tree …`: snapshots, restore, verify and sync of replicated directories (issue 11).
struct Tree: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Replicated directories: list snapshots, restore, verify, run now.",
        subcommands: [TreeSnapshots.self, TreeRestore.self, TreeVerify.self, TreeSync.self])
}

private func encoded(_ text: String) -> String {
    text.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-._~"))) ?? text
}

struct TreeSnapshots: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshots", abstract: "List the snapshots a replica keeps of a tree (ID, time, files, size).")

    @Argument(help: "The tree.") var tree: String
    @Option(help: "The config file of a site that keeps a replica of the tree.") var config: String?
    @Option(help: "The admin socket, instead of --config.") var socket: String?

    func run() throws {
        try postVolumeAction("/v1/trees/\(tree)/snapshots", config: config, socket: socket, done: "")
    }
}

struct TreeRestore: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Restore a snapshot of a tree (or a part of it) into a new or empty directory.",
        discussion: """
            Runs on a site that keeps a replica. --at takes a snapshot ID (`ferry tree snapshots`) or a UTC \
            time such as 2026-11-30T23:00:00Z: the newest snapshot at or before it. Files get their modes, \
            times to the nanosecond, owners (as root), symlinks, hard links and holes back. The live \
            mirror and the snapshots are not touched.
            """)

    @Argument(help: "The tree.") var tree: String
    @Option(help: "A snapshot ID, or a UTC time (ISO 8601).") var at: String
    @Option(help: "Only this file or directory of the tree (a path inside it).") var path: String?
    @Option(help: "The directory to restore into (new or empty).") var to: String
    @Option(help: "The config file of a site that keeps a replica of the tree.") var config: String?
    @Option(help: "The admin socket, instead of --config.") var socket: String?

    /// The bytes of option `name`'s value as the command line holds them (Swift's `String`
    /// arguments replace bytes that are not UTF-8).
    static func rawArgument(_ name: String) -> [UInt8]? {
        let argv = (0..<Int(CommandLine.argc)).compactMap { CommandLine.unsafeArgv[$0].map { Array(UnsafeBufferPointer(start: $0, count: strlen($0))).map(UInt8.init(bitPattern:)) } }
        let flag = Array(name.utf8)
        for (i, arg) in argv.enumerated() {
            if arg == flag, i + 1 < argv.count { return argv[i + 1] }
            if arg.starts(with: flag + [UInt8(ascii: "=")]) { return Array(arg.dropFirst(flag.count + 1)) }
        }
        return nil
    }

    func run() throws {
        let target = to.hasPrefix("/") ? to : FileManager.default.currentDirectoryPath + "/" + to
        var query = ["at=" + encoded(at), "to=" + encoded(target)]
        if let path {
            // Names are bytes: a path that is not UTF-8 goes as the bytes given on the command line.
            let raw = Self.rawArgument("--path") ?? Array(path.utf8)
            query.append("pathhex=" + raw.map { String(format: "%02x", $0) }.joined())
        }
        try postVolumeAction("/v1/trees/\(tree)/restore?" + query.joined(separator: "&"), config: config, socket: socket,
                             done: "restored", timeoutSeconds: 24 * 3600)
    }
}

struct TreeVerify: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Re-hash every chunk a replica keeps of a tree and check every snapshot's manifest; names what is damaged.")

    @Argument(help: "The tree.") var tree: String
    @Option(help: "The config file of a site that keeps a replica of the tree.") var config: String?
    @Option(help: "The admin socket, instead of --config.") var socket: String?

    func run() throws {
        try postVolumeAction("/v1/trees/\(tree)/verify", config: config, socket: socket, done: "verified", timeoutSeconds: 24 * 3600)
    }
}

struct TreeSync: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sync", abstract: "Run a tree's replication now, on its primary (a scheduled tree between its points).")

    @Argument(help: "The tree.") var tree: String
    @Option(help: "The config file of the tree's primary.") var config: String?
    @Option(help: "The admin socket, instead of --config.") var socket: String?
    @Flag(help: "Wait until the run has finished, say what each replica committed, and exit 1 when a replica did not.")
    var wait = false

    func run() throws {
        try postVolumeAction("/v1/trees/\(tree)/sync" + (wait ? "?wait=1" : ""), config: config, socket: socket,
                             done: wait ? "done" : "started", timeoutSeconds: wait ? 24 * 3600 : 30)
    }
}
