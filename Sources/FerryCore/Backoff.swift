/// Capped exponential backoff with full jitter, for reconnecting peer links.
///
/// Pure: the caller supplies the random source, so the simulation can replay it. The n-th delay
/// (n from 0) is drawn uniformly from [base·2ⁿ/2, base·2ⁿ], capped at `cap`; half of the window is
/// kept as a floor so a flapping link never retries in a tight loop.
public struct Backoff: Sendable, Equatable {
    public var base: Duration
    public var cap: Duration
    public private(set) var attempt: Int = 0

    public init(base: Duration = .milliseconds(200), cap: Duration = .seconds(5)) {
        self.base = base
        self.cap = cap
    }

    /// The delay before the next attempt; advances the attempt counter.
    public mutating func next<R: RandomNumberGenerator>(using rng: inout R) -> Duration {
        let shift = min(attempt, 30)
        attempt += 1
        let baseNs = base.nanoseconds
        let capNs = cap.nanoseconds
        let ceiling = min(capNs, baseNs.multipliedReportingOverflow(by: Int64(1) << shift).overflow
                          ? capNs : baseNs << shift)
        let floor = ceiling / 2
        let ns = floor + Int64.random(in: 0...max(0, ceiling - floor), using: &rng)
        return .nanoseconds(ns)
    }

    /// Call when a connection succeeded; the next failure starts from `base` again.
    public mutating func reset() { attempt = 0 }
}

extension Duration {
    /// Whole nanoseconds (saturating), for arithmetic on delays.
    public var nanoseconds: Int64 {
        let (s, a) = components
        let (ns, o1) = s.multipliedReportingOverflow(by: 1_000_000_000)
        if o1 { return s < 0 ? .min : .max }
        let (sum, o2) = ns.addingReportingOverflow(a / 1_000_000_000)
        return o2 ? .max : sum
    }

    /// Milliseconds as a Double, for display.
    public var milliseconds: Double { Double(nanoseconds) / 1_000_000 }
}
