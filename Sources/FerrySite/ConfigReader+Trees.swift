import FerryCore
import Yams

/// `trees`: directories replicated from a primary's `source` to a `target` on each replica site.
///
///     trees:
///       www:
///         primary: east
///         source: /srv/www
///         replicas:
///           west: { target: /srv/www }        # or west: /srv/www
///         mode: continuous                    # or scheduled, with every: 1h / at: "02:00" [on: sunday]
///         exclude: ["*.tmp", "cache/*"]
///         keep: "24x1h | 30x1d | 12x30d"      # or { grid: "24x1h | 30x1d", last: 10 }
///         compression: zstd
///         bandwidth-limit: 50M
extension ConfigReader {
    static let treeKeys = ["primary", "source", "replicas", "mode", "every", "at", "on", "exclude", "keep",
                           "compression", "bandwidth-limit"]
    static let treeReplicaKeys = ["target"]
    static let keepKeys = ["grid", "last"]

    mutating func readTrees(_ node: Node?, line: Int?, siteName: String?, peerNames: [String]?,
                            volumeNames: [String], dataDirectory: String? = nil) -> [TreeConfig] {
        guard let mapping = map(node, at: "trees", line: line, expected: "a map from tree name to its source and replicas",
                                hint: "; write each tree as `www:` with primary, source and replicas indented under it")
        else { return [] }
        var trees: [TreeConfig] = []
        for (name, value, keyLine) in entries(of: mapping, at: "trees") {
            let path = "trees.\(name)"
            if volumeNames.contains(name) {
                report(path, "\"\(name)\" is also a volume's name; give the tree another (ferry promote NAME must mean one thing)", line: keyLine)
            }
            if !Self.isVolumeName(name) {
                report(path, "\"\(name)\" is not a valid tree name; use 1 to 63 lowercase letters, digits, "
                       + "dots, dashes and underscores, starting with a letter or digit", line: keyLine)
            }
            guard let entry = map(value, at: path, line: keyLine, expected: "a map with primary, source and replicas") else { continue }
            let fields = fields(of: entry, at: path, known: Self.treeKeys, line: keyLine)
            var primary = text(fields, "primary", required: true, example: siteName ?? "east")
            if let text = primary, let message = Self.unknownSite(text, siteName: siteName, peerNames: peerNames) {
                report(fields.path("primary"), message, line: fields.line(of: "primary"))
                primary = nil
            }
            let source = treePath(fields, "source", example: "/srv/www")
            if fields["source"] == nil { report(fields.path("source"), "missing; required (the directory to replicate, on the primary)", line: keyLine) }
            let replicas = readTreeReplicas(fields, siteName: siteName, peerNames: peerNames, primary: primary)
            let mode: TreeConfig.Mode? = fields.has("mode") ? choice(fields, "mode", what: "tree mode") : .continuous
            let every = fields.has("every"), at = fields.has("at"), on = fields.has("on")
            var schedule: Schedule?
            if mode == .continuous && (every || at || on) {
                let key = every ? "every" : at ? "at" : "on"
                report(fields.path(key), "\(key) is for mode: scheduled; a continuous tree replicates every change as it happens. "
                       + "Set mode: scheduled, or leave \(key) out", line: fields.line(of: key))
            } else if mode == .scheduled {
                schedule = readSchedule(fields, every: every, at: at, on: on, scheduled: true)
            }
            let exclude = readExclude(fields)
            let keep = readKeep(fields)
            let compression: ReplicationCompression? = fields.has("compression") ? choice(fields, "compression", what: "compression method") : .zstd
            let limit = readRate(fields, "bandwidth-limit")
            if Self.isVolumeName(name), let primary, let source, let replicas, let mode, let compression,
               mode == .continuous || schedule != nil {
                trees.append(TreeConfig(name: name, primary: primary, source: source, replicas: replicas, mode: mode,
                                        schedule: schedule, exclude: exclude, keep: keep, compression: compression,
                                        bandwidthLimit: limit))
            }
        }
        // Two trees in one directory (or one inside the other) on this site would undo each
        // other, and a replica's mirror holds only the tree: whatever else is in its target goes.
        if let siteName {
            var seen: [(dir: String, tree: String)] = []
            for tree in trees {
                let uses = [tree.primary == siteName ? (tree.source, "trees.\(tree.name).source") : nil,
                            tree.replicas[siteName].map { ($0, "trees.\(tree.name).replicas.\(siteName)") }].compactMap { $0 }
                for (dir, field) in uses {
                    if let other = seen.first(where: { $0.tree != tree.name && Self.overlaps($0.dir, dir) }) {
                        report(field, other.dir == dir
                               ? "uses \(dir) on this site, as does tree \(other.tree); give each tree its own directory"
                               : "\(dir) overlaps \(other.dir), which tree \(other.tree) uses on this site; "
                                 + "give each tree a directory of its own, neither inside the other")
                    }
                    if let data = dataDirectory, Self.overlaps(dir, data) {
                        let how = dir == data ? "is" : data.hasPrefix(dir + "/") || dir == "/" ? "holds" : "is inside"
                        report(field, "\(dir) \(how) this site's data directory \(data) (site.data): the tree would "
                               + (field.hasSuffix(".source") ? "replicate Ferry's own state" : "replace Ferry's own files with the tree")
                               + "; give the tree a directory outside it")
                    }
                    seen.append((dir, tree.name))
                }
            }
        }
        return trees.sorted { $0.name < $1.name }
    }

