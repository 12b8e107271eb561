@testable import FerryCore

extension SimWorld {
    /// P1, judged the moment the primary dies: every write answered while a sync or semi-sync
    /// peer counted (in sync, RPO 0) is on that peer — it, or a later write to the same sector;
    /// and for sync peers, every write a counted FLUSH or FUA covered is on the peer's disk even
    /// if the peer lost power at the same moment.
    func checkNothingAcknowledgedIsMissing() {
        for p in scenario.peers where p.policy.mode == .sync || p.policy.mode == .semiSync {
            guard let node = replicas[p.name], node.machine != nil else { continue }
            checks += 1
            if let bad = firstMissing(required: requiredApplied[p.name]!, image: node.disk.cache) {
                fail("P1 violated: the primary crashed and \(p.name) (\(p.policy.mode.rawValue)) lacks an acknowledged write: \(bad)")
                return
            }
            if p.policy.mode == .sync, let bad = firstMissing(required: requiredDurable[p.name]!, image: node.disk.durable) {
                fail("P1 violated: the primary crashed and \(p.name)'s disk lacks a flushed write: \(bad)")
                return
            }
        }
    }

    /// The first sector whose content is older than the write it must hold, described.
    func firstMissing(required: [UInt64], image: [UInt64]) -> String? {
        for (sector, seq) in required.enumerated() where seq > 0 {
            let stamp = image[sector]
            if !history[sector].contains(where: { $0.seq >= seq && $0.stamp == stamp }) {
                let holds = history[sector].last(where: { $0.stamp == stamp }).map { "write \($0.seq)" } ?? "unknown data \(stamp)"
                return "sector \(sector) must hold write \(seq) or later, holds \(holds)"
            }
        }
        return nil
    }

    /// P2: an async or scheduled replica that says it is consistent equals the primary's image at
    /// the sequence its position names.
    func checkBarrierState(_ name: String, image: [UInt64], position: ReplicaPosition, when: String) {
        guard let mode = scenario.peers.first(where: { $0.name == name })?.policy.mode,
              mode == .async || mode == .scheduled, position.consistent else { return }
        checks += 1
        guard let expected = reference(at: position.appliedSeq) else {
            fail("P2: \(name) claims sequence \(position.appliedSeq), which the primary never reached"); return
        }
        if let sector = zip(image, expected).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset {
            fail("P2 violated: \(name) (\(mode.rawValue)) \(when) is not the primary's state at sequence \(position.appliedSeq): "
                 + "sector \(sector) holds \(describe(image[sector], sector)), the primary had \(describe(expected[sector], sector))")
        }
    }

    func checkConsistentReplica(_ name: String) {
        guard let node = replicas[name], let machine = node.machine else { return }
        checkBarrierState(name, image: node.disk.cache, position: machine.position, when: "after a barrier")
    }

    func describe(_ stamp: UInt64, _ sector: Int) -> String {
        let seqs = history[sector].filter { $0.stamp == stamp }.map { String($0.seq) }.suffix(3).joined(separator: ",")
        return stamp == 0 ? "zeros (seq \(seqs))" : "write #\(stamp >> 16) (seq \(seqs))"
    }

    /// After the faults stop: every replica holds the primary's bytes and says it is consistent.
    func converged() -> Bool {
        guard let primary, primary.pendingRequests == 0 else { return false }
        let statuses = primary.status(now: instant)
        for p in scenario.peers {
            guard let node = replicas[p.name], let machine = node.machine, machine.position.consistent,
                  node.disk.cache == primaryDisk.cache,
                  let status = statuses.first(where: { $0.peer == p.name }), status.connected, status.consistent,
                  status.state == .inSync || status.state == .waitingForPoint
            else { return false }
        }
        return true
    }

    func convergenceReport() -> String {
        let statuses = primary?.status(now: instant) ?? []
        return scenario.peers.map { p in
            let node = replicas[p.name]!
            let differing = zip(node.disk.cache, primaryDisk.cache).filter { $0 != $1 }.count
            let s = statuses.first { $0.peer == p.name }
            return "\(p.name): \(s?.state.rawValue ?? "?") (\(s?.reason ?? "")), \(differing) sectors differ, "
                + "replica consistent \(node.machine?.position.consistent ?? false), dirty \(s?.dirtyBytes ?? 0) B"
        }.joined(separator: "; ") + "; pending requests \(primary?.pendingRequests ?? -1)"
    }
}
