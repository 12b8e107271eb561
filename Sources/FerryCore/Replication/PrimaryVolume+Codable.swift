/// How ``PrimaryVolume/Metadata`` is stored: JSON, with the word arrays (dirty bitmaps, last
/// writes) as ``WordRuns`` text. The metadata is stored at every client flush, so this must cost
/// next to nothing for a clean bitmap. Metadata written before (the words as JSON arrays of
/// numbers, keys `dirtyWords` and `lastWrites`) is still read.
extension PrimaryVolume.Metadata.Peer {
    enum CodingKeys: String, CodingKey {
        case dirtyRuns, dirtyWordCount, dirtyWords, initialSyncPending, lastPoint, journaled, ackedSeq, rivalEpoch, dirtySince
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        dirtyWords = try c.decodeWordRuns(.dirtyRuns, count: .dirtyWordCount) ?? c.decode([UInt64].self, forKey: .dirtyWords)
        initialSyncPending = try c.decode(Bool.self, forKey: .initialSyncPending)
        lastPoint = try c.decodeIfPresent(PointRecord.self, forKey: .lastPoint)
        journaled = try c.decodeIfPresent(Bool.self, forKey: .journaled) ?? false
        ackedSeq = try c.decodeIfPresent(UInt64.self, forKey: .ackedSeq)
        rivalEpoch = try c.decodeIfPresent(UInt64.self, forKey: .rivalEpoch)
        dirtySince = try c.decodeIfPresent(Double.self, forKey: .dirtySince)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(WordRuns.encode(dirtyWords), forKey: .dirtyRuns)
        try c.encode(dirtyWords.count, forKey: .dirtyWordCount)
        try c.encode(initialSyncPending, forKey: .initialSyncPending)
        try c.encodeIfPresent(lastPoint, forKey: .lastPoint)
        try c.encode(journaled, forKey: .journaled)
        try c.encodeIfPresent(ackedSeq, forKey: .ackedSeq)
        try c.encodeIfPresent(rivalEpoch, forKey: .rivalEpoch)
        try c.encodeIfPresent(dirtySince, forKey: .dirtySince)
    }
}

extension PrimaryVolume.Metadata {
    enum CodingKeys: String, CodingKey {
        case activityLog, peers, lastSeq, sequenceCeiling, regionSize, lastWrites, lastWritesRuns, lastWritesCount, lastWritesCoverLine
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        activityLog = try c.decode([Int].self, forKey: .activityLog)
        peers = try c.decode([String: Peer].self, forKey: .peers)
        lastSeq = try c.decode(UInt64.self, forKey: .lastSeq)
        sequenceCeiling = try c.decode(UInt64.self, forKey: .sequenceCeiling)
        regionSize = try c.decode(UInt64.self, forKey: .regionSize)
        lastWrites = try c.decodeWordRuns(.lastWritesRuns, count: .lastWritesCount)
            ?? c.decodeIfPresent([UInt64].self, forKey: .lastWrites)
        lastWritesCoverLine = try c.decodeIfPresent(Bool.self, forKey: .lastWritesCoverLine) ?? false
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(activityLog, forKey: .activityLog)
        try c.encode(peers, forKey: .peers)
        try c.encode(lastSeq, forKey: .lastSeq)
        try c.encode(sequenceCeiling, forKey: .sequenceCeiling)
        try c.encode(regionSize, forKey: .regionSize)
        if let lastWrites {
            try c.encode(WordRuns.encode(lastWrites), forKey: .lastWritesRuns)
            try c.encode(lastWrites.count, forKey: .lastWritesCount)
        }
        if lastWritesCoverLine { try c.encode(true, forKey: .lastWritesCoverLine) }
    }
}

extension KeyedDecodingContainer {
    /// The words stored as ``WordRuns`` under `runs` (their number under `count`), or nil when
    /// `runs` is absent (metadata of the older form).
    func decodeWordRuns(_ runs: Key, count: Key) throws -> [UInt64]? {
        guard let text = try decodeIfPresent(String.self, forKey: runs) else { return nil }
        let words = try decode(Int.self, forKey: count)
        do {
            return try WordRuns.decode(text, count: words)
        } catch {
            throw DecodingError.dataCorruptedError(forKey: runs, in: self, debugDescription: "\(error)")
        }
    }
}
