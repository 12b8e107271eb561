import Foundation
import Testing
@testable import FerryCore

/// ``WordRuns``: the stored form of the metadata's word arrays, and the metadata around it.
struct WordRunsTests {
    @Test("word arrays survive the round trip: empty, clean, full, sparse, dense, runs")
    func roundTrips() throws {
        var random = SeededRandom(seed: 7)
        var cases: [[UInt64]] = [[], [0], [.max], [UInt64](repeating: 0, count: 4096), [UInt64](repeating: .max, count: 4096),
                                 [1, 1, 2, 2, 0, 0, 3, .max, .max, 0, 5]]
        var sparse = [UInt64](repeating: 0, count: 1 << 16)
        for _ in 0..<200 { sparse[Int(random.next() % UInt64(sparse.count))] = random.next() | 1 }
        cases.append(sparse)
        cases.append((0..<5000).map { _ in random.next() })
        for words in cases {
            let text = WordRuns.encode(words)
            #expect(try WordRuns.decode(text, count: words.count) == words, "\(words.count) words")
        }
        #expect(WordRuns.encode([UInt64](repeating: 0, count: 1 << 16)).isEmpty, "a clean bitmap is nothing")
        #expect(WordRuns.encode([UInt64](repeating: .max, count: 1 << 16)).count == 24, "a full one is one run")
    }

    @Test("base64 agrees with Foundation's for every length mod 3")
    func base64MatchesFoundation() throws {
        for length in 0..<40 {
            let bytes = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
            let text = Base64.encode(bytes)
            #expect(text == Data(bytes).base64EncodedString())
            #expect(Base64.decode(text) == bytes)
        }
    }

    @Test("malformed text is refused, never read as some other bitmap")
    func malformedIsRefused() {
        let one = WordRuns.encode([0, 5, 5, 0])
        #expect(throws: WordRuns.Failure.self) { try WordRuns.decode("not base64!", count: 4) }
        #expect(throws: WordRuns.Failure.self) { try WordRuns.decode("AAAA", count: 4) }          // 3 bytes: no whole run
        #expect(throws: WordRuns.Failure.self) { try WordRuns.decode(one, count: 2) }             // past the end
        let twice = Base64.encode(Base64.decode(one)! + Base64.decode(one)!)                      // overlapping runs
        #expect(throws: WordRuns.Failure.self) { try WordRuns.decode(twice, count: 4) }
    }

    @Test("metadata is stored with runs, and metadata stored as arrays of numbers is still read")
    func metadataOldAndNewForm() throws {
        var words = [UInt64](repeating: 0, count: 4096)
        words[17] = 0b1011
        let metadata = PrimaryVolume.Metadata(
            activityLog: [3], peers: ["west": .init(dirtyWords: words, initialSyncPending: false, lastPoint: nil, journaled: true, ackedSeq: 9)],
            lastSeq: 10, sequenceCeiling: 1 << 20, regionSize: 4096, lastWrites: [0, 7, 7, .max])
        let json = try JSONEncoder().encode(metadata)
        #expect(json.count < 400, "\(json.count) bytes: \(String(decoding: json, as: UTF8.self))")
        #expect(try JSONDecoder().decode(PrimaryVolume.Metadata.self, from: json) == metadata)

        let old = """
            {"activityLog":[3],"lastSeq":10,"sequenceCeiling":1048576,"regionSize":4096,"lastWrites":[0,7,7,18446744073709551615],
             "peers":{"west":{"dirtyWords":\(words),"initialSyncPending":false,"journaled":true,"ackedSeq":9}}}
            """
        #expect(try JSONDecoder().decode(PrimaryVolume.Metadata.self, from: Data(old.utf8)) == metadata)
        let older = #"{"activityLog":[],"lastSeq":0,"sequenceCeiling":0,"regionSize":4096,"peers":{"west":{"dirtyWords":[],"initialSyncPending":true}}}"#
        let decoded = try JSONDecoder().decode(PrimaryVolume.Metadata.self, from: Data(older.utf8))
        #expect(decoded.lastWrites == nil && decoded.peers["west"]?.journaled == false)
    }
}
