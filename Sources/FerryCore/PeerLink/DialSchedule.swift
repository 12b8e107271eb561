/// The decisions of one peer's dial loop (protocol.md §4.7): whether to dial, and how long to wait
/// after a dial. A pure state machine: the caller reports what happened and supplies the random
/// source, so the simulation can replay it (DESIGN §4). FerryWire's `PeerLinks.dialLoop` executes
/// it with real sockets and sleeps.
///
/// 1. If the peer has a link in either direction, do not dial: wait until it closes, then dial at
///    once with the backoff reset (the link was up: a failure to re-establish it starts from the
///    base delay).
/// 2. Otherwise dial. If the link came up (the dial returns once it closed), reset the backoff.
/// 3. Wait the next backoff delay, then go to 1.
public struct DialSchedule: Sendable {
    public enum Step: Sendable, Equatable {
        /// Dial the peer now; report ``dialFinished(linkCameUp:using:)``.
        case dial
        /// The peer has this link (by the ID the connection got when it came up): wait until it
        /// closes, first pausing for `pause` if given, then report ``linkClosed()``.
        case waitForLink(LinkID, pause: Duration?)
    }

    public private(set) var backoff: Backoff
    /// The link waited for last, to notice the same link still reported after it closed.
    private var lastWaited: LinkID?

    /// A pause before waiting again on a link that closed but is still reported (the registry
    /// has not heard yet): so the loop does not spin.
    public static let settlePause: Duration = .milliseconds(20)

    public init(backoff: Backoff = Backoff(base: .milliseconds(200), cap: .seconds(5))) {
        self.backoff = backoff
    }

    /// What to do next, given the peer's current link (nil: none).
    public mutating func next(currentLink: LinkID?) -> Step {
        guard let link = currentLink else { return .dial }
        let pause = lastWaited == link ? Self.settlePause : nil
        lastWaited = link
        return .waitForLink(link, pause: pause)
    }

    /// The link waited for closed.
    public mutating func linkClosed() {
        backoff.reset()
    }

    /// A dial ended (after its link, if one came up, closed again); returns the delay before the
    /// next step.
    public mutating func dialFinished<R: RandomNumberGenerator>(linkCameUp: Bool, using rng: inout R) -> Duration {
        if linkCameUp { backoff.reset() }
        return backoff.next(using: &rng)
    }
}
