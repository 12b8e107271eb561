import FerryCore
import NIOCore
import Synchronization

/// What the layer above has registered on a `PeerLinks`: the callbacks for frames and link events.
final class LinkHandlers: Sendable {
    struct Callbacks {
        var frame: (@Sendable (PeerFrame) -> Void)?
        var linkUp: (@Sendable (String, LinkID) -> Void)?
        var linkDown: (@Sendable (String, LinkID, String) -> Void)?
        var writabilityChanged: (@Sendable (String, LinkID, Bool) -> Void)?
    }

    let callbacks = Mutex(Callbacks())

    var current: Callbacks { callbacks.withLock { $0 } }
}

/// One connection to a peer that passed the hello exchange, as the data plane sees it: the events
/// the layer above is told, the frames it is handed, and the frames it sends.
///
/// **Events.** The `LinkRegistry`'s ``PeerLinkTable`` decides, under its lock, when a connection
/// becomes the peer's current link (``promote(as:after:)``) and when it stops being it
/// (``demote(reason:)``); each
/// decision is queued here as an event, in decision order. The events are fired on the
/// connection's event loop only (``fireEvents()``, called by its handler before anything it
/// delivers, and by a task for decisions taken elsewhere), so the layer above sees, for each
/// `LinkID`, up, then frames, then down, all on one loop and in that order. When the current link
/// switches, the new link's up waits until the old link's down has been fired (on its own loop),
/// so the layer above never sees two links of one peer up at once.
///
/// **IDs.** A connection gets a `LinkID` when it is established (``connection``, the table's name
/// for it). If it stops being current while still open and later becomes current again (the dial
/// race of protocol.md §4.8), the table gives it a new ID: an ID that was reported down is never
/// reported up again.
///
/// **Sending.** ``enqueue(_:as:)`` may be called from any thread: under this link's lock it checks
/// that the ID is still current and appends the frames to an outbound queue, which is drained on
/// the loop (at once when called there, else by one task per batch) and flushed once per drain. So
/// frames go out in the order the calls took the lock.
final class EstablishedLink: Sendable {
    let peer: String
    let channel: any Channel
    let direction: LinkDirection
    /// The ID the connection got when it was established: how the ``PeerLinkTable`` names it.
    let connection: LinkID
    private let handlers: LinkHandlers
    private let state: Mutex<State>

    enum Event {
        /// Up under an ID; fired only once `after` (the link it replaces) has fired its down.
        case up(LinkID, after: (link: EstablishedLink, id: LinkID)?)
        case down(LinkID, reason: String)
    }

    private struct State {
        /// The ID last given to this connection.
        var id: LinkID
        /// The registry's view: the ID under which this connection is the peer's current link.
        var currentID: LinkID?
        /// Decided, not yet fired.
        var events: [Event] = []
        var eventTaskScheduled = false
        var firingEvents = false
        /// The IDs this connection has fired its down for.
        var firedDowns: Set<LinkID> = []
        /// Links whose up waits for this connection's pending down.
        var waiters: [EstablishedLink] = []
        /// The layer above's view: the ID it was last told is up (and not yet down). Loop only.
        var reportedUp: LinkID?
        /// Frames that arrived after this connection was made current and before its up could be
        /// fired (it waits for the replaced link's down, on that link's loop): delivered right
        /// after the up, in arrival order. Loop only.
        var held: [Frame] = []
        var heldBytes = 0
        var outbound: [Frame] = []
        var drainScheduled = false
        var draining = false
    }

    init(peer: String, channel: any Channel, direction: LinkDirection, id: LinkID, handlers: LinkHandlers) {
        self.peer = peer
        self.channel = channel
        self.direction = direction
        self.connection = id
        self.handlers = handlers
        self.state = Mutex(State(id: id))
    }

    /// The ID last given to this connection (for logs).
    var id: LinkID { state.withLock { $0.id } }

    /// The ID under which this connection is the peer's current link, if it is.
    var currentID: LinkID? { state.withLock { $0.currentID } }

    // MARK: - Decisions (called by the registry, under its lock)

    /// This connection becomes the peer's current link under `id`, replacing `after` (the previous
    /// current link and the ID it was demoted from, if any).
    func promote(as id: LinkID, after: (link: EstablishedLink, id: LinkID)?) {
        state.withLock { state in
            state.id = id
            state.currentID = id
            state.events.append(.up(id, after: after))
        }
        after?.link.state.withLock { $0.waiters.append(self) }
    }

    /// This connection stops being the peer's current link; returns the ID it was current under.
    func demote(reason: String) -> LinkID? {
        state.withLock { state in
            guard let id = state.currentID else { return nil }
            state.currentID = nil
            state.events.append(.down(id, reason: reason))
            return id
        }
    }

    // MARK: - Firing events (on the loop)

    /// Makes sure queued events are fired soon even if nothing happens on the connection: one task
    /// on its loop. Called after the registry's lock is released.
    func scheduleEvents() {
        let schedule = state.withLock { state in
            guard !state.events.isEmpty, !state.eventTaskScheduled else { return false }
            state.eventTaskScheduled = true
            return true
        }
        if schedule {
            channel.eventLoop.execute { [self] in
                state.withLock { $0.eventTaskScheduled = false }
                fireEvents()
            }
        }
    }

