import NIOCore
import Testing

@testable import FerryWire

@Suite("Pong matching")
struct OutstandingPingsTests {
    private let start = NIODeadline.uptimeNanoseconds(1_000_000_000)

    @Test("a pong is timed from when its own ping was sent, once")
    func matched() {
        var pings = OutstandingPings()
        pings.sent(nonce: 1, at: start)
        pings.sent(nonce: 2, at: start + .milliseconds(1000))
        #expect(pings.answered(nonce: 2, at: start + .milliseconds(1030)) == .milliseconds(30))
        #expect(pings.answered(nonce: 1, at: start + .milliseconds(1040)) == .milliseconds(1040), "answers may come out of order")
        #expect(pings.answered(nonce: 2, at: start + .milliseconds(1050)) == nil, "already answered")
        #expect(pings.count == 0)
    }

    @Test("a pong for a ping never sent gives no RTT")
    func unknown() {
        var pings = OutstandingPings()
        pings.sent(nonce: 5, at: start)
        #expect(pings.answered(nonce: 6, at: start + .milliseconds(1)) == nil)
        #expect(pings.answered(nonce: 0, at: start + .milliseconds(1)) == nil)
        #expect(pings.count == 1)
    }

    @Test("only the last 8 unanswered pings are remembered")
    func bounded() {
        var pings = OutstandingPings()
        for nonce in UInt64(1)...20 { pings.sent(nonce: nonce, at: start + .seconds(Int64(nonce))) }
        #expect(pings.count == OutstandingPings.limit)
        #expect(pings.answered(nonce: 12, at: start + .seconds(30)) == nil, "pushed out by newer pings")
        #expect(pings.answered(nonce: 13, at: start + .seconds(30)) == .seconds(17))
        #expect(pings.answered(nonce: 20, at: start + .seconds(30)) == .seconds(10))
    }
}
