/// One thing wrong with a site configuration file: where (the field path, such as
/// `volumes.vm1.size`) and what to do about it.
///
/// `path` is empty for problems with the file as a whole (it cannot be read, it is empty), and is
/// `line L, column C` for YAML syntax errors, where no field path exists yet.
public struct ConfigProblem: Sendable, Hashable, CustomStringConvertible {
    /// The field path, dot-separated from the top of the file: `peers.west.site-id`.
    public var path: String
    /// What is wrong, with the offending value, and what to do instead.
    public var message: String
    /// The 1-based line of the offending node, when the YAML parser told us; for tools and editors.
    public var line: Int?

    public init(path: String, message: String, line: Int? = nil) {
        self.path = path
        self.message = message
        self.line = line
    }

    /// `field.path: message`, or just the message for problems with the whole file.
    public var description: String {
        path.isEmpty ? message : "\(path): \(message)"
    }
}

/// Every problem found in one configuration file, thrown by ``SiteConfig/load(path:)`` and
/// ``SiteConfig/parse(yaml:path:)``.
///
/// The whole file is checked before anything is thrown, so that an operator fixes all mistakes
/// in one pass rather than one per restart. The description prints one problem per line as
/// `FILE: field.path: message`, ready to show on stderr.
public struct ConfigProblems: Error, Sendable, Equatable, CustomStringConvertible {
    /// The absolute path of the configuration file.
    public var file: String
    /// In the order they were found: by section (site, listen, peers, volumes, log-level), then
    /// field by field. Never empty when thrown.
    public var problems: [ConfigProblem]

    public init(file: String, problems: [ConfigProblem]) {
        self.file = file
        self.problems = problems
    }

    public var description: String {
        problems.map { "\(file): \($0)" }.joined(separator: "\n")
    }
}