    /// Fires queued events, in order, up to an up that must wait for another link's down. On the
    /// connection's loop only; a call from inside a callback returns at once, and the outer call
    /// fires what was queued meanwhile.
    func fireEvents() {
        channel.eventLoop.preconditionInEventLoop()
        let start = state.withLock { state in
            guard !state.firingEvents, !state.events.isEmpty else { return false }
            state.firingEvents = true
            return true
        }
        guard start else { return }
        while true {
            // Only this loop removes events, so the first one stays the first until taken.
            let first = state.withLock { $0.events.first }
            if case .up(_, let after?) = first, !after.link.hasFiredDown(after.id) {
                // The replaced link fires its down on its own loop, then reschedules this one.
                state.withLock { $0.firingEvents = false }
                return
            }
            let (event, waiters): (Event?, [EstablishedLink]) = state.withLock { state in
                guard !state.events.isEmpty else {
                    state.firingEvents = false
                    return (nil, [])
                }
                let event = state.events.removeFirst()
                var waiters: [EstablishedLink] = []
                switch event {
                case .up(let id, _):
                    state.reportedUp = id
                case .down(let id, _):
                    if state.reportedUp == id { state.reportedUp = nil }
                    state.firedDowns.insert(id)
                    waiters = state.waiters
                    state.waiters = []
                }
                return (event, waiters)
            }
            guard let event else { return }
            let callbacks = handlers.current
            switch event {
            case .up(let id, _):
                callbacks.linkUp?(peer, id)
                // What arrived while the up waited goes first, before any later event or frame.
                let held = state.withLock { state in
                    defer { state.held = []; state.heldBytes = 0 }
                    return state.held
                }
                if let handler = callbacks.frame {
                    for frame in held { handler(PeerFrame(peer: peer, link: id, frame: frame)) }
                }
            case .down(let id, let reason): callbacks.linkDown?(peer, id, reason)
            }
            for waiter in waiters { waiter.scheduleEvents() }
        }
    }

    private func hasFiredDown(_ id: LinkID) -> Bool {
        state.withLock { $0.firedDowns.contains(id) }
    }

    // MARK: - Inbound (on the loop)

    /// Frames held for an up that waits, at most this many bytes (payloads): past it the frame is
    /// dropped as on a link that is not current. The wait is for another loop to fire a down,
    /// which takes a task's time, not a heartbeat's.
    static let heldLimit = 64 << 20

    /// Hands a data-plane frame to the layer above if this connection is up as it knows it, or
    /// holds it until its up is fired when the connection was made current and the up waits for
    /// the replaced link's down (protocol.md §6.1). Returns false when the frame was dropped: the
    /// connection is not current, or no handler is set.
    func deliver(_ frame: Frame) -> Bool {
        fireEvents()
        enum Outcome { case deliver(LinkID), held, dropped }
        let outcome = state.withLock { state -> Outcome in
            if let id = state.reportedUp { return .deliver(id) }
            let upPending = state.events.contains { if case .up = $0 { return true } else { return false } }
            guard upPending, state.heldBytes + frame.payloadLength <= Self.heldLimit else { return .dropped }
            state.held.append(frame)
            state.heldBytes += frame.payloadLength
            return .held
        }
        switch outcome {
        case .dropped: return false
        case .held: return true
        case .deliver(let id):
            guard let handler = handlers.current.frame else { return false }
            handler(PeerFrame(peer: peer, link: id, frame: frame))
            return true
        }
    }

    /// Tells the layer above the channel's writability changed, if this connection is up.
    func writabilityChanged() {
        fireEvents()
        guard let id = state.withLock({ $0.reportedUp }),
              let handler = handlers.current.writabilityChanged else { return }
        handler(peer, id, channel.isWritable)
    }

    // MARK: - Outbound (any thread)

    private enum EnqueueResult { case refused, queued, scheduleDrain }

    /// Queues `frames` for sending if `id` is still the current ID; false (nothing queued) if not.
    ///
    /// Never writes to the channel before returning, even on the connection's own loop: callers
    /// send while holding their own locks (to keep frames in their machine's order), and a write
    /// and flush through TLS can read and deliver inbound frames, which call back into them.
    func enqueue(_ frames: [Frame], as id: LinkID) -> Bool {
        let result = state.withLock { state -> EnqueueResult in
            guard state.currentID == id else { return .refused }
            state.outbound.append(contentsOf: frames)
            // A drain in progress on the loop, or one already scheduled, takes them.
            if state.draining || state.drainScheduled { return .queued }
            state.drainScheduled = true
            return .scheduleDrain
        }
        switch result {
        case .refused: return false
        case .queued: break
        case .scheduleDrain: channel.eventLoop.execute { [self] in drain() }
        }
        return true
    }

    /// Writes everything queued, in order, then flushes once. On the loop only.
    private func drain() {
        let start = state.withLock { state in
            state.drainScheduled = false
            guard !state.draining else { return false }
            state.draining = true
            return true
        }
        guard start else { return }
        var wrote = false
        while true {
            let batch: [Frame]? = state.withLock { state in
                guard !state.outbound.isEmpty else {
                    state.draining = false
                    return nil
                }
                let batch = state.outbound
                state.outbound = []
                return batch
            }
            guard let batch else { break }
            for frame in batch { channel.write(frame, promise: nil) }
            wrote = true
        }
        if wrote { channel.flush() }
    }
}
