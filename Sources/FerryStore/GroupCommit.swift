import Foundation

/// Group commit of flushes: a flush asked for while another runs waits for the next run, and
/// that one run serves every flush asked for meanwhile. Under a client that flushes often, one
/// chain of fdatasyncs then covers many flushes instead of one each.
///
/// The rule that keeps it safe: a member is served only by a run that starts after it joined
/// (the run going on when it joins may have begun its fdatasync before the member's data was
/// written). Runs never overlap, so they also finish in the order they start.
///
/// Usage: `if group.join(member) { submit { group.drain { batch in ...flush, then answer batch... } } }`.
public final class GroupCommit<Member: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var running = false
    private var waiting: [Member] = []

    public init() {}

    /// Adds `member` to the next run. True: no run is going, and the caller must start one by
    /// calling ``drain(_:)`` (on a thread that may block).
    public func join(_ member: Member) -> Bool {
        lock.withLock {
            waiting.append(member)
            if running { return false }
            running = true
            return true
        }
    }

    /// Runs `run` on the members waiting, then again on those that joined meanwhile, until none
    /// is left. Call once for every ``join(_:)`` that returned true.
    public func drain(_ run: ([Member]) -> Void) {
        while true {
            let batch = lock.withLock { () -> [Member] in
                let batch = waiting
                waiting = []
                // Decided under the lock with the take: a member joining now either finds the
                // loop running (and is taken by its next turn) or starts a new one, never both.
                if batch.isEmpty { running = false }
                return batch
            }
            if batch.isEmpty { return }
            run(batch)
        }
    }
}
