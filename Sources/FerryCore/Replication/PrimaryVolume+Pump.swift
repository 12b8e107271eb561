extension PrimaryVolume {
    // MARK: - Keeping links busy

    func windowAllows(_ session: Session, bytes: UInt64) -> Bool {
        session.inFlightCount < config.windowItems && (session.notReceivedBytes + bytes <= config.windowBytes || session.inFlightCount == 0)
    }

    /// Sends what the peer's session has room for: journal entries, catch-up and point regions,
    /// cut barriers, and the end of a catch-up or point.
    mutating func pump(_ name: String, _ out: inout [Action]) {
        // This runs for every peer after every event; most of the time there is nothing to do,
        // and finding that out reads the peer where it lies instead of taking it out and back.
        let nowNanos = now.monotonicNanos, cutInterval = config.directCutIntervalNanos
        guard let i = peers.index(forKey: name),
              peers.values[i].pumpHasWork(now: nowNanos, cutInterval: cutInterval),
              var peer = takePeer(name) else { return }
        var session = peer.takeSession()!
        let link = session.link
        // Async: stream the journal.
        if peer.journaled, var cursor = session.journalCursor {
            while cursor < journal.endPosition {
                let entry = journal.entry(at: cursor)
                guard windowAllows(session, bytes: entry.bytes) else { break }
                let index = session.take()
                if entry.isBarrier {
                    out.append(.send(peer: name, link, .barrier(ReplicationBarrier(epoch: config.epoch, index: index, seq: entry.seq, kind: .flush))))
                    session.record(at: now.monotonicNanos, SentItem(index: index, kind: .barrier(.flush, seq: entry.seq), range: nil, bytes: 0))
                    session.barrierSeqs.append((index, entry.seq))
                    session.lastCutAt = now.monotonicNanos
                } else {
                    let item = ReplicationItem(epoch: config.epoch, index: index, seq: entry.seq, range: entry.range, isZero: entry.isZero)
                    out.append(.send(peer: name, link, .write(item)))
                    session.record(at: now.monotonicNanos, SentItem(index: index, kind: .write(seq: entry.seq), range: entry.range, bytes: entry.bytes))
                    peer.bytesSent += entry.bytes
                }
                session.lastSentSeq = entry.seq
                if config.plantedBug == .trimJournalOnSend { peer.ackedSeq = entry.seq }
                cursor += 1
                if session.bytesSinceCut >= config.cutBytes { cutBarrier(&session, peer: name, seq: entry.seq, &out) }
            }
            session.journalCursor = cursor
            if cursor == journal.endPosition, !session.lastWasBarrier,
               now.monotonicNanos - session.lastCutAt >= config.cutIntervalNanos {
                cutBarrier(&session, peer: name, seq: session.lastSentSeq, &out)
            }
        }
        // Sync and semi-sync: a cut now and then, so the peer makes its writes durable.
        if peer.isDirect, session.catchUp == nil, !session.lastWasBarrier,
           now.monotonicNanos - session.lastCutAt >= config.directCutIntervalNanos {
            cutBarrier(&session, peer: name, seq: session.lastSentSeq, &out)
        }
        var reads: [(regions: Range<Int>, forPoint: Bool)] = []
        let maxRun = max(1, Int(config.runBytes / config.regionSize))
        // Catch-up: read runs of dirty regions in lock order, then end it once all are durable.
        if var catchUp = session.catchUp, catchUp.endIndex == nil {
            var budget = config.windowItems - session.inFlightCount - session.readRuns
            let limited = (peer.policy.resyncRateBytesPerSecond ?? 0) > 0
            var capacity = Double.infinity
            if let rate = peer.policy.resyncRateBytesPerSecond, rate > 0 {
                // A token bucket of a tenth of a second's worth (at least one region).
                capacity = max(Double(config.regionSize), Double(rate) / 10)
                let elapsed = Double(now.monotonicNanos - (peer.resyncRefilledAt ?? now.monotonicNanos)) / 1e9
                peer.resyncTokens = min(capacity, peer.resyncTokens + Double(rate) * max(0, elapsed))
                peer.resyncRefilledAt = now.monotonicNanos
            }
            var wrapped = false
            var queuedNow = 0
            if session.bytesSinceCut >= config.cutBytes { cutBarrier(&session, peer: name, seq: session.lastSentSeq, &out) }
            while budget > 0, session.notReceivedBytes + UInt64(session.readsQueued.count) * config.regionSize < config.windowBytes {
                if limited, peer.resyncTokens < Double(config.regionSize) { break }
                guard let r = peer.dirty.firstSet(from: catchUp.cursor) else {
                    if wrapped || catchUp.cursor == 0 { break }
                    catchUp.cursor = 0
                    wrapped = true
                    continue
                }
                if session.regionsInFlight[r] != nil || session.readsQueued.contains(r) {
                    catchUp.cursor = r + 1
                    continue
                }
                // A run stays inside one block of `runBytes`, so that holes laid out in such blocks
                // (as file systems allocate) go as zeroing rather than inside a run of data; and
                // within what the token bucket can ever hold, so a slow rate still sends it.
                var limit = maxRun - r % maxRun
                if limited { limit = min(limit, max(1, Int(capacity / Double(config.regionSize)))) }
                let run = peer.dirty.run(from: r, limit: limit) { [session] in
                    session.regionsInFlight[$0] != nil || session.readsQueued.contains($0)
                }
                if limited, peer.resyncTokens < Double(UInt64(run.count) * config.regionSize) { break }
                catchUp.cursor = run.upperBound
                for region in run { session.readsQueued.insert(region) }
                session.readRuns += 1
                queuedNow += run.count
                reads.append((run, false))
                budget -= 1
                if limited { peer.resyncTokens -= Double(UInt64(run.count) * config.regionSize) }
            }
            let allSent = peer.dirty.count == session.regionsInFlight.count + session.readsQueued.count
            if (allSent || budget <= 0 || reads.isEmpty), session.readsQueued.count == queuedNow, !session.lastWasBarrier, !peer.dirty.isEmpty {
                cutBarrier(&session, peer: name, seq: session.lastSentSeq, &out)
            }
            if peer.dirty.isEmpty, session.readsQueued.isEmpty {
                let index = session.take()
                out.append(.send(peer: name, link, .barrier(ReplicationBarrier(epoch: config.epoch, index: index, seq: lastAdmitted, kind: .catchUpEnd))))
                session.record(at: now.monotonicNanos, SentItem(index: index, kind: .barrier(.catchUpEnd, seq: lastAdmitted), range: nil, bytes: 0))
                session.lastSentSeq = max(session.lastSentSeq, lastAdmitted)
                catchUp.endIndex = index
                peer.dirtySince = nil
                if peer.policy.mode == .async {
                    // From here on the peer is streamed from the journal: every write after the
                    // catch-up's state is journaled, and nothing before it is needed.
                    peer.journaled = true
                    peer.ackedSeq = lastAdmitted
                    session.journalCursor = journal.position(after: lastAdmitted)
                }
            }
            session.catchUp = catchUp
        }
        // Scheduled point: read its runs of regions as of the cut, then close it with a point barrier.
        if var point = peer.point, point.barrierIndex == nil {
            var budget = config.windowItems - session.inFlightCount - point.readRuns
            while budget > 0, session.notReceivedBytes + UInt64(point.readsQueued.count) * config.regionSize < config.windowBytes,
                  let r = point.regions.firstSet(from: point.cursor) {
                let run = point.regions.run(from: r, limit: maxRun - r % maxRun)
                point.cursor = run.upperBound
                for region in run { point.readsQueued.insert(region) }
                point.readRuns += 1
                reads.append((run, true))
                budget -= 1
            }
            if point.regions.firstSet(from: point.cursor) == nil, point.readsQueued.isEmpty {
                let index = session.take()
                out.append(.send(peer: name, link, .barrier(ReplicationBarrier(epoch: config.epoch, index: index, seq: point.seq, kind: .point))))
                session.record(at: now.monotonicNanos, SentItem(index: index, kind: .barrier(.point, seq: point.seq), range: nil, bytes: 0))
                point.barrierIndex = index
            }
            peer.point = point
        }
        peer.session = session
        peers[name] = peer
        for (regions, forPoint) in reads {
            let ticket = nextTicket
            nextTicket += 1
            tickets[ticket] = .regionRead(peer: name, link, regions: regions, forPoint: forPoint)
            admitInOrder(lock.enqueue(ticket, range: peer.dirty.range(ofRegions: regions)), &out)
        }
    }

    /// A run's turn in the lock came: every write before it is on the image, none after. Sends
    /// what of it still needs sending, as items of adjacent regions.
    mutating func regionReadAdmitted(peer name: String, link: LinkID, regions run: Range<Int>, forPoint: Bool, _ out: inout [Action]) {
        guard peers[name]?.hasSession(on: link) == true, var peer = takePeer(name) else { return }
        var session = peer.takeSession()!
        /// Splits `run` into the sub-runs `key` maps to the same value (nil: not sent).
        func pieces<K: Equatable>(_ key: (Int) -> K?) -> [(Range<Int>, K)] {
            var result: [(Range<Int>, K)] = []
            var start = run.lowerBound
            while start < run.upperBound {
                var end = start + 1
                let k = key(start)
                while end < run.upperBound, key(end) == k { end += 1 }
                if let k { result.append((start..<end, k)) }
                start = end
            }
            return result
        }
        if forPoint {
            guard var point = peer.point, point.readsQueued.contains(run.lowerBound) else { return }
            for r in run { point.readsQueued.remove(r) }
            point.readRuns -= 1
            // Regions copied aside before a later write go from the copies, the rest from the image.
            for (piece, preserved) in pieces({ point.preserved.contains($0) }) {
                let range = peer.dirty.range(ofRegions: piece)
                let index = session.take()
                let item = ReplicationItem(epoch: config.epoch, index: index, seq: 0, range: range, isZero: false)
                out.append(.sendRegion(peer: name, link, item, preserved: preserved))
                session.record(at: now.monotonicNanos, SentItem(index: index, kind: .regions(piece, forPoint: true), range: range, bytes: range.length))
                for r in piece { point.sent.insert(r) }
                point.bytes += range.length
                peer.bytesSent += range.length
            }
            peer.point = point
        } else {
            guard session.readsQueued.contains(run.lowerBound) else { return }
            for r in run { session.readsQueued.remove(r) }
            session.readRuns -= 1
            let wanted = pieces { r in peer.dirty.contains(r) && session.regionsInFlight[r] == nil ? true : nil }
            for (piece, _) in wanted {
                let range = peer.dirty.range(ofRegions: piece)
                let index = session.take()
                let item = ReplicationItem(epoch: config.epoch, index: index, seq: 0, range: range, isZero: false)
                out.append(.sendRegion(peer: name, link, item, preserved: false))
                session.record(at: now.monotonicNanos, SentItem(index: index, kind: .regions(piece, forPoint: false), range: range, bytes: range.length))
                for r in piece { session.regionsInFlight[r] = index }
                peer.bytesSent += range.length
            }
        }
        peer.session = session
        peers[name] = peer
    }

    // MARK: - Timers

    mutating func tickPeer(_ name: String, _ out: inout [Action]) {
        guard var peer = takePeer(name) else { return }
        if peer.session?.lastProgressAt ?? 0 < 0 { peer.session?.lastProgressAt = now.monotonicNanos }
        if let session = peer.session {
            let waitingForOpen = !session.open && now.monotonicNanos - session.startedAt > config.sessionTimeoutNanos
            let stalled = session.open && session.inFlightCount > 0
                && now.monotonicNanos - session.lastProgressAt > config.sessionTimeoutNanos
            if waitingForOpen || stalled {
                let why = waitingForOpen ? "\(name) did not answer open" : "\(name) acked nothing"
                let reason = "\(why) for \(config.sessionTimeoutNanos / 1_000_000_000) s; resetting the link"
                out.append(.closeLink(peer: name, session.link, reason: reason))
                dropSession(&peer, link: session.link, &out)
                setState(&peer, peer.state, reason, &out)
            }
        }
        if peer.policy.mode == .async, peer.journaled, peer.session == nil, isOverBound(peer) {
            enterBitmapMode(&peer, reason: "\(name) is disconnected past its lag bound; what it misses is tracked in its bitmap", &out)
        }
        if peer.policy.mode == .scheduled, let session = peer.session, session.open, session.catchUp == nil, peer.point == nil,
           peer.pointRequested || (peer.nextPointAt.map { now.wallSeconds >= $0 } ?? false) {
            peer.point = Point(seq: lastAdmitted, cutAt: now.wallSeconds, regions: peer.dirty)
            peer.dirty.clearAll()
            peer.dirtySince = nil
            peer.pointRequested = false
            persistNeeded = true
            setState(&peer, .sendingPoint, "sending the point at sequence \(lastAdmitted)", &out)
        }
        if peer.progressUnpersisted, now.monotonicNanos - peer.lastProgressPersist >= 1_000_000_000 {
            peer.progressUnpersisted = false
            peer.lastProgressPersist = now.monotonicNanos
            persistNeeded = true
        }
        peers[name] = peer
    }

    mutating func trimJournalIfPossible(_ out: inout [Action]) {
        guard journalEnabled, !persistNeeded, persistedToken + 1 >= nextToken else { return }
        var through = lastAdmitted
        for peer in peers.values where peer.policy.mode == .async && peer.journaled {
            through = min(through, peer.ackedSeq)
        }
        // Entries of requests not yet answered stay: their payload is read from the journal.
        if let oldest = requests.oldest { through = min(through, oldest - 1) }
        if through > journal.trimmedThrough {
            journal.trim(through: through)
            out.append(.trimJournal(throughSeq: through))
        }
    }

    // MARK: - Status

    /// Each peer's link as status shows it, sorted by peer name.
    public func status(now: Instant) -> [ReplicaLinkStatus] {
        var copy = self
        copy.now = now
        return peerOrder.compactMap { name in
            guard let peer = copy.peers[name] else { return nil }
            let session = peer.session
            let catchUp = session?.catchUp
            return ReplicaLinkStatus(
                peer: name, mode: peer.policy.mode, state: peer.state, reason: peer.reason,
                connected: session?.open ?? false,
                consistent: !peer.initialSyncPending && catchUp == nil,
                lagBytes: copy.lagBytes(peer), lagSeconds: Double(copy.lagNanos(peer)) / 1e9,
                dirtyBytes: peer.dirty.dirtyBytes, inFlightBytes: session?.unackedBytes ?? 0,
                syncRemainingBytes: catchUp.map { _ in peer.dirty.dirtyBytes },
                syncTotalBytes: catchUp.map { $0.totalBytes },
                syncETASeconds: catchUp.flatMap { c in
                    let done = c.totalBytes - min(c.totalBytes, peer.dirty.dirtyBytes)
                    let elapsed = Double(now.monotonicNanos - c.startedAt) / 1e9
                    guard done > 0, elapsed >= 1 else { return nil }
                    return Double(peer.dirty.dirtyBytes) / (Double(done) / elapsed)
                },
                bytesSent: peer.bytesSent,
                journalBytes: peer.policy.mode == .async ? (peer.journaled ? journal.bytes(after: peer.ackedSeq) : 0) : nil,
                journalLimitBytes: peer.policy.mode == .async ? peer.policy.journalSizeBytes : nil,
                lastPoint: peer.lastPoint, nextPointAt: peer.nextPointAt,
                // `block`: with the peer gone, replies wait for it, so no answered write is missing there.
                rpoZero: peer.isDirect && (session?.open == true && catchUp == nil && peer.dirty.isEmpty || peer.state == .blocked))
        }
    }

    /// What to persist at a clean shutdown (the sequence is exact then; no reservation is skipped).
    public func metadataForShutdown() -> Metadata { metadata() }

    /// The highest sequence admitted (every request up to it is on the image or being written).
    public var admittedSequence: UInt64 { lastAdmitted }
    /// Requests accepted and not yet answered.
    public var pendingRequests: Int { requests.count }
    public var isFenced: Bool { fenced }
    /// The epoch this primary writes in.
    public var epoch: UInt64 { config.epoch }

    /// What this site holds that a peer may lack, merged and in volume order: each peer's dirty
    /// regions, a scheduled point's regions, what a journaled peer has not acknowledged, and what
    /// a live session has not had acked durable. A primary that is demoted keeps these blocks
    /// aside before another site's copy overwrites them (P6).
    /// `peer`: what that one peer may lack (a site rejoining as its secondary loses nothing the
    /// peer holds).
    public func unreplicatedRanges(for only: String? = nil) -> [BlockRange] {
        Self.ranges(of: unreplicated(for: only))
    }

    func unreplicated(for only: String?) -> DirtyBitmap {
        var all = DirtyBitmap(volumeSize: config.volumeSize, regionSize: config.regionSize)
        for peer in peers.values where only == nil || peer.name == only {
            all.formUnion(peer.dirty)
            if let point = peer.point { all.formUnion(point.regions) }
            if peer.journaled {
                for entry in journal.live(after: max(peer.ackedSeq, journal.trimmedThrough)) where !entry.isBarrier && entry.range.length > 0 {
                    _ = all.set(entry.range)
                }
            }
            for item in peer.session?.pendingItems ?? [] {
                if let range = item.range, range.length > 0 { _ = all.set(range) }
            }
        }
        return all
    }

    static func ranges(of all: DirtyBitmap) -> [BlockRange] {
        var ranges: [BlockRange] = []
        var next = 0
        while let first = all.firstSet(from: next) {
            let run = all.run(from: first, limit: Int.max)
            ranges.append(all.range(ofRegions: run))
            next = run.upperBound
        }
        return ranges
    }

    /// Whether `peer` holds, durably and in an open session, every write this primary has
    /// admitted, with none still running: what a switchover waits for before stepping down.
    public func holdsEverything(_ name: String) -> Bool {
        guard let peer = peers[name], let session = peer.session, session.open, peer.rival == nil else { return false }
        return requests.isEmpty && peer.dirty.isEmpty && session.inFlightCount == 0 && session.durableSeq >= lastAdmitted
    }

    /// `ferry verify --repair`: the peer's image differs from this one in `ranges`; they are sent
    /// again by a catch-up. Nil (nothing changed) when the peer has no open session, or a
    /// catch-up or point is already running (verify again once it is done).
    public mutating func resync(_ ranges: [BlockRange], peer name: String, now: Instant) -> [Action]? {
        self.now = now
        guard var peer = peers[name], var session = peer.session, session.open, session.catchUp == nil, peer.point == nil,
              peer.policy.mode != .scheduled else { return nil }
        var out: [Action] = []
        if peer.journaled {
            // The catch-up stands for the journal too, as after a pull-ahead.
            peer.journaled = false
            for entry in journal.live(after: peer.ackedSeq) where !entry.isBarrier { markDirty(entry.range, in: &peer) }
        }
        for range in ranges { markDirty(range, in: &peer) }
        persistNeeded = true
        peer.session = nil
        startCatchUp(&session, peer: &peer, &out)
        peer.session = session
        peers[name] = peer
        finish(&out)
        return out
    }

    /// The last write admitted: what a replica that takes over must hold.
    public var lastAdmittedSeq: UInt64 { lastAdmitted }
    /// The generation this primary writes in.
    public var generation: UInt64 { config.generation }
    public var history: [GenerationRecord] { config.history }

    /// Another site holds a newer epoch of the volume (P4): from now on every write and flush is
    /// refused. Requests already admitted finish; nothing new reaches the image or a peer.
    public mutating func fence(reason: String) -> [Action] {
        guard !fenced else { return [] }
        fenced = true
        return [.fence(reason: reason)]
    }
}

extension PeerState {
    /// Whether ``PrimaryVolume/pump(_:_:)`` has anything to do for this peer: its session is
    /// open, and it has a journal to stream, a catch-up or a point under way, or, synchronous,
    /// a cut due.
    ///
    /// `mutating` though it changes nothing, so that the check runs on the peer where it lies in
    /// the dictionary (through `_modify`): reading it through the getter copied the whole state,
    /// and checking it in a method of `PrimaryVolume` copied the volume too, after every event.
    mutating func pumpHasWork(now: Int64, cutInterval: Int64) -> Bool {
        guard session?.open == true else { return false }
        if journaled && session?.journalCursor != nil { return true }
        if session?.catchUp != nil && session?.catchUp?.endIndex == nil { return true }
        if point != nil && point?.barrierIndex == nil { return true }
        return isDirect && session?.catchUp == nil && session?.lastWasBarrier == false
            && now - (session?.lastCutAt ?? 0) >= cutInterval
    }
}
