extension PrimaryVolume {
    // MARK: - Routing writes and flushes to peers

    mutating func routeWrite(seq: UInt64, range: BlockRange, isZero: Bool, fua: Bool, peer name: String,
                             request: inout Pending, _ out: inout [Action]) {
        guard var peer = takePeer(name) else { return }
        switch peer.policy.mode {
        case .sync, .semiSync:
            if peer.session?.open == true, var session = peer.takeSession() {
                let index = session.take()
                let item = ReplicationItem(epoch: config.epoch, index: index, seq: seq, range: range, isZero: isZero)
                out.append(.send(peer: name, session.link, .write(item)))
                session.record(at: now.monotonicNanos, SentItem(index: index, kind: .write(seq: seq), range: range, bytes: isZero ? 0 : range.length))
                session.lastSentSeq = seq
                peer.bytesSent += isZero ? 0 : range.length
                var level: AckLevel = peer.policy.mode == .sync ? .written : .received
                var waitIndex = index
                if fua {
                    let b = session.take()
                    out.append(.send(peer: name, session.link, .barrier(ReplicationBarrier(epoch: config.epoch, index: b, seq: seq, kind: .flush))))
                    session.record(at: now.monotonicNanos, SentItem(index: b, kind: .barrier(.flush, seq: seq), range: nil, bytes: 0))
                    session.lastCutAt = now.monotonicNanos
                    if peer.policy.mode == .sync { level = .durable; waitIndex = b }
                } else if session.bytesSinceCut >= config.directCutBytes {
                    cutBarrier(&session, peer: name, seq: seq, &out)
                }
                request.waits.append(.ack(peer: name, session.link, index: waitIndex, level: level))
                peer.session = session
            } else if config.plantedBug != .skipBitmapOnDegrade {
                markDirty(range, in: &peer)
                switch peer.policy.onPeerLoss {
                case .degrade: request.waits.append(.persist(peer.lastDirtyToken))
                case .block: request.waits.append(.peerClear(name))
                }
            }
        case .async:
            if peer.journaled {
                let lagAfter = lagBytes(peer) + (isZero ? 0 : range.length)
                if isOverBound(peer, lagBytes: lagAfter) {
                    if peer.policy.onLag == .pullAhead || peer.session == nil {
                        enterBitmapMode(&peer, reason: peer.session == nil
                            ? "disconnected past its lag bound; what it misses is tracked in its bitmap"
                            : "past its lag bound (on-lag: pull-ahead); no longer journaled for, catching up from its bitmap", &out)
                        markDirty(range, in: &peer)
                    } else {
                        request.waits.append(.throttle(name))
                        setState(&peer, .lagging, "past its lag bound (on-lag: throttle); writers are slowed", &out)
                    }
                }
            } else {
                markDirty(range, in: &peer)
            }
        case .scheduled:
            if var point = peer.point, config.plantedBug != .skipPointCopy, let regions = peer.dirty.regions(covering: range) {
                for r in regions where point.regions.contains(r) && !point.sent.contains(r) && !point.preserved.contains(r) {
                    point.preserved.insert(r)
                    out.append(.preserve(peer: name, peer.dirty.range(ofRegion: r)))
                }
                peer.point = point
            }
            markDirty(range, in: &peer)
        }
        peers[name] = peer
    }

    mutating func routeFlush(seq: UInt64, peer name: String, request: inout Pending, _ out: inout [Action]) {
        guard var peer = takePeer(name) else { return }
        switch peer.policy.mode {
        case .sync, .semiSync:
            if peer.session?.open == true, var session = peer.takeSession() {
                let index = session.take()
                out.append(.send(peer: name, session.link, .barrier(ReplicationBarrier(epoch: config.epoch, index: index, seq: seq, kind: .flush))))
                session.record(at: now.monotonicNanos, SentItem(index: index, kind: .barrier(.flush, seq: seq), range: nil, bytes: 0))
                session.lastCutAt = now.monotonicNanos
                session.lastSentSeq = max(session.lastSentSeq, seq)
                request.waits.append(.ack(peer: name, session.link, index: index, level: peer.policy.mode == .sync ? .durable : .received))
                request.checkpointWaits.append(.ack(peer: name, session.link, index: index, level: .durable))
                peer.session = session
            } else if peer.policy.onPeerLoss == .block {
                request.waits.append(.peerClear(name))
            }
        case .async, .scheduled:
            break   // the journal barrier and the bitmaps are made durable by the flush itself
        }
        peers[name] = peer
    }

