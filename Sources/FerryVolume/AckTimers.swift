import CoreMetrics
import FerryCore

/// `ferry_volume_ack_duration_seconds{volume, peer, level}`: from sending an item to its ack at
/// each level (received, written, durable): what a sync write waits for.
final class AckTimers: Sendable {
    static let name = "ferry_volume_ack_duration_seconds"
    private let timers: [String: [Timer]]

    init(volume: String, peers: [String]) {
        var timers: [String: [Timer]] = [:]
        for peer in peers {
            timers[peer] = AckLevel.allCases.map {
                Timer(label: Self.name, dimensions: [("volume", volume), ("peer", peer), ("level", "\($0)")])
            }
        }
        self.timers = timers
    }

    func record(_ sample: AckSample) {
        guard let forPeer = timers[sample.peer], let i = AckLevel.allCases.firstIndex(of: sample.level) else { return }
        forPeer[i].recordNanoseconds(sample.nanos)
    }
}
