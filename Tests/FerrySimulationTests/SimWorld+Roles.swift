@testable import FerryCore

/// The operator of a failover schedule: promotes after a crash, promotes behind a partition (a
/// split brain in the making), switches over, and resolves split brains, through the same
/// ``RoleChange`` rules and machine calls the daemon uses.
extension SimWorld {
    /// The site whose client writes now (the VM runs there), if any.
    var servingSite: String? { siteNames.first { site($0).serving } }

    /// The primary with the client dies; a moment later the operator promotes another site; the
    /// old primary comes back later and must give way.
    func failover() {
        guard let old = servingSite else { return }
        let candidates = siteNames.filter { site($0).replica != nil }
        guard !candidates.isEmpty else { return }
        site(old).clientAttached = false
        crash(old)
        let target = rng.pick(candidates)
        log("operator: \(old) is gone; promoting \(target)")
        after(rng.nanos(5_000_000...300_000_000), .promote(target, force: false))
    }

    /// The primary is demoted while `name` is in the middle of a catch-up, and the operator
    /// promotes `name` at once: the undo log's case (P3).
    func failoverDuringCatchUp(_ name: String) {
        // Only a catch-up that has a way back (else the promotion could be refused, and the
        // operator would have demoted the only primary for nothing).
        guard !workloadOver, site(name).midCatchUp, site(name).undoBase != nil, site(name).replica != nil,
              let old = servingSite, old != name, site(old).client.outstanding.isEmpty else { return }
        // The old primary is demoted (its VM shut down): it follows the promoted site, and must
        // be sent again what the roll-back put back. (Crashing it here instead finds liveness
        // gaps between three primaries that the closing note of 2026-12-06 describes.)
        site(old).clientAttached = false
        log("operator: demoting \(old) while \(name) catches up; promoting \(name)")
        makeSecondary(old, plan: nil, keepAsideFor: nil, why: "demoted by the operator")
        after(rng.nanos(1_000_000...20_000_000), .promote(name, force: true))
    }

    /// The operator demotes the serving primary (its VM shut down first) and then thinks better
    /// of it: the same site is promoted again. An idle demotion leaves a consistent image, so
    /// the promotion needs no force, and its peers are sent only what they lacked before.
    func undoDemote() {
        guard !workloadOver, let old = servingSite, site(old).client.outstanding.isEmpty, site(old).primary != nil else { return }
        site(old).clientAttached = false
        log("operator: demoting \(old), then promoting it again")
        makeSecondary(old, plan: nil, keepAsideFor: nil, why: "demoted by the operator")
        after(rng.nanos(1_000_000...50_000_000), .promoteAgain(old))
    }

    /// The primary is cut off from a replica (it goes on serving its client), and the operator
    /// promotes the replica there: both write, a split brain the handshake must stop.
    func splitFailover() {
        guard let old = servingSite else { return }
        let candidates = siteNames.filter { site($0).replica != nil }
        guard !candidates.isEmpty else { return }
        let target = rng.pick(candidates)
        cut(old, target, reason: "fault: partition")
        partitionedUntil[key(old, target)] = now + rng.nanos(500_000_000...2_500_000_000)
        log("operator: \(old) looks gone from \(target); promoting \(target)")
        after(rng.nanos(300_000_000...600_000_000), .promote(target, force: false))
    }

