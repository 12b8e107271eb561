import FerryCore
import FerryNBD
import FerryStore
import FerryWire
import Logging
import NIOCore
import NIOPosix

extension PrimaryVolumeRuntime {
    /// Runs `event` on the machine under the lock, plans its actions, then does the deferred work.
    func handle(_ event: (inout Core) -> [PrimaryVolume.Action]) {
        let work = core.withLockedValue { core -> DeferredWork in
            var work = DeferredWork()
            plan(event(&core), core: &core, work: &work)
            if ackTimers != nil { work.ackSamples = core.machine.takeAckSamples() }
            return work
        }
        perform(work)
    }

    /// Under the lock: everything whose order matters.
    func plan(_ actions: [PrimaryVolume.Action], core: inout Core, work: inout DeferredWork) {
        var frames: [(peer: String, link: LinkID, frames: [VolumeFrame])] = []
        func queue(_ frame: VolumeFrame, _ peer: String, _ link: LinkID) {
            if let last = frames.indices.last, frames[last].peer == peer, frames[last].link == link {
                frames[last].frames.append(frame)
            } else {
                frames.append((peer, link, [frame]))
            }
        }
        for action in actions {
            switch action {
            case .executeLocal(let seq):
                guard let io = core.pending[seq] else { continue }
                switch io.kind {
                case .write(let data): work.localWrites.append((seq, io.range!.offset, data))
                case .zero: work.offloaded.append(seq)
                case .flush: break
                }
            case .flushLocal(let seq):
                work.offloaded.append(seq)
            case .appendJournal(let entry):
                var payload: ByteBuffer?
                if case .write(let data)? = core.pending[entry.seq]?.kind { payload = data }
                do {
                    try journalLock.withLock { try journal?.append(entry, payload: payload) }
                } catch {
                    noteError(&core, work: &work, "appending to the journal failed: \(error)")
                }
            case .trimJournal(let through):
                do {
                    try journalLock.withLock { try journal?.trim(through: through) }
                } catch {
                    noteError(&core, work: &work, "trimming the journal failed: \(error)")
                }
            case .persist(let token, let metadata):
                if core.persistRunning {
                    core.persistQueued = (token, metadata)
                } else {
                    core.persistRunning = true
                    work.persistNow = (token, metadata)
                }
            case .send(let peer, let link, let message):
                var payload: ByteBuffer?
                if case .write(let item) = message, !item.isZero {
                    if case .write(let data)? = core.pending[item.seq]?.kind {
                        payload = data
                    } else {
                        payload = try? journalLock.withLock { try journal?.payload(seq: item.seq) }
                        if payload == nil {
                            noteError(&core, work: &work, "write \(item.seq) for \(peer) is no longer in the journal; closing the link")
                            work.closes.append((peer, link, "internal: journal entry missing"))
                            continue
                        }
                    }
                }
                queue(VolumeFrame(volume: name, message: message, payload: payload), peer, link)
            case .sendRegion(let peer, let link, var item, let fromPreserved):
                var data: ByteBuffer?
                if fromPreserved {
                    data = Self.preservedCopy(of: item.range, in: core.preserved[peer] ?? [:])
                } else if image.extents(offset: item.range.offset, length: item.range.length).allSatisfy(\.isHole) {
                    item.isZero = true   // a hole goes as zeroing: no data on the wire
                } else {
                    data = try? image.read(offset: item.range.offset, length: Int(item.range.length), allocator: ByteBufferAllocator())
                    // Read once for the peer: not worth keeping cached (``VolumeImage/dropCached``).
                    image.dropCached(offset: item.range.offset, length: item.range.length)
                }
                if !item.isZero, let buffer = data, buffer.readableBytesView.allSatisfy({ $0 == 0 }) {
                    item.isZero = true
                    data = nil
                }
                if !item.isZero && data == nil {
                    noteError(&core, work: &work, "reading \(item.range) for \(peer) failed; closing the link")
                    work.closes.append((peer, link, "internal: read failed"))
                    continue
                }
                queue(VolumeFrame(volume: name, message: .region(item), payload: data), peer, link)
            case .preserve(let peer, let range):
                if let data = try? image.read(offset: range.offset, length: Int(range.length), allocator: ByteBufferAllocator()) {
                    core.preserved[peer, default: [:]][range.offset] = data
                }
            case .dropPreserved(let peer):
                core.preserved[peer] = nil
            case .complete(let seq, let error):
                guard let io = core.pending.removeValue(forKey: seq), let promise = io.promise else { continue }
                work.completions.append((promise, error.map(BlockDeviceErrorBox.init(message:))))
            case .closeLink(let peer, let link, let reason):
                work.closes.append((peer, link, reason))
            case .fence(let reason):
                core.fenced = true
                work.events.append(VolumeEvent(volume: name, kind: .fenced, message: reason))
            case .rejoin(let plan):
                work.events.append(VolumeEvent(volume: name, kind: .rejoin(plan), message: plan.reason))
            case .epochChanged(let epoch, let reason):
                work.events.append(VolumeEvent(volume: name, kind: .epochChanged(epoch), message: "volume \(name) takes epoch \(epoch): \(reason)"))
            case .stateChanged(let peer, let state, let reason):
                work.events.append(VolumeEvent(volume: name, kind: .linkState(peer: peer, state: state),
                                               message: "volume \(name) → \(peer): \(state.rawValue): \(reason)"))
            }
        }
        for batch in frames {
            core.bytesSent[batch.peer, default: 0] += batch.frames.reduce(0) { $0 + UInt64($1.payload?.readableBytes ?? 0) }
            var encoded: [VolumeFrame] = batch.frames
            if var encoder = core.encoders[batch.peer] {
                // zstd only while the link is backed up: on a link with room to spare, compressing
                // costs the sender's CPU (about 2 ms per MiB) and saves nothing the link needed.
                let worthTrying = links.isBacklogged(link: batch.link)
                encoded = batch.frames.map { encoder.prepare($0, worthTrying: worthTrying) }
                core.encoders[batch.peer] = encoder
            }
            links.send(encoded, to: batch.peer, link: batch.link)
            if work.sentOn == nil, batch.frames.contains(where: { if case .write = $0.message { return true } else { return false } }) {
                work.sentOn = batch.link
            }
        }
    }

