import FerryCore
import Dispatch
import Logging
import NIOCore
import NIOPosix
import Testing

@testable import FerryWire

/// The duplicate-link rule, driven directly on two registries with real (idle) channels standing
/// in for the two TCP connections between a small-ID site and a large-ID site.
@Suite("Duplicate links")
struct LinkRegistryTests {
    struct Sites {
        let small: LinkRegistry  // the site with the smaller site ID
        let large: LinkRegistry
        let smallName: String
        let largeName: String

        init(log: LogCapture) throws {
            var identities = [try SiteIdentity.generate(siteName: "a"), try SiteIdentity.generate(siteName: "b")]
            identities.sort { $0.siteID.bytes.lexicographicallyPrecedes($1.siteID.bytes) }
            let (s, l) = (identities[0], identities[1])
            smallName = s.siteName
            largeName = l.siteName
            small = LinkRegistry(
                identity: s, peers: [PeerEndpoint(name: l.siteName, host: "127.0.0.1", port: 1, siteID: l.siteID)],
                logger: log.logger(s.siteName))
            large = LinkRegistry(
                identity: l, peers: [PeerEndpoint(name: s.siteName, host: "127.0.0.1", port: 1, siteID: s.siteID)],
                logger: log.logger(l.siteName))
        }
    }

    /// Real channels: the registry only compares and closes them.
    private func channels(_ count: Int, group: any EventLoopGroup) async throws -> [any Channel] {
        var result: [any Channel] = []
        for _ in 0..<count {
            result.append(try await ServerBootstrap(group: group).bind(host: "127.0.0.1", port: 0).get())
        }
        return result
    }

    private func ids(_ links: [LinkRegistry.LinkToClose]) -> [ObjectIdentifier] {
        links.map { ObjectIdentifier($0.channel) }
    }

    @Test("both sites end up on the link the smaller site dialed, in either order of arrival", arguments: [false, true])
    func duplicateRule(preferredFirst: Bool) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let sites = try Sites(log: LogCapture())
        let chans = try await channels(2, group: group)
        // c1 is dialed by the small site (outbound there, inbound at the large site); c2 the reverse.
        let (c1, c2) = (chans[0], chans[1])

        // At the large site: it never closes a duplicate itself, and prefers c1 as soon as it is up.
        if preferredFirst {
            #expect(sites.large.linkUp(sites.smallName, channel: c1, direction: .inbound).isEmpty)
            #expect(sites.large.linkUp(sites.smallName, channel: c2, direction: .outbound).isEmpty)
        } else {
            #expect(sites.large.linkUp(sites.smallName, channel: c2, direction: .outbound).isEmpty)
            #expect(sites.large.linkUp(sites.smallName, channel: c1, direction: .inbound).isEmpty)
        }
        #expect(sites.large.liveChannel(sites.smallName).map(ObjectIdentifier.init) == ObjectIdentifier(c1))
        #expect(sites.large.status().first?.direction == .inbound)

        // At the small site: it closes c2 once c1 is up and the large site has been heard on c1
        // since c2 came up: at once if c1 came up second, else on the large site's next ping on c1.
        if preferredFirst {
            #expect(sites.small.linkUp(sites.largeName, channel: c1, direction: .outbound).isEmpty)
            #expect(sites.small.linkUp(sites.largeName, channel: c2, direction: .inbound).isEmpty)
            #expect(sites.small.heardFrom(sites.largeName, channel: c2).isEmpty, "c2 is not the link in doubt")
            #expect(ids(sites.small.heardFrom(sites.largeName, channel: c1)) == [ObjectIdentifier(c2)])
            #expect(sites.small.heardFrom(sites.largeName, channel: c1).isEmpty, "closed once only")
        } else {
            #expect(sites.small.linkUp(sites.largeName, channel: c2, direction: .inbound).isEmpty)
            #expect(ids(sites.small.linkUp(sites.largeName, channel: c1, direction: .outbound)) == [ObjectIdentifier(c2)])
        }
        #expect(sites.small.liveChannel(sites.largeName).map(ObjectIdentifier.init) == ObjectIdentifier(c1))
        #expect(sites.small.status().first?.direction == .outbound)

        // c2 closing (the small site's goodbye) leaves both sites connected on c1.
        sites.small.channelClosed(c2, peer: sites.largeName, error: nil)
        sites.large.channelClosed(c2, peer: sites.smallName, error: nil)
        #expect(sites.small.status().first?.state == .connected)
        #expect(sites.large.status().first?.state == .connected)
        #expect(sites.large.liveChannel(sites.smallName).map(ObjectIdentifier.init) == ObjectIdentifier(c1))

