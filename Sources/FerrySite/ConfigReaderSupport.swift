import Yams

/// The fields of one YAML map that the schema knows, by key; unknown keys were already reported.
struct ConfigFields {
    /// The field path of the map itself (`volumes.vm1`); empty at the top of the file.
    var path: String
    /// The line of the key that holds the map (`site:`), else of the map itself: where a field
    /// missing from the map would go.
    var line: Int?
    var values: [String: Node]
    /// The line of each known key.
    var keyLines: [String: Int]

    subscript(key: String) -> Node? { values[key] }

    /// The field path of `key` in this map.
    func path(_ key: String) -> String { ConfigReader.join(path, key) }

    /// The line of field `key`, or of the map when the field is absent.
    func line(of key: String) -> Int? { keyLines[key] ?? line }

    /// Whether `key` is present with a value other than null.
    func has(_ key: String) -> Bool { values[key].map { $0.null == nil } ?? false }
}

/// The generic half of ``ConfigReader``: reading maps and scalars, reporting, suggestions.
extension ConfigReader {
    mutating func report(_ path: String, _ message: String, line: Int? = nil) {
        problems.append(ConfigProblem(path: path, message: message, line: line))
    }

    static func join(_ path: String, _ key: String) -> String {
        path.isEmpty ? key : "\(path).\(key)"
    }

    /// How a node looks, for "found …" in messages.
    static func kind(_ node: Node) -> String {
        switch node {
        case .scalar(let scalar): return "\"\(scalar.string)\""
        case .mapping: return "a map"
        case .sequence: return "a list"
        case .alias: return "an alias"
        }
    }

    /// The map at `path`; an absent or null node counts as an empty map, so that each required
    /// field inside it is reported as missing by name. Any other node is reported and gives nil.
    /// `line` is that of the key holding the node, when there is one.
    mutating func map(_ node: Node?, at path: String, line: Int? = nil, expected: String, hint: String = "") -> Node.Mapping? {
        guard let node, node.null == nil else { return Node.Mapping([]) }
        guard case .mapping(let mapping) = node else {
            report(path, "expected \(expected), found \(Self.kind(node))\(hint)", line: line ?? node.mark?.line)
            return nil
        }
        return mapping
    }

    /// The known fields of `mapping`; every other key is reported as unknown, with the closest
    /// known key when one is near enough to be a typo. `line` is that of the key holding the map.
    mutating func fields(of mapping: Node.Mapping, at path: String, known: [String], line: Int? = nil) -> ConfigFields {
        var values: [String: Node] = [:]
        var keyLines: [String: Int] = [:]
        for (key, value) in mapping {
            guard case .scalar(let scalar) = key else {
                report(path, "a key must be a name, found \(Self.kind(key))", line: key.mark?.line)
                continue
            }
            let name = scalar.string
            if values[name] != nil {
                // Yams only rejects keys that are equal as typed values, so `1:` and `"1":` get here.
                report(Self.join(path, name), "appears more than once; keep one", line: key.mark?.line)
            } else if known.contains(name) {
                values[name] = value
                keyLines[name] = key.mark?.line
            } else if let guess = Self.closest(to: name, among: known) {
                report(Self.join(path, name), "unknown field; did you mean \"\(guess)\"?", line: key.mark?.line)
            } else {
                report(Self.join(path, name),
                       "unknown field; the fields here are \(known.joined(separator: ", "))", line: key.mark?.line)
            }
        }
        return ConfigFields(path: path, line: line ?? mapping.mark?.line, values: values, keyLines: keyLines)
    }

    /// The entries of a map from names (peers, volumes) to their maps; keys that are not plain
    /// names are reported and left out.
    mutating func entries(of mapping: Node.Mapping, at path: String) -> [(name: String, value: Node, line: Int?)] {
        var result: [(name: String, value: Node, line: Int?)] = []
        for (key, value) in mapping {
            guard case .scalar(let scalar) = key else {
                report(path, "a key must be a name, found \(Self.kind(key))", line: key.mark?.line)
                continue
            }
            if result.contains(where: { $0.name == scalar.string }) {
                report(Self.join(path, scalar.string), "appears more than once; keep one", line: key.mark?.line)
                continue
            }
            result.append((scalar.string, value, key.mark?.line))
        }
        return result
    }

