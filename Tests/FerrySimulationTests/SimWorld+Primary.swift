@testable import FerryCore

extension SimSite {
    func markJournalDurable() {
        for i in journal.indices { journal[i].durable = true }
    }
}

extension SimWorld {
    func startPrimary(_ name: String, fresh: Bool) {
        let s = site(name)
        s.incarnation += 1
        s.metaToken = 0   // persist tokens count from 1 in each incarnation
        let durableJournal = s.journal.map(\.entry)
        var machine = PrimaryVolume(config: s.config!, metadata: s.meta, cleanShutdown: fresh, journal: durableJournal, now: instant)
        let actions = machine.start()
        s.primary = machine
        recordSnapshot(name, machine.admittedSequence)
        log("\(name) starts as primary (incarnation \(s.incarnation), epoch \(s.config!.epoch)) at sequence \(machine.admittedSequence)")
        runPrimary(name, actions)
    }

    func recordSnapshot(_ name: String, _ seq: UInt64) {
        let s = site(name)
        let generation = s.config!.generation
        var book = snapshots[generation] ?? ([], [:])
        defer { snapshots[generation] = book }
        if let last = book.seqs.last, last >= seq {
            if last == seq { book.images[seq] = s.disk.cache }
            return
        }
        book.seqs.append(seq)
        book.images[seq] = s.disk.cache
    }

    /// The image of `generation`'s primary once every request up to `seq` was admitted.
    func reference(_ generation: UInt64, at seq: UInt64) -> [UInt64]? {
        guard let book = snapshots[generation] else { return nil }
        var low = 0, high = book.seqs.count
        while low < high {
            let mid = (low + high) / 2
            if book.seqs[mid] <= seq { low = mid + 1 } else { high = mid }
        }
        return low == 0 ? nil : book.images[book.seqs[low - 1]]
    }

    func sectorsOf(_ range: BlockRange) -> (first: Int, count: Int) {
        (Int(range.offset / sectorSize), Int(range.length / sectorSize))
    }

    func runPrimary(_ name: String, _ actions: [PrimaryVolume.Action]) {
        let s = site(name)
        for action in actions {
            guard failure == nil, s.primary != nil else { return }
            let incarnation = s.incarnation
            switch action {
            case .executeLocal(let seq):
                guard let op = s.client.outstanding[seq] else { fail("\(name): executeLocal for unknown request \(seq)"); return }
                let epoch = s.config!.epoch, generation = s.config!.generation
                if let writer = epochWriter[epoch], writer != name {
                    fail("two writers in one epoch: \(name) takes a write in epoch \(epoch), in which \(writer) took writes"); return
                }
                epochWriter[epoch] = name
                switch op.kind {
                case .write(let range, _), .zero(let range, _):
                    let (first, _) = sectorsOf(range)
                    s.disk.write(first, op.stamps)
                    for (i, stamp) in op.stamps.enumerated() { history[generation]![first + i].append((seq, stamp)) }
                case .flush:
                    fail("executeLocal for a flush")
                }
                recordSnapshot(name, seq)
                after(rng.nanos(2_000...100_000), .localDone(name, incarnation: incarnation, seq: seq))
            case .flushLocal(let seq):
                s.pendingFlushes.insert(seq)
                after(rng.nanos(50_000...2_000_000), .localDone(name, incarnation: incarnation, seq: seq))
            case .appendJournal(let entry):
                s.journal.append((entry, entry.isBarrier ? [] : s.client.payloads[entry.seq] ?? [], false))
            case .trimJournal(let through):
                s.journal.removeAll { $0.entry.seq <= through }
            case .persist(let token, let meta):
                after(rng.nanos(50_000...1_000_000), .persistDone(name, incarnation: incarnation, token: token, meta))
            case .send(let peer, let link, let message):
                var stamps: [UInt64] = []
                if case .write(let item) = message, !item.isZero {
                    if s.config!.peers[peer]?.mode == .async {
                        guard let entry = s.journal.first(where: { $0.entry.seq == item.seq }) else {
                            fail("\(name) sent write \(item.seq) to \(peer) from the journal, but the journal no longer holds it"); return
                        }
                        stamps = entry.stamps
                    } else {
                        stamps = s.client.payloads[item.seq] ?? []
                    }
                }
                send(from: name, to: peer, link, message, stamps)
            case .sendRegion(let peer, let link, let item, let fromPreserved):
                let (first, count) = sectorsOf(item.range)
                var stamps = s.disk.read(first, count)
                if fromPreserved {
                    // A run of regions copied aside one by one.
                    stamps = []
                    var offset = item.range.offset
                    while offset < item.range.end {
                        guard let copy = s.preserved[peer]?[offset], !copy.isEmpty else {
                            fail("no preserved copy at \(offset) of \(item.range) for \(peer)")
                            return
                        }
                        stamps += copy
                        offset += UInt64(copy.count) * sectorSize
                    }
                }
                send(from: name, to: peer, link, .region(item), stamps)
            case .preserve(let peer, let range):
                let (first, count) = sectorsOf(range)
                s.preserved[peer, default: [:]][range.offset] = s.disk.read(first, count)
            case .dropPreserved(let peer):
                s.preserved[peer] = nil
            case .complete(let seq, let error):
                completed(name, seq, error: error)
            case .closeLink(let peer, let link, let reason):
                log("\(name) closes \(link) to \(peer): \(reason)")
                if links[key(name, peer)]?.id == link { cut(name, peer, reason: reason) }
            case .fence(let reason):
                guard scenario.roles else { fail("\(name) fenced itself unexpectedly: \(reason)"); return }
                log("\(name) is fenced: \(reason)")
                s.clientAttached = false
            case .rejoin(let plan):
                guard scenario.roles else { fail("\(name) gave way unexpectedly to \(plan.peer): \(plan.reason)"); return }
                rejoins += 1
                makeSecondary(name, plan: plan, keepAsideFor: nil, why: plan.reason)
                return
            case .stateChanged(let peer, let state, let reason):
                log("\(name): link to \(peer): \(state.rawValue) (\(reason))")
            case .epochChanged(let epoch, let reason):
                guard scenario.roles else { fail("\(name) took epoch \(epoch) unexpectedly: \(reason)"); return }
                log("\(name) takes epoch \(epoch): \(reason)")
                s.config = s.primary!.config
                s.epoch = epoch
                s.history = s.config!.history
            }
        }
    }
}
