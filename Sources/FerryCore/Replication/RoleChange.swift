/// The decisions of a role change (promote, demote, give way), as pure functions: the site runs
/// them with its catalog and files, the simulation with its own, so the schedules test the very
/// rules the daemon applies (DESIGN §4, §7).
public enum RoleChange {
    /// The peers a primary at `site` replicates to, from a volume configured with `firstPrimary`
    /// and `replicas`: those replicas when `site` is the first primary; after a promotion of a
    /// replica, the other replicas plus the first primary, which takes the promoted site's own
    /// policy (the link is mirrored).
    public static func peers(replicas: [String: ReplicaPolicy], firstPrimary: String,
                             whenPrimaryIs site: String) -> [String: ReplicaPolicy] {
        guard site != firstPrimary else { return replicas }
        var peers = replicas
        if let mine = peers.removeValue(forKey: site) { peers[firstPrimary] = mine }
        return peers
    }

    /// Why `ferry promote` must refuse a replica at `position`, or nil when it may go ahead.
    /// `streamingPrimary`: the primary that streams to this replica over a link that is up (a
    /// reachable primary), if any.
    /// `forceInconsistent` promotes an inconsistent image as it is (never a reachable primary's).
    public static func promotionRefusal(volume: String, position: ReplicaPosition, force: Bool, forceInconsistent: Bool = false,
                                        streamingPrimary: String?) -> String? {
        promotionRefusal(volume: volume, position: position, force: force, streamingPrimary: streamingPrimary,
                         plantedBug: nil, inconsistentAllowed: force || forceInconsistent)
    }

    static func promotionRefusal(volume: String, position: ReplicaPosition, force: Bool, streamingPrimary: String?,
                                 plantedBug: PlantedBug?, inconsistentAllowed: Bool) -> String? {
        if !position.consistent && !inconsistentAllowed && plantedBug != .promoteInconsistent {
            let why = position.initialized
                ? "a catch-up is writing it out of order (applied up to sequence \(position.appliedSeq))"
                : "its initial sync has not completed"
            return "the replica of \(volume) here is not consistent: \(why). Promoting it would serve "
                + "a state no site ever had. Wait until `ferry status` shows it in sync, or promote it as it is with --force-inconsistent "
                + "(a file system on it may need repair)"
        }
        if let streaming = streamingPrimary, !force {
            return "\(streaming) is reachable and still the primary of \(volume) (it streams to this site): "
                + "promoting here would make two sites take writes. Demote it there first (`ferry demote \(volume)` on \(streaming)), "
                + "or, if it no longer serves the volume, use --force. If \(streaming) has just failed, this site sees its link "
                + "drop once its heartbeats stop (a few seconds): promote again then"
        }
        return nil
    }

    /// What a site kept of its last time as a primary (its `primary.meta` and journal, left in
    /// place by `ferry demote`): when it is promoted again with its image still exactly where it
    /// stepped down, its peers start from what it knew they lacked, not from a full copy.
    public struct FormerPrimary: Sendable {
        public var generation: UInt64
        public var metadata: PrimaryVolume.Metadata
        public var journal: [JournalEntry]
        public var extentSize: UInt64

        public init(generation: UInt64, metadata: PrimaryVolume.Metadata, journal: [JournalEntry], extentSize: UInt64 = 4 << 20) {
            self.generation = generation
            self.metadata = metadata
            self.journal = journal
            self.extentSize = extentSize
        }
    }

    /// What a promotion starts from: the new epoch, the history with the new generation branching
    /// where the replica's image is, and the primary's first metadata.
    public struct Promotion: Sendable, Equatable {
        public var epoch: UInt64
        public var history: [GenerationRecord]
        public var metadata: PrimaryVolume.Metadata
    }

    /// The epoch a promotion of the site at `siteIndex` (its place among the volume's
    /// `siteCount` sites, sorted by name) takes, when the newest epoch it knows of is `seen`:
    /// the next above it that is this site's own (`epoch % siteCount == siteIndex`), and never 1
    /// (the first primary's). Two sites promoted while they cannot see each other thus never
    /// share an epoch (P4: one writer per epoch, without a witness to ask).
    public static func nextEpoch(after seen: UInt64, siteIndex: Int, siteCount: Int) -> UInt64 {
        let count = UInt64(max(1, siteCount)), index = UInt64(max(0, siteIndex)) % count
        var epoch = max(seen, 1) + 1
        epoch += (index + count - epoch % count) % count
        return epoch
    }

