import Testing
@testable import FerryCore

struct SiteIDTests {
    let hex = "3f2a9c1d00112233445566778899aabbccddeeff0123456789abcdef01234567"

    @Test func formatsAsSixteenGroupsAndParsesEveryForm() throws {
        let id = try #require(SiteID(hex))
        #expect(id.description == "3f2a-9c1d-0011-2233-4455-6677-8899-aabb-ccdd-eeff-0123-4567-89ab-cdef-0123-4567")
        #expect(SiteID(id.description) == id)
        #expect(SiteID(hex.uppercased()) == id)
        let colons = stride(from: 0, to: 64, by: 2).map { i -> String in
            let a = hex.index(hex.startIndex, offsetBy: i)
            return String(hex[a..<hex.index(a, offsetBy: 2)]).uppercased()
        }.joined(separator: ":")
        #expect(SiteID(colons) == id)
        #expect(id.short == "3f2a-9c1d")
        #expect(id.hex == hex)
    }

    @Test(arguments: ["", "abc", String(repeating: "g", count: 64), String(repeating: "a", count: 66)])
    func rejectsWhatIsNotAnID(_ text: String) {
        #expect(SiteID(text) == nil)
    }
}

struct ByteSizeTests {
    @Test(arguments: [("512M", UInt64(512) << 20), ("20G", UInt64(20) << 30), ("1T", UInt64(1) << 40),
                      ("4096", UInt64(4096)), ("1GiB", UInt64(1) << 30), ("64k", UInt64(65536))])
    func parses(_ text: String, _ value: UInt64) {
        #expect(ByteSize.parse(text) == value)
    }

    @Test(arguments: ["20X", "", "G", "-1G", "1.5G", "99999999999999999999P"])
    func rejects(_ text: String) {
        #expect(ByteSize.parse(text) == nil)
    }

    @Test func formats() {
        #expect(ByteSize.format(1 << 30) == "1G")
        #expect(ByteSize.format(1536) == "1.5K")
        #expect(ByteSize.format(100) == "100")
    }
}

struct BackoffTests {
    struct Fixed: RandomNumberGenerator {
        var value: UInt64
        mutating func next() -> UInt64 { value }
    }

    @Test func growsAndIsCappedAndResets() {
        var b = Backoff(base: .milliseconds(100), cap: .seconds(2))
        var rng = SystemRandomNumberGenerator()
        var delays: [Duration] = []
        for _ in 0..<12 { delays.append(b.next(using: &rng)) }
        #expect(delays[0] >= .milliseconds(50) && delays[0] <= .milliseconds(100))
        #expect(delays[3] >= .milliseconds(400) && delays[3] <= .milliseconds(800))
        #expect(delays.allSatisfy { $0 <= .seconds(2) })
        #expect(delays.suffix(4).allSatisfy { $0 >= .seconds(1) })
        b.reset()
        #expect(b.next(using: &rng) <= .milliseconds(100))
    }
}
