import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Malformed input on any port closes that connection only (P8): random and mutated NBD
/// handshakes and requests, random bytes on the peer port — then a real client still works.
@Suite(.serialized)
struct BadInputTests {
    /// A deterministic generator, so a failure can be replayed from the printed seed.
    struct SplitMix: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9e37_79b9_7f4a_7c15
            var z = state
            z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
            z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
            return z ^ (z >> 31)
        }
    }

    /// Connects to 127.0.0.1:port, sends `bytes`, reads whatever comes back for a moment, closes.
    /// Returns false if the connection could not be made at all.
    @discardableResult
    func poke(port: Int, _ bytes: [UInt8], readFor micros: Int = 20_000) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var tv = timeval(tv_sec: 0, tv_usec: micros)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var tv2 = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv2, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(port).bigEndian
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        guard ok else { return false }
        if !bytes.isEmpty { _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } }
        var sink = [UInt8](repeating: 0, count: 65536)
        for _ in 0..<4 { if recv(fd, &sink, sink.count, 0) <= 0 { break } }
        return true
    }

    func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }

    /// A valid client side of a handshake (fixed newstyle, GO for `export`), then `requests`.
    func validHandshake(export: String) -> [UInt8] {
        var b = be(UInt32(3))
        b += be(UInt64(0x4948_4156_454F_5054)) + be(UInt32(8)) + be(UInt32(0))           // STRUCTURED_REPLY
        let name = Array(export.utf8)
        let go = be(UInt32(name.count)) + name + be(UInt16(1)) + be(UInt16(3))
        b += be(UInt64(0x4948_4156_454F_5054)) + be(UInt32(7)) + be(UInt32(go.count)) + go
        return b
    }

    func request(type: UInt16, flags: UInt16 = 0, offset: UInt64, length: UInt32, payload: [UInt8] = []) -> [UInt8] {
        be(UInt32(0x2560_9513)) + be(flags) + be(type) + be(UInt64(0xfeed)) + be(offset) + be(length) + payload
    }

    @Test func garbageOnEveryPortLeavesTheDaemonServing() throws {
        let qemuIO = try requireTool("qemu-io", package: "qemu-utils")
        let dir = TempDir()
        let site = try TestSite(name: "east", root: dir.path)
        // The fuzz talks to vm1, where a mutated request may legitimately write anywhere; "keep"
        // holds data that no mutation of the handshake (at most 4 bytes) can reach.
        try site.writeConfig(volumes: [.init(name: "vm1", size: "16M", primary: "east"),
                                       .init(name: "keep", size: "16M", primary: "east")])
        try site.start()
        defer { site.stop() }
        try run(qemuIO, ["-f", "raw", "-c", "write -P 0x6d 0 1M", "-c", "flush", site.uri("keep")])

        let seed = ProcessInfo.processInfo.environment["FERRY_FUZZ_SEED"].flatMap(UInt64.init) ?? UInt64.random(in: 1...UInt64.max)
        print("BadInputTests seed \(seed) (replay: FERRY_FUZZ_SEED=\(seed) swift test --filter BadInputTests)")
        var rng = SplitMix(state: seed)
        let handshake = validHandshake(export: "vm1")
        let goodRequests = request(type: 0, offset: 0, length: 4096)
            + request(type: 1, offset: 2 << 20, length: 512, payload: [UInt8](repeating: 0x99, count: 512))
            + request(type: 3, offset: 0, length: 0)
            + request(type: 7, offset: 0, length: 1 << 20)
            + request(type: 6, flags: 0x10, offset: 3 << 20, length: 65536)
            + request(type: 0, offset: 16 << 20, length: 4096)          // past the end
            + request(type: 0, offset: 1, length: 4096)                 // misaligned
            + request(type: 9, offset: 0, length: 0)                    // unknown command
            + request(type: 2, offset: 0, length: 0)                    // disconnect

        for round in 0..<300 {
            var bytes: [UInt8]
            switch round % 5 {
            case 0:  // pure noise
                bytes = (0..<Int.random(in: 0...3000, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            case 1:  // a handshake with a few flipped bytes
                bytes = handshake
                for _ in 0..<Int.random(in: 1...4, using: &rng) {
                    bytes[Int.random(in: 0..<bytes.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                }
            case 2:  // a handshake cut short
                bytes = Array(handshake.prefix(Int.random(in: 0..<handshake.count, using: &rng)))
            case 3:  // a good handshake, then mutated requests (lengths and types included)
                var r = goodRequests
                for _ in 0..<Int.random(in: 1...6, using: &rng) {
                    r[Int.random(in: 0..<r.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                }
                bytes = handshake + r
            default:  // a good handshake, then noise
                bytes = handshake + (0..<Int.random(in: 1...2000, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            }
            #expect(poke(port: site.nbdPort, bytes), "NBD port stopped accepting at round \(round) (seed \(seed))")
            #expect(site.isRunning, "daemon died at round \(round) (seed \(seed)); log:\n\(site.log(tail: 30))")
            if !site.isRunning { return }
        }
        // The untouched good stream works too (sanity of the generator).
        #expect(poke(port: site.nbdPort, handshake + goodRequests, readFor: 200_000))

        // Random bytes and a truncated TLS ClientHello on the peer port.
        for _ in 0..<50 {
            let noise = (0..<Int.random(in: 1...4000, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            #expect(poke(port: site.replicationPort, noise))
        }
        #expect(poke(port: site.replicationPort, [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]))
        #expect(site.isRunning, "daemon died from peer-port noise; log:\n\(site.log(tail: 30))")

        // A valid client is still served correctly, and the data written before is intact.
        let kept = try run(qemuIO, ["-f", "raw", "-r", "-c", "read -P 0x6d 0 1M", site.uri("keep")])
        #expect(!kept.output.contains("Pattern verification failed"), "data written before the fuzz changed: \(kept.output)")
        let ok = try run(qemuIO, ["-f", "raw", "-c", "write -P 0x1f 4M 1M", "-c", "read -P 0x1f 4M 1M", site.uri("vm1")])
        #expect(!ok.output.contains("Pattern verification failed"), "\(ok.output)")
        let status = try site.status()
        #expect(status.site.name == "east")
    }
}