    /// A replica at `position` becomes the primary in generation `generation` (random, non-zero).
    /// `recordedEpoch` and `recordedHistory` are what the site's catalog holds for the volume;
    /// `followed` is the site it replicated from, when that site holds the same image up to the
    /// branch (it then starts with a clean bitmap: failback sends only what differs); every other
    /// peer starts from a full copy.
    /// `siteIndex` and `siteCount`: see ``nextEpoch(after:siteIndex:siteCount:)``.
    /// After a roll-back to a recovery point, `rolledBack` is what it rewrote and `lineBefore`
    /// the line the image was on before it (``ReplicaPosition/lineage``): when the point lies on
    /// that line, the new generation replaces the rest of it (HistoryDecision, "rewound").
    /// `formerPrimary`: see ``FormerPrimary`` (used only when the image is still at the state
    /// that site stepped down at: its generation, consistent at its last sequence, not rolled back).
    /// `writes`: the replica's ``WriteMap`` (``ReplicaVolume/writes``): the new primary's
    /// `lastWrites` start from it, so a third site on the line is sent what changed, not a full copy.
    public static func promotion(position: ReplicaPosition, generation: UInt64, recordedEpoch: UInt64,
                                 recordedHistory: [GenerationRecord], volumeSize: UInt64, regionSize: UInt64,
                                 followed: String?, siteIndex: Int, siteCount: Int, rolledBack: [BlockRange] = [],
                                 lineBefore: [GenerationRecord]? = nil, formerPrimary: FormerPrimary? = nil,
                                 writes: WriteMap? = nil) -> Promotion {
        promotion(position: position, generation: generation, recordedEpoch: recordedEpoch, recordedHistory: recordedHistory,
                  volumeSize: volumeSize, regionSize: regionSize, followed: followed, siteIndex: siteIndex, siteCount: siteCount,
                  plantedBug: nil, rolledBack: rolledBack, lineBefore: lineBefore, formerPrimary: formerPrimary, writes: writes)
    }

    static func promotion(position: ReplicaPosition, generation: UInt64, recordedEpoch: UInt64, recordedHistory: [GenerationRecord],
                          volumeSize: UInt64, regionSize: UInt64, followed: String?, siteIndex: Int, siteCount: Int,
                          plantedBug: PlantedBug?, rolledBack: [BlockRange] = [], lineBefore: [GenerationRecord]? = nil,
                          formerPrimary: FormerPrimary? = nil, writes: WriteMap? = nil) -> Promotion {
        let seen = max(recordedEpoch, position.epoch)
        let epoch = plantedBug == .promoteWithoutNewEpoch ? seen : nextEpoch(after: seen, siteIndex: siteIndex, siteCount: siteCount)
        // The line of history the image is on: as its primary sent it, else as recorded here,
        // ending with the image's generation (a replica that has received anything, even a
        // forced one mid initial sync, branches from the line it was receiving).
        var history = position.lineage ?? recordedHistory
        if let i = history.lastIndex(where: { $0.id == position.generation }) {
            history = Array(history[...i])
        } else if history.isEmpty, position.generation != 0 {
            history.append(GenerationRecord(id: position.generation, epoch: position.epoch, branchSeq: 0))
        }
        if let before = lineBefore, before.count > history.count, Array(before.prefix(history.count)) == history,
           VolumeHistory(generations: before, appliedSeq: .max).reach(in: position.generation).map({ position.appliedSeq <= $0 }) == true {
            // Rolled back to a point on the line the image was on, before one or more generations
            // of it began: the new generation replaces them (it branches below their start), so
            // their primary gives way to it when it returns, as to any newer promotion, instead of
            // undoing the roll-back because this site has not written yet.
            history = before
        }
        history.append(GenerationRecord(id: generation, epoch: epoch, branchSeq: position.appliedSeq))
        var peers: [String: PrimaryVolume.Metadata.Peer] = [:]
        var lastWrites = [position.appliedSeq]
        var coverLine = false
        if let writes, position.consistent, position.initialized, writes.volumeSize == volumeSize, !writes.last.isEmpty {
            // What the replica saw written where. A granule it cannot date (since a restart, or
            // put back by a roll-back) counts as written just above the branch: it goes to any
            // site behind, and is not taken for this site's own writes when it gives way.
            lastWrites = writes.last.map { $0 == WriteMap.unknown ? position.appliedSeq + 1 : $0 }
            coverLine = true
        }
        if let followed, position.consistent, position.initialized {
            // Clean, except what a roll-back (`promote --at`, or out of a catch-up) put back: the
            // followed site holds the newer bytes there, which it may not know it must lose (a
            // demoted site's needs do not name them).
            var bitmap = DirtyBitmap(volumeSize: volumeSize, regionSize: regionSize)
            if plantedBug != .rollbackNotResent { for range in rolledBack { _ = bitmap.set(range) } }
            peers[followed] = PrimaryVolume.Metadata.Peer(dirtyWords: bitmap.words, initialSyncPending: false, lastPoint: nil)
        }
        if let former = formerPrimary, former.generation == position.generation, position.consistent, position.initialized,
           position.appliedSeq == former.metadata.lastSeq, rolledBack.isEmpty,
           former.metadata.regionSize == regionSize || former.metadata.regionSize == 0 {
            // `ferry demote` undone: this image is the state the site stepped down at, so each peer
            // lacks what it lacked then: its bitmap, plus (as after a crash) the activity log's
            // extents and, for a peer streamed from the journal, every write the journal holds.
            let active = former.metadata.activityLog.map { extent -> BlockRange in
                let start = UInt64(extent) * former.extentSize
                return BlockRange(offset: start, length: start < volumeSize ? min(former.extentSize, volumeSize - start) : 0)
            }
            for (name, saved) in former.metadata.peers where peers[name] == nil {
                var bitmap = DirtyBitmap(volumeSize: volumeSize, regionSize: regionSize, words: saved.dirtyWords)
                let journaled = saved.journaled ? former.journal.filter { !$0.isBarrier && $0.seq > saved.ackedSeq ?? 0 }.map(\.range) : []
                for range in active + journaled where range.length > 0 && plantedBug != .demoteUndoneFromBitmapsOnly {
                    _ = bitmap.set(range)
                }
                peers[name] = PrimaryVolume.Metadata.Peer(dirtyWords: bitmap.words, initialSyncPending: saved.initialSyncPending,
                                                          lastPoint: saved.lastPoint)
            }
            // Sequences go on along the same line: what it wrote where is still known, so a later
            // give-way keeps aside only granules written after the branch, not the whole volume.
            if let writes = former.metadata.lastWrites, !writes.isEmpty {
                lastWrites = writes
                coverLine = former.metadata.lastWritesCoverLine && writes.count > 1
            }
        }
        // Sequences continue above what this replica applied. What this site will have written
        // itself starts there: a site that later gives way to a line branching from this
        // generation keeps aside only its own writes after the branch, not the whole image
        // (an operator walk-through found 28 MiB of a 32 MiB volume kept aside for 64 KiB).
        let metadata = PrimaryVolume.Metadata(peers: peers, lastSeq: position.appliedSeq, sequenceCeiling: position.appliedSeq,
                                              regionSize: regionSize, lastWrites: lastWrites, lastWritesCoverLine: coverLine)
        return Promotion(epoch: epoch, history: history, metadata: metadata)
    }

