import FerrySite
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Peer links between real daemons: pinned mutual TLS, refusal of a wrong certificate,
/// reconnection after a peer restarts.
@Suite(.serialized)
struct PeerLinkTests {
    func peerState(_ site: TestSite, _ peer: String) -> String? {
        (try? site.status())?.peers.first { $0.name == peer }?.state.rawValue
    }

    @Test func pinnedPeersConnectAndReconnectAfterARestart() throws {
        let dir = TempDir()
        let east = try TestSite(name: "east", root: dir.path)
        let west = try TestSite(name: "west", root: dir.path)
        try east.writeConfig(peers: [("west", west.replicationPort, west.siteID)],
                             volumes: [.init(name: "vm1", size: "16M", primary: "east")])
        try west.writeConfig(peers: [("east", east.replicationPort, east.siteID)],
                             volumes: [.init(name: "vm1", size: "16M", primary: "east")])
        try east.start()
        defer { east.stop() }
        try west.start()
        defer { west.stop() }

        #expect(eventually(.seconds(15)) { peerState(east, "west") == "connected" && peerState(west, "east") == "connected" },
                "east log:\n\(east.log(tail: 20))\nwest log:\n\(west.log(tail: 20))")
        #expect(eventually(.seconds(5)) { (try? east.status())?.peers.first?.rttMilliseconds != nil }, "no round-trip time measured")
        let status = try west.status()
        // vm1 has no replicas: east alone holds it, and west's status lists no volume (it used to
        // list vm1 as a secondary that `promote` then said west lacked).
        #expect(status.volumes.isEmpty, "\(status.volumes.map(\.name))")
        #expect((try? east.status())?.volumes.first?.role == "primary")

        // Cut the link by stopping west: east notices, and reconnects when west is back.
        #expect(west.stop() == 0)
        #expect(eventually(.seconds(15)) { peerState(east, "west") != "connected" }, "east still thinks west is connected")
        try west.start()
        let restarted = ContinuousClock.now
        #expect(eventually(.seconds(15)) { peerState(east, "west") == "connected" && peerState(west, "east") == "connected" },
                "no reconnect; east log:\n\(east.log(tail: 20))")
        let took = ContinuousClock.now - restarted
        #expect(took < .seconds(10), "reconnect took \(took)")

        // kill -9 cuts the connection without a goodbye; it is noticed too.
        west.kill9()
        #expect(eventually(.seconds(15)) { peerState(east, "west") != "connected" })
        try west.start()
        #expect(eventually(.seconds(15)) { peerState(east, "west") == "connected" })
    }

    @Test func aPeerWithTheWrongCertificateIsRefused() throws {
        let dir = TempDir()
        let east = try TestSite(name: "east", root: dir.path)
        let west = try TestSite(name: "west", root: dir.path)
        let impostor = try TestSite(name: "west", root: dir.path + "/other")
        // east pins the real west; the impostor has another certificate on west's address.
        try east.writeConfig(peers: [("west", west.replicationPort, west.siteID)])
        let impostorConfig = """
            site:
              name: west
              data: \(impostor.dataDirectory)
            listen:
              replication: 127.0.0.1:\(west.replicationPort)
              nbd: 127.0.0.1:\(impostor.nbdPort)
              admin-socket: \(impostor.adminSocket)
            peers:
              east:
                address: 127.0.0.1:\(east.replicationPort)
                site-id: \(east.siteID)
            """
        try impostorConfig.write(toFile: impostor.configPath, atomically: true, encoding: .utf8)
        try east.start()
        defer { east.stop() }
        try impostor.start()
        defer { impostor.stop() }

        usleep(4_000_000)
        #expect(peerState(east, "west") != "connected")
        #expect(peerState(impostor, "east") != "connected")
        // The refusal names both fingerprints.
        let log = east.log() + impostor.log()
        #expect(log.contains("refused"), "no refusal logged:\n\(east.log(tail: 20))")
        #expect(log.contains(String(impostor.siteID.prefix(9))), "the presented ID is not in the log")
        #expect(log.contains(String(west.siteID.prefix(9))), "the pinned ID is not in the log")

        // The real west, with the right certificate, connects.
        impostor.stop()
        try west.writeConfig(peers: [("east", east.replicationPort, east.siteID)])
        try west.start()
        defer { west.stop() }
        #expect(eventually(.seconds(15)) { peerState(east, "west") == "connected" && peerState(west, "east") == "connected" })
    }
}
