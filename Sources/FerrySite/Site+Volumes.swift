import FerryCore
import FerryNBD
import FerryStore
import FerryTree
import FerryVolume
import FerryWire
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

extension Site {
    /// Opens every volume this site is primary or replica of: catalog record, image, and the
    /// runtime that replicates it; exports each over NBD (read-write on the primary, read-only on a
    /// replica).
    func openVolumes(catalog: Catalog, links: PeerVolumeLinks) throws -> [Volume] {
        let volumesDir = config.site.dataDirectory + "/volumes"
        try FileManager.default.createDirectory(atPath: volumesDir, withIntermediateDirectories: true)
        var volumes: [Volume] = []
        for v in config.volumes {
            guard v.sites.contains(config.site.name) else {
                volumes.append(Volume(config: v, isPrimary: false, isReplica: false))
                continue
            }
            let (record, created) = try catalog.ensureVolume(name: v.name, sizeBytes: v.sizeBytes)
            // A role taken at run time (promote, demote) outlives the config's `primary:`.
            let isPrimary = record.role.map { $0 == "primary" || $0 == "fenced" } ?? (v.primary == config.site.name)
            let isReplica = !isPrimary
            if let role = record.role, role != "fenced", role != (v.primary == config.site.name ? "primary" : "secondary") {
                let command = role == "primary" ? "promote" : "demote"
                logger.warning("volume \(v.name): this site is its \(role) since a `ferry \(command)`, while the config names \(v.primary) as primary; the live role stands (make the configs agree)")
            }
            let peers = v.peers(whenPrimaryIs: config.site.name)
            let imagePath = "\(volumesDir)/\(v.name).img"
            let image = try VolumeImage.openOrCreate(path: imagePath, size: v.sizeBytes)
            warnIfThin(image, volume: v.name)
            let stateDir = "\(volumesDir)/\(v.name).state"
            try FileManager.default.createDirectory(atPath: stateDir, withIntermediateDirectories: true)
            let clean = takeCleanShutdownMarker(v.name)
            logger.info(created ? "volume created" : "volume opened", metadata: [
                "volume": "\(v.name)", "size": "\(ByteSize.format(v.sizeBytes))", "uuid": "\(record.uuid)",
                "epoch": "\(record.epoch)", "role": "\(isPrimary ? "primary" : "secondary")"])
            var volume = Volume(config: v, record: record, image: image, isPrimary: isPrimary, isReplica: isReplica)
            let onEvent: @Sendable (VolumeEvent) -> Void = { [weak self] event in self?.log(event) }
            let description = "ferry volume \(v.name) (\(record.uuid))"
            if isPrimary {
                if peers.isEmpty {
                    exports.add(NBDExport(name: v.name, description: description,
                                          device: ImageBlockDevice(image: image, threadPool: threadPool)))
                } else {
                    var machine = PrimaryVolume.Config(
                        volume: v.name, volumeSize: v.sizeBytes, epoch: UInt64(max(1, record.epoch)),
                        generation: PrimaryVolume.Config.generationNumber(record.generation), peers: peers)
                    machine.regionSize = PrimaryVolume.Config.regionSize(forVolumeSize: v.sizeBytes)
                    machine.history = Self.history(record)
                    (machine.siteIndex, machine.siteCount) = v.epochStripe(of: config.site.name)
                    machine.recordsAckLatency = recordsMetrics
                    let runtime = try PrimaryVolumeRuntime(
                        name: v.name, image: image, config: machine, stateDirectory: stateDir, cleanShutdown: clean,
                        threadPool: threadPool, links: links, logger: logger, onEvent: onEvent)
                    if !clean { logger.warning("volume \(v.name) was not stopped cleanly: the regions it may have been writing are resent to its replicas") }
                    volume.primary = runtime
                    exports.add(NBDExport(name: v.name, description: description, device: runtime))
                    if record.role == "fenced" {
                        runtime.fence(reason: "fenced before the last restart: another site holds a newer epoch of \(v.name); "
                                      + "run `ferry demote \(v.name)` here to rejoin as its secondary")
                    }
                }
            } else {
                try? FileManager.default.removeItem(atPath: stateDir + "/drill.img")   // a drill does not outlive a restart
                volume.replica = try ReplicaVolumeRuntime(
                    name: v.name, image: image, stateDirectory: stateDir, threadPool: threadPool, links: links,
                    logger: logger, history: v.history, onEvent: onEvent)
                // A replica is served read-only: its primary is the only writer (P4).
                exports.add(NBDExport(name: v.name, description: description + ", secondary",
                                      device: ImageBlockDevice(image: image, threadPool: threadPool, readOnly: true)))
            }
            volumes.append(volume)
        }
        return volumes
    }