        // c1 closing leaves both disconnected, with the reason.
        sites.small.channelClosed(c1, peer: sites.largeName, error: "gone")
        #expect(sites.small.status().first?.state == .disconnected)
        #expect(sites.small.status().first?.lastError == "gone")

        for channel in chans { try await channel.close() }
        try await group.shutdownGracefully()
    }

    @Test("a second link from the same dialer replaces the stale first one")
    func sameDirection() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let sites = try Sites(log: LogCapture())
        let chans = try await channels(2, group: group)
        #expect(sites.large.linkUp(sites.smallName, channel: chans[0], direction: .inbound).isEmpty)
        #expect(ids(sites.large.linkUp(sites.smallName, channel: chans[1], direction: .inbound)) == [ObjectIdentifier(chans[0])])
        #expect(sites.large.liveChannel(sites.smallName).map(ObjectIdentifier.init) == ObjectIdentifier(chans[1]))
        // The stale link's close does not take the peer down.
        sites.large.channelClosed(chans[0], peer: sites.smallName, error: "stale")
        #expect(sites.large.status().first?.state == .connected)
        for channel in chans { try await channel.close() }
        try await group.shutdownGracefully()
    }
}

extension LinkRegistryTests {
    /// The large-ID site crashes without its connections being closed and restarts at once. The
    /// small site still holds the link it dialed (c1), now stale; the restarted site has no link,
    /// so it dials (c2). The small site must not bounce c2 as a duplicate while c1 waits for
    /// dead-link detection: the restarted site would be refused for 5-6 s.
    @Test("a restarted larger-ID site is not bounced as a duplicate while the stale link times out")
    func restartedPeerIsNotBounced() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let sites = try Sites(log: LogCapture())
        let chans = try await channels(2, group: group)
        let (c1, c2) = (chans[0], chans[1])
        #expect(sites.small.linkUp(sites.largeName, channel: c1, direction: .outbound).isEmpty)

        // The restarted large site's link comes up: kept, and used, since c1 may be dead.
        #expect(ids(sites.small.linkUp(sites.largeName, channel: c2, direction: .inbound)).isEmpty)
        #expect(sites.small.liveChannel(sites.largeName).map(ObjectIdentifier.init) == ObjectIdentifier(c2))
        #expect(sites.small.status().first?.direction == .inbound)
        // A heartbeat on the fresh link changes nothing.
        #expect(sites.small.heardFrom(sites.largeName, channel: c2).isEmpty)

        // Dead-link detection closes c1; the peer stays connected on c2 throughout.
        sites.small.channelClosed(c1, peer: sites.largeName, error: "no frame from \(sites.largeName) for 5.0 s")
        #expect(sites.small.status().first?.state == .connected)
        #expect(sites.small.liveChannel(sites.largeName).map(ObjectIdentifier.init) == ObjectIdentifier(c2))

        for channel in chans { try await channel.close() }
        try await group.shutdownGracefully()
    }
}

extension LinkRegistryTests {
    /// The dial race seen from the small site when the large site's link comes up second: its own
    /// link (c1) is current, then in doubt while c2 is used, then trusted again once heard on.
    /// Each switch is a down then an up, and c1 comes back under a new ID.
    @Test("a link that becomes current again gets a new ID; down always precedes the next up")
    func recurrentLinkGetsNewID() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let sites = try Sites(log: LogCapture())
        let chans = try await channels(2, group: group)
        let (c1, c2) = (chans[0], chans[1])
        let events = Collected<String>()
        sites.small.handlers.callbacks.withLock {
            $0.linkUp = { _, link in events.append("up \(link.rawValue)") }
            $0.linkDown = { _, link, reason in events.append("down \(link.rawValue): \(reason)") }
        }
        #expect(sites.small.linkUp(sites.largeName, channel: c1, direction: .outbound).isEmpty)
        let first = try #require(sites.small.currentLinkID(of: sites.largeName))
        #expect(sites.small.linkUp(sites.largeName, channel: c2, direction: .inbound).isEmpty)
        let second = try #require(sites.small.currentLinkID(of: sites.largeName))
        #expect(second != first)
        #expect(sites.small.currentLink(first) == nil, "a link that is not current takes no writes")
        #expect(ids(sites.small.heardFrom(sites.largeName, channel: c1)) == [ObjectIdentifier(c2)])
        let third = try #require(sites.small.currentLinkID(of: sites.largeName))
        #expect(third != first && third != second)
        #expect(sites.small.currentLink(third)?.channel === c1)
        sites.small.channelClosed(c2, peer: sites.largeName, error: "closed as a duplicate")

