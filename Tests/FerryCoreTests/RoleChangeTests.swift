import Testing
@testable import FerryCore

/// The rules of a role change that the daemon and the simulation share (``RoleChange``).
struct RoleChangeTests {
    static let g1 = GenerationRecord(id: 0x11, epoch: 1, branchSeq: 0)
    static let g2 = GenerationRecord(id: 0x22, epoch: 3, branchSeq: 40)

    @Test func epochsOfDifferentSitesNeverCollideAndAlwaysGrow() {
        for count in 1...5 {
            var taken: [UInt64: Int] = [:]
            for seen in UInt64(0)...60 {
                for index in 0..<count {
                    let epoch = RoleChange.nextEpoch(after: seen, siteIndex: index, siteCount: count)
                    #expect(epoch > max(seen, 1), "site \(index)/\(count) after \(seen) took \(epoch)")
                    #expect(epoch % UInt64(count) == UInt64(index), "site \(index)/\(count) took \(epoch), not its own")
                    #expect(epoch - max(seen, 1) <= UInt64(count), "site \(index)/\(count) skipped too far: \(seen) → \(epoch)")
                    if let other = taken[epoch] { #expect(other == index, "sites \(other) and \(index) of \(count) both take \(epoch)") }
                    taken[epoch] = index
                }
            }
        }
        // The two-site volume of the runbooks: west (index 1) first promotes to 3, east back to 4.
        #expect(RoleChange.nextEpoch(after: 1, siteIndex: 1, siteCount: 2) == 3)
        #expect(RoleChange.nextEpoch(after: 3, siteIndex: 0, siteCount: 2) == 4)
    }

    @Test func aPromotionBranchesFromTheLineTheImageIsOn() {
        // Recorded here: an older line (this site was primary of 0x33 once); the image now
        // follows g2, as its primary's open said.
        let recorded = [Self.g1, GenerationRecord(id: 0x33, epoch: 2, branchSeq: 30)]
        let position = ReplicaPosition(epoch: 3, generation: 0x22, appliedSeq: 90, consistent: true, initialized: true,
                                       lineage: [Self.g1, Self.g2])
        let p = RoleChange.promotion(position: position, generation: 0x44, recordedEpoch: 2, recordedHistory: recorded,
                                     volumeSize: 1 << 20, regionSize: 4096, followed: "east", siteIndex: 0, siteCount: 2)
        #expect(p.history == [Self.g1, Self.g2, GenerationRecord(id: 0x44, epoch: 4, branchSeq: 90)])
        #expect(p.epoch == 4)
        #expect(p.metadata.lastSeq == 90 && p.metadata.sequenceCeiling == 90)
        #expect(p.metadata.peers["east"]?.initialSyncPending == false, "the followed site starts with a clean bitmap")
    }

    @Test func aForcedPromotionMidInitialSyncStaysOnTheLineItWasReceiving() {
        // Never consistent, but the catch-up of g1 had begun: the new line descends from g1, so the
        // former primary gives way (keeping its writes aside) instead of meeting an unrelated volume.
        let position = ReplicaPosition(epoch: 1, generation: 0x11, appliedSeq: 0, lineage: [Self.g1])
        let p = RoleChange.promotion(position: position, generation: 0x55, recordedEpoch: 1, recordedHistory: [],
                                     volumeSize: 1 << 20, regionSize: 4096, followed: nil, siteIndex: 1, siteCount: 2)
        #expect(p.history == [Self.g1, GenerationRecord(id: 0x55, epoch: 3, branchSeq: 0)])
        #expect(p.metadata.peers.isEmpty, "no peer starts clean from an inconsistent image")
        let returning = VolumeHistory(generations: [Self.g1], appliedSeq: 500)
        #expect(HistoryDecision.decide(local: returning, peer: VolumeHistory(generations: p.history, appliedSeq: 0))
                == .diverged(keep: .peer, branchSeq: 0))
        // A replica that never received anything starts a line of its own.
        let empty = RoleChange.promotion(position: .empty, generation: 0x66, recordedEpoch: 1, recordedHistory: [],
                                         volumeSize: 1 << 20, regionSize: 4096, followed: nil, siteIndex: 1, siteCount: 2)
        #expect(empty.history == [GenerationRecord(id: 0x66, epoch: 3, branchSeq: 0)])
    }