    func makeEngine(_ volumes: [Volume], links: PeerVolumeLinks) -> VolumeEngine {
        var primaries: [String: PrimaryVolumeRuntime] = [:]
        var replicas: [String: ReplicaVolumeRuntime] = [:]
        var peers: [String: Set<String>] = [:]
        for v in volumes {
            if let p = v.primary {
                primaries[v.config.name] = p
                peers[v.config.name] = Set(v.config.peers(whenPrimaryIs: config.site.name).keys)
            }
            if let r = v.replica { replicas[v.config.name] = r }
        }
        return VolumeEngine(siteName: config.site.name, primaries: primaries, replicas: replicas,
                            primaryPeers: peers, links: links, logger: logger)
    }

    /// A watchdog for the link layer: a peer whose current link was never reported up to the
    /// volumes (seen after duplicate-link switch-overs under load) would never replicate; after
    /// four checks two seconds apart the link is reset, and both sites dial again.
    func watchLinks(_ engine: VolumeEngine, peers: PeerLinks, on loop: any EventLoop) {
        guard !engine.isEmpty else { return }
        let strikes = NIOLockedValueBox<[String: Int]>([:])
        let logger = self.logger
        let names = config.peers.map(\.name)
        loop.scheduleRepeatedTask(initialDelay: .seconds(2), delay: .seconds(2)) { _ in
            for peer in names {
                guard let current = peers.currentLink(of: peer), engine.reportedLink(peer) != current else {
                    strikes.withLockedValue { $0[peer] = 0 }
                    continue
                }
                let count = strikes.withLockedValue { s -> Int in
                    s[peer, default: 0] += 1
                    return s[peer]!
                }
                if count >= 4 {
                    strikes.withLockedValue { $0[peer] = 0 }
                    logger.warning("peer link \(peer): \(current) is up but was never reported to the volumes; resetting it")
                    _ = peers.close(peer: peer, link: current, reason: "link reset: it was never reported up to the volume engine")
                }
            }
        }
    }

    /// Routes link events and replication frames to the volumes.
    func connect(_ engine: VolumeEngine, trees: TreeEngine, to peers: PeerLinks) {
        let logger = self.logger
        peers.onLinkUp = { peer, link in
            engine.linkUp(peer: peer, link: link)
            trees.linkUp(peer)
        }
        peers.onLinkDown = { peer, link, reason in
            engine.linkDown(peer: peer, link: link)
            trees.linkDown(peer, reason: reason)
        }
        peers.onWritabilityChanged = { peer, _, writable in
            if writable { trees.writable(peer) }
        }
        peers.onFrame = { frame in
            if frame.frame.type == .tree {
                do {
                    try trees.received(frame.frame, from: frame.peer)
                } catch {
                    logger.warning("closing the link to \(frame.peer): bad tree frame: \(error)")
                    peers.close(peer: frame.peer, link: frame.link, reason: "bad tree frame: \(error)")
                }
                return
            }
            do {
                let volumeFrame = try VolumeFrame(frame: frame.frame)
                engine.received(volumeFrame, from: frame.peer, link: frame.link)
            } catch {
                logger.warning("closing the link to \(frame.peer): bad replication frame: \(error)")
                peers.close(peer: frame.peer, link: frame.link, reason: "bad replication frame: \(error)")
            }
        }
    }

    func log(_ event: VolumeEvent) {
        switch event.kind {
        case .linkState:
            logger.info("\(event.message)", metadata: ["volume": "\(event.volume)"])
        case .ioError, .refused:
            let repeated = state.withLockedValue { s -> Bool in
                defer { s.lastErrors[event.volume] = event.message }
                return s.lastErrors[event.volume] == event.message
            }
            // A refused stream is the protocol at work (a former primary knocking after a move, a
            // stream reopened on a new link): a warning. A failed disk write is an error.
            if !repeated, case .refused = event.kind {
                logger.warning("\(event.message)", metadata: ["volume": "\(event.volume)"])
            } else if !repeated {
                logger.error("\(event.message)", metadata: ["volume": "\(event.volume)"])
            }
        case .takeOver(let peer):
            DispatchQueue.global().async { [weak self] in self?.takeOver(event.volume, from: peer) }
        case .epochChanged(let epoch):
            logger.notice("\(event.message)", metadata: ["volume": "\(event.volume)"])
            recordEpoch(event.volume, epoch)
        case .rejoin(let plan):
            // Not on the runtime's thread: becoming a secondary stops that runtime.
            DispatchQueue.global().async { [weak self] in self?.rejoin(event.volume, plan: plan) }
        case .fenced:
            logger.critical("volume \(event.volume) fenced: \(event.message); it no longer accepts writes here",
                            metadata: ["volume": "\(event.volume)"])
            exports.fence(event.volume, reason: event.message)
            // Kept across restarts: until demoted, this site takes no writes for the volume again.
            do {
                try state.withLockedValue { $0.catalog }?.setRole(name: event.volume, role: "fenced")
            } catch {
                logger.error("volume \(event.volume): recording the fence in the catalog failed: \(error)")
            }
        }
    }