    mutating func cutBarrier(_ session: inout Session, peer name: String, seq: UInt64, _ out: inout [Action]) {
        let index = session.take()
        out.append(.send(peer: name, session.link, .barrier(ReplicationBarrier(epoch: config.epoch, index: index, seq: seq, kind: .cut))))
        session.record(at: now.monotonicNanos, SentItem(index: index, kind: .barrier(.cut, seq: seq), range: nil, bytes: 0))
        session.barrierSeqs.append((index, seq))
        session.lastCutAt = now.monotonicNanos
    }

    /// Marks `range` dirty for the peer; a region re-dirtied while a catch-up copy of it is in
    /// flight must be sent again, so the in-flight copy no longer clears it.
    mutating func markDirty(_ range: BlockRange, in peer: inout PeerState) {
        let wasEmpty = peer.dirty.isEmpty
        if peer.dirty.set(range) > 0 {
            persistNeeded = true
            peer.lastDirtyToken = nextToken
        }
        if wasEmpty, !peer.dirty.isEmpty, peer.dirtySince == nil { peer.dirtySince = now.monotonicNanos }
        if peer.session != nil, let regions = peer.dirty.regions(covering: range) {
            for r in regions { peer.session!.regionsInFlight[r] = nil }
        }
        if peer.lastDirtyToken == 0 { peer.lastDirtyToken = persistedToken }
    }

    mutating func markDirty(_ range: BlockRange, peer name: String) {
        guard var peer = peers[name] else { return }
        markDirty(range, in: &peer)
        peers[name] = peer
    }

    mutating func enterBitmapMode(_ peer: inout PeerState, reason: String, _ out: inout [Action]) {
        guard peer.journaled else { return }
        peer.journaled = false
        for entry in journal.live(after: peer.ackedSeq) where !entry.isBarrier {
            markDirty(entry.range, in: &peer)
        }
        persistNeeded = true
        peer.session?.journalCursor = nil
        setState(&peer, .pullAhead, reason, &out)
        if var session = peer.session, session.open {
            startCatchUp(&session, peer: &peer, &out)
            peer.session = session
        }
    }

    // MARK: - Lag

    func lagBytes(_ peer: PeerState) -> UInt64 {
        if peer.journaled { return journal.bytes(after: peer.ackedSeq) }
        return peer.dirty.dirtyBytes + (peer.point?.regions.dirtyBytes ?? 0)
    }

    func lagNanos(_ peer: PeerState) -> Int64 {
        if peer.journaled {
            guard let oldest = journal.oldestNanos(after: peer.ackedSeq) else { return 0 }
            return max(0, now.monotonicNanos - oldest)
        }
        guard let since = peer.dirtySince, !(peer.dirty.isEmpty && peer.point == nil) else { return 0 }
        return max(0, now.monotonicNanos - since)
    }

    func isOverBound(_ peer: PeerState, lagBytes: UInt64? = nil) -> Bool {
        let bytes = lagBytes ?? self.lagBytes(peer)
        let bound = min(peer.policy.maxLagBytes ?? .max, peer.policy.journalSizeBytes)
        if bytes > bound { return true }
        if let seconds = peer.policy.maxLagSeconds, lagNanos(peer) > seconds * 1_000_000_000 { return true }
        return false
    }

    // MARK: - Links

    /// A link to `peer` is up: open a session on it.
    public mutating func linkUp(peer name: String, link: LinkID, now: Instant) -> [Action] {
        self.now = now
        var out: [Action] = []
        guard var peer = peers[name] else { return out }
        if let old = peer.session { dropSession(&peer, link: old.link, &out) }
        peer.session = Session(link: link, now: now.monotonicNanos)
        out.append(.send(peer: name, link, .open(VolumeOpen(volume: config.volume, epoch: config.epoch,
            generation: config.generation, volumeSize: config.volumeSize, mode: peer.policy.mode,
            history: config.lineage, appliedSeq: lastAdmitted, discards: peer.discarding ?? 0))))
        peers[name] = peer
        finish(&out)
        return out
    }

