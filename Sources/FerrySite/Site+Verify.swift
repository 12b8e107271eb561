import FerryCore
import FerryVolume
import Foundation

extension Site {
    /// Online verify's block sizes, coarse to fine: both sides hash 4 MiB blocks; only the blocks
    /// that differ are hashed again in 64 KiB blocks, and those in 4 KiB blocks, so a volume that
    /// matches costs one hash per 4 MiB on the wire and a difference is located to 4 KiB.
    static let verifyLevels: [UInt64] = [4 << 20, 64 << 10, 4 << 10]

    /// `POST /v1/volumes/NAME/verify?peer=PEER[&repair=1]`, on the primary: compares this image
    /// with the peer's, top-down by hashes, and reports the exact ranges that differ; `repair`
    /// sends them again. Replication goes on meanwhile; a range that differs only because a
    /// write was on its way is hashed again after a moment and no longer counted.
    func verify(_ name: String, peer: String?, repair: Bool) -> AdminReply {
        let me = config.site.name
        let started = ContinuousClock.now
        return withRoleContext(name) { context in
            guard let peer, !peer.isEmpty else {
                return Self.reply(400, "error", "say which site to compare with: `ferry verify \(name) --peer SITE`")
            }
            let primary: PrimaryVolumeRuntime
            switch livePeerLink(context, name: name, peer: peer, command: "verify",
                                scheduled: "it holds the last point, not the live image, so it differs by design") {
            case .success(let found): primary = found.0
            case .failure(let refusal): return refusal.reply
            }
            let image = context.image
            /// The sub-ranges of `range` whose blocks of `blockSize` differ between the sites, or
            /// the reason they could not be compared.
            func differing(_ range: BlockRange, blockSize: UInt64) -> Result<[BlockRange], VerifyFailure> {
                var found: [BlockRange] = []
                var at = range.offset
                while at < range.end {
                    let length = min(range.end - at, blockSize * UInt64(VerifyRequest.maxBlocks))
                    let local: [UInt64]
                    do {
                        local = try image.blockHashes(offset: at, length: length, blockSize: blockSize)
                    } catch {
                        return .failure(VerifyFailure(text: "reading the image here failed: \(error)"))
                    }
                    let request = VerifyRequest(id: 0, offset: at, length: length, blockSize: UInt32(blockSize))
                    guard let remote = context.engine.remoteHashes(name, peer: peer, request, timeoutSeconds: 120),
                          remote.count == local.count else {
                        return .failure(VerifyFailure(text: "\(peer) did not answer with the hashes of \(length) bytes at \(at) "
                                                      + "(the link went down, or it could not read its image: its log says)"))
                    }
                    for i in local.indices where local[i] != remote[i] {
                        let offset = at + UInt64(i) * blockSize
                        found.append(BlockRange(offset: offset, length: min(blockSize, range.end - offset)))
                    }
                    at += length
                }
                return .success(found)
            }
            func refine(_ ranges: [BlockRange]) -> Result<[BlockRange], VerifyFailure> {
                var suspects = ranges
                for blockSize in Self.verifyLevels {
                    var next: [BlockRange] = []
                    for range in Self.merged(suspects) {
                        switch differing(range, blockSize: blockSize) {
                        case .success(let found): next += found
                        case .failure(let failure): return .failure(failure)
                        }
                    }
                    suspects = next
                    if suspects.isEmpty { break }
                }
                return .success(Self.merged(suspects))
            }
            var result = refine([BlockRange(offset: 0, length: image.size)])
            // A write on its way when the peer hashed: look again once it has landed.
            if case .success(let found) = result, !found.isEmpty {
                Thread.sleep(forTimeInterval: 0.3)
                result = refine(found)
            }
            let diffs: [BlockRange]
            switch result {
            case .success(let found): diffs = found
            case .failure(let failure): return Self.reply(502, "error", "verify of \(name) against \(peer) failed: \(failure.text)")
            }
            let d = (ContinuousClock.now - started).components
            let seconds = Double(d.seconds) + Double(d.attoseconds) / 1e18
            let rate = Double(image.size) / max(seconds, 1e-6) / 1_048_576
            var lines = [String(format: "verified %@ on %@ against %@: %@ in %.2f s (%.0f MiB/s)",
                                name, me, peer, ByteSize.format(image.size), seconds, rate)]
            guard !diffs.isEmpty else {
                lines.append("identical: every 4 KiB block matches")
                logger.notice("volume \(name): verified against \(peer): identical")
                return Self.reply(200, "message", lines.joined(separator: "\n"))
            }
            let bytes = diffs.reduce(UInt64(0)) { $0 + $1.length }
            lines.append("\(diffs.count) range\(diffs.count == 1 ? "" : "s") differ (\(ByteSize.format(bytes))):")
            for r in diffs.prefix(50) { lines.append("  offset \(r.offset) length \(r.length)") }
            if diffs.count > 50 { lines.append("  … and \(diffs.count - 50) more") }
            logger.warning("volume \(name): verify against \(peer) found \(diffs.count) differing ranges (\(bytes) bytes)")
            if repair {
                if primary.resync(diffs, peer: peer) {
                    lines.append("repairing: \(peer) is sent these ranges again from \(me) (`ferry status` shows the catch-up; verify again after)")
                } else {
                    lines.append("not repaired: a catch-up or point to \(peer) is running, or its session is not open; run verify again after it")
                    return Self.reply(409, "error", lines.joined(separator: "\n"))
                }
            } else {
                lines.append("`ferry verify \(name) --peer \(peer) --repair` sends them again from \(me)")
            }
            return Self.reply(200, "message", lines.joined(separator: "\n"))
        }
    }

    struct VerifyFailure: Error { var text: String }

    /// Sorted, with touching ranges joined.
    static func merged(_ ranges: [BlockRange]) -> [BlockRange] {
        var out: [BlockRange] = []
        for r in ranges.sorted(by: { $0.offset < $1.offset }) {
            if let last = out.last, last.end >= r.offset {
                out[out.count - 1] = BlockRange(offset: last.offset, length: max(last.end, r.end) - last.offset)
            } else {
                out.append(r)
            }
        }
        return out
    }
}
