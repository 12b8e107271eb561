import FerryCore
import NIOCore

/// A client request the primary machine has accepted and not yet answered.
struct PendingIO: Sendable {
    enum Kind: Sendable {
        case write(ByteBuffer)
        case zero(mayPunchHole: Bool)
        case flush
    }
    var kind: Kind
    var range: BlockRange?
    var promise: EventLoopPromise<Void>?
}

/// Work decided under the runtime's lock and done after it is released: slow or blocking
/// operations, and completing client futures (which may run callbacks).
struct DeferredWork: Sendable {
    var localWrites: [LocalWrite] = []
    /// A link a write went out on in this work: the local writes may wait until it is sent.
    var sentOn: LinkID?
    var offloaded: [UInt64] = []           // zero or flush requests for the thread pool, by seq
    var completions: [(EventLoopPromise<Void>, BlockDeviceErrorBox?)] = []
    var persistNow: (token: UInt64, metadata: PrimaryVolume.Metadata)?
    var events: [VolumeEvent] = []
    var closes: [(peer: String, link: LinkID, reason: String)] = []
    var ackSamples: [AckSample] = []

    var isEmpty: Bool {
        localWrites.isEmpty && offloaded.isEmpty && completions.isEmpty && persistNow == nil
            && events.isEmpty && closes.isEmpty && ackSamples.isEmpty
    }
}

/// A client's write to carry out on the image.
typealias LocalWrite = (seq: UInt64, offset: UInt64, data: ByteBuffer)

/// Local writes waiting for their frames to be sent (``PrimaryVolumeRuntime/writeAfterSending(_:on:)``).
struct LocalWriteQueue: Sendable {
    var writes: [LocalWrite] = []
    var scheduled = false
}

/// An error for a client future, carried across the lock boundary.
struct BlockDeviceErrorBox: Sendable {
    var message: String
}
