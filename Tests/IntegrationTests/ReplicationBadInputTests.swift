import FerryCore
import FerrySite
import FerryWire
import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A primary driven by hand: the test process speaks for east over a real `PeerLinks` with east's
/// identity (made by `ferry init`), and writes the replication frames itself, so it can send what
/// a real primary never would.
final class HandDrivenPrimary: Sendable {
    struct Record: Sendable {
        var up: [LinkID] = []
        var down: [LinkID: String] = [:]
        var frames: [(link: LinkID, frame: VolumeFrame)] = []
        var undecodable: [String] = []
    }

    /// What the links reported, shared with their callbacks.
    final class Recorder: Sendable {
        private let state = Mutex(Record())
        func withLock<T>(_ body: (inout Record) -> T) -> T { state.withLock { body(&$0) } }
    }

    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let links: PeerLinks
    let record = Recorder()

    init(identity: SiteIdentity, west: PeerEndpoint) {
        var logger = Logger(label: "hand-driven-east") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = .warning
        links = PeerLinks(identity: identity, listen: (host: "127.0.0.1", port: 0), peers: [west],
                          group: group, logger: logger, dataFrameTypes: VolumeFrame.frameTypes)
        let record = self.record
        links.onLinkUp = { _, link in record.withLock { $0.up.append(link) } }
        links.onLinkDown = { _, link, reason in record.withLock { $0.down[link] = reason } }
        links.onFrame = { frame in
            do {
                let decoded = try VolumeFrame(frame: frame.frame)
                record.withLock { $0.frames.append((frame.link, decoded)) }
            } catch {
                record.withLock { $0.undecodable.append("\(error)") }
            }
        }
    }

    func start() async throws { try await links.start() }

    func stop() async {
        await links.stop()
        try? await group.shutdownGracefully()
    }

    /// Waits for a link to west that is up and is not `previous`.
    func nextLink(after previous: LinkID? = nil, timeout: Duration = .seconds(10)) async -> LinkID? {
        var found: LinkID?
        _ = await waitUntil(timeout) {
            found = record.withLock { r in r.up.last { $0 != previous && r.down[$0] == nil } }
            return found != nil
        }
        return found
    }

    func send(_ frames: [VolumeFrame], on link: LinkID) -> Bool {
        links.write(frames.map { $0.frame() }, to: "west", link: link)
    }

    func sendRaw(_ frames: [Frame], on link: LinkID) -> Bool {
        links.write(frames, to: "west", link: link)
    }

    func frames(on link: LinkID) -> [VolumeFrame] {
        record.withLock { $0.frames.filter { $0.link == link }.map(\.frame) }
    }

    func downReason(_ link: LinkID) -> String? { record.withLock { $0.down[link] } }

    /// The reasons of every `refuse` west sent on `link`.
    func refusals(on link: LinkID) -> [String] {
        frames(on: link).compactMap { if case .refuse(let reason) = $0.message { reason } else { nil } }
    }

    func position(on link: LinkID) -> ReplicaPosition? {
        frames(on: link).lazy.compactMap { if case .position(let p) = $0.message { p } else { nil } }.first
    }

    func durableAck(on link: LinkID) -> UInt64 {
        frames(on: link).reduce(0) { if case .ack(.durable, let i) = $1.message { max($0, i) } else { $0 } }
    }
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes.
func waitUntil(_ timeout: Duration, _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(50))
    }
    return condition()
}

/// Bad replication input against a real replica daemon (P4, P8): a stale epoch, an unknown
/// volume, a gap in the stream, a payload that does not match its range. West refuses with a
/// reason or closes the link, keeps running, and applies nothing of it.
@Suite(.serialized, .timeLimit(.minutes(5)))
struct ReplicationBadInputTests {
    enum BadInput: String, CaseIterable, Sendable {
        case staleEpoch, unknownVolume, sequenceGap, payloadShorterThanRange, truncatedCompressedPayload
    }