        #expect(await eventually(.seconds(5)) { events.all.count == 5 })
        let all = events.all
        #expect(all.count == 5, "\(all)")
        guard all.count == 5 else { return }
        #expect(all[0] == "up \(first.rawValue)")
        #expect(all[1].hasPrefix("down \(first.rawValue): no longer the current link"))
        #expect(all[2] == "up \(second.rawValue)")
        #expect(all[3].hasPrefix("down \(second.rawValue): duplicate link; keeping the one dialed by"))
        #expect(all[4] == "up \(third.rawValue)")

        for channel in chans { try await channel.close() }
        try await group.shutdownGracefully()
    }
}

extension LinkRegistryTests {
    /// The dial race where the large site already sends on the small site's link while the small
    /// site still holds that link in doubt (its current link is the large site's): the data frame
    /// says the large site uses the link, as a heartbeat would. What the connection handler does
    /// with a frame it cannot deliver — heard from, then deliver again — makes the link current,
    /// and the frame reaches the layer above right after the link's up (held while the up waits
    /// for the other link's down on its own loop), instead of being dropped unnoticed.
    @Test("a data frame on the link in doubt settles the race and is delivered after that link's up")
    func frameOnLinkInDoubtIsHeldForItsUp() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let sites = try Sites(log: LogCapture())
        let chans = try await channels(2, group: group)
        let (c1, c2) = (chans[0], chans[1])
        try #require(c1.eventLoop !== c2.eventLoop, "the two connections must be on different loops")
        let events = Collected<String>()
        sites.small.handlers.callbacks.withLock {
            $0.linkUp = { _, link in events.append("up \(link.rawValue)") }
            $0.linkDown = { _, link, _ in events.append("down \(link.rawValue)") }
            $0.frame = { f in events.append("frame \(f.link.rawValue) \(String(buffer: f.frame.payload))") }
        }
        let l1 = sites.small.makeLink(peer: sites.largeName, channel: c1, direction: .outbound)
        #expect(sites.small.linkUp(sites.largeName, link: l1).isEmpty)
        let first = try #require(sites.small.currentLinkID(of: sites.largeName))
        let l2 = sites.small.makeLink(peer: sites.largeName, channel: c2, direction: .inbound)
        #expect(sites.small.linkUp(sites.largeName, link: l2).isEmpty)
        let second = try #require(sites.small.currentLinkID(of: sites.largeName))
        #expect(await eventually(.seconds(5)) { events.all.count == 3 }, "\(events.all)")

        // Hold c2's loop, so its down (and so c1's up) cannot fire before the frame arrives.
        let gate = DispatchSemaphore(value: 0)
        c2.eventLoop.execute { gate.wait() }
        let frame = Frame(type: FrameType(rawValue: 0x10), flags: 1, payload: ByteBuffer(string: "hello"))
        let dropped = try await c1.eventLoop.submit { !l1.deliver(frame) }.get()
        #expect(dropped, "in doubt and no up decided: not deliverable yet")
        #expect(ids(sites.small.heardFrom(sites.largeName, channel: c1)) == [ObjectIdentifier(c2)])
        let third = try #require(sites.small.currentLinkID(of: sites.largeName))
        let held = try await c1.eventLoop.submit { l1.deliver(frame) }.get()
        #expect(held, "c1 is current now: the frame waits for its up")
        let later = Frame(type: FrameType(rawValue: 0x10), flags: 1, payload: ByteBuffer(string: "later"))
        #expect(try await c1.eventLoop.submit { l1.deliver(later) }.get())
        #expect(events.all.count == 3, "nothing is reported while c2's down cannot fire: \(events.all)")
        gate.signal()

        #expect(await eventually(.seconds(5)) { events.all.count == 7 }, "\(events.all)")
        #expect(events.all == ["up \(first.rawValue)", "down \(first.rawValue)", "up \(second.rawValue)",
                               "down \(second.rawValue)", "up \(third.rawValue)",
                               "frame \(third.rawValue) hello", "frame \(third.rawValue) later"])
        for channel in chans { try await channel.close() }
        try await group.shutdownGracefully()
    }
}
