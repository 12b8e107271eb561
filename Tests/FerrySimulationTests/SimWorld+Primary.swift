@testable import FerryCore

extension SimWorld {
    func startPrimary(fresh: Bool) {
        primaryIncarnation += 1
        primaryMetaToken = 0   // persist tokens count from 1 in each incarnation
        let durableJournal = journal.map(\.entry)
        var machine = PrimaryVolume(config: config, metadata: primaryMeta, cleanShutdown: fresh, journal: durableJournal, now: instant)
        let actions = machine.start()
        primary = machine
        recordSnapshot(machine.admittedSequence)
        log("primary starts (incarnation \(primaryIncarnation)) at sequence \(machine.admittedSequence)")
        runPrimary(actions)
    }

    func recordSnapshot(_ seq: UInt64) {
        if let last = snapshotSeqs.last, last >= seq {
            if last == seq { snapshots[seq] = primaryDisk.cache }
            return
        }
        snapshotSeqs.append(seq)
        snapshots[seq] = primaryDisk.cache
    }

    /// The primary's image as it was once every request up to `seq` was admitted.
    func reference(at seq: UInt64) -> [UInt64]? {
        var low = 0, high = snapshotSeqs.count
        while low < high {
            let mid = (low + high) / 2
            if snapshotSeqs[mid] <= seq { low = mid + 1 } else { high = mid }
        }
        return low == 0 ? nil : snapshots[snapshotSeqs[low - 1]]
    }

    func markJournalDurable() {
        for i in journal.indices { journal[i].durable = true }
    }

    func sectorsOf(_ range: BlockRange) -> (first: Int, count: Int) {
        (Int(range.offset / sectorSize), Int(range.length / sectorSize))
    }

    func runPrimary(_ actions: [PrimaryVolume.Action]) {
        for action in actions {
            guard failure == nil else { return }
            let incarnation = primaryIncarnation
            switch action {
            case .executeLocal(let seq):
                guard let op = outstanding[seq] else { fail("executeLocal for unknown request \(seq)"); return }
                switch op.kind {
                case .write(let range, _), .zero(let range, _):
                    let (first, _) = sectorsOf(range)
                    primaryDisk.write(first, op.stamps)
                    for (i, s) in op.stamps.enumerated() { history[first + i].append((seq, s)) }
                case .flush:
                    fail("executeLocal for a flush")
                }
                recordSnapshot(seq)
                after(rng.nanos(2_000...100_000), .localDone(incarnation: incarnation, seq: seq))
            case .flushLocal(let seq):
                pendingFlushes.insert(seq)
                after(rng.nanos(50_000...2_000_000), .localDone(incarnation: incarnation, seq: seq))
            case .appendJournal(let entry):
                journal.append((entry, entry.isBarrier ? [] : payloads[entry.seq] ?? [], false))
            case .trimJournal(let through):
                journal.removeAll { $0.entry.seq <= through }
            case .persist(let token, let meta):
                after(rng.nanos(50_000...1_000_000), .persistDone(incarnation: incarnation, token: token, meta))
            case .send(let peer, let link, let message):
                var stamps: [UInt64] = []
                if case .write(let item) = message, !item.isZero {
                    if scenario.peers.first(where: { $0.name == peer })?.policy.mode == .async {
                        guard let entry = journal.first(where: { $0.entry.seq == item.seq }) else {
                            fail("sent write \(item.seq) to \(peer) from the journal, but the journal no longer holds it"); return
                        }
                        stamps = entry.stamps
                    } else {
                        stamps = payloads[item.seq] ?? []
                    }
                }
                sendToReplica(peer, link, message, stamps)
            case .sendRegion(let peer, let link, let item, let fromPreserved):
                let (first, count) = sectorsOf(item.range)
                var stamps = primaryDisk.read(first, count)
                if fromPreserved {
                    // A run of regions copied aside one by one.
                    stamps = []
                    var offset = item.range.offset
                    while offset < item.range.end {
                        guard let copy = preserved[peer]?[offset], !copy.isEmpty else {
                            fail("no preserved copy at \(offset) of \(item.range) for \(peer)")
                            return
                        }
                        stamps += copy
                        offset += UInt64(copy.count) * sectorSize
                    }
                }
                sendToReplica(peer, link, .region(item), stamps)
            case .preserve(let peer, let range):
                let (first, count) = sectorsOf(range)
                preserved[peer, default: [:]][range.offset] = primaryDisk.read(first, count)
            case .dropPreserved(let peer):
                preserved[peer] = nil
            case .complete(let seq, let error):
                completed(seq, error: error)
            case .closeLink(let peer, let link, let reason):
                log("primary closes \(link) to \(peer): \(reason)")
                if links[peer]?.id == link { cut(peer, reason: reason) }
            case .fence(let reason):
                fail("primary fenced itself unexpectedly: \(reason)")
            case .rejoin(let plan):
                fail("primary gave way unexpectedly to \(plan.peer): \(plan.reason)")
            case .stateChanged(let peer, let state, let reason):
                log("link to \(peer): \(state.rawValue) (\(reason))")
            }
        }
    }

    func crashPrimary() {
        guard primary != nil else { return }
        let powerLoss = rng.chance(scenario.powerLoss)
        log("primary crashes (\(powerLoss ? "power loss" : "kill -9"))")
        checkNothingAcknowledgedIsMissing()
        primary = nil
        primaryIncarnation += 1
        primaryDisk.crash(powerLoss: powerLoss, &rng)
        if powerLoss {
            // The journal is an append-only file: a crash keeps its durable part and some prefix of the rest.
            let durable = journal.prefix { $0.durable }.count
            journal = Array(journal.prefix(durable + rng.int(0...(journal.count - durable))))
        }
        pendingFlushes.removeAll()
        preserved = [:]
        for name in replicas.keys.sorted() { cut(name, reason: "primary crashed") }
        outstanding.removeAll()
        // After a primary crash the old promises are judged; the restarted primary starts anew.
        latestCompleted = Array(repeating: 0, count: sectors)
        for p in scenario.peers {
            requiredApplied[p.name] = latestCompleted
            requiredDurable[p.name] = latestCompleted
        }
        if !workloadOver { after(rng.nanos(50_000_000...500_000_000), .restartPrimary) }
    }

    func restartPrimary() {
        startPrimary(fresh: false)
        for name in replicas.keys.sorted() { after(rng.nanos(1_000_000...50_000_000), .connect(name)) }
    }
}