    static let volumeSize: UInt64 = 16 << 20
    static let epoch: UInt64 = 5
    static let generation: UInt64 = 77
    /// Where the bad writes point: zeros on west before and after.
    static let target = BlockRange(offset: 64 << 10, length: 4096)

    func item(epoch: UInt64 = epoch, index: UInt64, seq: UInt64, _ range: BlockRange) -> ReplicationItem {
        ReplicationItem(epoch: epoch, index: index, seq: seq, range: range, isZero: false)
    }

    func write(_ volume: String = "vm1", epoch: UInt64 = epoch, index: UInt64, seq: UInt64, _ range: BlockRange, byte: UInt8) -> VolumeFrame {
        VolumeFrame(volume: volume, message: .write(item(epoch: epoch, index: index, seq: seq, range)),
                    payload: ByteBuffer(repeating: byte, count: Int(range.length)))
    }

    func barrier(epoch: UInt64 = epoch, index: UInt64, seq: UInt64, _ kind: BarrierKind) -> VolumeFrame {
        VolumeFrame(volume: "vm1", message: .barrier(ReplicationBarrier(epoch: epoch, index: index, seq: seq, kind: kind)))
    }

    func open(_ volume: String = "vm1", epoch: UInt64 = epoch) -> VolumeFrame {
        VolumeFrame(volume: volume, message: .open(VolumeOpen(volume: volume, epoch: epoch, generation: Self.generation,
                                                               volumeSize: Self.volumeSize, mode: .sync)))
    }

    func bytes(_ path: String, _ range: BlockRange) throws -> [UInt8] {
        let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        try handle.seek(toOffset: range.offset)
        return [UInt8](try handle.read(upToCount: Int(range.length)) ?? Data())
    }

    func replicaState(_ west: TestSite) -> SiteStatus.ReplicaState? {
        (try? west.status())?.volumes.first { $0.name == "vm1" }?.replicaState
    }

    /// What must not change: everything but the byte count (which counts what arrived, refused or not).
    func essentials(_ s: SiteStatus.ReplicaState?) -> String {
        s.map { "epoch \($0.epoch), applied \($0.appliedSequence), consistent \($0.consistent), initialized \($0.initialized)" } ?? "none"
    }

    /// West's last log lines (without a crash's register dump).
    func logTail(_ west: TestSite) -> String {
        west.log().split(separator: "\n").filter { $0.hasPrefix("20") }.suffix(20).joined(separator: "\n")
    }

    /// The lines of a crash in west's log (a failed precondition and the crashed thread's frames
    /// in Ferry's own code), or "".
    func crashReport(_ west: TestSite) -> String {
        let lines = west.log().split(separator: "\n")
        guard let at = lines.firstIndex(where: { $0.contains("Precondition failed") || $0.contains("Fatal error") || $0.contains("Program crashed") }) else { return "" }
        let frames = lines[at...].filter { $0.contains("/Sources/Ferry") }.prefix(12)
        return "\nwest crashed: " + ([lines[at]] + frames).joined(separator: "\n")
    }