    // MARK: - Clean shutdown

    private func cleanMarker(_ volume: String) -> String {
        config.site.dataDirectory + "/volumes/\(volume).state/clean-shutdown"
    }

    /// True when the last run stopped cleanly; the marker is removed so a crash from now on is seen.
    func takeCleanShutdownMarker(_ volume: String) -> Bool {
        let path = cleanMarker(volume)
        let existed = FileManager.default.fileExists(atPath: path)
        if existed { try? FileManager.default.removeItem(atPath: path) }
        // A volume never started before has nothing in flight: treat it as clean.
        let fresh = !FileManager.default.fileExists(atPath: config.site.dataDirectory + "/volumes/\(volume).state/primary.meta")
        return existed || fresh
    }

    func markCleanShutdown(_ volume: String) {
        _ = FileManager.default.createFile(atPath: cleanMarker(volume), contents: Data())
    }

    /// A thin (sparse) volume larger than the free space of its filesystem fails with ENOSPC once
    /// it fills up: say so at start-up rather than in the middle of a guest's write.
    func warnIfThin(_ image: VolumeImage, volume: String) {
        var fs = statvfs()
        guard statvfs(image.path, &fs) == 0 else { return }
        let free = UInt64(fs.f_bavail) * UInt64(fs.f_frsize)
        var st = stat()
        guard stat(image.path, &st) == 0 else { return }
        let allocated = UInt64(st.st_blocks) * 512
        if image.size > allocated, image.size - allocated > free {
            logger.warning("volume \(volume) is \(ByteSize.format(image.size)) but only \(ByteSize.format(allocated)) is allocated and its filesystem has \(ByteSize.format(free)) free: writes will fail with ENOSPC before the volume is full")
        }
    }
}

/// `VolumeLinks` over the site's `PeerLinks`.
final class PeerVolumeLinks: VolumeLinks {
    private let peers = NIOLockedValueBox<PeerLinks?>(nil)

    func attach(_ links: PeerLinks) { peers.withLockedValue { $0 = links } }

    @discardableResult
    func send(_ frames: [VolumeFrame], to peer: String, link: LinkID) -> Bool {
        guard let links = peers.withLockedValue({ $0 }), !frames.isEmpty else { return false }
        return links.write(frames.map { $0.frame() }, to: peer, link: link)
    }

    func close(peer: String, link: LinkID, reason: String) {
        peers.withLockedValue { $0 }?.close(peer: peer, link: link, reason: reason)
    }

    func isBacklogged(link: LinkID) -> Bool {
        guard let links = peers.withLockedValue({ $0 }), links.eventLoop(of: link) != nil else { return false }
        return !links.isWritable(link: link)
    }

    func afterCurrentTurn(of link: LinkID, _ work: @escaping @Sendable () -> Void) -> Bool {
        guard let loop = peers.withLockedValue({ $0 })?.eventLoop(of: link) else { return false }
        loop.execute(work)
        return true
    }

    /// A link's queued frames are written by a task on its loop, scheduled when the first was
    /// queued (`EstablishedLink.enqueue`); a task scheduled after it runs after it.
    func afterQueuedFrames(on link: LinkID, _ work: @escaping @Sendable () -> Void) -> Bool {
        guard let loop = peers.withLockedValue({ $0 })?.eventLoop(of: link), loop.inEventLoop else { return false }
        loop.execute(work)
        return true
    }
}

extension Site {
    static func generations(_ records: [GenerationRecord]) -> [SiteStatus.Volume.Generation] {
        records.map { .init(id: GenerationRecord.hex($0.id), epoch: $0.epoch, branchSequence: $0.branchSeq) }
    }

