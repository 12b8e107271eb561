import FerryCore
import FerryNBD
import FerryStore
import FerryVolume
import Dispatch
import Foundation
import NIOCore

extension VolumeConfig {
    /// The peers a primary at `site` replicates to: the configured replicas when `site` is the
    /// configured primary; after a promotion of a replica, the other replicas plus the configured
    /// primary, which takes the promoted site's own policy (the link is mirrored).
    public func peers(whenPrimaryIs site: String) -> [String: ReplicaPolicy] {
        RoleChange.peers(replicas: replicas, firstPrimary: primary, whenPrimaryIs: site)
    }

    /// Every site that holds this volume.
    var sites: Set<String> { Set(replicas.keys).union([primary]) }

    /// `site`'s place among the volume's sites sorted by name, and their number: which epochs
    /// it takes (``RoleChange/nextEpoch(after:siteIndex:siteCount:)``).
    func epochStripe(of site: String) -> (index: Int, count: Int) {
        (sites.sorted().firstIndex(of: site) ?? 0, sites.count)
    }
}

extension Site {
    typealias AdminReply = (code: Int, body: Data)

    static func reply(_ code: Int, _ key: String, _ text: String) -> AdminReply {
        ((code, (try? JSONSerialization.data(withJSONObject: [key: text])) ?? Data()))
    }

    /// What a role change of `name` works on, or the reply refusing it (an unknown volume, or
    /// one this site holds no copy of).
    private func roleChange(_ name: String) -> Result<RoleContext, RoleRefusal> {
        let me = config.site.name
        let (volume, catalog, engine) = state.withLockedValue { s in (s.volumes.first { $0.config.name == name }, s.catalog, s.engine) }
        guard let volume, let catalog, let engine else {
            return .failure(RoleRefusal(reply: Self.reply(404, "error", "no volume \"\(name)\" is configured on site \(me)")))
        }
        guard volume.isPrimary || volume.isReplica, let record = volume.record, let image = volume.image else {
            return .failure(RoleRefusal(reply: Self.reply(409, "error",
                "site \(me) holds no copy of \(name) (its sites are \(volume.config.sites.sorted().joined(separator: ", ")))")))
        }
        return .success((volume, record, image, catalog, engine))
    }

    struct RoleRefusal: Error { var reply: AdminReply }

    /// What `verify` and `switchover` need first: this site is the primary of the volume, and
    /// `peer` is one of its replicas, live (not scheduled: it holds points) and connected. The
    /// refusals end with `suffix`; `scheduled` says why a scheduled replica does not do.
    func livePeerLink(_ context: RoleContext, name: String, peer: String, command: String, scheduled: String,
                      suffix: String = "") -> Result<(PrimaryVolumeRuntime, ReplicaLinkStatus), RoleRefusal> {
        let me = config.site.name
        func refuse(_ code: Int, _ text: String) -> Result<(PrimaryVolumeRuntime, ReplicaLinkStatus), RoleRefusal> {
            .failure(RoleRefusal(reply: Self.reply(code, "error", text + suffix)))
        }
        guard let primary = context.engine.primary(name) else {
            if context.volume.isPrimary, context.volume.config.replicas.isEmpty {
                return refuse(404, "\(peer) is not a replica of \(name): \(name) is not replicated (it has no `replicas:`)")
            }
            return refuse(409, "site \(me) is not the primary of \(name): run \(command) on the primary")
        }
        guard let link = primary.status().first(where: { $0.peer == peer }) else {
            let peers = primary.status().map(\.peer).sorted().joined(separator: ", ")
            return refuse(404, "\(peer) is not a replica of \(name) here (its replicas are \(peers))")
        }
        guard link.mode != .scheduled else {
            return refuse(409, "\(peer) is a scheduled replica of \(name): \(scheduled)")
        }
        guard link.connected, context.engine.reportedLink(peer) != nil else {
            return refuse(409, "\(peer) is not connected (\(link.state.rawValue): \(link.reason))")
        }
        return .success((primary, link))
    }

