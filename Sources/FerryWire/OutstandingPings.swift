import NIOCore

/// The pings a connection sent and has not had answered, to match pongs against (protocol.md §4.4).
///
/// RTT comes from this site's own record of when the ping left, never from the `sentAt` a pong
/// echoes: that value is the peer's to get wrong. A pong whose nonce is not outstanding (never
/// sent, answered already, or pushed out by newer pings) gives no RTT. Time is passed in.
struct OutstandingPings {
    /// How many unanswered pings are remembered; older ones are forgotten.
    static let limit = 8

    /// Oldest first; at most `limit`.
    private var sent: [(nonce: UInt64, at: NIODeadline)] = []

    /// Remembers a ping sent with `nonce` at `time`.
    mutating func sent(nonce: UInt64, at time: NIODeadline) {
        if sent.count == Self.limit { sent.removeFirst() }
        sent.append((nonce, time))
    }

    /// The round-trip time of the ping `nonce` answers, or nil when no such ping is outstanding.
    /// The ping is answered from then on.
    mutating func answered(nonce: UInt64, at time: NIODeadline) -> TimeAmount? {
        guard let index = sent.firstIndex(where: { $0.nonce == nonce }) else { return nil }
        let ping = sent.remove(at: index)
        return time >= ping.at ? time - ping.at : .zero
    }

    var count: Int { sent.count }
}
