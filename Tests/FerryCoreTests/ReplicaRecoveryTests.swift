import FerryCore
import Testing

/// A replica restarting with groups left in its receive log (``ReplicaVolume/recover(log:)``), and
/// streams a replica must refuse before they touch its image.
struct ReplicaRecoveryTests {
    static let link = LinkID(7)

    static func position(_ applied: UInt64, consistent: Bool) -> ReplicaPosition {
        ReplicaPosition(epoch: 2, generation: 0xB, appliedSeq: applied, consistent: consistent, initialized: true)
    }

    static func logged(_ index: UInt64, seq: UInt64) -> ReplicaVolume.LoggedBarrier {
        .init(index: index, seq: seq, kind: .cut)
    }

    /// The failover simulation's seed 700311: a group still being applied when a pull-ahead
    /// catch-up began stayed in the log; after a power loss it was applied again over the
    /// catch-up's newer blocks and the image, mid catch-up, was taken as consistent.
    @Test func groupsTheRecordedPositionHoldsAreSkippedNotAppliedAgain() {
        var midCatchUp = ReplicaVolume(volume: "vm1", position: Self.position(1470, consistent: false))
        #expect(midCatchUp.recover(log: [Self.logged(302, seq: 1470)]) == [.skipLog(groups: 1), .discardLogTail])
        #expect(midCatchUp.position == Self.position(1470, consistent: false))

        // Consistent: what the position holds is skipped, what follows it is applied.
        var consistent = ReplicaVolume(volume: "vm1", position: Self.position(100, consistent: true))
        let actions = consistent.recover(log: [Self.logged(5, seq: 90), Self.logged(9, seq: 100), Self.logged(12, seq: 130)])
        #expect(actions == [.skipLog(groups: 2), .applyLog(nil, throughIndex: 12, position: Self.position(130, consistent: true)),
                            .discardLogTail])
        #expect(consistent.position == Self.position(130, consistent: true))

        // Groups newer than a position recorded mid catch-up are applied (they follow the
        // catch-up's blocks), but the image stays inconsistent: the catch-up's blocks may not
        // have reached the disk.
        var after = ReplicaVolume(volume: "vm1", position: Self.position(1470, consistent: false))
        #expect(after.recover(log: [Self.logged(400, seq: 1500)])
                == [.applyLog(nil, throughIndex: 400, position: Self.position(1500, consistent: false)), .discardLogTail])

        var empty = ReplicaVolume(volume: "vm1", position: Self.position(10, consistent: true))
        #expect(empty.recover(log: []) == [.discardLogTail])
    }

    /// Two sites configured with different sizes: the stream is refused with the reason, and an
    /// item past the end is refused too, before anything is written.
    @Test func aStreamForAnotherSizeIsRefused() {
        var replica = ReplicaVolume(volume: "vm1", position: .empty)
        replica.volumeSize = 8 << 20
        let wrong = VolumeOpen(volume: "vm1", epoch: 1, generation: 0xB, volumeSize: 16 << 20, mode: .sync)
        let refused = replica.received(.open(wrong), on: Self.link)
        guard case .refuse(Self.link, let reason)? = refused.first else {
            Issue.record("not refused: \(refused)"); return
        }
        #expect(reason.contains("sizes differ") && reason.contains("16777216") && reason.contains("8388608"))

        var open = wrong
        open.volumeSize = 8 << 20
        #expect(replica.received(.open(open), on: Self.link).contains { if case .send(Self.link, .position) = $0 { return true } else { return false } })
        let past = ReplicationItem(epoch: 1, index: 1, seq: 1, range: BlockRange(offset: 8 << 20, length: 4096), isZero: false)
        let actions = replica.received(.write(past), on: Self.link)
        #expect(actions.contains { if case .refuse(Self.link, let why) = $0 { return why.contains("past the volume") } else { return false } })
        #expect(!actions.contains { if case .apply = $0 { return true } else { return false } })
    }
}
