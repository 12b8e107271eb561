import FerryCore
import FerrySite
import FerryWire
import Foundation

/// The status page: one row per volume and peer with role, mode, state and the reason in words,
/// plots of the last 15 minutes from the sampler, and the peer links. Self-contained HTML, CSS
/// and inline SVG (no scripts or fonts from elsewhere); the rows are rendered on the server, and
/// a few lines of script fetch `/fragment` every 2 seconds to replace them. Stable `data-*`
/// attributes (`data-volume`, `data-tree`, `data-peer`, `data-role`, `data-mode`, `data-state`,
/// `data-plot`) are a contract for tests and scrapers.
enum StatusPage {
    static func page(_ status: SiteStatus?, history: [StatusSampler.Sample], now: Date) -> String {
        let title = status.map { "Ferry — \($0.site.name)" } ?? "Ferry"
        return """
            <!doctype html>
            <html lang="en"><head><meta charset="utf-8">
            <meta name="viewport" content="width=device-width, initial-scale=1">
            <title>\(escape(title))</title>
            <noscript><meta http-equiv="refresh" content="5"></noscript>
            <style>\(css)</style></head>
            <body><main id="live">\(fragment(status, history: history, now: now))</main>
            <script>\(script)</script></body></html>
            """
    }

    static let css = """
        body{font:15px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;padding:12px;background:#fafafa;color:#222}
        h1{font-size:1.3em;margin:0 0 4px}h2{font-size:1.05em;margin:18px 0 6px}.sub{color:#666;font-size:.9em}
        table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #e4e4e4;vertical-align:top}
        th{font-size:.8em;color:#666;font-weight:600}.state{font-weight:600;white-space:nowrap}
        .ok{color:#17663a}.warn{color:#9a6200}.bad{color:#b3261e}.reason{color:#444;font-size:.92em}
        .plots{display:flex;flex-wrap:wrap;gap:8px;margin-top:4px}figure{margin:0}figcaption{font-size:.75em;color:#666}
        svg{background:#f3f5f7;border-radius:3px}polyline{fill:none;stroke:#2a6fb0;stroke-width:1.5}
        @media (max-width:700px){thead{display:none}tr,td{display:block;border:0}tr{border-bottom:1px solid #ddd;padding:6px 0}td{padding:2px 4px}
        td[data-label]::before{content:attr(data-label) ": ";color:#666;font-size:.8em}}
        """

    /// Polls the fragment, keeping the bearer token the page was opened with (`?token=`).
    static let script = """
        (function(){var q=new URLSearchParams(location.search),t=q.get('token'),h=t?{'Authorization':'Bearer '+t}:{};
        function tick(){fetch('fragment',{headers:h,cache:'no-store'}).then(function(r){return r.ok?r.text():null})
        .then(function(x){if(x!==null){document.getElementById('live').innerHTML=x}}).catch(function(){})
        .finally(function(){setTimeout(tick,2000)})}setTimeout(tick,2000)})();
        """