    /// The link is gone. What the peer had not made durable is marked dirty.
    public mutating func linkDown(peer name: String, link: LinkID, now: Instant) -> [Action] {
        self.now = now
        var out: [Action] = []
        guard var peer = peers[name], peer.session?.link == link else { return out }
        dropSession(&peer, link: link, &out)
        peers[name] = peer
        finish(&out)
        return out
    }

    mutating func dropSession(_ peer: inout PeerState, link: LinkID, _ out: inout [Action]) {
        guard let session = peer.session, session.link == link else { return }
        let name = peer.name
        let catchingUp = session.catchUp != nil
        if (peer.isDirect || catchingUp) && config.plantedBug != .skipBitmapOnDegrade {
            for item in session.pendingItems {
                if let range = item.range, !peer.journaled { markDirty(range, in: &peer) }
            }
            persistNeeded = true
        }
        if var point = peer.point {
            point.regions.formUnion(peer.dirty)
            peer.dirty = point.regions
            peer.point = nil
            out.append(.dropPreserved(peer: name))
            persistNeeded = true
        }
        peer.session = nil
        // Requests waiting for this link's acks now wait for the bitmap (degrade) or the peer (block).
        let replacement: Pending.Wait? = config.plantedBug == .skipBitmapOnDegrade ? nil
            : peer.policy.onPeerLoss == .block && peer.isDirect ? .peerClear(name) : .persist(nextToken)
        if replacement.map({ if case .persist = $0 { return true } else { return false } }) ?? false { persistNeeded = true }
        for seq in requests.sequences {
            guard var request = requests[seq] else { continue }
            var changed = false
            func convert(_ waits: [Pending.Wait]) -> [Pending.Wait] {
                waits.compactMap { wait in
                    if case .ack(let p, let l, _, _) = wait, p == name, l == link { changed = true; return replacement }
                    return wait
                }
            }
            request.waits = convert(request.waits)
            request.checkpointWaits = convert(request.checkpointWaits).map {
                if case .peerClear = $0 { return .persist(nextToken) } else { return $0 }
            }
            if changed { requests[seq] = request; persistNeeded = true }
        }
        switch peer.policy.mode {
        case .sync, .semiSync:
            if peer.policy.onPeerLoss == .block {
                setState(&peer, .blocked, "\(name) is unreachable; writes wait for it (on-peer-loss: block)", &out)
            } else {
                setState(&peer, .degraded, "\(name) is unreachable; writes go on and what it misses is in its bitmap (RPO is no longer 0)", &out)
            }
        case .async, .scheduled:
            setState(&peer, .connecting, "\(name) is unreachable", &out)
        }
    }

    /// A message from the peer on `link`.
    public mutating func received(_ message: ReplicationMessage, peer name: String, link: LinkID, now: Instant) -> [Action] {
        self.now = now
        var out: [Action] = []
        if case .open(let open) = message, var peer = takePeer(name) {
            // Another primary of the volume: whichever link it came on, the histories decide.
            rivalOpened(open, peer: &peer, link: link, &out)
            peers[name] = peer
            finish(&out)
            return out
        }
        guard peers[name]?.hasSession(on: link) == true, var peer = takePeer(name) else { return out }
        let isOpen = peer.session!.open
        switch message {
        case .position(let position):
            guard !isOpen else {
                out.append(.closeLink(peer: name, link, reason: "position sent twice"))
                dropSession(&peer, link: link, &out)
                break
            }
            if position.epoch > config.epoch {
                if !fenced {
                    fenced = true
                    out.append(.fence(reason: "\(name) holds epoch \(position.epoch) of \(config.volume), newer than this site's \(config.epoch)"))
                }
                out.append(.closeLink(peer: name, link, reason: "stale epoch \(config.epoch)"))
                dropSession(&peer, link: link, &out)
                break
            }
            if let rivalEpoch = peer.rival?.epoch ?? peer.formerRivalEpoch, rivalEpoch >= config.epoch {
                // A rival with a newer epoch gave way (the split brain was resolved on its side):
                // the sites that followed it refuse older epochs, so take a newer one first.
                peer.rival = nil
                peer.formerRivalEpoch = nil
                adoptEpoch(above: rivalEpoch, peer: &peer,
                           reason: "\(name) (epoch \(rivalEpoch)) gave way after a split brain; sites that followed it refuse older epochs", &out)
                break
            }
            peer.session!.open = true
            peer.rival = nil
            peer.formerRivalEpoch = nil
            peer.discarding = nil
            opened(&peer, position: position, &out)
        case .ack(let level, let index):
            // Before `position` an ack can only be a leftover of the link layer's switch-over
            // (protocol.md §6.1): ignore it.
            guard isOpen else { break }
            guard index < peer.session!.nextIndex else {
                out.append(.closeLink(peer: name, link, reason: "ack for stream index \(index) that was never sent"))
                dropSession(&peer, link: link, &out)
                break
            }
            peer.lastAckAt = now.monotonicNanos
            peer.session?.lastProgressAt = now.monotonicNanos
            acked(&peer, level: level, index: index, &out)
        case .refuse(let reason):
            out.append(.closeLink(peer: name, link, reason: "refused: \(reason)"))
            dropSession(&peer, link: link, &out)
            setState(&peer, .connecting, "\(name) refused the stream: \(reason)", &out)
        case .verify, .hashes:
            break   // online verify is the site's, outside the stream
        case .write, .region, .barrier, .open, .handoff:
            out.append(.closeLink(peer: name, link, reason: "a primary does not accept replication data"))
            dropSession(&peer, link: link, &out)
        }
        peers[name] = peer
        finish(&out)
        return out
    }

