@testable import FerryCore

extension SimWorld {
    /// P1, judged the moment primary `name` dies: every write answered while a sync or semi-sync
    /// peer counted (in sync, RPO 0) is on that peer — it, or a later write to the same sector;
    /// and for sync peers, every write a counted FLUSH or FUA covered is on the peer's disk even
    /// if the peer lost power at the same moment. A peer that moved to another primary's
    /// generation since (a promotion elsewhere) is no longer held to this primary's promises.
    func checkNothingAcknowledgedIsMissing(_ name: String) {
        let s = site(name)
        guard let config = s.config else { return }
        for (peer, policy) in config.peers.sorted(by: { $0.key < $1.key }) where policy.mode == .sync || policy.mode == .semiSync {
            let node = site(peer)
            guard let machine = node.replica, machine.position.generation == config.generation || !machine.position.initialized
            else { continue }
            checks += 1
            if let required = s.client.requiredApplied[peer],
               let bad = firstMissing(required: required, image: node.disk.cache, generation: config.generation) {
                fail("P1 violated: \(name) crashed and \(peer) (\(policy.mode.rawValue)) lacks an acknowledged write: \(bad)")
                return
            }
            if policy.mode == .sync, let required = s.client.requiredDurable[peer],
               let bad = firstMissing(required: required, image: node.disk.durable, generation: config.generation) {
                fail("P1 violated: \(name) crashed and \(peer)'s disk lacks a flushed write: \(bad)")
                return
            }
        }
    }

    /// The first sector whose content is older than the write of `generation` it must hold, described.
    func firstMissing(required: [UInt64], image: [UInt64], generation: UInt64) -> String? {
        guard let writes = history[generation] else { return nil }
        for (sector, seq) in required.enumerated() where seq > 0 {
            let stamp = image[sector]
            if !writes[sector].contains(where: { $0.seq >= seq && $0.stamp == stamp }) {
                let holds = writes[sector].last(where: { $0.stamp == stamp }).map { "write \($0.seq)" } ?? "unknown data \(stamp)"
                return "sector \(sector) must hold write \(seq) or later, holds \(holds)"
            }
        }
        return nil
    }

    /// P2: an async or scheduled replica that says it is consistent equals its primary's image
    /// at the sequence of the generation its position names.
    func checkBarrierState(_ name: String, image: [UInt64], position: ReplicaPosition, when: String) {
        guard let mode = site(name).positionMode, mode == .async || mode == .scheduled, position.consistent else { return }
        checks += 1
        guard let expected = reference(position.generation, at: position.appliedSeq) else {
            fail("P2: \(name) claims sequence \(position.appliedSeq) of generation \(String(position.generation, radix: 16)), "
                 + "which its primary never reached"); return
        }
        if let sector = zip(image, expected).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset {
            fail("P2 violated: \(name) (\(mode.rawValue)) \(when) is not the primary's state at sequence \(position.appliedSeq): "
                 + "sector \(sector) holds \(describe(image[sector], sector, position.generation)), "
                 + "the primary had \(describe(expected[sector], sector, position.generation))")
        }
    }

    func checkConsistentReplica(_ name: String) {
        let s = site(name)
        guard let machine = s.replica else { return }
        checkBarrierState(name, image: s.disk.cache, position: machine.position, when: "after a barrier")
    }

    func describe(_ stamp: UInt64, _ sector: Int, _ generation: UInt64) -> String {
        let seqs = (history[generation]?[sector] ?? []).filter { $0.stamp == stamp }.map { String($0.seq) }.suffix(3).joined(separator: ",")
        return stamp == 0 ? "zeros (seq \(seqs))" : "write #\(stamp >> 16) (seq \(seqs))"
    }

