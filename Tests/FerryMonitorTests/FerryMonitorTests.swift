import FerryCore
import FerryWire
import Foundation
import Prometheus
import Testing
@testable import FerryMonitor
@testable import FerrySite

/// The sampler's series and the status page, from hand-made statuses.
struct FerryMonitorTests {
    static let config = try! SiteConfig.parse(yaml: """
        site:
          name: east
          data: /var/lib/ferry/east
        listen:
          replication: 127.0.0.1:7800
          nbd: 127.0.0.1:10809
          metrics: 127.0.0.1:9480
        peers:
          west:
            address: 127.0.0.1:7801
            site-id: \(String(repeating: "ab", count: 32))
        volumes:
          vm1:
            size: 1G
            primary: east
            replicas:
              west: { mode: async, max-lag: 30s }
        """, path: "/etc/ferry/east.yaml")

    static func status(role: String = "primary", state: String = "in-sync", lag: UInt64 = 0, sent: UInt64 = 0,
                       peerUp: Bool = true, reason: String = "streaming") -> SiteStatus {
        let site = SiteStatus.Site(name: "east", siteID: "ab12", pid: 1, startedAt: Date(timeIntervalSince1970: 1_000),
                                   configPath: "/etc/ferry/east.yaml", dataDirectory: "/var/lib/ferry/east",
                                   replicationAddress: nil, nbdAddresses: [], adminSocket: "/x", metrics: "http://127.0.0.1:9480/")
        var volume = SiteStatus.Volume(name: "vm1", sizeBytes: 1 << 30, role: role, primarySite: "east", uuid: nil, epoch: 1,
                                       generation: nil, exports: [], clientsConnected: 2)
        if role == "primary" {
            volume.replicas = [SiteStatus.Replica(
                peer: "west", mode: "async", state: state, reason: reason, connected: peerUp, consistent: true,
                lagBytes: lag, lagSeconds: lag > 0 ? 12 : 0, dirtyBytes: lag, inFlightBytes: 0, bytesSent: sent,
                journalBytes: lag, journalLimitBytes: 1 << 30, syncRemainingBytes: nil, syncTotalBytes: nil,
                syncETASeconds: nil, rpoZero: false, lastPoint: nil, nextPointAt: nil)]
        } else {
            volume.replicaState = SiteStatus.ReplicaState(consistent: true, initialized: true, epoch: 1, appliedSequence: 9, bytesReceived: sent)
        }
        let peer = PeerLinkStatus(name: "west", siteID: "cd34", address: "127.0.0.1:7801", state: peerUp ? .connected : .connecting,
                                  since: Date(timeIntervalSince1970: 1_700_000_000), rttMilliseconds: peerUp ? 0.5 : nil,
                                  lastError: peerUp ? nil : "connection refused", direction: nil)
        return SiteStatus(site: site, peers: [peer], volumes: [volume])
    }