    static func fragment(_ status: SiteStatus?, history: [StatusSampler.Sample], now: Date) -> String {
        guard let status else { return "<h1>Ferry</h1><p>Starting: no sample yet.</p>" }
        var out = "<h1 data-site=\"\(escape(status.site.name))\">Site \(escape(status.site.name))</h1>"
        out += "<div class=\"sub\">site ID \(escape(status.site.siteID)) · up since \(clock(status.site.startedAt)) · "
            + "updated <span data-updated>\(clock(now))</span> UTC</div>"
        out += "<h2>Volumes</h2><table><thead><tr><th>Volume</th><th>Peer</th><th>Role</th><th>Mode</th><th>State</th>"
            + "<th>Lag</th><th>Last 15 minutes</th></tr></thead><tbody>"
        for v in status.volumes {
            if v.role == "primary" && !v.replicas.isEmpty {
                for r in v.replicas { out += replicaRow(v, r, peers: status.peers, history: history) }
            } else {
                out += volumeRow(v, history: history)
            }
        }
        if status.volumes.isEmpty { out += "<tr><td colspan=\"7\">This site holds no volume.</td></tr>" }
        out += "</tbody></table>"
        if !status.trees.isEmpty {
            out += "<h2>Trees</h2><table><thead><tr><th>Tree</th><th>Peer</th><th>Role</th><th>Mode</th><th>State</th>"
                + "<th>Last snapshot</th><th>Lag</th></tr></thead><tbody>"
            for t in status.trees {
                if t.role == "primary" && !t.replicas.isEmpty {
                    for r in t.replicas { out += treeRow(t, replica: r, now: now) }
                } else {
                    out += treeRow(t, replica: nil, now: now)
                }
            }
            out += "</tbody></table>"
        }
        out += "<h2>Peers</h2><table><thead><tr><th>Peer</th><th>Link</th><th>Since</th><th>RTT</th><th>Last 15 minutes</th></tr></thead><tbody>"
        for p in status.peers {
            let up = p.state == .connected
            let rtt = p.rttMilliseconds.map { String(format: "%.2f ms", $0) } ?? "—"
            out += "<tr data-peer=\"\(escape(p.name))\" data-link=\"\(escape(p.state.rawValue))\">"
                + "<td>\(escape(p.name))<div class=\"sub\">\(escape(p.address))</div></td>"
                + "<td class=\"state \(up ? "ok" : "bad")\">\(escape(p.state.rawValue))"
                + (p.lastError.map { "<div class=\"reason\">\(escape($0))</div>" } ?? "") + "</td>"
                + "<td>\(clock(p.since))</td><td>\(rtt)</td>"
                + "<td>\(plot("rtt", "RTT", series: history.map { $0.rtt[p.name] }, unit: .seconds, labels: [("peer", p.name)]))</td></tr>"
        }
        if status.peers.isEmpty { out += "<tr><td colspan=\"5\">No peers are configured.</td></tr>" }
        out += "</tbody></table>"
        return out
    }

    static func replicaRow(_ v: SiteStatus.Volume, _ r: SiteStatus.Replica, peers: [PeerLinkStatus],
                           history: [StatusSampler.Sample]) -> String {
        let key = StatusSampler.rowKey(v.name, r.peer)
        let cls: String
        switch r.state {
        case "in-sync", "waiting", "sending-point": cls = "ok"
        case "degraded", "blocked": cls = "bad"
        default: cls = r.connected ? "warn" : "bad"
        }
        let lag = r.rpoZero ? "0 (RPO 0)" : "\(bytes(r.lagBytes)), \(seconds(r.lagSeconds))"
        let rows = history.map { $0.rows[key] }
        let labels = [("volume", v.name), ("peer", r.peer)]
        return "<tr data-volume=\"\(escape(v.name))\" data-peer=\"\(escape(r.peer))\" data-role=\"primary\" "
            + "data-mode=\"\(escape(r.mode))\" data-state=\"\(escape(r.state))\">"
            + "<td data-label=\"volume\">\(escape(v.name))</td><td data-label=\"peer\">\(escape(r.peer))</td>"
            + "<td data-label=\"role\">primary</td><td data-label=\"mode\">\(escape(r.mode))</td>"
            + "<td><span class=\"state \(cls)\">\(escape(r.state))</span>"
            + "<div class=\"reason\" data-reason>\(escape(reason(v, r, peers: peers)))</div></td>"
            + "<td data-label=\"lag\">\(lag)</td><td><div class=\"plots\">"
            + plot("lag-bytes", "lag (bytes)", series: rows.map { $0.map { Double($0.lagBytes) } }, unit: .bytes, labels: labels)
            + plot("lag-seconds", "lag (seconds)", series: rows.map { $0?.lagSeconds }, unit: .seconds, labels: labels)
            + plot("throughput", "sent (bytes/s)", series: rows.map { $0?.throughput }, unit: .bytes, labels: labels)
            + "</div></td></tr>"
    }