    /// `ferry promote` on `name`. Returns whether it was promoted.
    @discardableResult
    func promote(_ name: String, force requested: Bool, why: String) -> Bool {
        let s = site(name)
        guard s.running, var replica = s.replica else { return false }
        let streaming = replica.sessionLink.flatMap { link -> String? in
            guard let peer = peer(of: name, on: link), links[key(name, peer)]?.id == link, links[key(name, peer)]?.up == true
            else { return nil }
            return peer
        }
        // Mid catch-up, `ferry promote` puts the image back to the state the catch-up started
        // from (the undo log); the operator sometimes keeps the image instead (--force-inconsistent).
        var rolledBack: [BlockRange] = []
        var lineBefore: [GenerationRecord]?
        if s.midCatchUp && s.catchUpFromConsistent && s.undoBase == nil {
            fail("P3 violated: \(name) is in the middle of a catch-up that began on a consistent image, and kept no way back to it")
            return false
        }
        if !replica.position.consistent, let base = s.undoBase, streaming == nil || requested, !rng.chance(0.3) {
            for (sector, value) in base.saved { s.disk.write(sector, [value]) }
            s.disk.flush()
            rolledBack = base.saved.keys.sorted().map { BlockRange(offset: UInt64($0) * sectorSize, length: sectorSize) }
            lineBefore = replica.position.lineage
            // As the daemon's runtime does (`ReplicaVolumeRuntime.rollBack`): the position names
            // what was put back, which a primary of the same line that opens again must overwrite
            // (the promotion may yet be refused, and this site stay its replica).
            var target = base.position
            target.needs = rolledBack.isEmpty ? nil : rolledBack
            let actions = replica.rolledBack(to: target)
            s.replica = replica
            // The checks judge the state rolled back to by the stream it came from (seed 1700691:
            // a sync replica's state after a power loss, with a write past its barrier on disk,
            // was judged as an async replica's barrier state).
            s.positionMode = base.mode
            runReplica(name, actions, stamps: [])
            s.midCatchUp = false
            s.catchUpEndIndex = nil
            rollbacks += 1
            log("operator: \(name) rolled back \(rolledBack.count) sector(s) to \(base.position), the state before its unfinished catch-up")
        }
        let position = replica.position
        var force = requested
        if let refusal = RoleChange.promotionRefusal(volume: "vm1", position: position, force: false,
                                                     streamingPrimary: streaming, plantedBug: scenario.bug, inconsistentAllowed: false) {
            // The operator forces some refused promotions, never one beside a reachable primary.
            guard requested || rng.chance(scenario.forceChance), streaming == nil else {
                log("operator: promoting \(name) refused: \(refusal)")
                return false
            }
            force = true
        }
        // Checks: an unforced promotion serves a consistent state with every acknowledged write.
        if !force {
            if s.midCatchUp {
                fail("promoted \(name) without --force in the middle of a catch-up: its image is out of order"); return false
            }
            checks += 1
            for other in sites.values where other.name != name {
                guard let required = other.client.requiredApplied[name], other.config?.generation == position.generation,
                      let bad = firstMissing(required: required, image: s.disk.cache, generation: position.generation)
                else { continue }
                fail("P1 violated: \(name) was promoted lacking a write \(other.name) acknowledged while it was in sync: \(bad)")
                return false
            }
            checkConsistentReplica(name)
        }
        // The image is flushed before it serves (what the replica wrote may be unflushed).
        s.disk.flush()
        let generation = rng.next() | 1
        let followed = replica.followedLink.flatMap { peer(of: name, on: $0) }
        let peers = RoleChange.peers(replicas: configuredReplicas, firstPrimary: Scenario.firstPrimary, whenPrimaryIs: name)
        let plan = RoleChange.promotion(position: position, generation: generation, recordedEpoch: s.epoch,
                                        recordedHistory: s.history, volumeSize: config.volumeSize, regionSize: config.regionSize,
                                        followed: followed.flatMap { peers[$0] != nil && position.consistent ? $0 : nil },
                                        siteIndex: siteNames.sorted().firstIndex(of: name)!, siteCount: siteNames.count,
                                        plantedBug: scenario.bug, rolledBack: rolledBack, lineBefore: lineBefore,
                                        formerPrimary: rolledBack.isEmpty ? s.formerPrimary : nil, writes: replica.writes)
        if plan.metadata.peers.count > (followed.map { peers[$0] != nil && position.consistent ? 1 : 0 } ?? 0) { resumedPromotions += 1 }
        s.formerPrimary = nil
        var machine = config
        machine.epoch = plan.epoch
        machine.generation = generation
        machine.history = plan.history
        machine.peers = peers
        machine.siteIndex = siteNames.sorted().firstIndex(of: name)!
        s.config = machine
        s.epoch = plan.epoch
        s.generation = generation
        s.history = plan.history
        s.meta = storedAndRead(plan.metadata)
        s.journal = []
        s.preserved = [:]
        s.pendingFlushes = []
        s.replica = nil
        s.undoBase = nil
        s.catchUpFromConsistent = false
        s.midCatchUp = false
        s.client.reset()
        promotions += 1
        // What the checkers know of the new generation: it starts from this image.
        branchImages[generation] = s.disk.cache
        history[generation] = s.disk.cache.map { [(position.appliedSeq, $0)] }
        snapshots[generation] = ([], [:])
        log("operator: \(name) promoted (\(why)\(force ? ", forced" : "")): epoch \(plan.epoch), generation \(String(generation, radix: 16)) "
            + "branching at \(position.appliedSeq), following \(followed ?? "none")")
        startPrimary(name, fresh: true)
        for peer in peers.keys.sorted() where links[key(name, peer)]?.up == true {
            linkUp(name, to: peer, links[key(name, peer)]!.id)
        }
        // The on-promote hook boots the VM here.
        for other in sites.values where other.name != name { other.clientAttached = false }
        attachClient(name)
        return true
    }