    /// P6, judged when primary `name` steps down: every block it wrote itself that the site it
    /// gives way to does not hold is in what it kept aside. What that site holds: its image when
    /// its line of history left the generation both share (or `keepAsideFor`'s image now).
    /// P6 for a replica: when a primary whose line leaves the replica's generation below writes
    /// the replica holds opens a stream, every sector holding such a write is kept aside before
    /// the catch-up overwrites it (when the replica can date its image, or is past the branch).
    func checkReplicaKeptAside(_ name: String, open: VolumeOpen) {
        let s = site(name)
        guard let machine = s.replica else { return }
        let p = machine.position
        guard p.consistent, p.initialized, p.needs == nil, open.generation != p.generation,
              let reach = VolumeHistory(generations: open.history, appliedSeq: .max).reach(in: p.generation),
              let writes = history[p.generation], !(machine.writes?.hasUnknown ?? true) || p.appliedSeq > reach
        else { return }
        checks += 1
        for sector in 0..<sectors {
            let stamp = s.disk.cache[sector]
            guard stamp != 0, let seq = writes[sector].last(where: { $0.stamp == stamp })?.seq, seq > reach else { continue }
            if !(s.keptAside[sector]?.contains(stamp) ?? false) {
                fail("P6 violated: \(name) (a replica at \(p.appliedSeq)) is opened by a primary whose line leaves its generation at \(reach), "
                     + "and sector \(sector) holds write #\(stamp >> 16) (seq \(seq)) past that, which was not kept aside")
                return
            }
        }
    }

    func checkKeptAside(_ name: String, plan: Rejoin?, keepAsideFor: String?, lineage: [GenerationRecord]) {
        let s = site(name)
        var reference: [UInt64]?
        if let plan {
            func childImage(_ lineage: [GenerationRecord]) -> [UInt64]? {
                guard let common = plan.common, let i = lineage.firstIndex(where: { $0.id == common.id }), i + 1 < lineage.count
                else { return nil }
                return branchImages[lineage[i + 1].id]
            }
            // Sharing no history, the peer holds none of it.
            reference = plan.common == nil ? Array(repeating: 0, count: sectors)
                : site(plan.peer).config.flatMap { childImage($0.lineage) } ?? childImage(lineage)
        } else if let keepAsideFor {
            reference = site(keepAsideFor).disk.cache
        }
        guard let reference else { return }
        checks += 1
        for sector in 0..<sectors {
            let stamp = s.disk.cache[sector]
            guard stamp != 0, stamp != reference[sector], stampWriter[stamp] == name else { continue }
            if !(s.keptAside[sector]?.contains(stamp) ?? false) {
                fail("P6 violated: \(name) steps down (\(plan?.reason ?? "switchover to \(keepAsideFor ?? "?")")) and sector \(sector) "
                     + "holds write #\(stamp >> 16) it wrote, which \(plan?.peer ?? keepAsideFor ?? "?") does not hold, "
                     + "and it was not kept aside")
                return
            }
        }
    }

    /// After the faults stop: one primary, and every other site holds its bytes and says it is
    /// consistent.
    func converged() -> Bool {
        let primaries = siteNames.filter { site($0).primary != nil }
        guard primaries.count == 1, let p = primaries.first, let machine = site(p).primary, !machine.isFenced,
              machine.pendingRequests == 0 else { return false }
        let statuses = machine.status(now: instant)
        for name in siteNames where name != p {
            let node = site(name)
            guard let replica = node.replica, replica.position.consistent, node.disk.cache == site(p).disk.cache,
                  let status = statuses.first(where: { $0.peer == name }), status.connected, status.consistent,
                  status.state == .inSync || status.state == .waitingForPoint
            else { return false }
        }
        return true
    }

    func convergenceReport() -> String {
        let primaries = siteNames.filter { site($0).primary != nil }
        guard let p = primaries.first else { return "no site is a primary" }
        let statuses = site(p).primary!.status(now: instant)
        return "primaries \(primaries) (\(p) fenced \(site(p).isFenced)); " + siteNames.filter { $0 != p }.map { name in
            let node = site(name)
            let differing = zip(node.disk.cache, site(p).disk.cache).filter { $0 != $1 }.count
            let sample = (0..<sectors).filter { node.disk.cache[$0] != site(p).disk.cache[$0] }.prefix(2).map { sector in
                "sector \(sector) holds #\(node.disk.cache[sector] >> 16) (by \(stampWriter[node.disk.cache[sector]] ?? "-")), "
                    + "\(p) #\(site(p).disk.cache[sector] >> 16) (by \(stampWriter[site(p).disk.cache[sector]] ?? "-"))"
            }
            let s = statuses.first { $0.peer == name }
            return "\(name): \(s?.state.rawValue ?? "?") (\(s?.reason ?? "")), \(differing) sectors differ \(sample), "
                + "replica consistent \(node.replica?.position.consistent ?? false), dirty \(s?.dirtyBytes ?? 0) B"
        }.joined(separator: "; ") + "; pending requests \(site(p).primary!.pendingRequests)"
    }
}