    /// `range` put together from the copies of its regions kept for a point (nil if one is missing).
    static func preservedCopy(of range: BlockRange, in copies: [UInt64: ByteBuffer]) -> ByteBuffer? {
        if let whole = copies[range.offset], whole.readableBytes == range.length { return whole }
        var buffer = ByteBufferAllocator().buffer(capacity: Int(range.length))
        var offset = range.offset
        while offset < range.end {
            guard var copy = copies[offset], copy.readableBytes > 0 else { return nil }
            offset += UInt64(copy.readableBytes)
            buffer.writeBuffer(&copy)
        }
        return offset == range.end ? buffer : nil
    }

    func noteError(_ core: inout Core, work: inout DeferredWork, _ message: String) {
        core.lastError = message
        work.events.append(VolumeEvent(volume: name, kind: .ioError, message: "volume \(name): \(message)"))
    }

    /// After the lock: local writes, offloads, persists, answers, events.
    func perform(_ work: DeferredWork) {
        guard !work.isEmpty else { return }
        if let ackTimers { for sample in work.ackSamples { ackTimers.record(sample) } }
        for event in work.events { onEvent(event) }
        for close in work.closes { links.close(peer: close.peer, link: close.link, reason: close.reason) }
        Self.complete(work.completions)
        if !work.localWrites.isEmpty {
            if let link = work.sentOn {
                writeAfterSending(work.localWrites, on: link)
            } else {
                writeLocally(work.localWrites)
            }
        }
        for seq in work.offloaded { offload(seq) }
        if let (token, metadata) = work.persistNow { startPersist(token: token, metadata: metadata) }
    }

    /// Client writes on the image, inline on the caller's thread (the page cache), then their
    /// completions to the machine.
    func writeLocally(_ writes: [LocalWrite]) {
        var results: [(UInt64, String?)] = []
        for w in writes {
            do {
                try image.write(offset: w.offset, data: w.data)
                results.append((w.seq, nil))
            } catch {
                results.append((w.seq, "\(reportIOError(error, doing: "write"))"))
            }
        }
        let now = clock.now()
        handle { core in results.flatMap { core.machine.localDone(seq: $0.0, error: $0.1, now: now) } }
    }

    /// Writes that also went to a peer on `link`: when this thread is the link's loop (an NBD
    /// connection shares it on small machines), they are written after the frames are sent, so
    /// the peer works on its copies while this site writes its own, instead of waiting for every
    /// local write of the batch first. The writes of one loop turn go together, in one task.
    /// Safe in any order: an overlapping write is admitted only once this one is done here.
    func writeAfterSending(_ writes: [LocalWrite], on link: LinkID) {
        let first = localQueue.withLockedValue { queue in
            queue.writes.append(contentsOf: writes)
            defer { queue.scheduled = true }
            return !queue.scheduled
        }
        guard first else { return }
        let take: @Sendable () -> Void = { [self] in
            let batch = localQueue.withLockedValue { queue in
                queue.scheduled = false
                defer { queue.writes = [] }
                return queue.writes
            }
            writeLocally(batch)
        }
        if !links.afterQueuedFrames(on: link, take) { take() }
    }