    static func volumeRow(_ v: SiteStatus.Volume, history: [StatusSampler.Sample]) -> String {
        let state: String
        let text: String
        if v.role == "primary" {
            state = v.fenced == nil ? "not-replicated" : "fenced"
            text = v.fenced.map { "fenced: \($0)" } ?? "served here; no replicas are configured"
        } else if let r = v.replicaState {
            state = r.consistent ? "consistent" : r.initialized ? "catching-up" : "initial-sync"
            text = (r.consistent ? "a consistent copy of \(v.primarySite)'s volume" : r.initialized
                    ? "catching up from \(v.primarySite); not consistent until it completes"
                    : "receiving its first full copy from \(v.primarySite)")
                + ", epoch \(r.epoch), applied sequence \(r.appliedSequence)"
                + (v.recoveryPoints.map { ", \($0.count) recovery point\($0.count == 1 ? "" : "s")" } ?? "")
                + (v.drill.map { ", drill running at \($0.export)" } ?? "")
        } else {
            state = "no-copy"
            text = "this site holds no copy"
        }
        let withError = text + (v.lastError.map { "; last error: \($0)" } ?? "")
        let key = StatusSampler.rowKey(v.name, nil)
        let rows = history.map { $0.rows[key] }
        let cls = state == "consistent" || state == "not-replicated" ? "ok" : state == "fenced" ? "bad" : "warn"
        return "<tr data-volume=\"\(escape(v.name))\" data-peer=\"\(escape(v.role == "primary" ? "" : v.primarySite))\" "
            + "data-role=\"\(escape(v.role))\" data-mode=\"\" data-state=\"\(state)\">"
            + "<td data-label=\"volume\">\(escape(v.name))</td><td data-label=\"peer\">\(v.role == "primary" ? "—" : "from " + escape(v.primarySite))</td>"
            + "<td data-label=\"role\">\(escape(v.role))</td><td data-label=\"mode\">—</td>"
            + "<td><span class=\"state \(cls)\">\(state)</span><div class=\"reason\" data-reason>\(escape(withError))</div></td>"
            + "<td>—</td><td><div class=\"plots\">"
            + (v.replicaState == nil ? "" : plot("throughput", "received (bytes/s)", series: rows.map { $0?.throughput }, unit: .bytes,
                                                 labels: [("volume", v.name)]))
            + "</div></td></tr>"
    }

    /// A tree on its primary (one row per replica) or on a replica: the state in words, the last
    /// snapshot, the lag.
    static func treeRow(_ t: SiteStatus.Tree, replica r: SiteStatus.Tree.Replica?, now: Date) -> String {
        let state = r?.state ?? t.state
        var parts: [String] = []
        if let r {
            parts.append(t.source.map { "\($0) → \(r.peer):\(r.target ?? "?")" } ?? "to \(r.peer)")
        } else if let target = t.target {
            parts.append("kept in \(target)")
        }
        if t.state != "idle" && t.state != state { parts.append(t.state) }
        if let p = t.progress {
            var text = "scanning: \(p.filesScanned) of about \(max(p.filesScanned, p.expectedFiles)) files, "
                + "\(bytes(p.bytesScanned)) read"
            if let eta = p.etaSeconds { text += ", about \(seconds(eta)) to go" }
            parts.append(text)
        }
        if let next = t.nextRunAt, t.progress == nil { parts.append("next run at \(clock(next))") }
        if !t.errors.isEmpty {
            parts.append("\(t.errors.count) path\(t.errors.count == 1 ? "" : "s") not replicated: \(t.errors.prefix(2).joined(separator: "; "))"
                + (t.errors.count > 2 ? "; …" : ""))
        }
        if !t.keptAside.isEmpty { parts.append("\(t.keptAside.count) kept aside (P6)") }
        if let error = r?.lastError ?? t.lastError { parts.append("last error: \(error)") }
        let snapshot = r?.lastSnapshot ?? t.lastSnapshot
        let last = snapshot.map { "#\($0.id) of \(clock($0.time)), \($0.files) files, \(bytes(UInt64(max(0, $0.bytes))))" } ?? "none yet"
        let cls: String
        switch state {
        case "in-sync", "idle": cls = "ok"
        case "failed", "error": cls = "bad"
        default: cls = "warn"
        }
        let peer = r?.peer ?? ""
        return "<tr data-tree=\"\(escape(t.name))\" data-peer=\"\(escape(peer))\" data-role=\"\(escape(t.role))\" "
            + "data-mode=\"\(escape(t.mode))\" data-state=\"\(escape(state))\">"
            + "<td data-label=\"tree\">\(escape(t.name))</td><td data-label=\"peer\">\(r == nil ? "—" : escape(peer))</td>"
            + "<td data-label=\"role\">\(escape(t.role))</td>"
            + "<td data-label=\"mode\">\(escape(t.schedule.map { "\(t.mode), \($0)" } ?? t.mode))</td>"
            + "<td><span class=\"state \(cls)\">\(escape(state))</span><div class=\"reason\" data-reason>\(escape(parts.joined(separator: ", ")))</div></td>"
            + "<td data-label=\"last snapshot\">\(escape(last))</td><td data-label=\"lag\">\(seconds(t.lagSeconds))</td></tr>"
    }