    @Test func seriesFollowTheStatusAndGoAwayWithWhatTheyDescribe() {
        let registry = PrometheusCollectorRegistry()
        let sampler = StatusSampler(registry: registry, config: Self.config)
        let t0 = Date(timeIntervalSince1970: 2_000_000_000)
        sampler.sample(Self.status(sent: 1000), now: t0)
        var text = registry.emitToString()
        #expect(text.contains(#"ferry_volume_link_state{volume="vm1",peer="west",mode="async",state="in-sync"} 1.0"#))
        #expect(text.contains(#"ferry_volume_link_state{volume="vm1",peer="west",mode="async",state="lagging"} 0.0"#))
        #expect(text.contains(#"ferry_volume_rpo_target_seconds{volume="vm1",peer="west"} 30.0"#))
        #expect(text.contains(#"ferry_volume_sent_bytes_total{volume="vm1",peer="west"} 1000"#))
        #expect(text.contains(#"ferry_volume_last_sync_timestamp_seconds{volume="vm1",peer="west"} 2000000000.0"#))
        #expect(text.contains(#"ferry_peer_up{peer="west"} 1.0"#))

        // Lagging, more sent: the counter adds the difference, the timestamp stays where it was.
        sampler.sample(Self.status(state: "lagging", lag: 5 << 20, sent: 4000), now: t0 + 1)
        text = registry.emitToString()
        #expect(text.contains(#"state="lagging"} 1.0"#) && text.contains(#"state="in-sync"} 0.0"#))
        #expect(text.contains(#"ferry_volume_sent_bytes_total{volume="vm1",peer="west"} 4000"#))
        #expect(text.contains(#"ferry_volume_lag_bytes{volume="vm1",peer="west"} 5242880.0"#))
        #expect(text.contains(#"ferry_volume_journal_used_bytes{volume="vm1",peer="west"} 5242880.0"#))
        #expect(text.contains(#"ferry_volume_last_sync_timestamp_seconds{volume="vm1",peer="west"} 2000000000.0"#))
        #expect(sampler.history.last?.rows["vm1/west"]?.throughput == 3000)

        // A restarted figure (the runtime began again) counts from zero, never backwards.
        sampler.sample(Self.status(sent: 500), now: t0 + 2)
        #expect(registry.emitToString().contains(#"ferry_volume_sent_bytes_total{volume="vm1",peer="west"} 4500"#))

        // Demoted: the link series are gone, the secondary's appear.
        sampler.sample(Self.status(role: "secondary", sent: 10), now: t0 + 3)
        text = registry.emitToString()
        #expect(!text.contains("ferry_volume_link_state{"), "stale link series remain")
        #expect(!text.contains("ferry_volume_lag_bytes{"))
        #expect(text.contains(#"ferry_volume_role{volume="vm1",role="secondary"} 1.0"#))
        #expect(text.contains(#"ferry_volume_consistent{volume="vm1"} 1.0"#))
    }

    /// After a failover the promoted site streams to the first primary, with its own policy (as
    /// its machine does): the bound series are there for the lag alerts.
    @Test func aPromotedSiteHasItsPeersPolicySeries() throws {
        let config = try SiteConfig.parse(yaml: """
            site: { name: west, data: /var/lib/ferry/west }
            listen: { replication: 127.0.0.1:7801, nbd: 127.0.0.1:10810, metrics: 127.0.0.1:9481 }
            peers:
              east: { address: 127.0.0.1:7800, site-id: "\(String(repeating: "cd", count: 32))" }
            volumes:
              vm1: { size: 1G, primary: east, replicas: { west: { mode: async, max-lag: 8M } } }
            """, path: "/etc/ferry/west.yaml")
        var status = Self.status()
        status.site.name = "west"
        status.volumes[0].replicas[0].peer = "east"
        let registry = PrometheusCollectorRegistry()
        StatusSampler(registry: registry, config: config).sample(status, now: Date(timeIntervalSince1970: 2_000_000_000))
        let text = registry.emitToString()
        #expect(text.contains(#"ferry_volume_max_lag_bytes{volume="vm1",peer="east"} 8388608.0"#), "\(text)")
    }

