import NIOConcurrencyHelpers

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

/// The set of exports, shared by every connection; exports may come and go while the server runs
/// (a connection keeps the device it opened).
public final class NBDExportTable: Sendable {
    private struct State {
        var exports: [String: NBDExport] = [:]
        var clients: [String: Int] = [:]
    }
    private let state = NIOLockedValueBox(State())

    public init() {}

    public func add(_ export: NBDExport) {
        state.withLockedValue { $0.exports[export.name] = export }
    }

    public func remove(named name: String) {
        state.withLockedValue { _ = $0.exports.removeValue(forKey: name) }
    }

    /// Exports sorted by name.
    public var all: [NBDExport] {
        state.withLockedValue { $0.exports.values.sorted { $0.name < $1.name } }
    }

    /// The export for `name`; the empty name means the only export, when there is exactly one.
    public func lookup(_ name: String) -> NBDExport? {
        state.withLockedValue { s in
            if name.isEmpty, s.exports.count == 1 { return s.exports.values.first }
            return s.exports[name]
        }
    }

    /// Clients in transmission phase per export name.
    public func clientCount(_ name: String) -> Int {
        state.withLockedValue { $0.clients[name, default: 0] }
    }

    func clientAttached(_ name: String) {
        state.withLockedValue { $0.clients[name, default: 0] += 1 }
    }

    func clientDetached(_ name: String) {
        state.withLockedValue { $0.clients[name, default: 0] -= 1 }
    }
}
