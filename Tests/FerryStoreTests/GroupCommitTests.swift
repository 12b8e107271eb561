import Foundation
import Synchronization
import Testing
@testable import FerryStore

struct GroupCommitTests {
    /// One logical clock for the whole test: each request and each run's start takes a tick.
    final class Ledger: Sendable {
        struct State {
            var tick: UInt64 = 0
            var asked: [Int: UInt64] = [:]          // member → tick when it joined
            var served: [Int: [UInt64]] = [:]       // member → start tick of each run that served it
            var runs = 0
            var overlapping = 0
            var inRun = false
        }
        let state = Mutex(State())
        func ask(_ member: Int) { state.withLock { $0.tick += 1; $0.asked[member] = $0.tick } }
        func startRun() -> UInt64 {
            state.withLock { s in
                if s.inRun { s.overlapping += 1 }
                s.inRun = true
                s.runs += 1
                s.tick += 1
                return s.tick
            }
        }
        func endRun(_ batch: [Int], started: UInt64) {
            state.withLock { s in
                s.inRun = false
                for m in batch { s.served[m, default: []].append(started) }
            }
        }
    }

    /// Four threads ask for 400 flushes between writes while runs take a while: every flush is
    /// served exactly once, by a run that started after it was asked for (never by the run going
    /// on when it joined), runs never overlap, and runs are fewer than flushes (they are shared).
    @Test func aFlushIsServedOnlyByARunThatStartsAfterIt() async throws {
        let group = GroupCommit<Int>()
        let ledger = Ledger()
        let queue = DispatchQueue(label: "pool", attributes: .concurrent)
        let perThread = 100
        let done = DispatchGroup()
        for t in 0..<4 {
            done.enter()
            Thread {
                for i in 0..<perThread {
                    let member = t * perThread + i
                    ledger.ask(member)
                    if group.join(member) {
                        queue.async {
                            group.drain { batch in
                                let started = ledger.startRun()
                                usleep(200)                      // the fdatasync
                                ledger.endRun(batch, started: started)
                            }
                        }
                    }
                    usleep(UInt32(50 + (member * 37) % 150))  // the next write
                }
                done.leave()
            }.start()
        }
        done.wait()
        let deadline = ContinuousClock.now + .seconds(30)
        while ledger.state.withLock({ $0.served.count }) < 4 * perThread, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(10))
        }
        let s = ledger.state.withLock { $0 }
        #expect(s.served.count == 4 * perThread, "served \(s.served.count) of \(4 * perThread)")
        for (member, starts) in s.served {
            #expect(starts.count == 1, "flush \(member) was served \(starts.count) times")
            let asked = try #require(s.asked[member])
            #expect(starts.allSatisfy { $0 > asked }, "flush \(member), asked at tick \(asked), was served by a run that started at \(starts)")
        }
        #expect(s.overlapping == 0, "\(s.overlapping) runs overlapped another")
        #expect(s.runs < 4 * perThread, "\(s.runs) runs for \(4 * perThread) flushes: none were shared")
    }
}