    /// The primary `name` becomes a secondary: it keeps aside what `plan.peer` (or
    /// `keepAsideFor`) may lack, tells its peers it no longer is the primary, and waits for a
    /// primary's stream (``Site/makeSecondary``).
    func makeSecondary(_ name: String, plan: Rejoin?, keepAsideFor: String?, why: String) {
        let s = site(name)
        guard let machine = s.primary, let config = s.config else { return }
        let divergent = machine.rangesToKeepAside(plan: plan, keepAsideFor: keepAsideFor)
        s.disk.flush()
        for range in divergent {
            let (first, count) = sectorsOf(range)
            for sector in first..<first + count { s.keptAside[sector, default: []].insert(s.disk.cache[sector]) }
        }
        checkKeptAside(name, plan: plan, keepAsideFor: keepAsideFor, lineage: config.lineage)
        let demotion = RoleChange.demotion(epoch: s.epoch, generation: s.generation, recordedHistory: s.history, plan: plan,
                                           keptAside: divergent, idleAt: plan == nil ? machine.idleSequence : nil, plantedBug: scenario.bug)
        s.history = demotion.history
        s.formerPrimary = RoleChange.FormerPrimary(generation: s.generation, metadata: storedAndRead(machine.metadataForShutdown()),
                                                   journal: s.journal.map(\.entry), extentSize: config.extentSize)
        s.config = nil
        s.primary = nil
        s.clientAttached = false
        s.client.reset()
        s.journal = []
        s.preserved = [:]
        s.pendingFlushes = []
        s.store = ReplicaStore()
        s.undoBase = nil
        s.catchUpFromConsistent = false
        s.store.position = demotion.position
        lastDemoted = name
        log("\(name) becomes a secondary (\(why)); kept aside \(divergent.count) ranges; position \(demotion.position)")
        for peer in siteNames where peer != name {
            if let link = links[key(name, peer)], link.up {
                send(from: name, to: peer, link.id, .refuse(reason: "site \(name) is no longer the primary of vm1"), [])
            }
        }
        startReplica(name)
    }

    /// A planned switchover from the serving primary to one of its in-sync peers: its client
    /// stops and flushes; once the peer holds every write, the primary steps down and hands over.
    func beginSwitchover() {
        guard let from = servingSite, let machine = site(from).primary else { return }
        let candidates = machine.status(now: instant).filter { $0.mode != .scheduled && $0.connected && $0.consistent }.map(\.peer)
        guard !candidates.isEmpty else { return }
        let to = rng.pick(candidates.sorted())
        log("operator: switchover of vm1 from \(from) to \(to)")
        site(from).clientAttached = false
        submit(from, .flush)
        after(1_000_000, .switchoverStep(from: from, to: to, deadline: now + 2_000_000_000))
    }