    @Test func treesHaveTheirSeriesForTheStaleSnapshotAlert() throws {
        let config = try SiteConfig.parse(yaml: Self.config.yaml() + """
            trees:
              docs:
                primary: east
                source: /srv/docs
                replicas: { west: /srv/docs }
                mode: scheduled
                every: 1h
            """, path: "/etc/ferry/east.yaml")
        let registry = PrometheusCollectorRegistry()
        let sampler = StatusSampler(registry: registry, config: config)
        var status = Self.status()
        let snapshot = SiteStatus.Tree.Snapshot(id: 7, time: Date(timeIntervalSince1970: 1_999_999_000),
                                                committedAt: Date(timeIntervalSince1970: 1_999_999_010), files: 3, bytes: 99)
        status.trees = [SiteStatus.Tree(
            name: "docs", role: "primary", source: "/srv/docs", target: nil, mode: "scheduled", schedule: "every 1h", state: "idle",
            lastSnapshot: snapshot, lagSeconds: 1000, progress: nil, errors: ["x: Permission denied"], lastError: nil, nextRunAt: nil,
            files: 3, bytes: 99, bytesReceived: nil,
            replicas: [.init(peer: "west", target: "/srv/docs", state: "in-sync", lastSnapshot: snapshot, lastError: nil,
                             bytesSentLastRun: 10, bytesSent: 1234, bytesOnWire: 2000)])]
        sampler.sample(status, now: Date(timeIntervalSince1970: 2_000_000_000))
        // The status page has a row per tree and replica, with the state in words.
        let html = StatusPage.fragment(status, history: [], now: Date())
        #expect(html.contains(#"data-tree="docs" data-peer="west" data-role="primary" data-mode="scheduled" data-state="in-sync""#))
        #expect(html.contains("/srv/docs → west:/srv/docs") && html.contains("1 path not replicated: x: Permission denied"))
        #expect(html.contains("#7 of ") && html.contains(", 3 files, 99 B") && html.contains("scheduled, every 1h"))
        let text = registry.emitToString()
        for line in [#"ferry_tree_lag_seconds{tree="docs"} 1000.0"#, #"ferry_tree_rpo_target_seconds{tree="docs"} 3600.0"#,
                     #"ferry_tree_errors{tree="docs"} 1.0"#, #"ferry_tree_files{tree="docs"} 3.0"#,
                     #"ferry_tree_last_snapshot_timestamp_seconds{tree="docs",peer="west"} 1999999000.0"#,
                     #"ferry_tree_last_snapshot_id{tree="docs",peer="west"} 7.0"#,
                     #"ferry_tree_sent_bytes_total{tree="docs",peer="west"} 1234"#,
                     #"ferry_tree_replica_failed{tree="docs",peer="west"} 0.0"#] {
            #expect(text.contains(line), "no \(line) in\n\(text)")
        }
    }

    @Test func historyKeepsFifteenMinutes() {
        let sampler = StatusSampler(registry: PrometheusCollectorRegistry(), config: Self.config)
        let t0 = Date(timeIntervalSince1970: 2_000_000_000)
        for i in 0..<(StatusSampler.historyLength + 50) { sampler.sample(Self.status(sent: UInt64(i)), now: t0 + Double(i)) }
        #expect(sampler.history.count == StatusSampler.historyLength)
        #expect(sampler.history.last?.time == t0 + Double(StatusSampler.historyLength + 49))
    }

    @Test func thePageSaysWhyInWordsAndEscapesWhatItShows() {
        let down = Self.status(state: "degraded", lag: 38 << 20, peerUp: false)
        let html = StatusPage.page(down, history: [], now: Date())
        #expect(html.contains(#"data-volume="vm1" data-peer="west" data-role="primary" data-mode="async" data-state="degraded""#))
        #expect(html.contains("west unreachable since "))
        #expect(html.contains("writes degraded, 38 MiB to resync"))
        #expect(!html.contains("<script src") && !html.contains("http://") && !html.contains("https://"), "the page loads nothing from elsewhere")
        let hostile = Self.status(reason: "<img src=x onerror=alert(1)> & \"quoted\"")
        let escaped = StatusPage.fragment(hostile, history: [], now: Date())
        #expect(!escaped.contains("<img"))
        #expect(escaped.contains("&lt;img src=x onerror=alert(1)&gt; &amp; &quot;quoted&quot;"))
    }

    @Test func theTokenComparisonNeedsEveryByte() {
        #expect(BearerCheck.equal("0123456789abcdef", "0123456789abcdef"))
        #expect(!BearerCheck.equal("0123456789abcdef", "0123456789abcdeF"))
        #expect(!BearerCheck.equal("0123456789abcdef", "0123456789abcde"))
        #expect(!BearerCheck.equal("", "0123456789abcdef"))
        #expect(!BearerCheck.equal("0123456789abcdef0", "0123456789abcdef"))
    }
}