    mutating func opened(_ peer: inout PeerState, position: ReplicaPosition, _ out: inout [Action]) {
        let sameHistory = position.initialized && position.generation == config.generation
        let sharedPast = position.initialized && config.ancestors.contains(position.generation)
        peer.copyReplacesData = position.initialized
        if peer.initialSyncPending, let changed = changedSince(position) {
            // A third site after a move: it holds the line's state at its sequence (plus the
            // late writes it names), and this site knows every granule written since.
            peer.dirty.clearAll()
            for range in changed { markDirty(range, in: &peer) }
            peer.initialSyncPending = false
            peer.journaled = false
            persistNeeded = true
            catchUpsFromLine += 1
        }
        if peer.initialSyncPending && position.generation != config.generation {
            // A copy under way to a site whose image has since moved to another line (it was
            // promoted, or followed another primary, and gave way again): what was already sent
            // no longer describes it; the copy starts over. A replica records this primary's
            // generation at the copy's first barrier, before any block lands, so any other
            // generation means it took blocks from elsewhere since, even when it never finished
            // a copy (`initialized` false). Found by the failover simulation: seed 291 (a
            // region sent before the site's promotion was never sent again) and seed 900753 (a
            // replica that followed a forced promotion mid-copy kept its bytes where the copy
            // had already passed, and was then marked consistent).
            peer.dirty.setAll()
            persistNeeded = true
        }
        if sameHistory && !peer.initialSyncPending {
            // A site on this very generation that gave way to it (a former primary of it whose
            // promotion elsewhere lost): what it wrote that this site lacks is overwritten.
            for range in position.needs ?? [] { markDirty(range, in: &peer) }
        }
        if sharedPast && !peer.initialSyncPending {
            // A former primary (demoted) on the line this generation branched from: it lacks what
            // this site wrote since the branch (its bitmap and, for an async peer, the journal
            // since the branch), and what it wrote itself past the branch must be overwritten.
            for range in position.needs ?? [] { markDirty(range, in: &peer) }
            if peer.journaled {
                peer.journaled = false
                for entry in journal.live(after: journal.trimmedThrough) where !entry.isBarrier { markDirty(entry.range, in: &peer) }
            }
            persistNeeded = true
        } else if !sameHistory && !peer.initialSyncPending {
            // A new or emptied replica (or, until failover decides better, another history): a full copy.
            peer.dirty.setAll()
            peer.initialSyncPending = true
            peer.journaled = false
            persistNeeded = true
        }
        guard var session = peer.session else { return }
        switch peer.policy.mode {
        case .sync, .semiSync:
            // Straight to in sync only on this very generation: a replica still recording another
            // one (a site demoted at its own consistent state, rejoining the site promoted after
            // it) first gets a catch-up, even an empty one, whose first barrier records this
            // generation before any write of it lands (else a crash would leave a position that
            // says "consistent in the old generation" over an image holding writes of this one).
            if peer.dirty.isEmpty && !peer.initialSyncPending && position.consistent && position.generation == config.generation {
                setState(&peer, .inSync, "every write reaches \(peer.name) before it is answered", &out)
            } else {
                startCatchUp(&session, peer: &peer, &out)
            }
        case .async:
            if peer.journaled && peer.dirty.isEmpty && !peer.initialSyncPending && position.consistent
                && journal.covers(position.appliedSeq) && position.appliedSeq <= lastAdmitted {
                peer.ackedSeq = max(peer.ackedSeq, position.appliedSeq)
                session.journalCursor = journal.position(after: position.appliedSeq)
                setState(&peer, .inSync, "streaming the journal to \(peer.name)", &out)
            } else {
                if peer.journaled {
                    // What the peer lacks is the journal after its position (and, after a crash
                    // here, the activity log's extents, already in its bitmap).
                    peer.journaled = false
                    persistNeeded = true
                    for entry in journal.live(after: max(position.appliedSeq, journal.trimmedThrough)) where !entry.isBarrier {
                        markDirty(entry.range, in: &peer)
                    }
                    if position.appliedSeq < journal.trimmedThrough && !position.consistent { peer.dirty.setAll() }
                }
                startCatchUp(&session, peer: &peer, &out)
            }
        case .scheduled:
            if peer.initialSyncPending || !position.consistent {
                startCatchUp(&session, peer: &peer, &out)
            } else {
                setState(&peer, .waitingForPoint, "next point \(peer.nextPointAt.map { "at \(Schedule.utcTimestamp(seconds: $0))" } ?? "on demand")", &out)
            }
        }
        peer.session = session
    }

