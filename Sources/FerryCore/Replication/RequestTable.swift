/// The primary's requests in flight, by sequence number, in order. Requests are added in
/// sequence order and leave about in order; a request is read and changed where it lies instead
/// of being copied out of a dictionary and back (the machine looks at every request in flight
/// after every event). Found by binary search; removed ones leave holes, squeezed out once they
/// are half the table (a request can stay long, a checkpoint waiting for a peer's durable ack,
/// while thousands pass it).
struct RequestTable<Value: Sendable>: Sendable {
    /// Ascending. Entries before `start`, and those whose value is nil, have left.
    private var seqs: [UInt64] = []
    private var values: [Value?] = []
    private var start = 0
    private(set) var count = 0

    var isEmpty: Bool { count == 0 }

    /// The sequences in flight in order, possibly with some that have left (their value is nil).
    var sequences: ArraySlice<UInt64> { seqs[start...] }

    /// The oldest sequence in flight.
    var oldest: UInt64? { isEmpty ? nil : seqs[start] }

    /// The requests in flight, oldest first.
    var inFlight: [Value] { values[start...].compactMap { $0 } }

    private func index(of seq: UInt64) -> Int? {
        var low = start, high = seqs.count
        while low < high {
            let mid = (low + high) / 2
            if seqs[mid] < seq { low = mid + 1 } else { high = mid }
        }
        return low < seqs.count && seqs[low] == seq ? low : nil
    }

    subscript(seq: UInt64) -> Value? {
        _read {
            if let i = index(of: seq) { yield values[i] } else { yield nil }
        }
        _modify {
            if let i = index(of: seq) {
                let had = values[i] != nil
                yield &values[i]
                let has = values[i] != nil
                if had && !has { left(1) } else if !had && has { count += 1 }
            } else {
                var value: Value?
                yield &value
                if let value { insert(value, seq) }
            }
        }
    }

    private mutating func insert(_ value: Value, _ seq: UInt64) {
        count += 1
        if seqs.last.map({ $0 < seq }) ?? true {
            seqs.append(seq)
            values.append(value)
            return
        }
        // Not after the newest (not done by the machine; kept correct anyway).
        var i = start
        while i < seqs.count, seqs[i] < seq { i += 1 }
        if i == start, start > 0, seqs[start - 1] < seq {
            start -= 1
            seqs[start] = seq
            values[start] = value
        } else {
            seqs.insert(seq, at: i)
            values.insert(value, at: i)
        }
    }

    /// Calls `body` with each request in flight, oldest first, where it lies; a request for which
    /// it returns false leaves.
    mutating func update(_ body: (UInt64, inout Value) -> Bool) {
        var removed = 0
        for i in start..<seqs.count where values[i] != nil {
            if !body(seqs[i], &values[i]!) {
                values[i] = nil
                removed += 1
            }
        }
        if removed > 0 { left(removed) }
    }

    /// `n` requests left (their values are nil now): move `start` past the front's holes, and
    /// squeeze the holes out once they are half the table.
    private mutating func left(_ n: Int) {
        count -= n
        while start < seqs.count, values[start] == nil { start += 1 }
        if start == seqs.count {
            seqs.removeAll(keepingCapacity: true)
            values.removeAll(keepingCapacity: true)
            start = 0
        } else if seqs.count - count >= 32, 2 * (seqs.count - count) >= seqs.count {
            var keptSeqs: [UInt64] = []
            var kept: [Value?] = []
            keptSeqs.reserveCapacity(seqs.count)
            kept.reserveCapacity(seqs.count)
            for j in start..<seqs.count where values[j] != nil {
                keptSeqs.append(seqs[j])
                kept.append(values[j])
            }
            seqs = keptSeqs
            values = kept
            start = 0
        }
    }
}