    /// The text of the scalar field `key`. A missing or null field is reported when `required`;
    /// a map or list where a value belongs is always reported.
    mutating func text(_ fields: ConfigFields, _ key: String, required: Bool, example: String) -> String? {
        guard let node = fields[key], node.null == nil else {
            if required { report(fields.path(key), "missing; required", line: fields.line) }
            return nil
        }
        guard case .scalar(let scalar) = node else {
            report(fields.path(key), "expected a value such as \(example), found \(Self.kind(node))",
                   line: fields.line(of: key))
            return nil
        }
        return scalar.string
    }

    /// The candidate a mistyped `word` most likely meant: within a small edit distance once case
    /// and `_`/`-` are ignored, or one a prefix of the other (`data-dir` → `data`). Nil if none is close.
    static func closest(to word: String, among candidates: [String]) -> String? {
        let typed = Array(word.lowercased().replacingUnderscores())
        guard !typed.isEmpty else { return nil }
        var best: (candidate: String, distance: Int)?
        for candidate in candidates {
            let wanted = Array(candidate.lowercased())
            var distance = editDistance(typed, wanted)
            if distance > max(1, min(3, wanted.count / 3)) {
                let shorter = min(typed.count, wanted.count)
                guard shorter >= 3, typed.starts(with: wanted) || wanted.starts(with: typed) else { continue }
                distance = abs(typed.count - wanted.count)
            }
            if best == nil || distance < best!.distance { best = (candidate, distance) }
        }
        return best?.candidate
    }

    /// Edit distance counting an insertion, a deletion, a substitution or a swap of two adjacent
    /// characters (`eats` → `east`) as one edit (optimal string alignment).
    static func editDistance(_ a: [Character], _ b: [Character]) -> Int {
        if a.isEmpty { return b.count }
        if b.isEmpty { return a.count }
        var d = [[Int]](repeating: [Int](repeating: 0, count: b.count + 1), count: a.count + 1)
        for i in 0...a.count { d[i][0] = i }
        for j in 0...b.count { d[0][j] = j }
        for i in 1...a.count {
            for j in 1...b.count {
                let cost = a[i - 1] == b[j - 1] ? 0 : 1
                d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
                if i > 1, j > 1, a[i - 1] == b[j - 2], a[i - 2] == b[j - 1] {
                    d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
                }
            }
        }
        return d[a.count][b.count]
    }

    /// A YAML error from Yams as a problem with a line and column (Yams' marks are 1-based).
    static func syntaxProblem(_ error: any Error, in yaml: String) -> ConfigProblem {
        func at(_ line: Int, _ column: Int, _ message: String) -> ConfigProblem {
            ConfigProblem(path: "line \(line), column \(column)", message: message, line: line)
        }
        guard let error = error as? YamlError else {
            return ConfigProblem(path: "", message: "not valid YAML: \(error)")
        }
        switch error {
        case let .scanner(context, problem, mark, _),
             let .parser(context, problem, mark, _),
             let .composer(context, problem, mark, _):
            if problem == "but found another document" {
                return at(mark.line, mark.column, "a second YAML document starts here; a site's configuration "
                          + "is one document, so remove this `---` and what follows, or merge it into the first")
            }
            var message = "not valid YAML: \(problem)"
            if let context {
                message += " (\(context.text) at line \(context.mark.line), column \(context.mark.column))"
            }
            return at(mark.line, mark.column, message + "; check the indentation and quoting there")
        case let .duplicatedKeysInMapping(duplicates, context):
            let keys = duplicates.sorted().map { "\"\($0)\"" }.joined(separator: ", ")
            let verb = duplicates.count == 1 ? "key \(keys) appears" : "keys \(keys) appear"
            return at(context.mark.line, context.mark.column,
                      "\(verb) more than once in the same map; keep one and delete or rename the others")
        case let .reader(problem, offset, _, _):
            let (line, column) = lineAndColumn(ofCharacter: offset ?? 0, in: yaml)
            return at(line, column, "not valid YAML: \(problem); remove the character there")
        default:
            return ConfigProblem(path: "", message: "not valid YAML: \(error)")
        }
    }

    /// 1-based line and column of the character at `offset`.
    private static func lineAndColumn(ofCharacter offset: Int, in text: String) -> (Int, Int) {
        var line = 1
        var column = 1
        for character in text.prefix(offset) {
            if character == "\n" || character == "\r\n" {
                line += 1
                column = 1
            } else {
                column += 1
            }
        }
        return (line, column)
    }
}

extension String {
    fileprivate func replacingUnderscores() -> String {
        String(map { $0 == "_" ? "-" : $0 })
    }
}