    func volumeStatus(_ v: Volume, uriBases: [String]) -> SiteStatus.Volume {
        let me = config.site.name
        let exportsHere = v.isPrimary || v.isReplica
        // The live view: this site when it is the primary; else the configured primary, or, when
        // that is this (demoted) site, the only other holder if there is one.
        let others = v.config.sites.subtracting([me]).sorted()
        // A secondary names the site that streams to it, or last did on its line of history (after a
        // switchover or failover that is not the configured primary).
        let following = v.replica.flatMap { $0.streamingPeer ?? $0.followedPeer }
        let primarySite = v.isPrimary ? me : following ?? (v.config.primary != me ? v.config.primary : others.count == 1 ? others[0] : v.config.primary)
        var status = SiteStatus.Volume(
            name: v.config.name, sizeBytes: v.config.sizeBytes, role: v.isPrimary ? "primary" : "secondary",
            primarySite: primarySite, uuid: v.record?.uuid, epoch: v.record?.epoch, generation: v.record?.generation,
            exports: exportsHere ? uriBases.map { Self.uri(base: $0, export: v.config.name) } : [],
            clientsConnected: exportsHere ? exports.clientCount(v.config.name) : 0,
            image: v.image?.path)
        if !v.isPrimary, following == nil { status.primaryGuessed = true }
        if let runtime = v.primary {
            status.replicas = runtime.status().map(Self.replicaStatus)
            status.lastError = runtime.lastError
            status.fenced = runtime.isFenced ? exports.fenceReason(v.config.name) ?? "another site holds a newer epoch" : nil
            let split = runtime.rivals.filter {
                switch $0.value.decision {
                case .splitBrain, .unrelated: return true
                default: return false
                }
            }
            status.splitBrain = split.isEmpty ? nil : split.keys.sorted()
        }
        status.onPromote = state.withLockedValue { $0.hookResults[v.config.name] }
        if let record = v.record {
            let history = Self.history(record)
            if !history.isEmpty {
                status.history = Self.generations(history)
            }
        }
        if exportsHere, v.isPrimary != (v.config.primary == me) {
            status.roleNote = v.isPrimary
                ? "\(me) is the primary since `ferry promote` (epoch \(v.record?.epoch ?? 0)) while the config names \(v.config.primary); "
                    + "in every site's config make \(me) its primary and \(v.config.primary) a replica"
                : "\(me) is a secondary (demoted, or it gave way to a newer primary) while the config names it primary; "
                    + "in every site's config make the promoted site its primary and \(me) a replica"
        }
        if let runtime = v.replica {
            let p = runtime.position
            status.replicaState = SiteStatus.ReplicaState(consistent: p.consistent, initialized: p.initialized, epoch: p.epoch,
                                                          appliedSequence: p.appliedSeq, bytesReceived: runtime.bytesReceived,
                                                          streamingFrom: runtime.streamingPeer)
            // The volume's epoch and line of history as this copy follows them (the catalog's are
            // from when this site last was the primary).
            status.epoch = max(status.epoch ?? 0, Int64(clamping: p.epoch))
            if let lineage = p.lineage, !lineage.isEmpty {
                status.history = Self.generations(lineage)
            }
            status.lastError = runtime.lastError
            status.recoveryPoints = Self.recoveryPointsStatus(runtime)
        }
        status.drill = drillStatus(v.config.name)
        return status
    }
}

