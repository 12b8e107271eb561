@testable import FerryCore
import Testing

/// The handshake's decision table against a model of the writes each side holds, over every
/// small history: up to four generations in one or two trees, branch points and applied
/// sequences a few writes apart, epochs equal or not between siblings.
@Suite struct HistoryDecisionTests {
    /// A write: the generation that made it and its sequence.
    struct Write: Hashable { var generation: UInt64; var seq: UInt64 }

    /// Every write an image with this history holds.
    static func writes(_ h: VolumeHistory) -> Set<Write> {
        var all: Set<Write> = []
        for g in h.generations {
            let reach = h.reach(in: g.id)!
            if reach > g.branchSeq { for s in (g.branchSeq + 1)...reach { all.insert(Write(generation: g.id, seq: s)) } }
        }
        return all
    }

    /// A generation tree node: its record and its parent's index (nil: a root).
    struct Node { var record: GenerationRecord; var parent: Int? }

    /// Every tree of up to `extra` more nodes after a root; each node picks a parent (or none:
    /// another root, for unrelated histories), a branch point 0–2 writes past its parent's or one
    /// before it (a promotion at a recovery point that goes back past the parent's start: a
    /// rewound line), and an epoch of its depth (siblings tie) or a distinct one.
    static func trees(extra: Int) -> [[Node]] {
        var result: [[Node]] = [[Node(record: GenerationRecord(id: 1, epoch: 1, branchSeq: 0), parent: nil)]]
        var frontier = result
        for _ in 0..<extra {
            var next: [[Node]] = []
            for tree in frontier {
                let id = UInt64(tree.count + 1)
                for parent in [nil] + tree.indices.map(Optional.some) {
                    let base = parent.map { tree[$0].record.branchSeq } ?? 0
                    let depth = parent.map { depthOf($0, in: tree) + 1 } ?? 1
                    for offset in -1...2 where (parent != nil || offset == 0) && Int(base) + offset >= 0 {
                        for epoch in [UInt64(depth), 100 + id] {
                            let branch = UInt64(Int(base) + offset)
                            next.append(tree + [Node(record: GenerationRecord(id: id, epoch: epoch, branchSeq: branch), parent: parent)])
                        }
                    }
                }
            }
            result += next
            frontier = next
        }
        return result
    }

    static func depthOf(_ i: Int, in tree: [Node]) -> Int {
        var d = 1, j = i
        while let p = tree[j].parent { d += 1; j = p }
        return d
    }

    /// The sites a tree allows: nothing, or any node as the current generation with 0–2 writes in
    /// it past its branch point (and, for an ancestor, exactly up to where its child branched).
    static func sites(_ tree: [Node]) -> [VolumeHistory] {
        var result: [VolumeHistory] = [.empty]
        for i in tree.indices {
            var chain: [GenerationRecord] = []
            var j: Int? = i
            while let k = j { chain.insert(tree[k].record, at: 0); j = tree[k].parent }
            // A promotion branches from what the promoted site had: its parent reach must be
            // at least the parent's own branch point, which the tree guarantees.
            for extra in UInt64(0)...2 {
                result.append(VolumeHistory(generations: chain, appliedSeq: tree[i].record.branchSeq + extra))
            }
        }
        return result
    }

    func check(_ a: VolumeHistory, _ b: VolumeHistory) -> String? {
        let decision = HistoryDecision.decide(local: a, peer: b)
        let back = HistoryDecision.decide(local: b, peer: a)
        if back != decision.mirrored { return "not symmetric: \(decision) one way, \(back) the other" }
        let wa = Self.writes(a), wb = Self.writes(b)
        func holds(_ side: HistoryDecision.Side) -> (mine: Set<Write>, other: Set<Write>) { side == .local ? (wa, wb) : (wb, wa) }
        let common = Set(a.generations.map(\.id)).intersection(b.generations.map(\.id))
        switch decision {
        case .nothingToDo:
            if !(a.generations.isEmpty && b.generations.isEmpty) { return "nothing to do, but a side has data" }
        case .fullCopy(let from):
            let (_, other) = holds(from)
            if !other.isEmpty || (from == .local ? b : a).generations.count > 0 { return "full copy to a side that has data" }
        case .inSync:
            if wa != wb { return "in sync, but the writes differ" }
        case .catchUp(let from):
            let (mine, other) = holds(from)
            if !other.isSubset(of: mine) { return "catch-up from \(from) discards \(other.subtracting(mine).count) writes only the other side has" }
        case .diverged(let keep, let branch):
            let (mine, other) = holds(keep)
            let unique = other.subtracting(mine)
            if unique.isEmpty { return "diverged, but the other side holds nothing of its own" }
            if let early = unique.first(where: { $0.seq <= branch }) { return "diverged at \(branch), but the set-aside misses \(early)" }
        case .splitBrain:
            // Only when both were promoted and both wrote since, or both were promoted with the
            // same epoch and neither wrote (nothing says which stands).
            if common.isEmpty { return "split brain between unrelated histories" }
            guard let ca = a.current, let cb = b.current, !common.contains(ca.id), !common.contains(cb.id) else {
                return "split brain, but one side is on the other's line of history"
            }
            let ownA = wa.filter { !common.contains($0.generation) }, ownB = wb.filter { !common.contains($0.generation) }
            let childA = a.generations.first { !common.contains($0.id) }!, childB = b.generations.first { !common.contains($0.id) }!
            let tie = ownA.isEmpty && ownB.isEmpty && childA.epoch == childB.epoch
            if !tie && (ownA.isEmpty || ownB.isEmpty) { return "split brain, but only one side wrote since it was promoted" }
        case .unrelated:
            if !common.isEmpty || a.generations.isEmpty || b.generations.isEmpty { return "unrelated, but they share a generation or one is empty" }
        }
        // A side on the other's line of history that holds less is caught up, nothing stronger.
        if wa != wb, wa.isSubset(of: wb), a.generations.isEmpty || a.current.map({ c in b.generations.contains { $0.id == c.id } }) == true {
            switch decision {
            case .catchUp(from: .peer), .fullCopy(from: .peer): break
            default: return "local holds a subset of peer's writes, yet \(decision)"
            }
        }
        return nil
    }