    @Test("west refuses bad replication input, keeps running and applies none of it",
          arguments: BadInput.allCases, [false, true])
    func badInputIsRefusedAndNothingIsApplied(_ bad: BadInput, thenMore: Bool) async throws {
        let dir = TempDir()
        let east = try TestSite(name: "east", root: dir.path)   // only its identity: the test is east
        let west = try TestSite(name: "west", root: dir.path)
        // West dials east at a port where nothing listens: only the test's dial makes a link, so
        // no duplicate-link switch-over moves a session under the test's feet.
        let volume = TestSite.Volume(name: "vm1", size: "16M", primary: "east", replicas: ["west": "{ mode: sync }"])
        try west.writeConfig(peers: [("east", freePort(), east.siteID)], volumes: [volume])
        try west.start()
        defer { west.stop() }
        let primary = HandDrivenPrimary(
            identity: try SiteIdentity.load(from: east.dataDirectory),
            west: PeerEndpoint(name: "west", host: "127.0.0.1", port: west.replicationPort, siteID: try #require(SiteID(west.siteID))))
        try await primary.start()
        do {
            try await exercise(bad, thenMore: thenMore, west: west, primary: primary)
        } catch {
            Issue.record("\(error)\(crashReport(west))\nwest log:\n\(logTail(west))")
        }
        await primary.stop()
    }

    func exercise(_ bad: BadInput, thenMore: Bool, west: TestSite, primary: HandDrivenPrimary) async throws {
        let image = west.imagePath("vm1")
        let first = BlockRange(offset: 0, length: 4096), second = BlockRange(offset: 4096, length: 4096)

        // A good session at epoch 5 first: a catch-up that makes west consistent, then a write and a flush.
        let link = try #require(await primary.nextLink(), "no link to west\n\(logTail(west))")
        #expect(primary.send([open()], on: link))
        #expect(await waitUntil(.seconds(10)) { primary.position(on: link) != nil }, "no position for open\n\(logTail(west))")
        #expect(primary.send([
            barrier(index: 1, seq: 0, .catchUpBegin), write(index: 2, seq: 1, first, byte: 0x11), barrier(index: 3, seq: 1, .catchUpEnd),
            write(index: 4, seq: 2, second, byte: 0x22), barrier(index: 5, seq: 2, .flush),
        ], on: link))
        #expect(await waitUntil(.seconds(10)) { primary.durableAck(on: link) >= 5 }, "no durable ack\n\(logTail(west))")
        let before = replicaState(west)
        #expect(essentials(before) == "epoch 5, applied 2, consistent true, initialized true")
        #expect(try bytes(image, first).allSatisfy { $0 == 0x11 } && bytes(image, second).allSatisfy { $0 == 0x22 })
        #expect(try bytes(image, Self.target).allSatisfy { $0 == 0 })

        // A new link for the bad input.
        primary.links.close(peer: "west", link: link, reason: "test: a new session")
        let bad1 = try #require(await primary.nextLink(after: link), "no second link\n\(logTail(west))")
        var expectLinkClosed = true
        let expected: String
        // The bad input, and what a sender would put behind it in the same burst (with `thenMore`):
        // frames that arrive after west has decided to refuse or close.
        var frames: [Frame] = []
        var more: [Frame] = []
        switch bad {
        case .staleEpoch:
            // A former primary at epoch 3.
            frames = [open(epoch: 3).frame()]
            more = [write(epoch: 3, index: 1, seq: 3, Self.target, byte: 0xEE).frame(), barrier(epoch: 3, index: 2, seq: 3, .flush).frame()]
            expected = "stale epoch 3: this replica of vm1 is at epoch 5"
        case .unknownVolume:
            frames = [open("nope").frame()]
            more = [write("nope", index: 1, seq: 3, Self.target, byte: 0xEE).frame()]
            expected = "volume \"nope\" is not replicated to site west"
            expectLinkClosed = false
        case .sequenceGap:
            #expect(primary.send([open()], on: bad1))
            #expect(await waitUntil(.seconds(10)) { primary.position(on: bad1) != nil })
            // Index 1 is fine and, in sync mode, written at once; index 3 skips 2.
            frames = [write(index: 1, seq: 3, BlockRange(offset: 8192, length: 4096), byte: 0x33).frame(),
                      write(index: 3, seq: 4, Self.target, byte: 0xEE).frame()]
            more = [barrier(index: 4, seq: 4, .flush).frame()]
            expected = "sequence gap: expected stream index 2, got 3"
        case .payloadShorterThanRange:
            #expect(primary.send([open()], on: bad1))
            #expect(await waitUntil(.seconds(10)) { primary.position(on: bad1) != nil })
            var frame = write(index: 1, seq: 3, Self.target, byte: 0xEE).frame().flattened()
            frame.payload = frame.payload.getSlice(at: frame.payload.readerIndex, length: frame.payload.readableBytes - 1)!
            frames = [frame]
            more = [barrier(index: 2, seq: 3, .flush).frame()]
            expected = "data is 4095 bytes but the range is 4096 bytes"
        case .truncatedCompressedPayload:
            #expect(primary.send([open()], on: bad1))
            #expect(await waitUntil(.seconds(10)) { primary.position(on: bad1) != nil })
            var encoder = ReplicationFrameEncoder(compress: true)
            var frame = encoder.frame(for: write(index: 1, seq: 3, Self.target, byte: 0xEE)).flattened()
            #expect(frame.flags == VolumeFrame.compressedFlag, "4 KiB of one byte did not compress")
            frame.payload = frame.payload.getSlice(at: frame.payload.readerIndex, length: frame.payload.readableBytes - 1)!
            frames = [frame]
            more = [barrier(index: 2, seq: 3, .flush).frame()]
            expected = "are not exactly one zstd frame"
        }
        #expect(primary.sendRaw(frames + (thenMore ? more : []), on: bad1))