    /// The site's view of `name` after a role change: which runtime serves it, and the record the
    /// catalog now holds.
    private func noteRole(_ name: String, primary: PrimaryVolumeRuntime?, replica: ReplicaVolumeRuntime?, catalog: Catalog) {
        let updated = try? catalog.volume(named: name)
        state.withLockedValue { s in
            guard let j = s.volumes.firstIndex(where: { $0.config.name == name }) else { return }
            s.volumes[j].primary = primary
            s.volumes[j].replica = replica
            s.volumes[j].isPrimary = primary != nil
            s.volumes[j].isReplica = primary == nil
            if let updated { s.volumes[j].record = updated }
        }
    }

    /// A primary took a new epoch when a rival with a newer one gave way to it
    /// (``VolumeEvent/Kind/epochChanged(_:)``): the catalog records it, with the history whose
    /// current generation keeps the epoch that started it, so a restart serves the new epoch.
    func recordEpoch(_ name: String, _ epoch: UInt64) {
        let (catalog, engine) = state.withLockedValue { s in (s.catalog, s.engine) }
        guard let catalog, let primary = engine?.primary(name), let record = try? catalog.volume(named: name) else { return }
        let history = String(decoding: (try? JSONEncoder().encode(primary.history)) ?? Data("[]".utf8), as: UTF8.self)
        do {
            try catalog.setRole(name: name, role: record.role ?? "primary", epoch: Int64(epoch), generation: record.generation, history: history)
            noteRole(name, primary: primary, replica: nil, catalog: catalog)
        } catch {
            logger.error("volume \(name): recording epoch \(epoch) failed: \(error); a restart serves the old one, which peers refuse")
        }
    }

    /// The generation history recorded for a volume (oldest first; empty before any role change).
    static func history(_ record: VolumeRecord) -> [GenerationRecord] {
        (try? JSONDecoder().decode([GenerationRecord].self, from: Data(record.history.utf8))) ?? []
    }

    typealias RoleContext = (volume: Volume, record: VolumeRecord, image: VolumeImage, catalog: Catalog, engine: VolumeEngine)

    /// `POST /v1/volumes/NAME/promote[?force=1][&force-inconsistent=1][&at=POINT]`: this secondary
    /// becomes the volume's primary in a new epoch and generation, and exports it read-write. With
    /// `at`, the image is first rolled back to that recovery point; a replica in the middle of a
    /// catch-up is rolled back to the state the catch-up started from unless `force-inconsistent`.
    func promote(_ name: String, force: Bool, forceInconsistent: Bool = false, at: String? = nil) -> AdminReply {
        withRoleContext(name) { promote($0, name: name, force: force, forceInconsistent: forceInconsistent, at: at) }
    }

    func withRoleContext(_ name: String, _ body: (RoleContext) -> AdminReply) -> AdminReply {
        switch roleChange(name) {
        case .success(let context): return body(context)
        case .failure(let refusal): return refusal.reply
        }
    }

