import FerryCore
import FerrySite
import FerryWire
import Foundation
import NIOConcurrencyHelpers
import Prometheus

/// Once a second: reads the site's status (what `ferry status --json` prints), sets the
/// Prometheus gauges from it, and keeps the last 15 minutes for the status page's plots, so the
/// page needs no Prometheus server. Series of things that went away (a volume that became a
/// secondary no longer has links) are unregistered, not left at their last value.
public final class StatusSampler: Sendable {
    /// 15 minutes at one sample a second.
    public static let historyLength = 900

    /// One row of the page: a volume and one of its peers (or the volume alone).
    public struct RowSample: Sendable {
        public var lagBytes: UInt64
        public var lagSeconds: Double
        /// Bytes a second sent to the peer (primary) or received (secondary) since the last sample.
        public var throughput: Double
    }

    public struct Sample: Sendable {
        public var time: Date
        public var rows: [String: RowSample]
        /// Heartbeat round trip by peer, in seconds.
        public var rtt: [String: Double]
    }

    struct State {
        var latest: SiteStatus?
        var history: [Sample] = []
        /// Counters fed from cumulative status figures: the last figure seen, by series.
        var lastTotals: [String: UInt64] = [:]
        /// When each row was last seen caught up (lag 0, consistent, connected).
        var lastInSync: [String: Date] = [:]
        /// Each peer's `since` while connected: a new value is a reconnect.
        var upSince: [String: Date] = [:]
        var gauges: [String: Gauge] = [:]
        var counters: [String: Counter] = [:]
        /// The help text each name was first registered with: the registry stops the process on
        /// a second, different one.
        var helps: [String: String] = [:]
    }

    let registry: PrometheusCollectorRegistry
    let config: SiteConfig
    private let state = NIOLockedValueBox(State())

    init(registry: PrometheusCollectorRegistry, config: SiteConfig) {
        self.registry = registry
        self.config = config
    }

    public var latest: SiteStatus? { state.withLockedValue { $0.latest } }
    public var history: [Sample] { state.withLockedValue { $0.history } }

    /// Row key: `volume` or `volume/peer`.
    static func rowKey(_ volume: String, _ peer: String?) -> String { peer.map { "\(volume)/\($0)" } ?? volume }