    /// Answers requests, one task per event loop rather than one per request: an ack that
    /// answers 32 writes of one NBD connection wakes its loop once, and the replies go out together.
    static func complete(_ completions: [(EventLoopPromise<Void>, BlockDeviceErrorBox?)]) {
        @Sendable func answer(_ batch: [(EventLoopPromise<Void>, BlockDeviceErrorBox?)]) {
            for (promise, error) in batch {
                if let error {
                    promise.fail(error.message.hasPrefix("fenced") ? BlockDeviceError.fenced : BlockDeviceError.io(errno: 5))
                } else {
                    promise.succeed(())
                }
            }
        }
        guard completions.count > 1 else { return answer(completions) }
        var byLoop: [(any EventLoop, [(EventLoopPromise<Void>, BlockDeviceErrorBox?)])] = []
        for completion in completions {
            let loop = completion.0.futureResult.eventLoop
            if let i = byLoop.firstIndex(where: { $0.0 === loop }) {
                byLoop[i].1.append(completion)
            } else {
                byLoop.append((loop, [completion]))
            }
        }
        for (loop, batch) in byLoop {
            if loop.inEventLoop { answer(batch) } else { loop.execute { answer(batch) } }
        }
    }

    /// Zeroing and flushing go to the thread pool; the machine hears when they are done.
    /// A sequence with no request of a client's is the machine's own checkpoint flush.
    func offload(_ seq: UInt64) {
        let io = core.withLockedValue { $0.pending[seq] }
        guard case .zero(let mayPunchHole)? = io?.kind, let range = io?.range else {
            if flushGroup.join(seq) { threadPool.submit { [self] state in flushGroup.drain { flush($0, state: state) } } }
            return
        }
        let image = self.image
        threadPool.submit { [self] state in
            var failure: String?
            do {
                guard case .active = state else { throw BlockDeviceError.shuttingDown }
                var done = false
                if mayPunchHole { done = try image.punchHole(offset: range.offset, length: range.length) }
                if !done { done = try image.zeroRangeFast(offset: range.offset, length: range.length) }
                if !done { try image.writeZeroBytes(offset: range.offset, length: range.length) }
            } catch {
                failure = "\(self.reportIOError(error, doing: "zero"))"
            }
            let now = self.clock.now()
            self.handle { $0.machine.localDone(seq: seq, error: failure, now: now) }
        }
    }

    /// One chain of fdatasyncs (the image, then the journal) for every client flush in `seqs`,
    /// which all joined before it started (``GroupCommit``); each hears the same outcome.
    func flush(_ seqs: [UInt64], state: NIOThreadPool.WorkItemState) {
        var failure: String?
        do {
            guard case .active = state else { throw BlockDeviceError.shuttingDown }
            try image.flush()
            // Taken under the journal's lock, run outside it: appends go on meanwhile.
            try journalLock.withLock { try journal?.takeSync() }?.run()
        } catch {
            failure = "\(reportIOError(error, doing: "flush"))"
        }
        let now = clock.now()
        handle { core in seqs.flatMap { core.machine.localDone(seq: $0, error: failure, now: now) } }
    }

    /// Metadata persists run one at a time, in token order; a persist asked for meanwhile is
    /// coalesced into the next (it carries the newest state and the highest token).
    func startPersist(token: UInt64, metadata: PrimaryVolume.Metadata) {
        let file = metadataFile
        threadPool.submit { [self] _ in
            do {
                try file.store(metadata)
            } catch {
                // Not acknowledged: whatever waits for it keeps waiting. Retry (with the newest
                // state, if another persist was asked for meanwhile) after a pause.
                self.logger.error("volume \(self.name): persisting replication metadata failed (retrying in 1 s): \(error)")
                let retry = self.core.withLockedValue { core -> (UInt64, PrimaryVolume.Metadata) in
                    defer { core.persistQueued = nil }
                    return core.persistQueued ?? (token, metadata)
                }
                sleep(1)
                self.startPersist(token: retry.0, metadata: retry.1)
                return
            }
            let now = self.clock.now()
            var next: (UInt64, PrimaryVolume.Metadata)?
            self.handle { core in
                if let queued = core.persistQueued {
                    core.persistQueued = nil
                    next = queued
                } else {
                    core.persistRunning = false
                }
                return core.machine.persisted(token: token, now: now)
            }
            if let next { self.startPersist(token: next.0, metadata: next.1) }
        }
    }

    /// Logs an I/O error (rate-limited), keeps it for status, and maps it for the NBD client.
    @discardableResult
    func reportIOError(_ error: any Error, doing what: String) -> any Error {
        let mapped = Self.deviceError(error)
        let message = "\(what) failed: \(error)"
        let now = clock.now().monotonicNanos
        let log = core.withLockedValue { core -> Bool in
            core.lastError = message
            guard now - core.lastErrorLogged > 1_000_000_000 else { return false }
            core.lastErrorLogged = now
            return true
        }
        if log { logger.error("volume \(name): \(message)") }
        return mapped
    }

    static func deviceError(_ error: any Error) -> any Error {
        if let e = error as? BlockDeviceError { return e }
        if let e = error as? StoreError, let code = e.errno { return BlockDeviceError.io(errno: code) }
        if error is NIOThreadPoolError.ThreadPoolInactive { return BlockDeviceError.shuttingDown }
        return BlockDeviceError.io(errno: 5)
    }
}
