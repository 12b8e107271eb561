/// Admits a volume's requests in sequence order, never two overlapping ones at once.
///
/// A request is admitted when every earlier request has been admitted and no admitted,
/// unfinished request overlaps it. Admission is strictly in order on purpose: the set of
/// admitted requests is then always a prefix of the sequence, so any point in the stream
/// (a barrier, a scheduled point, the end of a catch-up) names a state the primary's image really
/// has after all writes up to it — the state an async replica is allowed to be in (P2). The cost
/// is head-of-line waiting behind an overlapping write still in flight, which VM workloads rarely
/// produce (a local write on the page cache finishes in microseconds). Reads for catch-up and for
/// scheduled points take their place in the same order, so a block read for a peer always holds
/// every write admitted before it and none after.
public struct IntervalLock: Sendable {
    public typealias Ticket = UInt64

    private struct Waiting: Sendable {
        var ticket: Ticket
        var range: BlockRange?   // nil: takes no range (never blocked by overlap)
    }

    private var queue: [Waiting] = []
    private var queueHead = 0
    /// Admitted and not yet released.
    private var held: [Ticket: BlockRange] = [:]

    public init() {}

    /// Queues `ticket` (tickets must be enqueued in increasing order) and returns the tickets
    /// admitted as a result, in order. `range` nil: the ticket only keeps its place in the order.
    public mutating func enqueue(_ ticket: Ticket, range: BlockRange?) -> [Ticket] {
        queue.append(Waiting(ticket: ticket, range: range))
        return admit()
    }

    /// Releases an admitted ticket; returns the tickets admitted as a result, in order.
    public mutating func release(_ ticket: Ticket) -> [Ticket] {
        held.removeValue(forKey: ticket)
        return admit()
    }

    public var heldCount: Int { held.count }
    public var waitingCount: Int { queue.count - queueHead }
    public func isHeld(_ ticket: Ticket) -> Bool { held[ticket] != nil }

    private mutating func admit() -> [Ticket] {
        var admitted: [Ticket] = []
        while queueHead < queue.count {
            let next = queue[queueHead]
            if let range = next.range {
                if held.values.contains(where: { $0.overlaps(range) }) { break }
                held[next.ticket] = range
            }
            admitted.append(next.ticket)
            queueHead += 1
        }
        if queueHead > 64, queueHead * 2 > queue.count {
            queue.removeFirst(queueHead)
            queueHead = 0
        }
        return admitted
    }
}
