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
    let primaries: [String: PrimaryVolumeRuntime]
    let replicas: [String: ReplicaVolumeRuntime]
    /// For each volume this site is primary of: the peers it replicates to.
    let primaryPeers: [String: Set<String>]
    let links: any VolumeLinks
    let logger: Logger
    /// Link events reach the runtimes in order, but never synchronously from inside the link
    /// layer: a runtime may be the one whose send made the link close (NIO can fire
    /// channelInactive from inside a flush), and it would re-enter its own lock.
    private let linkEvents = DispatchQueue(label: "ferry.volume-link-events")
    /// The link each peer was last reported up on (nil after its down).
    private let upLinks = NIOLockedValueBox<[String: LinkID]>([:])

    init(siteName: String, primaries: [String: PrimaryVolumeRuntime], replicas: [String: ReplicaVolumeRuntime],
         primaryPeers: [String: Set<String>], links: any VolumeLinks, logger: Logger) {
        self.siteName = siteName
        self.primaries = primaries
        self.replicas = replicas
        self.primaryPeers = primaryPeers
        self.links = links
        self.logger = logger
    }

    var isEmpty: Bool { primaries.isEmpty && replicas.isEmpty }

    func linkUp(peer: String, link: LinkID) {
        upLinks.withLockedValue { $0[peer] = link }
        linkEvents.async { [self] in
            for (volume, runtime) in primaries where primaryPeers[volume]?.contains(peer) == true {
                runtime.linkUp(peer: peer, link: link)
            }
        }
    }

    func linkDown(peer: String, link: LinkID) {
        upLinks.withLockedValue { if $0[peer] == link { $0[peer] = nil } }
        linkEvents.async { [self] in
            for (volume, runtime) in primaries where primaryPeers[volume]?.contains(peer) == true {
                runtime.linkDown(peer: peer, link: link)
            }
            for runtime in replicas.values { runtime.linkDown(link: link) }
        }
    }

    /// The link `peer` was last reported up on, if it is still up.
    func reportedLink(_ peer: String) -> LinkID? { upLinks.withLockedValue { $0[peer] } }

    /// A replication frame from `peer`. A malformed frame resets the link (the caller closes it).
    func received(_ frame: VolumeFrame, from peer: String, link: LinkID) {
        if let runtime = primaries[frame.volume] {
            switch frame.message {
            case .position, .ack, .refuse:
                runtime.received(frame.message, from: peer, link: link)
            case .open, .write, .region, .barrier:
                // Two sites both think they are primary: refuse; failover (issue 10) decides.
                refuse(frame.volume, peer: peer, link: link,
                       "site \(siteName) is the primary of volume \(frame.volume) and does not take a stream for it")
            }
            return
        }
        if let runtime = replicas[frame.volume] {
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
        for runtime in primaries.values { runtime.start(on: loop) }
    }

    func stop() {
        for runtime in primaries.values { runtime.stop() }
        for runtime in replicas.values { runtime.stop() }
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