    /// Whether one of two normalized absolute paths is the other or lies inside it.
    static func overlaps(_ a: String, _ b: String) -> Bool {
        a == b || a == "/" || b == "/" || a.hasPrefix(b + "/") || b.hasPrefix(a + "/")
    }

    private mutating func treePath(_ fields: ConfigFields, _ key: String, example: String) -> String? {
        guard let path = filePath(fields, key, example: example, noun: "directory") else { return nil }
        guard path != "/" else {
            report(fields.path(key), "\"/\" is the whole filesystem; give a directory under it, e.g. \(example)", line: fields.line(of: key))
            return nil
        }
        return path.count > 1 && path.hasSuffix("/") ? String(path.dropLast()) : path
    }

    private mutating func readTreeReplicas(_ tree: ConfigFields, siteName: String?, peerNames: [String]?,
                                           primary: String?) -> [String: String]? {
        let path = tree.path("replicas")
        let before = problems.count
        guard let mapping = map(tree["replicas"], at: path, line: tree.line(of: "replicas"),
                                expected: "a map from site name to its target directory",
                                hint: "; write each replica as `west: { target: /srv/www }`")
        else {
            if tree["replicas"] == nil { report(path, "missing; required (which sites keep the tree, and where)", line: tree.line) }
            return nil
        }
        var replicas: [String: String] = [:]
        for (name, value, keyLine) in entries(of: mapping, at: path) {
            let replicaPath = "\(path).\(name)"
            checkReplicaSite(name, at: replicaPath, line: keyLine, siteName: siteName, peerNames: peerNames, primary: primary, of: "tree")
            var target: String?
            if case .scalar(let scalar) = value {
                if scalar.string.isEmpty {
                    report(replicaPath, "\"\" is not a directory; give the target directory, e.g. \(name): { target: /srv/www }", line: keyLine)
                } else if ConfigPath.resolve(scalar.string, against: directory) == "/" {
                    report(replicaPath, "\"\(scalar.string)\" is the whole filesystem; give a directory under it, "
                           + "e.g. \(name): /srv/www", line: keyLine)
                } else {
                    target = ConfigPath.resolve(scalar.string, against: directory)
                }
            } else if let entry = map(value, at: replicaPath, line: keyLine, expected: "a map with target") {
                let fields = fields(of: entry, at: replicaPath, known: Self.treeReplicaKeys, line: keyLine)
                target = treePath(fields, "target", example: "/srv/www")
                if fields["target"] == nil { report(fields.path("target"), "missing; required (the directory the replica keeps the tree in)", line: keyLine) }
            }
            if let target { replicas[name] = target.count > 1 && target.hasSuffix("/") ? String(target.dropLast()) : target }
        }
        if replicas.isEmpty && problems.count == before {
            report(path, "empty; name at least one site that keeps the tree, e.g. west: { target: /srv/www }", line: tree.line(of: "replicas"))
        }
        return problems.count == before ? replicas : nil
    }

    private mutating func readExclude(_ fields: ConfigFields) -> [String] {
        guard let node = fields["exclude"], node.null == nil else { return [] }
        let items: [Node]
        if case .sequence(let list) = node { items = Array(list) } else { items = [node] }
        var out: [String] = []
        for (i, item) in items.enumerated() {
            guard case .scalar(let scalar) = item, !scalar.string.isEmpty else {
                report(fields.path("exclude") + "[\(i)]", "expected a glob pattern such as \"*.tmp\", found \(Self.kind(item))",
                       line: fields.line(of: "exclude"))
                continue
            }
            out.append(scalar.string)
        }
        return out
    }

    private mutating func readKeep(_ fields: ConfigFields) -> Retention? {
        guard let node = fields["keep"], node.null == nil else { return nil }
        var gridText: String?
        var last: Int?
        if case .scalar(let scalar) = node {
            gridText = scalar.string
        } else if let mapping = map(node, at: fields.path("keep"), line: fields.line(of: "keep"), expected: "a grid or a map with grid and last") {
            let keep = self.fields(of: mapping, at: fields.path("keep"), known: Self.keepKeys, line: fields.line(of: "keep"))
            gridText = text(keep, "grid", required: false, example: "\"24x1h | 30x1d\"")
            let lastText = text(keep, "last", required: false, example: "10")
            if let text = lastText {
                if let n = Int(text), n >= 1 { last = n } else {
                    report(keep.path("last"), "\"\(text)\" is not a count; give how many of the newest snapshots to keep, e.g. 10",
                           line: keep.line(of: "last"))
                }
            }
            if gridText == nil && lastText == nil {
                report(fields.path("keep"), "empty; give grid, last or both, e.g. { grid: \"24x1h | 30x1d\", last: 10 }", line: fields.line(of: "keep"))
                return nil
            }
        } else {
            return nil
        }
        var grid: [Retention.Interval] = []
        if let gridText {
            guard let parsed = Retention.parseGrid(gridText) else {
                report(fields.path("keep"), "\"\(gridText)\" is not a retention grid; write intervals as COUNTxDURATION "
                       + "joined by |, e.g. \"24x1h | 30x1d | 12x30d\" (one per hour for a day, then one per day for 30 days, ...)",
                       line: fields.line(of: "keep"))
                return nil
            }
            grid = parsed
        }
        return Retention(grid: grid, last: last)
    }
}
