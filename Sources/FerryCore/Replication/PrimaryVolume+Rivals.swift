/// Another site that is a primary of the same volume, met in the handshake (DESIGN §5.1, P4, P6).
///
/// Two primaries each send the other an `open` carrying their line of history; each side runs
/// ``HistoryDecision/decide(local:peer:)`` on the same two histories (mirrored), so both reach
/// the same verdict without another round trip:
/// - the peer's line replaced this one (a former primary returning after a promotion elsewhere):
///   this site is fenced and rejoins as the peer's secondary, keeping aside first what the peer
///   lacks (``Action/rejoin(_:)``);
/// - this site's line replaced the peer's: nothing to do here; the peer gives way and reopens
///   as a secondary;
/// - both wrote since their lines parted (split brain), or no generation in common: nothing
///   moves either way; status says so until `ferry resolve` picks the site to keep
///   (``resolveKeepingLocal(against:)`` here, or an open whose `discards` names this site's
///   generation there).
public struct Rival: Sendable, Equatable {
    public var decision: HistoryDecision
    public var epoch: UInt64
    public var history: VolumeHistory
}

/// What a site that gives way does: ``PrimaryVolume/Action/rejoin(_:)``.
public struct Rejoin: Sendable, Equatable {
    /// The primary this site follows from now on.
    public var peer: String
    /// The newest generation both hold: this site's position names it, so the peer sends only
    /// what differs (what it wrote since, and what this site keeps aside). Nil when the two
    /// share no generation (an unrelated history the operator resolved): the whole image is
    /// kept aside and copied anew.
    public var common: GenerationRecord?
    /// This site's history up to and including `common` (what it keeps; later generations of
    /// its own are given up, their blocks kept aside); empty without `common`.
    public var history: [GenerationRecord]
    /// The peer's epoch: the position carries it, so the peer's stream is not refused as stale.
    public var peerEpoch: UInt64
    public var reason: String
    /// Writes of this site after this sequence are not on the peer's line, whatever the peer
    /// acknowledged before (its image may since have been replaced by another line's): the
    /// peer's branch point when this site is still on `common`, 0 when it left `common` itself.
    /// Nil: only what the peer lacks by this site's bitmaps.
    public var keepWrittenAfter: UInt64?

    public init(peer: String, common: GenerationRecord?, history: [GenerationRecord], peerEpoch: UInt64, reason: String,
                keepWrittenAfter: UInt64? = nil) {
        self.keepWrittenAfter = keepWrittenAfter
        self.peer = peer
        self.common = common
        self.history = history
        self.peerEpoch = peerEpoch
        self.reason = reason
    }
}

extension PrimaryVolume {
    /// This site's history as the handshake compares it.
    public var lineage: VolumeHistory { VolumeHistory(generations: config.lineage, appliedSeq: lastAdmitted) }

    /// The peers this primary is in a split brain (or an unrelated history) with, and what they said.
    public var rivals: [String: Rival] { peers.compactMapValues(\.rival) }