extension Site {
    /// `POST /v1/volumes/NAME/checkpoint`: a point now for the volume's scheduled peers.
    func adminAction(_ path: String) -> (code: Int, body: Data) {
        func reply(_ code: Int, _ key: String, _ text: String) -> (code: Int, body: Data) {
            let body = (try? JSONSerialization.data(withJSONObject: [key: text])) ?? Data()
            return (code, body)
        }
        let pieces = path.split(separator: "?", maxSplits: 1)
        let query = pieces.count > 1 ? pieces[1].split(separator: "&").map(String.init) : []
        let parts = pieces.first.map { $0.split(separator: "/").map(String.init) } ?? []
        // `ferry promote NAME` of a tree (names of trees and volumes never clash).
        let isTree = parts.count == 4 && parts[0] == "v1" && (parts[1] == "trees"
            || (parts[1] == "volumes" && parts[3] == "promote" && config.volume(named: parts[2]) == nil && config.tree(named: parts[2]) != nil))
        if isTree {
            return treeAction(parts[2], parts[3]) { key in
                query.first { $0.hasPrefix(key + "=") }.map { String($0.dropFirst(key.count + 1)).removingPercentEncoding ?? "" }
            }
        }
        guard parts.count == 4, parts[0] == "v1", parts[1] == "volumes", ["checkpoint", "promote", "demote", "diverged", "resolve", "switchover", "verify", "points", "drill"].contains(parts[3]) else {
            return reply(404, "error", "no route POST \(path); try POST /v1/volumes/NAME/{checkpoint,promote,demote,diverged,resolve,switchover,verify,points,drill}")
        }
        let name = parts[2]
        func value(_ key: String) -> String? {
            query.first { $0.hasPrefix(key + "=") }.map { String($0.dropFirst(key.count + 1)).removingPercentEncoding ?? "" }
        }
        if parts[3] == "promote" {
            return promote(name, force: query.contains("force=1"), forceInconsistent: query.contains("force-inconsistent=1"), at: value("at"))
        }
        if parts[3] == "demote" { return demote(name) }
        if parts[3] == "diverged" { return diverged(name) }
        if parts[3] == "points" { return points(name) }
        if parts[3] == "drill" { return drill(name, at: value("at"), end: value("end") == "1") }
        if parts[3] == "resolve" { return resolve(name, keep: value("keep")) }
        if parts[3] == "verify" { return verify(name, peer: value("peer"), repair: value("repair") == "1") }
        if parts[3] == "switchover" {
            let timeout = value("timeout").flatMap(Double.init) ?? 60
            return switchover(name, to: value("to"), timeoutSeconds: max(1, min(timeout, 3600)))
        }
        guard let volume = state.withLockedValue({ $0.volumes.first { $0.config.name == name } }) else {
            return reply(404, "error", "no volume \"\(name)\" is configured on site \(config.site.name)")
        }
        if volume.isPrimary, volume.config.replicas.isEmpty {
            return reply(409, "error", "volume \(name) has no scheduled replica: it is not replicated (it has no `replicas:`)")
        }
        guard let runtime = volume.primary else {
            return reply(409, "error", "site \(config.site.name) is not the primary of \(name) (its primary is \(volume.config.primary)); run checkpoint there")
        }
        let scheduled = volume.config.replicas.filter { $0.value.mode == .scheduled }.keys.sorted()
        guard !scheduled.isEmpty else {
            return reply(409, "error", "volume \(name) has no scheduled replica; "
                         + (volume.config.replicaNames.count == 1 ? "its replica is \(volume.config.replicaNames[0]), which replicates continuously"
                            : "its replicas are \(volume.config.replicaNames.joined(separator: ", ")), which replicate continuously"))
        }
        runtime.checkpoint()
        let links = runtime.status()
        let fates = scheduled.map { peer -> String in
            guard let link = links.first(where: { $0.peer == peer }), link.connected else {
                return "\(peer) is not connected: it gets the point when it is back"
            }
            if link.state == .initialSync || !link.consistent {
                return "\(peer) gets it after its copy under way (\(link.state.rawValue))"
            }
            return "\(peer) is being sent it now"
        }
        return reply(200, "message", "cut a point of \(name): " + fates.joined(separator: "; ")
                     + ". `ferry status` shows it as the last point once it is complete there")
    }
}

extension Site {
    static func replicaStatus(_ r: ReplicaLinkStatus) -> SiteStatus.Replica {
        var point: SiteStatus.Point?
        if let p = r.lastPoint {
            point = SiteStatus.Point(sequence: p.seq, cutAt: Date(timeIntervalSince1970: Double(p.cutAtSeconds)),
                                     completedAt: Date(timeIntervalSince1970: Double(p.completedAtSeconds)), bytes: p.bytes)
        }
        var next: Date?
        if let at = r.nextPointAt { next = Date(timeIntervalSince1970: Double(at)) }
        return SiteStatus.Replica(
            peer: r.peer, mode: r.mode.rawValue, state: r.state.rawValue, reason: r.reason, connected: r.connected,
            consistent: r.consistent, lagBytes: r.lagBytes, lagSeconds: r.lagSeconds, dirtyBytes: r.dirtyBytes,
            inFlightBytes: r.inFlightBytes, bytesSent: r.bytesSent, journalBytes: r.journalBytes,
            journalLimitBytes: r.journalLimitBytes, syncRemainingBytes: r.syncRemainingBytes,
            syncTotalBytes: r.syncTotalBytes, syncETASeconds: r.syncETASeconds, rpoZero: r.rpoZero, lastPoint: point, nextPointAt: next)
    }
}