    /// What a peer at `position` lacks, when it holds a state of an ancestor generation of this
    /// primary's line and says exactly what its image holds past the point where the lines part
    /// (``ReplicaPosition/needsComplete``: its sequence, or where this line leaves its generation
    /// if that is lower), and `lastWrites` cover the line (``Metadata/lastWritesCoverLine``): the
    /// granules written here after that point, and what it names. Nil when a full copy is needed.
    func changedSince(_ position: ReplicaPosition) -> [BlockRange]? {
        guard lastWritesCoverLine, position.needsComplete == true, position.consistent, position.initialized,
              position.generation != config.generation, config.ancestors.contains(position.generation),
              let reach = VolumeHistory(generations: config.lineage, appliedSeq: .max).reach(in: position.generation)
        else { return nil }
        let after = config.plantedBug == .thirdSiteFromBranchOnly ? reach : min(position.appliedSeq, reach)
        let granuleSize = UInt64(extentsPerGranule) * config.extentSize
        return WriteMap.ranges(of: lastWrites, granuleSize: granuleSize, volumeSize: config.volumeSize, after: after)
            + (position.needs ?? [])
    }

    mutating func startCatchUp(_ session: inout Session, peer: inout PeerState, _ out: inout [Action]) {
        let index = session.take()
        out.append(.send(peer: peer.name, session.link, .barrier(ReplicationBarrier(epoch: config.epoch, index: index, seq: lastAdmitted, kind: .catchUpBegin))))
        session.record(at: now.monotonicNanos, SentItem(index: index, kind: .barrier(.catchUpBegin, seq: lastAdmitted), range: nil, bytes: 0))
        session.catchUp = CatchUp(initial: peer.initialSyncPending, totalBytes: peer.dirty.dirtyBytes, startedAt: now.monotonicNanos)
        if peer.state != .pullAhead {
            let copy = peer.copyReplacesData
                ? "full copy to \(peer.name): it holds a state of \(config.volume) this site cannot compare with its own (another line, "
                    + "or one it cannot date since a crash)"
                : "first full copy to \(peer.name)"
            setState(&peer, peer.initialSyncPending ? .initialSync : .catchingUp,
                     peer.initialSyncPending ? copy : "sending \(peer.name) what it missed", &out)
        }
    }

    // MARK: - Acks