    /// Takes one sample of `status` at `now`.
    func sample(_ status: SiteStatus, now: Date = Date()) {
        state.withLockedValue { s in
            var w = Writer(registry: registry, state: s, touched: [])
            var sample = Sample(time: now, rows: [:], rtt: [:])
            let elapsed = s.history.last.map { now.timeIntervalSince($0.time) } ?? 0
            w.gauge("ferry_build_info", "1 always; the version and commit as labels.",
                    [("version", BuildInfo.version), ("commit", BuildInfo.commit)], 1)
            w.gauge("ferry_site_info", "1 always; the site's name and ID as labels.",
                    [("site", status.site.name), ("site_id", status.site.siteID)], 1)
            w.gauge("ferry_start_time_seconds", "When the daemon started, Unix time.", [], status.site.startedAt.timeIntervalSince1970)

            for peer in status.peers {
                let l = [("peer", peer.name)]
                let up = peer.state == .connected
                w.gauge("ferry_peer_up", "1 while the peer link is connected.", l, up ? 1 : 0)
                w.gauge("ferry_peer_state_since_timestamp_seconds", "When the link last came up (connected) or went down.",
                        l, peer.since.timeIntervalSince1970)
                if let rtt = peer.rttMilliseconds {
                    w.gauge("ferry_peer_rtt_seconds", "The last heartbeat round trip to the peer.", l, rtt / 1000)
                    sample.rtt[peer.name] = rtt / 1000
                }
                let reconnects = w.counter("ferry_peer_reconnects_total", "Times the link to the peer came up since start.", l)
                if up, w.state.upSince[peer.name] != peer.since {
                    w.state.upSince[peer.name] = peer.since
                    reconnects.increment()
                }
            }

            for v in status.volumes {
                let vl = [("volume", v.name)]
                for role in ["primary", "secondary"] {
                    w.gauge("ferry_volume_role", "1 for the volume's role on this site, 0 for the other.",
                            vl + [("role", role)], v.role == role ? 1 : 0)
                }
                w.gauge("ferry_volume_size_bytes", "The volume's size.", vl, Double(v.sizeBytes))
                if let epoch = v.epoch { w.gauge("ferry_volume_epoch", "The epoch this site holds the volume in.", vl, Double(epoch)) }
                w.gauge("ferry_volume_fenced", "1 when this site was the primary and another holds a newer epoch.", vl, v.fenced == nil ? 0 : 1)
                w.gauge("ferry_volume_split_brain", "1 when another site is primary too, with a diverged history.", vl,
                        (v.splitBrain ?? []).isEmpty ? 0 : 1)
                w.gauge("ferry_volume_error", "1 once an I/O or replication step of the volume failed (ferry status says which); until a restart.", vl, v.lastError == nil ? 0 : 1)
                w.gauge("ferry_nbd_connections", "NBD clients connected to the volume's export.", vl, Double(v.clientsConnected))
                w.gauge("ferry_volume_drill_active", "1 while a DR drill of the volume runs on this site.", vl, v.drill == nil ? 0 : 1)
                if let points = v.recoveryPoints {
                    w.gauge("ferry_volume_recovery_points", "Recovery points this site keeps (history:).", vl, Double(points.count))
                    w.gauge("ferry_volume_undo_log_bytes", "Bytes of before-images that keep the recovery points reachable.",
                            vl, Double(points.undoLogBytes))
                    if let oldest = points.oldest {
                        w.gauge("ferry_volume_history_window_seconds", "Age of the oldest recovery point.", vl,
                                max(0, now.timeIntervalSince(oldest.time)))
                    }
                    if let newest = points.newest {
                        w.gauge("ferry_volume_last_point_timestamp_seconds", "When the newest recovery point was taken.",
                                vl, newest.time.timeIntervalSince1970)
                    }
                }
                if let r = v.replicaState {
                    w.gauge("ferry_volume_consistent", "1 when this copy equals a state of the primary.", vl, r.consistent ? 1 : 0)
                    w.gauge("ferry_volume_applied_sequence", "The last write sequence applied to this copy.", vl, Double(r.appliedSequence))
                    let received = w.total("ferry_volume_received_bytes_total", "Replication bytes received for the volume.",
                                           vl, r.bytesReceived)
                    let key = Self.rowKey(v.name, nil)
                    sample.rows[key] = RowSample(lagBytes: 0, lagSeconds: 0, throughput: elapsed > 0 ? Double(received) / elapsed : 0)
                }
                // As the primary's machine sees its peers: after a promotion, the first primary
                // takes this site's place among them, with this site's policy.
                let policies = config.volumes.first { $0.name == v.name }.map {
                    RoleChange.peers(replicas: $0.replicas, firstPrimary: $0.primary, whenPrimaryIs: status.site.name)
                } ?? [:]
                for r in v.replicas {
                    replica(r, volume: v.name, policy: policies[r.peer], now: now, elapsed: elapsed, writer: &w, sample: &sample)
                }
            }
            for t in status.trees { tree(t, config: config.tree(named: t.name), site: status.site.name, writer: &w) }
            s = w.state
            // Series not set in this sample describe what no longer exists.
            for (key, gauge) in s.gauges where !w.touched.contains(key) {
                registry.unregisterGauge(gauge)
                s.gauges[key] = nil
            }
            s.latest = status
            s.history.append(sample)
            if s.history.count > Self.historyLength { s.history.removeFirst(s.history.count - Self.historyLength) }
        }
    }

