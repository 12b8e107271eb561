import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// GET `url` with curl; the status code and the body (code 0 when nothing answered).
func httpGet(_ url: String, token: String? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws -> (code: Int, body: String) {
    let curl = try requireTool("curl", package: "curl")
    var args = ["-s", "--max-time", "10", "-w", "\n%{http_code}"]
    if let token { args += ["-H", "Authorization: Bearer \(token)"] }
    args.append(url)
    let result = try run(curl, args, expect: nil, sourceLocation: sourceLocation)
    var lines = result.stdout.split(separator: "\n", omittingEmptySubsequences: false)
    let code = Int(lines.popLast() ?? "") ?? 0
    return (code, lines.joined(separator: "\n"))
}

/// Where tests keep what a person may want to look at afterwards (screenshots):
/// FERRY_TEST_ARTIFACTS, or `.build/test-artifacts` in the package.
let testArtifacts: String = {
    let dir = ProcessInfo.processInfo.environment["FERRY_TEST_ARTIFACTS"] ?? packageRoot + "/.build/test-artifacts"
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}()

/// A real Prometheus server (Debian's `prometheus`) on 127.0.0.1, scraping the given targets
/// (`host:port`, by job name) every second, with its data in a temporary directory.
final class PrometheusServer {
    let port = freePort()
    let dir: TempDir
    private var process: Process?

    init(targets: [String: String]) throws {
        let binary = try requireTool("prometheus", package: "prometheus")
        dir = TempDir()
        var config = "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
        for (job, target) in targets.sorted(by: { $0.key < $1.key }) {
            config += "  - job_name: \(job)\n    static_configs:\n      - targets: ['\(target)']\n"
        }
        try config.write(toFile: dir.path + "/prometheus.yml", atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = ["--config.file=\(dir.path)/prometheus.yml", "--storage.tsdb.path=\(dir.path)/data",
                       "--web.listen-address=127.0.0.1:\(port)", "--log.level=warn"]
        _ = FileManager.default.createFile(atPath: dir.path + "/prometheus.log", contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: dir.path + "/prometheus.log"))
        p.standardOutput = log
        p.standardError = log
        try p.run()
        process = p
        let ready = eventually(.seconds(60)) { (try? httpGet("http://127.0.0.1:\(port)/-/ready").code) == 200 }
        guard ready else {
            stop()
            throw TestFailure("prometheus did not become ready; log:\n\(self.log(tail: 20))")
        }
    }

    deinit { stop() }

    func stop() {
        guard let p = process else { return }
        if p.isRunning {
            kill(p.processIdentifier, SIGTERM)
            let deadline = ContinuousClock.now + .seconds(20)
            while p.isRunning && ContinuousClock.now < deadline { usleep(20_000) }
            if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        }
        p.waitUntilExit()
        process = nil
    }

    func log(tail lines: Int) -> String {
        let text = (try? String(contentsOfFile: dir.path + "/prometheus.log", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").suffix(lines).joined(separator: "\n")
    }

    /// An instant query through the HTTP API: each series' labels and value.
    func query(_ promql: String) throws -> [(labels: [String: String], value: Double)] {
        let curl = try requireTool("curl", package: "curl")
        let result = try run(curl, ["-s", "--max-time", "10", "-G", "http://127.0.0.1:\(port)/api/v1/query",
                                    "--data-urlencode", "query=\(promql)"], expect: nil)
        guard let json = try? JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any],
              json["status"] as? String == "success",
              let data = json["data"] as? [String: Any], let series = data["result"] as? [[String: Any]]
        else { throw TestFailure("prometheus query \(promql) failed: \(result.stdout)") }
        return series.compactMap { s in
            guard let metric = s["metric"] as? [String: String], let value = s["value"] as? [Any],
                  let text = value.last as? String, let number = Double(text) else { return nil }
            return (metric, number)
        }
    }

    /// The value of a query that names one series, or nil when it has none (yet).
    func value(_ promql: String) -> Double? {
        (try? query(promql))?.first?.value
    }
}

/// Headless Chromium (Debian's `chromium`): the DOM of a page after its scripts ran, and
/// screenshots.
struct HeadlessChromium {
    let binary: String
    let profile = TempDir()

    init() throws { binary = try requireTool("chromium", package: "chromium") }

    private var common: [String] {
        ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--user-data-dir=\(profile.path)"]
    }

    func dumpDOM(_ url: String) throws -> String {
        try run(binary, common + ["--virtual-time-budget=3000", "--dump-dom", url], timeout: .seconds(90), expect: nil).stdout
    }

    /// Saves a PNG of the page at `path` (a phone-sized window when `phone`).
    func screenshot(_ url: String, to path: String, phone: Bool = false) throws {
        _ = try run(binary, common + ["--hide-scrollbars", "--window-size=\(phone ? "390,844" : "1280,900")",
                                      "--screenshot=\(path)", url], timeout: .seconds(90), expect: nil)
    }
}
