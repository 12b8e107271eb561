import NIOConcurrencyHelpers
import Synchronization

/// One export the server offers: a name, a device, and the block sizes it advertises.
public struct NBDExport: Sendable {
    public var name: String
    public var description: String
    public var device: any BlockDevice
    /// Advertised in NBD_INFO_BLOCK_SIZE; requests must be aligned to `minimumBlockSize`.
    public var minimumBlockSize: UInt32
    public var preferredBlockSize: UInt32

    public init(name: String, description: String = "", device: any BlockDevice,
                minimumBlockSize: UInt32 = 512, preferredBlockSize: UInt32 = 4096) {
        self.name = name
        self.description = description
        self.device = device
        // proto.md: powers of two, minimum ≤ 64 KiB, preferred ≥ max(minimum, 512).
        func powerOfTwo(_ v: UInt32, atLeast low: UInt32) -> UInt32 {
            var p: UInt32 = 1
            while p < max(v, low) && p < 1 << 25 { p <<= 1 }
            return p
        }
        self.minimumBlockSize = min(powerOfTwo(minimumBlockSize, atLeast: 1), 65536)
        self.preferredBlockSize = powerOfTwo(preferredBlockSize, atLeast: max(self.minimumBlockSize, 512))
    }
}

/// The set of exports, shared by every connection; exports may come and go while the server runs.
///
/// A connection keeps the device it opened, but not beyond the export's life: ``remove(_:)`` and
/// ``fence(_:reason:)`` disconnect every client of the export. Both work in two steps. At once,
/// the export's gate closes: from then on no request of any of its connections reaches the
/// device, and no reply reports success, not even for a request the device completes afterwards
/// (an atomic load per request, no lock). Then each connection, on its own event loop, answers the
/// requests it has in flight with an error and closes (see `NBDConnectionHandler.withdraw`).
public final class NBDExportTable: Sendable {
    private struct Entry {
        var export: NBDExport
        let gate = NBDExportGate()
        /// Set by `fence`: the export stays in the table but is offered to no one.
        var fenceReason: String?
    }

    private struct State {
        var exports: [String: Entry] = [:]
        /// Connections in transmission phase, by export name. Kept apart from `exports`: a
        /// connection stays counted until it has closed, also after its export was removed.
        var clients: [String: [ObjectIdentifier: AttachedClient]] = [:]
    }
    private let state = NIOLockedValueBox(State())

    public init() {}

    /// Adds `export`, or replaces the one of that name. Replacing a fenced export lifts the fence
    /// for new connections; connections to the old one stay withdrawn.
    public func add(_ export: NBDExport) {
        state.withLockedValue { $0.exports[export.name] = Entry(export: export) }
    }

    /// Removes the export (a demoted volume, say) and disconnects its clients: requests in flight
    /// are answered with ESHUTDOWN (``BlockDeviceError/shuttingDown``), then each connection
    /// closes. Returns the number of connections being closed.
    @discardableResult
    public func remove(_ name: String) -> Int {
        withdraw(name, error: .shuttingDown, reason: "export removed") { s in
            s.exports.removeValue(forKey: name)?.gate.close(.shuttingDown)
        }
    }

    @available(*, deprecated, renamed: "remove(_:)")
    public func remove(named name: String) {
        remove(name)
    }

    /// Fences the export: every later request on it fails with ``BlockDeviceError/fenced``, its
    /// clients are disconnected, and new clients cannot open it until it is added again. For a
    /// site that learns another site took over the volume (DESIGN.md P4: stop accepting writes
    /// before anything else). `reason` goes to the log and to clients that try to open the export.
    /// Returns the number of connections being closed; 0 when there is no such export.
    @discardableResult
    public func fence(_ name: String, reason: String) -> Int {
        withdraw(name, error: .fenced, reason: reason) { s in
            s.exports[name]?.fenceReason = reason
            s.exports[name]?.gate.close(.fenced)
        }
    }

    /// Closes the gate (in `change`, under the lock, so that no client attaches to the export
    /// after its clients were collected) and tells each client.
    private func withdraw(_ name: String, error: BlockDeviceError, reason: String,
                          _ change: (inout State) -> Void) -> Int {
        let clients = state.withLockedValue { s in
            change(&s)
            return Array(s.clients[name, default: [:]].values)
        }
        for client in clients { client.withdraw(error, reason) }
        return clients.count
    }

    /// Exports offered to clients (not fenced), sorted by name.
    public var all: [NBDExport] {
        state.withLockedValue { s in
            s.exports.values.filter { $0.fenceReason == nil }.map(\.export).sorted { $0.name < $1.name }
        }
    }

    /// The export for `name` if it is offered; the empty name means the only export, when there
    /// is exactly one.
    public func lookup(_ name: String) -> NBDExport? {
        state.withLockedValue { Self.entry(name, in: $0)?.export }
    }

    /// Why the export is fenced, or nil when it is not (or does not exist).
    public func fenceReason(_ name: String) -> String? {
        state.withLockedValue { $0.exports[name]?.fenceReason }
    }

    /// Clients in transmission phase per export name.
    public func clientCount(_ name: String) -> Int {
        state.withLockedValue { $0.clients[name]?.count ?? 0 }
    }

    private static func entry(_ name: String, in s: State) -> Entry? {
        let entry = name.isEmpty && s.exports.count == 1 ? s.exports.values.first : s.exports[name]
        return entry?.fenceReason == nil ? entry : nil
    }

    /// Looks up an offered export and counts `client` as attached to it, in one step, so a
    /// `remove` or `fence` either comes before (no export) or reaches this client.
    func attach(_ name: String, id: ObjectIdentifier, client: AttachedClient) -> (NBDExport, NBDExportGate)? {
        state.withLockedValue { s in
            guard let entry = Self.entry(name, in: s) else { return nil }
            s.clients[entry.export.name, default: [:]][id] = client
            return (entry.export, entry.gate)
        }
    }

    func detach(_ name: String, id: ObjectIdentifier) {
        state.withLockedValue { s in
            s.clients[name]?.removeValue(forKey: id)
            if s.clients[name]?.isEmpty == true { s.clients.removeValue(forKey: name) }
        }
    }
}

/// How the table reaches one attached connection: `withdraw` hops to the connection's event loop.
struct AttachedClient: Sendable {
    let withdraw: @Sendable (BlockDeviceError, _ reason: String) -> Void
}

/// Whether an export still serves requests. Shared by the table and every connection attached to
/// the export, and read on every request and every completion, hence an atomic rather than a lock.
final class NBDExportGate: Sendable {
    private static let open: UInt8 = 0, removed: UInt8 = 1, fenced: UInt8 = 2
    private let state = Atomic<UInt8>(NBDExportGate.open)

    /// The error every request gets once the export is gone; nil while it is open.
    var withdrawal: BlockDeviceError? {
        switch state.load(ordering: .acquiring) {
        case Self.open: return nil
        case Self.removed: return .shuttingDown
        default: return .fenced
        }
    }

    /// Closes the gate for good; the first reason stays (a fenced export that is then removed
    /// still says fenced).
    func close(_ error: BlockDeviceError) {
        let value = error == .fenced ? Self.fenced : Self.removed
        _ = state.compareExchange(expected: Self.open, desired: value, ordering: .acquiringAndReleasing)
    }
}
