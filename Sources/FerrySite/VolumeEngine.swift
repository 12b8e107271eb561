import FerryCore
import FerryNBD
import FerryStore
import FerryVolume
import FerryWire
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// The site's replicated volumes at run time: which runtime serves each volume, and the routing of
/// peer-link events and replication frames to them.
///
/// A frame is routed by its volume name and by what this site is for that volume: the primary's
/// runtime takes acks, positions and refusals from its replicas; a replica's runtime takes the
/// stream from its primary. A frame for a volume this site does not replicate is answered with a
/// refusal naming the volume, and nothing is applied.
final class VolumeEngine: Sendable {
    let siteName: String
    let links: any VolumeLinks
    let logger: Logger
    /// Which runtime serves each volume; changed by promote and demote.
    private let tables: NIOLockedValueBox<Tables>
    /// Link events reach the runtimes in order, but never synchronously from inside the link
    /// layer: a runtime may be the one whose send made the link close (NIO can fire
    /// channelInactive from inside a flush), and it would re-enter its own lock.
    private let linkEvents = DispatchQueue(label: "ferry.volume-link-events")
    /// The link each peer was last reported up on (nil after its down).
    private let upLinks = NIOLockedValueBox<[String: LinkID]>([:])
    /// Online verify requests waiting for their hashes, by ID.
    private let verifyWaiters = NIOLockedValueBox<[UInt64: HashWaiter]>([:])
    private let verifyIDs = NIOLockedValueBox<UInt64>(0)
    /// Where primary runtimes run their timers (set by ``start(on:)``).
    private let timerLoop = NIOLockedValueBox<(any EventLoop)?>(nil)

    struct Tables: Sendable {
        var primaries: [String: PrimaryVolumeRuntime]
        var replicas: [String: ReplicaVolumeRuntime]
        /// For each volume this site is primary of: the peers it replicates to.
        var primaryPeers: [String: Set<String>]
    }

    init(siteName: String, primaries: [String: PrimaryVolumeRuntime], replicas: [String: ReplicaVolumeRuntime],
         primaryPeers: [String: Set<String>], links: any VolumeLinks, logger: Logger) {
        self.siteName = siteName
        self.tables = NIOLockedValueBox(Tables(primaries: primaries, replicas: replicas, primaryPeers: primaryPeers))
        self.links = links
        self.logger = logger
    }

    var isEmpty: Bool { tables.withLockedValue { $0.primaries.isEmpty && $0.replicas.isEmpty } }

    func linkUp(peer: String, link: LinkID) {
        upLinks.withLockedValue { $0[peer] = link }
        linkEvents.async { [self] in
            let t = tables.withLockedValue { $0 }
            for (volume, runtime) in t.primaries where t.primaryPeers[volume]?.contains(peer) == true {
                runtime.linkUp(peer: peer, link: link)
            }
        }
    }

    func linkDown(peer: String, link: LinkID) {
        upLinks.withLockedValue { if $0[peer] == link { $0[peer] = nil } }
        linkEvents.async { [self] in
            let t = tables.withLockedValue { $0 }
            for (volume, runtime) in t.primaries where t.primaryPeers[volume]?.contains(peer) == true {
                runtime.linkDown(peer: peer, link: link)
            }
            for runtime in t.replicas.values { runtime.linkDown(link: link) }
        }
    }

    /// The link `peer` was last reported up on, if it is still up.
    func reportedLink(_ peer: String) -> LinkID? { upLinks.withLockedValue { $0[peer] } }

    /// A replication frame from `peer`. A malformed frame resets the link (the caller closes it).
    func received(_ frame: VolumeFrame, from peer: String, link: LinkID) {
        let (primary, replica) = tables.withLockedValue { ($0.primaries[frame.volume], $0.replicas[frame.volume]) }
        switch frame.message {
        case .verify(let request):
            // Online verify: a replica hashes its image; a primary is never asked.
            guard let replica else {
                return refuse(frame.volume, peer: peer, link: link, "site \(siteName) holds no replica of \(frame.volume) to verify")
            }
            replica.answerVerify(request, to: peer, link: link)
            return
        case .hashes(let id, let hashes):
            let waiter = verifyWaiters.withLockedValue { $0.removeValue(forKey: id) }
            waiter?.deliver(hashes)
            return
        default:
            break
        }
        if let runtime = primary {
            switch frame.message {
            case .position, .ack, .refuse:
                runtime.received(frame.message, from: peer, link: link)
            case .open where tables.withLockedValue({ $0.primaryPeers[frame.volume]?.contains(peer) == true }):
                // Another primary of the volume: both machines compare histories and the one
                // whose line was replaced gives way (P4, P6; PrimaryVolume+Rivals).
                runtime.received(frame.message, from: peer, link: link)
            case .open:
                refuse(frame.volume, peer: peer, link: link,
                       "site \(siteName) is the primary of volume \(frame.volume) and does not replicate it with \(peer)")
            case .write, .region, .barrier, .handoff, .verify, .hashes:
                refuse(frame.volume, peer: peer, link: link,
                       "site \(siteName) is the primary of volume \(frame.volume) and does not take a stream for it")
            }
            return
        }
        if let runtime = replica {
            runtime.received(frame.message, payload: frame.payload, from: peer, link: link)
            return
        }
        if case .refuse = frame.message { return }
        refuse(frame.volume, peer: peer, link: link,
               "volume \"\(frame.volume)\" is not replicated to site \(siteName) (check volumes.\(frame.volume).replicas on both sites)")
    }

