import FerryCore
import Testing

/// Two primaries of one volume meet (PrimaryVolume+Rivals): each reads the other's `open`, both
/// reach the same verdict from ``HistoryDecision``, and only the side whose line of history was
/// replaced gives way; a split brain moves nothing until `ferry resolve`.
struct RivalPrimaryTests {
    static let a = GenerationRecord(id: 0xA, epoch: 1, branchSeq: 0)
    static let now = Instant(monotonicNanos: 1_000_000_000, wallSeconds: 1_800_000_000)

    /// A primary of `vm1` at `history` (its last generation current) whose image is at `applied`,
    /// replicating synchronously to `peer`.
    static func primary(_ history: [GenerationRecord], applied: UInt64, peer: String) -> PrimaryVolume {
        let current = history.last!
        var config = PrimaryVolume.Config(volume: "vm1", volumeSize: 64 << 20, epoch: current.epoch, generation: current.id,
                                          peers: [peer: ReplicaPolicy(mode: .sync)])
        config.history = history
        return PrimaryVolume(config: config, metadata: PrimaryVolume.Metadata(lastSeq: applied, sequenceCeiling: applied),
                             cleanShutdown: true, journal: [], now: now)
    }

    /// The `open` a machine sends when its link to `peer` comes up.
    static func open(_ machine: inout PrimaryVolume, to peer: String, link: LinkID) throws -> VolumeOpen {
        let sent = machine.linkUp(peer: peer, link: link, now: now).compactMap { action -> VolumeOpen? in
            if case .send(_, _, .open(let open)) = action { return open }
            return nil
        }
        return try #require(sent.first)
    }

    /// Both sides exchange opens; returns what each did with the other's.
    static func meet(_ east: inout PrimaryVolume, _ west: inout PrimaryVolume) throws -> (east: [PrimaryVolume.Action], west: [PrimaryVolume.Action]) {
        let link = LinkID(1)
        let fromEast = try open(&east, to: "west", link: link)
        let fromWest = try open(&west, to: "east", link: link)
        return (east.received(.open(fromWest), peer: "west", link: link, now: now),
                west.received(.open(fromEast), peer: "east", link: link, now: now))
    }

    static func rejoin(_ actions: [PrimaryVolume.Action]) -> Rejoin? {
        actions.lazy.compactMap { if case .rejoin(let plan) = $0 { return plan } else { return nil } }.first
    }

    static func fenced(_ actions: [PrimaryVolume.Action]) -> Bool {
        actions.contains { if case .fence = $0 { return true } else { return false } }
    }

    static func state(_ actions: [PrimaryVolume.Action]) -> ReplicaLinkState? {
        actions.lazy.compactMap { if case .stateChanged(_, let state, _) = $0 { return state } else { return nil } }.last
    }

    @Test func aFormerPrimaryGivesWayToThePromotedSiteAndNamesTheGenerationTheyShare() throws {
        // East wrote up to 120 in A; west was promoted at 100 (B, epoch 2) and wrote since.
        var east = Self.primary([Self.a], applied: 120, peer: "west")
        let b = GenerationRecord(id: 0xB, epoch: 2, branchSeq: 100)
        var west = Self.primary([Self.a, b], applied: 130, peer: "east")
        let (eastDid, westDid) = try Self.meet(&east, &west)

        #expect(Self.fenced(eastDid), "east kept taking writes after meeting a newer line of history")
        #expect(east.isFenced)
        let plan = try #require(Self.rejoin(eastDid))
        #expect(plan.peer == "west" && plan.common == Self.a && plan.history == [Self.a] && plan.peerEpoch == 2)
        #expect(!Self.fenced(westDid) && Self.rejoin(westDid) == nil && !west.isFenced, "the promoted site gave way")
        #expect(west.rivals.isEmpty && east.rivals.isEmpty)
    }

    @Test func aSitePromotedThatWroteNothingGivesWayEvenWithTheNewerEpoch() throws {
        // Both were promoted from A at 100; east (epoch 3) took no write, west (epoch 2) did: west stands.
        var east = Self.primary([Self.a, GenerationRecord(id: 0xC, epoch: 3, branchSeq: 100)], applied: 100, peer: "west")
        var west = Self.primary([Self.a, GenerationRecord(id: 0xB, epoch: 2, branchSeq: 100)], applied: 130, peer: "east")
        let (eastDid, westDid) = try Self.meet(&east, &west)
        let plan = try #require(Self.rejoin(eastDid))
        // East's position will carry west's epoch, so west's stream is not refused as stale.
        #expect(plan.peer == "west" && plan.common == Self.a && plan.history == [Self.a] && plan.peerEpoch == 2)
        #expect(Self.rejoin(westDid) == nil && !west.isFenced)
    }

