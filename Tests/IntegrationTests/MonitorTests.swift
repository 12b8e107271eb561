import FerryCore
import FerrySite
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Issue 12: the metrics listener scraped by a real Prometheus, the status page in headless
/// Chromium, the bearer token, systemd readiness.
@Suite(.serialized)
struct MonitorTests {
    @Test func prometheusScrapesLagAndStateAndTheyChangeWhenThePeerStops() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: async, max-lag: 30s }"], size: "64M", metrics: true)
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        #expect(try sites.east.status().site.metrics == sites.east.metricsURL + "/")

        let prometheus = try PrometheusServer(targets: [
            "east": "127.0.0.1:\(sites.east.metricsPort!)", "west": "127.0.0.1:\(sites.west.metricsPort!)",
        ])
        defer { prometheus.stop() }
        let link = #"volume="vm1",peer="west""#
        let scraped = eventually(.seconds(60)) {
            prometheus.value(#"ferry_volume_link_state{\#(link),mode="async",state="in-sync"}"#) == 1
                && prometheus.value("ferry_volume_lag_bytes{\(link)}") == 0
                && prometheus.value("ferry_volume_lag_seconds{\(link)}") == 0
                && prometheus.value("ferry_volume_rpo_target_seconds{\(link)}") == 30
                && prometheus.value(#"ferry_peer_up{job="east",peer="west"}"#) == 1
                && prometheus.value(#"ferry_volume_role{job="west",volume="vm1",role="secondary"}"#) == 1
        }
        #expect(scraped, "series never showed vm1 in sync: \((try? prometheus.query(#"{__name__=~"ferry_volume_.*",peer="west"}"#)).map { "\($0)" } ?? "no answer")")
        // The journal's bound, and the acks the initial sync drew, timed.
        #expect(prometheus.value("ferry_volume_journal_limit_bytes{\(link)}") == Double(ReplicaPolicy.defaultJournalSizeBytes))
        #expect(eventually(.seconds(30)) {
            (prometheus.value(#"sum(ferry_volume_ack_duration_seconds_count{job="east",\#(link),level="durable"})"#) ?? 0) > 0
        }, "no ack latency recorded: \((try? prometheus.query(#"{__name__=~"ferry_volume_ack.*"}"#)).map { "\($0)" } ?? "")")

        // The peer goes away and the primary keeps writing: the state leaves in-sync, the lag grows.
        sites.west.stop()
        try sites.qemuIO(["write -P 0x5c 0 4M", "flush"])
        let changed = eventually(.seconds(60)) {
            prometheus.value(#"ferry_volume_link_state{\#(link),state="in-sync"}"#) == 0
                && (prometheus.value("ferry_volume_lag_bytes{\(link)}") ?? 0) >= Double(4 << 20)
                && (prometheus.value("ferry_volume_lag_seconds{\(link)}") ?? 0) > 0
                && prometheus.value(#"ferry_peer_up{job="east",peer="west"}"#) == 0
                && prometheus.value(#"up{job="west"}"#) == 0
        }
        #expect(changed, "series did not follow the peer's loss: \((try? prometheus.query(#"{__name__=~"ferry_volume_(lag.*|link_state)",peer="west"}"#)).map { "\($0)" } ?? "")")
        // What the NBD server recorded for those writes.
        #expect((prometheus.value(#"sum(ferry_nbd_request_bytes_total{job="east",volume="vm1",op="write"})"#) ?? 0) >= Double(4 << 20)
                || eventually(.seconds(10)) { (prometheus.value(#"sum(ferry_nbd_request_bytes_total{job="east",op="write"})"#) ?? 0) >= Double(4 << 20) })
    }

    @Test func statusPageShowsARowPerVolumeAndSaysWhenThePeerStops() throws {
        let chromium = try HeadlessChromium()
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }"], size: "64M",
                                         extraVolumes: [TestSite.Volume(name: "logs", size: "16M", primary: "east")], metrics: true)
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        let url = sites.east.metricsURL + "/"

        let row = #"data-volume="vm1" data-peer="west" data-role="primary" data-mode="sync" data-state="in-sync""#
        var dom = ""
        let shown = eventually(.seconds(30)) {
            dom = (try? chromium.dumpDOM(url)) ?? ""
            return dom.contains(row)
        }
        #expect(shown, "no in-sync row for vm1/west in the page:\n\(dom.prefix(3000))")
        #expect(dom.contains(#"data-volume="logs""#), "no row for the unreplicated volume")
        #expect(dom.contains(#"data-plot="lag-bytes" data-volume="vm1" data-peer="west""#))
        #expect(dom.contains(#"data-peer="west" data-link="connected""#))
        let westDOM = try chromium.dumpDOM(sites.west.metricsURL + "/")
        #expect(westDOM.contains(#"data-volume="vm1" data-peer="east" data-role="secondary""#), "west's page:\n\(westDOM.prefix(2000))")

        sites.west.stop()
        try sites.qemuIO(["write -P 0x11 0 1M"])
        let said = eventually(.seconds(30)) {
            dom = (try? chromium.dumpDOM(url)) ?? ""
            return dom.contains(#"data-volume="vm1" data-peer="west" data-role="primary" data-mode="sync" data-state="degraded""#)
                && dom.contains("west unreachable since") && dom.contains("writes degraded") && dom.contains("to resync")
        }
        #expect(said, "the page did not say west is gone:\n\(dom.prefix(4000))")
        let shot = testArtifacts + "/status-page-east.png"
        let phone = testArtifacts + "/status-page-east-phone.png"
        try chromium.screenshot(url, to: shot)
        try chromium.screenshot(url, to: phone, phone: true)
        let size = (try? FileManager.default.attributesOfItem(atPath: shot)[.size] as? Int) ?? 0
        #expect(size > 10_000, "screenshot \(shot) is \(size) bytes")
        print("status page screenshots: \(shot), \(phone)")
    }

    @Test func aTokenGuardsEveryPathOfTheListener() throws {
        let dir = TempDir()
        let site = try TestSite(name: "east", root: dir.path)
        let token = "9f2c4e1a7b3d5f60" + "8e1c2a4b6d8f0a1c"
        let tokenFile = dir.path + "/metrics.token"
        try (token + "\n").write(toFile: tokenFile, atomically: true, encoding: .utf8)
        site.metricsPort = freePort()
        site.metricsTokenFile = tokenFile
        try site.writeConfig(volumes: [TestSite.Volume(name: "vm1", size: "16M", primary: "east")])
        try site.start()
        defer { site.stop() }
        let base = site.metricsURL
        for path in ["/", "/metrics", "/fragment", "/status.json"] {
            #expect(try httpGet(base + path).code == 401, "\(path) without a token")
            #expect(try httpGet(base + path, token: token + "0").code == 401, "\(path) with a wrong token")
            #expect(try httpGet(base + path, token: String(token.dropLast())).code == 401, "\(path) with a short token")
        }
        let metrics = try httpGet(base + "/metrics", token: token)
        #expect(metrics.code == 200)
        #expect(metrics.body.contains("ferry_build_info{"))
        #expect(try httpGet(base + "/?token=\(token)").code == 200)
        let refusal = try httpGet(base + "/")
        #expect(!refusal.body.contains("vm1"), "a refused request saw the page")
        #expect(eventually { site.log().contains("metrics listener refused a request without a valid bearer token") })
        // Nothing on this listener changes state.
        let curl = try requireTool("curl", package: "curl")
        let post = try run(curl, ["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H", "Authorization: Bearer \(token)",
                                  base + "/metrics"], expect: nil)
        #expect(post.stdout != "200", "POST was answered \(post.stdout)")
    }

    @Test func aTakenMetricsPortStopsTheSiteWithAClearError() throws {
        let dir = TempDir()
        let site = try TestSite(name: "east", root: dir.path)
        let blocker = try PrometheusLikeListener()
        site.metricsPort = blocker.port
        try site.writeConfig(volumes: [TestSite.Volume(name: "vm1", size: "16M", primary: "east")])
        let result = try run(try ferryBinary(), ["serve", "--config", site.configPath], timeout: .seconds(60), expect: 1)
        #expect(result.stderr.contains("cannot serve metrics on listen.metrics 127.0.0.1:\(blocker.port)"), "\(result.stderr)")
    }

    @Test func systemdHearsReadyOnlyOnceTheListenersServeAndStoppingOnSIGTERM() throws {
        let dir = TempDir()
        let socketPath = dir.path + "/notify.sock"
        let listener = try NotifyListener(path: socketPath)
        let site = try TestSite(name: "east", root: dir.path)
        site.environment = ["NOTIFY_SOCKET": socketPath]
        try site.writeConfig(volumes: [TestSite.Volume(name: "vm1", size: "16M", primary: "east")])
        try site.start()
        defer { site.stop() }
        var messages: [String] = []
        let ready = eventually(.seconds(30)) {
            messages += listener.drain()
            return messages.contains { $0.split(separator: "\n").contains("READY=1") }
        }
        #expect(ready, "no READY=1; got \(messages)")
        // READY=1 came after the listeners were up: nothing came before it, and both answer now.
        #expect(messages.first?.contains("READY=1") == true, "\(messages)")
        #expect(canConnect(port: site.nbdPort) && canConnect(port: site.replicationPort))
        #expect(messages.contains { $0.contains("MAINPID=\(site.pid)") })
        kill(site.pid, SIGTERM)
        let stopping = eventually(.seconds(30)) {
            messages += listener.drain()
            return messages.contains { $0.split(separator: "\n").contains("STOPPING=1") }
        }
        #expect(stopping, "no STOPPING=1 after SIGTERM; got \(messages)")
        #expect(site.stop() == 0)
    }
}

/// A TCP listener on 127.0.0.1 that accepts nothing: holds a port so another bind fails.
final class PrometheusLikeListener {
    let fd: Int32
    let port: Int
    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.fd = fd
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, len) == 0 && listen(fd, 4) == 0 && getsockname(fd, $0, &len) == 0
            }
        }
        guard ok else { close(fd); throw TestFailure("cannot hold a port") }
        port = Int(UInt16(bigEndian: addr.sin_port))
    }
    deinit { close(fd) }
}

/// The receiving end of sd_notify: a Unix datagram socket the daemon's NOTIFY_SOCKET names.
final class NotifyListener {
    let fd: Int32
    init(path: String) throws {
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        self.fd = fd
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
        }
        guard ok else { close(fd); throw TestFailure("cannot bind \(path)") }
        var flags = fcntl(fd, F_GETFL)
        flags |= O_NONBLOCK
        _ = fcntl(fd, F_SETFL, flags)
    }
    deinit { close(fd) }

    /// Every message received so far.
    func drain() -> [String] {
        var out: [String] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = recv(fd, &buffer, buffer.count, 0)
            if n <= 0 { break }
            out.append(String(decoding: buffer[0..<n], as: UTF8.self))
        }
        return out
    }
}

func canConnect(port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = in_port_t(UInt16(port).bigEndian)
    return withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
    }
}