    mutating func rivalOpened(_ open: VolumeOpen, peer: inout PeerState, link: LinkID, _ out: inout [Action]) {
        let theirs = VolumeHistory(generations: open.history, appliedSeq: open.appliedSeq)
        var decision = HistoryDecision.decide(local: lineage, peer: theirs)
        var resolvedThere = false
        if case .unrelated = decision {
            // The operator kept one of two unrelated images: the other is set aside whole.
            if open.discards != 0 && open.discards == config.generation {
                peer.rival = nil
                let why = "the unrelated history of \(config.volume) on \(peer.name) was kept by the operator there "
                    + "(`ferry resolve \(config.volume) --keep \(peer.name)`): this site keeps its image aside and takes a full copy"
                if !fenced {
                    fenced = true
                    out.append(.fence(reason: why))
                }
                out.append(.rejoin(Rejoin(peer: peer.name, common: nil, history: [], peerEpoch: open.epoch, reason: why)))
                return
            }
            if let mine = peer.discarding, mine == theirs.current?.id { decision = .fullCopy(from: .local) }
        }
        if case .splitBrain = decision {
            // The operator decided (`ferry resolve --keep`): on the peer's site, for it; here, for this site.
            if open.discards != 0 && open.discards == config.generation {
                decision = .catchUp(from: .peer)
                resolvedThere = true
            } else if let mine = peer.discarding, mine == theirs.current?.id {
                decision = .catchUp(from: .local)
            }
        }
        if case .inSync = decision { decision = .splitBrain(commonGeneration: config.generation) }  // two writers of one generation
        let name = peer.name
        switch decision {
        case .catchUp(from: .peer), .diverged(keep: .peer, _), .fullCopy(from: .peer):
            guard let common = HistoryDecision.commonGeneration(lineage, theirs) else { break }
            peer.rival = nil
            let why = resolvedThere
                ? "the split brain with \(name) was resolved there in its favour (`ferry resolve \(config.volume) --keep \(name)`): "
                    + "this site rejoins as its secondary"
                : "\(name) holds a newer line of history of \(config.volume) (epoch \(open.epoch), generation "
                    + "\(GenerationRecord.hex(open.generation))) that replaced this site's (epoch \(config.epoch)): this site rejoins as its secondary"
            if !fenced {
                fenced = true
                out.append(.fence(reason: why))
            }
            let kept = Array(config.lineage.prefix { $0.id != common.id }) + [common]
            out.append(.rejoin(Rejoin(peer: name, common: common, history: kept, peerEpoch: open.epoch, reason: why,
                                      keepWrittenAfter: divergence(from: theirs, common: common))))
        case .catchUp(from: .local), .diverged(keep: .local, _), .fullCopy(from: .local):
            peer.rival = nil
            setState(&peer, .connecting, "\(name) is a former primary of \(config.volume) (epoch \(open.epoch)); "
                     + "it gives way and rejoins as a secondary", &out)
            if open.epoch >= config.epoch {
                adoptEpoch(above: open.epoch, peer: &peer,
                           reason: "\(name) gives way from epoch \(open.epoch); sites that followed it refuse older epochs", &out)
            }
        case .splitBrain, .unrelated, .nothingToDo, .inSync:
            let rival = Rival(decision: decision, epoch: open.epoch, history: theirs)
            if rival.epoch != (peer.rival?.epoch ?? peer.formerRivalEpoch) { persistNeeded = true }   // kept over a restart
            peer.rival = rival
            setRivalState(&peer, rival, &out)
        }
    }

    /// Takes the next epoch of this site's own above `seen`, keeping the generation, and resets
    /// every session so each peer hears it in a new `open` (`peer`'s, being handled, too).
    mutating func adoptEpoch(above seen: UInt64, peer: inout PeerState, reason: String, _ out: inout [Action]) {
        if config.history.isEmpty { config.history = config.lineage }   // the generation keeps the epoch that started it
        config.epoch = RoleChange.nextEpoch(after: max(seen, config.epoch), siteIndex: config.siteIndex, siteCount: config.siteCount)
        out.append(.epochChanged(config.epoch, reason: reason))
        if let session = peer.session {
            out.append(.closeLink(peer: peer.name, session.link, reason: "new epoch \(config.epoch)"))
            dropSession(&peer, link: session.link, &out)
        }
        for name in peerOrder where name != peer.name {
            guard var other = peers[name], let session = other.session else { continue }
            out.append(.closeLink(peer: name, session.link, reason: "new epoch \(config.epoch)"))
            dropSession(&other, link: session.link, &out)
            peers[name] = other
        }
    }

    func setRivalState(_ peer: inout PeerState, _ rival: Rival, _ out: inout [Action]) {
        let state: ReplicaLinkState
        let reason: String
        if case .unrelated = rival.decision {
            state = .unrelated
            reason = "\(peer.name) holds a different volume named \(config.volume) (no generation in common): refused"
        } else {
            state = .splitBrain
            reason = "split brain: \(peer.name) is a primary of \(config.volume) too (epoch \(rival.epoch)) and both sites "
                + "wrote since their histories parted; nothing is resynced until `ferry resolve \(config.volume) --keep SITE`"
        }
        guard peer.state != state || peer.reason != reason else { return }
        peer.state = state
        peer.reason = reason
        out.append(.stateChanged(peer: peer.name, state, reason: reason))
    }

