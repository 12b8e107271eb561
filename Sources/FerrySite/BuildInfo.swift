import CFerrySys

/// What `ferry --version` prints and `ferry_build_info` carries.
public enum BuildInfo {
    public static let version = "0.5.0"
    /// The commit the binary was built from: every `make` target that builds writes it to
    /// Sources/CFerrySys/ferry_commit.h (not in git); "unknown" when that file is missing.
    public static var commit: String { String(cString: ferry_build_commit()) }
    public static var description: String { "ferry \(version) (commit \(commit))" }
}