    /// The row's state in words: "west unreachable since 14:02:11, writes degraded, 38 MiB to resync".
    static func reason(_ v: SiteStatus.Volume, _ r: SiteStatus.Replica, peers: [PeerLinkStatus]) -> String {
        var parts: [String] = []
        let link = peers.first { $0.name == r.peer }
        if let link, link.state != .connected {
            parts.append("\(r.peer) unreachable since \(clock(link.since))")
            switch r.state {
            case "degraded": parts.append("writes degraded")
            case "blocked": parts.append("writes blocked until it returns")
            default: break
            }
        } else if !r.reason.isEmpty {
            parts.append(r.reason)
        }
        if let remaining = r.syncRemainingBytes, let total = r.syncTotalBytes, total > 0 {
            var progress = "\(bytes(total - min(total, remaining))) of \(bytes(total)) copied"
            if let eta = r.syncETASeconds { progress += ", about \(seconds(eta)) to go" }
            parts.append(progress)
        } else if r.dirtyBytes > 0 {
            parts.append("\(bytes(r.dirtyBytes)) to resync")
        }
        if let split = v.splitBrain, !split.isEmpty { parts.append("split brain with \(split.joined(separator: ", "))") }
        if let error = v.lastError { parts.append("last error: \(error)") }
        return parts.joined(separator: ", ")
    }

    enum Unit { case bytes, seconds }

    /// A sparkline of the last 15 minutes (nil: no sample for the row then), newest at the right
    /// edge on a fixed 15-minute axis, with the newest value and the peak in its caption.
    static func plot(_ kind: String, _ caption: String, series: [Double?], unit: Unit, labels: [(String, String)]) -> String {
        let width = 180.0, height = 40.0
        let values = series.compactMap { $0 }
        let peak = max(values.max() ?? 0, unit == .seconds ? 0.001 : 1)
        let slots = Double(StatusSampler.historyLength - 1)
        var points: [String] = []
        for (i, value) in series.enumerated() {
            guard let value else { continue }
            let age = Double(series.count - 1 - i)
            let x = width * (slots - min(age, slots)) / slots
            let y = height - 2 - (height - 4) * value / peak
            points.append(String(format: "%.1f,%.1f", x, y))
        }
        func shown(_ v: Double) -> String { unit == .bytes ? bytes(UInt64(max(0, v))) : seconds(v) }
        let text = values.last.map { newest in
            (values.max() ?? 0) > newest ? "\(shown(newest)) (peak \(shown(peak)))" : shown(newest)
        } ?? "no data yet"
        let attrs = labels.map { " data-\($0.0)=\"\(escape($0.1))\"" }.joined()
        return "<figure data-plot=\"\(kind)\"\(attrs)><svg width=\"\(Int(width))\" height=\"\(Int(height))\" viewBox=\"0 0 \(Int(width)) \(Int(height))\" "
            + "role=\"img\" aria-label=\"\(escape(caption)), last 15 minutes\"><polyline points=\"\(points.joined(separator: " "))\"/></svg>"
            + "<figcaption>\(escape(caption)): \(text)</figcaption></figure>"
    }

    static func bytes(_ n: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(n), i = 0
        while value >= 1024 && i < units.count - 1 { value /= 1024; i += 1 }
        return i == 0 ? "\(n) B" : String(format: value < 10 ? "%.1f" : "%.0f", value) + " " + units[i]
    }

    static func seconds(_ s: Double) -> String {
        if s < 1 { return String(format: "%.0f ms", s * 1000) }
        if s < 120 { return String(format: "%.0f s", s) }
        if s < 7200 { return String(format: "%.0f min", s / 60) }
        return String(format: "%.1f h", s / 3600)
    }

    static func clock(_ date: Date) -> String {
        let f = DateFormatter()
        f.locale = Locale(identifier: "en_US_POSIX")
        f.timeZone = TimeZone(identifier: "UTC")
        f.dateFormat = Calendar(identifier: .gregorian).isDateInToday(date) ? "HH:mm:ss" : "yyyy-MM-dd HH:mm:ss"
        return f.string(from: date)
    }

    static func escape(_ s: String) -> String {
        var out = ""
        out.reserveCapacity(s.utf8.count)
        for c in s.unicodeScalars {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.unicodeScalars.append(c)
            }
        }
        return out
    }
}
