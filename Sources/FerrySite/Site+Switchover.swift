import FerryCore
import FerryNBD
import FerryVolume
import Foundation
import NIOCore

extension Site {
    /// `POST /v1/volumes/NAME/switchover?to=PEER[&timeout=SECONDS]`, on the primary: a planned
    /// move of the primary role to `peer` with no write lost.
    ///
    /// 1. **drain**: the export is withdrawn (clients are disconnected; what they had not been
    ///    answered was not promised), the writes still running finish, and a flush makes them
    ///    durable here and, through its barrier, on every sync peer;
    /// 2. **wait** until `peer` holds durably every write admitted here;
    /// 3. **demote** this site (nothing needs keeping aside: the peer has it all);
    /// 4. **hand over**: `peer` is told to take over and promotes itself (its `on-promote` hook
    ///    runs there); this site waits until the new primary streams to it.
    ///
    /// Until step 3 a failure changes nothing: the export is put back. Reversible the same way,
    /// from the new primary.
    func switchover(_ name: String, to peer: String?, timeoutSeconds: Double) -> AdminReply {
        let me = config.site.name
        let started = ContinuousClock.now
        var steps: [String] = []
        func elapsed() -> String {
            let d = (ContinuousClock.now - started).components
            return String(format: "%.2f s", Double(d.seconds) + Double(d.attoseconds) / 1e18)
        }
        func waitUntil(_ seconds: Double, _ condition: () -> Bool) -> Bool {
            let deadline = ContinuousClock.now + .milliseconds(Int64(seconds * 1000))
            while ContinuousClock.now < deadline {
                if condition() { return true }
                Thread.sleep(forTimeInterval: 0.01)
            }
            return condition()
        }
        return withRoleContext(name) { context in
            guard let peer, !peer.isEmpty else {
                return Self.reply(400, "error", "say which site takes over: `ferry switchover \(name) --to SITE`")
            }
            let (primary, link): (PrimaryVolumeRuntime, ReplicaLinkStatus)
            switch livePeerLink(context, name: name, peer: peer, command: "switchover",
                                scheduled: "it holds only points. Use an in-sync sync, semi-sync or async replica, "
                                    + "or `ferry demote` here and `ferry promote` there", suffix: "; nothing changed") {
            case .success(let found): (primary, link) = found
            case .failure(let refusal): return refusal.reply
            }
            guard link.consistent else {
                return Self.reply(409, "error", "\(peer) is not consistent yet (\(link.state.rawValue): \(link.reason)); "
                                  + "wait until `ferry status` shows it in sync; nothing changed")
            }

            // 1. Drain.
            let previous = exports.lookup(name)
            let dropped = exports.remove(name)
            func putBack(_ why: String) -> AdminReply {
                if let previous, context.engine.primary(name) != nil { exports.add(previous) }
                logger.warning("volume \(name): switchover to \(peer) abandoned: \(why)")
                return Self.reply(409, "error", (steps + ["abandoned after \(elapsed()): \(why); nothing changed, \(name) is served here again"])
                    .joined(separator: "\n"))
            }
            do {
                try primary.flush(on: linkLoop).wait()
            } catch {
                return putBack("the flush failed: \(error)")
            }
            steps.append("drained \(name) on \(me): export withdrawn (\(dropped) client\(dropped == 1 ? "" : "s") disconnected), "
                         + "writes flushed through sequence \(primary.lastAdmittedSeq) (\(elapsed()))")

            // 2. Wait for the peer.
            guard waitUntil(timeoutSeconds, { primary.peerHoldsEverything(peer) }) else {
                let now = primary.status().first { $0.peer == peer }
                return putBack("\(peer) did not confirm every write within \(Int(timeoutSeconds)) s "
                               + "(\(now?.state.rawValue ?? "?"): \(now?.reason ?? "?"))")
            }
            let seq = primary.lastAdmittedSeq
            let handoff = VolumeHandoff(epoch: primary.epoch, generation: primary.generation, seq: seq)
            steps.append("\(peer) holds every write through sequence \(seq) durably (\(elapsed()))")

            // 3. Step down.
            let demoted = makeSecondary(context, name: name, rejoin: nil, keepAsideFor: peer)
            guard demoted.code == 200 else { return putBack("demoting failed: \(String(decoding: demoted.body, as: UTF8.self))") }
            steps.append("demoted \(name) on \(me): now a secondary, export read-only (\(elapsed()))")

            // 4. Hand over, and wait for the new primary's stream.
            guard context.engine.handOver(name, to: peer, handoff) else {
                steps.append("the link to \(peer) went down before the handoff: no site is primary of \(name) now. "
                             + "Run `ferry promote \(name)` on \(peer) (it holds every write), or here to take it back")
                return Self.reply(500, "error", steps.joined(separator: "\n"))
            }
            let following = waitUntil(timeoutSeconds) {
                context.engine.replica(name).map { $0.streamingPeer == peer && $0.position.epoch > handoff.epoch } ?? false
            }
            guard following else {
                steps.append("\(peer) did not take over within \(Int(timeoutSeconds)) s: check `ferry status` there (its log says why). "
                             + "It holds every write: `ferry promote \(name)` there finishes the move; `ferry promote \(name)` here takes it back")
                return Self.reply(500, "error", steps.joined(separator: "\n"))
            }
            let epoch = context.engine.replica(name)?.position.epoch ?? 0
            steps.append("\(peer) is the primary of \(name) at epoch \(epoch) and streams to \(me) (\(elapsed()))")
            steps.append("no write lost: \(peer) held every write through sequence \(seq) before this site stepped down")
            let others = context.volume.config.replicaNames.filter { $0 != peer && $0 != me }
            if !others.isEmpty {
                steps.append("\(others.joined(separator: ", ")) now replicate\(others.count == 1 ? "s" : "") from \(peer) if its config lists "
                             + "\(others.count == 1 ? "it" : "them"): each is sent what changed since the state it holds, a full copy only "
                             + "when that state cannot be dated (`ferry status` on \(peer) says which)")
            }
            steps.append("to move back: `ferry switchover \(name) --to \(me)` on \(peer)")
            logger.notice("volume \(name): switched over to \(peer)", metadata: ["seq": "\(seq)", "epoch": "\(epoch)"])
            return Self.reply(200, "message", steps.joined(separator: "\n"))
        }
    }

    /// A replica whose primary handed the volume over (``VolumeEvent/Kind/takeOver(peer:)``)
    /// promotes itself, exactly as `ferry promote` would.
    func takeOver(_ name: String, from peer: String) {
        let reply = promote(name, force: false)
        let text = (try? JSONSerialization.jsonObject(with: reply.body) as? [String: String]).flatMap { $0["message"] ?? $0["error"] } ?? ""
        if reply.code == 200 {
            logger.notice("volume \(name): took over from \(peer) (switchover)", metadata: ["result": "\(text)"])
        } else {
            logger.error("volume \(name): taking over from \(peer) failed: \(text)")
        }
    }
}