    /// `ferry resolve --keep` naming this site: the peer's generation in the split brain is
    /// discarded; the next open tells the peer, which gives way. Nil when `peer` is not in a
    /// split brain with this site.
    public mutating func resolveKeepingLocal(against name: String, now: Instant) -> [Action]? {
        self.now = now
        guard var peer = peers[name], let rival = peer.rival, let theirs = rival.history.current?.id else { return nil }
        switch rival.decision {
        case .splitBrain, .unrelated: break
        default: return nil
        }
        peer.discarding = theirs
        var out: [Action] = []
        if rival.epoch >= config.epoch {
            // Sites that followed the rival refuse anything older than its epoch: take a newer one
            // (which resets every session, this one too).
            adoptEpoch(above: rival.epoch, peer: &peer,
                       reason: "the split brain with \(name) (epoch \(rival.epoch)) was resolved keeping this site", &out)
        } else if let session = peer.session {
            // A new session carries the decision: reset the link.
            out.append(.closeLink(peer: name, session.link, reason: "split brain resolved: \(name) gives way to this site"))
            dropSession(&peer, link: session.link, &out)
        }
        peers[name] = peer
        finish(&out)
        return out
    }

    /// `ferry resolve --keep PEER` on this site: how it gives way to `name`, or nil when `name`
    /// is not in a split brain (or an unrelated history) with it.
    public func rejoinPlan(keeping name: String) -> Rejoin? {
        guard let rival = peers[name]?.rival else { return nil }
        switch rival.decision {
        case .splitBrain:
            guard let common = HistoryDecision.commonGeneration(lineage, rival.history) else { return nil }
            let kept = Array(config.lineage.prefix { $0.id != common.id }) + [common]
            return Rejoin(peer: name, common: common, history: kept, peerEpoch: rival.epoch,
                          reason: "split brain resolved by the operator: \(name) is kept, this site gives way",
                          keepWrittenAfter: divergence(from: rival.history, common: common))
        case .unrelated:
            return Rejoin(peer: name, common: nil, history: [], peerEpoch: rival.epoch,
                          reason: "unrelated histories resolved by the operator: \(name) is kept; this site keeps its whole "
                              + "image aside and takes a full copy")
        default:
            return nil
        }
    }

    /// What a primary that steps down sets aside before another site's copy overwrites it (P6):
    /// what `plan.peer` (or `keepAsideFor`; every peer when both are nil) may lack, or the whole
    /// volume when it takes a full copy from a site it shares no history with.
    public func rangesToKeepAside(plan: Rejoin?, keepAsideFor: String?) -> [BlockRange] {
        if config.plantedBug == .skipKeepAside { return [] }
        if let plan, plan.common == nil { return [BlockRange(offset: 0, length: config.volumeSize)] }
        var all = unreplicated(for: plan?.peer ?? keepAsideFor)
        if let after = plan?.keepWrittenAfter {
            for range in WriteMap.ranges(of: lastWrites, granuleSize: UInt64(extentsPerGranule) * config.extentSize,
                                         volumeSize: config.volumeSize, after: after) {
                _ = all.set(range)
            }
        }
        return Self.ranges(of: all)
    }

    /// Where this site's writes stop being on `theirs`'s line (``Rejoin/keepWrittenAfter``).
    func divergence(from theirs: VolumeHistory, common: GenerationRecord) -> UInt64? {
        guard config.generation == common.id else { return 0 }
        guard let i = theirs.generations.firstIndex(where: { $0.id == common.id }), i + 1 < theirs.generations.count else { return nil }
        return theirs.reach(in: common.id)
    }
}