    @Test func theNewestPromotionStandsOverAFormerPrimaryThatWroteOn() throws {
        // West was promoted (epoch 2) and wrote nothing yet; east, its former primary, wrote on in A.
        var east = Self.primary([Self.a], applied: 120, peer: "west")
        var west = Self.primary([Self.a, GenerationRecord(id: 0xB, epoch: 2, branchSeq: 100)], applied: 100, peer: "east")
        let (eastDid, westDid) = try Self.meet(&east, &west)
        let plan = try #require(Self.rejoin(eastDid))
        #expect(plan.peer == "west" && plan.common == Self.a && Self.fenced(eastDid))
        #expect(Self.rejoin(westDid) == nil && !west.isFenced)
    }

    @Test func aPromotionAtAnOlderGenerationsPointStandsOverThePrimaryItRolledBack() throws {
        // East was promoted at 100 (B, epoch 2) and wrote on to 150 (encrypted by ransomware);
        // west, which followed it, was promoted at a recovery point of A's at 60 (`promote --at`,
        // C, epoch 3) and has written nothing yet. The roll-back stands: east gives way and sets
        // aside what it wrote after 60; west's line keeps B, the generation it replaced.
        let b = GenerationRecord(id: 0xB, epoch: 2, branchSeq: 100), c = GenerationRecord(id: 0xC, epoch: 3, branchSeq: 60)
        let promoted = RoleChange.promotion(position: ReplicaPosition(epoch: 2, generation: Self.a.id, appliedSeq: 60, consistent: true,
                                                                      initialized: true, lineage: [Self.a]),
                                            generation: c.id, recordedEpoch: 2, recordedHistory: [Self.a, b], volumeSize: 64 << 20,
                                            regionSize: 64 << 10, followed: "east", siteIndex: 1, siteCount: 2,
                                            rolledBack: [BlockRange(offset: 0, length: 4096)], lineBefore: [Self.a, b])
        #expect(promoted.history == [Self.a, b, c])
        var east = Self.primary([Self.a, b], applied: 150, peer: "west")
        var west = Self.primary(promoted.history, applied: 60, peer: "east")
        let (eastDid, westDid) = try Self.meet(&east, &west)
        let plan = try #require(Self.rejoin(eastDid))
        #expect(plan.peer == "west" && plan.common == b && plan.keepWrittenAfter == 60 && Self.fenced(eastDid))
        #expect(Self.rejoin(westDid) == nil && !west.isFenced)
        // A point past where the line it was on left A is not on it: the line is not kept.
        let elsewhere = RoleChange.promotion(position: ReplicaPosition(epoch: 2, generation: Self.a.id, appliedSeq: 110, consistent: true,
                                                                       initialized: true, lineage: [Self.a]),
                                             generation: c.id, recordedEpoch: 2, recordedHistory: [Self.a, b], volumeSize: 64 << 20,
                                             regionSize: 64 << 10, followed: nil, siteIndex: 1, siteCount: 2,
                                             rolledBack: [BlockRange(offset: 0, length: 4096)], lineBefore: [Self.a, b])
        #expect(elsewhere.history == [Self.a, GenerationRecord(id: 0xC, epoch: 3, branchSeq: 110)])
    }

