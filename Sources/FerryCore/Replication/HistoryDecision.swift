/// The handshake's decision for one volume when a link comes up (DESIGN §5.1 "Handshake"): from
/// what each side knows of the volume's history, which way data must flow, and whether anything
/// one side wrote would be lost by it.
///
/// A **generation** is one primary's run of writes: it starts when a site is promoted (or the
/// volume is created), branching from its parent generation at the sequence the promoted site had
/// applied. A site's **history** is the chain of generations its image descends from, oldest
/// first; the last is its current generation, and `appliedSeq` says how far into it the image is.
/// Sequence numbers continue along a line of history: a generation branched at `s` writes `s + 1`
/// onwards. Only one primary writes in a generation, so two sites that hold the same generation
/// and sequence hold the same write.
///
/// The table is small on purpose (DRBD's grew to two dozen rules and still ships wrong
/// decisions); ``HistoryDecisionTests`` checks it against a model of the writes each side holds
/// over every small history: symmetric, never discards a write only one side has without saying
/// so, and never calls a split brain what a catch-up can settle.
///
/// The rule: the newest promotion stands (P4: a newer epoch wins). A site still on a line of
/// history that a promotion replaced catches up from the promoted side, after setting aside what
/// it wrote past the branch point. When both sides were promoted, the one that wrote stands; both
/// wrote is a split brain.
///
/// A promotion at a recovery point (`ferry promote --at`, or out of an unfinished catch-up) may
/// go back past the start of the generation the site was on: its new generation then branches at
/// a sequence below its parent's own branch point (a *rewound* line, e.g. `[G1, G2@900, G3@400]`:
/// G3 starts from G1's state at 400, and replaced G2). Sequences along the line are those of the
/// state it starts from, so how far an image is into a generation is the lowest branch point
/// after it (``VolumeHistory/reach(in:)``). Keeping G2 in the line is what makes the promotion at
/// the point stand when G2's primary returns, as any newer promotion does.
public struct GenerationRecord: Sendable, Equatable, Hashable, Codable {
    /// A generation ID as every message and status shows it: 16 hex digits, leading zeros kept.
    public static func hex(_ id: UInt64) -> String {
        let digits = String(id, radix: 16)
        return String(repeating: "0", count: max(0, 16 - digits.count)) + digits
    }

    /// Random and non-zero; equal IDs are the same generation.
    public var id: UInt64
    /// The promotion that started it.
    public var epoch: UInt64
    /// The sequence of the parent generation this one starts from (0 for the first).
    public var branchSeq: UInt64

    public init(id: UInt64, epoch: UInt64, branchSeq: UInt64) {
        self.id = id
        self.epoch = epoch
        self.branchSeq = branchSeq
    }
}

/// What one site knows of a volume: its history and how far its image is into the current
/// generation. An empty history is a site that never held data for the volume.
public struct VolumeHistory: Sendable, Equatable {
    public var generations: [GenerationRecord]
    public var appliedSeq: UInt64

    public init(generations: [GenerationRecord], appliedSeq: UInt64) {
        self.generations = generations
        self.appliedSeq = appliedSeq
    }

    public static let empty = VolumeHistory(generations: [], appliedSeq: 0)

    public var current: GenerationRecord? { generations.last }

    /// How far this image is into generation `id` of its history: up to where its line left it
    /// (the lowest branch point of the generations after it: a promotion at a recovery point may
    /// branch below its parent's own start), or `appliedSeq` for the current one; nil when `id` is
    /// not in its history.
    public func reach(in id: UInt64) -> UInt64? {
        guard let i = generations.firstIndex(where: { $0.id == id }) else { return nil }
        return i + 1 < generations.count ? generations[(i + 1)...].lazy.map(\.branchSeq).min()! : appliedSeq
    }

    /// Whether the site wrote anything in the generations after `generations[ancestor]`.
    func wroteSince(leaving ancestor: Int) -> Bool {
        generations[(ancestor + 1)...].contains { reach(in: $0.id)! > $0.branchSeq }
    }
}

public enum HistoryDecision: Sendable, Equatable {
    public enum Side: Sendable, Equatable {
        case local, peer
        public var other: Side { self == .local ? .peer : .local }
    }