    @Test func aDemotionNamesTheSharedGenerationAndWhatMustBeOverwritten() {
        let plan = Rejoin(peer: "west", common: Self.g1, history: [Self.g1], peerEpoch: 3, reason: "test")
        let kept = [BlockRange(offset: 0, length: 4096)]
        let d = RoleChange.demotion(epoch: 1, generation: 0x11, recordedHistory: [], plan: plan, keptAside: kept)
        #expect(d.position == ReplicaPosition(epoch: 3, generation: 0x11, appliedSeq: 0, consistent: false, initialized: true,
                                              needs: kept, lineage: [Self.g1]))
        let plain = RoleChange.demotion(epoch: 4, generation: 0x44, recordedHistory: [], plan: nil, keptAside: [])
        #expect(plain.history == [GenerationRecord(id: 0x44, epoch: 4, branchSeq: 0)] && plain.position.needs == nil)
        // Too many ranges to carry: a full copy instead.
        let many = (0..<(ReplicaPosition.maxNeeds + 1)).map { BlockRange(offset: UInt64($0) * 8192, length: 4096) }
        #expect(!RoleChange.demotion(epoch: 4, generation: 0x44, recordedHistory: [], plan: nil, keptAside: many).position.initialized)
    }

    @Test func aSiteThatGivesWayKeepsAsideWhatItWroteAfterTheOtherLineBranchedEvenIfPeersAckedIt() {
        // East wrote at sequences 1...20 into extents 0...19; every peer acknowledged everything.
        var config = PrimaryVolume.Config(volume: "vm1", volumeSize: 32 << 20, epoch: 1, generation: 0x11,
                                          peers: ["west": ReplicaPolicy(mode: .sync)])
        config.extentSize = 1 << 20
        config.regionSize = 4096
        let now = Instant(monotonicNanos: 0, wallSeconds: 0)
        var east = PrimaryVolume(config: config, metadata: .init(peers: ["west": .init(dirtyWords: [], initialSyncPending: false, lastPoint: nil)]),
                                 cleanShutdown: true, journal: [], now: now)
        for i in 0..<20 { _ = east.submit(.write(BlockRange(offset: UInt64(i) << 20, length: 4096), fua: false), now: now) }
        east.peers["west"]!.dirty = DirtyBitmap(volumeSize: config.volumeSize, regionSize: config.regionSize)   // all acknowledged
        // West's line left generation 0x11 at sequence 15: what east wrote after it (16...20) is kept aside.
        let plan = Rejoin(peer: "west", common: Self.g1, history: [Self.g1], peerEpoch: 3, reason: "test", keepWrittenAfter: 15)
        let kept = east.rangesToKeepAside(plan: plan, keepAsideFor: nil)
        #expect(kept == [BlockRange(offset: 15 << 20, length: 5 << 20)], "\(kept)")
    }

    /// A copy under way resumes only on a replica that still records this primary's generation
    /// (it records it at the copy's first barrier, before any block lands). One that answers
    /// with another generation took blocks from another primary meanwhile, even if it never
    /// finished a copy from it: the copy starts over (failover simulation, seed 900753).
    @Test func aCopyUnderWayStartsOverOnAReplicaThatFollowedAnotherPrimaryMeanwhile() {
        func reopened(answering position: ReplicaPosition) -> DirtyBitmap {
            let config = PrimaryVolume.Config(volume: "vm1", volumeSize: 1 << 20, epoch: 4, generation: 0xF,
                                              peers: ["west": ReplicaPolicy(mode: .async)])
            let now = Instant(monotonicNanos: 0, wallSeconds: 0)
            // The copy to west had sent everything but its last region before the link went down.
            let regions = Int(config.volumeSize / config.regionSize)
            var words = [UInt64](repeating: 0, count: (regions + 63) / 64)
            words[(regions - 1) / 64] = 1 << UInt64((regions - 1) % 64)
            var east = PrimaryVolume(config: config, metadata: .init(peers: ["west": .init(dirtyWords: words, initialSyncPending: true, lastPoint: nil)]),
                                     cleanShutdown: true, journal: [], now: now)
            _ = east.linkUp(peer: "west", link: LinkID(7), now: now)
            _ = east.received(.position(position), peer: "west", link: LinkID(7), now: now)
            return east.peers["west"]!.dirty
        }
        let resumed = reopened(answering: ReplicaPosition(epoch: 4, generation: 0xF, appliedSeq: 0))
        #expect(resumed.count == 1)
        let elsewhere = reopened(answering: ReplicaPosition(epoch: 4, generation: 0xE, appliedSeq: 0))
        #expect(elsewhere.count == elsewhere.regionCount)
    }

    /// `ferry demote` of an idle volume leaves a consistent image at the primary's last sequence,
    /// so promoting the same site again needs no force; its replicas start from what it knew
    /// they lacked (bitmap, activity log, and the journal for a peer streamed from it), and only
    /// while the image is still where it stepped down.
    @Test func aDemoteIsUndoneWithoutForceAndWithoutAFullCopy() {
        let idle = RoleChange.demotion(epoch: 2, generation: 0x22, recordedHistory: [Self.g1], plan: nil, keptAside: [], idleAt: 40)
        #expect(idle.position.consistent && idle.position.appliedSeq == 40 && idle.position.generation == 0x22)
        #expect(RoleChange.promotionRefusal(volume: "vm1", position: idle.position, force: false, streamingPrimary: nil) == nil)
        let busy = RoleChange.demotion(epoch: 2, generation: 0x22, recordedHistory: [Self.g1], plan: nil, keptAside: [], idleAt: nil)
        #expect(!busy.position.consistent)
        let givingWay = RoleChange.demotion(epoch: 2, generation: 0x22, recordedHistory: [Self.g1],
                                            plan: Rejoin(peer: "west", common: Self.g1, history: [Self.g1], peerEpoch: 3, reason: "test"),
                                            keptAside: [], idleAt: 40)
        #expect(!givingWay.position.consistent, "a site that gives way holds another line's bytes")

        let volumeSize: UInt64 = 64 << 20, regionSize: UInt64 = 64 << 10
        var westDirty = DirtyBitmap(volumeSize: volumeSize, regionSize: regionSize)
        _ = westDirty.set(BlockRange(offset: 0, length: 4096))
        let saved = PrimaryVolume.Metadata(activityLog: [3], peers: [
            "west": .init(dirtyWords: westDirty.words, initialSyncPending: false, lastPoint: nil),
            "far": .init(dirtyWords: [], initialSyncPending: false, lastPoint: nil, journaled: true, ackedSeq: 30),
        ], lastSeq: 40, sequenceCeiling: 40, regionSize: regionSize, lastWrites: (0..<16).map { UInt64($0 * 2) })
        // Far had acknowledged through 30: the entry at 20 it holds, the one at 39 it lacks.
        let journal = [JournalEntry(seq: 20, range: BlockRange(offset: 40 << 20, length: 4096), isZero: false, isBarrier: false, atNanos: 0),
                       JournalEntry(seq: 39, range: BlockRange(offset: 32 << 20, length: 4096), isZero: false, isBarrier: false, atNanos: 0)]
        let former = RoleChange.FormerPrimary(generation: 0x22, metadata: saved, journal: journal, extentSize: 4 << 20)
        func promoted(_ position: ReplicaPosition) -> RoleChange.Promotion {
            RoleChange.promotion(position: position, generation: 0x33, recordedEpoch: 2, recordedHistory: idle.history,
                                 volumeSize: volumeSize, regionSize: regionSize, followed: nil, siteIndex: 0, siteCount: 3,
                                 formerPrimary: former)
        }
        let again = promoted(idle.position)
        func dirty(_ peer: String) -> DirtyBitmap? {
            again.metadata.peers[peer].map { DirtyBitmap(volumeSize: volumeSize, regionSize: regionSize, words: $0.dirtyWords) }
        }
        // What it wrote where is kept too (a later give-way sets aside only what it wrote after).
        #expect(again.metadata.lastWrites == saved.lastWrites)
        let extent3 = BlockRange(offset: 12 << 20, length: 4 << 20)
        #expect(dirty("west")?.contains(0) == true && dirty("west")?.count == 1 + Int(extent3.length / regionSize))
        #expect(dirty("far")?.count == 1 + Int(extent3.length / regionSize) && dirty("far")?.contains(Int((32 << 20) / regionSize)) == true)
        // Moved since (it followed another primary, or was rolled back): a full copy, as before.
        var moved = idle.position
        moved.appliedSeq = 41
        #expect(promoted(moved).metadata.peers.isEmpty)
    }

    /// A peer's lag in seconds goes on over a restart of its primary (the bitmap's age is stored
    /// by the wall clock), rather than starting again from 0 at the restart.
    @Test func aPeersLagInSecondsSurvivesARestartOfItsPrimary() {
        let config = PrimaryVolume.Config(volume: "vm1", volumeSize: 1 << 20, epoch: 1, generation: 1,
                                          peers: ["west": ReplicaPolicy(mode: .sync)])
        let before = Instant(monotonicNanos: 5_000_000_000, wallSeconds: 1_800_000_000)
        var words = [UInt64](repeating: 0, count: 1)
        words[0] = 1
        let saved = PrimaryVolume.Metadata(peers: ["west": .init(dirtyWords: words, initialSyncPending: false, lastPoint: nil,
                                                                 dirtySince: 1_800_000_000 - 100)],
                                           regionSize: config.regionSize)
        let east = PrimaryVolume(config: config, metadata: saved, cleanShutdown: true, journal: [], now: before)
        let lag = east.status(now: before).first { $0.peer == "west" }?.lagSeconds ?? 0
        #expect(lag >= 99 && lag <= 101, "\(lag)")
        // And stored again as it was.
        let again = east.metadataForShutdown().peers["west"]?.dirtySince ?? 0
        #expect(abs(again - (1_800_000_000 - 100)) < 1.5, "\(again)")
    }

    /// A third site after a move: west (sync) is promoted; far (async) holds an older state of
    /// the same line. The new primary sends far the granules written since far's sequence (what
    /// west received before its promotion, and what it wrote since), plus the late writes far
    /// names (also one that was ahead of west), not a full copy; and a full copy whenever that
    /// cannot be known.
    @Test func aThirdSiteOnTheLineGetsWhatChangedSinceItsStateNotAFullCopy() {
        let size: UInt64 = 64 << 20, region: UInt64 = 64 << 10, granule: UInt64 = 4 << 20
        let link = LinkID(1)
        func g(_ i: UInt64) -> BlockRange { BlockRange(offset: i * granule + 8192, length: 4096) }
        func write(_ index: UInt64, _ seq: UInt64, _ range: BlockRange) -> ReplicationMessage {
            .write(ReplicationItem(epoch: 1, index: index, seq: seq, range: range, isZero: false))
        }
        func flush(_ index: UInt64, _ seq: UInt64) -> ReplicationMessage {
            .barrier(ReplicationBarrier(epoch: 1, index: index, seq: seq, kind: .flush))
        }
        // The position a replica tells a primary that opens on `link`, and what it kept aside first.
        func answer(_ replica: inout ReplicaVolume, _ open: VolumeOpen, on link: LinkID) -> (ReplicaPosition?, kept: [BlockRange]) {
            var actions = replica.received(.open(open), on: link)
            var kept: [BlockRange] = []
            for case .keepAside(let l, let ranges, _) in actions {
                kept = ranges
                actions += replica.keptAside(link: l)
            }
            for case .send(_, .position(let p)) in actions { return (p, kept) }
            return (nil, kept)
        }
        let start = ReplicaPosition(epoch: 1, generation: 0x11, appliedSeq: 10, consistent: true, initialized: true)
        let fromEast = VolumeOpen(volume: "vm1", epoch: 1, generation: 0x11, volumeSize: size, mode: .sync, history: [Self.g1])
        // West (as after a restart: it cannot date anything yet) follows east: writes 11, 12,
        // a flush at 12, then 13, which lands past its last barrier.
        var west = ReplicaVolume(volume: "vm1", position: start)
        _ = west.received(.open(fromEast), on: link)
        #expect(west.writes?.hasUnknown == true)
        for message in [flush(1, 10), write(2, 11, g(2)), write(3, 12, g(5)), flush(4, 12), write(5, 13, g(7))] {
            _ = west.received(message, on: link)
        }
        _ = west.flushed(link: link, index: 4)
        #expect(west.position.appliedSeq == 12 && west.writes?.hasUnknown == false)
        // Far follows east as far as its flush at 11, and got 12, 13 and 14 (which west never
        // got: east went down) after that barrier.
        var far = ReplicaVolume(volume: "vm1", position: start)
        _ = far.received(.open(fromEast), on: link)
        for message in [flush(1, 10), write(2, 11, g(2)), flush(3, 11), write(4, 12, g(5)), write(5, 13, g(7)), write(6, 14, g(9))] {
            _ = far.received(message, on: link)
        }
        _ = far.flushed(link: link, index: 3)
        _ = far.linkDown(link)

        let plan = RoleChange.promotion(position: west.position, generation: 0x33, recordedEpoch: 1, recordedHistory: [Self.g1],
                                        volumeSize: size, regionSize: region, followed: "east", siteIndex: 2, siteCount: 3,
                                        writes: west.writes)
        #expect(plan.metadata.lastWritesCoverLine)
        var config = PrimaryVolume.Config(volume: "vm1", volumeSize: size, epoch: plan.epoch, generation: 0x33,
                                          peers: ["east": ReplicaPolicy(mode: .sync), "far": ReplicaPolicy(mode: .async)])
        config.regionSize = region
        config.history = plan.history
        let now = Instant(monotonicNanos: 0, wallSeconds: 0)
        func dirtyFor(_ position: ReplicaPosition, metadata: PrimaryVolume.Metadata = plan.metadata) -> (DirtyBitmap, Bool) {
            var primary = PrimaryVolume(config: config, metadata: metadata, cleanShutdown: true, journal: [], now: now)
            _ = primary.linkUp(peer: "far", link: LinkID(9), now: now)
            _ = primary.received(.position(position), peer: "far", link: LinkID(9), now: now)
            return (primary.peers["far"]!.dirty, primary.peers["far"]!.initialSyncPending)
        }
        let open = VolumeOpen(volume: "vm1", epoch: plan.epoch, generation: 0x33, volumeSize: size, mode: .async, history: plan.history)
        let (told, farKept) = answer(&far, open, on: LinkID(2))
        guard let farPosition = told else { Issue.record("far told no position"); return }
        #expect(farPosition.needsComplete == true && farPosition.needs == [5, 7, 9].map { BlockRange(offset: $0 * granule, length: granule) })
        // What it holds past the branch (13 and 14) is kept aside before anything is overwritten (P6).
        #expect(farKept == [7, 9].map { BlockRange(offset: $0 * granule, length: granule) })
        let (dirty, initial) = dirtyFor(farPosition)
        let perGranule = Int(granule / region)
        #expect(!initial)
        #expect(dirty.count == 3 * perGranule, "granules 5 and 7 (written after 11), and 9 (a late write only far has): \(dirty.count / perGranule)")
        for i in [5, 7, 9] { #expect(dirty.contains(i * perGranule)) }
        #expect(!dirty.contains(2 * perGranule), "far has the write at 11")

        // A full copy whenever it cannot be known what far lacks.
        var unsure = farPosition
        unsure.needsComplete = nil
        #expect(dirtyFor(unsure).1, "a replica that cannot date its image")
        // A replica that was ahead of the promoted site (its flush at 14 came after west's last
        // barrier at 12) names what it holds past the branch: granules 7 and 9.
        var ahead = ReplicaVolume(volume: "vm1", position: start)
        _ = ahead.received(.open(fromEast), on: link)
        for message in [flush(1, 10), write(2, 11, g(2)), write(3, 12, g(5)), write(4, 13, g(7)), write(5, 14, g(9)), flush(6, 14)] {
            _ = ahead.received(message, on: link)
        }
        _ = ahead.flushed(link: link, index: 6)
        let (aheadTold, aheadKept) = answer(&ahead, open, on: LinkID(4))
        guard let aheadPosition = aheadTold else { Issue.record("no position"); return }
        #expect(aheadPosition.appliedSeq == 14 && aheadPosition.needs == [7, 9].map { BlockRange(offset: $0 * granule, length: granule) })
        #expect(aheadKept == aheadPosition.needs ?? [])
        let (aheadDirty, aheadInitial) = dirtyFor(aheadPosition)
        #expect(!aheadInitial && aheadDirty.count == 2 * perGranule && aheadDirty.contains(7 * perGranule) && aheadDirty.contains(9 * perGranule))
        var elsewhere = farPosition
        elsewhere.generation = 0x44
        #expect(dirtyFor(elsewhere).1, "a replica of another line")
        var uncovered = plan.metadata
        uncovered.lastWritesCoverLine = false
        #expect(dirtyFor(farPosition, metadata: uncovered).1, "a primary whose last writes do not cover the line")
        // A replica that restarted cannot date its image until a barrier of its line: it says nothing.
        var restarted = ReplicaVolume(volume: "vm1", position: far.position)
        let (afterRestart, keptAfterRestart) = answer(&restarted, open, on: LinkID(3))
        #expect(afterRestart?.needsComplete == nil && keptAfterRestart.isEmpty)
        // Past the branch and unable to date its image: it keeps the whole image aside.
        var aheadRestarted = ReplicaVolume(volume: "vm1", position: ahead.position)
        #expect(answer(&aheadRestarted, open, on: LinkID(5)).kept == [BlockRange(offset: 0, length: size)])
    }

    /// P4: a replica that refuses a stale primary's stream tells it its position first, whose
    /// newer epoch fences that primary (seed 1600576: one promoted below an epoch its replicas had
    /// seen went on taking writes no site would take from it).
    @Test func aStalePrimaryRefusedByAReplicaLearnsTheNewerEpochAndIsFenced() {
        let now = Instant(monotonicNanos: 0, wallSeconds: 0)
        var replica = ReplicaVolume(volume: "vm1", position: ReplicaPosition(epoch: 18, generation: 0x11, appliedSeq: 10,
                                                                             consistent: true, initialized: true))
        let actions = replica.received(.open(VolumeOpen(volume: "vm1", epoch: 17, generation: 0x22, volumeSize: 1 << 20, mode: .sync)),
                                       on: LinkID(1))
        guard case .send(_, .position(let told))? = actions.first else { Issue.record("no position first: \(actions)"); return }
        #expect(told.epoch == 18)
        #expect(actions.contains { if case .refuse = $0 { true } else { false } })
        let config = PrimaryVolume.Config(volume: "vm1", volumeSize: 1 << 20, epoch: 17, generation: 0x22,
                                          peers: ["far": ReplicaPolicy(mode: .sync)])
        var primary = PrimaryVolume(config: config, metadata: .init(), cleanShutdown: true, journal: [], now: now)
        _ = primary.linkUp(peer: "far", link: LinkID(1), now: now)
        let out = primary.received(.position(told), peer: "far", link: LinkID(1), now: now)
        #expect(primary.isFenced && out.contains { if case .fence = $0 { true } else { false } })
    }

    /// A scheduled replica's map dates a point's regions once the point's barrier arrives, and
    /// not before: a point cut short (the primary moved while it was sending) never reached the
    /// image, so it leaves nothing undatable behind, and a new primary of the line sends what
    /// changed instead of a full copy (walk-through of 2026-12-07: 176 MiB instead of ~69).
    /// A stale answer from the replica that reaches this site once it is demoted closes nothing.
    @Test func aScheduledSiteCutShortMidPointIsStillDatable() {
        let size: UInt64 = 64 << 20, granule: UInt64 = 4 << 20
        let link = LinkID(1)
        func g(_ i: UInt64) -> BlockRange { BlockRange(offset: i * granule, length: 64 << 10) }
        func whole(_ i: UInt64) -> BlockRange { BlockRange(offset: i * granule, length: granule) }
        func region(_ index: UInt64, _ range: BlockRange) -> ReplicationMessage {
            .region(ReplicationItem(epoch: 1, index: index, seq: 0, range: range, isZero: false))
        }
        func barrier(_ index: UInt64, _ seq: UInt64, _ kind: BarrierKind) -> ReplicationMessage {
            .barrier(ReplicationBarrier(epoch: 1, index: index, seq: seq, kind: kind))
        }
        let start = ReplicaPosition(epoch: 1, generation: 0x11, appliedSeq: 10, consistent: true, initialized: true)
        var far = ReplicaVolume(volume: "vm1", position: start)
        _ = far.received(.open(VolumeOpen(volume: "vm1", epoch: 1, generation: 0x11, volumeSize: size, mode: .scheduled,
                                          history: [Self.g1])), on: link)
        // A first point (at 20) of granules 3 and 5 arrives whole; a second (at 30) is cut short
        // after granule 6's region.
        for message in [barrier(1, 10, .flush), region(2, g(3)), region(3, g(5)), barrier(4, 20, .point), region(5, g(6))] {
            let actions = far.received(message, on: link)
            #expect(!actions.contains { if case .refuse = $0 { true } else { false } }, "\(message): \(actions)")
        }
        #expect(far.writes?.hasUnknown == false)
        #expect(far.writes?.ranges(after: 10) == [whole(3), whole(5)], "the point's regions hold its state at 20; granule 6 is only in the log")
        _ = far.linkDown(link)
        #expect(far.writes?.hasUnknown == false)

        // West, promoted on the line (its branch at 25), opens: far names the granules of its
        // point, and says that is all, so west need not copy everything.
        let g2 = GenerationRecord(id: 0x33, epoch: 2, branchSeq: 25)
        let actions = far.received(.open(VolumeOpen(volume: "vm1", epoch: 2, generation: 0x33, volumeSize: size, mode: .scheduled,
                                                    history: [Self.g1, g2])), on: LinkID(2))
        guard case .send(_, .position(let told))? = actions.first(where: { if case .send(_, .position) = $0 { true } else { false } })
        else { Issue.record("far told no position: \(actions)"); return }
        #expect(told.needsComplete == true)
        #expect(told.needs == [whole(3), whole(5)])

        // Far's own answers to the stream of its former primary, arriving after that site was
        // demoted, are dropped; they do not refuse the stream of the primary it follows now.
        var demoted = ReplicaVolume(volume: "vm1", position: start)
        _ = demoted.received(.open(VolumeOpen(volume: "vm1", epoch: 2, generation: 0x33, volumeSize: size, mode: .sync,
                                              history: [Self.g1, g2])), on: LinkID(7))
        #expect(demoted.received(.ack(level: .written, index: 4), on: LinkID(8)).isEmpty)
        #expect(demoted.received(.position(start), on: LinkID(8)).isEmpty)
        #expect(demoted.received(.ack(level: .written, index: 4), on: LinkID(7)).contains { if case .refuse = $0 { true } else { false } },
                "from the primary it follows, an answer is still a protocol error")
    }
}