    /// What a primary that steps down keeps: its history, and the replica position it starts
    /// from (consistent only after a plain `ferry demote` of an idle volume: its own last state).
    public struct Demotion: Sendable, Equatable {
        public var history: [GenerationRecord]
        public var position: ReplicaPosition
    }

    /// The primary at `epoch` in `generation` (with `recordedHistory` from its catalog) becomes a
    /// secondary. `plan` nil is `ferry demote`; otherwise it gives way to `plan.peer` and its
    /// position names the generation both share. `keptAside`: the ranges it set aside, which the
    /// next primary must overwrite (its `needs`; a full copy when the list is too long).
    /// `idleAt`: for `ferry demote`, the sequence the flushed image is exactly at when nothing was
    /// in flight (``PrimaryVolume/idleSequence``): the position is then consistent there, so the
    /// demote can be undone by promoting this site again without --force. A site that gives way
    /// (`plan`) holds bytes of a line the other replaced: never consistent until caught up.
    public static func demotion(epoch: UInt64, generation: UInt64, recordedHistory: [GenerationRecord], plan: Rejoin?,
                                keptAside: [BlockRange], idleAt: UInt64? = nil) -> Demotion {
        demotion(epoch: epoch, generation: generation, recordedHistory: recordedHistory, plan: plan, keptAside: keptAside,
                 idleAt: idleAt, plantedBug: nil)
    }

    static func demotion(epoch: UInt64, generation: UInt64, recordedHistory: [GenerationRecord], plan: Rejoin?,
                         keptAside: [BlockRange], idleAt: UInt64? = nil, plantedBug: PlantedBug?) -> Demotion {
        if let plan, plan.common == nil {
            // No history in common: the image is all kept aside and replaced by a full copy.
            return Demotion(history: [], position: ReplicaPosition(epoch: plan.peerEpoch))
        }
        var history = plan?.history ?? recordedHistory
        if history.isEmpty { history.append(GenerationRecord(id: generation, epoch: max(1, epoch), branchSeq: 0)) }
        let needs = plantedBug == .rejoinWithoutNeeds ? [] : keptAside
        let fits = needs.count <= ReplicaPosition.maxNeeds
        let consistentAt = plan == nil && fits ? idleAt : nil
        let position = ReplicaPosition(epoch: plan?.peerEpoch ?? max(1, epoch), generation: plan?.common?.id ?? generation,
                                       appliedSeq: consistentAt ?? 0, consistent: consistentAt != nil, initialized: fits,
                                       needs: fits && !needs.isEmpty ? needs : nil, lineage: history)
        return Demotion(history: history, position: position)
    }
}