    private func replica(_ r: SiteStatus.Replica, volume: String, policy: ReplicaPolicy?, now: Date, elapsed: Double,
                         writer w: inout Writer, sample: inout Sample) {
        let l = [("volume", volume), ("peer", r.peer)]
        for state in ReplicaLinkState.allCases {
            w.gauge("ferry_volume_link_state", "1 for the link's current state, 0 for the others.",
                    l + [("mode", r.mode), ("state", state.rawValue)], r.state == state.rawValue ? 1 : 0)
        }
        w.gauge("ferry_volume_peer_connected", "1 while the volume has a session with the peer.", l, r.connected ? 1 : 0)
        w.gauge("ferry_volume_peer_consistent", "1 when the peer's copy equals a state of this primary.", l, r.consistent ? 1 : 0)
        w.gauge("ferry_volume_lag_bytes", "Data bytes the peer is behind.", l, Double(r.lagBytes))
        w.gauge("ferry_volume_lag_seconds", "Age of the oldest write the peer lacks (the live RPO); 0 when caught up.", l, r.lagSeconds)
        w.gauge("ferry_volume_dirty_bytes", "Bytes marked for the peer in the dirty bitmap (to resync).", l, Double(r.dirtyBytes))
        w.gauge("ferry_volume_inflight_bytes", "Bytes sent to the peer and not yet acknowledged.", l, Double(r.inFlightBytes))
        w.gauge("ferry_volume_resync_remaining_bytes", "Initial sync or catch-up: bytes left (0 when none runs).",
                l, Double(r.syncRemainingBytes ?? 0))
        w.gauge("ferry_volume_resync_total_bytes", "Initial sync or catch-up: bytes in all (0 when none runs).",
                l, Double(r.syncTotalBytes ?? 0))
        if let policy {
            // sync and semi-sync promise RPO 0; async its max-lag duration when it has one;
            // scheduled is judged by its interval instead.
            let rpoTarget: Int64? = switch policy.mode {
            case .sync, .semiSync: 0
            case .async: policy.maxLagSeconds
            case .scheduled: nil
            }
            if let rpoTarget {
                w.gauge("ferry_volume_rpo_target_seconds", "The RPO the configuration asks of the peer.", l, Double(rpoTarget))
            }
            if policy.mode == .async, let bytes = policy.maxLagBytes {
                w.gauge("ferry_volume_max_lag_bytes", "The lag in bytes the configuration allows the peer (max-lag).", l, Double(bytes))
            }
            if policy.mode == .scheduled, let schedule = policy.schedule {
                w.gauge("ferry_volume_schedule_interval_seconds", "Seconds between scheduled points (every:/at:).",
                        l, Double(schedule.intervalSeconds))
            }
        }
        if let used = r.journalBytes, let limit = r.journalLimitBytes {
            w.gauge("ferry_volume_journal_used_bytes", "async: journal bytes the peer has not acknowledged.", l, Double(used))
            w.gauge("ferry_volume_journal_limit_bytes", "async: the most the journal may hold for the peer (journal-size).",
                    l, Double(limit))
        }
        let sent = w.total("ferry_volume_sent_bytes_total", "Data bytes sent to the peer since the daemon started.", l, r.bytesSent)
        let key = Self.rowKey(volume, r.peer)
        if r.mode == ReplicationMode.scheduled.rawValue {
            if let point = r.lastPoint { w.state.lastInSync[key] = point.completedAt }
        } else if r.connected && r.consistent && r.lagBytes == 0 {
            w.state.lastInSync[key] = now
        }
        if let last = w.state.lastInSync[key] {
            w.gauge("ferry_volume_last_sync_timestamp_seconds",
                    "When the peer last held everything (scheduled: when the last point completed).", l, last.timeIntervalSince1970)
        }
        sample.rows[key] = RowSample(lagBytes: r.lagBytes, lagSeconds: r.lagSeconds,
                                     throughput: elapsed > 0 ? Double(sent) / elapsed : 0)
    }