    private func promote(_ context: RoleContext, name: String, force: Bool, forceInconsistent: Bool, at: String?) -> AdminReply {
        let me = config.site.name
        let (volume, record, image, catalog, engine) = context
        if let primary = engine.primary(name) {
            return Self.reply(409, "error", "site \(me) is already the primary of \(name) (epoch \(primary.epoch)); nothing changed")
        }
        guard let replica = engine.replica(name) else {
            return Self.reply(409, "error", "volume \(name) is not replicated, so there is nothing to promote")
        }
        // The state to promote: a recovery point named with --at; out of an unfinished catch-up,
        // the state it started from (P3), unless --force-inconsistent keeps the image as it is.
        var target: RecoveryPoint?
        if let at {
            if forceInconsistent {
                return Self.reply(400, "error", "--at and --force-inconsistent contradict each other (a point is a consistent state); nothing changed")
            }
            switch Self.point(at, of: replica, volume: name) {
            case .success(let point): target = point
            case .failure(let refusal): return refusal.reply
            }
        } else if !replica.position.consistent && !forceInconsistent {
            target = replica.catchUpBase
        }
        // Reachable and primary: a primary streams to this replica over a link that is up.
        let streaming = replica.streamingPeer.flatMap { engine.reportedLink($0) != nil ? $0 : nil }
        if let why = RoleChange.promotionRefusal(volume: name, position: target?.position ?? replica.position,
                                                 force: force, forceInconsistent: forceInconsistent, streamingPrimary: streaming) {
            return Self.reply(409, "error", why)
        }
        var rolledBack: String?
        var rolledBackRanges: [BlockRange] = []
        let lineBefore = replica.position.lineage
        if let target {
            do {
                let (point, ranges) = try replica.rollBack(to: target.id)
                rolledBackRanges = ranges
                rolledBack = "rolled the image back to point #\(point.id) (\(Self.isoTime(point.time)), sequence \(point.position.appliedSeq)): "
                    + "\(ByteSize.format(ranges.reduce(0) { $0 + $1.length })) rewritten"
                    + (at == nil ? ", the consistent state before the unfinished catch-up" : "")
                logger.notice("volume \(name): \(rolledBack!)")
            } catch {
                return Self.reply(500, "error", "rolling \(name) back to point #\(target.id) failed: \(error); the replica is marked inconsistent, "
                                  + "promote again to retry")
            }
        }
        let endedDrill = endDrillForPromotion(name, replica: replica)
        let position = replica.position
        let writes = replica.writes   // read after the position: it only knows more
        // The new epoch and generation are recorded before anything is served read-write: a crash
        // from here on restarts as the primary, never as the secondary it was.
        let generation = UUID().uuidString.lowercased()
        let generationID = PrimaryVolume.Config.generationNumber(generation)
        let regionSize = PrimaryVolume.Config.regionSize(forVolumeSize: volume.config.sizeBytes)
        let stateDir = config.site.dataDirectory + "/volumes/\(name).state"
        let peers = volume.config.peers(whenPrimaryIs: me)
        // The primary this replica followed, if it is still a peer: it holds the same image up to
        // the branch (and says what it wrote past it when it rejoins), so it starts clean.
        let followed = replica.followedPeer.flatMap { peers[$0] != nil && position.consistent ? $0 : nil }
        let stripe = volume.config.epochStripe(of: me)
        // After `ferry demote` here, its primary state is still on disk (primary.meta, journal):
        // if the image has not moved since, each peer gets only what it lacked then.
        var formerPrimary: RoleChange.FormerPrimary?
        if target == nil, position.consistent, position.generation == PrimaryVolume.Config.generationNumber(record.generation),
           let saved = try? MetadataFile<PrimaryVolume.Metadata>(path: stateDir + "/primary.meta").load() {
            let journalDir = stateDir + "/journal"
            let journal = FileManager.default.fileExists(atPath: journalDir) ? (try? JournalStore.open(directory: journalDir))?.1 : []
            if let journal { formerPrimary = .init(generation: position.generation, metadata: saved, journal: journal) }
        }
        let plan = RoleChange.promotion(position: position, generation: generationID, recordedEpoch: UInt64(max(record.epoch, 0)),
                                        recordedHistory: Self.history(record), volumeSize: volume.config.sizeBytes,
                                        regionSize: regionSize, followed: followed,
                                        siteIndex: stripe.index, siteCount: stripe.count, rolledBack: rolledBackRanges,
                                        lineBefore: target == nil ? nil : lineBefore, formerPrimary: formerPrimary, writes: writes)
        let epoch = plan.epoch
        let historyJSON = String(decoding: (try? JSONEncoder().encode(plan.history)) ?? Data("[]".utf8), as: UTF8.self)
        let runtime: PrimaryVolumeRuntime
        do {
            // A fresh primary state: sequences continue above what this replica applied; a new
            // journal; the site this replica followed holds the same image up to the branch,
            // except what it wrote that never arrived here (it says which when it rejoins): it
            // starts with a clean bitmap. Any other peer gets a full copy.
            let metaPath = stateDir + "/primary.meta"
            // What the replica wrote may still be in the page cache: made durable first, since the
            // new primary's peers copy it from here and its activity log knows nothing of it (a
            // power loss after the promotion would otherwise leave them holding blocks it lost).
            try image.flush()
            try? FileManager.default.removeItem(atPath: stateDir + "/journal")
            var machine = PrimaryVolume.Config(volume: name, volumeSize: volume.config.sizeBytes, epoch: epoch,
                                               generation: generationID, peers: peers)
            machine.regionSize = regionSize
            machine.history = plan.history
            (machine.siteIndex, machine.siteCount) = stripe
            machine.recordsAckLatency = recordsMetrics
            try MetadataFile<PrimaryVolume.Metadata>(path: metaPath).store(plan.metadata)
            try catalog.setRole(name: name, role: "primary", epoch: Int64(epoch), generation: generation, history: historyJSON)
            runtime = try PrimaryVolumeRuntime(
                name: name, image: image, config: machine, stateDirectory: stateDir, cleanShutdown: true,
                threadPool: threadPool, links: volumeLinks, logger: logger,
                onEvent: { [weak self] event in self?.log(event) })
        } catch {
            return Self.reply(500, "error", "promoting \(name) failed: \(error)")
        }
        engine.becomePrimary(name, runtime: runtime, peers: Set(peers.keys))
        exports.add(NBDExport(name: name, description: "ferry volume \(name) (\(record.uuid))", device: runtime))
        noteRole(name, primary: runtime, replica: nil, catalog: catalog)
        logger.notice("volume \(name) promoted", metadata: [
            "epoch": "\(epoch)", "generation": "\(generation)", "branch": "\(position.appliedSeq)", "forced": "\(force)"])
        let uris = state.withLockedValue { $0.nbdURIBases }.map { Self.uri(base: $0, export: name) }
        try? replica.undo.reset()   // a primary keeps no recovery points; a later demotion starts afresh
        var lines = ["promoted \(name) on \(me): epoch \(epoch), new generation \(generation) branching at sequence \(position.appliedSeq)"]
        if let rolledBack { lines.insert(rolledBack, at: 0) }
        if let endedDrill { lines.append(endedDrill) }
        if (force || forceInconsistent) && !position.consistent { lines.append("forced: the image was not consistent; check the file system on it before use") }
        lines.append("exported read-write at \(uris.joined(separator: " and "))")
        if !peers.isEmpty {
            let resumed = peers.keys.sorted().filter { $0 != followed && plan.metadata.peers[$0] != nil }
            let rest = peers.keys.sorted().filter { $0 != followed && plan.metadata.peers[$0] == nil }
            var how: [String] = []
            if let followed { how.append("\(followed), once demoted, gets only what differs") }
            if !resumed.isEmpty {
                how.append("\(resumed.joined(separator: " and ")) \(resumed.count == 1 ? "gets" : "get") only what \(resumed.count == 1 ? "it" : "they") "
                           + "lacked when this site was demoted")
            }
            if !rest.isEmpty {
                let undated = writes.map { $0.last.allSatisfy { $0 == WriteMap.unknown } } ?? true
                how.append(plan.metadata.lastWritesCoverLine && !undated
                    ? "\(rest.joined(separator: " and ")) \(rest.count == 1 ? "gets" : "get") what changed since the state \(rest.count == 1 ? "it holds" : "they hold") "
                        + "if that is on this volume's line of history, else a full copy"
                    : "\(rest.joined(separator: " and ")) \(rest.count == 1 ? "gets" : "get") a full copy"
                        + (plan.metadata.lastWritesCoverLine ? " (this site cannot date what its image holds: it crashed and no barrier from its primary reached it since)" : ""))
            }
            lines.append("replicating to \(peers.keys.sorted().joined(separator: ", ")): \(how.joined(separator: "; "))")
        }
        if let hook = volume.config.onPromote {
            lines.append(startPromoteHook(hook, volume: name, uri: uris.first ?? "", epoch: epoch))
        }
        lines.append("a former primary that returns gives way: it is fenced, keeps aside what it wrote, and becomes a secondary")
        lines.append("to undo: `ferry demote \(name)` here, then `ferry promote \(name)` on the site that should serve it")
        return Self.reply(200, "message", lines.joined(separator: "\n"))
    }