        // West says why: a refuse frame (stream errors) or a goodbye naming the bad frame (malformed ones).
        let said = await waitUntil(.seconds(10)) {
            primary.refusals(on: bad1).contains { $0.contains(expected) } || (primary.downReason(bad1)?.contains(expected) ?? false)
        }
        #expect(said, "west did not say \"\(expected)\"; refusals: \(primary.refusals(on: bad1)), link down: \(primary.downReason(bad1) ?? "no")\nwest log:\n\(logTail(west))")
        #expect(west.log().contains(expected), "west's log does not say \"\(expected)\"")
        if expectLinkClosed {
            #expect(await waitUntil(.seconds(10)) { primary.downReason(bad1) != nil }, "west kept the link open after \(bad)")
        } else {
            #expect(primary.downReason(bad1) == nil, "west closed the link over a volume it does not have: \(primary.downReason(bad1) ?? "")")
        }

        // Nothing was applied, west runs on, and the position is what it was.
        #expect(west.isRunning, "west died: \(logTail(west))")
        #expect(essentials(replicaState(west)) == essentials(before), "\(crashReport(west))")
        #expect(try bytes(image, Self.target).allSatisfy { $0 == 0 }, "the bad write reached west's image")
        #expect(try bytes(image, first).allSatisfy { $0 == 0x11 } && bytes(image, second).allSatisfy { $0 == 0x22 })
        if bad == .sequenceGap {
            #expect(try bytes(image, BlockRange(offset: 8192, length: 4096)).allSatisfy { $0 == 0x33 }, "the write before the gap was not applied")
        }

        // And a good session still works afterwards: on the same link if west kept it, else on a new one.
        let good = expectLinkClosed ? try #require(await primary.nextLink(after: bad1), "no link after the bad input\n\(logTail(west))") : bad1
        let frameCount = primary.frames(on: good).count
        #expect(primary.send([open()], on: good))
        let answered = await waitUntil(.seconds(10)) { primary.frames(on: good).dropFirst(frameCount).contains { if case .position = $0.message { true } else { false } } }
        #expect(answered, "no position on a good open after the bad input\n\(logTail(west))")
        let position = primary.frames(on: good).dropFirst(frameCount).lazy.compactMap { if case .position(let p) = $0.message { p } else { nil } }.first
        #expect(position == ReplicaPosition(epoch: 5, generation: Self.generation, appliedSeq: 2, consistent: true, initialized: true))
        let third = BlockRange(offset: 12288, length: 4096)
        #expect(primary.send([write(index: 1, seq: 5, third, byte: 0x55), barrier(index: 2, seq: 5, .flush)], on: good))
        #expect(await waitUntil(.seconds(10)) { primary.durableAck(on: good) >= 2 }, "the good write after the bad input was not acked\n\(logTail(west))")
        #expect(try bytes(image, third).allSatisfy { $0 == 0x55 })
        #expect(replicaState(west)?.appliedSequence == 5)
    }
}