    /// A tree's series: one set per replica on the primary (`peer` the replica), one on a replica
    /// (`peer` this site).
    private func tree(_ t: SiteStatus.Tree, config: TreeConfig?, site: String, writer w: inout Writer) {
        let tl = [("tree", t.name)]
        // What the alert compares the lag with: a continuous tree is meant to be seconds behind (a
        // minute is the target); a scheduled one a schedule's interval.
        let target = config?.schedule.map { Double($0.intervalSeconds) } ?? 60
        w.gauge("ferry_tree_rpo_target_seconds", "The lag a tree is meant to stay under: 60 s continuous, the schedule's interval scheduled.",
                tl, target)
        w.gauge("ferry_tree_lag_seconds", "Seconds since the oldest change not yet on every replica (scheduled: age of the replicas' copy).",
                tl, t.lagSeconds)
        w.gauge("ferry_tree_files", "Files in the tree at the last scan (primary) or the last snapshot (replica).", tl, Double(t.files ?? 0))
        w.gauge("ferry_tree_bytes", "Bytes of file data in the tree at the last scan or snapshot.", tl, Double(t.bytes ?? 0))
        w.gauge("ferry_tree_errors", "Paths the last scan could not take (unreadable, changing while read).", tl, Double(t.errors.count))
        w.gauge("ferry_tree_running", "1 while a run of the tree is under way.", tl, ["scanning", "committing", "receiving", "applying"].contains(t.state) ? 1 : 0)
        if t.role == "replica" {
            let l = tl + [("peer", site)]
            if let s = t.lastSnapshot {
                w.gauge("ferry_tree_last_snapshot_timestamp_seconds", "When the newest snapshot's scan began (the tree as it was then).",
                        l, s.time.timeIntervalSince1970)
                w.gauge("ferry_tree_last_snapshot_id", "The newest snapshot's ID.", l, Double(s.id))
            }
            _ = w.total("ferry_tree_received_bytes_total", "Chunk bytes received for the tree since the daemon started.", tl, t.bytesReceived ?? 0)
            return
        }
        for r in t.replicas {
            let l = tl + [("peer", r.peer)]
            w.gauge("ferry_tree_replica_failed", "1 when the last run to the replica failed.", l, r.state == "failed" ? 1 : 0)
            if let s = r.lastSnapshot {
                w.gauge("ferry_tree_last_snapshot_timestamp_seconds", "When the newest snapshot's scan began (the tree as it was then).",
                        l, s.time.timeIntervalSince1970)
                w.gauge("ferry_tree_last_snapshot_id", "The newest snapshot's ID.", l, Double(s.id))
            }
            _ = w.total("ferry_tree_sent_bytes_total", "Chunk bytes sent to the replica since the daemon started (before compression).",
                        l, r.bytesSent)
            _ = w.total("ferry_tree_wire_bytes_total", "Bytes of tree frames sent to the replica since the daemon started.", l, r.bytesOnWire)
        }
    }

    /// Sets gauges and counters, remembering which series this sample touched.
    struct Writer {
        let registry: PrometheusCollectorRegistry
        var state: State
        var touched: Set<String>

        static func key(_ name: String, _ labels: [(String, String)]) -> String {
            ([name] + labels.map { "\($0.0)=\($0.1)" }).joined(separator: "\u{1}")
        }

        mutating func gauge(_ name: String, _ help: String, _ labels: [(String, String)], _ value: Double) {
            let key = Self.key(name, labels)
            touched.insert(key)
            if let g = state.gauges[key] { return g.set(value) }
            let help = firstHelp(name, help)
            let g = labels.isEmpty ? registry.makeGauge(name: name, help: help) : registry.makeGauge(name: name, labels: labels, help: help)
            state.gauges[key] = g
            g.set(value)
        }

        mutating func counter(_ name: String, _ help: String, _ labels: [(String, String)]) -> Counter {
            let key = Self.key(name, labels)
            if let c = state.counters[key] { return c }
            let c = registry.makeCounter(name: name, labels: labels, help: firstHelp(name, help))
            state.counters[key] = c
            return c
        }

        mutating func firstHelp(_ name: String, _ help: String) -> String {
            if let first = state.helps[name] { return first }
            state.helps[name] = help
            return help
        }

        /// A counter fed from a cumulative figure: adds what it grew by since the last sample
        /// (all of it after a restart of the figure); returns that growth.
        mutating func total(_ name: String, _ help: String, _ labels: [(String, String)], _ figure: UInt64) -> UInt64 {
            let c = counter(name, help, labels)
            let key = Self.key(name, labels)
            let last = state.lastTotals[key] ?? 0
            let grown = figure >= last ? figure - last : figure
            state.lastTotals[key] = figure
            if grown > 0 { c.increment(by: Int64(clamping: grown)) }
            return grown
        }
    }
}