    @Test func everySmallHistoryPairIsDecidedSafelyAndSymmetrically() {
        var cases = 0
        var failures: [String] = []
        var seen: [String: Int] = [:]
        for tree in Self.trees(extra: 3) {
            let sites = Self.sites(tree)
            for a in sites {
                for b in sites {
                    cases += 1
                    let decision = HistoryDecision.decide(local: a, peer: b)
                    let name = "\(decision)".prefix { $0 != "(" }
                    seen[String(name), default: 0] += 1
                    if let problem = check(a, b), failures.count < 10 {
                        failures.append("\(problem)\n  local \(a)\n  peer  \(b)")
                    }
                }
            }
        }
        print("history decisions: \(cases) pairs, \(seen.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))")
        #expect(failures.isEmpty, "\(failures.joined(separator: "\n"))")
        // Every outcome of the table is reached.
        for outcome in ["nothingToDo", "inSync", "catchUp", "fullCopy", "diverged", "splitBrain", "unrelated"] {
            #expect(seen[outcome, default: 0] > 0, "no pair decided \(outcome)")
        }
    }

    @Test func theCasesAnOperatorMeets() {
        let g1 = GenerationRecord(id: 11, epoch: 1, branchSeq: 0)
        let g2 = GenerationRecord(id: 22, epoch: 2, branchSeq: 100)   // west promoted at 100
        let g2b = GenerationRecord(id: 33, epoch: 2, branchSeq: 90)   // another promotion, elsewhere
        // A replica that missed writes: the primary catches it up.
        #expect(HistoryDecision.decide(local: .init(generations: [g1], appliedSeq: 120), peer: .init(generations: [g1], appliedSeq: 80))
                == .catchUp(from: .local))
        // West was promoted at 100 and wrote; east returns having written up to 130: east's
        // writes 101–130 are set aside, then east catches up from west.
        #expect(HistoryDecision.decide(local: .init(generations: [g1], appliedSeq: 130), peer: .init(generations: [g1, g2], appliedSeq: 150))
                == .diverged(keep: .peer, branchSeq: 100))
        // East had reached only 100 when west was promoted there: nothing to set aside.
        #expect(HistoryDecision.decide(local: .init(generations: [g1], appliedSeq: 100), peer: .init(generations: [g1, g2], appliedSeq: 150))
                == .catchUp(from: .peer))
        // Both promoted and both wrote: split brain, decided by `ferry resolve`.
        #expect(HistoryDecision.decide(local: .init(generations: [g1, g2b], appliedSeq: 95), peer: .init(generations: [g1, g2], appliedSeq: 150))
                == .splitBrain(commonGeneration: 11))
        // A promotion that wrote nothing loses nothing by following the other.
        #expect(HistoryDecision.decide(local: .init(generations: [g1, g2b], appliedSeq: 90), peer: .init(generations: [g1, g2], appliedSeq: 150))
                == .catchUp(from: .peer))
        // Ransomware: east, promoted at 100 (g2), wrote up to 150; west followed it and was promoted
        // at a recovery point of g1's, sequence 60 (`promote --at`), and has written nothing yet.
        // Its line keeps g2, which the promotion replaced: east gives way when it returns (its
        // writes after 60 set aside), rather than west's roll-back being undone.
        let g3 = GenerationRecord(id: 55, epoch: 3, branchSeq: 60)
        let rolledBack = VolumeHistory(generations: [g1, g2, g3], appliedSeq: 60)
        #expect(rolledBack.reach(in: g1.id) == 60 && rolledBack.reach(in: g2.id) == 60)
        #expect(HistoryDecision.decide(local: .init(generations: [g1, g2], appliedSeq: 150), peer: rolledBack)
                == .diverged(keep: .peer, branchSeq: 60))
        // A site that stopped in g1 at 120, before g2 began, sets aside its writes after 60 too.
        #expect(HistoryDecision.decide(local: .init(generations: [g1], appliedSeq: 120), peer: rolledBack)
                == .diverged(keep: .peer, branchSeq: 60))
        // Without g2 in the line, the side that wrote would stand and undo the roll-back.
        #expect(HistoryDecision.decide(local: .init(generations: [g1, g2], appliedSeq: 150),
                                       peer: .init(generations: [g1, g3], appliedSeq: 60)) == .catchUp(from: .local))
        // Different volumes under one name.
        #expect(HistoryDecision.decide(local: .init(generations: [g1], appliedSeq: 5),
                                       peer: .init(generations: [GenerationRecord(id: 44, epoch: 1, branchSeq: 0)], appliedSeq: 5)) == .unrelated)
        #expect(HistoryDecision.decide(local: .empty, peer: .init(generations: [g1], appliedSeq: 5)) == .fullCopy(from: .peer))
    }
}