    /// Starts the volume's `on-promote` command (`/bin/sh -c`) with the volume, its NBD URI, the
    /// epoch and the site in its environment, and returns at once (the admin API answers on an
    /// event loop, which must not wait for a VM to boot). Its output goes to the log; how it ended
    /// goes to the log and to the volume's status (`onPromote`): a failing hook is reported,
    /// never hidden. A hook still running after 10 minutes is killed.
    func startPromoteHook(_ hook: String, volume: String, uri: String, epoch: UInt64) -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", hook]
        p.environment = ProcessInfo.processInfo.environment.merging([
            "FERRY_VOLUME": volume, "FERRY_NBD_URI": uri, "FERRY_EPOCH": String(epoch), "FERRY_SITE": config.site.name,
        ]) { $1 }
        let output = Pipe()
        p.standardOutput = output
        p.standardError = output
        p.standardInput = FileHandle.nullDevice
        do {
            try p.run()
        } catch {
            let result = "FAILED to start: \(hook): \(error)"
            logger.error("volume \(volume): on-promote hook \(result)")
            state.withLockedValue { $0.hookResults[volume] = result }
            return "on-promote hook \(result)"
        }
        state.withLockedValue { $0.hookResults[volume] = "running (pid \(p.processIdentifier)): \(hook)" }
        let logger = self.logger
        DispatchQueue.global().async { [weak self] in
            let killer = DispatchWorkItem { if p.isRunning { p.terminate() } }
            DispatchQueue.global().asyncAfter(deadline: .now() + 600, execute: killer)
            let reader = output.fileHandleForReading
            var pending = Data()
            while true {
                let chunk = reader.availableData
                if chunk.isEmpty { break }
                pending.append(chunk)
                while let newline = pending.firstIndex(of: 0x0A) {
                    logger.info("on-promote \(volume): \(String(decoding: pending[..<newline], as: UTF8.self))")
                    pending.removeSubrange(...newline)
                }
            }
            if !pending.isEmpty { logger.info("on-promote \(volume): \(String(decoding: pending, as: UTF8.self))") }
            p.waitUntilExit()
            killer.cancel()
            let ok = p.terminationReason == .exit && p.terminationStatus == 0
            let how = p.terminationReason == .exit ? "exit \(p.terminationStatus)" : "killed by signal \(p.terminationStatus)"
            let result = ok ? "succeeded: \(hook)" : "FAILED (\(how)): \(hook); its output is in the log"
            if ok { logger.notice("volume \(volume): on-promote hook \(result)") } else { logger.error("volume \(volume): on-promote hook \(result)") }
            self?.state.withLockedValue { $0.hookResults[volume] = result }
        }
        return "on-promote hook started (pid \(p.processIdentifier)): \(hook); `ferry status` says how it ended, the log has its output"
    }

    /// `POST /v1/volumes/NAME/demote`: this primary keeps aside what its peers may lack, flushes,
    /// serves the volume read-only and becomes a secondary; the next primary that opens a stream
    /// to it sends what differs (the whole volume when it does not share this site's history).
    func demote(_ name: String) -> AdminReply {
        withRoleContext(name) { demote($0, name: name) }
    }

    private func demote(_ context: RoleContext, name: String) -> AdminReply {
        let me = config.site.name
        guard context.engine.primary(name) != nil else {
            if context.engine.replica(name) != nil {
                return Self.reply(409, "error", "site \(me) is already a secondary of \(name); nothing changed")
            }
            return Self.reply(409, "error", "volume \(name) is not replicated: demoting it would leave no site serving it")
        }
        let clients = exports.clientCount(name)
        guard clients == 0 else {
            return Self.reply(409, "error", "\(clients) NBD client\(clients == 1 ? " is" : "s are") connected to \(name): "
                + "stop them first (shut the VM down, or disconnect it); nothing changed")
        }
        return makeSecondary(context, name: name, rejoin: nil)
    }

    /// The primary of `name` becomes a secondary: what its peers may lack is kept aside first
    /// (P6), the image flushed, the export made read-only. `plan` nil is `ferry demote`; otherwise
    /// the site gives way to `plan.peer` (the handshake decided it, or `ferry resolve`): its
    /// position then names the generation both share, so that peer sends only what differs.
    func makeSecondary(_ context: RoleContext, name: String, rejoin plan: Rejoin?, keepAsideFor: String? = nil) -> AdminReply {
        let me = config.site.name
        let (volume, record, image, catalog, engine) = context
        guard let primary = engine.primary(name) else {
            return Self.reply(409, "error", "site \(me) is not the primary of \(name); nothing changed")
        }
        let stateDir = config.site.dataDirectory + "/volumes/\(name).state"
        let runtime: ReplicaVolumeRuntime
        let keptAside: KeptAside?
        var demotedConsistent = false
        // No client may attach from here on; until the role changes, a failure puts it back.
        let previous = exports.lookup(name)
        exports.remove(name)
        do {
            // What the next primary's copy would overwrite without anyone having it: kept aside
            // first, with the image flushed (P6).
            let divergent = primary.rangesToKeepAside(plan: plan, keepAsideFor: keepAsideFor)
            try image.flush()
            do {
                keptAside = try divergent.isEmpty ? nil
                    : keepAside(divergent, of: name, image: image, epoch: record.epoch, generation: record.generation)
            } catch {
                if let previous { exports.add(previous) }
                return Self.reply(500, "error", "making \(name) a secondary failed while keeping its unreplicated blocks aside "
                                  + "(nothing changed; the volume is still primary here): \(error)")
            }
            let demotion = RoleChange.demotion(
                epoch: UInt64(max(1, record.epoch)), generation: PrimaryVolume.Config.generationNumber(record.generation),
                recordedHistory: Self.history(record), plan: plan,
                keptAside: keptAside?.ranges.map { BlockRange(offset: $0.offset, length: $0.length) } ?? [],
                idleAt: plan == nil ? primary.idleSequence : nil)
            let historyJSON = String(decoding: (try? JSONEncoder().encode(demotion.history)) ?? Data("[]".utf8), as: UTF8.self)
            demotedConsistent = demotion.position.consistent
            engine.becomeSecondary(name, runtime: nil)
            engine.sayNotPrimary(name, to: volume.config.sites.subtracting([me]).sorted())
            // On the line of history it keeps, needing what it kept aside to be overwritten (a full
            // copy when that list is too long); consistent only at an idle `ferry demote`'s state.
            try? FileManager.default.removeItem(atPath: stateDir + "/receive.log")
            // Recovery points of an earlier time as a secondary describe another line: gone.
            try? FileManager.default.removeItem(atPath: stateDir + "/undo.log")
            try? FileManager.default.removeItem(atPath: stateDir + "/undo.log.start")
            try MetadataFile<ReplicaPosition>(path: stateDir + "/replica.position").store(demotion.position)
            // At an idle demote's state the image is exactly what this primary wrote: its map
            // of what wrote where starts the replica's (else a later promotion here cannot date
            // its image, and a third site gets a full copy: walk-through of 2026-12-08).
            if demotion.position.consistent, let writes = primary.writeMap {
                try ReplicaVolumeRuntime.storeWriteMap(writes, for: demotion.position, stateDirectory: stateDir)
            }
            try catalog.setRole(name: name, role: "secondary", epoch: record.epoch, generation: record.generation, history: historyJSON)
            runtime = try ReplicaVolumeRuntime(
                name: name, image: image, stateDirectory: stateDir, threadPool: threadPool, links: volumeLinks,
                logger: logger, history: volume.config.history, onEvent: { [weak self] event in self?.log(event) })
        } catch {
            if engine.primary(name) != nil, let previous { exports.add(previous) }
            return Self.reply(500, "error", "making \(name) a secondary failed: \(error)")
        }
        engine.becomeSecondary(name, runtime: runtime)
        exports.add(NBDExport(name: name, description: "ferry volume \(name) (\(record.uuid)), secondary",
                              device: ImageBlockDevice(image: image, threadPool: threadPool, readOnly: true)))
        noteRole(name, primary: nil, replica: runtime, catalog: catalog)
        var lines: [String] = []
        if let plan {
            logger.notice("volume \(name) gives way to \(plan.peer): now its secondary", metadata: [
                "epoch": "\(plan.peerEpoch)", "common": "\(plan.common.map { GenerationRecord.hex($0.id) } ?? "none")", "reason": "\(plan.reason)"])
            lines.append("\(name) on \(me) is now a secondary of \(plan.peer): \(plan.reason)")
        } else {
            logger.notice("volume \(name) demoted: now a secondary", metadata: ["epoch": "\(record.epoch)"])
            lines.append("demoted \(name) on \(me): flushed, export now read-only, no writes taken here")
        }
        if let k = keptAside {
            lines.append("kept aside \(ByteSize.format(k.bytes)) in \(k.ranges.count) range\(k.ranges.count == 1 ? "" : "s") this site may hold "
                         + "and its peers may not (written here after they last confirmed): \(k.image); `ferry diverged \(name)` lists them")
        }
        lines.append("the primary that streams to this site next sends what differs (the whole volume if it does not share this site's history)")
        if plan == nil {
            lines.append(demotedConsistent
                ? "to undo: `ferry promote \(name)` here, while no other site has been promoted (its replicas then get only what they lack)"
                : "to undo: `ferry promote \(name) --force-inconsistent` here (writes were in flight: the image is not at one state)")
        }
        if plan != nil { for line in lines.dropFirst() { logger.notice("volume \(name): \(line)") } }
        return Self.reply(200, "message", lines.joined(separator: "\n"))
    }

    /// The handshake decided this site gives way (``VolumeEvent/Kind/rejoin(_:)``): it becomes the
    /// peer's secondary at once, its clients already cut off by the fence.
    func rejoin(_ name: String, plan: Rejoin) {
        let reply = withRoleContext(name) { makeSecondary($0, name: name, rejoin: plan) }
        if reply.code != 200 {
            logger.error("volume \(name): rejoining \(plan.peer) as its secondary failed; it stays fenced",
                         metadata: ["reply": "\(String(decoding: reply.body, as: UTF8.self))"])
        }
    }

    /// `POST /v1/volumes/NAME/resolve?keep=SITE`: settles a split brain. Naming this site, the
    /// peer gives way when it next connects; naming the peer, this site gives way now. Either
    /// way the side that gives way keeps aside what it wrote (P6).
    func resolve(_ name: String, keep: String?) -> AdminReply {
        withRoleContext(name) { context in
            let me = config.site.name
            guard let keep, !keep.isEmpty else {
                return Self.reply(400, "error", "say which site's data to keep: `ferry resolve \(name) --keep SITE`")
            }
            guard context.volume.config.sites.contains(keep) else {
                return Self.reply(404, "error", "\(keep) is not a site of \(name) (its sites are "
                                  + "\(context.volume.config.sites.sorted().joined(separator: ", "))); nothing changed")
            }
            guard let primary = context.engine.primary(name) else {
                return Self.reply(409, "error", "site \(me) is a secondary of \(name), so it is in no split brain; nothing changed")
            }
            let split = primary.rivals.filter {
                switch $0.value.decision {
                case .splitBrain, .unrelated: return true
                default: return false
                }
            }
            guard !split.isEmpty else {
                return Self.reply(409, "error", "\(name) is in no split brain on \(me) (`ferry status` says why a peer does not "
                                  + "sync); nothing changed")
            }
            if keep == me {
                let resolved = split.keys.sorted().filter { primary.resolveKeepingLocal(against: $0) }
                logger.notice("volume \(name): split brain resolved, keeping this site", metadata: ["peers": "\(resolved)"])
                return Self.reply(200, "message", "keeping \(name) as it is on \(me); \(resolved.joined(separator: ", ")) "
                    + "give\(resolved.count == 1 ? "s" : "") way when next connected: what \(resolved.count == 1 ? "it" : "they") "
                    + "wrote is kept aside there (`ferry diverged \(name)` on \(resolved.count == 1 ? "it" : "them")), then only what differs is copied")
            }
            guard let plan = primary.rejoinPlan(keeping: keep) else {
                return Self.reply(409, "error", "\(name) is in a split brain with \(split.keys.sorted().joined(separator: ", ")), "
                                  + "not with \(keep); nothing changed")
            }
            let clients = exports.clientCount(name)
            guard clients == 0 else {
                return Self.reply(409, "error", "\(clients) NBD client\(clients == 1 ? " is" : "s are") connected to \(name) here: "
                    + "stop them first, since this site stops serving it; nothing changed")
            }
            primary.fence(reason: "split brain resolved in favour of \(keep): this site gives way")
            return makeSecondary(context, name: name, rejoin: plan)
        }
    }

    static func divergedDirectory(data: String, volume: String) -> String {
        KeptAside.directory(stateDirectory: data + "/volumes/\(volume).state")
    }

    /// Copies `ranges` of `image` into a new kept-aside image under the volume's state directory.
    func keepAside(_ ranges: [BlockRange], of volume: String, image: VolumeImage, epoch: Int64, generation: String) throws -> KeptAside {
        let kept = try KeptAside.write(ranges, of: volume, image: image,
                                       directory: Self.divergedDirectory(data: config.site.dataDirectory, volume: volume),
                                       epoch: epoch, generation: generation)
        logger.notice("volume \(volume): kept aside \(kept.bytes) bytes in \(ranges.count) ranges before demotion", metadata: ["file": "\(kept.image)"])
        return kept
    }

    /// `POST /v1/volumes/NAME/diverged`: what this site kept aside for `name` (when it gave way as
    /// a primary, or as a replica holding writes past a new primary's branch).
    func diverged(_ name: String) -> AdminReply {
        guard state.withLockedValue({ $0.volumes.contains { $0.config.name == name } }) else {
            return Self.reply(404, "error", "no volume \"\(name)\" is configured on site \(config.site.name)")
        }
        let dir = Self.divergedDirectory(data: config.site.dataDirectory, volume: name)
        let files = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasSuffix(".json") }.sorted()
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        let kept = files.compactMap { try? decoder.decode(KeptAside.self, from: Data(contentsOf: URL(fileURLWithPath: "\(dir)/\($0)"))) }
        guard !kept.isEmpty else {
            return Self.reply(200, "message", "nothing of \(name) was kept aside on \(config.site.name)")
        }
        var lines: [String] = []
        for k in kept {
            lines.append("\(k.image): \(ByteSize.format(k.bytes)) in \(k.ranges.count) range\(k.ranges.count == 1 ? "" : "s"), "
                         + "kept \(ISO8601DateFormatter().string(from: k.keptAt)) "
                         + (k.reason.map { "(\($0))" } ?? "when this site left epoch \(k.epoch)"))
            for r in k.ranges.prefix(20) { lines.append("  offset \(r.offset) length \(r.length)") }
            if k.ranges.count > 20 { lines.append("  … \(k.ranges.count - 20) more in \(k.image.dropLast(4)).json") }
        }
        lines.append("each file is a sparse image of the whole volume holding only these ranges at their own offsets "
                     + "(qemu-img, losetup or nbdkit can serve it)")
        return Self.reply(200, "message", lines.joined(separator: "\n"))
    }
}