    func switchoverStep(from: String, to: String, deadline: Int64) {
        let s = site(from)
        guard let machine = s.primary, !s.isFenced, s.config != nil else { return }
        guard s.client.outstanding.isEmpty, machine.holdsEverything(to),
              let link = links[key(from, to)], link.up, site(to).replica?.sessionLink == link.id else {
            if now < deadline {
                after(5_000_000, .switchoverStep(from: from, to: to, deadline: deadline))
            } else {
                log("operator: switchover to \(to) abandoned; \(from) serves again")
                attachClient(from)
            }
            return
        }
        switchovers += 1
        let handoff = VolumeHandoff(epoch: s.config!.epoch, generation: s.config!.generation, seq: machine.lastAdmittedSeq)
        // Nothing may differ: the peer holds every write.
        checks += 1
        if site(to).disk.cache != s.disk.cache {
            let sector = zip(site(to).disk.cache, s.disk.cache).enumerated().first { $0.element.0 != $0.element.1 }!.offset
            fail("switchover: \(to) was said to hold every write of \(from), but sector \(sector) differs"); return
        }
        makeSecondary(from, plan: nil, keepAsideFor: to, why: "switchover to \(to)")
        send(from: from, to: to, link.id, .handoff(handoff), [])
    }

    /// The operator reads status: a split brain is resolved (a site picked at random is kept),
    /// and a volume no site serves after a lost handoff is promoted back where it was.
    func operatorLooks() {
        if !resolving {
            for name in siteNames {
                // The rival it resolves against is one that is a primary now: a rival record of a
                // site that has since become another primary's secondary is stale (seed 1300397
                // resolved against such a one again and again, never against the live rival).
                guard let machine = site(name).primary,
                      let peer = machine.rivals.keys.sorted().first(where: { site($0).primary != nil }) ?? machine.rivals.keys.sorted().first
                else { continue }
                resolving = true
                after(rng.nanos(50_000_000...500_000_000), .resolve(name, peer: peer))
                break
            }
        }
        if workloadOver, siteNames.allSatisfy({ site($0).running && (site($0).primary == nil || site($0).isFenced) }) {
            // Fenced by a newer epoch that no site serves any more: the operator demotes it, and
            // promotes a site below (`ferry demote`, then `ferry promote`).
            for name in siteNames where site(name).isFenced {
                makeSecondary(name, plan: nil, keepAsideFor: nil, why: "operator: it is fenced and no site serves vm1")
            }
        }
        if workloadOver, siteNames.allSatisfy({ site($0).running && site($0).primary == nil }), let last = lastDemoted {
            log("operator: no site serves vm1; promoting \(last) back")
            promote(last, force: true, why: "nobody serves the volume")
        }
    }

    /// `ferry resolve vm1 --keep K`, run on `name`, in a split brain with `peer`; K is drawn.
    func resolve(_ name: String, peer: String) {
        resolving = false
        let s = site(name)
        guard let machine = s.primary, machine.rivals[peer] != nil else { return }
        resolutions += 1
        // The operator looks at both sites: a rival that has given way since (a stale record
        // here) is not the one to keep.
        var keep = rng.chance(0.5) || site(peer).primary == nil ? name : peer
        // Nor does it reverse its own decision for the same two sites (reversing it is not
        // handled: see the closing note of 2026-12-06, seed 174).
        let pair = [name, peer].sorted().joined(separator: "+")
        if let earlier = resolvedKeep[pair], site(earlier).primary != nil { keep = earlier }
        resolvedKeep[pair] = keep
        log("operator: resolve on \(name) keeping \(keep)")
        if keep == name {
            var m = machine
            guard let actions = m.resolveKeepingLocal(against: peer, now: instant) else { return }
            s.primary = m
            runPrimary(name, actions)
        } else {
            guard let plan = machine.rejoinPlan(keeping: peer) else { return }
            var m = machine
            let actions = m.fence(reason: "split brain resolved in favour of \(peer)")
            s.primary = m
            runPrimary(name, actions)
            makeSecondary(name, plan: plan, keepAsideFor: nil, why: plan.reason)
        }
    }
}
