import CFerrySys

/// What `ferry --version` prints and `ferry_build_info` carries.
public enum BuildInfo {
    public static let version = "0.5.0"
    /// The commit the binary was built from: `make release` and `make deb` compile it in
    /// (`-Xcc -DFERRY_COMMIT=…`); "unknown" in a plain `swift build`.
    public static var commit: String { String(cString: ferry_build_commit()) }
    public static var description: String { "ferry \(version) (commit \(commit))" }
}