    private func refuse(_ volume: String, peer: String, link: LinkID, _ reason: String) {
        logger.warning("refusing replication of \(volume) from \(peer): \(reason)")
        links.send([VolumeFrame(volume: volume, message: .refuse(reason: reason), payload: nil)], to: peer, link: link)
    }

    func start(on loop: any EventLoop) {
        timerLoop.withLockedValue { $0 = loop }
        for runtime in tables.withLockedValue({ Array($0.primaries.values) }) { runtime.start(on: loop) }
    }

    /// The replica of `volume` stops and `runtime` becomes its primary, replicating to `peers`;
    /// peers whose links are up are told at once.
    func becomePrimary(_ volume: String, runtime: PrimaryVolumeRuntime, peers: Set<String>) {
        let replica = tables.withLockedValue { t -> ReplicaVolumeRuntime? in
            t.primaries[volume] = runtime
            t.primaryPeers[volume] = peers
            return t.replicas.removeValue(forKey: volume)
        }
        replica?.stop()
        if let loop = timerLoop.withLockedValue({ $0 }) { runtime.start(on: loop) }
        let up = upLinks.withLockedValue { $0 }
        linkEvents.async {
            for peer in peers.sorted() { if let link = up[peer] { runtime.linkUp(peer: peer, link: link) } }
        }
    }

    /// The primary of `volume` stops (after its writes are flushed) and `runtime` takes the
    /// stream from whichever peer opens one.
    /// Called with nil first, to stop the primary before the replica's state is prepared.
    func becomeSecondary(_ volume: String, runtime: ReplicaVolumeRuntime?) {
        let primary = tables.withLockedValue { t -> PrimaryVolumeRuntime? in
            t.replicas[volume] = runtime
            t.primaryPeers[volume] = nil
            return t.primaries.removeValue(forKey: volume)
        }
        primary?.stop()
    }

    /// Tells `peers` with a link up that this site no longer is the primary of `volume`: their
    /// replicas end the stream (so a promotion there is not refused as if this site still were).
    func sayNotPrimary(_ volume: String, to peers: [String]) {
        for peer in peers {
            guard let link = reportedLink(peer) else { continue }
            links.send([VolumeFrame(volume: volume, message: .refuse(reason: "site \(siteName) is no longer the primary of \(volume) (demoted)"),
                                    payload: nil)], to: peer, link: link)
        }
    }

    /// Online verify: asks `peer` for the hashes of `request`'s blocks and waits for them (nil on
    /// timeout, on a link that is down, or when the peer could not read its image).
    func remoteHashes(_ volume: String, peer: String, _ request: VerifyRequest, timeoutSeconds: Double) -> [UInt64]? {
        guard let link = reportedLink(peer) else { return nil }
        let waiter = HashWaiter()
        var numbered = request
        numbered.id = verifyIDs.withLockedValue { $0 += 1; return $0 }
        verifyWaiters.withLockedValue { $0[numbered.id] = waiter }
        links.send([VolumeFrame(volume: volume, message: .verify(numbered), payload: nil)], to: peer, link: link)
        let hashes = waiter.wait(seconds: timeoutSeconds)
        verifyWaiters.withLockedValue { _ = $0.removeValue(forKey: numbered.id) }
        return hashes.flatMap { $0.isEmpty ? nil : $0 }
    }

    /// Switchover: after this site stepped down, `peer` is to take `volume` over.
    func handOver(_ volume: String, to peer: String, _ handoff: VolumeHandoff) -> Bool {
        guard let link = reportedLink(peer) else { return false }
        links.send([VolumeFrame(volume: volume, message: .handoff(handoff), payload: nil)], to: peer, link: link)
        return true
    }

    func primary(_ volume: String) -> PrimaryVolumeRuntime? { tables.withLockedValue { $0.primaries[volume] } }
    func replica(_ volume: String) -> ReplicaVolumeRuntime? { tables.withLockedValue { $0.replicas[volume] } }

    func stop() {
        let t = tables.withLockedValue { $0 }
        for runtime in t.primaries.values { runtime.stop() }
        for runtime in t.replicas.values { runtime.stop() }
    }
}

extension PrimaryVolume.Config {
    /// A volume's generation ID (a UUID in the catalog) as the 64-bit number the machines compare.
    static func generationNumber(_ uuid: String) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in uuid.utf8 {
            hash ^= UInt64(byte)
            hash = hash &* 0x100_0000_01b3
        }
        return max(1, hash)
    }
}

/// One online-verify request waiting for its answer.
final class HashWaiter: Sendable {
    private let result = NIOLockedValueBox<[UInt64]?>(nil)
    private let done = DispatchSemaphore(value: 0)

    func deliver(_ hashes: [UInt64]) {
        result.withLockedValue { $0 = hashes }
        done.signal()
    }

    func wait(seconds: Double) -> [UInt64]? {
        guard done.wait(timeout: .now() + seconds) == .success else { return nil }
        return result.withLockedValue { $0 }
    }
}