    /// Neither side holds data (a volume just created on both).
    case nothingToDo
    /// Same generation, same sequence.
    case inSync
    /// `from` holds every write the other side holds, and more: it sends what the other lacks
    /// (from its journal or its bitmap; a full copy when it has neither).
    case catchUp(from: Side)
    /// The other side holds nothing for the volume: a full copy from `from`.
    case fullCopy(from: Side)
    /// The other side wrote after `branchSeq` of the generation it shares with `keep`, in a line
    /// of history `keep` replaced (a former primary returning after the other site was
    /// promoted). Its blocks written since then are set aside (P6); then it catches up from `keep`.
    case diverged(keep: Side, branchSeq: UInt64)
    /// Both sides wrote in generations the other does not know (both were promoted and both
    /// wrote), or the history cannot say which to keep: nothing moves until `ferry resolve`.
    case splitBrain(commonGeneration: UInt64)
    /// No generation in common: two different volumes under one name. Refused.
    case unrelated

    /// The same decision seen from the other side.
    public var mirrored: HistoryDecision {
        switch self {
        case .catchUp(let from): .catchUp(from: from.other)
        case .fullCopy(let from): .fullCopy(from: from.other)
        case .diverged(let keep, let seq): .diverged(keep: keep.other, branchSeq: seq)
        default: self
        }
    }

    /// Decides for `local` and `peer`. `decide(a, b) == decide(b, a).mirrored` always.
    public static func decide(local: VolumeHistory, peer: VolumeHistory) -> HistoryDecision {
        switch (local.generations.isEmpty, peer.generations.isEmpty) {
        case (true, true): return .nothingToDo
        case (true, false): return .fullCopy(from: .peer)
        case (false, true): return .fullCopy(from: .local)
        case (false, false): break
        }
        // The newest generation both descend from.
        guard let (li, pi) = lastCommon(local, peer) else { return .unrelated }
        let common = local.generations[li]
        let localMore = li + 1 < local.generations.count, peerMore = pi + 1 < peer.generations.count
        let localReach = local.reach(in: common.id)!, peerReach = peer.reach(in: common.id)!
        switch (localMore, peerMore) {
        case (false, false):
            // One line of history: the one further along holds everything the other does.
            if localReach == peerReach { return .inSync }
            return .catchUp(from: localReach > peerReach ? .local : .peer)
        case (false, true):
            return behind(staying: localReach, newer: peer, index: pi, newerSide: .peer)
        case (true, false):
            return behind(staying: peerReach, newer: local, index: li, newerSide: .local)
        case (true, true):
            // Both left `common`: each was promoted after it. If both wrote since, only an
            // operator can say which to keep (`ferry resolve`). A side that wrote nothing since
            // loses nothing of its own by following the other; what it holds of `common` past the
            // other's branch point is set aside.
            let localWrote = local.wroteSince(leaving: li), peerWrote = peer.wroteSince(leaving: pi)
            let localChild = local.generations[li + 1], peerChild = peer.generations[pi + 1]
            switch (localWrote, peerWrote) {
            case (true, true):
                return .splitBrain(commonGeneration: common.id)
            case (false, true):
                return behind(staying: localReach, newer: peer, index: pi, newerSide: .peer)
            case (true, false):
                return behind(staying: peerReach, newer: local, index: li, newerSide: .local)
            case (false, false):
                // Neither wrote: the later promotion (higher epoch) stands, as when only one side
                // was promoted; equal epochs cannot be decided.
                if localChild.epoch > peerChild.epoch {
                    return behind(staying: peerReach, newer: local, index: li, newerSide: .local)
                }
                if peerChild.epoch > localChild.epoch {
                    return behind(staying: localReach, newer: peer, index: pi, newerSide: .peer)
                }
                return .splitBrain(commonGeneration: common.id)
            }
        }
    }

    /// The other side holds `common` (`newer.generations[index]`) up to `reach` and nothing of
    /// its own after it; `newer` left `common` at its next generation's branch point.
    private static func behind(staying reach: UInt64, newer: VolumeHistory, index: Int, newerSide: Side) -> HistoryDecision {
        let branch = newer.reach(in: newer.generations[index].id)!
        // Up to the branch point both hold the same writes; past it only the other side has them.
        return reach > branch ? .diverged(keep: newerSide, branchSeq: branch) : .catchUp(from: newerSide)
    }

    /// The newest generation both histories hold: the one a site that follows the other names
    /// in its position, so that only what differs is sent.
    public static func commonGeneration(_ a: VolumeHistory, _ b: VolumeHistory) -> GenerationRecord? {
        lastCommon(a, b).map { a.generations[$0.0] }
    }

    private static func lastCommon(_ a: VolumeHistory, _ b: VolumeHistory) -> (Int, Int)? {
        for i in a.generations.indices.reversed() {
            if let j = b.generations.firstIndex(where: { $0.id == a.generations[i].id }) { return (i, j) }
        }
        return nil
    }
}