    @Test func aSplitBrainMovesNothingUntilResolvedAndThenTheLoserGivesWay() throws {
        // Both promoted from A and both wrote.
        let b = GenerationRecord(id: 0xB, epoch: 2, branchSeq: 100), c = GenerationRecord(id: 0xC, epoch: 2, branchSeq: 90)
        var east = Self.primary([Self.a, c], applied: 95, peer: "west")
        var west = Self.primary([Self.a, b], applied: 110, peer: "east")
        let (eastDid, westDid) = try Self.meet(&east, &west)
        #expect(Self.state(eastDid) == .splitBrain && Self.state(westDid) == .splitBrain)
        #expect(!Self.fenced(eastDid + westDid) && Self.rejoin(eastDid + westDid) == nil)
        #expect(east.rivals["west"] != nil && west.rivals["east"] != nil)
        // Nothing is sent either way: no session opened, so no write or region goes out.
        let sends = (eastDid + westDid).filter { if case .send = $0 { return true } else { return false } }
        #expect(sends.isEmpty, "data moved in a split brain: \(sends)")
        // The link dropping does not make status forget it.
        _ = east.linkDown(peer: "west", link: LinkID(1), now: Self.now)
        #expect(east.status(now: Self.now).first?.state == .splitBrain)

        // Either site can give way on the operator's word: here east, naming west.
        let plan = try #require(east.rejoinPlan(keeping: "west"))
        #expect(plan.common == Self.a && plan.history == [Self.a] && plan.peerEpoch == 2)
        #expect(east.rejoinPlan(keeping: "nosuch") == nil)

        // Or west, naming itself: its next open tells east, which gives way on reading it.
        let resolved = west.resolveKeepingLocal(against: "east", now: Self.now)
        let reset = try #require(resolved)
        #expect(reset.contains { if case .closeLink = $0 { return true } else { return false } }, "the link was not reset to carry the decision")
        _ = west.linkDown(peer: "east", link: LinkID(1), now: Self.now)
        let link = LinkID(2)
        let fromWest = try Self.open(&west, to: "east", link: link)
        #expect(fromWest.discards == 0xC)
        let eastNow = east.received(.open(fromWest), peer: "west", link: link, now: Self.now)
        let given = try #require(Self.rejoin(eastNow))
        #expect(given.peer == "west" && given.common == Self.a && Self.fenced(eastNow))
        // A resolution names a generation: an open discarding another one changes nothing.
        var other = Self.primary([Self.a, GenerationRecord(id: 0xD, epoch: 2, branchSeq: 90)], applied: 95, peer: "west")
        _ = try Self.open(&other, to: "west", link: link)
        #expect(Self.rejoin(other.received(.open(fromWest), peer: "west", link: link, now: Self.now)) == nil)
        let nothing = west.resolveKeepingLocal(against: "nosuch", now: Self.now)
        #expect(nothing == nil)
    }

    @Test func unrelatedHistoriesAreRefusedBothWaysUntilTheOperatorKeepsOne() throws {
        var east = Self.primary([Self.a], applied: 10, peer: "west")
        var west = Self.primary([GenerationRecord(id: 0xE, epoch: 1, branchSeq: 0)], applied: 10, peer: "east")
        let (eastDid, westDid) = try Self.meet(&east, &west)
        #expect(Self.state(eastDid) == .unrelated && Self.state(westDid) == .unrelated)
        #expect(!Self.fenced(eastDid + westDid) && Self.rejoin(eastDid + westDid) == nil)
        // Only the operator joins them (`ferry resolve --keep`): the site that gives way keeps its
        // whole image aside and takes a full copy.
        let plan = try #require(east.rejoinPlan(keeping: "west"))
        #expect(plan.common == nil && plan.history.isEmpty && plan.peer == "west")
        #expect(east.rangesToKeepAside(plan: plan, keepAsideFor: nil) == [BlockRange(offset: 0, length: 64 << 20)])
        let demotion = RoleChange.demotion(epoch: 1, generation: Self.a.id, recordedHistory: [Self.a], plan: plan, keptAside: [])
        #expect(demotion.position == ReplicaPosition(epoch: plan.peerEpoch) && demotion.history.isEmpty)
    }

    @Test func aReplicaTakesOverOnlyWhatItHoldsInFull() {
        let link = LinkID(3)
        let handoff = VolumeHandoff(epoch: 2, generation: 0xB, seq: 500)
        func replica(_ position: ReplicaPosition) -> [ReplicaVolume.Action] {
            var machine = ReplicaVolume(volume: "vm1", position: position)
            return machine.received(.handoff(handoff), on: link)
        }
        let holds = ReplicaPosition(epoch: 2, generation: 0xB, appliedSeq: 500, consistent: true, initialized: true)
        #expect(replica(holds) == [.takeOver(link, handoff)])
        var behind = holds
        behind.appliedSeq = 499
        var inconsistent = holds
        inconsistent.consistent = false
        var otherGeneration = holds
        otherGeneration.generation = 0xC
        var newerEpoch = holds
        newerEpoch.epoch = 3
        for position in [behind, inconsistent, otherGeneration, newerEpoch] {
            let actions = replica(position)
            let declined = actions.contains { if case .declineHandoff(link, _) = $0 { return true } else { return false } }
            #expect(declined && actions.count == 1, "\(position) → \(actions)")
        }
    }
}