    mutating func acked(_ peer: inout PeerState, level: AckLevel, index: UInt64, _ out: inout [Action]) {
        guard var session = peer.session else { return }
        peer.session = nil
        if config.recordsAckLatency, index > session.acked(level), let sentAt = session.sentAt(index: index) {
            if ackSamples.count >= 4096 { ackSamples.removeFirst(2048) }   // nobody drains them
            ackSamples.append(AckSample(peer: peer.name, level: level, nanos: now.monotonicNanos - sentAt))
        }
        switch level {
        case .received: session.ackedReceived = max(session.ackedReceived, index)
        case .written: session.ackedWritten = max(session.ackedWritten, index)
        case .durable: session.ackedDurable = max(session.ackedDurable, index)
        }
        session.popReceived(through: session.acked(.received))
        if peer.journaled || peer.policy.mode == .async {
            // `written` from a logged replica: the group is durably in its receive log.
            let through = session.acked(.written)
            while let first = session.barrierSeqs.first, first.index <= through {
                session.barrierSeqs.removeFirst()
                if peer.journaled { peer.ackedSeq = max(peer.ackedSeq, first.seq) }
            }
        }
        var catchUpDone = false
        var pointDone = false
        if level == .durable {
            for item in session.popDurable(through: index) {
                // The peer's image holds every write through a barrier it made durable (a
                // catch-up's begin marks it inconsistent instead).
                if case .barrier(let kind, let seq) = item.kind, kind != .catchUpBegin {
                    session.durableSeq = max(session.durableSeq, seq)
                }
                switch item.kind {
                case .regions(let run, forPoint: false):
                    for r in run where session.regionsInFlight[r] == item.index {
                        session.regionsInFlight[r] = nil
                        peer.dirty.clearRegion(r)
                        peer.progressUnpersisted = true
                    }
                case .barrier(.catchUpEnd, _):
                    // Only the end of the catch-up still running (a pull-ahead may have started another).
                    if session.catchUp?.endIndex == item.index { catchUpDone = true }
                case .barrier(.point, _):
                    if peer.point?.barrierIndex == item.index { pointDone = true }
                default: break
                }
            }
            if peer.dirty.isEmpty { peer.dirtySince = nil }
        }
        peer.session = session
        if catchUpDone { finishCatchUp(&peer, &out) }
        if pointDone { finishPoint(&peer, &out) }
        if peer.state == .lagging, !isOverBound(peer) {
            setState(&peer, .inSync, "back within its lag bound", &out)
        }
    }

    mutating func finishCatchUp(_ peer: inout PeerState, _ out: inout [Action]) {
        peer.session?.catchUp = nil
        peer.initialSyncPending = false
        persistNeeded = true
        switch peer.policy.mode {
        case .sync, .semiSync:
            setState(&peer, .inSync, "caught up; every write reaches \(peer.name) before it is answered", &out)
        case .async:
            setState(&peer, .inSync, "caught up; streaming the journal to \(peer.name)", &out)
        case .scheduled:
            setState(&peer, .waitingForPoint, "caught up; next point at its time", &out)
        }
    }

    mutating func finishPoint(_ peer: inout PeerState, _ out: inout [Action]) {
        guard let point = peer.point else { return }
        peer.lastPoint = PointRecord(seq: point.seq, cutAtSeconds: point.cutAt, completedAtSeconds: now.wallSeconds,
                                     bytes: point.bytes, regions: point.regions.count)
        peer.point = nil
        out.append(.dropPreserved(peer: peer.name))
        if let schedule = peer.policy.schedule {
            peer.nextPointAt = schedule.nextPoint(afterSeconds: max(now.wallSeconds, point.cutAt))
        }
        persistNeeded = true
        setState(&peer, .waitingForPoint, "point at sequence \(point.seq) complete (\(ByteSize.format(point.bytes)))", &out)
    }

    func setState(_ peer: inout PeerState, _ state: ReplicaLinkState, _ reason: String, _ out: inout [Action]) {
        // A split brain is not over because the link went down or was reset: status says so
        // until the peer opens as something else or gives way.
        if let rival = peer.rival { return setRivalState(&peer, rival, &out) }
        guard peer.state != state else { peer.reason = reason; return }
        peer.state = state
        peer.reason = reason
        out.append(.stateChanged(peer: peer.name, state, reason: reason))
    }
}
